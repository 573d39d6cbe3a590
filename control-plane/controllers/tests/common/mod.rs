//! A test cluster: an in-process API server over the in-memory store, fake nodes (Node
//! objects whose Leases a task renews, no agents) and a fake kubelet that gives bound pods an
//! IP and readiness (or lets them exit, see [`EXIT_CODE`]) and finishes their deletion, as an
//! agent would — until its node "dies".

#![allow(dead_code)]

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use keelson_apiserver::{
    Config,
    server::{self, ServeOptions},
    storage::memory::MemoryStore,
};
use keelson_controllers::Options;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Pods with this annotation are not made ready by the fake kubelet.
pub const MANUAL_READY: &str = "test.keelson.io/manual-ready";
/// Pods with this annotation "exit" with its value as soon as they run: `0` makes them
/// `Succeeded`, anything else `Failed` — or, under `restartPolicy: OnFailure`, restarted
/// (their restart count grows, up to 10).
pub const EXIT_CODE: &str = "test.keelson.io/exit-code";
/// The kubectl the tests drive.
pub const KUBECTL: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";

pub struct Cluster {
    pub client: Client,
    pub stop: CancellationToken,
    /// Stops the controllers started with the cluster.
    pub first: CancellationToken,
    alive: Arc<Mutex<HashMap<String, bool>>>,
    dir: tempfile::TempDir,
    _server: tokio::sync::oneshot::Sender<()>,
}

/// Options with timings short enough for tests.
pub fn fast_options() -> Options {
    Options {
        identity: "test".into(),
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(200),
        scheduler_backoff_initial: Duration::from_millis(100),
        scheduler_backoff_max: Duration::from_millis(500),
        scheduler_retry_unschedulable: Duration::from_secs(2),
        node_monitor_grace: Duration::from_millis(1500),
        node_monitor_period: Duration::from_millis(200),
        default_toleration: Duration::from_secs(1),
        gc_period: Duration::from_millis(500),
        pod_gc_period: Duration::from_millis(200),
        pod_gc_quarantine: Duration::from_millis(500),
        ..Options::default()
    }
}

pub async fn start_server() -> (Client, tempfile::TempDir, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = ServeOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        pki_dir: dir.path().join("pki"),
        extra_sans: vec![],
        admin_kubeconfig: dir.path().join("kubeconfig"),
        token_file: None,
        config: Config::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        server::run(Arc::new(MemoryStore::default()), opts, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    let path = dir.path().join("kubeconfig");
    // The kubeconfig may be caught half-written: read it until it parses.
    let config = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(k) = Kubeconfig::read_from(&path)
                && let Ok(c) =
                    kube::Config::from_custom_kubeconfig(k, &KubeConfigOptions::default()).await
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the server did not start");
    let client = Client::try_from(config).expect("client");
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    wait_for("the API server", Duration::from_secs(20), || {
        let ns = ns.clone();
        async move { ns.get_opt("kube-node-lease").await.ok().flatten().is_some() }
    })
    .await;
    (client, dir, stop)
}

impl Cluster {
    /// A server, the controllers with `opts`, and the fake kubelet.
    pub async fn start(opts: Options) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let (client, dir, server) = start_server().await;
        let stop = CancellationToken::new();
        let cluster = Cluster {
            client: client.clone(),
            first: stop.child_token(),
            stop: stop.clone(),
            alive: Arc::new(Mutex::new(HashMap::new())),
            dir,
            _server: server,
        };
        cluster.spawn_controllers(opts, cluster.first.clone());
        tokio::spawn(fake_kubelet(
            cluster.client.clone(),
            Arc::clone(&cluster.alive),
            stop.clone(),
        ));
        cluster
    }

    /// Runs (another) controller manager until `stop`.
    pub fn spawn_controllers(&self, opts: Options, stop: CancellationToken) {
        let client = self.client.clone();
        tokio::spawn(async move {
            keelson_controllers::run(client, opts, stop.cancelled_owned())
                .await
                .expect("controllers");
        });
    }

    /// Adds a node with `cpu` cores and `memory`, ready, renewing its Lease every 200 ms.
    pub async fn add_node(&self, name: &str, cpu: &str, memory: &str, taints: serde_json::Value) {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"taints": taints},
        }))
        .expect("node");
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        let status = json!({"status": {
            "capacity": {"cpu": cpu, "memory": memory, "pods": "110"},
            "allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        }});
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .expect("node status");
        self.alive
            .lock()
            .expect("lock")
            .insert(name.to_owned(), true);
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let (alive, name, stop) = (Arc::clone(&self.alive), name.to_owned(), self.stop.clone());
        tokio::spawn(async move {
            let mut created = false;
            loop {
                if alive.lock().expect("lock").get(&name) == Some(&true) {
                    let now = jiff::Timestamp::now().to_string();
                    if !created {
                        let lease: Lease = serde_json::from_value(json!({
                            "metadata": {"name": name, "namespace": "kube-node-lease"},
                            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now},
                        }))
                        .expect("lease");
                        created = match leases.create(&PostParams::default(), &lease).await {
                            Ok(_) => true,
                            Err(kube::Error::Api(s)) => s.code == 409,
                            Err(_) => false,
                        };
                    } else {
                        let renew = json!({"spec": {"renewTime": now}});
                        let _ = leases
                            .patch(&name, &PatchParams::default(), &Patch::Merge(renew))
                            .await;
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
    }

    /// Waits until the scheduler has `node`, with its capacity, in its cache (as Kubernetes'
    /// integration tests wait for nodes in the scheduler's cache): a pod pinned to the node is
    /// bound to it, then deleted; `labels` the node must have been seen with. Its informers see a new node some time after the API does, and a
    /// test that creates pods at once could otherwise have them placed while a node is missing
    /// (seen in CI: three pods of one ReplicaSet on two nodes, no Event saying why, since the
    /// other nodes fit).
    pub async fn in_scheduler_cache(&self, node: &str, labels: serde_json::Value) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "default");
        let name = format!("canary-{node}");
        let mut selector = json!({"kubernetes.io/hostname": node});
        if let (Some(s), Some(extra)) = (selector.as_object_mut(), labels.as_object()) {
            s.extend(extra.clone());
        }
        let canary: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeSelector": selector,
                "containers": [{"name": "c", "image": "busybox:1",
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
        }))
        .expect("canary");
        pods.create(&PostParams::default(), &canary)
            .await
            .expect("create canary");
        wait_for(
            &format!("the scheduler places a pod on {node}"),
            Duration::from_secs(20),
            || {
                let pods = pods.clone();
                let name = name.clone();
                async move {
                    pods.get(&name)
                        .await
                        .is_ok_and(|p| p.spec.and_then(|s| s.node_name).as_deref() == Some(node))
                }
            },
        )
        .await;
        pods.delete(&name, &DeleteParams::default().grace_period(0))
            .await
            .expect("delete canary");
        wait_for(&format!("{name} gone"), Duration::from_secs(20), || {
            let pods = pods.clone();
            let name = name.clone();
            async move { matches!(pods.get_opt(&name).await, Ok(None)) }
        })
        .await;
    }

    /// The admin kubeconfig of the cluster's API server, for kubectl.
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Stops a node's agent: its Lease is no longer renewed and its pods are left as they are.
    pub fn kill_node(&self, name: &str) {
        self.alive
            .lock()
            .expect("lock")
            .insert(name.to_owned(), false);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Plays every live node's agent: bound pods get an IP, `Running` and `Ready` (unless
/// annotated [`MANUAL_READY`]); deleted pods are removed once "stopped".
async fn fake_kubelet(
    client: Client,
    alive: Arc<Mutex<HashMap<String, bool>>>,
    stop: CancellationToken,
) {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut next_ip: HashMap<String, u32> = HashMap::new();
    let mut node_index: HashMap<String, u32> = HashMap::new();
    loop {
        let pod = tokio::select! {
            () = stop.cancelled() => return,
            p = events.next() => match p {
                Some(Ok(p)) => p,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if alive.lock().expect("lock").get(&node) != Some(&true) {
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        if pod.metadata.deletion_timestamp.is_some() {
            let _ = api
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
            continue;
        }
        let status = pod.status.clone().unwrap_or_default();
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let exit: Option<i32> = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(EXIT_CODE))
            .and_then(|c| c.parse().ok());
        let restart_on_failure =
            pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) == Some("OnFailure");
        let restarts = status
            .container_statuses
            .as_ref()
            .and_then(|c| c.first())
            .map_or(0, |c| c.restart_count);
        let running = status.phase.as_deref() == Some("Running") && status.pod_ip.is_some();
        if running && !(exit.is_some_and(|c| c != 0) && restart_on_failure && restarts < 10) {
            continue;
        }
        let ip = match status.pod_ip.clone() {
            Some(ip) => ip,
            None => {
                let n = node_index.len() as u32;
                let idx = *node_index.entry(node.clone()).or_insert(n);
                let host = next_ip.entry(node.clone()).or_insert(1);
                *host += 1;
                format!("10.200.{idx}.{host}")
            }
        };
        let manual = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MANUAL_READY));
        let now = jiff::Timestamp::now().to_string();
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let (phase, ready, restarts, state) = match exit {
            Some(code) if code != 0 && restart_on_failure => (
                "Running",
                "False",
                restarts + 1,
                json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            ),
            Some(code) => (
                if code == 0 { "Succeeded" } else { "Failed" },
                "False",
                restarts,
                json!({"terminated": {"exitCode": code, "finishedAt": now}}),
            ),
            None => (
                "Running",
                if manual { "False" } else { "True" },
                restarts,
                json!({"running": {"startedAt": now}}),
            ),
        };
        let patch = json!({"status": {
            "phase": phase,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": ready, "lastTransitionTime": now},
            ],
            "containerStatuses": [{"name": container, "image": "test", "imageID": "",
                "ready": ready == "True", "restartCount": restarts, "state": state}],
        }});
        let _ = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await;
    }
}

/// Polls `check` until it holds, or panics after `timeout` naming `what`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pods matching `labels` that are not being deleted.
pub async fn live_pods(client: &Client, ns: &str, labels: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.list(&kube::api::ListParams::default().labels(labels))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}
