//! Kubernetes protobuf request bodies, decoded into the JSON form the rest of the server
//! handles.
//!
//! `kubectl create configmap|secret|deployment|service|namespace|serviceaccount|job` (and
//! typed client-go callers creating pods) use
//! client-go's typed clients, which always send `application/vnd.kubernetes.protobuf`. No
//! maintained Rust crate decodes Kubernetes' protobuf messages into their JSON form (the
//! available bindings are experimental and very large to compile), so this module walks the
//! protobuf wire format with a table of the messages those commands produce: field number,
//! JSON name and type, as declared in Kubernetes' `generated.proto` files.
//!
//! Go's generated marshallers write non-pointer fields even when empty, so empty strings,
//! `false` and zero numbers of such fields are dropped (as JSON's `omitempty` would), while
//! pointer fields (`replicas`, `backoffLimit`, …) keep their zeros. A field the table does not
//! know is refused with a message rather than dropped silently.

use serde_json::{Map, Value, json};

use crate::status::{ApiError, ApiResult};

/// The 4-byte prefix of Kubernetes protobuf bodies.
const MAGIC: &[u8] = b"k8s\0";

/// How a field is encoded and shown.
#[derive(Clone, Copy, Debug)]
enum Ty {
    /// A string; empty is dropped.
    Str,
    /// A bool; `false` is dropped.
    Bool,
    /// A bool behind a pointer: kept when present.
    OptBool,
    /// An integer; zero is dropped.
    Int,
    /// An integer behind a pointer: kept when present.
    OptInt,
    /// A nested message.
    Msg(&'static str),
    /// `map<string, string>`.
    MapStr,
    /// `map<string, bytes>` (base64 in JSON).
    MapBytes,
    /// `map<string, Quantity>`.
    MapQuantity,
    /// `meta.v1.Time`: an RFC 3339 string; the zero time is dropped.
    Time,
    /// `intstr.IntOrString`.
    IntOrString,
    /// Read and dropped: the status clients send along on create, which the server sets.
    Ignored,
}

/// One field of a message.
#[derive(Clone, Copy, Debug)]
struct Field {
    num: u64,
    name: &'static str,
    ty: Ty,
    repeated: bool,
}

const fn f(num: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        num,
        name,
        ty,
        repeated: false,
    }
}

const fn rep(num: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        num,
        name,
        ty,
        repeated: true,
    }
}

use Ty::*;

/// The messages kubectl's generators send, by name.
static MESSAGES: &[(&str, &[Field])] = &[
    (
        "ObjectMeta",
        &[
            f(1, "name", Str),
            f(2, "generateName", Str),
            f(3, "namespace", Str),
            f(4, "selfLink", Str),
            f(5, "uid", Str),
            f(6, "resourceVersion", Str),
            f(7, "generation", Int),
            f(8, "creationTimestamp", Time),
            f(9, "deletionTimestamp", Time),
            f(10, "deletionGracePeriodSeconds", OptInt),
            f(11, "labels", MapStr),
            f(12, "annotations", MapStr),
            rep(13, "ownerReferences", Msg("OwnerReference")),
            rep(14, "finalizers", Str),
        ],
    ),
    (
        "OwnerReference",
        &[
            f(1, "kind", Str),
            f(3, "name", Str),
            f(4, "uid", Str),
            f(5, "apiVersion", Str),
            f(6, "controller", OptBool),
            f(7, "blockOwnerDeletion", OptBool),
        ],
    ),
    (
        "LabelSelector",
        &[
            f(1, "matchLabels", MapStr),
            rep(2, "matchExpressions", Msg("LabelSelectorRequirement")),
        ],
    ),
    (
        "LabelSelectorRequirement",
        &[
            f(1, "key", Str),
            f(2, "operator", Str),
            rep(3, "values", Str),
        ],
    ),
    (
        "Secret",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            f(2, "data", MapBytes),
            f(3, "type", Str),
            f(4, "stringData", MapStr),
            f(5, "immutable", OptBool),
        ],
    ),
    (
        "ConfigMap",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            f(2, "data", MapStr),
            f(3, "binaryData", MapBytes),
            f(4, "immutable", OptBool),
        ],
    ),
    (
        "Namespace",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            f(2, "spec", Msg("NamespaceSpec")),
            f(3, "status", Ignored),
        ],
    ),
    ("NamespaceSpec", &[rep(1, "finalizers", Str)]),
    (
        "ServiceAccount",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            rep(2, "secrets", Msg("ObjectReference")),
            rep(3, "imagePullSecrets", Msg("LocalObjectReference")),
            f(4, "automountServiceAccountToken", OptBool),
        ],
    ),
    (
        "ObjectReference",
        &[
            f(1, "kind", Str),
            f(2, "namespace", Str),
            f(3, "name", Str),
            f(4, "uid", Str),
            f(5, "apiVersion", Str),
            f(6, "resourceVersion", Str),
            f(7, "fieldPath", Str),
        ],
    ),
    ("LocalObjectReference", &[f(1, "name", Str)]),
    (
        "Deployment",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            f(2, "spec", Msg("DeploymentSpec")),
            f(3, "status", Ignored),
        ],
    ),
    (
        "DeploymentSpec",
        &[
            f(1, "replicas", OptInt),
            f(2, "selector", Msg("LabelSelector")),
            f(3, "template", Msg("PodTemplateSpec")),
            f(4, "strategy", Msg("DeploymentStrategy")),
            f(5, "minReadySeconds", Int),
            f(6, "revisionHistoryLimit", OptInt),
            f(7, "paused", Bool),
            f(9, "progressDeadlineSeconds", OptInt),
        ],
    ),
    (
        "DeploymentStrategy",
        &[
            f(1, "type", Str),
            f(2, "rollingUpdate", Msg("RollingUpdateDeployment")),
        ],
    ),
    (
        "RollingUpdateDeployment",
        &[
            f(1, "maxUnavailable", IntOrString),
            f(2, "maxSurge", IntOrString),
        ],
    ),
    (
        "Job",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            f(2, "spec", Msg("JobSpec")),
            f(3, "status", Ignored),
        ],
    ),
    (
        "JobSpec",
        &[
            f(1, "parallelism", OptInt),
            f(2, "completions", OptInt),
            f(3, "activeDeadlineSeconds", OptInt),
            f(4, "selector", Msg("LabelSelector")),
            f(5, "manualSelector", OptBool),
            f(6, "template", Msg("PodTemplateSpec")),
            f(7, "backoffLimit", OptInt),
            f(8, "ttlSecondsAfterFinished", OptInt),
            f(9, "completionMode", Str),
            f(10, "suspend", OptBool),
        ],
    ),
    (
        "Pod",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            f(2, "spec", Msg("PodSpec")),
            f(3, "status", Ignored),
        ],
    ),
    (
        "PodTemplateSpec",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            f(2, "spec", Msg("PodSpec")),
        ],
    ),
    (
        "PodSpec",
        &[
            rep(2, "containers", Msg("Container")),
            f(3, "restartPolicy", Str),
            f(4, "terminationGracePeriodSeconds", OptInt),
            f(5, "activeDeadlineSeconds", OptInt),
            f(6, "dnsPolicy", Str),
            f(7, "nodeSelector", MapStr),
            f(8, "serviceAccountName", Str),
            f(9, "serviceAccount", Str),
            f(10, "nodeName", Str),
            f(11, "hostNetwork", Bool),
            f(12, "hostPID", Bool),
            f(13, "hostIPC", Bool),
            rep(15, "imagePullSecrets", Msg("LocalObjectReference")),
            f(16, "hostname", Str),
            f(17, "subdomain", Str),
            f(19, "schedulerName", Str),
            rep(20, "initContainers", Msg("Container")),
            f(21, "automountServiceAccountToken", OptBool),
            f(24, "priorityClassName", Str),
            f(30, "enableServiceLinks", OptBool),
        ],
    ),
    (
        "Container",
        &[
            f(1, "name", Str),
            f(2, "image", Str),
            rep(3, "command", Str),
            rep(4, "args", Str),
            f(5, "workingDir", Str),
            rep(6, "ports", Msg("ContainerPort")),
            rep(7, "env", Msg("EnvVar")),
            f(8, "resources", Msg("ResourceRequirements")),
            f(13, "terminationMessagePath", Str),
            f(14, "imagePullPolicy", Str),
            f(16, "stdin", Bool),
            f(17, "stdinOnce", Bool),
            f(18, "tty", Bool),
            f(20, "terminationMessagePolicy", Str),
        ],
    ),
    (
        "ContainerPort",
        &[
            f(1, "name", Str),
            f(2, "hostPort", Int),
            f(3, "containerPort", Int),
            f(4, "protocol", Str),
            f(5, "hostIP", Str),
        ],
    ),
    ("EnvVar", &[f(1, "name", Str), f(2, "value", Str)]),
    (
        "ResourceRequirements",
        &[f(1, "limits", MapQuantity), f(2, "requests", MapQuantity)],
    ),
    (
        "Service",
        &[
            f(1, "metadata", Msg("ObjectMeta")),
            f(2, "spec", Msg("ServiceSpec")),
            f(3, "status", Ignored),
        ],
    ),
    (
        "ServiceSpec",
        &[
            rep(1, "ports", Msg("ServicePort")),
            f(2, "selector", MapStr),
            f(3, "clusterIP", Str),
            f(4, "type", Str),
            rep(5, "externalIPs", Str),
            f(7, "sessionAffinity", Str),
            f(8, "loadBalancerIP", Str),
            f(10, "externalName", Str),
            f(11, "externalTrafficPolicy", Str),
            f(12, "healthCheckNodePort", Int),
            f(13, "publishNotReadyAddresses", Bool),
            f(17, "ipFamilyPolicy", Str),
            rep(18, "clusterIPs", Str),
            rep(19, "ipFamilies", Str),
            f(22, "internalTrafficPolicy", Str),
        ],
    ),
    (
        "ServicePort",
        &[
            f(1, "name", Str),
            f(2, "protocol", Str),
            f(3, "port", Int),
            f(4, "targetPort", IntOrString),
            f(5, "nodePort", Int),
            f(6, "appProtocol", Str),
        ],
    ),
];

fn fields_of(message: &str) -> &'static [Field] {
    MESSAGES
        .iter()
        .find(|(n, _)| *n == message)
        .map_or(&[], |(_, f)| f)
}

/// Kinds whose protobuf form can be decoded.
fn supported(kind: &str) -> bool {
    matches!(
        kind,
        "Secret"
            | "ConfigMap"
            | "Namespace"
            | "ServiceAccount"
            | "Deployment"
            | "Job"
            | "Pod"
            | "Service"
    )
}

/// A protobuf wire-format reader.
struct Reader<'a> {
    buf: &'a [u8],
}

/// Protobuf wire types used here.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    /// The next field number and its value.
    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Wire::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
                if len > self.buf.len() {
                    return Err("truncated field".into());
                }
                let (bytes, rest) = self.buf.split_at(len);
                self.buf = rest;
                Wire::Bytes(bytes)
            }
            other => return Err(format!("field {num} has unsupported wire type {other}")),
        };
        Ok(Some((num, value)))
    }
}

fn as_str(bytes: &[u8], what: &str) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

/// A `map<string, V>` entry: key (1) and value (2).
fn map_entry(bytes: &[u8]) -> Result<(String, &[u8]), String> {
    let mut r = Reader { buf: bytes };
    let (mut key, mut value) = (String::new(), &[][..]);
    while let Some((num, w)) = r.next()? {
        match (num, w) {
            (1, Wire::Bytes(b)) => key = as_str(b, "a map key")?,
            (2, Wire::Bytes(b)) => value = b,
            _ => return Err("malformed map entry".into()),
        }
    }
    Ok((key, value))
}

fn decode_time(bytes: &[u8]) -> Result<Option<Value>, String> {
    let mut r = Reader { buf: bytes };
    let mut seconds = 0i64;
    while let Some((num, w)) = r.next()? {
        if let (1, Wire::Varint(v)) = (num, w) {
            seconds = v as i64;
        }
    }
    if seconds == 0 {
        return Ok(None);
    }
    let t = jiff::Timestamp::from_second(seconds).map_err(|e| format!("bad time: {e}"))?;
    Ok(Some(json!(t.to_string())))
}

fn decode_int_or_string(bytes: &[u8]) -> Result<Value, String> {
    let mut r = Reader { buf: bytes };
    let (mut kind, mut int, mut text) = (0u64, 0i64, String::new());
    while let Some((num, w)) = r.next()? {
        match (num, w) {
            (1, Wire::Varint(v)) => kind = v,
            (2, Wire::Varint(v)) => int = i64::from(v as i32),
            (3, Wire::Bytes(b)) => text = as_str(b, "an IntOrString")?,
            _ => return Err("malformed IntOrString".into()),
        }
    }
    Ok(if kind == 1 { json!(text) } else { json!(int) })
}

fn decode_quantity(bytes: &[u8]) -> Result<Value, String> {
    let mut r = Reader { buf: bytes };
    let mut text = String::new();
    while let Some((num, w)) = r.next()? {
        if let (1, Wire::Bytes(b)) = (num, w) {
            text = as_str(b, "a quantity")?;
        }
    }
    Ok(json!(text))
}

/// Decodes one value of `field`; `None` when it is an omitted empty value.
fn decode_value(field: &Field, wire: Wire<'_>, depth: usize) -> Result<Option<Value>, String> {
    let bad = || format!("field {} has the wrong wire type", field.name);
    Ok(match (field.ty, wire) {
        (Str, Wire::Bytes(b)) => Some(json!(as_str(b, field.name)?)).filter(|v| v != ""),
        (Bool, Wire::Varint(v)) => (v != 0).then_some(json!(true)),
        (OptBool, Wire::Varint(v)) => Some(json!(v != 0)),
        // Varints of negative int32/int64 values are their two's complement as u64.
        (Int, Wire::Varint(v)) => (v != 0).then_some(json!(v as i64)),
        (OptInt, Wire::Varint(v)) => Some(json!(v as i64)),
        (Msg(name), Wire::Bytes(b)) => {
            let v = decode_message(name, b, depth + 1)?;
            Some(v).filter(|v| v.as_object().is_none_or(|o| !o.is_empty()))
        }
        (Time, Wire::Bytes(b)) => decode_time(b)?,
        (IntOrString, Wire::Bytes(b)) => Some(decode_int_or_string(b)?),
        (Ignored, _) => None,
        _ => return Err(bad()),
    })
}

fn decode_message(name: &str, bytes: &[u8], depth: usize) -> Result<Value, String> {
    if depth > 32 {
        return Err("messages nested too deeply".into());
    }
    let fields = fields_of(name);
    let mut out = Map::new();
    let mut r = Reader { buf: bytes };
    while let Some((num, wire)) = r.next()? {
        let field = fields.iter().find(|f| f.num == num).ok_or_else(|| {
            format!(
                "field number {num} of {name} is not supported in protobuf requests by this \
                 server; send the object as JSON (e.g. kubectl apply -f)"
            )
        })?;
        match (field.ty, wire) {
            (MapStr | MapBytes | MapQuantity, Wire::Bytes(b)) => {
                let (k, v) = map_entry(b)?;
                let value = match field.ty {
                    MapStr => json!(as_str(v, field.name)?),
                    MapBytes => {
                        use base64::Engine as _;
                        json!(base64::engine::general_purpose::STANDARD.encode(v))
                    }
                    _ => decode_quantity(v)?,
                };
                if let Some(m) = out
                    .entry(field.name)
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                {
                    m.insert(k, value);
                }
            }
            (_, wire) if field.repeated => {
                // Repeated fields keep their empty items (an empty string in `args`).
                let item = match (field.ty, wire) {
                    (Str, Wire::Bytes(b)) => json!(as_str(b, field.name)?),
                    (Msg(m), Wire::Bytes(b)) => decode_message(m, b, depth + 1)?,
                    _ => return Err(format!("field {} has the wrong wire type", field.name)),
                };
                if let Some(a) = out
                    .entry(field.name)
                    .or_insert_with(|| Value::Array(Vec::new()))
                    .as_array_mut()
                {
                    a.push(item);
                }
            }
            (_, wire) => {
                if let Some(v) = decode_value(field, wire, depth)? {
                    out.insert(field.name.to_owned(), v);
                }
            }
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body for an object of `kind` into its JSON form.
///
/// # Errors
/// 415 for kinds this server cannot take as protobuf; 400 for malformed bodies and
/// fields it does not know.
pub fn decode(body: &[u8], kind: &str) -> ApiResult<Value> {
    if !supported(kind) {
        return Err(ApiError::unsupported_media_type(&format!(
            "application/vnd.kubernetes.protobuf (for {kind}; send JSON)"
        )));
    }
    let bad = |m: String| ApiError::bad_request(format!("invalid protobuf body: {m}"));
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing the k8s protobuf prefix".into()))?;
    let mut r = Reader { buf: envelope };
    let (mut api_version, mut sent_kind, mut raw) = (String::new(), String::new(), None);
    while let Some((num, wire)) = r.next().map_err(bad)? {
        match (num, wire) {
            (1, Wire::Bytes(b)) => {
                let mut tm = Reader { buf: b };
                while let Some((n, w)) = tm.next().map_err(bad)? {
                    match (n, w) {
                        (1, Wire::Bytes(v)) => {
                            api_version = as_str(v, "apiVersion").map_err(bad)?
                        }
                        (2, Wire::Bytes(v)) => sent_kind = as_str(v, "kind").map_err(bad)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = Some(b),
            // contentEncoding (3) and contentType (4) are empty for plain protobuf.
            (3 | 4, _) => {}
            (n, _) => return Err(bad(format!("unexpected envelope field {n}"))),
        }
    }
    if !sent_kind.is_empty() && sent_kind != kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({sent_kind}) does not match the expected kind ({kind})"
        )));
    }
    let raw = raw.ok_or_else(|| bad("the envelope carries no object".into()))?;
    let mut obj = decode_message(kind, raw, 0).map_err(bad)?;
    if let Some(o) = obj.as_object_mut() {
        if !api_version.is_empty() {
            o.insert("apiVersion".into(), json!(api_version));
        }
        o.insert("kind".into(), json!(kind));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protobuf writer for building test bodies.
    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn varint(&mut self, mut v: u64) -> &mut Self {
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    self.0.push(b);
                    return self;
                }
                self.0.push(b | 0x80);
            }
        }
        fn int(&mut self, num: u64, v: u64) -> &mut Self {
            self.varint(num << 3).varint(v)
        }
        fn bytes(&mut self, num: u64, b: &[u8]) -> &mut Self {
            self.varint((num << 3) | 2).varint(b.len() as u64);
            self.0.extend_from_slice(b);
            self
        }
        fn str(&mut self, num: u64, s: &str) -> &mut Self {
            self.bytes(num, s.as_bytes())
        }
        fn entry(&mut self, num: u64, k: &str, v: &[u8]) -> &mut Self {
            let mut e = W::default();
            e.str(1, k).bytes(2, v);
            self.bytes(num, &e.0)
        }
        fn done(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.0)
        }
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let tm = W::default().str(1, api_version).str(2, kind).done();
        let mut body = MAGIC.to_vec();
        body.extend(
            W::default()
                .bytes(1, &tm)
                .bytes(2, raw)
                .str(3, "")
                .str(4, "")
                .done(),
        );
        body
    }

    #[test]
    fn secrets_decode_with_data_and_empty_fields_dropped() {
        let zero_time = W::default().done();
        let meta = W::default()
            .str(1, "db")
            .str(2, "")
            .str(3, "")
            .bytes(8, &zero_time)
            .entry(11, "app", b"web")
            .done();
        let raw = W::default()
            .bytes(1, &meta)
            .entry(2, "password", b"s3cret")
            .str(3, "Opaque")
            .done();
        let obj = decode(&envelope("v1", "Secret", &raw), "Secret").unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "db", "labels": {"app": "web"}},
                   "data": {"password": "czNjcmV0"}, "type": "Opaque"})
        );
    }

    #[test]
    fn deployments_keep_pointer_zeros_and_int_or_strings() {
        let container = W::default()
            .str(1, "web")
            .str(2, "busybox")
            .bytes(8, &[])
            .int(16, 0)
            .done();
        let pod_spec = W::default().bytes(2, &container).done();
        let template = W::default().bytes(2, &pod_spec).done();
        let surge = W::default().int(1, 1).str(3, "25%").done();
        let rolling = W::default().bytes(2, &surge).done();
        let strategy = W::default()
            .str(1, "RollingUpdate")
            .bytes(2, &rolling)
            .done();
        let spec = W::default()
            .int(1, 0)
            .bytes(3, &template)
            .bytes(4, &strategy)
            .int(5, 0)
            .done();
        let raw = W::default()
            .bytes(1, &W::default().str(1, "web").done())
            .bytes(2, &spec)
            .bytes(3, &[])
            .done();
        let obj = decode(&envelope("apps/v1", "Deployment", &raw), "Deployment").unwrap();
        assert_eq!(obj["spec"]["replicas"], 0);
        assert!(obj["spec"].get("minReadySeconds").is_none());
        assert_eq!(obj["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(
            obj["spec"]["template"]["spec"]["containers"],
            json!([{"name": "web", "image": "busybox"}])
        );
        assert!(obj.get("status").is_none());
    }

    #[test]
    fn unknown_fields_bad_bodies_and_kinds_are_refused() {
        let raw = W::default().str(99, "x").done();
        let err = decode(&envelope("v1", "ConfigMap", &raw), "ConfigMap").unwrap_err();
        assert!(
            err.message.contains("field number 99 of ConfigMap"),
            "{}",
            err.message
        );
        assert_eq!(decode(b"k8s\0\x0a\xff", "ConfigMap").unwrap_err().code, 400);
        assert_eq!(decode(b"nope", "ConfigMap").unwrap_err().code, 400);
        assert_eq!(
            decode(&envelope("v1", "Node", &[]), "Node")
                .unwrap_err()
                .code,
            415
        );
        assert!(
            decode(&envelope("v1", "Secret", &[]), "ConfigMap")
                .unwrap_err()
                .message
                .contains("does not match")
        );
    }
}
