//! Scheduler throughput: N fake nodes and P pending pods created through the API while the
//! scheduler runs; pods bound per second and create→bound latency (p50/p99), per node count.
//!
//! ```text
//! cargo run --release -p keelson-controllers --example bench_scheduler -- 500,5000 10000 target/bench/scheduler.json
//! ```
//! The API server runs in-process over the in-memory store (not the Raft store).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Pod};
use keelson_apiserver::{
    Config,
    server::{self, ServeOptions},
    storage::memory::MemoryStore,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use serde_json::json;
use tokio::time::Instant;

async fn start(
    dir: &std::path::Path,
) -> anyhow::Result<(Client, tokio::sync::oneshot::Sender<()>)> {
    let opts = ServeOptions {
        listen: "127.0.0.1:0".parse()?,
        pki_dir: dir.join("pki"),
        extra_sans: vec![],
        admin_kubeconfig: dir.join("kubeconfig"),
        token_file: None,
        config: Config::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server::run(Arc::new(MemoryStore::default()), opts, async {
            let _ = stopped.await;
        })
        .await;
    });
    let path = dir.join("kubeconfig");
    loop {
        if let Ok(k) = Kubeconfig::read_from(&path)
            && let Ok(c) =
                kube::Config::from_custom_kubeconfig(k, &KubeConfigOptions::default()).await
        {
            let client = Client::try_from(c)?;
            if client.apiserver_version().await.is_ok() {
                return Ok((client, stop));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Result1 {
    nodes: usize,
    pods: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn one(nodes: usize, pods: usize) -> anyhow::Result<Result1> {
    let dir = tempfile::tempdir()?;
    let (client, _stop) = start(dir.path()).await?;
    let node_api: Api<Node> = Api::all(client.clone());
    futures::stream::iter(0..nodes)
        .map(|i| {
            let api = node_api.clone();
            async move {
                let name = format!("node-{i}");
                let node: Node = serde_json::from_value(json!({"metadata": {"name": name}}))?;
                api.create(&PostParams::default(), &node).await?;
                let status = json!({"status": {"allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True"}]}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let opts = keelson_controllers::Options {
        leader_election: false,
        workloads: false,
        daemon_sets: false,
        jobs: false,
        endpoint_slices: false,
        endpoints: false,
        node_lifecycle: false,
        node_ipam: false,
        garbage_collector: false,
        ..keelson_controllers::Options::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let c = client.clone();
    tokio::spawn(async move { keelson_controllers::run(c, opts, s.cancelled_owned()).await });
    // Let the scheduler list the nodes before pods arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pod_api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let bound: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let b = Arc::clone(&bound);
    let w = pod_api.clone();
    let watch = tokio::spawn(async move {
        let mut events = watcher(w, watcher::Config::default()).boxed();
        while let Some(Ok(e)) = events.next().await {
            if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = e
                && p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
            {
                let mut m = b.lock().unwrap_or_else(|e| e.into_inner());
                m.entry(p.metadata.name.unwrap_or_default())
                    .or_insert_with(Instant::now);
                if m.len() >= pods {
                    return;
                }
            }
        }
    });
    let begin = Instant::now();
    let created: Vec<(String, Instant)> = futures::stream::iter(0..pods)
        .map(|i| {
            let api = pod_api.clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("p-{i}")},
                    "spec": {"containers": [{"name": "c", "image": "busybox:1",
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
                }))?;
                api.create(&PostParams::default(), &pod).await?;
                anyhow::Ok((format!("p-{i}"), Instant::now()))
            }
        })
        .buffer_unordered(64)
        .try_collect()
        .await?;
    eprintln!(
        "  created {pods} pods in {:.2}s",
        begin.elapsed().as_secs_f64()
    );
    tokio::time::timeout(Duration::from_secs(600), watch).await??;
    stop.cancel();
    let bound = bound.lock().unwrap_or_else(|e| e.into_inner());
    let end = bound.values().max().copied().unwrap_or(begin);
    let mut lat: Vec<f64> = created
        .iter()
        .filter_map(|(n, at)| {
            bound
                .get(n)
                .map(|b| b.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Result1 {
        nodes,
        pods,
        seconds: end.duration_since(begin).as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let nodes: Vec<usize> = args
        .get(1)
        .map_or("500,5000", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let pods: usize = args.get(2).map_or(Ok(10_000), |p| p.parse())?;
    let out = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "target/bench/scheduler.json".into());
    let mut rows = Vec::new();
    println!(
        "{:>6} {:>7} {:>9} {:>10} {:>9} {:>9}",
        "nodes", "pods", "seconds", "pods/s", "p50 ms", "p99 ms"
    );
    for n in nodes {
        let r = one(n, pods).await?;
        let rate = r.pods as f64 / r.seconds.max(1e-9);
        println!(
            "{:>6} {:>7} {:>9.2} {:>10.0} {:>9.1} {:>9.1}",
            r.nodes, r.pods, r.seconds, rate, r.p50_ms, r.p99_ms
        );
        rows.push(
            json!({"nodes": r.nodes, "pods": r.pods, "seconds": r.seconds, "pods_per_second": rate,
            "create_to_bound_p50_ms": r.p50_ms, "create_to_bound_p99_ms": r.p99_ms}),
        );
    }
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&json!({
            "suite": "scheduler", "store": "in-memory (in-process API server)", "cpus": cpus, "results": rows,
        }))?,
    )?;
    println!("wrote {out}");
    Ok(())
}
