//! Who is calling (authentication) and what they may do (authorization).
//!
//! Authentication, in order: a client certificate signed by the cluster CA (user from the CN,
//! groups from the O fields), then a bearer token (static tokens from a file, or bootstrap
//! tokens stored as `bootstrap.kubernetes.io/token` Secrets in `kube-system`). A request with
//! neither is anonymous, and anonymous requests are refused except for `/version` and the
//! health endpoints.
//!
//! Authorization is a fixed policy rather than RBAC (for now): `system:masters` may do
//! everything; a node (`system:node:<name>` in `system:nodes`) may read, change its own Node
//! and Lease, the Pods bound to it, and create Events; bootstrap tokens may read discovery,
//! create CertificateSigningRequests and read those they created (the TLS-bootstrap flow of
//! a joining node); everyone authenticated may ask `selfsubjectaccessreviews`.

use std::collections::HashMap;

use serde_json::Value;

use crate::{
    Api,
    resources::Resource,
    status::{ApiError, ApiResult},
};

/// The authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User name, e.g. `kubernetes-admin` or `system:node:n1`.
    pub name: String,
    /// Groups, e.g. `system:masters`.
    pub groups: Vec<String>,
}

impl User {
    /// Whether the user is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The node name, for node credentials.
    pub fn node_name(&self) -> Option<&str> {
        self.in_group("system:nodes")
            .then(|| self.name.strip_prefix("system:node:"))
            .flatten()
    }
}

/// The identity a TLS client certificate carries, attached to each request of a connection.
#[derive(Clone, Debug, Default)]
pub struct PeerIdentity(pub Option<User>);

/// Static bearer tokens: token → user, read from a CSV file like Kubernetes'
/// `--token-auth-file` (`token,user,uid,"group1,group2"`).
#[derive(Clone, Debug, Default)]
pub struct StaticTokens(HashMap<String, User>);

impl StaticTokens {
    /// Parses the file's text.
    ///
    /// # Errors
    /// A line without at least token, user and uid.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut map = HashMap::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        {
            let (token, rest) = line
                .split_once(',')
                .ok_or_else(|| format!("line {}: expected token,user,uid[,groups]", n + 1))?;
            let mut parts = rest.splitn(3, ',');
            let user = parts.next().unwrap_or_default().trim().to_owned();
            let _uid = parts
                .next()
                .ok_or_else(|| format!("line {}: expected token,user,uid[,groups]", n + 1))?;
            let groups = parts
                .next()
                .map(|g| {
                    g.trim()
                        .trim_matches('"')
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            map.insert(token.trim().to_owned(), User { name: user, groups });
        }
        Ok(StaticTokens(map))
    }

    /// Adds one token.
    pub fn insert(&mut self, token: String, user: User) {
        self.0.insert(token, user);
    }
}

/// Resolves a bearer token to a user.
pub async fn authenticate_token(api: &Api, token: &str) -> Option<User> {
    if let Some(u) = api.config.tokens.0.get(token) {
        return Some(u.clone());
    }
    bootstrap_token(api, token).await
}

/// A bootstrap token `<id>.<secret>` matching an unexpired Secret `bootstrap-token-<id>`.
async fn bootstrap_token(api: &Api, token: &str) -> Option<User> {
    use base64::Engine as _;
    let (id, secret) = token.split_once('.')?;
    let valid = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    if !valid(id, 6) || !valid(secret, 16) {
        return None;
    }
    let secrets = crate::resources::find("", "v1", "secrets")?;
    let stored = api
        .store
        .get(&secrets.key(Some("kube-system"), &format!("bootstrap-token-{id}")))
        .await
        .ok()??;
    let obj: Value = serde_json::from_slice(&stored.value).ok()?;
    if obj.get("type").and_then(Value::as_str) != Some("bootstrap.kubernetes.io/token") {
        return None;
    }
    let field = |k: &str| {
        obj.pointer(&format!("/data/{k}"))
            .and_then(Value::as_str)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
    };
    if field("token-id").as_deref() != Some(id) || field("token-secret").as_deref() != Some(secret)
    {
        return None;
    }
    if field("usage-bootstrap-authentication").as_deref() != Some("true") {
        return None;
    }
    if let Some(exp) = field("expiration")
        && exp
            .parse::<jiff::Timestamp>()
            .map_or(true, |t| t <= jiff::Timestamp::now())
    {
        return None;
    }
    Some(User {
        name: format!("system:bootstrap:{id}"),
        groups: vec!["system:bootstrappers".into(), "system:authenticated".into()],
    })
}

/// One request to authorize.
#[derive(Clone, Copy, Debug)]
pub struct Action<'a> {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: &'a str,
    /// The resource.
    pub resource: &'a Resource,
    /// The subresource, if any.
    pub sub: Option<&'a str>,
    /// The namespace, if any.
    pub namespace: Option<&'a str>,
    /// The object name: from the path, or for a create from the submitted object.
    pub name: Option<&'a str>,
}

const READ: [&str; 3] = ["get", "list", "watch"];

/// Whether `user` may perform `action`; for node users acting on pods, `pod_node` is the
/// node the addressed pod is bound to.
pub fn allowed(user: &User, action: &Action<'_>, pod_node: Option<&str>) -> bool {
    if user.in_group("system:masters") {
        return true;
    }
    if let Some(node) = user.node_name() {
        if READ.contains(&action.verb) {
            return true;
        }
        let r = action.resource;
        return match (r.group, r.plural) {
            ("", "nodes") => action.name == Some(node),
            ("coordination.k8s.io", "leases") => {
                action.namespace == Some("kube-node-lease") && action.name == Some(node)
            }
            ("", "pods") => action.name.is_some() && pod_node == Some(node),
            ("", "events") => matches!(action.verb, "create" | "update" | "patch"),
            _ => false,
        };
    }
    false
}

/// The 403 Kubernetes answers with.
pub fn forbidden(user: &User, action: &Action<'_>) -> ApiError {
    let r = action.resource;
    let resource = match action.sub {
        Some(sub) => format!("{}/{sub}", r.plural),
        None => r.plural.to_owned(),
    };
    let scope = match action.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    ApiError::forbidden(format!(
        "{} \"{}\" is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
        r.plural,
        action.name.unwrap_or(""),
        user.name,
        action.verb,
        r.group
    ))
}

/// The group every bootstrap token authenticates in.
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";

fn is_csr(r: &Resource) -> bool {
    r.group == "certificates.k8s.io" && r.plural == "certificatesigningrequests"
}

/// What a bootstrap token may do beyond discovery: create a CSR, and get, list or watch one
/// it created (`csr_owner` is the addressed CSR's `spec.username`; lists and watches must
/// name it with a `metadata.name` field selector).
pub fn bootstrap_allowed(user: &User, action: &Action<'_>, csr_owner: Option<&str>) -> bool {
    if !user.in_group(BOOTSTRAPPERS) || !is_csr(action.resource) || action.sub.is_some() {
        return false;
    }
    match action.verb {
        "create" => true,
        "get" | "list" | "watch" => action.name.is_some() && csr_owner == Some(&user.name),
        _ => false,
    }
}

/// Checks an action, looking up the pod's node for node users.
///
/// # Errors
/// 403 when not allowed.
pub async fn authorize(api: &Api, user: &User, action: &Action<'_>) -> ApiResult<()> {
    if user.in_group(BOOTSTRAPPERS) && !user.in_group("system:masters") {
        let owner = match action.name {
            Some(name) if is_csr(action.resource) && action.verb != "create" => api
                .store
                .get(&action.resource.key(None, name))
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<Value>(&v.value).ok())
                .and_then(|o| {
                    o.pointer("/spec/username")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                }),
            _ => None,
        };
        return if bootstrap_allowed(user, action, owner.as_deref()) {
            Ok(())
        } else {
            Err(forbidden(user, action))
        };
    }
    let pod_node = if user.node_name().is_some()
        && action.resource.plural == "pods"
        && action.resource.group.is_empty()
    {
        match (action.namespace, action.name) {
            (Some(ns), Some(name)) => api
                .store
                .get(&action.resource.key(Some(ns), name))
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<Value>(&v.value).ok())
                .and_then(|o| {
                    o.pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                }),
            _ => None,
        }
    } else {
        None
    };
    if allowed(user, action, pod_node.as_deref()) {
        Ok(())
    } else {
        Err(forbidden(user, action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    fn node(n: &str) -> User {
        User {
            name: format!("system:node:{n}"),
            groups: vec!["system:nodes".into()],
        }
    }

    #[test]
    fn nodes_change_only_what_is_theirs() {
        let nodes = find("", "v1", "nodes").unwrap();
        let pods = find("", "v1", "pods").unwrap();
        let deploys = find("apps", "v1", "deployments").unwrap();
        let n1 = node("n1");
        let act = |verb, resource, namespace, name| Action {
            verb,
            resource,
            sub: None,
            namespace,
            name,
        };
        assert!(allowed(&n1, &act("update", nodes, None, Some("n1")), None));
        assert!(!allowed(&n1, &act("update", nodes, None, Some("n2")), None));
        assert!(allowed(&n1, &act("list", pods, None, None), None));
        assert!(allowed(
            &n1,
            &act("patch", pods, Some("default"), Some("p")),
            Some("n1")
        ));
        assert!(!allowed(
            &n1,
            &act("patch", pods, Some("default"), Some("p")),
            Some("n2")
        ));
        assert!(!allowed(
            &n1,
            &act("create", deploys, Some("default"), None),
            None
        ));
        let admin = User {
            name: "kubernetes-admin".into(),
            groups: vec!["system:masters".into()],
        };
        assert!(allowed(
            &admin,
            &act("delete", nodes, None, Some("n2")),
            None
        ));
        let e = forbidden(&n1, &act("update", nodes, None, Some("n2")));
        assert!(
            e.message
                .contains(r#"User "system:node:n1" cannot update resource "nodes""#),
            "{}",
            e.message
        );
    }

    #[test]
    fn bootstrap_tokens_only_create_and_read_their_own_csrs() {
        let csrs = find("certificates.k8s.io", "v1", "certificatesigningrequests").unwrap();
        let secrets = find("", "v1", "secrets").unwrap();
        let token = User {
            name: "system:bootstrap:abcdef".into(),
            groups: vec![BOOTSTRAPPERS.into(), "system:authenticated".into()],
        };
        let act = |verb, resource, name, sub| Action {
            verb,
            resource,
            sub,
            namespace: None,
            name,
        };
        let me = Some("system:bootstrap:abcdef");
        assert!(bootstrap_allowed(
            &token,
            &act("create", csrs, Some("n1"), None),
            None
        ));
        assert!(bootstrap_allowed(
            &token,
            &act("get", csrs, Some("n1"), None),
            me
        ));
        assert!(bootstrap_allowed(
            &token,
            &act("watch", csrs, Some("n1"), None),
            me
        ));
        assert!(!bootstrap_allowed(
            &token,
            &act("watch", csrs, None, None),
            None
        ));
        assert!(!bootstrap_allowed(
            &token,
            &act("get", csrs, Some("n2"), None),
            Some("system:bootstrap:other")
        ));
        assert!(!bootstrap_allowed(
            &token,
            &act("update", csrs, Some("n1"), Some("approval")),
            me
        ));
        assert!(!bootstrap_allowed(
            &token,
            &act("delete", csrs, Some("n1"), None),
            me
        ));
        assert!(!bootstrap_allowed(
            &token,
            &act("list", secrets, None, None),
            None
        ));
        assert!(!allowed(
            &token,
            &act("get", secrets, Some("s"), None),
            None
        ));
    }

    #[test]
    fn static_token_files_parse() {
        let t = StaticTokens::parse("abc,alice,1,\"dev,ops\"\n# comment\nxyz,bob,2\n").unwrap();
        assert_eq!(t.0["abc"].groups, ["dev", "ops"]);
        assert!(t.0["xyz"].groups.is_empty());
        assert!(StaticTokens::parse("justatoken\n").is_err());
    }
}
