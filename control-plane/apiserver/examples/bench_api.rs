//! API server benchmark, run by `cargo xtask bench api`: a single-member `keelson-server`
//! (Raft store on disk, fsync on every acknowledged write; no controllers) driven through
//! HTTPS with kube-rs.
//!
//! Phases: create N pods (C concurrent clients), get each, list them all (whole and in pages
//! of 500), single-object mutating calls one at a time (create, update, delete: the 10 ms p99
//! goal), and watch fan-out: W watchers on one pod while it is updated E times, with the
//! write-to-delivery latency of every event at every watcher.
//!
//! ```text
//! cargo run --release -p keelson-apiserver --example bench_api -- \
//!     --server target/release/keelson-server --out target/bench/api.json
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, TryStreamExt as _, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

/// The goal of the issue: single-object mutating calls p99 under 10 ms with one member.
const MUTATING_P99_GOAL_MS: f64 = 10.0;

struct Args {
    server: PathBuf,
    out: PathBuf,
    pods: usize,
    concurrency: usize,
    sequential: usize,
    watchers: usize,
    events: usize,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut args = Args {
            server: PathBuf::from("target/release/keelson-server"),
            out: PathBuf::from("target/bench/api.json"),
            pods: 10_000,
            concurrency: 16,
            sequential: 1000,
            watchers: 1000,
            events: 100,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            let number = || {
                value
                    .parse::<usize>()
                    .with_context(|| format!("{flag} {value}"))
            };
            match flag.as_str() {
                "--server" => args.server = value.clone().into(),
                "--out" => args.out = value.clone().into(),
                "--pods" => args.pods = number()?,
                "--concurrency" => args.concurrency = number()?.max(1),
                "--sequential" => args.sequential = number()?,
                "--watchers" => args.watchers = number()?,
                "--events" => args.events = number()?,
                other => bail!(
                    "unknown flag {other} (known: --server --out --pods --concurrency \
                     --sequential --watchers --events)"
                ),
            }
        }
        Ok(args)
    }
}

/// The server process; killed and reaped on drop.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start(binary: &Path) -> Result<(Server, Client)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    let child = Command::new(binary)
        .args(["--id", "1", "--init", "--no-controllers"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--api-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--admin-kubeconfig")
        .arg(dir.path().join("kubeconfig"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let kubeconfig = dir.path().join("kubeconfig");
    let server = Server { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(k) = Kubeconfig::read_from(&kubeconfig)
            && let Ok(c) =
                kube::Config::from_custom_kubeconfig(k, &KubeConfigOptions::default()).await
        {
            let client = Client::try_from(c)?;
            if client.apiserver_version().await.is_ok() {
                return Ok((server, client));
            }
        }
        if Instant::now() > deadline {
            bail!("keelson-server did not serve the API within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Latency percentiles of one phase, in milliseconds.
#[derive(serde::Serialize)]
struct Phase {
    calls: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Phase {
    fn of(mut samples: Vec<Duration>, wall: Duration) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        Phase {
            calls: samples.len(),
            per_second: samples.len() as f64 / wall.as_secs_f64().max(1e-9),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "api"}},
        "spec": {"containers": [{"name": "app", "image": "busybox:1.36",
                                 "command": ["sleep", "3600"]}]},
    }))
    .expect("a valid pod")
}

/// Runs `call` for every index with `concurrency` in flight; the latency of each call.
async fn timed<F, Fut>(n: usize, concurrency: usize, call: F) -> Result<Phase>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let started = Instant::now();
    let samples: Vec<Duration> = stream::iter(0..n)
        .map(|i| {
            let fut = call(i);
            async move {
                let t = Instant::now();
                fut.await.map(|()| t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    Ok(Phase::of(samples, started.elapsed()))
}

async fn watch_fan_out(client: &Client, watchers: usize, events: usize) -> Result<(Phase, usize)> {
    let ns = "bench-watch";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let created = pods.create(&PostParams::default(), &pod("target")).await?;
    let from = created
        .metadata
        .resource_version
        .context("created pod has no resourceVersion")?;
    // When each update was sent, by sequence number (set before the request goes out).
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; events]));
    let mut tasks = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        let pods = pods.clone();
        let sent = Arc::clone(&sent);
        let from = from.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(events);
            let params = WatchParams::default().timeout(290);
            let mut stream = pods.watch(&params, &from).await?.boxed();
            while seen.len() < events {
                let Some(event) = stream.try_next().await? else {
                    break;
                };
                if let WatchEvent::Modified(p) = event {
                    let seq: Option<usize> = p
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("seq"))
                        .and_then(|s| s.parse().ok());
                    let at = seq.and_then(|s| sent.lock().ok()?.get(s).copied().flatten());
                    if let Some(at) = at {
                        seen.push(at.elapsed());
                    }
                }
            }
            anyhow::Ok(seen)
        }));
    }
    // Let the watches establish before the first update.
    tokio::time::sleep(Duration::from_secs(2).max(Duration::from_millis(watchers as u64 * 3)))
        .await;
    let started = Instant::now();
    for seq in 0..events {
        if let Ok(mut s) = sent.lock() {
            s[seq] = Some(Instant::now());
        }
        let patch = json!({"metadata": {"annotations": {"seq": seq.to_string()}}});
        pods.patch("target", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut samples = Vec::with_capacity(watchers * events);
    let mut incomplete = 0;
    for t in tasks {
        let seen = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .context("watchers did not receive every event within 120 s")???;
        if seen.len() < events {
            incomplete += 1;
        }
        samples.extend(seen);
    }
    Ok((Phase::of(samples, started.elapsed()), incomplete))
}

fn print_row(name: &str, p: &Phase) {
    println!(
        "{name:<34} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
        p.calls, p.per_second, p.p50_ms, p.p99_ms, p.max_ms
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse()?;
    let (_server, client) = start(&args.server).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut results: BTreeMap<String, Phase> = BTreeMap::new();
    let n = args.pods;
    let c = args.concurrency;
    eprintln!("creating {n} pods with {c} concurrent clients…");
    results.insert(
        format!("create pods ({c} clients)"),
        timed(n, c, |i| {
            let pods = pods.clone();
            async move {
                pods.create(&PostParams::default(), &pod(&format!("p{i:05}")))
                    .await?;
                Ok(())
            }
        })
        .await?,
    );
    eprintln!("getting each pod…");
    results.insert(
        format!("get pod ({c} clients)"),
        timed(n, c, |i| {
            let pods = pods.clone();
            async move {
                pods.get(&format!("p{i:05}")).await?;
                Ok(())
            }
        })
        .await?,
    );
    eprintln!("listing all pods…");
    let listed = pods.list(&ListParams::default()).await?.items.len();
    if listed < n {
        bail!("a list returned {listed} pods, {n} were created");
    }
    results.insert(
        format!("list {n} pods (whole)"),
        timed(5, 1, |_| {
            let pods = pods.clone();
            async move {
                pods.list(&ListParams::default()).await?;
                Ok(())
            }
        })
        .await?,
    );
    results.insert(
        format!("list {n} pods (pages of 500)"),
        timed(3, 1, |_| {
            let pods = pods.clone();
            async move {
                let mut params = ListParams::default().limit(500);
                loop {
                    let page = pods.list(&params).await?;
                    match page.metadata.continue_.filter(|c| !c.is_empty()) {
                        Some(token) => params = params.continue_token(&token),
                        None => break,
                    }
                }
                Ok(())
            }
        })
        .await?,
    );
    let s = args.sequential;
    eprintln!("single-object mutating calls, one at a time ({s} each)…");
    let create = timed(s, 1, |i| {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &pod(&format!("s{i:05}")))
                .await?;
            Ok(())
        }
    })
    .await?;
    let update = timed(s, 1, |i| {
        let pods = pods.clone();
        async move {
            let patch = json!({"metadata": {"labels": {"round": i.to_string()}}});
            pods.patch(
                &format!("s{i:05}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    let delete = timed(s, 1, |i| {
        let pods = pods.clone();
        async move {
            // Unbound pods go at once (no node to stop them).
            pods.delete(&format!("s{i:05}"), &DeleteParams::default())
                .await?;
            Ok(())
        }
    })
    .await?;
    let worst_p99 = [&create, &update, &delete]
        .iter()
        .map(|p| p.p99_ms)
        .fold(0.0, f64::max);
    results.insert("create pod (1 client)".into(), create);
    results.insert("update pod (1 client)".into(), update);
    results.insert("delete pod (1 client)".into(), delete);
    let w = args.watchers;
    eprintln!("watch fan-out: {w} watchers, {} updates…", args.events);
    let (fan_out, incomplete) = watch_fan_out(&client, w, args.events).await?;
    results.insert(format!("watch delivery ({w} watchers)"), fan_out);

    println!(
        "{:<34} {:>7} {:>10} {:>9} {:>9} {:>9}",
        "phase", "calls", "per second", "p50 ms", "p99 ms", "max ms"
    );
    for (name, p) in &results {
        print_row(name, p);
    }
    println!(
        "single-object mutating calls, 1 member: worst p99 {worst_p99:.2} ms (goal < \
         {MUTATING_P99_GOAL_MS} ms): {}",
        if worst_p99 < MUTATING_P99_GOAL_MS {
            "met"
        } else {
            "NOT met"
        }
    );
    if incomplete > 0 {
        println!("{incomplete} of {w} watchers missed events");
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_vec_pretty(&json!({
            "pods": n, "concurrency": c, "sequential": s, "watchers": w, "events": args.events,
            "phases": results,
            "mutating_p99_ms": worst_p99, "goal_ms": MUTATING_P99_GOAL_MS,
            "watchers_missing_events": incomplete,
        }))?,
    )?;
    println!("results: {}", args.out.display());
    if incomplete > 0 {
        bail!("{incomplete} watchers missed events");
    }
    Ok(())
}
