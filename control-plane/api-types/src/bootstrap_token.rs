//! Bootstrap tokens, as Kubernetes (kubeadm) defines them: `<id>.<secret>` (6 and 16
//! characters of `[a-z0-9]`), stored as a Secret `kube-system/bootstrap-token-<id>` of type
//! `bootstrap.kubernetes.io/token`. A joining node authenticates with one (user
//! `system:bootstrap:<id>`, group `system:bootstrappers`) to ask for its credentials.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The namespace bootstrap-token Secrets live in.
pub const NAMESPACE: &str = "kube-system";
/// The Secret type of bootstrap tokens.
pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
/// The prefix of a bootstrap-token Secret's name (followed by the token id).
pub const SECRET_PREFIX: &str = "bootstrap-token-";
/// The group every bootstrap token authenticates in.
pub const GROUP: &str = "system:bootstrappers";

const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The text is not `<6 chars>.<16 chars>` of `[a-z0-9]`.
    #[error("{0:?} is not a bootstrap token (expected [a-z0-9]{{6}}.[a-z0-9]{{16}})")]
    Malformed(String),
    /// The system's random source failed.
    #[error("reading random bytes: {0}")]
    Random(String),
}

/// A bootstrap token.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// The public part, also in the Secret's name.
    pub id: String,
    /// The secret part.
    pub secret: String,
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret part into logs.
        f.debug_struct("BootstrapToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

fn valid_part(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether `id` is a valid token id (6 characters of `[a-z0-9]`).
pub fn valid_id(id: &str) -> bool {
    valid_part(id, 6)
}

impl std::str::FromStr for BootstrapToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        match s.trim().split_once('.') {
            Some((id, secret)) if valid_part(id, 6) && valid_part(secret, 16) => {
                Ok(BootstrapToken {
                    id: id.to_owned(),
                    secret: secret.to_owned(),
                })
            }
            _ => Err(TokenError::Malformed(s.to_owned())),
        }
    }
}

/// How a new token is stored.
#[derive(Clone, Debug, Default)]
pub struct TokenOptions {
    /// When the token stops working (none: never).
    pub expiration: Option<jiff::Timestamp>,
    /// A note for `keelson token list`.
    pub description: Option<String>,
    /// Extra groups the token authenticates in (`auth-extra-groups`).
    pub extra_groups: Vec<String>,
}

impl BootstrapToken {
    /// A new random token.
    ///
    /// # Errors
    /// The system's random source fails.
    pub fn generate() -> Result<Self, TokenError> {
        let mut bytes = [0u8; 22];
        getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
        // Values from 252 (7 × 36) up are skipped, so that every character is equally likely.
        let mut out = String::with_capacity(22);
        let mut pool = bytes.to_vec();
        while out.len() < 22 {
            let Some(b) = pool.pop() else {
                let mut more = [0u8; 16];
                getrandom::fill(&mut more).map_err(|e| TokenError::Random(e.to_string()))?;
                pool.extend_from_slice(&more);
                continue;
            };
            if usize::from(b) < 252 {
                out.push(char::from(ALPHABET[usize::from(b) % 36]));
            }
        }
        let (id, secret) = out.split_at(6);
        Ok(BootstrapToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The Secret's name: `bootstrap-token-<id>`.
    pub fn secret_name(&self) -> String {
        format!("{SECRET_PREFIX}{}", self.id)
    }

    /// The Secret that makes this token valid, usable for authentication and signing.
    pub fn to_secret(&self, opts: &TokenOptions) -> Secret {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
        };
        put("token-id", &self.id);
        put("token-secret", &self.secret);
        put("usage-bootstrap-authentication", "true");
        put("usage-bootstrap-signing", "true");
        if let Some(exp) = opts.expiration {
            put(
                "expiration",
                &exp.round(jiff::Unit::Second).unwrap_or(exp).to_string(),
            );
        }
        if let Some(d) = &opts.description {
            put("description", d);
        }
        if !opts.extra_groups.is_empty() {
            put("auth-extra-groups", &opts.extra_groups.join(","));
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(self.secret_name()),
                namespace: Some(NAMESPACE.to_owned()),
                ..ObjectMeta::default()
            },
            type_: Some(SECRET_TYPE.to_owned()),
            data: Some(data),
            ..Secret::default()
        }
    }
}

/// What a bootstrap-token Secret says, without its secret part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// The token id.
    pub id: String,
    /// When it expires, if ever.
    pub expiration: Option<jiff::Timestamp>,
    /// The `usage-bootstrap-*` usages set to `true` (`authentication`, `signing`).
    pub usages: Vec<String>,
    /// Its description.
    pub description: Option<String>,
    /// Extra groups.
    pub extra_groups: Vec<String>,
}

impl TokenInfo {
    /// Reads a bootstrap-token Secret; `None` if it is not one.
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        if secret.type_.as_deref() != Some(SECRET_TYPE) {
            return None;
        }
        let data = secret.data.as_ref()?;
        let field = |k: &str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let id = field("token-id").filter(|id| valid_id(id))?;
        let usages = data
            .keys()
            .filter_map(|k| k.strip_prefix("usage-bootstrap-"))
            .filter(|u| field(&format!("usage-bootstrap-{u}")).as_deref() == Some("true"))
            .map(str::to_owned)
            .collect();
        Some(TokenInfo {
            id,
            // An unreadable expiration counts as expired: the authenticator refuses it too.
            expiration: field("expiration")
                .map(|e| e.parse().unwrap_or(jiff::Timestamp::UNIX_EPOCH)),
            usages,
            description: field("description"),
            extra_groups: field("auth-extra-groups")
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Whether the token has expired at `now`.
    pub fn expired(&self, now: jiff::Timestamp) -> bool {
        self.expiration.is_some_and(|e| e <= now)
    }
}

/// A kubeconfig that authenticates to `server` with `token`, trusting the CA `ca_pem`: what a
/// joining node starts from (`--bootstrap-kubeconfig`).
pub fn bootstrap_kubeconfig(server: &str, ca_pem: &str, token: &BootstrapToken) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: keelson\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\ncontexts:\n- name: tls-bootstrap@keelson\n  context:\n    \
         cluster: keelson\n    user: tls-bootstrap\ncurrent-context: tls-bootstrap@keelson\nusers:\n\
         - name: tls-bootstrap\n  user:\n    token: {token}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = BootstrapToken::generate().expect("random");
        let b = BootstrapToken::generate().expect("random");
        assert_ne!(a, b);
        let parsed: BootstrapToken = a.to_string().parse().expect("parses");
        assert_eq!(parsed, a);
        assert!(
            !format!("{a:?}").contains(&a.secret),
            "Debug leaks the secret"
        );
        for bad in [
            "abcdef",
            "abcdef.0123456789abcdeF",
            "abcde.0123456789abcdef",
            "",
        ] {
            assert!(bad.parse::<BootstrapToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_round_trip_without_the_secret() {
        let t: BootstrapToken = "abcdef.0123456789abcdef".parse().expect("valid");
        let exp: jiff::Timestamp = "2030-01-02T03:04:05Z".parse().expect("time");
        let s = t.to_secret(&TokenOptions {
            expiration: Some(exp),
            description: Some("rack 1".into()),
            extra_groups: vec![],
        });
        assert_eq!(s.metadata.name.as_deref(), Some("bootstrap-token-abcdef"));
        let data = s.data.as_ref().expect("data");
        assert_eq!(data["token-secret"].0, b"0123456789abcdef");
        assert_eq!(data["expiration"].0, b"2030-01-02T03:04:05Z");
        let info = TokenInfo::from_secret(&s).expect("a token secret");
        assert_eq!(info.id, "abcdef");
        assert_eq!(info.usages, ["authentication", "signing"]);
        assert_eq!(info.description.as_deref(), Some("rack 1"));
        assert!(!info.expired("2029-12-31T00:00:00Z".parse().expect("time")));
        assert!(info.expired("2030-01-02T03:04:05Z".parse().expect("time")));
    }

    #[test]
    fn kubeconfig_carries_server_ca_and_token() {
        let t: BootstrapToken = "abcdef.0123456789abcdef".parse().expect("valid");
        let k = bootstrap_kubeconfig("https://10.0.0.1:6443", "PEM", &t);
        assert!(k.contains("server: https://10.0.0.1:6443"));
        assert!(k.contains("certificate-authority-data: UEVN"));
        assert!(k.contains("token: abcdef.0123456789abcdef"));
    }
}
