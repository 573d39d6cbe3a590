//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Each manager owns a set of field paths, stored in the `FieldsV1` form Kubernetes uses.
//! Updates (create, update, patch) move the fields they change to their manager; an apply
//! owns exactly the fields of its configuration, removes the fields it owned before and no
//! longer lists (unless someone else owns them), and conflicts with other owners of a field
//! it would change unless forced.
//!
//! Simplifications against Kubernetes' structured-merge-diff: lists of objects are keyed by
//! the same merge keys the strategic merge patch uses (by field name, not from the schema),
//! and every other list is atomic (owned as one field).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::{
    patch,
    status::{ApiError, ApiResult},
};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// A field of an object (`f:name`).
    Field(String),
    /// An item of a keyed list (`k:{"name":"web"}`): the canonical JSON of its key.
    Key(String),
}

impl Step {
    fn encode(&self) -> String {
        match self {
            Step::Field(f) => format!("f:{f}"),
            Step::Key(k) => format!("k:{k}"),
        }
    }

    fn decode(s: &str) -> Option<Step> {
        if let Some(f) = s.strip_prefix("f:") {
            Some(Step::Field(f.to_owned()))
        } else {
            s.strip_prefix("k:").map(|k| Step::Key(k.to_owned()))
        }
    }
}

type Path = Vec<Step>;

/// A set of owned field paths. A keyed list item's own path is in the set along with the
/// paths of its fields, so that removing the item is tracked too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet(BTreeSet<Path>);

/// Top-level and metadata fields the server owns; nobody manages them.
const SERVER_METADATA: [&str; 10] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// Which part of an object an operation manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything but `status` (resources with a status subresource).
    Main { has_status: bool },
    /// Only `status` (the status subresource).
    Status,
}

/// The merge key of a list of objects, if it is keyed.
fn list_key(items: &[Value]) -> Option<&'static str> {
    patch::merge_key(items)
}

fn key_step(key: &str, item: &Value) -> Step {
    let id = item.get(key).cloned().unwrap_or(Value::Null);
    Step::Key(json!({ key: id }).to_string())
}

impl FieldSet {
    /// The fields set in `obj`, within `scope`.
    pub fn of(obj: &Value, scope: Scope) -> Self {
        let mut set = FieldSet::default();
        let Some(top) = obj.as_object() else {
            return set;
        };
        for (k, v) in top {
            if !in_scope(k, scope) {
                continue;
            }
            let path = vec![Step::Field(k.clone())];
            if k == "metadata" {
                if let Some(meta) = v.as_object() {
                    for (mk, mv) in meta {
                        if !SERVER_METADATA.contains(&mk.as_str()) {
                            set.collect(vec![Step::Field(k.clone()), Step::Field(mk.clone())], mv);
                        }
                    }
                }
                continue;
            }
            set.collect(path, v);
        }
        set
    }

    fn collect(&mut self, path: Path, v: &Value) {
        match v {
            Value::Object(o) if !o.is_empty() => {
                for (k, child) in o {
                    let mut p = path.clone();
                    p.push(Step::Field(k.clone()));
                    self.collect(p, child);
                }
            }
            Value::Array(items) if !items.is_empty() && list_key(items).is_some() => {
                let key = list_key(items).unwrap_or("name");
                for item in items {
                    let mut p = path.clone();
                    p.push(key_step(key, item));
                    self.0.insert(p.clone());
                    self.collect(p, item);
                }
            }
            _ => {
                self.0.insert(path);
            }
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn contains(&self, p: &Path) -> bool {
        self.0.contains(p)
    }

    /// Whether the set holds `p` or anything below it.
    fn covers(&self, p: &Path) -> bool {
        self.0
            .range(p.clone()..)
            .next()
            .is_some_and(|q| q.starts_with(p))
    }

    fn difference(&self, other: &FieldSet) -> FieldSet {
        FieldSet(self.0.difference(&other.0).cloned().collect())
    }

    /// `FieldsV1` JSON.
    pub fn to_fields_v1(&self) -> Value {
        let mut root = Map::new();
        for path in &self.0 {
            let mut node = &mut root;
            for step in path {
                node = node
                    .entry(step.encode())
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                    .expect("field set nodes are objects");
            }
            // Paths come in order, so an item's own path precedes its fields: mark the item
            // itself as owned with ".", as Kubernetes does.
            if matches!(path.last(), Some(Step::Key(_))) {
                node.insert(".".into(), json!({}));
            }
        }
        Value::Object(root)
    }

    /// Parses `FieldsV1` JSON; unknown step kinds (`v:`, `i:`) are skipped.
    pub fn from_fields_v1(v: &Value) -> FieldSet {
        fn walk(path: &mut Path, node: &Map<String, Value>, out: &mut BTreeSet<Path>) {
            let children: Vec<_> = node.iter().filter(|(k, _)| *k != ".").collect();
            if (children.is_empty() || node.contains_key(".")) && !path.is_empty() {
                out.insert(path.clone());
            }
            for (k, child) in children {
                let (Some(step), Some(child)) = (Step::decode(k), child.as_object()) else {
                    continue;
                };
                path.push(step);
                walk(path, child, out);
                path.pop();
            }
        }
        let mut out = BTreeSet::new();
        if let Some(o) = v.as_object() {
            walk(&mut Vec::new(), o, &mut out);
        }
        FieldSet(out)
    }
}

/// The merge key a keyed-list step names.
fn item_key(k: &str) -> Option<Map<String, Value>> {
    serde_json::from_str(k).ok()
}

/// Whether `item` is the list item `key` names.
fn is_item(key: &Map<String, Value>, item: &Value) -> bool {
    key.iter().all(|(kk, kv)| item.get(kk) == Some(kv))
}

/// The value at `path` in `obj`.
fn value_at<'a>(obj: &'a Value, path: &Path) -> Option<&'a Value> {
    let mut cur = obj;
    for step in path {
        cur = match step {
            Step::Field(f) => cur.get(f)?,
            Step::Key(k) => {
                let key = item_key(k)?;
                cur.as_array()?.iter().find(|item| is_item(&key, item))?
            }
        };
    }
    Some(cur)
}

/// Removes the field or list item at `path` from `obj`.
fn remove_at(obj: &mut Value, path: &Path) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for step in parents {
        let next = match step {
            Step::Field(f) => cur.get_mut(f),
            Step::Key(k) => {
                let Some(key) = item_key(k) else { return };
                cur.as_array_mut()
                    .and_then(|items| items.iter_mut().find(|item| is_item(&key, item)))
            }
        };
        let Some(next) = next else { return };
        cur = next;
    }
    match last {
        Step::Field(f) => {
            if let Some(o) = cur.as_object_mut() {
                o.remove(f);
            }
        }
        Step::Key(k) => {
            if let (Some(key), Some(items)) = (item_key(k), cur.as_array_mut()) {
                items.retain(|item| !is_item(&key, item));
            }
        }
    }
}

/// `.spec.containers[name="web"].image`, as Kubernetes prints field paths.
fn display_path(path: &Path) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Field(f) => {
                out.push('.');
                out.push_str(f);
            }
            Step::Key(k) => {
                let key = item_key(k).unwrap_or_default();
                let parts: Vec<String> = key.iter().map(|(kk, kv)| format!("{kk}={kv}")).collect();
                out.push('[');
                out.push_str(&parts.join(","));
                out.push(']');
            }
        }
    }
    out
}

/// One `managedFields` entry.
#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: Option<String>,
    fields: FieldSet,
}

impl Entry {
    fn parse(v: &Value) -> Option<Entry> {
        Some(Entry {
            manager: v.get("manager")?.as_str()?.to_owned(),
            operation: v.get("operation")?.as_str()?.to_owned(),
            api_version: v
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            time: v
                .get("time")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            subresource: v
                .get("subresource")
                .and_then(Value::as_str)
                .map(str::to_owned),
            fields: FieldSet::from_fields_v1(v.get("fieldsV1").unwrap_or(&Value::Null)),
        })
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_fields_v1(),
        });
        if let Some(s) = &self.subresource {
            v["subresource"] = json!(s);
        }
        v
    }

    fn is(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|l| l.iter().filter_map(Entry::parse).collect())
        .unwrap_or_default()
}

fn store_entries(obj: &mut Value, list: &[Entry]) {
    let meta = crate::object::metadata_mut(obj);
    let kept: Vec<Value> = list
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_json)
        .collect();
    if kept.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(kept));
    }
}

fn api_version(obj: &Value) -> String {
    obj.get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn subresource(scope: Scope) -> Option<&'static str> {
    matches!(scope, Scope::Status).then_some("status")
}

/// Who manages a write: `fieldManager`, else the client's user agent up to the first `/`.
///
/// # Errors
/// 400 for a manager name longer than Kubernetes allows.
pub fn manager_name(field_manager: Option<&str>, user_agent: Option<&str>) -> ApiResult<String> {
    let name = match field_manager.filter(|m| !m.is_empty()) {
        Some(m) => m.to_owned(),
        None => user_agent
            .and_then(|ua| ua.split('/').next())
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_owned(),
    };
    if name.len() > 128 {
        return Err(ApiError::bad_request(
            "fieldManager: Too long: may not be more than 128 bytes",
        ));
    }
    Ok(name)
}

/// Records an update (create, update, non-apply patch) by `manager`: the fields it changed
/// become its own, other managers lose them; fields that disappeared are owned by nobody.
/// `old` is `None` for a create. Managed fields the client sent are kept if they differ
/// from the stored ones (that is how a client resets them), otherwise the stored ones are.
pub fn track_update(old: Option<&Value>, new: &mut Value, manager: &str, scope: Scope) {
    match old {
        None => track_create(new, manager, scope),
        Some(_) => track_changes(old, new, manager, scope),
    }
}

/// [`track_update`] of a create: the manager owns every field it set, unless it sent managed
/// fields of its own. Builds the `FieldsV1` tree in one walk of the object (no path sets):
/// every create takes this, Events too (one per scheduled pod).
fn track_create(new: &mut Value, manager: &str, scope: Scope) {
    if new.pointer("/metadata/managedFields").is_some() {
        // The client set them: taken as given.
        return;
    }
    // As the general path, which removes the (absent) managed fields through it.
    crate::object::metadata_mut(new);
    let fields = owned_fields_v1(new, scope);
    if fields.is_empty() {
        return;
    }
    let entry = Entry {
        manager: manager.to_owned(),
        operation: "Update".into(),
        api_version: api_version(new),
        time: crate::object::now_rfc3339(),
        subresource: subresource(scope).map(str::to_owned),
        fields: FieldSet::default(),
    };
    let mut json = entry.to_json();
    json["fieldsV1"] = Value::Object(fields);
    crate::object::metadata_mut(new).insert("managedFields".into(), Value::Array(vec![json]));
}

/// `FieldSet::of(obj, scope).to_fields_v1()`, built directly.
fn owned_fields_v1(obj: &Value, scope: Scope) -> Map<String, Value> {
    fn child(node: &mut Map<String, Value>, step: String) -> &mut Map<String, Value> {
        match node
            .entry(step)
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(m) => m,
            // Only objects are ever inserted here.
            _ => unreachable!("fieldsV1 nodes are objects"),
        }
    }
    fn fill(node: &mut Map<String, Value>, v: &Value) {
        match v {
            Value::Object(o) if !o.is_empty() => {
                for (k, c) in o {
                    fill(child(node, format!("f:{k}")), c);
                }
            }
            Value::Array(items) if !items.is_empty() && list_key(items).is_some() => {
                let key = list_key(items).unwrap_or("name");
                for item in items {
                    let n = child(node, key_step(key, item).encode());
                    n.insert(".".into(), json!({}));
                    fill(n, item);
                }
            }
            // A leaf: its node stays empty.
            _ => {}
        }
    }
    let mut root = Map::new();
    let Some(top) = obj.as_object() else {
        return root;
    };
    for (k, v) in top {
        if !in_scope(k, scope) {
            continue;
        }
        if k == "metadata" {
            for (mk, mv) in v.as_object().into_iter().flatten() {
                if !SERVER_METADATA.contains(&mk.as_str()) {
                    let meta = child(&mut root, "f:metadata".into());
                    fill(child(meta, format!("f:{mk}")), mv);
                }
            }
            continue;
        }
        fill(child(&mut root, format!("f:{k}")), v);
    }
    root
}

/// Whether a top-level field belongs to what `scope` manages.
fn in_scope(k: &str, scope: Scope) -> bool {
    match scope {
        Scope::Status => k == "status",
        Scope::Main { has_status } => {
            let server_side = matches!(k, "apiVersion" | "kind");
            !(server_side || has_status && k == "status")
        }
    }
}

/// [`track_update`] through field sets: an update, or a create (`old` is `None`).
fn track_changes(old: Option<&Value>, new: &mut Value, manager: &str, scope: Scope) {
    let sent = new.pointer("/metadata/managedFields").cloned();
    let stored = old.and_then(|o| o.pointer("/metadata/managedFields").cloned());
    if sent.is_none() || sent == stored {
        match &stored {
            Some(s) => {
                crate::object::metadata_mut(new).insert("managedFields".into(), s.clone());
            }
            None => {
                crate::object::metadata_mut(new).remove("managedFields");
            }
        }
    } else {
        // The client replaced the managed fields: take them as given.
        return;
    }
    let now_fields = FieldSet::of(new, scope);
    let before = old.map(|o| FieldSet::of(o, scope)).unwrap_or_default();
    let changed: FieldSet = FieldSet(
        now_fields
            .0
            .iter()
            .filter(|p| old.is_none_or(|o| value_at(o, p) != value_at(new, p)))
            .cloned()
            .collect(),
    );
    let gone = before.difference(&now_fields);
    if changed.is_empty() && gone.is_empty() {
        return;
    }
    let mut list = entries(new);
    for e in &mut list {
        e.fields = e.fields.difference(&gone);
        if !e.is(manager, "Update", subresource(scope)) {
            e.fields = e.fields.difference(&changed);
        }
    }
    let now = crate::object::now_rfc3339();
    match list
        .iter_mut()
        .find(|e| e.is(manager, "Update", subresource(scope)))
    {
        Some(e) => {
            e.fields.0.extend(changed.0);
            e.time = now;
            e.api_version = api_version(new);
        }
        None if !changed.is_empty() => list.push(Entry {
            manager: manager.to_owned(),
            operation: "Update".into(),
            api_version: api_version(new),
            time: now,
            subresource: subresource(scope).map(str::to_owned),
            fields: changed,
        }),
        None => {}
    }
    store_entries(new, &list);
}

/// Server-side apply of `config` by `manager` onto `live` (`None`: the object does not
/// exist yet). Returns the new object.
///
/// # Errors
/// 409 with one cause per conflicting field when another manager owns a field this apply
/// would change, unless `force`.
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    scope: Scope,
) -> ApiResult<Value> {
    let mut config = config.clone();
    if let Some(meta) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    let wanted = FieldSet::of(&config, scope);
    let sub = subresource(scope);
    let Some(live) = live else {
        let mut new = config;
        let entry = Entry {
            manager: manager.to_owned(),
            operation: "Apply".into(),
            api_version: api_version(&new),
            time: crate::object::now_rfc3339(),
            subresource: sub.map(str::to_owned),
            fields: wanted,
        };
        store_entries(&mut new, &[entry]);
        return Ok(new);
    };
    let mut list = entries(live);

    // Conflicts: fields others own whose value this apply changes.
    let mut conflicts = Vec::new();
    for path in &wanted.0 {
        if matches!(path.last(), Some(Step::Key(_))) {
            continue;
        }
        if value_at(live, path) == value_at(&config, path) {
            continue;
        }
        for e in &list {
            if e.manager != manager && e.fields.contains(path) {
                conflicts.push((e.manager.clone(), e.api_version.clone(), path.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&conflicts));
    }
    if force {
        let taken = FieldSet(conflicts.iter().map(|(_, _, p)| p.clone()).collect());
        for e in &mut list {
            if e.manager != manager {
                e.fields = e.fields.difference(&taken);
            }
        }
    }

    let mut new = live.clone();
    patch::strategic_merge(&mut new, &config);
    // Fields this manager applied before and no longer lists go, unless someone else
    // still owns them (or something below them).
    let previous = list
        .iter()
        .find(|e| e.is(manager, "Apply", sub))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let dropped = previous.difference(&wanted);
    for path in &dropped.0 {
        let owned_elsewhere = list
            .iter()
            .any(|e| !e.is(manager, "Apply", sub) && e.fields.covers(path));
        if !owned_elsewhere && !wanted.covers(path) {
            remove_at(&mut new, path);
        }
    }
    let changed_set = previous != wanted;
    match list.iter_mut().find(|e| e.is(manager, "Apply", sub)) {
        Some(e) => {
            if changed_set || e.api_version != api_version(&new) {
                e.time = crate::object::now_rfc3339();
            }
            e.fields = wanted;
            e.api_version = api_version(&new);
        }
        None => list.push(Entry {
            manager: manager.to_owned(),
            operation: "Apply".into(),
            api_version: api_version(&new),
            time: crate::object::now_rfc3339(),
            subresource: sub.map(str::to_owned),
            fields: wanted,
        }),
    }
    store_entries(&mut new, &list);
    Ok(new)
}

fn conflict_error(conflicts: &[(String, String, Path)]) -> ApiError {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, v, p)| {
            json!({"reason": "FieldManagerConflict",
                   "message": format!("conflict with \"{m}\" using {v}"),
                   "field": display_path(p)})
        })
        .collect();
    let lines: Vec<String> = conflicts
        .iter()
        .map(|(m, v, p)| format!("conflict with \"{m}\" using {v}: {}", display_path(p)))
        .collect();
    let n = conflicts.len();
    let message = if n == 1 {
        format!("Apply failed with 1 conflict: {}", lines[0])
    } else {
        format!("Apply failed with {n} conflicts: {}", lines.join("\n"))
    };
    ApiError {
        code: axum::http::StatusCode::CONFLICT,
        reason: "Conflict",
        message,
        details: Some(json!({"causes": causes})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: Scope = Scope::Main { has_status: true };

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                   {"name": "app", "image": image}]}}}})
    }

    #[test]
    fn creates_own_what_the_general_path_gives_them() {
        let objects = [
            deployment(2, "a"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "p", "namespace": "d", "uid": "u",
                                "labels": {"a": "b"}, "annotations": {}},
                   "spec": {"containers": [
                       {"name": "c", "image": "i", "ports": [{"containerPort": 80}],
                        "env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
                       {"name": "d", "image": "j", "args": ["x", "y"]}],
                            "volumes": [], "nodeSelector": {}},
                   "status": {"phase": "Pending"}}),
            json!({"apiVersion": "v1", "kind": "Event",
                   "metadata": {"name": "e", "namespace": "d"},
                   "involvedObject": {"kind": "Pod", "name": "p"}, "count": 1,
                   "source": {"component": "default-scheduler"}}),
            json!({"metadata": {"name": "only"}}),
            json!({"metadata": "odd", "data": {"k": "v"}}),
        ];
        for obj in objects {
            for scope in [MAIN, Scope::Main { has_status: false }, Scope::Status] {
                let mut fast = obj.clone();
                track_update(None, &mut fast, "m", scope);
                let mut general = obj.clone();
                track_changes(None, &mut general, "m", scope);
                // Both stamp the time: compare the rest.
                for o in [&mut fast, &mut general] {
                    if let Some(Value::Array(list)) = o.pointer_mut("/metadata/managedFields") {
                        for e in list {
                            e["time"] = json!("t");
                        }
                    }
                }
                assert_eq!(fast, general, "{obj} in {scope:?}");
            }
        }
        // Managed fields a client sends with a create are kept as they are.
        let mut sent = json!({"metadata": {"name": "x", "managedFields": [{"manager": "a"}]}});
        let before = sent.clone();
        track_update(None, &mut sent, "m", MAIN);
        assert_eq!(sent, before);
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let set = FieldSet::of(&deployment(2, "a"), MAIN);
        let v1 = set.to_fields_v1();
        assert_eq!(
            v1["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"]["."],
            json!({})
        );
        assert_eq!(v1["f:metadata"]["f:labels"]["f:app"], json!({}));
        assert!(v1["f:metadata"].get("f:name").is_none());
        assert_eq!(FieldSet::from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_creates_then_conflicts_with_an_updater_unless_forced() {
        let created = apply(None, &deployment(2, "a"), "me", false, MAIN).unwrap();
        let owners = entries(&created);
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].manager.as_str(), owners[0].operation.as_str()),
            ("me", "Apply")
        );

        // Someone else scales with an update: they now own spec.replicas.
        let mut scaled = created.clone();
        scaled["spec"]["replicas"] = json!(5);
        track_update(Some(&created), &mut scaled, "kubectl-scale", MAIN);
        let owners = entries(&scaled);
        let replicas = vec![Step::Field("spec".into()), Step::Field("replicas".into())];
        assert!(
            owners
                .iter()
                .any(|e| e.manager == "kubectl-scale" && e.fields.contains(&replicas))
        );
        assert!(
            !owners
                .iter()
                .any(|e| e.manager == "me" && e.fields.contains(&replicas))
        );

        // Applying the old replica count conflicts; the same value does not.
        let err = apply(Some(&scaled), &deployment(2, "b"), "me", false, MAIN).unwrap_err();
        assert_eq!(err.code, axum::http::StatusCode::CONFLICT);
        assert!(
            err.message
                .contains("conflict with \"kubectl-scale\" using apps/v1: .spec.replicas"),
            "{}",
            err.message
        );
        let same = apply(Some(&scaled), &deployment(5, "b"), "me", false, MAIN).unwrap();
        assert_eq!(
            same["spec"]["template"]["spec"]["containers"][0]["image"],
            "b"
        );

        // Forced: the applier takes the field over.
        let forced = apply(Some(&scaled), &deployment(2, "b"), "me", true, MAIN).unwrap();
        assert_eq!(forced["spec"]["replicas"], 2);
        assert!(
            entries(&forced)
                .iter()
                .all(|e| e.manager != "kubectl-scale" || !e.fields.contains(&replicas))
        );
    }

    #[test]
    fn apply_removes_fields_it_no_longer_sets_but_keeps_others() {
        let mut config = deployment(1, "a");
        config["metadata"]["labels"]["tier"] = json!("front");
        let live = apply(None, &config, "me", false, MAIN).unwrap();
        // Another manager adds an annotation.
        let mut annotated = live.clone();
        annotated["metadata"]["annotations"] = json!({"note": "x"});
        track_update(Some(&live), &mut annotated, "other", MAIN);
        // The next apply drops the tier label and the container list changes.
        let mut next = deployment(1, "a");
        next["spec"]["template"]["spec"]["containers"] = json!([{"name": "side", "image": "s"}]);
        let out = apply(Some(&annotated), &next, "me", false, MAIN).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(out["metadata"]["annotations"], json!({"note": "x"}));
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name": "side", "image": "s"}])
        );
    }

    #[test]
    fn an_unchanged_update_records_nothing() {
        let live = apply(None, &deployment(1, "a"), "me", false, MAIN).unwrap();
        let mut same = live.clone();
        track_update(Some(&live), &mut same, "other", MAIN);
        assert_eq!(same, live);
        let mut status = live.clone();
        status["status"] = json!({"replicas": 1});
        track_update(Some(&live), &mut status, "ctrl", Scope::Status);
        let e = entries(&status);
        assert!(
            e.iter()
                .any(|e| e.manager == "ctrl" && e.subresource.as_deref() == Some("status"))
        );
    }

    #[test]
    fn managers_come_from_field_manager_or_user_agent() {
        assert_eq!(manager_name(Some("m"), Some("kubectl/v1.33")).unwrap(), "m");
        assert_eq!(
            manager_name(None, Some("kubectl/v1.33 (linux)")).unwrap(),
            "kubectl"
        );
        assert_eq!(manager_name(None, None).unwrap(), "unknown");
        assert!(manager_name(Some(&"x".repeat(200)), None).is_err());
    }
}
