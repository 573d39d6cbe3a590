//! Keelson's Kubernetes-compatible API server.
//!
//! Serves the Kubernetes REST API for the resources in [`resources::RESOURCES`] with the real
//! wire format (`k8s-openapi` types validate what is stored): discovery, `/version`, health
//! endpoints, create (with `generateName`), get, list (label and field selectors,
//! `limit`/`continue`), update, patch (JSON, merge, strategic merge), delete (finalizers,
//! graceful pod deletion, preconditions), deletecollection, `status` and `scale`
//! subresources, watch (resume from a resourceVersion, 410 when too old, bookmarks, selector
//! transitions), `dryRun=All`, `fieldValidation`, Table output for `kubectl get`, and
//! Kubernetes `Status` errors with the codes clients expect.
//!
//! Objects are kept in any [`storage::Storage`]: `keelson-server` plugs in its Raft store;
//! [`storage::memory::MemoryStore`] serves tests.
//!
//! OpenAPI v3 documents describe the served types for `kubectl` validation and `explain`.
//!
//! Not yet: TLS and authentication, server-side apply, OpenAPI v2, pod `log`/`exec`/
//! `binding`/`eviction`.
#![deny(missing_docs)]

pub mod auth;
mod discovery;
mod local;
mod managed;
pub mod object;
mod openapi;
pub mod patch;
pub mod pki;
mod pods;
mod proto_json;
mod protobuf;
mod raw;
pub mod request;
pub mod resources;
mod rest;
pub mod selectors;
pub mod server;
pub mod services;
pub mod status;
pub mod storage;
pub mod table;
pub mod tls;
mod watch;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Path, Query as AxumQuery, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use serde_json::json;
use tokio::net::TcpListener;

use crate::{
    request::{Query, Target},
    rest::json_response,
    status::ApiError,
    storage::{Storage, StorageError},
};

/// Settings of the API server.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest request body accepted (Kubernetes: 3 MiB).
    pub max_body: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// How long a watch lasts when the client does not say.
    pub watch_timeout: Duration,
    /// Service cluster IPs and node ports.
    pub service_ranges: services::ServiceRanges,
    /// Static bearer tokens.
    pub tokens: auth::StaticTokens,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_body: 3 * 1024 * 1024,
            bookmark_interval: Duration::from_secs(60),
            watch_timeout: Duration::from_secs(30 * 60),
            service_ranges: services::ServiceRanges::default(),
            tokens: auth::StaticTokens::default(),
        }
    }
}

/// The API server: a store and its settings.
pub struct Api {
    store: Arc<dyn Storage>,
    config: Config,
}

/// The namespaces every cluster has.
const SYSTEM_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

impl Api {
    /// An API server over `store`.
    pub fn new(store: Arc<dyn Storage>, config: Config) -> Arc<Self> {
        Arc::new(Api { store, config })
    }

    /// Creates the system namespaces that do not exist yet.
    ///
    /// # Errors
    /// The store fails.
    pub async fn bootstrap(&self) -> Result<(), StorageError> {
        let namespaces = resources::find("", "v1", "namespaces")
            .ok_or_else(|| StorageError::Unavailable("namespaces are not served".into()))?;
        for ns in SYSTEM_NAMESPACES {
            let mut obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}, "spec": {"finalizers": ["kubernetes"]}});
            object::init_new(&mut obj, None);
            object::apply_defaults(namespaces, &mut obj);
            let bytes = serde_json::to_vec(&obj)
                .map_err(|e| StorageError::Unavailable(format!("encoding namespace: {e}")))?;
            match self.store.create(&namespaces.key(None, ns), bytes).await {
                Ok(_) | Err(StorageError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.bootstrap_kubernetes_service().await
    }

    /// The `kubernetes` Service in `default`, on the first address of the service CIDR.
    async fn bootstrap_kubernetes_service(&self) -> Result<(), StorageError> {
        let svc = resources::find("", "v1", "services")
            .ok_or_else(|| StorageError::Unavailable("services are not served".into()))?;
        let key = svc.key(Some("default"), "kubernetes");
        if self.store.get(&key).await?.is_some() {
            return Ok(());
        }
        let mut obj = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": self.config.service_ranges.first().to_string(),
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}});
        object::init_new(&mut obj, Some("default"));
        object::apply_defaults(svc, &mut obj);
        let allocated = services::allocate(self, svc, &mut obj, false)
            .await
            .map_err(|e| StorageError::Unavailable(e.message))?;
        let bytes = serde_json::to_vec(&obj)
            .map_err(|e| StorageError::Unavailable(format!("encoding service: {e}")))?;
        match self.store.create(&key, bytes).await {
            Ok(_) => Ok(()),
            Err(StorageError::AlreadyExists(_)) => {
                allocated.release(self).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/version",
                get(|| async { axum::Json(discovery::version()) }),
            )
            .route("/healthz", get(health))
            .route("/livez", get(health))
            .route("/readyz", get(ready))
            .route(
                "/api",
                get(|| async { axum::Json(discovery::core_versions()) }),
            )
            .route(
                "/api/v1",
                get(|| async { axum::Json(discovery::resource_list("", "v1")) }),
            )
            .route("/apis", get(|| async { axum::Json(discovery::groups()) }))
            .route("/apis/{group}", get(api_group))
            .route("/apis/{group}/{version}", get(group_resources))
            .route(
                "/openapi/v3",
                get(|| async { axum::Json(openapi::index()) }),
            )
            .route("/openapi/v3/{*gv}", get(openapi_document))
            .route("/openapi/v2", get(openapi_v2))
            .route("/api/v1/{*rest}", any(core_resource))
            .route("/apis/{group}/{version}/{*rest}", any(group_resource))
            .route(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                axum::routing::post(self_subject_access_review),
            )
            .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()).into_response() })
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(self),
                authenticate,
            ))
            .with_state(Arc::clone(self))
    }

    /// Serves HTTPS on `listener` until `shutdown` completes. Client certificates signed by
    /// the CA in `tls` identify their users; connections without one may use bearer tokens.
    ///
    /// # Errors
    /// The listener fails.
    pub async fn serve_tls(
        self: &Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let router = self.router();
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => accepted?,
                () = &mut shutdown => return Ok(()),
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let identity = auth::PeerIdentity(tls::peer_user(tls.get_ref().1));
                let svc = tower::ServiceExt::map_request(
                    router,
                    move |mut req: axum::http::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(identity.clone());
                        req
                    },
                );
                let svc = hyper_util::service::TowerToHyperService::new(svc);
                let conn = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if let Err(e) = conn
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

/// Paths anyone may read: version and health.
fn is_public(path: &str) -> bool {
    matches!(path, "/version" | "/healthz" | "/livez" | "/readyz")
}

/// Attaches the caller's [`auth::User`] to the request, or answers 401.
async fn authenticate(
    State(api): State<Arc<Api>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut user = req
        .extensions()
        .get::<auth::PeerIdentity>()
        .and_then(|p| p.0.clone());
    if user.is_none()
        && let Some(token) = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    {
        user = auth::authenticate_token(&api, token.trim()).await;
    }
    match user {
        Some(u) => {
            req.extensions_mut().insert(u);
            next.run(req).await
        }
        None if is_public(req.uri().path()) => next.run(req).await,
        None => ApiError::unauthorized().into_response(),
    }
}

async fn self_subject_access_review(
    State(api): State<Arc<Api>>,
    axum::Extension(user): axum::Extension<auth::User>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let review = if protobuf::is_protobuf(content_type) {
        protobuf::self_subject_access_review(&body)
    } else {
        serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| e.to_string())
    };
    let review = match review {
        Ok(v) => v,
        Err(e) => {
            return ApiError::bad_request(format!("invalid SelfSubjectAccessReview: {e}"))
                .into_response();
        }
    };
    let attrs = review
        .pointer("/spec/resourceAttributes")
        .cloned()
        .unwrap_or_default();
    let field = |k: &str| {
        attrs
            .get(k)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let group = field("group").unwrap_or("");
    let plural = field("resource").unwrap_or("");
    let allowed = match resources::RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
    {
        Some(resource) => {
            let action = auth::Action {
                verb: field("verb").unwrap_or("get"),
                resource,
                sub: field("subresource"),
                namespace: field("namespace"),
                name: field("name"),
            };
            auth::authorize(&api, &user, &action).await.is_ok()
        }
        None => user.in_group("system:masters"),
    };
    let mut out = review;
    out["status"] = json!({"allowed": allowed});
    json_response(StatusCode::CREATED, &out)
}

async fn health() -> &'static str {
    "ok"
}

async fn ready(State(api): State<Arc<Api>>) -> Response {
    match api.store.revision().await {
        Ok(_) => "ok".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")).into_response(),
    }
}

async fn openapi_document(Path(gv): Path<String>, uri: Uri) -> Response {
    match openapi::document(&gv) {
        Some(doc) => json_response(StatusCode::OK, doc),
        None => ApiError::no_route(uri.path()).into_response(),
    }
}

/// `/openapi/v2`: gnostic protobuf when asked for (client-go does), JSON otherwise.
async fn openapi_v2(headers: axum::http::HeaderMap) -> Response {
    let (json, proto) = openapi::v2::document();
    let wants_proto = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("protobuf"));
    if wants_proto {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                openapi::v2::PROTOBUF.replace('@', "."),
            )],
            axum::body::Bytes::from_static(proto.as_slice()),
        )
            .into_response()
    } else {
        json_response(StatusCode::OK, json)
    }
}

async fn api_group(Path(group): Path<String>, uri: Uri) -> Response {
    match discovery::group(&group) {
        Some(doc) => json_response(StatusCode::OK, &doc),
        None => ApiError::no_route(uri.path()).into_response(),
    }
}

async fn group_resources(Path((group, version)): Path<(String, String)>, uri: Uri) -> Response {
    match discovery::resource_list(&group, &version) {
        Some(doc) => json_response(StatusCode::OK, &doc),
        None => ApiError::no_route(uri.path()).into_response(),
    }
}

async fn resource(
    api: Arc<Api>,
    group: &str,
    version: &str,
    rest: &str,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let query =
        match AxumQuery::<std::collections::HashMap<String, String>>::try_from_uri(&parts.uri) {
            Ok(q) => q.0,
            Err(e) => {
                return ApiError::bad_request(format!("malformed query: {e}")).into_response();
            }
        };
    let target = match Target::parse(group, version, rest, parts.uri.path()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let Some(user) = parts.extensions.get::<auth::User>().cloned() else {
        return ApiError::unauthorized().into_response();
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    let verb = match (&parts.method, target.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return ApiError::method_not_allowed().into_response(),
    };
    // exec and attach stream: they are authorized as `create` (as Kubernetes does, for both
    // the WebSocket GET and the SPDY POST) and proxied to the agent without reading a body.
    if let Some(sub @ ("exec" | "attach")) = target.sub.as_deref()
        && target.resource.group.is_empty()
        && target.resource.kind == "Pod"
        && target.name.is_some()
    {
        let action = auth::Action {
            verb: "create",
            resource: target.resource,
            sub: Some(sub),
            namespace: target.namespace.as_deref(),
            name: target.name.as_deref(),
        };
        if let Err(e) = auth::authorize(&api, &user, &action).await {
            return e.into_response();
        }
        return pods::stream(&api, &target, sub, parts).await;
    }
    let mut body = match rest::read_body(body, api.config.max_body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let csr = target.resource.group == "certificates.k8s.io"
        && target.resource.plural == "certificatesigningrequests";
    // As in Kubernetes, a CSR records who asked for it; approvers trust these fields.
    if csr && verb == "create" {
        match csr_with_requester(&body, &user) {
            Ok(b) => body = b,
            Err(e) => return e.into_response(),
        }
    }
    // A list or watch of CSRs narrowed to one name is authorized as that name (bootstrap
    // tokens may watch the CSR they created).
    let selected = (csr && matches!(verb, "list" | "watch"))
        .then(|| query.get("fieldSelector").and_then(|f| selected_name(f)))
        .flatten();
    // A create names its object in the body; node credentials may only create their own.
    let created_name = (verb == "create")
        .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|v| {
            v.pointer("/metadata/name")
                .and_then(|n| n.as_str())
                .map(str::to_owned)
        });
    let action = auth::Action {
        verb,
        resource: target.resource,
        sub: target.sub.as_deref(),
        namespace: target.namespace.as_deref(),
        name: target
            .name
            .as_deref()
            .or(created_name.as_deref())
            .or(selected.as_deref()),
    };
    if let Err(e) = auth::authorize(&api, &user, &action).await {
        return e.into_response();
    }
    rest::serve(
        api,
        rest::Request {
            target,
            method: parts.method,
            query: Query(query),
            headers: parts.headers,
            body,
        },
    )
    .await
}

/// The name a field selector pins (`metadata.name=NAME`), if any.
fn selected_name(selector: &str) -> Option<String> {
    selector.split(',').find_map(|term| {
        let (field, value) = term.split_once("==").or_else(|| term.split_once('='))?;
        (field.trim() == "metadata.name" && !value.contains('=') && !field.ends_with('!'))
            .then(|| value.trim().to_owned())
    })
}

/// A CSR create body with `spec.username`, `spec.groups` and `spec.uid` set to the caller.
fn csr_with_requester(body: &[u8], user: &auth::User) -> Result<bytes::Bytes, ApiError> {
    let mut obj: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "a CertificateSigningRequest must be sent as JSON: {e}"
        ))
    })?;
    if !obj.get("spec").is_some_and(serde_json::Value::is_object) {
        obj["spec"] = json!({});
    }
    obj["spec"]["username"] = json!(user.name);
    obj["spec"]["groups"] = json!(user.groups);
    if let Some(spec) = obj
        .get_mut("spec")
        .and_then(serde_json::Value::as_object_mut)
    {
        spec.remove("uid");
        spec.remove("extra");
    }
    serde_json::to_vec(&obj)
        .map(bytes::Bytes::from)
        .map_err(|e| ApiError::internal(format!("encoding the CertificateSigningRequest: {e}")))
}

async fn core_resource(
    State(api): State<Arc<Api>>,
    Path(rest): Path<String>,
    req: axum::extract::Request,
) -> Response {
    resource(api, "", "v1", &rest, req).await
}

async fn group_resource(
    State(api): State<Arc<Api>>,
    Path((group, version, rest)): Path<(String, String, String)>,
    req: axum::extract::Request,
) -> Response {
    resource(api, &group, &version, &rest, req).await
}
