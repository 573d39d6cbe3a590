//! Stored objects handled as JSON text instead of `serde_json::Value` trees, for the hot
//! paths that only add or replace a few fields: rendering an object for a client (watch
//! events, lists) and a pod's binding.
//!
//! Building and dropping a `Value` tree for every object a watcher or list sends dominated
//! the server's CPU time (allocation, map inserts, frees). Here only the top level and
//! `metadata` are split into borrowed raw members; everything else is copied through as the
//! bytes it was stored as. Stored objects are written by [`crate::object::encode`] from a
//! `Value`, whose maps are ordered by key, so keeping that order yields exactly the bytes
//! the `Value` round trip would. Input this cannot split (not an object, escaped keys at
//! those two levels) makes the callers fall back to the `Value` path.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::{resources::Resource, storage::Versioned};

/// One level of an object: member names and their still-encoded values, in key order.
type Members<'a> = BTreeMap<&'a str, &'a RawValue>;

/// One level of an object being written: member names and their JSON texts, in key order.
type Out<'a> = BTreeMap<&'a str, &'a str>;

/// The members of a JSON object, or `None` if `text` is not an object this can split (the
/// borrowed names also make it refuse names with escapes).
fn members(text: &str) -> Option<Members<'_>> {
    serde_json::from_str(text).ok()
}

fn texts<'a>(m: &Members<'a>) -> Out<'a> {
    m.iter().map(|(k, v)| (*k, v.get())).collect()
}

/// A JSON string literal.
fn string(s: &str) -> String {
    // Serializing a string cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Writes an object from member texts. Names came from [`members`] (unescaped, so they
/// need none) or are this module's constants.
fn write_object(out: &mut Vec<u8>, m: &Out<'_>) {
    out.push(b'{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(v.as_bytes());
    }
    out.push(b'}');
}

fn object_text(m: &Out<'_>) -> String {
    let mut out = Vec::with_capacity(m.values().map(|v| v.len() + 24).sum());
    write_object(&mut out, m);
    // Valid UTF-8: names and values are `str`s and the punctuation is ASCII.
    String::from_utf8(out).unwrap_or_default()
}

/// The object as a client sees it (what `object::decode` and serializing give): the stored
/// members with `apiVersion`, `kind` and `metadata.resourceVersion` set. `None` when the
/// stored text cannot be split; the caller then takes the `Value` path.
pub(crate) fn render(r: &Resource, v: &Versioned) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(&v.value).ok()?;
    let parsed = members(text)?;
    let meta_parsed = match parsed.get("metadata") {
        Some(m) => members(m.get())?,
        None => Members::new(),
    };
    let mut meta = texts(&meta_parsed);
    let version = string(&v.mod_revision.to_string());
    meta.insert("resourceVersion", &version);
    let meta_text = object_text(&meta);
    let api_version = string(&r.api_version());
    let kind = string(r.kind);
    let mut top = texts(&parsed);
    top.insert("apiVersion", &api_version);
    top.insert("kind", &kind);
    top.insert("metadata", &meta_text);
    let mut out = Vec::with_capacity(text.len() + 64);
    write_object(&mut out, &top);
    Some(out)
}

/// A line of a watch stream: `{"type":…,"object":…}` and a newline. The type comes first,
/// as Kubernetes writes it: decoders of the event (serde's adjacently tagged `WatchEvent` in
/// kube-rs, client-go's) then decode the object in place instead of buffering it until they
/// know the type.
pub(crate) fn watch_line(kind: &str, object: &[u8]) -> bytes::Bytes {
    let mut line = Vec::with_capacity(object.len() + kind.len() + 24);
    line.extend_from_slice(b"{\"type\":");
    line.extend_from_slice(string(kind).as_bytes());
    line.extend_from_slice(b",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    line.into()
}

/// A list response built from already rendered items: `{"apiVersion":…,"items":[…],
/// "kind":…,"metadata":…}` in key order, as the `Value` path serializes it.
pub(crate) fn list(r: &Resource, items: &[Vec<u8>], meta: &serde_json::Value) -> Vec<u8> {
    let total: usize = items.iter().map(|i| i.len() + 1).sum();
    let mut out = Vec::with_capacity(total + 128);
    out.extend_from_slice(b"{\"apiVersion\":");
    out.extend_from_slice(string(&r.api_version()).as_bytes());
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.extend_from_slice(b"],\"kind\":");
    out.extend_from_slice(string(&r.list_kind()).as_bytes());
    out.extend_from_slice(b",\"metadata\":");
    out.extend_from_slice(meta.to_string().as_bytes());
    out.push(b'}');
    out
}

/// Whether `metadata` of a stored object has `field` (any value, as a JSON pointer lookup
/// sees it); `None` when the text cannot be split.
pub(crate) fn has_meta_field(v: &Versioned, field: &str) -> Option<bool> {
    let top = members(std::str::from_utf8(&v.value).ok()?)?;
    match top.get("metadata") {
        Some(m) => members(m.get()).map(|m| m.contains_key(field)),
        None => Some(false),
    }
}

/// Why a pod cannot be bound.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BindRefusal {
    /// `spec.nodeName` is already set (to this node).
    Assigned(String),
    /// The pod has a `deletionTimestamp`.
    Terminating,
}

/// The stored bytes of a pod bound to `node` (`spec.nodeName` set, the `PodScheduled`
/// condition replaced by a true one at `now`), exactly as `pods::assign_at` on the decoded
/// pod followed by `object::encode` would store them. `None` when the text cannot be split
/// here; the caller then takes the `Value` path.
pub(crate) fn bind_pod(
    r: &Resource,
    stored: &[u8],
    node: &str,
    now: &str,
) -> Option<Result<Vec<u8>, BindRefusal>> {
    let text = std::str::from_utf8(stored).ok()?;
    let parsed = members(text)?;
    let meta = match parsed.get("metadata") {
        Some(m) => Some(members(m.get())?),
        None => None,
    };
    // The `Value` path refuses a bound pod before a terminating one.
    if let Some(current) = assigned(&parsed)? {
        return Some(Err(BindRefusal::Assigned(current)));
    }
    if meta
        .as_ref()
        .is_some_and(|m| m.contains_key("deletionTimestamp"))
    {
        return Some(Err(BindRefusal::Terminating));
    }
    // The spec with nodeName set (a missing or null spec becomes `{"nodeName": …}`, as
    // indexing a `Value` does; any other non-object is left to the `Value` path).
    let spec_parsed = match parsed.get("spec").map(|s| s.get()) {
        None | Some("null") => Members::new(),
        Some(s) => members(s)?,
    };
    let mut spec = texts(&spec_parsed);
    let node_text = string(node);
    spec.insert("nodeName", &node_text);
    let spec_text = object_text(&spec);
    let status_text = bound_status(parsed.get("status").map(|s| s.get()), now)?;
    let api_version = string(&r.api_version());
    let kind = string(r.kind);
    let mut top = texts(&parsed);
    let meta_text;
    if let Some(meta) = &meta
        && meta.contains_key("resourceVersion")
    {
        // Never stored (the store's revision is the resourceVersion), but if present,
        // dropped as `object::encode` drops it.
        let mut m = texts(meta);
        m.remove("resourceVersion");
        meta_text = object_text(&m);
        top.insert("metadata", &meta_text);
    }
    top.insert("apiVersion", &api_version);
    top.insert("kind", &kind);
    top.insert("spec", &spec_text);
    top.insert("status", &status_text);
    let mut out = Vec::with_capacity(text.len() + 160);
    write_object(&mut out, &top);
    Some(Ok(out))
}

/// The node a stored pod is assigned to, if any; `None` (outer) when `spec` cannot be read.
fn assigned(top: &Members<'_>) -> Option<Option<String>> {
    let Some(spec) = top.get("spec") else {
        return Some(None);
    };
    if spec.get() == "null" {
        return Some(None);
    }
    let spec = members(spec.get())?;
    Some(
        spec.get("nodeName")
            .and_then(|n| serde_json::from_str::<String>(n.get()).ok())
            .filter(|n| !n.is_empty()),
    )
}

/// The pod's status text with `PodScheduled=True`: other conditions kept in order and the
/// new one last; a status that is not an object with a conditions list becomes a fresh
/// pending one (as the `Value` path does).
fn bound_status(status: Option<&str>, now: &str) -> Option<String> {
    let scheduled = serde_json::json!({"type": "PodScheduled", "status": "True",
                                       "lastProbeTime": null, "lastTransitionTime": now});
    let fresh = || {
        serde_json::to_string(&serde_json::json!({"phase": "Pending",
                                                  "conditions": [scheduled.clone()]}))
        .ok()
    };
    let Some(text) = status.filter(|s| s.starts_with('{')) else {
        return fresh();
    };
    let parsed = members(text)?;
    let mut conditions: Vec<serde_json::Value> = match parsed.get("conditions") {
        None => Vec::new(),
        Some(c) => match serde_json::from_str(c.get()) {
            Ok(list) => list,
            // Not a list: the `Value` path replaces the whole status.
            Err(_) => return fresh(),
        },
    };
    conditions
        .retain(|c| c.get("type").and_then(serde_json::Value::as_str) != Some("PodScheduled"));
    conditions.push(scheduled.clone());
    let list = serde_json::to_string(&conditions).ok()?;
    let mut out = texts(&parsed);
    out.insert("conditions", &list);
    Some(object_text(&out))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::object;

    fn pods() -> &'static Resource {
        crate::resources::find("", "v1", "pods").expect("pods are served")
    }

    fn stored(obj: &Value, revision: i64) -> Versioned {
        Versioned {
            value: object::encode(obj).expect("encodes"),
            create_revision: 1,
            mod_revision: revision,
        }
    }

    fn samples() -> Vec<Value> {
        vec![
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "a", "namespace": "default", "uid": "u-1",
                                "labels": {"app": "web", "é\"x": "y\\z"},
                                "annotations": {"n": "1.5"}},
                   "spec": {"containers": [{"name": "c", "image": "busybox:1",
                            "resources": {"requests": {"cpu": "100m"}}}],
                            "priority": 0, "weight": 1.25e3},
                   "status": {"phase": "Pending", "conditions": [
                       {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"},
                       {"type": "Other", "status": "True"}]}}),
            json!({"metadata": {"name": "b"}, "spec": {"containers": []}}),
            json!({"metadata": {"name": "c"}, "spec": {}, "status": {"phase": "Pending"}}),
            json!({"metadata": {"name": "d"}, "status": {"conditions": {"odd": true}}}),
            json!({"metadata": {"name": "e"}, "spec": null, "status": "weird"}),
        ]
    }

    #[test]
    fn render_matches_decoding_and_serializing() {
        for (i, obj) in samples().into_iter().enumerate() {
            let v = stored(&obj, 40 + i as i64);
            let want = serde_json::to_vec(&object::decode(pods(), &v).unwrap()).unwrap();
            let got = render(pods(), &v).expect("splits");
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
    }

    #[test]
    fn render_declines_what_it_cannot_split() {
        let v = Versioned {
            value: b"[1, 2]".to_vec(),
            create_revision: 1,
            mod_revision: 2,
        };
        assert!(render(pods(), &v).is_none());
    }

    #[test]
    fn watch_and_list_text_match_the_value_path() {
        let obj = json!({"metadata": {"name": "a"}, "spec": {}});
        let v = stored(&obj, 7);
        let rendered = render(pods(), &v).unwrap();
        let decoded = object::decode(pods(), &v).unwrap();
        let line = watch_line("MODIFIED", &rendered);
        let want = format!(
            "{{\"type\":\"MODIFIED\",\"object\":{}}}\n",
            serde_json::to_string(&decoded).unwrap()
        );
        assert_eq!(std::str::from_utf8(&line).unwrap(), want);
        // What clients decode: the same event either way round.
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            parsed,
            json!({"type": "MODIFIED", "object": decoded.clone()})
        );
        let meta = json!({"resourceVersion": "9", "continue": "abc"});
        let list = list(pods(), &[rendered.clone(), rendered], &meta);
        let want = json!({"kind": "PodList", "apiVersion": "v1", "metadata": meta,
                          "items": [decoded.clone(), decoded]});
        assert_eq!(
            std::str::from_utf8(&list).unwrap(),
            serde_json::to_string(&want).unwrap()
        );
    }

    #[test]
    fn binding_text_matches_the_value_path() {
        let now = "2026-11-27T21:00:00Z";
        for obj in samples() {
            let v = stored(&obj, 5);
            let got = bind_pod(pods(), &v.value, "n1", now)
                .expect("splits")
                .expect("binds");
            let t =
                crate::request::Target::parse("", "v1", "namespaces/default/pods/a", "/").unwrap();
            let decoded = object::decode(pods(), &v).unwrap();
            let want =
                object::encode(&crate::pods::assign_at(&t, decoded, "n1", now).unwrap()).unwrap();
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
    }

    #[test]
    fn binding_refuses_bound_and_terminating_pods() {
        let bound = stored(
            &json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n0"}}),
            3,
        );
        assert_eq!(
            bind_pod(pods(), &bound.value, "n1", "t").unwrap(),
            Err(BindRefusal::Assigned("n0".into()))
        );
        let empty = stored(
            &json!({"metadata": {"name": "a"}, "spec": {"nodeName": ""}}),
            3,
        );
        assert!(bind_pod(pods(), &empty.value, "n1", "t").unwrap().is_ok());
        let going = stored(
            &json!({"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"},
                    "spec": {}}),
            3,
        );
        assert_eq!(
            bind_pod(pods(), &going.value, "n1", "t").unwrap(),
            Err(BindRefusal::Terminating)
        );
        assert!(has_meta_field(&going, "deletionTimestamp").unwrap());
        assert!(!has_meta_field(&bound, "deletionTimestamp").unwrap());
    }
}
