//! The OpenAPI v2 (Swagger 2.0) document at `/openapi/v2`: every served group version in one
//! document, derived from the v3 documents. kubectl up to 1.29 reads it (as gnostic
//! protobuf) to decide whether the server validates fields itself (`fieldValidation` on the
//! PATCH operation of the kind) and for `kubectl explain`.

use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use super::{documents, gnostic};
use crate::discovery::{KUBE_MAJOR, KUBE_MINOR};

/// The MIME type client-go asks for.
pub const PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";

/// The document, built once: JSON, and its protobuf encoding.
pub fn document() -> &'static (Value, Vec<u8>) {
    static DOC: OnceLock<(Value, Vec<u8>)> = OnceLock::new();
    DOC.get_or_init(|| {
        let doc = build();
        let bytes = gnostic::encode(&doc);
        (doc, bytes)
    })
}

const V3_REFS: &str = "#/components/schemas/";
const V2_REFS: &str = "#/definitions/";

/// A v3 schema as Swagger 2.0 writes it: references into `definitions`, a lone `allOf`
/// reference (v3's way to describe a referenced field) as a plain reference, and
/// int-or-string values as Kubernetes' own v2 document types them.
fn schema(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => {
                        let name = r.strip_prefix(V3_REFS).unwrap_or(r);
                        out.insert(k.clone(), json!(format!("{V2_REFS}{name}")));
                    }
                    ("allOf", Value::Array(all))
                        if all.len() == 1 && all[0].get("$ref").is_some() =>
                    {
                        if let Value::Object(r) = schema(&all[0]) {
                            out.extend(r);
                        }
                    }
                    ("nullable", _) => {}
                    // Property names are data, not schema keywords: convert their values only.
                    ("properties", Value::Object(props)) => {
                        let props = props.iter().map(|(n, s)| (n.clone(), schema(s))).collect();
                        out.insert(k.clone(), Value::Object(props));
                    }
                    _ => {
                        out.insert(k.clone(), schema(v));
                    }
                }
            }
            if out.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
                && !out.contains_key("type")
            {
                out.insert("type".into(), json!("string"));
                out.insert("format".into(), json!("int-or-string"));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(schema).collect()),
        other => other.clone(),
    }
}

/// A v3 parameter (`schema: {type}`) as a v2 one (`type` inline).
fn parameter(p: &Value) -> Value {
    let mut out = p.clone();
    if let Some(obj) = out.as_object_mut()
        && let Some(Value::Object(s)) = obj.remove("schema")
    {
        for (k, v) in s {
            obj.insert(k, v);
        }
    }
    out
}

fn path_parameter(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "type": "string",
           "uniqueItems": true, "description": description})
}

fn operation(method: &str, op: &Value) -> Value {
    let mut params: Vec<Value> = op
        .get("parameters")
        .and_then(Value::as_array)
        .map(|ps| ps.iter().map(parameter).collect())
        .unwrap_or_default();
    let responses: Map<String, Value> = op
        .get("responses")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(code, r)| {
            let body = r.pointer("/content/application~1json/schema").map(schema);
            let mut out =
                json!({"description": r.get("description").cloned().unwrap_or(json!("OK"))});
            if let Some(b) = body.clone() {
                out["schema"] = b;
            }
            (code.clone(), out)
        })
        .collect();
    if matches!(method, "put" | "post" | "patch") {
        let body = if method == "patch" {
            json!({"type": "object"})
        } else {
            responses
                .get("200")
                .and_then(|r| r.get("schema"))
                .cloned()
                .unwrap_or(json!({"type": "object"}))
        };
        params.insert(
            0,
            json!({"name": "body", "in": "body", "required": true, "schema": body}),
        );
    }
    let consumes = if method == "patch" {
        json!([
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml"
        ])
    } else {
        json!(["*/*"])
    };
    let mut out = json!({
        "description": op.get("description").cloned().unwrap_or(json!("")),
        "operationId": op.get("operationId").cloned().unwrap_or(json!("")),
        "consumes": consumes,
        "produces": ["application/json", "application/yaml"],
        "schemes": ["https"],
        "parameters": params,
        "responses": responses,
    });
    if let (Some(out), Some(op)) = (out.as_object_mut(), op.as_object()) {
        for (k, v) in op.iter().filter(|(k, _)| k.starts_with("x-")) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

fn path_item(path: &str, item: &Value) -> Value {
    let mut out = Map::new();
    if let Some(ops) = item.as_object() {
        for (method, op) in ops {
            out.insert(method.clone(), operation(method, op));
        }
    }
    let mut params = Vec::new();
    if path.contains("{name}") {
        params.push(path_parameter("name", "name of the object"));
    }
    if path.contains("{namespace}") {
        params.push(path_parameter(
            "namespace",
            "object name and auth scope, such as for teams and projects",
        ));
    }
    if !params.is_empty() {
        out.insert("parameters".into(), Value::Array(params));
    }
    Value::Object(out)
}

fn build() -> Value {
    let mut paths = Map::new();
    let mut definitions = Map::new();
    for (_, doc) in documents().values() {
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            paths.insert(path.clone(), path_item(path, item));
        }
        for (name, s) in doc["components"]["schemas"]
            .as_object()
            .into_iter()
            .flatten()
        {
            definitions.entry(name.clone()).or_insert_with(|| schema(s));
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0")},
        "paths": paths,
        "definitions": definitions,
    })
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Every reference of a value, for checking that all resolve.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn references_resolve_and_no_v3_forms_remain() {
        let (doc, _) = document();
        let mut all = Vec::new();
        refs(doc, &mut all);
        assert!(all.len() > 100);
        for r in all {
            let name = r
                .strip_prefix(V2_REFS)
                .unwrap_or_else(|| panic!("{r} is not a v2 reference"));
            assert!(
                doc["definitions"].get(name).is_some(),
                "{r} does not resolve"
            );
        }
        let text = doc.to_string();
        assert!(!text.contains("\"allOf\":[{\"$ref\""));
        assert!(!text.contains("\"nullable\""));
        let selector =
            &doc["definitions"]["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]["selector"];
        assert_eq!(
            selector["$ref"],
            "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
        );
        assert!(selector["description"].is_string());
        let ios = &doc["definitions"]["io.k8s.apimachinery.pkg.util.intstr.IntOrString"];
        assert_eq!(ios["format"], "int-or-string");
    }

    #[test]
    fn patch_of_each_kind_declares_field_validation_in_protobuf() {
        let (_, bytes) = document();
        let doc = gnostic::Document::decode(bytes.as_slice()).unwrap();
        let paths = doc.paths.unwrap().path;
        let deploy = paths
            .iter()
            .find(|p| p.name == "/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
            .and_then(|p| p.value.clone())
            .unwrap();
        let patch = deploy.patch.unwrap();
        let gvk = patch
            .vendor_extension
            .iter()
            .find(|e| e.name == "x-kubernetes-group-version-kind")
            .and_then(|e| e.value.clone())
            .unwrap();
        let gvk: Value = serde_norway::from_str(&gvk.yaml).unwrap();
        assert_eq!(
            gvk,
            json!({"group": "apps", "version": "v1", "kind": "Deployment"})
        );
        let names: Vec<String> = patch
            .parameters
            .iter()
            .filter_map(|p| {
                p.parameter
                    .clone()?
                    .non_body_parameter?
                    .query_parameter_sub_schema
            })
            .map(|q| q.name)
            .collect();
        assert!(names.iter().any(|n| n == "fieldValidation"), "{names:?}");
        assert_eq!(deploy.parameters.len(), 2);
        let defs = doc.definitions.unwrap().additional_properties;
        let pod = defs
            .iter()
            .find(|d| d.name == "io.k8s.api.core.v1.Pod")
            .and_then(|d| d.value.clone())
            .unwrap();
        assert!(
            pod.vendor_extension
                .iter()
                .any(|e| e.name == "x-kubernetes-group-version-kind")
        );
    }
}
