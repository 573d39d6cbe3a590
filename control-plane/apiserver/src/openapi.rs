//! OpenAPI v3 documents: `/openapi/v3` (the index) and one document per group version, with
//! the schemas of the served types (from `k8s-openapi`) and the paths of the served resources;
//! [`v2`] derives the single Swagger 2.0 document older clients read from them.
//!
//! kubectl reads them to validate manifests — seeing `fieldValidation` on PATCH, it leaves
//! validation to the server — and `kubectl explain` reads the schemas.

mod gnostic;
pub mod v2;

use std::{
    collections::BTreeMap,
    hash::{Hash as _, Hasher as _},
    sync::OnceLock,
};

use serde_json::{Map, Value, json};

use crate::{
    discovery::{KUBE_MAJOR, KUBE_MINOR},
    resources::{RESOURCES, Resource},
};

/// The documents, built once: group-version path (`api/v1`, `apis/apps/v1`) → (hash, doc).
fn documents() -> &'static BTreeMap<String, (String, Value)> {
    static DOCS: OnceLock<BTreeMap<String, (String, Value)>> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut by_gv: BTreeMap<String, Vec<&'static Resource>> = BTreeMap::new();
        for r in RESOURCES {
            let gv = if r.group.is_empty() {
                format!("api/{}", r.version)
            } else {
                format!("apis/{}/{}", r.group, r.version)
            };
            by_gv.entry(gv).or_default().push(r);
        }
        by_gv
            .into_iter()
            .map(|(gv, resources)| {
                let doc = group_version_doc(&resources);
                let mut h = std::collections::hash_map::DefaultHasher::new();
                doc.to_string().hash(&mut h);
                (gv, (format!("{:016X}", h.finish()), doc))
            })
            .collect()
    })
}

/// `/openapi/v3`.
pub fn index() -> Value {
    let paths: Map<String, Value> = documents()
        .iter()
        .map(|(gv, (hash, _))| {
            (
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash}")}),
            )
        })
        .collect();
    json!({"paths": paths})
}

/// `/openapi/v3/<gv>`, if served.
pub fn document(gv: &str) -> Option<&'static Value> {
    documents().get(gv).map(|(_, doc)| doc)
}

fn gvk(r: &Resource) -> Value {
    json!({"group": r.group, "version": r.version, "kind": r.kind})
}

fn query_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string"}, "uniqueItems": true})
}

fn operation(r: &Resource, action: &str, write: bool) -> Value {
    let schema_ref = json!({"$ref": format!("#/components/schemas/{}", (r.schema_name)())});
    let mut params = vec![query_param(
        "pretty",
        "If 'true', then the output is pretty printed.",
    )];
    if write {
        params.push(query_param("dryRun", "When present, indicates that modifications should not be persisted. Valid values: All."));
        params.push(query_param(
            "fieldManager",
            "A name associated with the actor making these changes.",
        ));
        params.push(query_param(
            "fieldValidation",
            "How to treat unknown or duplicate fields: Ignore, Warn (default) or Strict.",
        ));
    }
    json!({
        "description": format!("{action} {}", r.kind),
        "operationId": format!("{action}{}", r.kind),
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": schema_ref}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(r),
    })
}

fn paths_of(r: &Resource) -> Vec<(String, Value)> {
    let base = if r.group.is_empty() {
        format!("/api/{}", r.version)
    } else {
        format!("/apis/{}/{}", r.group, r.version)
    };
    let scope = if r.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", r.plural)
    } else {
        format!("{base}/{}", r.plural)
    };
    vec![
        (
            scope.clone(),
            json!({"get": operation(r, "list", false), "post": operation(r, "post", true),
                   "delete": operation(r, "deletecollection", false)}),
        ),
        (
            format!("{scope}/{{name}}"),
            json!({"get": operation(r, "get", false), "put": operation(r, "put", true),
                   "patch": operation(r, "patch", true), "delete": operation(r, "delete", false)}),
        ),
    ]
}

fn group_version_doc(resources: &[&'static Resource]) -> Value {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    for r in resources {
        (r.register_schema)(&mut generator);
    }
    let mut schemas = generator.take_definitions(true);
    for r in resources {
        if let Some(Value::Object(s)) = schemas.get_mut((r.schema_name)().as_ref()) {
            s.insert("x-kubernetes-group-version-kind".into(), json!([gvk(r)]));
        }
    }
    annotate_patch_strategies(&mut schemas);
    let paths: Map<String, Value> = resources.iter().flat_map(|r| paths_of(r)).collect();
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// How Kubernetes merges the lists of the served types (their Go `patchStrategy` and
/// `patchMergeKey` tags, and `listType`/`listMapKeys`), which the generated schemas do not
/// carry: (definition, property, strategy, list map keys). Clients compute strategic merge
/// patches from these; without them a list counts as atomic and `kubectl apply` would resend
/// whole lists that it otherwise merges item by item.
const PATCH_STRATEGIES: &[(&str, &str, &str, &[&str])] = &[
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
        "merge",
        &[],
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
        "merge",
        &["uid"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "containers",
        "merge",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "initContainers",
        "merge",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "ephemeralContainers",
        "merge",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "volumes",
        "merge,retainKeys",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "imagePullSecrets",
        "merge",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "hostAliases",
        "merge",
        &["ip"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "schedulingGates",
        "merge",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "resourceClaims",
        "merge,retainKeys",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "topologySpreadConstraints",
        "merge",
        &["topologyKey", "whenUnsatisfiable"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "ports",
        "merge",
        &["containerPort", "protocol"],
    ),
    ("io.k8s.api.core.v1.Container", "env", "merge", &["name"]),
    (
        "io.k8s.api.core.v1.Container",
        "volumeMounts",
        "merge",
        &["mountPath"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeDevices",
        "merge",
        &["devicePath"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "env",
        "merge",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeMounts",
        "merge",
        &["mountPath"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeDevices",
        "merge",
        &["devicePath"],
    ),
    (
        "io.k8s.api.core.v1.PodStatus",
        "conditions",
        "merge",
        &["type"],
    ),
    ("io.k8s.api.core.v1.PodStatus", "podIPs", "merge", &["ip"]),
    ("io.k8s.api.core.v1.PodStatus", "hostIPs", "merge", &["ip"]),
    ("io.k8s.api.core.v1.NodeSpec", "podCIDRs", "merge", &[]),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "conditions",
        "merge",
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "addresses",
        "merge",
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.ServiceSpec",
        "ports",
        "merge",
        &["port", "protocol"],
    ),
    (
        "io.k8s.api.core.v1.ServiceStatus",
        "conditions",
        "merge",
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NamespaceStatus",
        "conditions",
        "merge",
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.DeploymentSpec",
        "strategy",
        "retainKeys",
        &[],
    ),
    (
        "io.k8s.api.apps.v1.DeploymentStatus",
        "conditions",
        "merge",
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.ReplicaSetStatus",
        "conditions",
        "merge",
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.DaemonSetStatus",
        "conditions",
        "merge",
        &["type"],
    ),
    (
        "io.k8s.api.batch.v1.JobStatus",
        "conditions",
        "merge",
        &["type"],
    ),
];

fn annotate_patch_strategies(schemas: &mut Map<String, Value>) {
    for (definition, property, strategy, keys) in PATCH_STRATEGIES {
        let Some(Value::Object(p)) = schemas
            .get_mut(*definition)
            .and_then(|d| d.pointer_mut(&format!("/properties/{property}")))
        else {
            continue;
        };
        p.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
        if let Some(key) = keys.first() {
            p.insert("x-kubernetes-patch-merge-key".into(), json!(key));
            p.insert("x-kubernetes-list-type".into(), json!("map"));
            p.insert("x-kubernetes-list-map-keys".into(), json!(keys));
        } else if strategy.contains("merge") {
            p.insert("x-kubernetes-list-type".into(), json!("set"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_declare_field_validation_and_schemas() {
        let index = index();
        let url = index["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("/openapi/v3/apis/apps/v1?hash="));
        let doc = document("apis/apps/v1").unwrap();
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        let schema = &doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            schema["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        assert!(doc["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"].is_object());
        let core = document("api/v1").unwrap();
        let containers = &core["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"]["properties"]
            ["containers"];
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        assert_eq!(containers["x-kubernetes-patch-strategy"], "merge");
    }

    #[test]
    fn every_patch_strategy_names_a_served_property() {
        for (definition, property, strategy, _) in PATCH_STRATEGIES {
            let annotated = documents().values().any(|(_, doc)| {
                doc["components"]["schemas"][*definition]["properties"][*property]
                    ["x-kubernetes-patch-strategy"]
                    == *strategy
            });
            assert!(
                annotated,
                "{definition}.{property} is not in any served schema"
            );
        }
    }
}
