//! The HTTP side of network boot (axum): per-machine iPXE scripts, iPXE binaries for UEFI HTTP
//! boot, boot assets (kernel, initrd) from a confined directory, and the cloud-init NoCloud
//! seed of each machine.
//!
//! Routes:
//! - `GET /ipxe/{mac}[?uuid=…]`: the machine's iPXE script (MAC as 12 hex digits or with
//!   `:`/`-`; the SMBIOS UUID, which the DHCP server adds when the client sent one, finds a
//!   machine known only by its UUID);
//! - `GET /boot/{name}`: configured boot files (`ipxe.efi`, `undionly.kpxe`);
//! - `GET /assets/{*path}`: files under the assets directory;
//! - `GET /nocloud/{id}/{meta-data|user-data|vendor-data|network-config}`.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::{info, warn};
use uuid::Uuid;

use crate::boot;
use crate::confine::{self, ConfineError};
use crate::live::{InventoryHandle, Sighting};
use crate::mac::Mac;
use crate::nocloud;

/// Errors of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `std` listener could not be registered with tokio.
    #[error("registering the HTTP listener with the runtime: {0}")]
    Register(std::io::Error),
    /// Serving failed.
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}

/// Local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the HTTP server serves.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Base URL under which clients reach this server (e.g. `http://192.0.2.1:8080`), used in
    /// scripts and seed URLs.
    pub http_base: String,
    /// The inventory (and, in API mode, where sightings and join credentials go).
    pub inventory: InventoryHandle,
    /// Directory of boot assets (kernels, initrds), if any.
    pub assets: Option<PathBuf>,
    /// Boot files by name (`/boot/{name}`).
    pub boot_files: BTreeMap<String, PathBuf>,
    /// Concurrent requests served at once.
    pub max_requests: usize,
}

type AppState = Arc<HttpConfig>;

/// The router (exposed for in-process tests).
pub fn router(config: HttpConfig) -> Router {
    let limit = config.max_requests.max(1);
    Router::new()
        .route("/ipxe/{mac}", get(script))
        .route("/boot/{name}", get(boot_file))
        .route("/assets/{*path}", get(asset))
        .route("/nocloud/{id}/{doc}", get(seed))
        .layer(tower::limit::ConcurrencyLimitLayer::new(limit))
        .with_state(Arc::new(config))
}

/// Serves on `listener` until `shutdown` completes (in-flight requests finish).
///
/// # Errors
/// [`Error::Register`] or [`Error::Serve`].
pub async fn serve(
    listener: std::net::TcpListener,
    config: HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener).map_err(Error::Register)?;
    info!(local = ?listener.local_addr().ok(), base = %config.http_base, "HTTP server running");
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::Serve)?;
    info!("HTTP server stopped");
    Ok(())
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, format!("{what} not found\n")).into_response()
}

fn parse_mac(s: &str) -> Option<Mac> {
    if s.len() == 12 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut m = [0u8; 6];
        for (i, byte) in m.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        return Some(Mac(m));
    }
    s.parse().ok()
}

/// The query of a script request.
#[derive(Debug, serde::Deserialize)]
struct ScriptQuery {
    uuid: Option<String>,
}

async fn script(
    State(cfg): State<AppState>,
    Path(mac): Path<String>,
    Query(q): Query<ScriptQuery>,
) -> Response {
    let Some(mac) = parse_mac(&mac) else {
        return (StatusCode::BAD_REQUEST, "bad MAC address\n").into_response();
    };
    // An empty value is what iPXE expands `${uuid}` to on a machine without one.
    let uuid = match q
        .uuid
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(str::parse::<Uuid>)
    {
        None => None,
        Some(Ok(u)) => Some(u),
        Some(Err(_)) => return (StatusCode::BAD_REQUEST, "bad UUID\n").into_response(),
    };
    let inventory = cfg.inventory.current();
    match inventory.target_for(mac, uuid.as_ref()) {
        Some(t) => {
            info!(%mac, machine = %t.id, ?uuid, "serving iPXE script");
            cfg.inventory.saw(Sighting::Script(mac, uuid));
            text(boot::ipxe_script(&cfg.http_base, &t))
        }
        None => not_found(format!("boot profile for {mac}")),
    }
}

async fn file_response(opened: Result<(std::fs::File, u64), ConfineError>, what: &str) -> Response {
    match opened {
        Ok((file, len)) => {
            info!(file = %what, bytes = len, "serving file");
            let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Err(ConfineError::NotFound(_)) => not_found(what.to_string()),
        Err(
            e @ (ConfineError::BadName(_) | ConfineError::Escape(_) | ConfineError::NotAFile(_)),
        ) => {
            warn!(error = %e, "refused file request");
            (StatusCode::FORBIDDEN, "forbidden\n").into_response()
        }
        Err(e @ ConfineError::Io { .. }) => {
            warn!(error = %e, "file request failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot read file\n").into_response()
        }
    }
}

async fn boot_file(State(cfg): State<AppState>, Path(name): Path<String>) -> Response {
    let opened = match cfg.boot_files.get(&name) {
        Some(p) => confine::open_configured(p),
        None => Err(ConfineError::NotFound(name.clone())),
    };
    file_response(opened, &name).await
}

async fn asset(State(cfg): State<AppState>, Path(path): Path<String>) -> Response {
    let opened = match &cfg.assets {
        Some(root) => confine::open(root, &path),
        None => Err(ConfineError::NotFound(path.clone())),
    };
    file_response(opened, &path).await
}

async fn seed(State(cfg): State<AppState>, Path((id, doc)): Path<(String, String)>) -> Response {
    let inventory = cfg.inventory.current();
    let Some(t) = inventory.target_by_id(&id) else {
        return not_found(format!("machine {id}"));
    };
    cfg.inventory.saw(Sighting::Seed {
        id: id.clone(),
        doc: doc.clone(),
    });
    let rendered = match doc.as_str() {
        "meta-data" => nocloud::meta_data(&t),
        "user-data" => match cfg.inventory.join() {
            // API mode: every user-data carries fresh join credentials.
            Some(issuer) => match issuer.issue(&t.hostname).await {
                Ok(join) => nocloud::join_user_data(&t, &join),
                Err(message) => {
                    warn!(machine = %id, %message, "issuing join credentials failed");
                    cfg.inventory.saw(Sighting::Failed {
                        id: id.clone(),
                        message: format!("issuing join credentials: {message}"),
                    });
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "cannot issue join credentials\n",
                    )
                        .into_response();
                }
            },
            None => nocloud::user_data(&t),
        },
        "vendor-data" => nocloud::vendor_data(&t),
        "network-config" => nocloud::network_config(&t),
        _ => return not_found(format!("seed document {doc}")),
    };
    match rendered {
        Ok(body) => {
            info!(machine = %id, %doc, "serving NoCloud seed");
            text(body)
        }
        Err(e) => {
            warn!(error = %e, "rendering seed failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render seed\n").into_response()
        }
    }
}
