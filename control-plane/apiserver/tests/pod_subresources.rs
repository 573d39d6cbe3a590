//! Pod subresources through kube-rs: `binding` (once only), `eviction`, and `log` proxied to
//! a stand-in agent that records what it was asked for.

mod common;

use std::sync::{Arc, Mutex};

use common::start;
use futures::AsyncBufReadExt as _;
use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{EvictParams, LogParams, PostParams},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// A minimal agent: answers every request with `body`, recording request lines.
async fn fake_agent(body: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let line = head.lines().next().unwrap_or("").to_owned();
                let status = if line.contains("/missing") {
                    "404 Not Found"
                } else {
                    "200 OK"
                };
                record.lock().unwrap().push(line);
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, seen)
}

fn pod(name: &str, containers: &[&str]) -> Pod {
    let containers: Vec<_> = containers
        .iter()
        .map(|c| json!({"name": c, "image": "busybox"}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": containers},
    }))
    .unwrap()
}

#[tokio::test]
async fn binding_eviction_and_logs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (client, _stop) = start(dir.path()).await;
    let (agent_port, seen) = fake_agent("hello\nworld\n").await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}}))?;
    nodes.create(&PostParams::default(), &node).await?;
    let status = json!({"status": {
        "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": agent_port}}}});
    nodes
        .patch_status(
            "n1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status),
        )
        .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("web", &["app"]))
        .await?;

    // Logs of an unbound pod cannot be fetched.
    let err = pods.logs("web", &LogParams::default()).await.unwrap_err();
    assert!(
        err.to_string().contains("does not have a host assigned"),
        "{err}"
    );

    // Binding assigns the node and marks the pod scheduled, once.
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "web"},
                         "target": {"kind": "Node", "name": "n1"}});
    pods.create_subresource::<_, serde_json::Value>(
        "binding",
        "web",
        &PostParams::default(),
        &binding,
    )
    .await?;
    let bound = pods.get("web").await?;
    assert_eq!(
        bound.spec.as_ref().unwrap().node_name.as_deref(),
        Some("n1")
    );
    let conds = bound.status.unwrap().conditions.unwrap();
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True")
    );
    let again = json!({"target": {"kind": "Node", "name": "n2"}});
    let err = pods
        .create_subresource::<_, serde_json::Value>(
            "binding",
            "web",
            &PostParams::default(),
            &again,
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert!(
                s.message.contains("already assigned to node \"n1\""),
                "{}",
                s.message
            );
        }
        other => panic!("expected a 409, got {other}"),
    }
    let missing_target = json!({"target": {"kind": "Node"}});
    let err = pods
        .create_subresource::<_, serde_json::Value>(
            "binding",
            "web",
            &PostParams::default(),
            &missing_target,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 422));

    // Logs come from the agent, with the options passed on.
    let text = pods
        .logs(
            "web",
            &LogParams {
                tail_lines: Some(2),
                timestamps: true,
                ..LogParams::default()
            },
        )
        .await?;
    assert_eq!(text, "hello\nworld\n");
    let line = seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        line.starts_with("GET /containerLogs/default/web/app?")
            && line.contains("tailLines=2")
            && line.contains("timestamps=true"),
        "{line}"
    );
    let lines: Vec<String> = pods
        .log_stream(
            "web",
            &LogParams {
                follow: true,
                ..LogParams::default()
            },
        )
        .await?
        .lines()
        .try_collect()
        .await?;
    assert_eq!(lines, ["hello", "world"]);
    assert!(seen.lock().unwrap().last().unwrap().contains("follow=true"));

    // A pod with two containers needs the container named; an unknown one is refused.
    let mut two = pod("two", &["a", "b"]);
    two.spec.as_mut().unwrap().node_name = Some("n1".into());
    pods.create(&PostParams::default(), &two).await?;
    let err = pods.logs("two", &LogParams::default()).await.unwrap_err();
    assert!(err.to_string().contains("choose one of: [a b]"), "{err}");
    let err = pods
        .logs(
            "two",
            &LogParams {
                container: Some("zzz".into()),
                ..LogParams::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("container zzz is not valid"),
        "{err}"
    );

    // Eviction deletes the (unbound-to-a-real-agent) pod, here gracefully: it is marked.
    pods.evict("two", &EvictParams::default()).await?;
    let evicted = pods.get("two").await?;
    assert!(evicted.metadata.deletion_timestamp.is_some());
    pods.create(&PostParams::default(), &pod("loose", &["c"]))
        .await?;
    pods.evict("loose", &EvictParams::default()).await?;
    assert!(pods.get_opt("loose").await?.is_none());
    Ok(())
}
