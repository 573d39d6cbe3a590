//! `?watch=1`: a stream of `{"type": …, "object": …}` lines, resumable from a
//! resourceVersion, with bookmarks, selector transitions and Table objects for kubectl.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    Api, object, raw,
    rest::{self, Request, list_objects},
    selectors::{FieldSelector, LabelSelector, extra_fields},
    status::{ApiError, ApiResult},
    storage::{Event, EventKind, Revision, StorageError},
    table::{self, IncludeObject},
};

/// How lines leave the server.
const LINE_BUFFER: usize = 256;

/// How a watch renders objects.
struct Render {
    resource: &'static crate::resources::Resource,
    table: Option<IncludeObject>,
}

impl Render {
    fn object(&self, obj: Value) -> Value {
        match self.table {
            Some(include) => table::table(self.resource, &[obj], json!({}), include),
            None => obj,
        }
    }

    fn line(&self, kind: &str, obj: Value) -> bytes::Bytes {
        value_line(kind, &self.object(obj))
    }
}

/// A watch line for an object held as a `Value`.
fn value_line(kind: &str, object: &Value) -> bytes::Bytes {
    // Serializing a `Value` cannot fail.
    raw::watch_line(kind, &serde_json::to_vec(object).unwrap_or_default())
}

fn error_line(e: &ApiError) -> bytes::Bytes {
    value_line("ERROR", &e.to_status())
}

/// Starts a watch; the stream ends at `timeoutSeconds`, when the client goes away, or when the
/// store cuts the watcher off (the client then resumes from its last resourceVersion).
pub async fn serve(api: Arc<Api>, req: Request) -> Response {
    match start(api, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn start(api: Arc<Api>, req: Request) -> ApiResult<Response> {
    let r = req.target.resource;
    let labels = LabelSelector::parse(req.query.get("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(
        req.query.get("fieldSelector").unwrap_or(""),
        extra_fields(r.kind),
    )?;
    let render = Render {
        resource: r,
        table: table::wants_table(
            req.headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok()),
        )
        .then(|| IncludeObject::parse(req.query.get("includeObject"))),
    };
    let bookmarks = req.query.flag("allowWatchBookmarks");
    let timeout = Duration::from_secs(
        req.query
            .int("timeoutSeconds")?
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(api.config.watch_timeout.as_secs()),
    );
    let from: Option<Revision> = match req.query.get("resourceVersion") {
        None | Some("" | "0") => None,
        Some(v) => Some(v.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion {v:?} is not a valid resource version"
            ))
        })?),
    };

    let (tx, rx) = mpsc::channel::<Result<bytes::Bytes, std::convert::Infallible>>(LINE_BUFFER);
    // Without a resourceVersion, a watch starts with the current objects as ADDED events.
    let (initial, after) = match from {
        Some(rv) => (Vec::new(), rv),
        None => {
            let (items, meta) = list_objects(&api, &req).await?;
            let rv = meta["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (items, rv)
        }
    };
    let prefix = req.target.prefix();
    let events = match api.store.watch(&prefix, after).await {
        Ok(events) => Some(events),
        // Kubernetes answers a too-old watch with 200 and an ERROR event carrying 410.
        Err(StorageError::Compacted { requested, oldest }) => {
            let e = ApiError::gone(format!("too old resource version: {requested} ({oldest})"));
            let _ = tx.send(Ok(error_line(&e))).await;
            None
        }
        Err(e) => return Err(ApiError::from_storage(e, r, "")),
    };
    let bookmark_every = api.config.bookmark_interval;
    // Without selectors or a Table, every event is sent as the object it stored.
    let plain = render.table.is_none() && labels.is_empty() && fields.is_empty();
    tokio::spawn(async move {
        for obj in initial {
            if tx.send(Ok(render.line("ADDED", obj))).await.is_err() {
                return;
            }
        }
        let Some(mut events) = events else { return };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_every);
        ticker.tick().await;
        let mut last = after;
        loop {
            tokio::select! {
                () = &mut deadline => return,
                () = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    let mark = json!({"kind": r.kind, "apiVersion": r.api_version(),
                        "metadata": {"resourceVersion": last.to_string()}});
                    if tx.send(Ok(value_line("BOOKMARK", &mark))).await.is_err() {
                        return;
                    }
                }
                event = events.recv() => {
                    let Some(event) = event else { return };
                    last = event.revision();
                    if plain {
                        // What was stored is what this watcher is sent: no `Value` tree.
                        let Some(kind) = plain_kind(&event) else { continue };
                        let line = match rest::render(r, &event.current) {
                            Ok(text) => raw::watch_line(kind, &text),
                            Err(e) => {
                                let _ = tx.send(Ok(error_line(&e))).await;
                                return;
                            }
                        };
                        if tx.send(Ok(line)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    match translate(r, &event, &labels, &fields) {
                        Ok(Some((kind, obj))) => {
                            if tx.send(Ok(render.line(kind, obj))).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = tx.send(Ok(error_line(&e))).await;
                            return;
                        }
                    }
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// The event type a watcher without selectors sees: it saw every earlier state.
fn plain_kind(event: &Event) -> Option<&'static str> {
    match (event.kind, &event.previous) {
        (EventKind::Delete, Some(_)) => Some("DELETED"),
        (EventKind::Delete, None) => None,
        (EventKind::Put, Some(_)) => Some("MODIFIED"),
        (EventKind::Put, None) => Some("ADDED"),
    }
}

/// The watch event for a store event, as a selective watcher must see it: an object that
/// starts matching is ADDED, one that stops matching is DELETED.
fn translate(
    r: &crate::resources::Resource,
    event: &Event,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> ApiResult<Option<(&'static str, Value)>> {
    let matches = |o: &Value| labels.matches(o) && fields.matches(o);
    let current = object::decode(r, &event.current)?;
    // Whether the watcher saw the object before. Without selectors it did if there was a
    // previous state: no need to parse it.
    let was = match &event.previous {
        None => false,
        Some(_) if labels.is_empty() && fields.is_empty() => true,
        Some(p) => matches(&object::decode(r, p)?),
    };
    Ok(match event.kind {
        EventKind::Delete => was.then_some(("DELETED", current)),
        EventKind::Put => match (was, matches(&current)) {
            (true, true) => Some(("MODIFIED", current)),
            (false, true) => Some(("ADDED", current)),
            (true, false) => {
                // The last state the watcher saw, at this event's revision.
                let mut gone = current;
                object::metadata_mut(&mut gone).insert(
                    "resourceVersion".into(),
                    json!(event.revision().to_string()),
                );
                Some(("DELETED", gone))
            }
            (false, false) => None,
        },
    })
}
