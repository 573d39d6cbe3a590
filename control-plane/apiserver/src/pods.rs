//! Pod subresources: `binding` (the scheduler's write), `eviction`, and `log`, `exec` and
//! `attach`, which are proxied to the agent on the pod's node. For `exec`/`attach` the
//! upgrade (WebSocket or SPDY) is passed through: the agent answers the handshake and the
//! two upgraded connections are spliced, so the stream protocol is the agent's to speak.

use std::time::Duration;

use axum::{
    body::Body,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::{
    Api,
    object::{self, now_rfc3339},
    raw::{self, BindRefusal},
    request::Target,
    resources,
    rest::{self, DeleteOptions, Reply, Request},
    status::{ApiError, ApiResult, Cause},
    storage::Versioned,
};

/// How many times a binding is retried when the pod changed underneath it.
const BIND_RETRIES: usize = 5;

/// How long connecting to a node's agent may take.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The port agents serve logs on when their Node does not say.
const DEFAULT_AGENT_PORT: i64 = 10250;

/// `201 Created` with a `Status` of success, as binding and eviction answer.
fn created() -> Reply {
    Reply {
        code: StatusCode::CREATED,
        body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                     "status": "Success", "code": 201})
        .into(),
        warnings: Vec::new(),
    }
}

fn check_kind(body: &Value, kind: &str) -> ApiResult<()> {
    match body.get("kind").and_then(Value::as_str) {
        None => Ok(()),
        Some(k) if k == kind => Ok(()),
        Some(k) => Err(ApiError::bad_request(format!(
            "expected a {kind} object, got kind {k:?}"
        ))),
    }
}

/// `POST pods/<name>/binding`: assigns the pod to a node, once.
pub(crate) async fn bind(api: &Api, req: &Request) -> ApiResult<Reply> {
    let t = &req.target;
    let body = rest::parse_body(req)?;
    check_kind(&body, "Binding")?;
    if let Some(name) = object::meta_str(&body, "name").filter(|n| *n != t.name()) {
        return Err(ApiError::bad_request(format!(
            "the name of the binding ({name}) does not match the pod's name ({})",
            t.name()
        )));
    }
    let node = body
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                t.resource,
                t.name(),
                vec![Cause {
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                    field: "target.name".into(),
                }],
            )
        })?;
    let dry_run = req.query.dry_run()?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        // The scheduler's hot path: the first try reads this member's copy (a stale one
        // fails the revision check below and the retry reads through the leader).
        let stored = if attempt == 1 {
            rest::stored_for_write(api, t).await?
        } else {
            rest::stored(api, t).await?
        };
        let bound = match bound_text(t, &stored, node) {
            Ok(bound) => bound,
            // A refusal based on this member's copy is confirmed through the leader.
            Err(_) if attempt == 1 => continue,
            Err(e) => return Err(e),
        };
        if dry_run {
            return Ok(created());
        }
        // A binding always changes the pod and never finishes a deletion (a terminating pod
        // is refused), so it is a plain compare-and-swap of the stored pod.
        let written = api
            .store
            .update(&t.key(), bound, Some(stored.mod_revision))
            .await
            .map_err(|e| ApiError::from_storage(e, t.resource, t.name()));
        match written {
            Ok(_) => return Ok(created()),
            Err(e) if e.code == StatusCode::CONFLICT && attempt < BIND_RETRIES => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The stored bytes of the pod bound to `node`: edited as text where it can be (the
/// scheduler binds thousands of pods a second), else through the decoded pod.
fn bound_text(t: &Target, stored: &Versioned, node: &str) -> ApiResult<Vec<u8>> {
    let now = now_rfc3339();
    match raw::bind_pod(t.resource, &stored.value, node, &now) {
        Some(Ok(text)) => Ok(text),
        Some(Err(BindRefusal::Assigned(current))) => Err(already_assigned(t, &current)),
        Some(Err(BindRefusal::Terminating)) => Err(terminating(t)),
        None => object::encode(&assign_at(
            t,
            object::decode(t.resource, stored)?,
            node,
            &now,
        )?),
    }
}

fn refused(t: &Target, message: String) -> ApiError {
    ApiError {
        message,
        ..ApiError::conflict(t.resource, t.name())
    }
}

fn already_assigned(t: &Target, current: &str) -> ApiError {
    refused(
        t,
        format!("pod {} is already assigned to node \"{current}\"", t.name()),
    )
}

fn terminating(t: &Target) -> ApiError {
    refused(
        t,
        format!(
            "pod {} is being deleted, cannot be assigned to a host",
            t.name()
        ),
    )
}

/// The pod with `spec.nodeName` set and `PodScheduled=True` since `now`; 409 if it is
/// already bound or being deleted.
pub(crate) fn assign_at(t: &Target, mut pod: Value, node: &str, now: &str) -> ApiResult<Value> {
    if let Some(current) = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        return Err(already_assigned(t, current));
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(terminating(t));
    }
    pod["spec"]["nodeName"] = json!(node);
    let scheduled = json!({"type": "PodScheduled", "status": "True",
                           "lastProbeTime": null, "lastTransitionTime": now});
    let conditions = pod["status"]
        .as_object_mut()
        .map(|s| s.entry("conditions").or_insert_with(|| json!([])));
    match conditions.and_then(Value::as_array_mut) {
        Some(list) => {
            list.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
            list.push(scheduled);
        }
        None => pod["status"] = json!({"phase": "Pending", "conditions": [scheduled]}),
    }
    Ok(pod)
}

/// `POST pods/<name>/eviction`: deletes the pod with the eviction's delete options. There
/// are no PodDisruptionBudgets to consult, so every eviction is allowed.
pub(crate) async fn evict(api: &Api, req: &Request) -> ApiResult<Reply> {
    let t = &req.target;
    let body = rest::parse_body(req)?;
    check_kind(&body, "Eviction")?;
    let options = body.get("deleteOptions").cloned().unwrap_or(json!({}));
    let opts = DeleteOptions::parse(req, &options)?;
    rest::delete_one(api, t, &opts).await?;
    Ok(created())
}

/// Log options passed on to the agent, validated.
struct LogOptions {
    container: String,
    query: Vec<(&'static str, String)>,
}

impl LogOptions {
    fn parse(req: &Request, pod: &Value) -> ApiResult<Self> {
        let container = choose_container(req.target.name(), pod, req.query.get("container"))?;
        let mut query = Vec::new();
        for flag in ["follow", "previous", "timestamps"] {
            if req.query.flag(flag) {
                query.push((flag, "true".to_owned()));
            }
        }
        for int in ["tailLines", "limitBytes", "sinceSeconds"] {
            if let Some(n) = req.query.int(int)? {
                if n < 0 {
                    return Err(ApiError::bad_request(format!(
                        "{int} must be a non-negative integer"
                    )));
                }
                query.push((int, n.to_string()));
            }
        }
        Ok(LogOptions { container, query })
    }

    fn path(&self, namespace: &str, pod: &str) -> String {
        let mut path = format!("/containerLogs/{namespace}/{pod}/{}", self.container);
        for (i, (k, v)) in self.query.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(k);
            path.push('=');
            path.push_str(v);
        }
        path
    }
}

/// The container a request names, or the pod's only container.
fn choose_container(pod_name: &str, pod: &Value, asked: Option<&str>) -> ApiResult<String> {
    let names: Vec<&str> = ["/spec/containers", "/spec/initContainers"]
        .iter()
        .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let main: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    match asked.filter(|c| !c.is_empty()) {
        Some(c) if names.contains(&c) => Ok(c.to_owned()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {pod_name}"
        ))),
        None if main.len() == 1 => Ok(main[0].to_owned()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {pod_name}, choose one of: [{}]",
            main.join(" ")
        ))),
    }
}

/// The node a pod runs on.
fn pod_node<'a>(t: &Target, pod: &'a Value) -> ApiResult<&'a str> {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {} does not have a host assigned", t.name()))
        })
}

/// Headers of an upgrade handshake passed between client and agent.
const UPGRADE_HEADERS: [&str; 7] = [
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "x-stream-protocol-version",
];

/// `pods/<name>/exec` and `pods/<name>/attach`: passes the upgrade through to the agent.
pub(crate) async fn stream(
    api: &Api,
    t: &Target,
    sub: &str,
    mut parts: axum::http::request::Parts,
) -> Response {
    let result = async {
        let (pod, _) = rest::current(api, t).await?;
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let asked = url_param(&query, "container");
        let container = choose_container(t.name(), &pod, asked.as_deref())?;
        let node = pod_node(t, &pod)?;
        let addr = agent_address(api, node).await?;
        let ns = t.namespace.as_deref().unwrap_or_default();
        let path = format!("/{sub}/{ns}/{}/{container}?{query}", t.name());
        let mut upstream = axum::http::Request::builder()
            .method(parts.method.clone())
            .uri(&path)
            .header(header::HOST, &addr);
        for name in UPGRADE_HEADERS {
            for v in parts.headers.get_all(name) {
                upstream = upstream.header(name, v);
            }
        }
        let upstream = upstream
            .body(Body::empty())
            .map_err(|e| ApiError::internal(format!("building the agent request: {e}")))?;
        let reply = send_to_agent(&addr, upstream).await.map_err(|e| {
            ApiError::internal(format!(
                "cannot reach the agent of node {node} at {addr}: {e}"
            ))
        })?;
        Ok::<_, ApiError>(reply)
    }
    .await;
    let mut reply = match result {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if reply.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = reply.status();
        let e = agent_refusal(reply).await;
        return ApiError {
            message: format!(
                "the agent refused the {sub} stream ({status}): {}",
                e.message
            ),
            ..e
        }
        .into_response();
    }
    let Some(client_side) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiError::bad_request(format!("{sub} needs a connection upgrade")).into_response();
    };
    let agent_side = hyper::upgrade::on(&mut reply);
    let mut resp = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for name in UPGRADE_HEADERS {
        for v in reply.headers().get_all(name) {
            resp = resp.header(name, v);
        }
    }
    tokio::spawn(async move {
        let (client, agent) = match tokio::try_join!(client_side, agent_side) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "stream upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut agent = hyper_util::rt::TokioIo::new(agent);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut agent).await {
            tracing::debug!(error = %e, "stream ended");
        }
    });
    resp.body(Body::empty())
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

/// The first value of `name` in a raw query string.
fn url_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_owned())
    })
}

/// `GET pods/<name>/log`: streams the container's log from the agent on the pod's node.
pub(crate) async fn log(api: &Api, req: &Request) -> Response {
    match proxy_log(api, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn proxy_log(api: &Api, req: &Request) -> ApiResult<Response> {
    let t = &req.target;
    let (pod, _) = rest::current(api, t).await?;
    let opts = LogOptions::parse(req, &pod)?;
    let node = pod_node(t, &pod)?;
    let addr = agent_address(api, node).await?;
    let path = opts.path(t.namespace.as_deref().unwrap_or_default(), t.name());
    let upstream = get_from_agent(&addr, &path).await.map_err(|e| {
        ApiError::internal(format!(
            "cannot reach the agent of node {node} at {addr}: {e}"
        ))
    })?;
    let (parts, body) = upstream.into_parts();
    if !parts.status.is_success() {
        let refused = axum::http::Response::from_parts(parts, body);
        return Err(agent_refusal(refused).await);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain")], Body::new(body)).into_response())
}

/// The agent's error answer as an API error: its text, 400 for what the request got wrong
/// (a missing container, a bad option), 500 otherwise.
async fn agent_refusal(resp: axum::http::Response<hyper::body::Incoming>) -> ApiError {
    let client_error = resp.status().is_client_error();
    let text = axum::body::to_bytes(Body::new(resp.into_body()), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    if client_error {
        ApiError::bad_request(text)
    } else {
        ApiError::internal(text)
    }
}

/// `host:port` of the agent on `node`: its InternalIP (else first address) and the
/// kubelet endpoint port it published.
async fn agent_address(api: &Api, node: &str) -> ApiResult<String> {
    let nodes = resources::find("", "v1", "nodes")
        .ok_or_else(|| ApiError::internal("nodes are not served"))?;
    let stored = api
        .store
        .get(&nodes.key(None, node))
        .await
        .map_err(|e| ApiError::from_storage(e, nodes, node))?
        .ok_or_else(|| ApiError::not_found(nodes, node))?;
    let obj = object::decode(nodes, &stored)?;
    let addresses = obj
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let pick = |kind: Option<&str>| {
        addresses
            .iter()
            .find(|a| kind.is_none_or(|k| a.get("type").and_then(Value::as_str) == Some(k)))
            .and_then(|a| a.get("address").and_then(Value::as_str))
            .map(str::to_owned)
    };
    let host = pick(Some("InternalIP"))
        .or_else(|| pick(None))
        .ok_or_else(|| ApiError::bad_request(format!("node {node} has no address")))?;
    let port = obj
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_i64)
        .filter(|p| (1..=65535).contains(p))
        .unwrap_or(DEFAULT_AGENT_PORT);
    Ok(match host.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => format!("[{v6}]:{port}"),
        Err(_) => format!("{host}:{port}"),
    })
}

type AgentError = Box<dyn std::error::Error + Send + Sync>;

/// One plain HTTP/1.1 GET to the agent; the response body streams.
async fn get_from_agent(
    addr: &str,
    path: &str,
) -> Result<axum::http::Response<hyper::body::Incoming>, AgentError> {
    let request = axum::http::Request::get(path)
        .header(header::HOST, addr)
        .body(Body::empty())?;
    send_to_agent(addr, request).await
}

/// Sends one request to the agent over a fresh HTTP/1.1 connection that may be upgraded.
async fn send_to_agent(
    addr: &str,
    request: axum::http::Request<Body>,
) -> Result<axum::http::Response<hyper::body::Incoming>, AgentError> {
    let tcp = tokio::time::timeout(AGENT_CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connection timed out")??;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "agent connection ended");
        }
    });
    Ok(sender.send_request(request).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target::parse("", "v1", "namespaces/default/pods/web", "/").unwrap()
    }

    #[test]
    fn binding_sets_node_and_condition_once() {
        let pod = json!({"metadata": {"name": "web"}, "spec": {"containers": []},
                         "status": {"phase": "Pending", "conditions": [
                             {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}});
        let bound = assign_at(&target(), pod, "n1", "t").unwrap();
        assert_eq!(bound["spec"]["nodeName"], "n1");
        let conds = bound["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0]["status"], "True");
        let again = assign_at(&target(), bound, "n2", "t").unwrap_err();
        assert_eq!(again.code, StatusCode::CONFLICT);
        assert!(again.message.contains("already assigned to node \"n1\""));
    }

    #[test]
    fn binding_refuses_a_terminating_pod() {
        let pod = json!({"metadata": {"name": "web", "deletionTimestamp": "2026-01-01T00:00:00Z"},
                         "spec": {}});
        assert_eq!(
            assign_at(&target(), pod, "n1", "t").unwrap_err().code,
            StatusCode::CONFLICT
        );
    }
}
