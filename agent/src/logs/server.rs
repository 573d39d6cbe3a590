//! The agent's HTTP server. `GET /containerLogs/{namespace}/{pod}/{container}` with the
//! kubelet's query parameters `follow`, `previous`, `tailLines`, `timestamps` and
//! `limitBytes` answers with the container's log as plain text: the lines only (CRI prefix
//! stripped), each prefixed by its RFC 3339 time with `timestamps=true`; `follow=true` streams
//! new lines until the container's attempt ends. `/exec/…` runs commands in containers
//! ([`super::exec`]), `/attach/…` attaches to their main process ([`super::attach`]).

use std::collections::VecDeque;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::cri;
use crate::pods::StateLayout;
use crate::pods::layout::{PodRecord, read_json};

/// How often a followed log is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Query parameters of `containerLogs`, as the kubelet takes them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    #[serde(default)]
    follow: Option<String>,
    #[serde(default)]
    previous: Option<String>,
    #[serde(default)]
    tail_lines: Option<i64>,
    #[serde(default)]
    timestamps: Option<String>,
    #[serde(default)]
    limit_bytes: Option<u64>,
}

fn flag(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("true" | "1" | ""))
}

/// What the handlers need.
#[derive(Clone, Debug)]
pub struct ServerState {
    /// The agent's state directory.
    pub layout: StateLayout,
    /// The `keelson-runtime` binary (for exec).
    pub runtime_bin: PathBuf,
}

/// The routes of the agent's HTTP server.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route(
            "/exec/{namespace}/{pod}/{container}",
            get(super::exec::exec),
        )
        .route(
            "/attach/{namespace}/{pod}/{container}",
            get(super::attach::attach),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// The pod uid and the latest attempt of `container` in `namespace/pod` on this node.
pub fn current_attempt(
    layout: &StateLayout,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Option<(String, u32)> {
    let (record, dir) = find_pod(layout, namespace, pod)?;
    let attempt = *attempts(&dir.join(container)).last()?;
    Some((record.uid, attempt))
}

/// Serves [`router`] on `listener` until `shutdown` completes.
///
/// # Errors
/// When serving fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServerState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn not_found(message: String) -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain")],
        message,
    )
        .into_response()
}

/// The pod record and log directory of `namespace/pod` (the pod still on the node if there
/// are several of that name).
fn find_pod(layout: &StateLayout, namespace: &str, pod: &str) -> Option<(PodRecord, PathBuf)> {
    let prefix = format!("{namespace}_{pod}_");
    let mut candidates: Vec<(bool, std::time::SystemTime, PodRecord, PathBuf)> =
        std::fs::read_dir(layout.logs())
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let uid = name.strip_prefix(&prefix)?.to_owned();
                let live = read_json::<PodRecord>(&layout.pod(&uid).join("pod.json")).is_some();
                let mtime = e.metadata().and_then(|m| m.modified()).ok()?;
                let record = PodRecord {
                    namespace: namespace.to_owned(),
                    name: pod.to_owned(),
                    uid,
                };
                Some((live, mtime, record, e.path()))
            })
            .collect();
    candidates.sort_by_key(|a| (a.0, a.1));
    candidates.pop().map(|(_, _, r, p)| (r, p))
}

/// Attempt numbers with a log file, ascending.
fn attempts(dir: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Turns complete CRI entries into output text.
fn render(entry: &str, timestamps: bool, out: &mut Vec<u8>) {
    if let Some(e) = cri::parse_line(entry) {
        if timestamps {
            out.extend_from_slice(e.time.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(e.content.as_bytes());
        if !e.partial {
            out.push(b'\n');
        }
    }
}

async fn container_logs(
    State(ServerState { layout, .. }): State<ServerState>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Some((record, dir)) = find_pod(&layout, &namespace, &pod) else {
        return not_found(format!("pod {namespace}/{pod} has no logs on this node"));
    };
    let cdir = dir.join(&container);
    let all = attempts(&cdir);
    let attempt = if flag(&q.previous) {
        match all.len() {
            n if n >= 2 => all[n - 2],
            _ => {
                return not_found(format!(
                    "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                ));
            }
        }
    } else {
        match all.last() {
            Some(n) => *n,
            None => {
                return not_found(format!(
                    "container \"{container}\" in pod \"{pod}\" has no logs"
                ));
            }
        }
    };
    let file = cdir.join(format!("{attempt}.log"));
    let timestamps = flag(&q.timestamps);
    let text = match std::fs::read(&file) {
        Ok(t) => t,
        Err(e) => return not_found(format!("{}: {e}", file.display())),
    };
    // Only complete entries; a half-written last line is picked up by follow.
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    let body = String::from_utf8_lossy(&text[..complete.saturating_sub(1)]).into_owned();
    // Split on `\n` only: a terminal's lines end in `\r`, which is part of their content.
    let mut entries: VecDeque<&str> = if complete == 0 {
        VecDeque::new()
    } else {
        body.split('\n').collect()
    };
    if let Some(n) = q.tail_lines
        && n >= 0
    {
        while entries.len() > n as usize {
            entries.pop_front();
        }
    }
    let mut out = Vec::new();
    for e in entries {
        render(e, timestamps, &mut out);
    }
    if let Some(limit) = q.limit_bytes {
        out.truncate(limit as usize);
    }
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let follow = flag(&q.follow) && !flag(&q.previous);
    if !follow {
        return (StatusCode::OK, headers, out).into_response();
    }
    let exit_file = layout
        .attempt(&record.uid, &container, attempt)
        .join(crate::pods::supervisor::EXIT_FILE);
    let state = Follow {
        file,
        offset: complete as u64,
        exit_file,
        cdir,
        attempt,
        timestamps,
        first: Some(out),
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if let Some(first) = st.first.take() {
            return Some((Ok::<Bytes, std::io::Error>(Bytes::from(first)), st));
        }
        loop {
            let chunk = st.read_new();
            if !chunk.is_empty() {
                return Some((Ok(Bytes::from(chunk)), st));
            }
            if st.finished() {
                return None;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    });
    (StatusCode::OK, headers, Body::from_stream(stream)).into_response()
}

struct Follow {
    file: PathBuf,
    offset: u64,
    exit_file: PathBuf,
    cdir: PathBuf,
    attempt: u32,
    timestamps: bool,
    first: Option<Vec<u8>>,
}

impl Follow {
    /// Complete entries appended since the last read, rendered.
    fn read_new(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let Ok(mut f) = std::fs::File::open(&self.file) else {
            return out;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return out;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return out;
        }
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return out;
        };
        self.offset += end as u64 + 1;
        for line in String::from_utf8_lossy(&buf[..end]).split('\n') {
            render(line, self.timestamps, &mut out);
        }
        out
    }

    /// The attempt is over (recorded exit, a newer attempt, or the pod gone).
    fn finished(&self) -> bool {
        self.exit_file.exists()
            || !self.cdir.exists()
            || attempts(&self.cdir)
                .last()
                .is_some_and(|n| *n > self.attempt)
    }
}
