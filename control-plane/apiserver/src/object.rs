//! Object metadata rules shared by every resource: names, system fields, generation,
//! validation against the resource's Kubernetes type, and defaulting.

use serde_json::{Map, Value, json};

use crate::{
    resources::{NameRule, Resource},
    status::{ApiError, ApiResult, Cause},
    storage::Versioned,
};

/// How unknown or duplicate fields are treated (`fieldValidation` query parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Accept the object and return a warning for each (the Kubernetes default).
    #[default]
    Warn,
    /// Reject the request.
    Strict,
}

impl FieldValidation {
    /// Parses the query parameter.
    ///
    /// # Errors
    /// An unknown value.
    pub fn parse(v: Option<&str>) -> ApiResult<Self> {
        match v {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of Ignore, Warn, Strict, not {other:?}"
            ))),
        }
    }
}

/// `metadata` of an object, created if missing.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // Just ensured above.
        _ => unreachable!("metadata is an object"),
    }
}

/// A string field of `metadata`.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// The object as the client sees it: apiVersion, kind and the revision as resourceVersion.
pub fn decode(r: &Resource, v: &Versioned) -> ApiResult<Value> {
    let mut obj: Value = serde_json::from_slice(&v.value)
        .map_err(|e| ApiError::internal(format!("stored {} is not JSON: {e}", r.kind)))?;
    obj["apiVersion"] = json!(r.api_version());
    obj["kind"] = json!(r.kind);
    metadata_mut(&mut obj).insert("resourceVersion".into(), json!(v.mod_revision.to_string()));
    Ok(obj)
}

/// The bytes stored for an object: without resourceVersion, which the store's revision is.
pub fn encode(obj: &Value) -> ApiResult<Vec<u8>> {
    let encoded = match obj {
        // Every write encodes its object (often twice): skip the one field while writing
        // instead of cloning the whole tree to remove it.
        Value::Object(map) if map.get("metadata").is_some_and(Value::is_object) => {
            serde_json::to_vec(&Stored(map))
        }
        _ => {
            let mut obj = obj.clone();
            metadata_mut(&mut obj).remove("resourceVersion");
            serde_json::to_vec(&obj)
        }
    };
    encoded.map_err(|e| ApiError::internal(format!("encoding object: {e}")))
}

/// An object serialized as stored: `metadata` without `resourceVersion`.
struct Stored<'a>(&'a Map<String, Value>);

/// A `metadata` map without `resourceVersion`.
struct WithoutVersion<'a>(&'a Map<String, Value>);

impl serde::Serialize for Stored<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut out = s.serialize_map(Some(self.0.len()))?;
        for (key, value) in self.0 {
            match value {
                Value::Object(meta) if key == "metadata" => {
                    out.serialize_entry(key, &WithoutVersion(meta))?;
                }
                _ => out.serialize_entry(key, value)?,
            }
        }
        out.end()
    }
}

impl serde::Serialize for WithoutVersion<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut out = s.serialize_map(None)?;
        for (key, value) in self.0.iter().filter(|(k, _)| *k != "resourceVersion") {
            out.serialize_entry(key, value)?;
        }
        out.end()
    }
}

/// Validates a name against the resource's rule; the messages are Kubernetes' own.
pub fn validate_name(rule: NameRule, name: &str) -> Option<String> {
    let (max, what, allowed_dot) = match rule {
        NameRule::Subdomain => (253, "RFC 1123 subdomain", true),
        NameRule::Label => (63, "RFC 1123 label", false),
    };
    let ok_chars = name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (allowed_dot && b == b'.')
    });
    let ends_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    let parts_ok = !allowed_dot
        || name.split('.').all(|p| {
            !p.is_empty()
                && p.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && p.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        });
    if name.len() > max {
        return Some(format!("must be no more than {max} characters"));
    }
    if ok_chars && ends_ok && parts_ok {
        return None;
    }
    Some(if allowed_dot {
        format!(
            "a lowercase {what} must consist of lower case alphanumeric characters, '-' or '.', \
             and must start and end with an alphanumeric character (e.g. 'example.com', regex \
             used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        )
    } else {
        format!(
            "a lowercase {what} must consist of lower case alphanumeric characters or '-', and \
             must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', \
             regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        )
    })
}

/// Checks the object against the resource's type: type errors are 400; fields the type does
/// not declare are handled per `validation` and returned as warnings when accepted.
pub fn check_schema(
    r: &Resource,
    obj: &mut Value,
    validation: FieldValidation,
) -> ApiResult<Vec<String>> {
    let type_error = |e: serde_json::Error| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            r.kind, r.version, r.kind
        ))
    };
    // Almost every object declares only known fields: one typed decode says so. Only when
    // the decoder skipped something does the round trip below name what (skipped members
    // that are null are not reported, as before).
    if !(r.skips)(obj).map_err(type_error)? {
        return Ok(Vec::new());
    }
    let typed = (r.round_trip)(obj).map_err(type_error)?;
    let mut unknown = Vec::new();
    unknown_fields(obj, &typed, "", &mut unknown);
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let messages: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    match validation {
        FieldValidation::Strict => Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            messages.join(", ")
        ))),
        FieldValidation::Warn => {
            *obj = typed;
            Ok(messages)
        }
        FieldValidation::Ignore => {
            *obj = typed;
            Ok(Vec::new())
        }
    }
}

/// Paths present (and not null) in `given` but absent after the typed round trip.
fn unknown_fields(given: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    let mut path = path.to_owned();
    unknown_under(given, typed, &mut path, out);
}

/// [`unknown_fields`] with one path buffer: a path is only made into a string of its own
/// when it is reported (every create and update walks the whole object).
fn unknown_under(given: &Value, typed: &Value, path: &mut String, out: &mut Vec<String>) {
    let nested = |v: &Value| matches!(v, Value::Object(_) | Value::Array(_));
    match (given, typed) {
        (Value::Object(g), Value::Object(t)) => {
            for (k, v) in g {
                let len = path.len();
                match t.get(k) {
                    Some(tv) if nested(v) && nested(tv) => {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(k);
                        unknown_under(v, tv, path, out);
                        path.truncate(len);
                    }
                    Some(_) => {}
                    None if v.is_null() => {}
                    None if path.is_empty() => out.push(k.clone()),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(g), Value::Array(t)) => {
            for (i, (gv, tv)) in g.iter().zip(t).enumerate() {
                if nested(gv) && nested(tv) {
                    let len = path.len();
                    path.push('[');
                    path.push_str(&i.to_string());
                    path.push(']');
                    unknown_under(gv, tv, path, out);
                    path.truncate(len);
                }
            }
        }
        _ => {}
    }
}

/// Sets the fields the server owns on a new object.
pub fn init_new(obj: &mut Value, namespace: Option<&str>) {
    let now = now_rfc3339();
    let meta = metadata_mut(obj);
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now));
    meta.insert("generation".into(), json!(1));
    meta.remove("deletionTimestamp");
    meta.remove("deletionGracePeriodSeconds");
    meta.remove("resourceVersion");
    match namespace {
        Some(ns) => meta.insert("namespace".into(), json!(ns)),
        None => meta.remove("namespace"),
    };
}

/// Carries the server-owned fields of `old` into an update, bumps `generation` when anything
/// but metadata and status changed, and keeps the status (or everything but the status) for
/// resources with a status subresource.
pub fn carry_over(r: &Resource, old: &Value, new: &mut Value, status_only: bool) {
    if r.has_status {
        if status_only {
            let status = new.get("status").cloned();
            *new = Value::Object(old.as_object().cloned().unwrap_or_default());
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        } else {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
    }
    let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let meta = metadata_mut(new);
    for field in [
        "uid",
        "creationTimestamp",
        "namespace",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old_meta.get(field) {
            Some(v) => meta.insert(field.into(), v.clone()),
            None => meta.remove(field),
        };
    }
    let generation = old_meta
        .get("generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let spec_changed = strip(old) != strip(new);
    metadata_mut(new).insert(
        "generation".into(),
        json!(if spec_changed {
            generation + 1
        } else {
            generation
        }),
    );
}

/// The object without metadata, status and type fields: what `generation` tracks.
fn strip(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    o
}

/// The current time as Kubernetes writes timestamps (RFC 3339, seconds, UTC).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

/// Fills defaults Kubernetes fills for the served types, where clients and controllers rely
/// on them.
pub fn apply_defaults(r: &Resource, obj: &mut Value) {
    match (r.group, r.kind) {
        ("", "Namespace") => {
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Active"});
            }
            if obj
                .pointer("/metadata/labels/kubernetes.io~1metadata.name")
                .is_none()
            {
                let name = meta_str(obj, "name").unwrap_or_default().to_owned();
                let meta = metadata_mut(obj);
                if !meta.get("labels").is_some_and(Value::is_object) {
                    meta.insert("labels".into(), json!({}));
                }
                meta["labels"]["kubernetes.io/metadata.name"] = json!(name);
            }
        }
        ("", "Pod") => {
            default_pod_spec(obj.pointer_mut("/spec"));
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
        }
        ("", "Service") => {
            if let Some(spec) = obj.pointer_mut("/spec").and_then(Value::as_object_mut) {
                spec.entry("type").or_insert(json!("ClusterIP"));
                spec.entry("sessionAffinity").or_insert(json!("None"));
                if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                    for p in ports {
                        if let Some(p) = p.as_object_mut() {
                            p.entry("protocol").or_insert(json!("TCP"));
                            if let Some(port) = p.get("port").cloned() {
                                p.entry("targetPort").or_insert(port);
                            }
                        }
                    }
                }
            }
        }
        ("", "Secret") => {
            // `stringData` is a write-only convenience: it is merged into `data`, base64-encoded.
            if let Some(Value::Object(plain)) =
                obj.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                use base64::Engine as _;
                if !obj.get("data").is_some_and(Value::is_object) {
                    obj["data"] = json!({});
                }
                for (k, v) in plain {
                    let text = v.as_str().unwrap_or_default();
                    obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
                }
            }
            if let Some(o) = obj.as_object_mut() {
                o.entry("type").or_insert(json!("Opaque"));
            }
        }
        ("apps", "Deployment") => {
            if let Some(spec) = obj.pointer_mut("/spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                spec.entry("strategy").or_insert(json!({
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}
                }));
            }
            default_pod_spec(obj.pointer_mut("/spec/template/spec"));
        }
        ("apps", "ReplicaSet") => {
            if let Some(spec) = obj.pointer_mut("/spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
            }
            default_pod_spec(obj.pointer_mut("/spec/template/spec"));
        }
        ("apps", "DaemonSet") => {
            if let Some(spec) = obj.pointer_mut("/spec").and_then(Value::as_object_mut) {
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                let strategy = spec
                    .entry("updateStrategy")
                    .or_insert(json!({"type": "RollingUpdate"}));
                if let Some(strategy) = strategy.as_object_mut() {
                    let kind = strategy.entry("type").or_insert(json!("RollingUpdate"));
                    if kind == "RollingUpdate" {
                        let rolling = strategy.entry("rollingUpdate").or_insert(json!({}));
                        if let Some(rolling) = rolling.as_object_mut() {
                            rolling.entry("maxUnavailable").or_insert(json!(1));
                            rolling.entry("maxSurge").or_insert(json!(0));
                        }
                    }
                }
            }
            default_pod_spec(obj.pointer_mut("/spec/template/spec"));
        }
        ("batch", "Job") => {
            default_job(obj);
            default_pod_spec(obj.pointer_mut("/spec/template/spec"));
        }
        _ => {}
    }
}

/// Job defaults, and the selector Kubernetes generates (unless `manualSelector`): the Job's
/// uid as a label of its pods.
fn default_job(obj: &mut Value) {
    let uid = meta_str(obj, "uid").unwrap_or_default().to_owned();
    let name = meta_str(obj, "name").unwrap_or_default().to_owned();
    let Some(spec) = obj.pointer_mut("/spec").and_then(Value::as_object_mut) else {
        return;
    };
    if !spec.contains_key("completions") && !spec.contains_key("parallelism") {
        spec.insert("completions".into(), json!(1));
    }
    spec.entry("parallelism").or_insert(json!(1));
    spec.entry("backoffLimit").or_insert(json!(6));
    spec.entry("completionMode").or_insert(json!("NonIndexed"));
    spec.entry("suspend").or_insert(json!(false));
    let manual = spec.get("manualSelector") == Some(&json!(true));
    if manual || uid.is_empty() || spec.contains_key("selector") {
        return;
    }
    spec.insert(
        "selector".into(),
        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
    );
    let template = spec.entry("template").or_insert(json!({}));
    if !template
        .pointer("/metadata/labels")
        .is_some_and(Value::is_object)
    {
        template["metadata"]["labels"] = json!({});
    }
    if let Some(labels) = template
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        for (k, v) in [
            ("batch.kubernetes.io/controller-uid", &uid),
            ("batch.kubernetes.io/job-name", &name),
            ("controller-uid", &uid),
            ("job-name", &name),
        ] {
            labels.insert(k.into(), json!(v));
        }
    }
}

fn default_pod_spec(spec: Option<&mut Value>) {
    let Some(spec) = spec.and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("restartPolicy").or_insert(json!("Always"));
    spec.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    spec.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    spec.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    spec.entry("securityContext").or_insert(json!({}));
    if let Some(Value::Array(containers)) = spec.get_mut("containers") {
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            let latest = c.get("image").and_then(Value::as_str).is_some_and(|i| {
                !i.rsplit('/').next().unwrap_or(i).contains(':') || i.ends_with(":latest")
            });
            c.entry("imagePullPolicy").or_insert(json!(if latest {
                "Always"
            } else {
                "IfNotPresent"
            }));
            c.entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            c.entry("terminationMessagePolicy").or_insert(json!("File"));
            c.entry("resources").or_insert(json!({}));
            if let Some(Value::Array(ports)) = c.get_mut("ports") {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    p.entry("protocol").or_insert(json!("TCP"));
                }
            }
        }
    }
}

/// Required-field checks beyond the type's shape, as 422 causes.
pub fn validate_required(r: &Resource, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut require = |pointer: &str, field: &str| {
        if obj
            .pointer(pointer)
            .is_none_or(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty))
        {
            causes.push(Cause {
                reason: "FieldValueRequired",
                message: "Required value".into(),
                field: field.into(),
            });
        }
    };
    match (r.group, r.kind) {
        ("", "Pod") => require("/spec/containers", "spec.containers"),
        ("apps", "Deployment") | ("apps", "ReplicaSet") | ("apps", "DaemonSet") => {
            require("/spec/selector", "spec.selector");
            require(
                "/spec/template/spec/containers",
                "spec.template.spec.containers",
            );
        }
        ("batch", "Job") => {
            require(
                "/spec/template/spec/containers",
                "spec.template.spec.containers",
            );
            // A Job's pods must end: Always (also the default) is refused, as in Kubernetes.
            let policy = obj
                .pointer("/spec/template/spec/restartPolicy")
                .and_then(Value::as_str)
                .unwrap_or("Always");
            if !matches!(policy, "OnFailure" | "Never") {
                causes.push(Cause {
                    reason: "FieldValueNotSupported",
                    message: format!(
                        "Unsupported value: {policy:?}: supported values: \"OnFailure\", \"Never\""
                    ),
                    field: "spec.template.spec.restartPolicy".into(),
                });
            }
        }
        ("certificates.k8s.io", "CertificateSigningRequest") => {
            require("/spec/request", "spec.request");
            require("/spec/signerName", "spec.signerName");
        }
        ("provisioning.keelson.dev", "Machine") => {
            require("/spec/hostname", "spec.hostname");
        }
        _ => {}
    }
    if let Some(Value::Array(containers)) = obj
        .pointer("/spec/containers")
        .or_else(|| obj.pointer("/spec/template/spec/containers"))
    {
        let base = if obj.pointer("/spec/containers").is_some() {
            "spec.containers"
        } else {
            "spec.template.spec.containers"
        };
        for (i, c) in containers.iter().enumerate() {
            if c.get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                    field: format!("{base}[{i}].name"),
                });
            }
            if c.get("image")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                    field: format!("{base}[{i}].image"),
                });
            }
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn encode_leaves_out_the_resource_version_only() {
        let obj = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "resourceVersion": "42", "labels": {"a": "b"}},
            "spec": {"nodeName": "n"}, "status": {"phase": "Pending"},
        });
        let mut expected = obj.clone();
        expected["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("resourceVersion");
        assert_eq!(
            encode(&obj).unwrap(),
            serde_json::to_vec(&expected).unwrap()
        );
        // Without a metadata object, one is added (as before).
        assert_eq!(
            encode(&json!({"kind": "Pod"})).unwrap(),
            br#"{"kind":"Pod","metadata":{}}"#
        );
    }

    #[test]
    fn jobs_get_a_selector_and_must_not_restart_always() {
        let jobs = find("batch", "v1", "jobs").unwrap();
        let mut job = json!({
            "metadata": {"name": "pi", "uid": "u-1"},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
        });
        let causes = validate_required(jobs, &job);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.template.spec.restartPolicy");
        assert!(causes[0].message.contains(r#"Unsupported value: "Always""#));
        job["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
        assert!(validate_required(jobs, &job).is_empty());
        apply_defaults(jobs, &mut job);
        assert_eq!(
            job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
            "u-1"
        );
        let labels = &job["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["job-name"], "pi");
        assert_eq!(labels["batch.kubernetes.io/controller-uid"], "u-1");
        assert_eq!(job["spec"]["completions"], 1);
        assert_eq!(job["spec"]["parallelism"], 1);
        assert_eq!(job["spec"]["backoffLimit"], 6);
        // A work queue (parallelism without completions) keeps completions unset.
        let mut queue =
            json!({"metadata": {"name": "q", "uid": "u-2"}, "spec": {"parallelism": 3}});
        apply_defaults(jobs, &mut queue);
        assert!(queue["spec"].get("completions").is_none());
    }

    #[test]
    fn daemon_sets_default_to_rolling_updates_one_node_at_a_time() {
        let sets = find("apps", "v1", "daemonsets").unwrap();
        let mut ds = json!({"metadata": {"name": "d"}, "spec": {}});
        apply_defaults(sets, &mut ds);
        assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
        assert_eq!(
            ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            1
        );
        assert_eq!(ds["spec"]["revisionHistoryLimit"], 10);
        let mut on_delete = json!({"spec": {"updateStrategy": {"type": "OnDelete"}}});
        apply_defaults(sets, &mut on_delete);
        assert!(
            on_delete["spec"]["updateStrategy"]
                .get("rollingUpdate")
                .is_none()
        );
    }

    #[test]
    fn names_follow_rfc_1123() {
        assert_eq!(validate_name(NameRule::Subdomain, "web-1.example"), None);
        assert!(validate_name(NameRule::Subdomain, "Web").is_some());
        assert!(validate_name(NameRule::Subdomain, "-web").is_some());
        assert!(validate_name(NameRule::Subdomain, "a..b").is_some());
        assert!(validate_name(NameRule::Label, "a.b").is_some());
        assert!(validate_name(NameRule::Label, &"a".repeat(64)).is_some());
        assert_eq!(validate_name(NameRule::Label, "kube-system"), None);
    }

    #[test]
    fn unknown_fields_are_found_at_any_depth() {
        let pods = find("", "v1", "pods").unwrap();
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox", "bogus": 1}], "nope": true}
        });
        assert!(check_schema(pods, &mut pod.clone(), FieldValidation::Strict).is_err());
        let warnings = check_schema(pods, &mut pod, FieldValidation::Warn).unwrap();
        assert_eq!(
            warnings,
            vec![
                "unknown field \"spec.containers[0].bogus\"".to_owned(),
                "unknown field \"spec.nope\"".to_owned()
            ]
        );
        // Warn drops the unknown fields from what is stored.
        assert!(pod.pointer("/spec/nope").is_none());
    }

    #[test]
    fn the_skip_check_agrees_with_the_round_trip() {
        let known = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "annotations": {"x": "y"}},
            "spec": {"containers": [{"name": "c", "image": "busybox",
                     "resources": {"limits": {"cpu": "1"}}, "ports": [{"containerPort": 80}]}],
                     "nodeSelector": {"k": "v"}},
            "status": {"phase": "Pending"}
        });
        let pods = find("", "v1", "pods").unwrap();
        assert!(!(pods.skips)(&known).unwrap());
        // Unknown members at the top, in metadata, in a list item, null or not: all seen.
        for (pointer, value) in [
            ("/bogus", json!(1)),
            ("/metadata/bogus", json!("x")),
            ("/spec/containers/0/bogus", json!({"a": 1})),
            ("/spec/nope", Value::Null),
        ] {
            let mut obj = known.clone();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            obj.pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .unwrap()
                .insert(key.to_owned(), value.clone());
            assert!((pods.skips)(&obj).unwrap(), "{pointer}");
            // A skipped null is not reported; anything else is.
            let warnings = check_schema(pods, &mut obj, FieldValidation::Warn).unwrap();
            assert_eq!(warnings.is_empty(), value.is_null(), "{pointer}");
        }
        // Type errors are still errors.
        let mut bad = known.clone();
        bad["spec"]["containers"] = json!("no");
        assert!(check_schema(pods, &mut bad, FieldValidation::Ignore).is_err());
        // Every served type decodes its minimal object without skipping anything (types
        // without `apiVersion`/`kind` fields included), and sees an undeclared member.
        for r in crate::resources::RESOURCES {
            let mut minimal = json!({
                "apiVersion": r.api_version(), "kind": r.kind, "metadata": {"name": "x"}
            });
            assert!(!(r.skips)(&minimal).unwrap(), "{}", r.kind);
            minimal["bogus"] = json!(1);
            assert!((r.skips)(&minimal).unwrap(), "{}", r.kind);
        }
    }

    #[test]
    fn generation_tracks_spec_changes_only() {
        let deploys = find("apps", "v1", "deployments").unwrap();
        let old = json!({"metadata": {"name": "d", "uid": "u", "generation": 3},
                         "spec": {"replicas": 1}, "status": {"replicas": 1}});
        let mut same = json!({"metadata": {"name": "d", "labels": {"a": "b"}},
                              "spec": {"replicas": 1}, "status": {"replicas": 9}});
        carry_over(deploys, &old, &mut same, false);
        assert_eq!(same["metadata"]["generation"], 3);
        assert_eq!(same["metadata"]["uid"], "u");
        // Status is ignored on the main resource.
        assert_eq!(same["status"]["replicas"], 1);
        let mut scaled = json!({"metadata": {"name": "d"}, "spec": {"replicas": 2}});
        carry_over(deploys, &old, &mut scaled, false);
        assert_eq!(scaled["metadata"]["generation"], 4);
        // The status subresource changes only the status.
        let mut status = json!({"spec": {"replicas": 7}, "status": {"replicas": 2}});
        carry_over(deploys, &old, &mut status, true);
        assert_eq!(
            (
                status["spec"]["replicas"].clone(),
                status["status"]["replicas"].clone()
            ),
            (json!(1), json!(2))
        );
    }
}
