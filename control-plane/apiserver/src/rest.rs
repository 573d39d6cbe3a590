//! Create, read, update, patch and delete of objects, on top of the store.

use std::sync::Arc;

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    Api,
    managed::{self, Scope},
    object::{self, FieldValidation},
    patch::{self, PatchType},
    pods, proto_json, raw,
    request::{Query, Target},
    selectors::{FieldSelector, LabelSelector, extra_fields},
    services,
    status::{ApiError, ApiResult, Cause},
    storage::{Continue, Revision, Storage, StorageError, Versioned},
    table::{self, IncludeObject},
    watch,
};

/// How many times a patch is retried when the object changed underneath it.
const PATCH_RETRIES: usize = 5;

/// A successful response: a JSON body, its status code, and warnings for the client.
pub struct Reply {
    pub(crate) code: StatusCode,
    pub(crate) body: ReplyBody,
    pub(crate) warnings: Vec<String>,
}

/// A reply's JSON body: an object to serialize, or text already written (a stored object
/// rendered from its stored bytes).
pub(crate) enum ReplyBody {
    Object(Value),
    Text(Vec<u8>),
}

impl From<Value> for ReplyBody {
    fn from(v: Value) -> Self {
        ReplyBody::Object(v)
    }
}

impl Reply {
    pub(crate) fn ok(body: Value) -> Self {
        Reply {
            code: StatusCode::OK,
            body: body.into(),
            warnings: Vec::new(),
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut resp = match self.body {
            ReplyBody::Object(v) => (self.code, axum::Json(v)).into_response(),
            ReplyBody::Text(text) => (
                self.code,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                text,
            )
                .into_response(),
        };
        for w in self.warnings {
            // `299 - "text"` as Kubernetes sends warnings; quotes in the text are escaped.
            let text = format!("299 - \"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
            if let Ok(v) = HeaderValue::from_str(&text) {
                resp.headers_mut().append(header::WARNING, v);
            }
        }
        resp
    }
}

/// Everything a handler needs from the request.
pub struct Request {
    /// The addressed object or collection.
    pub target: Target,
    /// The method.
    pub method: Method,
    /// Query parameters.
    pub query: Query,
    /// Headers.
    pub headers: HeaderMap,
    /// The body (already size-limited).
    pub body: bytes::Bytes,
}

impl Request {
    pub(crate) fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Serves one resource request.
pub async fn serve(api: Arc<Api>, req: Request) -> Response {
    let result = match (
        &req.method,
        req.target.name.is_some(),
        req.target.sub.as_deref(),
    ) {
        (&Method::GET, false, None) if req.query.flag("watch") => {
            return watch::serve(api, req).await;
        }
        (&Method::GET, false, None) => {
            return list(&api, &req).await.unwrap_or_else(|e| e.into_response());
        }
        (&Method::POST, false, None) => create(&api, &req).await,
        (&Method::DELETE, false, None) => delete_collection(&api, &req).await,
        (&Method::GET, true, None | Some("status")) => get(&api, &req).await,
        (&Method::GET, true, Some("approval")) if is_csr(req.target.resource) => {
            get(&api, &req).await
        }
        (&Method::PUT, true, Some("approval")) if is_csr(req.target.resource) => {
            update(&api, &req, true).await
        }
        (&Method::PATCH, true, Some("approval")) if is_csr(req.target.resource) => {
            patch(&api, &req, true).await
        }
        (&Method::PUT, true, None) => update(&api, &req, false).await,
        (&Method::PUT, true, Some("status")) => update(&api, &req, true).await,
        (&Method::PATCH, true, None) => patch(&api, &req, false).await,
        (&Method::PATCH, true, Some("status")) => patch(&api, &req, true).await,
        (&Method::DELETE, true, None) => delete(&api, &req).await,
        (_, true, Some("scale")) if req.target.resource.has_scale => scale(&api, &req).await,
        (&Method::POST, true, Some("binding")) if is_pod(req.target.resource) => {
            pods::bind(&api, &req).await
        }
        (&Method::POST, true, Some("eviction")) if is_pod(req.target.resource) => {
            pods::evict(&api, &req).await
        }
        (&Method::GET, true, Some("log")) if is_pod(req.target.resource) => {
            return pods::log(&api, &req).await;
        }
        (_, _, Some(sub)) if !known_sub(&req.target, sub) => Err(ApiError::no_route(&format!(
            "{}/{sub}",
            req.target.resource.plural
        ))),
        _ => Err(ApiError::method_not_allowed()),
    };
    match result {
        Ok(reply) => reply.into_response(),
        Err(e) => e.into_response(),
    }
}

fn known_sub(t: &Target, sub: &str) -> bool {
    match sub {
        "status" => t.resource.has_status,
        "scale" => t.resource.has_scale,
        "binding" | "eviction" | "log" => is_pod(t.resource),
        "approval" => is_csr(t.resource),
        _ => false,
    }
}

/// Parses a JSON request body into an object.
pub(crate) fn parse_body(req: &Request) -> ApiResult<Value> {
    let ct = req
        .header(header::CONTENT_TYPE)
        .unwrap_or("application/json");
    let base = ct.split(';').next().unwrap_or("").trim();
    if base == "application/vnd.kubernetes.protobuf" {
        return proto_json::decode(&req.body, req.target.resource.kind);
    }
    if !matches!(base, "application/json" | "" | "*/*") {
        return Err(ApiError::unsupported_media_type(ct));
    }
    let v: Value = serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(v)
}

/// Checks the type fields of a submitted object against the addressed resource.
fn check_type(t: &Target, obj: &mut Value) -> ApiResult<()> {
    let r = t.resource;
    match obj.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != r.api_version() => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                r.api_version()
            )));
        }
        _ => obj["apiVersion"] = json!(r.api_version()),
    }
    match obj.get("kind").and_then(Value::as_str) {
        Some(k) if k != r.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                r.kind
            )));
        }
        _ => obj["kind"] = json!(r.kind),
    }
    if let (Some(url_ns), Some(body_ns)) =
        (t.namespace.as_deref(), object::meta_str(obj, "namespace"))
        && url_ns != body_ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

/// Validation shared by create and update: name, required fields, the type's schema.
fn validate(t: &Target, obj: &mut Value, validation: FieldValidation) -> ApiResult<Vec<String>> {
    let r = t.resource;
    let name = object::meta_str(obj, "name").unwrap_or_default().to_owned();
    let mut causes = Vec::new();
    if name.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            message: "name or generateName is required".into(),
            field: "metadata.name".into(),
        });
    } else if let Some(msg) = object::validate_name(r.names, &name) {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: \"{name}\": {msg}"),
            field: "metadata.name".into(),
        });
    }
    let warnings = object::check_schema(r, obj, validation)?;
    causes.extend(object::validate_required(r, obj));
    if !causes.is_empty() {
        return Err(ApiError::invalid(r, &name, causes));
    }
    Ok(warnings)
}

async fn ensure_namespace(api: &Api, t: &Target) -> ApiResult<()> {
    let Some(ns) = t.namespace.as_deref() else {
        return Ok(());
    };
    let namespaces = crate::resources::find("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("namespaces are not served"))?;
    // This member's copy answers almost always; only a miss (perhaps a namespace created a
    // moment ago through another member) is worth a linearizable read.
    let key = namespaces.key(None, ns);
    let local = api
        .store
        .get_local(&key)
        .await
        .map_err(|e| ApiError::from_storage(e, namespaces, ns))?;
    let existing = match local {
        Some(v) => v,
        None => api
            .store
            .get(&key)
            .await
            .map_err(|e| ApiError::from_storage(e, namespaces, ns))?
            .ok_or_else(|| ApiError::not_found(namespaces, ns))?,
    };
    // Every create asks: look at the one field without decoding the whole namespace.
    let terminating = match crate::raw::has_meta_field(&existing, "deletionTimestamp") {
        Some(t) => t,
        None => object::decode(namespaces, &existing)?
            .pointer("/metadata/deletionTimestamp")
            .is_some(),
    };
    if terminating {
        return Err(ApiError::forbidden(format!(
            "unable to create new content in namespace {ns} because it is being terminated"
        )));
    }
    Ok(())
}

const GENERATE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn generated_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4();
    let suffix: String = id.as_bytes()[..5]
        .iter()
        .map(|b| char::from(GENERATE_ALPHABET[usize::from(*b) % GENERATE_ALPHABET.len()]))
        .collect();
    format!("{prefix}{suffix}")
}

async fn create(api: &Api, req: &Request) -> ApiResult<Reply> {
    let t = &req.target;
    let mut obj = parse_body(req)?;
    check_type(t, &mut obj)?;
    if object::meta_str(&obj, "name").is_none_or(str::is_empty)
        && let Some(prefix) = object::meta_str(&obj, "generateName").map(str::to_owned)
    {
        object::metadata_mut(&mut obj).insert("name".into(), json!(generated_name(&prefix)));
    }
    let manager = manager(req)?;
    managed::track_update(None, &mut obj, &manager, main_scope(t));
    create_object(api, req, obj).await
}

/// Validates, defaults and stores a new object.
async fn create_object(api: &Api, req: &Request, mut obj: Value) -> ApiResult<Reply> {
    let t = &req.target;
    let r = t.resource;
    let validation = FieldValidation::parse(req.query.get("fieldValidation"))?;
    let warnings = validate(t, &mut obj, validation)?;
    ensure_namespace(api, t).await?;
    object::init_new(&mut obj, t.namespace.as_deref());
    object::apply_defaults(r, &mut obj);
    let name = object::meta_str(&obj, "name")
        .unwrap_or_default()
        .to_owned();
    let key = r.key(t.namespace.as_deref(), &name);
    let dry_run = req.query.dry_run()?;
    // The store's create refuses an existing key by itself; look first only where nothing
    // will be written (dry run) or something is allocated before the write (Services).
    if (dry_run || is_service(r))
        && api
            .store
            .get(&key)
            .await
            .map_err(|e| ApiError::from_storage(e, r, &name))?
            .is_some()
    {
        return Err(ApiError::already_exists(r, &name));
    }
    let allocated = if is_service(r) {
        Some(services::allocate(api, r, &mut obj, dry_run).await?)
    } else {
        None
    };
    let body = if dry_run {
        obj.into()
    } else {
        let text = object::encode(&obj)?;
        match api.store.create(&key, text.clone()).await {
            // What was stored is `obj` as encoded: answer with that text (as a watch renders
            // it) instead of parsing it back or serializing `obj` again.
            Ok(stored) => ReplyBody::Text(render(
                r,
                &Versioned {
                    value: text,
                    ..stored
                },
            )?),
            Err(e) => {
                if let Some(a) = allocated {
                    a.release(api).await;
                }
                return Err(ApiError::from_storage(e, r, &name));
            }
        }
    };
    Ok(Reply {
        code: StatusCode::CREATED,
        body,
        warnings,
    })
}

/// The current object, decoded, with its revision.
pub(crate) async fn current(api: &Api, t: &Target) -> ApiResult<(Value, Revision)> {
    let v = stored(api, t).await?;
    Ok((object::decode(t.resource, &v)?, v.mod_revision))
}

/// The current object as stored.
pub(crate) async fn stored(api: &Api, t: &Target) -> ApiResult<Versioned> {
    api.store
        .get(&t.key())
        .await
        .map_err(|e| ApiError::from_storage(e, t.resource, t.name()))?
        .ok_or_else(|| ApiError::not_found(t.resource, t.name()))
}

/// The stored object to base a write on, from this member's copy when it has one: the
/// write's revision check refuses it if the copy was stale, and callers retry with
/// [`stored`].
pub(crate) async fn stored_for_write(api: &Api, t: &Target) -> ApiResult<Versioned> {
    match api.store.get_local(&t.key()).await {
        Ok(Some(v)) => Ok(v),
        // Not here (yet) or unreadable: ask the leader.
        _ => stored(api, t).await,
    }
}

async fn get(api: &Api, req: &Request) -> ApiResult<Reply> {
    let (obj, revision) = current(api, &req.target).await?;
    if table::wants_table(req.header(header::ACCEPT)) {
        let include = IncludeObject::parse(req.query.get("includeObject"));
        let meta = json!({"resourceVersion": revision.to_string()});
        return Ok(Reply::ok(table::table(
            req.target.resource,
            &[obj],
            meta,
            include,
        )));
    }
    Ok(Reply::ok(obj))
}

/// An opaque `continue` token: the last key returned and the list's revision.
fn continue_token(c: &Continue) -> String {
    use base64::Engine as _;
    let json = serde_json::to_vec(c).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn parse_continue(token: &str, prefix: &str) -> ApiResult<Continue> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| serde_json::from_slice::<Continue>(&b).ok())
        .filter(|c| c.key.starts_with(prefix))
        .ok_or_else(|| ApiError::bad_request("continue key is not valid"))
}

/// Lists objects matching the request's selectors, up to `limit` (0: all).
pub async fn list_objects(api: &Api, req: &Request) -> ApiResult<(Vec<Value>, Value)> {
    let r = req.target.resource;
    let labels = LabelSelector::parse(req.query.get("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(
        req.query.get("fieldSelector").unwrap_or(""),
        extra_fields(r.kind),
    )?;
    list_stored(api, req, |r, v| {
        let obj = object::decode(r, v)?;
        Ok((labels.matches(&obj) && fields.matches(&obj)).then_some(obj))
    })
    .await
}

/// Lists stored objects, each converted by `convert` (`None`: not selected), up to `limit`
/// (0: all), with the list's metadata.
async fn list_stored<T>(
    api: &Api,
    req: &Request,
    mut convert: impl FnMut(&crate::resources::Resource, &Versioned) -> ApiResult<Option<T>>,
) -> ApiResult<(Vec<T>, Value)> {
    let t = &req.target;
    let r = t.resource;
    let limit = usize::try_from(req.query.int("limit")?.unwrap_or(0).max(0)).unwrap_or(0);
    let prefix = t.prefix();
    let mut after = req
        .query
        .get("continue")
        .filter(|c| !c.is_empty())
        .map(|c| parse_continue(c, &prefix))
        .transpose()?;
    let mut items = Vec::new();
    let mut revision = after.as_ref().map(|c| c.revision);
    let mut last_key = None;
    let more = loop {
        let page = api
            .store
            .range(&prefix, after.as_ref(), limit.saturating_sub(items.len()))
            .await
            .map_err(|e| match e {
                StorageError::Compacted { .. } => ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ),
                e => ApiError::from_storage(e, r, ""),
            })?;
        let rev = *revision.get_or_insert(page.revision);
        for (key, v) in &page.items {
            if let Some(item) = convert(r, v)? {
                items.push(item);
            }
            last_key = Some(key.clone());
        }
        if !page.more || (limit != 0 && items.len() >= limit) {
            break page.more;
        }
        after = last_key.clone().map(|key| Continue { key, revision: rev });
    };
    let revision = revision.unwrap_or_default();
    let mut meta = json!({"resourceVersion": revision.to_string()});
    if more && let Some(key) = last_key {
        meta["continue"] = json!(continue_token(&Continue { key, revision }));
    }
    Ok((items, meta))
}

async fn list(api: &Api, req: &Request) -> ApiResult<Response> {
    let r = req.target.resource;
    let table = table::wants_table(req.header(header::ACCEPT));
    if !table && no_selectors(req) {
        // Every stored object is sent as it is: render the text without `Value` trees.
        let (items, meta) = list_stored(api, req, |r, v| render(r, v).map(Some)).await?;
        let body = raw::list(r, &items, &meta);
        return Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response());
    }
    let (items, meta) = list_objects(api, req).await?;
    if table::wants_table(req.header(header::ACCEPT)) {
        let include = IncludeObject::parse(req.query.get("includeObject"));
        return Ok(Reply::ok(table::table(r, &items, meta, include)).into_response());
    }
    Ok(Reply::ok(json!({
        "kind": r.list_kind(),
        "apiVersion": r.api_version(),
        "metadata": meta,
        "items": items,
    }))
    .into_response())
}

/// The encoded object as a client sees it (see [`object::decode`]).
pub(crate) fn render(r: &crate::resources::Resource, v: &Versioned) -> ApiResult<Vec<u8>> {
    match raw::render(r, v) {
        Some(text) => Ok(text),
        None => serde_json::to_vec(&object::decode(r, v)?)
            .map_err(|e| ApiError::internal(format!("encoding object: {e}"))),
    }
}

/// Whether a list or watch has neither a label nor a field selector.
pub(crate) fn no_selectors(req: &Request) -> bool {
    ["labelSelector", "fieldSelector"]
        .iter()
        .all(|s| req.query.get(s).is_none_or(str::is_empty))
}

/// The revision a write must match: the object's resourceVersion, when it carries one.
fn precondition(obj: &Value) -> ApiResult<Option<Revision>> {
    match object::meta_str(obj, "resourceVersion").filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion {v:?} is not a valid resource version"
            ))
        }),
    }
}

/// Writes `new` over the stored object (revision `expected`), finishing deletion when the
/// last finalizer of a terminating object is removed.
/// [`write`]s an update of `old`; a Service's node ports are kept, claimed and freed with it
/// ([`services::on_update`]).
async fn write_update(
    api: &Api,
    t: &Target,
    old: &Value,
    mut new: Value,
    expected: Revision,
    dry_run: bool,
) -> ApiResult<Value> {
    if !is_service(t.resource) {
        return write(api, t, new, expected, dry_run).await;
    }
    let claims = services::on_update(api, t.resource, old, &mut new, dry_run).await?;
    let written = write(api, t, new, expected, dry_run).await;
    claims.settle(api, written.is_ok()).await;
    written
}

pub(crate) async fn write(
    api: &Api,
    t: &Target,
    mut new: Value,
    expected: Revision,
    dry_run: bool,
) -> ApiResult<Value> {
    let r = t.resource;
    if dry_run {
        return Ok(new);
    }
    let encoded = object::encode(&new)?;
    // Like Kubernetes, an update that changes nothing writes nothing (and keeps the
    // resourceVersion). This member's copy is enough to tell: a value at the expected
    // revision never changes, and if the copy is older the write below decides.
    if let Ok(Some(stored)) = api.store.get_local(&t.key()).await
        && stored.mod_revision == expected
        && encoded == stored.value
    {
        return object::decode(r, &stored);
    }
    let terminating = new.pointer("/metadata/deletionTimestamp").is_some();
    let finalizers_left = new
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    // As in Kubernetes, a write finishes a deletion only once nothing holds it: no finalizers
    // and no grace period left (a pod's agent writes status while it stops the containers,
    // then deletes with grace 0).
    let grace_left = new
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .is_some_and(|g| g > 0);
    if terminating && !finalizers_left && !grace_left {
        let gone = api
            .store
            .delete(&t.key(), Some(expected))
            .await
            .map_err(|e| ApiError::from_storage(e, r, t.name()))?;
        object::metadata_mut(&mut new).insert(
            "resourceVersion".into(),
            json!(gone.mod_revision.to_string()),
        );
        return Ok(new);
    }
    let stored = api
        .store
        .update(&t.key(), encoded, Some(expected))
        .await
        .map_err(|e| ApiError::from_storage(e, r, t.name()))?;
    // What was stored is `new` as encoded: answer with it instead of parsing it back.
    new["apiVersion"] = json!(r.api_version());
    new["kind"] = json!(r.kind);
    object::metadata_mut(&mut new).insert(
        "resourceVersion".into(),
        json!(stored.mod_revision.to_string()),
    );
    Ok(new)
}

async fn update(api: &Api, req: &Request, status_only: bool) -> ApiResult<Reply> {
    let t = &req.target;
    let mut obj = parse_body(req)?;
    check_type(t, &mut obj)?;
    if object::meta_str(&obj, "name") != Some(t.name()) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({})",
            object::meta_str(&obj, "name").unwrap_or(""),
            t.name()
        )));
    }
    let validation = FieldValidation::parse(req.query.get("fieldValidation"))?;
    let warnings = validate(t, &mut obj, validation)?;
    let wanted = precondition(&obj)?;
    let (old, revision) = current(api, t).await?;
    if wanted.is_some_and(|w| w != revision) {
        return Err(ApiError::conflict(t.resource, t.name()));
    }
    object::apply_defaults(t.resource, &mut obj);
    object::carry_over(t.resource, &old, &mut obj, status_only);
    keep_certificate(t, &old, &mut obj);
    managed::track_update(Some(&old), &mut obj, &manager(req)?, scope(t, status_only));
    let written = write_update(api, t, &old, obj, revision, req.query.dry_run()?).await;
    let body = written?;
    Ok(Reply {
        code: StatusCode::OK,
        body: body.into(),
        warnings,
    })
}

async fn patch(api: &Api, req: &Request, status_only: bool) -> ApiResult<Reply> {
    let t = &req.target;
    let kind = PatchType::from_content_type(req.header(header::CONTENT_TYPE))?;
    if kind == PatchType::Apply {
        return apply_patch(api, req, status_only).await;
    }
    if req.query.get("force").is_some() {
        return Err(ApiError::bad_request(
            "force: Forbidden: may not be specified for non-apply patch",
        ));
    }
    let manager = manager(req)?;
    let validation = FieldValidation::parse(req.query.get("fieldValidation"))?;
    for _ in 0..PATCH_RETRIES {
        let (old, revision) = current(api, t).await?;
        let mut new = old.clone();
        patch::apply(kind, &mut new, &req.body)?;
        check_type(t, &mut new)?;
        if object::meta_str(&new, "name") != Some(t.name()) {
            return Err(ApiError::bad_request(
                "a patch may not change the object's name",
            ));
        }
        // A patch that names a resourceVersion must match it exactly.
        let pinned = precondition(&new)?.filter(|v| *v != revision);
        if pinned.is_some() {
            return Err(ApiError::conflict(t.resource, t.name()));
        }
        let warnings = validate(t, &mut new, validation)?;
        object::apply_defaults(t.resource, &mut new);
        object::carry_over(t.resource, &old, &mut new, status_only);
        keep_certificate(t, &old, &mut new);
        managed::track_update(Some(&old), &mut new, &manager, scope(t, status_only));
        let written = write_update(api, t, &old, new, revision, req.query.dry_run()?).await;
        match written {
            Err(e) if e.reason == "Conflict" => continue,
            result => {
                return result.map(|body| Reply {
                    code: StatusCode::OK,
                    body: body.into(),
                    warnings,
                });
            }
        }
    }
    Err(ApiError::conflict(t.resource, t.name()))
}

/// Options of a delete, from the query and an optional `DeleteOptions` body.
pub(crate) struct DeleteOptions {
    pub(crate) grace: Option<i64>,
    pub(crate) uid: Option<String>,
    pub(crate) revision: Option<Revision>,
    pub(crate) dry_run: bool,
    /// What happens to dependents; `None` when the caller did not say.
    pub(crate) propagation: Option<Propagation>,
}

/// What happens to the dependents of a deleted object (`propagationPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Propagation {
    /// The object goes now; the garbage collector deletes dependents afterwards.
    Background,
    /// The object stays (with the `foregroundDeletion` finalizer) until its dependents are
    /// gone.
    Foreground,
    /// The object stays (with the `orphan` finalizer) until the garbage collector has removed
    /// the owner references its dependents hold.
    Orphan,
}

impl Propagation {
    const FINALIZERS: [&str; 2] = ["foregroundDeletion", "orphan"];

    fn parse(v: &str) -> ApiResult<Self> {
        match v {
            "Background" => Ok(Self::Background),
            "Foreground" => Ok(Self::Foreground),
            "Orphan" => Ok(Self::Orphan),
            other => Err(ApiError::invalid_options(
                "DeleteOptions",
                Cause {
                    reason: "FieldValueNotSupported",
                    message: format!(
                        "Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""
                    ),
                    field: "propagationPolicy".into(),
                },
            )),
        }
    }

    /// The finalizer the garbage collector acts on.
    fn finalizer(self) -> Option<&'static str> {
        match self {
            Self::Background => None,
            Self::Foreground => Some("foregroundDeletion"),
            Self::Orphan => Some("orphan"),
        }
    }
}

fn main_scope(t: &Target) -> Scope {
    Scope::Main {
        has_status: t.resource.has_status,
    }
}

fn scope(t: &Target, status_only: bool) -> Scope {
    if status_only {
        Scope::Status
    } else {
        main_scope(t)
    }
}

/// The field manager of a write.
fn manager(req: &Request) -> ApiResult<String> {
    managed::manager_name(
        req.query.get("fieldManager"),
        req.header(header::USER_AGENT),
    )
}

/// The body of an apply patch: JSON (what kubectl sends) or YAML.
fn parse_apply_body(body: &[u8]) -> ApiResult<Value> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request("the apply patch is not UTF-8 text"))?;
            serde_norway::from_str(text).map_err(|e| {
                ApiError::bad_request(format!("the apply patch is neither JSON nor YAML: {e}"))
            })?
        }
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("an apply patch must be an object"));
    }
    Ok(v)
}

/// Server-side apply (`application/apply-patch+yaml`): creates the object if it does not
/// exist, otherwise merges the configuration and moves field ownership.
async fn apply_patch(api: &Api, req: &Request, status_only: bool) -> ApiResult<Reply> {
    let t = &req.target;
    let manager = req
        .query
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("fieldManager: Required value: is required for apply patch")
        })?;
    let manager = managed::manager_name(Some(manager), None)?;
    let force = req.query.flag("force");
    let mut config = parse_apply_body(&req.body)?;
    check_type(t, &mut config)?;
    match object::meta_str(&config, "name") {
        Some(n) if n == t.name() => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({})",
                other.unwrap_or(""),
                t.name()
            )));
        }
    }
    let validation = FieldValidation::parse(req.query.get("fieldValidation"))?;
    let scope = scope(t, status_only);
    for _ in 0..PATCH_RETRIES {
        let (old, revision) = match current(api, t).await {
            Ok(found) => found,
            Err(e) if e.code == StatusCode::NOT_FOUND && !status_only => {
                let obj = managed::apply(None, &config, &manager, force, scope)?;
                return create_object(api, req, obj).await;
            }
            Err(e) => return Err(e),
        };
        if precondition(&config)?.is_some_and(|v| v != revision) {
            return Err(ApiError::conflict(t.resource, t.name()));
        }
        let mut new = managed::apply(Some(&old), &config, &manager, force, scope)?;
        let owners = new.pointer("/metadata/managedFields").cloned();
        let warnings = validate(t, &mut new, validation)?;
        object::apply_defaults(t.resource, &mut new);
        object::carry_over(t.resource, &old, &mut new, status_only);
        match owners {
            Some(o) => object::metadata_mut(&mut new).insert("managedFields".into(), o),
            None => object::metadata_mut(&mut new).remove("managedFields"),
        };
        let written = write_update(api, t, &old, new, revision, req.query.dry_run()?).await;
        match written {
            Err(e) if e.reason == "Conflict" => continue,
            result => {
                return result.map(|body| Reply {
                    code: StatusCode::OK,
                    body: body.into(),
                    warnings,
                });
            }
        }
    }
    Err(ApiError::conflict(t.resource, t.name()))
}

fn delete_options(req: &Request) -> ApiResult<DeleteOptions> {
    let body: Value = if req.body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    DeleteOptions::parse(req, &body)
}

impl DeleteOptions {
    /// Options from a `DeleteOptions` object, with query parameters taking precedence.
    pub(crate) fn parse(req: &Request, body: &Value) -> ApiResult<Self> {
        let grace = match req.query.int("gracePeriodSeconds")? {
            Some(g) => Some(g),
            None => body.get("gracePeriodSeconds").and_then(Value::as_i64),
        };
        let revision = body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid precondition resourceVersion {v:?}"))
                })
            })
            .transpose()?;
        let dry_run = req.query.dry_run()?
            || body
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|d| d.iter().any(|x| x == "All"));
        let policy = req
            .query
            .get("propagationPolicy")
            .filter(|p| !p.is_empty())
            .or_else(|| body.get("propagationPolicy").and_then(Value::as_str))
            .map(Propagation::parse)
            .transpose()?;
        // The deprecated boolean, still sent by old clients.
        let orphan = match req.query.get("orphanDependents").filter(|v| !v.is_empty()) {
            Some(v) => Some(matches!(v, "1" | "true" | "True")),
            None => body.get("orphanDependents").and_then(Value::as_bool),
        };
        let propagation = match (policy, orphan) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_options(
                    "DeleteOptions",
                    Cause {
                        reason: "FieldValueInvalid",
                        message: "Invalid value: \"null\": orphanDependents and propagationPolicy cannot be both set".into(),
                        field: "propagationPolicy".into(),
                    },
                ));
            }
            (Some(p), None) => Some(p),
            (None, Some(true)) => Some(Propagation::Orphan),
            (None, Some(false)) => Some(Propagation::Background),
            (None, None) => None,
        };
        Ok(DeleteOptions {
            propagation,
            grace,
            uid: body
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                .map(str::to_owned),
            revision,
            dry_run,
        })
    }
}

async fn delete(api: &Api, req: &Request) -> ApiResult<Reply> {
    let opts = delete_options(req)?;
    delete_one(api, &req.target, &opts).await.map(Reply::ok)
}

/// Deletes one object. Without preconditions a write that raced with another (e.g. an agent
/// updating a pod's status) is retried on the new state, as Kubernetes does.
pub(crate) async fn delete_one(api: &Api, t: &Target, opts: &DeleteOptions) -> ApiResult<Value> {
    let preconditions = opts.uid.is_some() || opts.revision.is_some();
    for _ in 0..PATCH_RETRIES {
        match delete_attempt(api, t, opts).await {
            Err(e) if e.reason == "Conflict" && !preconditions => continue,
            result => return result,
        }
    }
    Err(ApiError::conflict(t.resource, t.name()))
}

async fn delete_attempt(api: &Api, t: &Target, opts: &DeleteOptions) -> ApiResult<Value> {
    let r = t.resource;
    let (mut obj, revision) = current(api, t).await?;
    if opts
        .uid
        .as_deref()
        .is_some_and(|u| Some(u) != object::meta_str(&obj, "uid"))
        || opts.revision.is_some_and(|v| v != revision)
    {
        return Err(ApiError::conflict(r, t.name()));
    }
    // A pod on a node is stopped by its agent first: mark it and let the agent finish.
    let grace = opts.grace.or_else(|| {
        obj.pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
    });
    let graceful_pod = r.kind == "Pod"
        && r.group.is_empty()
        && obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
        && grace.is_some_and(|g| g > 0)
        && !matches!(
            obj.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
    let namespace = r.kind == "Namespace" && r.group.is_empty();
    // Foreground and orphan deletion hand the object to the garbage collector through a
    // finalizer. An object nothing depends on has nothing to wait for, so it goes at once
    // (Kubernetes adds the finalizer and its collector removes it straight away).
    let propagation = match opts.propagation {
        Some(Propagation::Foreground | Propagation::Orphan)
            if !namespace && !has_dependents(api, &obj).await? =>
        {
            Some(Propagation::Background)
        }
        p => p,
    };
    let wanted = propagation.and_then(Propagation::finalizer);
    let terminating = obj.pointer("/metadata/deletionTimestamp").is_some();
    // A policy given on the first delete sets the propagation finalizers; none given leaves
    // the object's own finalizers as they are.
    if !terminating && !namespace && propagation.is_some() {
        set_propagation(&mut obj, wanted);
    }
    let has_finalizers = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if has_finalizers || graceful_pod || namespace {
        if terminating {
            // A second delete may switch to foreground or orphan deletion, as in Kubernetes.
            if wanted.is_none() || !set_propagation(&mut obj, wanted) || opts.dry_run {
                return Ok(obj);
            }
            let stored = api
                .store
                .update(&t.key(), object::encode(&obj)?, Some(revision))
                .await
                .map_err(|e| ApiError::from_storage(e, r, t.name()))?;
            return object::decode(r, &stored);
        }
        let meta = object::metadata_mut(&mut obj);
        meta.insert("deletionTimestamp".into(), json!(object::now_rfc3339()));
        meta.insert(
            "deletionGracePeriodSeconds".into(),
            json!(if graceful_pod { grace.unwrap_or(0) } else { 0 }),
        );
        if namespace {
            obj["status"]["phase"] = json!("Terminating");
        }
        if opts.dry_run {
            return Ok(obj);
        }
        let stored = api
            .store
            .update(&t.key(), object::encode(&obj)?, Some(revision))
            .await
            .map_err(|e| ApiError::from_storage(e, r, t.name()))?;
        if namespace {
            tokio::spawn(finish_namespace(
                Arc::clone(&api.store),
                t.name().to_owned(),
            ));
        }
        return object::decode(r, &stored);
    }
    if opts.dry_run {
        return Ok(obj);
    }
    let gone = api
        .store
        .delete(&t.key(), Some(revision))
        .await
        .map_err(|e| ApiError::from_storage(e, r, t.name()))?;
    if is_service(r) {
        services::release(api.store.as_ref(), &obj).await;
    }
    object::metadata_mut(&mut obj).insert(
        "resourceVersion".into(),
        json!(gone.mod_revision.to_string()),
    );
    Ok(obj)
}

/// Sets the propagation finalizer of `obj` to `wanted` (removing the other one); whether that
/// changed anything.
fn set_propagation(obj: &mut Value, wanted: Option<&str>) -> bool {
    let mut finalizers: Vec<Value> = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let before = finalizers.clone();
    finalizers.retain(|f| {
        f.as_str()
            .is_none_or(|f| !Propagation::FINALIZERS.contains(&f) || Some(f) == wanted)
    });
    if let Some(w) = wanted
        && !finalizers.iter().any(|f| f == w)
    {
        finalizers.push(json!(w));
    }
    if finalizers == before {
        return false;
    }
    let meta = object::metadata_mut(obj);
    if finalizers.is_empty() {
        meta.remove("finalizers");
    } else {
        meta.insert("finalizers".into(), Value::Array(finalizers));
    }
    true
}

/// Whether any stored object names `owner` in its ownerReferences. Dependents live in the
/// owner's namespace, or anywhere for a cluster-scoped owner.
async fn has_dependents(api: &Api, owner: &Value) -> ApiResult<bool> {
    let Some(uid) = object::meta_str(owner, "uid") else {
        return Ok(false);
    };
    let ns = object::meta_str(owner, "namespace");
    for r in crate::resources::RESOURCES {
        let prefix = match (r.namespaced, ns) {
            (true, Some(ns)) => r.key_prefix(Some(ns)),
            (false, Some(_)) => continue,
            (_, None) => r.key_prefix(None),
        };
        let page = api
            .store
            .range(&prefix, None, 0)
            .await
            .map_err(|e| ApiError::from_storage(e, r, ""))?;
        for (_, v) in page.items {
            let Ok(o) = object::decode(r, &v) else {
                continue;
            };
            let owned = o
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|x| x["uid"] == uid));
            if owned {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn is_pod(r: &crate::resources::Resource) -> bool {
    r.group.is_empty() && r.kind == "Pod"
}

fn is_csr(r: &crate::resources::Resource) -> bool {
    r.group == "certificates.k8s.io" && r.kind == "CertificateSigningRequest"
}

/// The `approval` subresource of a CSR changes its conditions only: whoever may approve
/// may not also issue, so the certificate stays what the signer wrote.
fn keep_certificate(t: &Target, old: &Value, new: &mut Value) {
    if t.sub.as_deref() != Some("approval") || !is_csr(t.resource) {
        return;
    }
    match old.pointer("/status/certificate") {
        Some(c) => new["status"]["certificate"] = c.clone(),
        None => {
            if let Some(status) = new.get_mut("status").and_then(Value::as_object_mut) {
                status.remove("certificate");
            }
        }
    }
}

fn is_service(r: &crate::resources::Resource) -> bool {
    r.group.is_empty() && r.kind == "Service"
}

/// Deletes everything in a terminating namespace, then the namespace itself unless other
/// finalizers hold it. Runs in the background like Kubernetes' namespace controller, whose
/// job this becomes when the controller manager lands.
async fn finish_namespace(store: Arc<dyn Storage>, ns: String) {
    for r in crate::resources::RESOURCES.iter().filter(|r| r.namespaced) {
        let page = match store.range(&r.key_prefix(Some(&ns)), None, 0).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(namespace = %ns, error = %e, "namespace cleanup: listing failed");
                return;
            }
        };
        for (key, v) in page.items {
            match store.delete(&key, None).await {
                Ok(_) | Err(StorageError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(key, error = %e, "namespace cleanup: delete failed");
                    return;
                }
            }
            if is_service(r)
                && let Ok(obj) = object::decode(r, &v)
            {
                services::release(store.as_ref(), &obj).await;
            }
        }
    }
    let Some(namespaces) = crate::resources::find("", "v1", "namespaces") else {
        return;
    };
    let key = namespaces.key(None, &ns);
    let Ok(Some(current)) = store.get(&key).await else {
        return;
    };
    let held = object::decode(namespaces, &current)
        .ok()
        .and_then(|o| {
            o.pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .map(|f| !f.is_empty())
        })
        .unwrap_or(false);
    if !held {
        let _ = store.delete(&key, Some(current.mod_revision)).await;
    }
}

async fn delete_collection(api: &Api, req: &Request) -> ApiResult<Reply> {
    let opts = delete_options(req)?;
    let (items, meta) = list_objects(api, req).await?;
    let mut deleted = Vec::new();
    for obj in items {
        let target = Target {
            resource: req.target.resource,
            namespace: object::meta_str(&obj, "namespace").map(str::to_owned),
            name: object::meta_str(&obj, "name").map(str::to_owned),
            sub: None,
        };
        match delete_one(api, &target, &opts).await {
            Ok(o) => deleted.push(o),
            Err(e) if e.reason == "NotFound" => {}
            Err(e) => return Err(e),
        }
    }
    let r = req.target.resource;
    Ok(Reply::ok(json!({
        "kind": r.list_kind(), "apiVersion": r.api_version(), "metadata": meta, "items": deleted,
    })))
}

/// The `autoscaling/v1` Scale view of an object.
fn scale_of(obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = obj.get("metadata").cloned().unwrap_or_else(|| json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    })
}

async fn scale(api: &Api, req: &Request) -> ApiResult<Reply> {
    let t = &req.target;
    let (obj, revision) = current(api, t).await?;
    let mut scale = scale_of(&obj);
    match req.method {
        Method::GET => return Ok(Reply::ok(scale)),
        Method::PUT => {
            scale = parse_body(req)?;
        }
        Method::PATCH => {
            let kind = PatchType::from_content_type(req.header(header::CONTENT_TYPE))?;
            patch::apply(kind, &mut scale, &req.body)?;
        }
        _ => return Err(ApiError::method_not_allowed()),
    }
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            ApiError::invalid(
                t.resource,
                t.name(),
                vec![Cause {
                    reason: "FieldValueInvalid",
                    message: "must be greater than or equal to 0".into(),
                    field: "spec.replicas".into(),
                }],
            )
        })?;
    if precondition(&scale)?.is_some_and(|v| v != revision) {
        return Err(ApiError::conflict(t.resource, t.name()));
    }
    let mut new = obj.clone();
    new["spec"]["replicas"] = json!(replicas);
    object::carry_over(t.resource, &obj, &mut new, false);
    managed::track_update(Some(&obj), &mut new, &manager(req)?, main_scope(t));
    let stored = write(api, t, new, revision, req.query.dry_run()?).await?;
    Ok(Reply::ok(scale_of(&stored)))
}

/// An HTTP response with a JSON body.
pub fn json_response(code: StatusCode, body: &Value) -> Response {
    (code, axum::Json(body)).into_response()
}

/// Reads a request body up to `limit` bytes.
///
/// # Errors
/// 413 when the body is larger; 400 when it cannot be read.
pub async fn read_body(body: Body, limit: usize) -> ApiResult<bytes::Bytes> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .any(|e| e.to_string().contains("length limit"));
        if too_large {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("reading the request body: {e}"))
        }
    })
}
