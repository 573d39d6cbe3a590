//! The resources this API server serves: names, scope, subresources and typed validation.

use serde_json::Value;

/// How a resource's names are validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// An RFC 1123 subdomain: lowercase alphanumerics, `-` and `.`, at most 253 characters.
    Subdomain,
    /// An RFC 1123 label: lowercase alphanumerics and `-`, at most 63 characters.
    Label,
}

/// Decodes a JSON object into the resource's Kubernetes type and encodes it back: the
/// round trip shows type errors and (by comparison) fields the type does not declare.
pub type RoundTrip = fn(&Value) -> Result<Value, serde_json::Error>;

/// Decodes a JSON object into the resource's Kubernetes type and says whether the decoder
/// skipped any member the type does not declare: the cheap check every create and update
/// makes, before the [`RoundTrip`] that names the skipped fields.
pub type Skips = fn(&Value) -> Result<bool, serde_json::Error>;

/// Adds the resource's JSON schema (and those it refers to) to a generator's definitions.
pub type RegisterSchema = fn(&mut schemars::SchemaGenerator);

/// One served resource.
#[derive(Debug)]
pub struct Resource {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// Version, e.g. `v1`.
    pub version: &'static str,
    /// Kind, e.g. `Pod`.
    pub kind: &'static str,
    /// Plural resource name used in paths, e.g. `pods`.
    pub plural: &'static str,
    /// Singular name, e.g. `pod`.
    pub singular: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Short names for kubectl, e.g. `po`.
    pub short_names: &'static [&'static str],
    /// Category names for kubectl (`all`).
    pub categories: &'static [&'static str],
    /// Whether the resource has a `status` subresource (status is then ignored on the main
    /// resource, and spec changes bump `metadata.generation`).
    pub has_status: bool,
    /// Whether the resource has a `scale` subresource.
    pub has_scale: bool,
    /// Name validation.
    pub names: NameRule,
    /// Typed round trip.
    pub round_trip: RoundTrip,
    /// Typed decoding that reports skipped members.
    pub skips: Skips,
    /// Schema registration, for the OpenAPI documents.
    pub register_schema: RegisterSchema,
    /// The schema's definition name, e.g. `io.k8s.api.core.v1.Pod`.
    pub schema_name: fn() -> std::borrow::Cow<'static, str>,
}

impl Resource {
    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The storage key prefix of all objects of this resource (in `namespace`, if given).
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        match namespace {
            Some(ns) => format!("/registry/{group}/{}/{ns}/", self.plural),
            None => format!("/registry/{group}/{}/", self.plural),
        }
    }

    /// The storage key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.key_prefix(namespace))
    }

    /// `kind` + `List`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The `group` (or `""`) and `plural` used in Status details, e.g. `pods` or
    /// `deployments.apps`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

fn round_trip<T>(v: &Value) -> Result<Value, serde_json::Error>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    // Deserializing from a borrowed `Value` saves copying the whole tree first.
    let typed = T::deserialize(v)?;
    serde_json::to_value(typed)
}

fn skips<T>(v: &Value) -> Result<bool, serde_json::Error>
where
    T: serde::de::DeserializeOwned,
{
    // The generated decoders hand members they do not know to `IgnoredAny`, which
    // `serde_ignored` sees: one decode, without encoding the typed object back and comparing.
    // Top-level `apiVersion` and `kind` were checked against the URL already; types without
    // fields for them (the custom resources) skip them.
    let mut skipped = false;
    let _: T = serde_ignored::deserialize(v, |path| {
        let type_field = matches!(&path, serde_ignored::Path::Map { parent: serde_ignored::Path::Root, key }
            if key == "apiVersion" || key == "kind");
        skipped |= !type_field;
    })?;
    Ok(skipped)
}

macro_rules! resource {
    ($group:literal, $version:literal, $ty:ty, $kind:literal, $plural:literal, $singular:literal,
     namespaced: $ns:literal, short: [$($short:literal),*], status: $status:literal,
     scale: $scale:literal, names: $names:ident, categories: [$($cat:literal),*]) => {
        Resource {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $ns,
            short_names: &[$($short),*],
            categories: &[$($cat),*],
            has_status: $status,
            has_scale: $scale,
            names: NameRule::$names,
            round_trip: round_trip::<$ty>,
            skips: skips::<$ty>,
            register_schema: |g| {
                g.subschema_for::<$ty>();
            },
            schema_name: <$ty as schemars::JsonSchema>::schema_name,
        }
    };
}

use k8s_openapi::api::{apps, batch, certificates, coordination, core, discovery};

/// Every served resource.
pub static RESOURCES: &[Resource] = &[
    resource!("", "v1", core::v1::Namespace, "Namespace", "namespaces", "namespace",
        namespaced: false, short: ["ns"], status: true, scale: false, names: Label,
        categories: []),
    resource!("", "v1", core::v1::Node, "Node", "nodes", "node",
        namespaced: false, short: ["no"], status: true, scale: false, names: Subdomain,
        categories: []),
    resource!("", "v1", core::v1::Pod, "Pod", "pods", "pod",
        namespaced: true, short: ["po"], status: true, scale: false, names: Subdomain,
        categories: ["all"]),
    resource!("", "v1", core::v1::Service, "Service", "services", "service",
        namespaced: true, short: ["svc"], status: true, scale: false, names: Label,
        categories: ["all"]),
    resource!("", "v1", core::v1::Endpoints, "Endpoints", "endpoints", "endpoints",
        namespaced: true, short: ["ep"], status: false, scale: false, names: Subdomain,
        categories: []),
    resource!("", "v1", core::v1::ConfigMap, "ConfigMap", "configmaps", "configmap",
        namespaced: true, short: ["cm"], status: false, scale: false, names: Subdomain,
        categories: []),
    resource!("", "v1", core::v1::Secret, "Secret", "secrets", "secret",
        namespaced: true, short: [], status: false, scale: false, names: Subdomain,
        categories: []),
    resource!("", "v1", core::v1::ServiceAccount, "ServiceAccount", "serviceaccounts",
        "serviceaccount", namespaced: true, short: ["sa"], status: false, scale: false,
        names: Subdomain, categories: []),
    resource!("", "v1", core::v1::Event, "Event", "events", "event",
        namespaced: true, short: ["ev"], status: false, scale: false, names: Subdomain,
        categories: []),
    resource!("apps", "v1", apps::v1::Deployment, "Deployment", "deployments", "deployment",
        namespaced: true, short: ["deploy"], status: true, scale: true, names: Subdomain,
        categories: ["all"]),
    resource!("apps", "v1", apps::v1::ReplicaSet, "ReplicaSet", "replicasets", "replicaset",
        namespaced: true, short: ["rs"], status: true, scale: true, names: Subdomain,
        categories: ["all"]),
    resource!("apps", "v1", apps::v1::DaemonSet, "DaemonSet", "daemonsets", "daemonset",
        namespaced: true, short: ["ds"], status: true, scale: false, names: Subdomain,
        categories: ["all"]),
    resource!("apps", "v1", apps::v1::ControllerRevision, "ControllerRevision",
        "controllerrevisions", "controllerrevision", namespaced: true, short: [], status: false,
        scale: false, names: Subdomain, categories: []),
    resource!("batch", "v1", batch::v1::Job, "Job", "jobs", "job",
        namespaced: true, short: [], status: true, scale: false, names: Subdomain,
        categories: ["all"]),
    resource!("discovery.k8s.io", "v1", discovery::v1::EndpointSlice, "EndpointSlice",
        "endpointslices", "endpointslice", namespaced: true, short: [], status: false,
        scale: false, names: Subdomain, categories: []),
    resource!("coordination.k8s.io", "v1", coordination::v1::Lease, "Lease", "leases",
        "lease", namespaced: true, short: [], status: false, scale: false, names: Subdomain,
        categories: []),
    resource!("certificates.k8s.io", "v1", certificates::v1::CertificateSigningRequest,
        "CertificateSigningRequest", "certificatesigningrequests", "certificatesigningrequest",
        namespaced: false, short: ["csr"], status: true, scale: false, names: Subdomain,
        categories: []),
    resource!("provisioning.keelson.dev", "v1", keelson_api_types::Machine, "Machine",
        "machines", "machine", namespaced: false, short: ["mach"], status: true, scale: false,
        names: Subdomain, categories: []),
];

/// The resource served at `group`/`version`/`plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The distinct non-core groups with their versions, in registry order.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_consistent() {
        for r in RESOURCES {
            assert_eq!(
                RESOURCES
                    .iter()
                    .filter(|o| o.group == r.group && o.plural == r.plural)
                    .count(),
                1,
                "{} listed twice",
                r.plural
            );
            let minimal = serde_json::json!({
                "apiVersion": r.api_version(), "kind": r.kind, "metadata": {"name": "x"}
            });
            (r.round_trip)(&minimal).unwrap_or_else(|e| panic!("{}: {e}", r.kind));
        }
        assert_eq!(
            find("apps", "v1", "deployments").map(|r| r.kind),
            Some("Deployment")
        );
        assert_eq!(
            RESOURCES[2].key(Some("default"), "a"),
            "/registry/core/pods/default/a"
        );
    }
}
