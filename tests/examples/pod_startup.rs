//! Pod startup latency, driven by `cargo xtask bench runtime`: a single-member `keelson-server`
//! on loopback and one `keelson-agent node` in a network namespace and cgroup2 directory of its
//! own (the e2e harness's fixtures, release builds), the busybox test image imported. Pods
//! (busybox `sleep 3600`, no nodeName: the scheduler places them) are created in waves of
//! `--batch` concurrent creates; the next wave starts once every pod of the previous one is
//! Running. Latency per pod: from just before its create request to the watch event that first
//! shows it Running. Prints one line and writes JSON to `--out`; every pod is deleted and the
//! node and control plane are torn down on exit (also on failure, by the fixtures' guards).
//!
//! Run as root: `target/release/examples/pod_startup --pods 100 --batch 20 --out FILE`;
//! `--agent-log FILE` keeps the agent's log (with `KEELSON_E2E_AGENT_LOG=info,
//! keelson_agent::pods=debug` it has the agent's timings of each pod).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use futures::{StreamExt as _, future::try_join_all};
use k8s_openapi::api::core::v1::{Node, Pod};
use keelson_e2e::{cluster::ControlPlane, node::NodeEnv, oci_image::busybox_layout, require_root};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::{self, Event},
};
use serde_json::json;

const IMAGE: &str = "keelson.test/busybox:1";
const NAMESPACE: &str = "default";

struct Args {
    pods: usize,
    batch: usize,
    out: Option<PathBuf>,
    agent_log: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        pods: 100,
        batch: 20,
        out: None,
        agent_log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--pods" => args.pods = value()?.parse().context("--pods N")?,
            "--batch" => args.batch = value()?.parse().context("--batch N")?,
            "--out" => args.out = Some(PathBuf::from(value()?)),
            "--agent-log" => args.agent_log = Some(PathBuf::from(value()?)),
            other => bail!(
                "unknown argument {other} (expected --pods N, --batch N, --out FILE, \
                 --agent-log FILE)"
            ),
        }
    }
    ensure!(
        args.pods > 0 && args.batch > 0,
        "--pods and --batch must be positive"
    );
    Ok(args)
}

/// When the watch first showed each stage of a pod.
#[derive(Debug, Default, Clone, Copy)]
struct Stages {
    /// Bound to a node (`spec.nodeName` set).
    scheduled: Option<Instant>,
    /// The agent's first status (`status.hostIP` set).
    agent_status: Option<Instant>,
    /// Phase Running.
    running: Option<Instant>,
}

/// The stages seen so far, by pod name.
type Seen = Arc<Mutex<HashMap<String, Stages>>>;

fn pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "pod-startup-bench"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "sleep",
                "image": IMAGE,
                "command": ["sleep", "3600"],
            }],
        },
    }))?)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1);
    sorted.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn client(cp: &ControlPlane) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(cp.kubeconfig()).context("reading the kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("kube config")?;
    Ok(Client::try_from(config)?)
}

/// Follows every pod with a watch and records when each first reached each stage.
async fn follow(pods: Api<Pod>, seen: Seen, synced: tokio::sync::oneshot::Sender<()>) {
    let mut synced = Some(synced);
    let mut stream = std::pin::pin!(watcher::watcher(pods, watcher::Config::default()));
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        let pod = match event {
            Ok(Event::Apply(p) | Event::InitApply(p)) => p,
            Ok(Event::InitDone) => {
                if let Some(tx) = synced.take() {
                    let _ = tx.send(());
                }
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                eprintln!("pod watch: {e}");
                continue;
            }
        };
        let status = pod.status.as_ref();
        let running = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Running");
        let agent = status.is_some_and(|s| s.host_ip.is_some());
        let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
        if let Some(name) = pod.metadata.name
            && let Ok(mut seen) = seen.lock()
        {
            let stages = seen.entry(name).or_default();
            for (reached, at) in [
                (scheduled, &mut stages.scheduled),
                (agent, &mut stages.agent_status),
                (running, &mut stages.running),
            ] {
                if reached && at.is_none() {
                    *at = Some(now);
                }
            }
        }
    }
}

async fn node_ready(nodes: &Api<Node>, name: &str) -> Result<bool> {
    let Some(node) = nodes.get_opt(name).await? else {
        return Ok(false);
    };
    Ok(node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn bench(cp: &ControlPlane, env: &NodeEnv, args: &Args) -> Result<serde_json::Value> {
    let client = client(cp).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !node_ready(&nodes, env.name()).await? {
        ensure!(
            Instant::now() < deadline,
            "the Node did not turn Ready in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let seen: Seen = Arc::default();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn(follow(pods.clone(), Arc::clone(&seen), tx));
    rx.await
        .context("the pod watch ended before its first list")?;

    let wall = Instant::now();
    let mut created: HashMap<String, Instant> = HashMap::new();
    let names: Vec<String> = (0..args.pods).map(|i| format!("startup-{i:03}")).collect();
    for wave in names.chunks(args.batch) {
        let creates = wave.iter().map(|name| {
            let pods = pods.clone();
            async move {
                let body = pod(name)?;
                let at = Instant::now();
                pods.create(&PostParams::default(), &body)
                    .await
                    .with_context(|| format!("creating pod {name}"))?;
                Ok::<_, anyhow::Error>((name.clone(), at))
            }
        });
        created.extend(try_join_all(creates).await?);
        let wave_deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = {
                let seen = seen.lock().map_err(|_| anyhow::anyhow!("watch lock"))?;
                wave.iter()
                    .all(|n| seen.get(n).is_some_and(|s| s.running.is_some()))
            };
            if done {
                break;
            }
            ensure!(
                Instant::now() < wave_deadline,
                "pods of a wave not Running after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let wall = wall.elapsed();
    watch.abort();

    let seen = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("watch lock"))?
        .clone();
    let mut latencies: Vec<Duration> = created
        .iter()
        .filter_map(|(name, at)| {
            seen.get(name)
                .and_then(|s| s.running)
                .map(|r| r.saturating_duration_since(*at))
        })
        .collect();
    latencies.sort_unstable();
    ensure!(
        latencies.len() == args.pods,
        "not every pod was seen Running"
    );

    // Delete every pod and wait until they are gone, so the node tears down cleanly.
    let deleting = Instant::now();
    pods.delete_collection(
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
        &ListParams::default().labels("app=pod-startup-bench"),
    )
    .await
    .context("deleting the pods")?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = pods
            .list(&ListParams::default().labels("app=pod-startup-bench"))
            .await?
            .items
            .len();
        if left == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{left} pods not deleted after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deleted = deleting.elapsed();

    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let max = latencies.last().copied().unwrap_or_default();
    println!(
        "pod startup (create -> Running seen by watch): {} pods in waves of {}: p50 {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms, {:.1} s in all",
        args.pods,
        args.batch,
        ms(p50),
        ms(p99),
        ms(max),
        wall.as_secs_f64()
    );
    println!(
        "  all deleted (grace 0) and gone from the API in {:.1} s",
        deleted.as_secs_f64()
    );
    let breakdown = breakdown(&created, &seen);
    Ok(json!({
        "pods": args.pods,
        "batch": args.batch,
        "mode": "waves of `batch` concurrent creates, each wave after the previous is Running",
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
        "max_ms": ms(max),
        "wall_s": wall.as_secs_f64(),
        "deleted_s": deleted.as_secs_f64(),
        "breakdown": breakdown,
    }))
}

/// One step between two stages: its duration for a pod created at the given time.
type Step = fn(&Instant, &Stages) -> Option<Duration>;

/// p50/p99 (in ms) of each step between the stages (create → scheduled → the agent's first
/// status → Running), printed and returned as JSON: where the time goes.
fn breakdown(
    created: &HashMap<String, Instant>,
    seen: &HashMap<String, Stages>,
) -> serde_json::Value {
    let steps: [(&str, Step); 3] = [
        ("create_to_scheduled", |c, s| {
            s.scheduled.map(|t| t.saturating_duration_since(*c))
        }),
        ("scheduled_to_agent_status", |_, s| {
            Some(s.agent_status?.saturating_duration_since(s.scheduled?))
        }),
        ("agent_status_to_running", |_, s| {
            Some(s.running?.saturating_duration_since(s.agent_status?))
        }),
    ];
    let mut out = serde_json::Map::new();
    for (step, f) in steps {
        let mut d: Vec<Duration> = created
            .iter()
            .filter_map(|(name, at)| f(at, seen.get(name)?))
            .collect();
        d.sort_unstable();
        let (p50, p99) = (percentile(&d, 0.5), percentile(&d, 0.99));
        println!("  {step}: p50 {:.0} ms, p99 {:.0} ms", ms(p50), ms(p99));
        // Not `p50_ms`/`p99_ms`: the xtask reads the totals by those names.
        out.insert(step.to_owned(), json!({"p50": ms(p50), "p99": ms(p99)}));
    }
    serde_json::Value::Object(out)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    require_root()?;
    let cp = ControlPlane::start()?;
    let env = NodeEnv::new("kb-startup-node")?;
    let layout = tempfile::Builder::new().prefix("kb-image-").tempdir()?;
    busybox_layout(layout.path(), IMAGE)?;
    env.import_image(layout.path(), IMAGE)?;
    let agent = env.start_agent(&cp)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(&cp, &env, &args));
    // Pods are gone (or the node's guard kills what is left); stop the agent before its node.
    drop(agent);
    if let Some(path) = &args.agent_log {
        std::fs::copy(cp.dir().join("agent.log"), path)
            .with_context(|| format!("copying the agent log to {}", path.display()))?;
    }
    let result = match result {
        Ok(v) => v,
        Err(e) => {
            let log = std::fs::read_to_string(cp.dir().join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- agent log (last lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            return Err(e);
        }
    };
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec(&result)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
