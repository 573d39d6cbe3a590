//! PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and strategic merge patch.
//!
//! Strategic merge patch is written here because no maintained Rust crate implements it. It
//! covers what `kubectl apply/patch/edit` send: lists of objects merged by their merge key
//! (`name`, `containerPort`, `port`, `mountPath`, `ip`, `type`), and the `$patch`
//! (`replace`/`delete`/`merge`), `$retainKeys`, `$deleteFromPrimitiveList/…` and
//! `$setElementOrder/…` directives. Unlike Kubernetes it picks merge keys by field name and
//! content rather than from the OpenAPI schema.

use serde_json::{Map, Value};

use crate::status::{ApiError, ApiResult};

/// The kinds of PATCH the server accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`
    Json,
    /// `application/merge-patch+json`
    Merge,
    /// `application/strategic-merge-patch+json`
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply)
    Apply,
}

impl PatchType {
    /// From the request's `Content-Type`.
    ///
    /// # Errors
    /// 415 for anything else.
    pub fn from_content_type(ct: Option<&str>) -> ApiResult<Self> {
        let ct = ct.unwrap_or("");
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchType::Apply),
            _ => Err(ApiError::unsupported_media_type(ct)),
        }
    }
}

/// Applies a JSON or merge or strategic patch to `target`.
///
/// # Errors
/// 400 for a malformed patch, or a JSON patch whose operations do not apply.
pub fn apply(kind: PatchType, target: &mut Value, body: &[u8]) -> ApiResult<()> {
    let bad = |e: &dyn std::fmt::Display| ApiError::bad_request(format!("invalid patch: {e}"));
    match kind {
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_slice(body).map_err(|e| bad(&e))?;
            json_patch::patch(target, &p).map_err(|e| {
                ApiError::bad_request(format!("the JSON patch could not be applied: {e}"))
            })
        }
        PatchType::Merge => {
            let p: Value = serde_json::from_slice(body).map_err(|e| bad(&e))?;
            json_patch::merge(target, &p);
            Ok(())
        }
        PatchType::Strategic => {
            let p: Value = serde_json::from_slice(body).map_err(|e| bad(&e))?;
            if !p.is_object() {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            }
            strategic_merge(target, &p);
            Ok(())
        }
        PatchType::Apply => Err(ApiError::unsupported_media_type(
            "application/apply-patch+yaml (server-side apply is not implemented yet)",
        )),
    }
}

/// Candidate merge keys of lists of objects, in order of preference.
const MERGE_KEYS: [&str; 6] = ["name", "containerPort", "port", "mountPath", "ip", "type"];

pub(crate) fn merge_key(items: &[Value]) -> Option<&'static str> {
    MERGE_KEYS.into_iter().find(|k| {
        !items.is_empty()
            && items
                .iter()
                .all(|i| i.as_object().is_some_and(|o| o.contains_key(*k)))
    })
}

/// Merges `patch` into `target` with strategic-merge semantics.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replacement = p.clone();
        replacement.remove("$patch");
        *target = Value::Object(replacement);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()) || p.contains_key(k));
    }
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(gone)) = (t.get_mut(field), v) {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(inner)
                if inner.get("$patch").and_then(Value::as_str) == Some("delete") =>
            {
                t.remove(k);
            }
            Value::Object(_) => strategic_merge(t.entry(k.clone()).or_insert(Value::Null), v),
            Value::Array(items) => {
                let current = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                merge_list(current, items);
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

fn merge_list(current: &mut Value, patch_items: &[Value]) {
    let replace = patch_items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let Some(key) = merge_key(
        &patch_items
            .iter()
            .filter(|i| i.get("$patch").is_none() || i.as_object().is_some_and(|o| o.len() > 1))
            .cloned()
            .collect::<Vec<_>>(),
    )
    .filter(|_| !replace) else {
        // Primitive lists and lists without a merge key are replaced, as in Kubernetes.
        *current = Value::Array(
            patch_items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        );
        return;
    };
    if !current.is_array() {
        *current = Value::Array(Vec::new());
    }
    let Value::Array(list) = current else { return };
    for item in patch_items {
        let id = item.get(key);
        let pos = list.iter().position(|x| x.get(key) == id);
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = pos {
                list.remove(i);
            }
            continue;
        }
        match pos {
            Some(i) => strategic_merge(&mut list[i], item),
            None => list.push(item.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ]}});
        strategic_merge(
            &mut pod,
            &json!({
                "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                "spec": {"containers": [
                    {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]},
                    {"name": "b", "$patch": "delete"},
                    {"name": "c", "image": "c:1"}
                ]}
            }),
        );
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "c", "image": "c:1"}
            ]}})
        );
    }

    #[test]
    fn null_removes_and_primitive_lists_replace() {
        let mut o = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"]}});
        strategic_merge(
            &mut o,
            &json!({"metadata": {"labels": {"a": null, "c": "3"},
            "$deleteFromPrimitiveList/finalizers": ["x"]}}),
        );
        assert_eq!(
            o,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}, "finalizers": ["y"]}})
        );
        strategic_merge(&mut o, &json!({"metadata": {"finalizers": ["z"]}}));
        assert_eq!(o["metadata"]["finalizers"], json!(["z"]));
    }

    #[test]
    fn patch_types_by_content_type() {
        assert_eq!(
            PatchType::from_content_type(Some("application/merge-patch+json; charset=utf-8")),
            Ok(PatchType::Merge)
        );
        assert!(PatchType::from_content_type(Some("text/plain")).is_err());
        let mut o = json!({"spec": {"replicas": 1}});
        apply(
            PatchType::Json,
            &mut o,
            br#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
        )
        .unwrap();
        assert_eq!(o["spec"]["replicas"], 3);
        assert!(
            apply(
                PatchType::Json,
                &mut o,
                br#"[{"op":"remove","path":"/nope"}]"#
            )
            .is_err()
        );
        assert!(apply(PatchType::Merge, &mut o, b"{not json").is_err());
    }
}
