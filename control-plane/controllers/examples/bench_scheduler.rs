//! Scheduler throughput, run by `cargo xtask bench scheduler`: N fake nodes (objects only, no
//! agents) and P pending pods, through the real API server and store.
//!
//! Per node count, on a fresh server:
//! 1. the nodes, then P pods are created while no scheduler runs (a backlog);
//! 2. the scheduler starts: pods bound per second until all P are bound (observed by watch);
//! 3. with the scheduler running, S more pods are created at full speed: create→bound p50/p99
//!    as a client sees it.
//!
//! ```text
//! cargo run --release -p keelson-controllers --example bench_scheduler -- \
//!     --server target/release/keelson-server --nodes 500,5000 --pods 10000 \
//!     --out target/bench/scheduler.json
//! ```
//! Without `--server` the API server runs in-process over the in-memory store.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Pod};
use keelson_apiserver::{
    Config,
    server::{self, ServeOptions},
    storage::memory::MemoryStore,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;
use tokio::time::Instant;

/// The same allocator as `keelson-server`, where the scheduler runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    server: Option<PathBuf>,
    nodes: Vec<usize>,
    pods: usize,
    stream: usize,
    concurrency: usize,
    /// With `--server`: the scheduler runs inside it (as in production) rather than here.
    scheduler_in_server: bool,
    out: PathBuf,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut args = Args {
            server: None,
            nodes: vec![500, 5000],
            pods: 10_000,
            stream: 2_000,
            concurrency: 64,
            scheduler_in_server: true,
            out: "target/bench/scheduler.json".into(),
        };
        let list: Vec<String> = std::env::args().skip(1).collect();
        for pair in list.chunks(2) {
            let [flag, value] = pair else {
                bail!("flags take a value: {pair:?}");
            };
            let number = || {
                value
                    .parse::<usize>()
                    .with_context(|| format!("{flag} {value}"))
            };
            match flag.as_str() {
                "--server" => args.server = Some(value.into()),
                "--nodes" => {
                    args.nodes = value
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .with_context(|| format!("--nodes {value}"))?;
                }
                "--pods" => args.pods = number()?,
                "--stream" => args.stream = number()?,
                "--concurrency" => args.concurrency = number()?.max(1),
                "--scheduler-in" => {
                    args.scheduler_in_server = match value.as_str() {
                        "server" => true,
                        "bench" => false,
                        other => bail!("--scheduler-in {other}: expected server or bench"),
                    }
                }
                "--out" => args.out = value.into(),
                other => bail!(
                    "unknown flag {other} (known: --server --nodes --pods --stream --scheduler-in \
                     --concurrency --out)"
                ),
            }
        }
        Ok(args)
    }
}

/// The API server: a `keelson-server` process (killed on drop) or an in-process one.
enum ApiServer {
    Process {
        child: Child,
        /// `child` is `perf`, running the server.
        under_perf: bool,
    },
    InProcess {
        _stop: tokio::sync::oneshot::Sender<()>,
    },
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let ApiServer::Process { child, under_perf } = self {
            if *under_perf {
                // The server under `perf` stops on SIGINT; `perf` then writes its report.
                let _ = Command::new("pkill")
                    .args(["-INT", "-P", &child.id().to_string()])
                    .status();
                let _ = child.wait();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn connect(kubeconfig: &Path, deadline: Instant) -> Result<Client> {
    loop {
        if let Ok(k) = Kubeconfig::read_from(kubeconfig)
            && let Ok(c) =
                kube::Config::from_custom_kubeconfig(k, &KubeConfigOptions::default()).await
        {
            let client = Client::try_from(c)?;
            if client.apiserver_version().await.is_ok() {
                return Ok(client);
            }
        }
        if Instant::now() > deadline {
            bail!("the API server did not come up within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a `keelson-server` process is started.
struct Launch<'a> {
    /// A fresh data directory (`--init`) or a restart on the existing one.
    init: bool,
    /// The scheduler (and no other controller) runs inside the server, with this many
    /// bindings in flight; `None`: no controllers.
    scheduler: Option<usize>,
    /// The API port (kept across a restart).
    port: u16,
    /// The server's output goes here (appended).
    log: &'a Path,
}

async fn start(
    binary: Option<&Path>,
    dir: &Path,
    launch: &Launch<'_>,
) -> Result<(ApiServer, Client)> {
    let kubeconfig = dir.join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(60);
    let server = match binary {
        Some(binary) => {
            let log = std::fs::File::options()
                .create(true)
                .append(true)
                .open(launch.log)?;
            // Profiling aid: `KEELSON_BENCH_PERF="record -o FILE …"` runs the restarted server
            // (the scheduler's run) under `perf` with these arguments.
            let perf = std::env::var("KEELSON_BENCH_PERF")
                .ok()
                .filter(|_| !launch.init);
            let mut cmd = match &perf {
                Some(perf_args) => {
                    let mut c = Command::new("perf");
                    c.args(perf_args.split_whitespace()).arg("--").arg(binary);
                    c
                }
                None => Command::new(binary),
            };
            cmd.args(["--id", "1"]);
            if launch.init {
                cmd.arg("--init");
            }
            match launch.scheduler {
                // Only the scheduler: fake nodes have no Leases (node lifecycle would taint
                // them) and nothing else is being measured.
                Some(concurrency) => {
                    for c in [
                        "workloads",
                        "daemonsets",
                        "jobs",
                        "endpointslices",
                        "endpoints",
                        "node-lifecycle",
                        "node-ipam",
                        "garbage-collector",
                        "pod-gc",
                        "token-cleaner",
                    ] {
                        cmd.args(["--disable-controller", c]);
                    }
                    cmd.args(["--event-ttl", "0"])
                        .arg("--scheduler-bind-concurrency")
                        .arg(concurrency.to_string());
                }
                None => {
                    cmd.arg("--no-controllers");
                }
            }
            let port = launch.port;
            let child = cmd
                .arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--api-listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--admin-kubeconfig")
                .arg(&kubeconfig)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            ApiServer::Process {
                child,
                under_perf: perf.is_some(),
            }
        }
        None => {
            let opts = ServeOptions {
                listen: "127.0.0.1:0".parse()?,
                pki_dir: dir.join("pki"),
                extra_sans: vec![],
                admin_kubeconfig: kubeconfig.clone(),
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
            ApiServer::InProcess { _stop: stop }
        }
    };
    let client = connect(&kubeconfig, deadline).await?;
    Ok((server, client))
}

async fn create_nodes(client: &Client, nodes: usize) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    futures::stream::iter(0..nodes)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("node-{i}");
                let node: Node = serde_json::from_value(json!({"metadata": {"name": name,
                    "labels": {"kubernetes.io/hostname": name}}}))?;
                api.create(&PostParams::default(), &node).await?;
                let status = json!({"status": {
                    "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True"}]}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Creates pods `from..to` (64 at a time); returns when each was created.
async fn create_pods(client: &Client, from: usize, to: usize) -> Result<Vec<(String, Instant)>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    futures::stream::iter(from..to)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("p-{i}");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"containers": [{"name": "c", "image": "busybox:1",
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
                }))?;
                api.create(&PostParams::default(), &pod).await?;
                anyhow::Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(64)
        .try_collect()
        .await
}

/// When each pod was first seen bound.
type Bound = Arc<Mutex<HashMap<String, Instant>>>;

/// What the bench reads of a pod: its name and node. Decoding only this keeps the measuring
/// client's share of the two cores small.
#[derive(Clone, Debug, serde::Deserialize)]
struct Seen {
    metadata: SeenMeta,
    spec: Option<SeenSpec>,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SeenMeta {
    name: Option<String>,
    resource_version: Option<String>,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SeenSpec {
    node_name: Option<String>,
}

/// The pods' collection revision, taken while nothing is bound yet: watching from it sees
/// every binding without listing the pods again after the scheduler starts.
async fn pods_revision(client: &Client) -> Result<String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = api
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await?;
    list.metadata
        .resource_version
        .context("the pod list has no resourceVersion")
}

/// Records when each pod is first seen bound, watching from `revision`; ends once `want`
/// pods are.
fn watch_bound(
    client: &Client,
    revision: String,
    want: usize,
) -> (Bound, tokio::task::JoinHandle<Result<()>>) {
    let bound: Bound = Arc::default();
    let b = Arc::clone(&bound);
    let client = client.clone();
    let task = tokio::spawn(async move {
        let mut revision = revision;
        loop {
            let request = kube::core::Request::new("/api/v1/namespaces/default/pods")
                .watch(&WatchParams::default().timeout(290), &revision)?;
            let mut events = client.request_events::<Seen>(request).await?.boxed();
            while let Some(event) = events.next().await {
                let pod = match event? {
                    WatchEvent::Added(p) | WatchEvent::Modified(p) => p,
                    WatchEvent::Error(e) => bail!("watching pods: {e:?}"),
                    WatchEvent::Deleted(_) | WatchEvent::Bookmark(_) => continue,
                };
                if let Some(rv) = &pod.metadata.resource_version {
                    revision.clone_from(rv);
                }
                if pod.spec.and_then(|s| s.node_name).is_some() {
                    let mut m = b.lock().unwrap_or_else(|e| e.into_inner());
                    m.entry(pod.metadata.name.unwrap_or_default())
                        .or_insert_with(Instant::now);
                    if m.len() >= want {
                        return Ok(());
                    }
                }
            }
        }
    });
    (bound, task)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(0.0)
}

struct Row {
    nodes: usize,
    create_per_s: f64,
    bound_per_s: f64,
    steady_per_s: f64,
    first_bound_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn one(args: &Args, nodes: usize) -> Result<Row> {
    let tmp = tempfile::tempdir()?;
    // `KEELSON_BENCH_KEEP=1` keeps the server's data and log (`server.log`) for a look.
    let dir = if std::env::var_os("KEELSON_BENCH_KEEP").is_some() {
        let kept = tmp.keep();
        println!("keeping {}", kept.display());
        kept
    } else {
        tmp.path().to_owned()
    };
    let dir = &dir;
    let mut launch = Launch {
        init: true,
        scheduler: None,
        port: std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
        log: &dir.join("server.log"),
    };
    let (mut server, mut client) = start(args.server.as_deref(), dir, &launch).await?;
    create_nodes(&client, nodes).await?;

    let begin = Instant::now();
    create_pods(&client, 0, args.pods).await?;
    let create_per_s = args.pods as f64 / begin.elapsed().as_secs_f64();

    let total = args.pods + args.stream;
    let revision = pods_revision(&client).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let started;
    let mut watch;
    let bound;
    if args.server.is_some() && args.scheduler_in_server {
        // As in production, the scheduler runs inside keelson-server: restart the server on
        // its data with the scheduler on. The clock starts before the restart, so the rate
        // includes the server's start, the Lease and the scheduler's initial lists.
        drop(server);
        launch.init = false;
        launch.scheduler = Some(args.concurrency);
        started = Instant::now();
        (server, client) = start(args.server.as_deref(), dir, &launch).await?;
        (bound, watch) = watch_bound(&client, revision, total);
    } else {
        (bound, watch) = watch_bound(&client, revision, total);
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
            pod_gc: false,
            event_ttl: Duration::ZERO,
            bind_concurrency: args.concurrency,
            ..keelson_controllers::Options::default()
        };
        let s = stop.clone();
        let c = client.clone();
        started = Instant::now();
        tokio::spawn(async move { keelson_controllers::run(c, opts, s.cancelled_owned()).await });
    }
    let _server = server;
    // The backlog drains…
    let deadline = started + Duration::from_secs(600);
    let backlog_done = loop {
        let (n, last) = {
            let m = bound.lock().unwrap_or_else(|e| e.into_inner());
            (m.len(), m.values().max().copied())
        };
        if n >= args.pods {
            break last.unwrap_or(started);
        }
        if Instant::now() > deadline {
            bail!("only {n} of {} pods bound within 600 s", args.pods);
        }
        if watch.is_finished() {
            (&mut watch).await??;
            bail!("the pod watch ended with {n} of {} pods bound", args.pods);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let bound_per_s = args.pods as f64 / backlog_done.duration_since(started).as_secs_f64();
    // How long the start took (server, Lease, the scheduler's initial lists) until the first
    // binding was seen.
    let first_bound_ms = {
        let m = bound.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .min()
            .map_or(0.0, |f| f.duration_since(started).as_secs_f64() * 1000.0)
    };
    // The rate once binding runs (as kube-scheduler's benchmarks count it): first to last.
    let steady_per_s = {
        let m = bound.lock().unwrap_or_else(|e| e.into_inner());
        let first = m.values().min().copied().unwrap_or(started);
        (args.pods.saturating_sub(1)) as f64
            / backlog_done.duration_since(first).as_secs_f64().max(1e-6)
    };
    // …then pods arriving one by one see the scheduler's latency.
    let streamed = create_pods(&client, args.pods, total).await?;
    tokio::time::timeout(Duration::from_secs(600), watch)
        .await
        .context("waiting for the streamed pods")???;
    stop.cancel();
    let bound = bound.lock().unwrap_or_else(|e| e.into_inner());
    let mut lat: Vec<f64> = streamed
        .iter()
        .filter_map(|(n, at)| {
            let b = bound.get(n)?;
            Some(b.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    Ok(Row {
        nodes,
        create_per_s,
        bound_per_s,
        steady_per_s,
        first_bound_ms,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse()?;
    let store = match &args.server {
        Some(s) => format!("keelson-server {} (Raft, write-ahead log)", s.display()),
        None => "in-memory (in-process API server)".into(),
    };
    let scheduler = if args.server.is_some() && args.scheduler_in_server {
        "inside keelson-server (in-process API client)"
    } else {
        "in the bench process (HTTPS client)"
    };
    println!(
        "{} pending pods, then {} streamed; {} bindings in flight; API: {store}; scheduler: \
         {scheduler}",
        args.pods, args.stream, args.concurrency
    );
    println!(
        "bound/s counts from the scheduler's start (a server restart when it runs inside); \
         steady/s from the first binding to the last"
    );
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>15} {:>14} {:>14}",
        "nodes",
        "creates/s",
        "bound/s",
        "steady/s",
        "first bound ms",
        "stream p50 ms",
        "stream p99 ms"
    );
    let mut rows = Vec::new();
    for &n in &args.nodes {
        let r = one(&args, n).await?;
        println!(
            "{:>6} {:>12.0} {:>12.0} {:>12.0} {:>15.0} {:>14.1} {:>14.1}",
            r.nodes,
            r.create_per_s,
            r.bound_per_s,
            r.steady_per_s,
            r.first_bound_ms,
            r.p50_ms,
            r.p99_ms
        );
        rows.push(
            json!({"nodes": r.nodes, "pods": args.pods, "creates_per_second": r.create_per_s,
            "bound_per_second": r.bound_per_s, "steady_bound_per_second": r.steady_per_s,
            "first_bound_ms": r.first_bound_ms,
            "stream_pods": args.stream,
            "stream_create_to_bound_p50_ms": r.p50_ms, "stream_create_to_bound_p99_ms": r.p99_ms}),
        );
    }
    println!(
        "reference: kube-scheduler's CI threshold is 680 pods/s (10k pods, 5000 nodes); \
         goal here: 5000 pods/s"
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    std::fs::write(
        &args.out,
        serde_json::to_vec_pretty(&json!({
            "suite": "scheduler", "api": store, "scheduler": scheduler, "cpus": cpus,
            "bind_concurrency": args.concurrency, "results": rows,
        }))?,
    )?;
    println!("wrote {}", args.out.display());
    Ok(())
}
