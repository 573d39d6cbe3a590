//! Discovery documents (`/api`, `/apis`, group/version resource lists) and `/version`.
//!
//! Served in the legacy (non-aggregated) form with `Content-Type: application/json`; clients
//! that ask for aggregated discovery fall back to it, as they do with older servers.

use serde_json::{Value, json};

use crate::resources::{self, RESOURCES, Resource};

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The Kubernetes version whose API this server follows.
pub const KUBE_MAJOR: &str = "1";
/// The Kubernetes minor version whose API this server follows.
pub const KUBE_MINOR: &str = "33";

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0-keelson.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "n/a (rust)",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH {
            "x86_64" => "amd64", "aarch64" => "arm64", other => other,
        }),
    })
}

/// `/api`.
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn group_json(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv], "preferredVersion": gv})
}

/// The group of `SelfSubjectAccessReview`, served outside the resource registry (it is
/// create-only and never stored).
const AUTHORIZATION: (&str, &str) = ("authorization.k8s.io", "v1");

fn all_groups() -> Vec<(&'static str, &'static str)> {
    let mut groups = resources::groups();
    groups.push(AUTHORIZATION);
    groups
}

/// `/apis`.
pub fn groups() -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": all_groups().into_iter().map(|(g, v)| group_json(g, v)).collect::<Vec<_>>(),
    })
}

/// `/apis/<group>`, if served.
pub fn group(name: &str) -> Option<Value> {
    all_groups()
        .into_iter()
        .find(|(g, _)| *g == name)
        .map(|(g, v)| {
            let mut doc = group_json(g, v);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            doc
        })
}

fn resource_entries(r: &Resource) -> Vec<Value> {
    let mut out = vec![json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": VERBS,
        "shortNames": r.short_names,
        "categories": r.categories,
    })];
    let sub_with =
        |name: &str, kind: &str, group: Option<&str>, version: Option<&str>, verbs: &[&str]| {
            let mut e = json!({
                "name": format!("{}/{name}", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if let (Some(g), Some(v)) = (group, version) {
                e["group"] = json!(g);
                e["version"] = json!(v);
            }
            e
        };
    let sub = |name: &str, kind: &str, group: Option<&str>, version: Option<&str>| {
        sub_with(name, kind, group, version, &["get", "patch", "update"])
    };
    if r.group.is_empty() && r.kind == "Pod" {
        out.push(sub_with("binding", "Binding", None, None, &["create"]));
        out.push(sub_with(
            "eviction",
            "Eviction",
            Some("policy"),
            Some("v1"),
            &["create"],
        ));
        out.push(sub_with("log", "Pod", None, None, &["get"]));
        out.push(sub_with(
            "exec",
            "PodExecOptions",
            None,
            None,
            &["create", "get"],
        ));
        out.push(sub_with(
            "attach",
            "PodAttachOptions",
            None,
            None,
            &["create", "get"],
        ));
    }
    if r.group == "certificates.k8s.io" && r.kind == "CertificateSigningRequest" {
        out.push(sub("approval", r.kind, None, None));
    }
    if r.has_status {
        out.push(sub("status", r.kind, None, None));
    }
    if r.has_scale {
        out.push(sub("scale", "Scale", Some("autoscaling"), Some("v1")));
    }
    out
}

/// `/api/v1` or `/apis/<group>/<version>`, if served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    if (group, version) == AUTHORIZATION {
        return Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": format!("{group}/{version}"),
            "resources": [{"name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
                "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"]}],
        }));
    }
    let served: Vec<&Resource> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": served.into_iter().flat_map(resource_entries).collect::<Vec<_>>(),
    }))
}
