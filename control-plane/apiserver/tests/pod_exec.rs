//! `pods/exec` through the API server: the WebSocket upgrade is passed to a stand-in agent
//! that speaks the Kubernetes channel protocol (echoing stdin upper-cased on stdout), driven
//! by kube-rs and by real kubectl.

mod common;

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use common::start;
use futures::{SinkExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{AttachParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::{io::AsyncReadExt as _, io::AsyncWriteExt as _, net::TcpListener};
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::server::{Request, Response},
    http::HeaderValue,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

/// A stand-in agent: accepts exec WebSockets, records request paths, and echoes stdin
/// upper-cased on stdout until stdin closes (v5) — or after one chunk for the command
/// `once`, for clients on v4, which cannot close stdin — then reports success and closes.
async fn fake_agent() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let once = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let is_once = Arc::clone(&once);
                // tungstenite's callback signature fixes the (large) error type.
                #[allow(clippy::result_large_err)]
                let callback = move |req: &Request, mut resp: Response| {
                    let uri = req.uri().to_string();
                    is_once.store(
                        uri.contains("command=once"),
                        std::sync::atomic::Ordering::SeqCst,
                    );
                    record.lock().unwrap().push(uri);
                    let offered = req
                        .headers()
                        .get_all("sec-websocket-protocol")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(|v| v.split(',').map(str::trim).map(str::to_owned))
                        .collect::<Vec<_>>();
                    let pick = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
                        .into_iter()
                        .find(|p| offered.iter().any(|o| o == p))
                        .unwrap_or("v4.channel.k8s.io");
                    resp.headers_mut()
                        .insert("sec-websocket-protocol", HeaderValue::from_static(pick));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let Message::Binary(data) = msg else {
                        if msg.is_close() {
                            break;
                        }
                        continue;
                    };
                    match data.first() {
                        Some(0) => {
                            let mut out = vec![1u8];
                            out.extend(data[1..].to_ascii_uppercase());
                            let _ = ws.send(Message::Binary(out.into())).await;
                            if once.load(std::sync::atomic::Ordering::SeqCst) {
                                break;
                            }
                        }
                        // v5: the client closed stdin.
                        Some(255) if data.get(1) == Some(&0) => break,
                        _ => {}
                    }
                }
                let mut status = vec![3u8];
                status.extend(br#"{"metadata":{},"status":"Success"}"#);
                let _ = ws.send(Message::Binary(status.into())).await;
                // A normal close: kubectl reports anything else as an error.
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    }))
                    .await;
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_reach_the_agent() -> anyhow::Result<()> {
    // A stream that never ends must fail the test, not hang it.
    tokio::time::timeout(std::time::Duration::from_secs(60), exec_scenario())
        .await
        .map_err(|_| anyhow::anyhow!("the exec scenario did not finish in 60 s"))?
}

async fn exec_scenario() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (client, _stop) = start(dir.path()).await;
    let (agent_port, seen) = fake_agent().await;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}}))?,
        )
        .await?;
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": agent_port}}}});
    nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = json!({"metadata": {"name": "web"},
                     "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "busybox"}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(pod)?)
        .await?;

    // kube-rs over the API server's upgrade.
    let mut proc = pods
        .exec(
            "web",
            ["once"],
            &AttachParams::default()
                .stdin(true)
                .stdout(true)
                .stderr(false),
        )
        .await?;
    let mut stdin = proc.stdin().expect("stdin");
    let mut stdout = proc.stdout().expect("stdout");
    stdin.write_all(b"hello").await?;
    let mut buf = [0u8; 5];
    stdout.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"HELLO");
    drop(stdin);
    let status = proc.take_status().expect("status").await.expect("a status");
    assert_eq!(status.status.as_deref(), Some("Success"));
    let path = seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        path.starts_with("/exec/default/web/app?") && path.contains("command=once"),
        "{path}"
    );
    // Real kubectl (WebSocket, v5 protocol) with stdin piped.
    let kubeconfig = dir.path().join("kubeconfig");
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("/usr/lib/google-cloud-sdk/bin/kubectl.1.33")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["exec", "-i", "web", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"from kubectl\n")
            .unwrap();
        child.wait_with_output().expect("kubectl output")
    })
    .await?;
    assert!(
        out.status.success(),
        "kubectl exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "FROM KUBECTL\n");

    // A pod that is not on a node cannot be exec'd into.
    let loose = json!({"metadata": {"name": "loose"},
                       "spec": {"containers": [{"name": "app", "image": "busybox"}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(loose)?)
        .await?;
    let err = pods
        .exec("loose", ["true"], &AttachParams::default())
        .await
        .err()
        .expect("exec into an unbound pod fails");
    assert!(
        err.to_string().contains("400") || err.to_string().contains("host"),
        "{err}"
    );
    Ok(())
}
