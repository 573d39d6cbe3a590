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

mod discovery;
pub mod object;
mod openapi;
pub mod patch;
pub mod request;
pub mod resources;
mod rest;
pub mod selectors;
pub mod services;
pub mod status;
pub mod storage;
pub mod table;
mod watch;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_body: 3 * 1024 * 1024,
            bookmark_interval: Duration::from_secs(60),
            watch_timeout: Duration::from_secs(30 * 60),
            service_ranges: services::ServiceRanges::default(),
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
            .route("/api/v1/{*rest}", any(core_resource))
            .route("/apis/{group}/{version}/{*rest}", any(group_resource))
            .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()).into_response() })
            .with_state(Arc::clone(self))
    }

    /// Serves HTTP on `listener` until `shutdown` completes.
    ///
    /// # Errors
    /// The listener fails.
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
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

struct Incoming {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: std::collections::HashMap<String, String>,
    body: Body,
}

async fn resource(
    api: Arc<Api>,
    group: &str,
    version: &str,
    rest: &str,
    inc: Incoming,
) -> Response {
    let target = match Target::parse(group, version, rest, inc.uri.path()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let body = match rest::read_body(inc.body, api.config.max_body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    rest::serve(
        api,
        rest::Request {
            target,
            method: inc.method,
            query: Query(inc.query),
            headers: inc.headers,
            body,
        },
    )
    .await
}

async fn core_resource(
    State(api): State<Arc<Api>>,
    Path(rest): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    AxumQuery(query): AxumQuery<std::collections::HashMap<String, String>>,
    body: Body,
) -> Response {
    let inc = Incoming {
        method,
        uri,
        headers,
        query,
        body,
    };
    resource(api, "", "v1", &rest, inc).await
}

async fn group_resource(
    State(api): State<Arc<Api>>,
    Path((group, version, rest)): Path<(String, String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    AxumQuery(query): AxumQuery<std::collections::HashMap<String, String>>,
    body: Body,
) -> Response {
    let inc = Incoming {
        method,
        uri,
        headers,
        query,
        body,
    };
    resource(api, &group, &version, &rest, inc).await
}
