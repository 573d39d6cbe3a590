//! `keelson-bench dataplane`: the cost a Service adds to a connection, with 100, 1,000 and
//! 10,000 services, for Keelson's eBPF socket load balancer, kube-proxy's iptables layout,
//! IPVS, and a connect straight to the pod address as the floor. For every system, scale and
//! round a fresh [`topology`] is built (a client pod, the node holding the service rules and a
//! server namespace with the backends, joined by veths; the client in a cgroup2 directory of
//! its own; client and echo server pinned to CPUs), the services installed, a client process
//! in the pod's namespace and cgroup measures first-connection latency (and the `connect(2)`
//! call alone) and short-connection throughput over randomly chosen services, and the time to
//! add one service is taken (for eBPF also a Maglev service's). Every namespace, cgroup, rule,
//! pin and process is removed afterwards, also on failure and Ctrl-C.

mod ebpf;
mod iptables;
mod ipvs;
mod netns;
mod probe;
mod report;
mod topology;

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

pub use probe::{ClientArgs, ServerArgs, client, serve};

use crate::machine;
use netns::NetnsExt as _;
use probe::ClientResult;
use report::{Point, Report, SYSTEMS, Workload};
use topology::{BACKENDS, Pinning, Placement, SERVICE_PORT, Topology, backend, service_vip};

/// Options of the dataplane benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct DataplaneArgs {
    /// Directory for `dataplane.json` and `dataplane.svg`.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Systems to measure (comma-separated; ratios need `direct` and `iptables`).
    #[arg(long, value_delimiter = ',', default_values_t = SYSTEMS.map(String::from))]
    systems: Vec<String>,
    /// Numbers of services (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    services: Vec<u32>,
    /// Endpoints per service.
    #[arg(long, default_value_t = 2)]
    endpoints: u32,
    /// Unmeasured connections before the latency samples.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// Sequential connections timed per point for latency (over all rounds).
    #[arg(long, default_value_t = 6000)]
    samples: usize,
    /// Seconds of the short-connection throughput run per point (over all rounds).
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    /// Concurrent connection loops in the throughput run.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// One-service adds timed per point (eBPF; iptables and IPVS take at most 5).
    #[arg(long, default_value_t = 50)]
    update_samples: u32,
    /// Rounds per point: each round runs every system in turn with a share of the samples
    /// and seconds, so that noise from other work spreads over all of them.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Full iptables restores timed per point, for reference.
    #[arg(long, default_value_t = 2)]
    full_restores: u32,
    /// The `iptables-restore` to compare with. Legacy by default: `iptables-nft-restore`
    /// 1.8.9 needs minutes to load 10,000 services here (19 s for 3,000), legacy seconds.
    #[arg(long, default_value = "iptables-legacy-restore")]
    iptables_restore: PathBuf,
    /// The `ipvsadm` binary.
    #[arg(long, default_value = "ipvsadm")]
    ipvsadm: PathBuf,
    /// Where the client runs: in a pod's namespace (its packets cross the node's PREROUTING
    /// and FORWARD hooks) or in the node's (a host-network client: OUTPUT).
    #[arg(long, value_enum, default_value_t = Placement::Pod)]
    client: Placement,
    /// Keep each system's first topology for every round (by default every round builds
    /// the system's namespaces, cgroup and rules afresh, so that one topology's placement in
    /// memory does not bias a whole point).
    #[arg(long)]
    keep_topology: bool,
    /// Which CPUs the client and the echo server run on: `split` puts them on two different
    /// CPUs (the first two the benchmark may use), `same` on one, `none` leaves it to the
    /// scheduler (whose choices differ from one system's processes to the next: ±15% on
    /// this 2-core machine between otherwise identical systems).
    #[arg(long, value_enum, default_value_t = Pinning::Split)]
    pin: Pinning,
    /// Leave out the node's pod-network NAT table (then only the iptables system tracks
    /// connections, as in the first version of this benchmark).
    #[arg(long)]
    no_node_nat: bool,
    /// Maglev service adds and endpoint changes timed per point (eBPF).
    #[arg(long, default_value_t = 20)]
    maglev_samples: u32,
}

/// How the driver was compiled (the client, the echo server and the map writes run in it).
const DRIVER_BUILD: &str = if cfg!(debug_assertions) {
    "debug (unoptimised)"
} else {
    "optimised"
};

/// The pause after rebuilding topologies, before the next round is timed.
const SETTLE: Duration = Duration::from_secs(2);

/// Most one-service adds timed for the systems driven through a process per change.
const SLOW_UPDATE_SAMPLES: u32 = 5;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs the benchmark on a thread of its own; if this future is dropped (Ctrl-C), the run is
/// told to stop and waited for, so that its guards remove everything it made.
///
/// # Errors
/// Not root, a topology or system cannot be set up, or the results cannot be written.
pub async fn run(args: DataplaneArgs) -> Result<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let result = run_blocking(&args);
        let _ = done_tx.send(());
        result
    });
    let mut guard = JoinOnDrop(Some(thread));
    let _ = done_rx.await;
    guard.join()
}

struct JoinOnDrop(Option<std::thread::JoinHandle<Result<()>>>);

impl JoinOnDrop {
    fn join(&mut self) -> Result<()> {
        match self.0.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if self.0.is_some() {
            INTERRUPTED.store(true, Ordering::Relaxed);
            eprintln!("interrupted: cleaning up");
            let _ = self.join();
        }
    }
}

fn run_blocking(args: &DataplaneArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the dataplane benchmark needs root (network namespaces, cgroups, BPF, iptables)");
    }
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tmp = tempfile::Builder::new()
        .prefix("kb-dataplane-")
        .tempdir()
        .context("creating a temporary directory")?;
    let machine = machine::probe(tmp.path());
    let iptables_version = iptables::Restore {
        binary: &args.iptables_restore,
        netns: &netns::Netns::new()?,
    }
    .version();
    report::print_header();
    let mut points = Vec::new();
    for &n in &args.services {
        let mut prepared = Vec::new();
        for system in SYSTEMS
            .into_iter()
            .filter(|s| args.systems.iter().any(|a| a == s))
        {
            check_interrupted()?;
            prepared.push(
                Prepared::new(args, system, n)
                    .with_context(|| format!("setting up {system} with {n} services"))?,
            );
        }
        // Rounds alternate between the systems so that noise from other work on the machine
        // spreads over all of them; every other round runs them in reverse order, so that a
        // drift (the machine warming up, a neighbour starting) does not favour the first.
        let rounds = args.rounds.max(1);
        for round in 0..rounds {
            if round > 0 && !args.keep_topology {
                for p in &mut prepared {
                    check_interrupted()?;
                    p.rebuild(args).with_context(|| {
                        format!("rebuilding {} with {n} services", p.point.system)
                    })?;
                }
                // The kernel tears removed namespaces down in the background (conntrack,
                // 10,000 services' rules): let that finish before anything is timed.
                std::thread::sleep(SETTLE);
            }
            let order: Box<dyn Iterator<Item = &mut Prepared>> = if round % 2 == 0 {
                Box::new(prepared.iter_mut())
            } else {
                Box::new(prepared.iter_mut().rev())
            };
            for p in order {
                check_interrupted()?;
                p.traffic(args, round, tmp.path())
                    .with_context(|| format!("{} with {n} services", p.point.system))?;
            }
        }
        for mut p in prepared {
            check_interrupted()?;
            p.finish(args)
                .with_context(|| format!("updating {} with {n} services", p.point.system))?;
            report::print_row(&p.point);
            if p.point.system == "ebpf" {
                report::print_updates(&p.point);
            }
            points.push(p.point.clone());
        }
    }
    let ratios = report::ratios(&points, &args.services);
    let goals = report::goals(&points, &ratios, &args.services);
    let report = Report {
        suite: "dataplane",
        started_unix_s,
        machine,
        workload: Workload {
            services: args.services.clone(),
            endpoints_per_service: args.endpoints,
            backend_addresses: BACKENDS,
            warmup: args.warmup,
            latency_samples: args.samples,
            throughput_s: args.seconds,
            throughput_threads: args.threads,
            iptables: iptables_version,
            method: "each connection: socket, blocking TCP connect to a randomly chosen \
                     service's cluster IP (direct: a backend's address), send 1 byte, read 1 \
                     byte back (first-connection latency stops here; connect alone is timed \
                     too), close with RST; the client runs in a pod namespace (or the node's) \
                     and a cgroup2 directory of its own, the service rules in the node's \
                     namespace, the backends in a third namespace behind a veth; a fresh \
                     topology per system, scale and round (unless --keep-topology), the \
                     client and the echo server on the CPUs --pin gives them"
                .into(),
            placement: match args.client {
                Placement::Pod => "pod",
                Placement::Node => "node",
            },
            node_nat: !args.no_node_nat,
            cpus: args.pin.cpus()?,
            driver_build: DRIVER_BUILD,
        },
        points,
        ratios,
        goals,
    };
    report::print_summary(&report);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = args.out.join("dataplane.json");
    let svg = args.out.join("dataplane.svg");
    report::write_json(&report, &json)?;
    report::write_svg(&report, &svg)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

/// What a system holds in place while it is measured.
enum Installed {
    /// Nothing: connects go straight to the pods.
    Direct,
    /// The eBPF load balancer (detached on drop).
    Ebpf(ebpf::EbpfLb),
    /// kube-proxy's iptables rules (gone with the client namespace); the full ruleset.
    Iptables(String),
    /// IPVS services (gone with the client namespace).
    Ipvs,
}

/// One system set up at one scale in its own topology, collecting its measurements.
struct Prepared {
    point: Point,
    // Dropped before the topology: the load balancer is detached while its cgroup exists.
    installed: Option<Installed>,
    topo: Option<Topology>,
    targets: Vec<SocketAddrV4>,
    latencies_us: Vec<f64>,
    connect_us: Vec<f64>,
    closed_us: Vec<f64>,
    completed: u64,
    elapsed_s: f64,
}

impl Prepared {
    /// Builds a topology and installs `n` services of `system` in it. A system this machine
    /// cannot run (IPVS without kernel support) is recorded as unavailable.
    fn new(args: &DataplaneArgs, system: &'static str, n: u32) -> Result<Self> {
        let (_, server_cpu) = args.pin.cpus()?;
        let options = topology::Options {
            placement: args.client,
            server_cpu,
            node_nat: !args.no_node_nat,
        };
        let topo = Topology::new(&format!("{system}-{n}"), options)?;
        let mut point = Point::new(system, n);
        let vips: Vec<SocketAddrV4> = (0..n)
            .map(|k| SocketAddrV4::new(service_vip(k), SERVICE_PORT))
            .collect();
        let per = args.endpoints;
        let (installed, targets) = match system {
            "direct" => (Installed::Direct, (0..BACKENDS).map(backend).collect()),
            "ebpf" => {
                let (lb, load) = ebpf::EbpfLb::install(topo.cgroup(), n, per)?;
                point.load_ms = Some(ms(load));
                (Installed::Ebpf(lb), vips)
            }
            "iptables" => {
                let restore = iptables::Restore {
                    binary: &args.iptables_restore,
                    netns: topo.node(),
                };
                restore.base()?;
                let rules = iptables::full_sync(n, per);
                point.load_ms = Some(ms(restore.restore(&rules)?));
                (Installed::Iptables(rules), vips)
            }
            "ipvs" => {
                let ipvs = ipvs::Ipvs {
                    binary: &args.ipvsadm,
                    netns: topo.node(),
                };
                if let Err(why) = ipvs.probe() {
                    point.unavailable = Some(format!(
                        "IPVS does not work here (kernel built without CONFIG_IP_VS, or \
                         ipvsadm missing): {why}"
                    ));
                    return Ok(Prepared::empty(point));
                }
                point.load_ms = Some(ms(ipvs.install(n, per)?));
                (Installed::Ipvs, vips)
            }
            other => bail!("unknown system {other}"),
        };
        Ok(Prepared {
            point,
            installed: Some(installed),
            topo: Some(topo),
            targets,
            latencies_us: Vec::new(),
            connect_us: Vec::new(),
            closed_us: Vec::new(),
            completed: 0,
            elapsed_s: 0.0,
        })
    }

    /// Replaces the topology and the installed system with fresh ones, keeping what was
    /// measured so far, so that a point averages over several topologies rather than
    /// carrying one topology's luck (where its memory landed, hash seeds) through every round.
    fn rebuild(&mut self, args: &DataplaneArgs) -> Result<()> {
        if self.topo.is_none() {
            return Ok(());
        }
        // The load balancer before the topology (its cgroup), as on drop.
        self.installed = None;
        self.topo = None;
        let fresh = Prepared::new(args, self.point.system, self.point.services)?;
        self.installed = fresh.installed;
        self.topo = fresh.topo;
        Ok(())
    }

    fn empty(point: Point) -> Self {
        Prepared {
            point,
            installed: None,
            topo: None,
            targets: Vec::new(),
            latencies_us: Vec::new(),
            connect_us: Vec::new(),
            closed_us: Vec::new(),
            completed: 0,
            elapsed_s: 0.0,
        }
    }

    /// One round of the client against this system's targets.
    fn traffic(&mut self, args: &DataplaneArgs, round: usize, tmp: &Path) -> Result<()> {
        let Some(topo) = &self.topo else {
            return Ok(());
        };
        let rounds = args.rounds.max(1);
        let file = tmp.join(format!(
            "targets-{}-{}",
            self.point.system, self.point.services
        ));
        let text: String = self.targets.iter().map(|t| format!("{t}\n")).collect();
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        let mut cmd = Command::new(std::env::current_exe().context("locating keelson-bench")?);
        cmd.arg("dataplane-client")
            .arg("--targets")
            .arg(&file)
            .args(["--warmup", &(args.warmup / rounds).to_string()])
            .args(["--samples", &(args.samples / rounds).to_string()])
            .args(["--seconds", &(args.seconds / rounds as f64).to_string()])
            .args(["--threads", &args.threads.to_string()])
            .args(["--seed", &round.to_string()]);
        if let (Some(cpu), _) = args.pin.cpus()? {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let placed = topo.client().place(&mut cmd, Some(topo.cgroup()))?;
        let child = cmd.spawn().context("starting the client")?;
        drop(placed);
        let out = child.wait_with_output()?;
        let _ = std::fs::remove_file(&file);
        if !out.status.success() {
            bail!(
                "the client failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let r: ClientResult = serde_json::from_str(stdout.trim())
            .with_context(|| format!("parsing the client's output {stdout:?}"))?;
        self.latencies_us.extend(r.latencies_us);
        self.connect_us.extend(r.connect_us);
        self.closed_us.extend(r.closed_us);
        self.completed += r.completed;
        self.elapsed_s += r.elapsed_s;
        self.point.errors += r.errors;
        if self.point.first_error.is_none() {
            self.point.first_error = r.first_error;
        }
        Ok(())
    }

    /// Summarises the traffic, then times one-service adds (after the traffic, so that the
    /// services measured are exactly `n`).
    fn finish(&mut self, args: &DataplaneArgs) -> Result<()> {
        let (Some(installed), Some(topo)) = (&self.installed, &self.topo) else {
            return Ok(());
        };
        let sorted = sorted_copy(&self.latencies_us);
        let connect = sorted_copy(&self.connect_us);
        let closed = sorted_copy(&self.closed_us);
        let point = &mut self.point;
        point.samples = sorted.len();
        point.p50_us = probe::quantile(&sorted, 0.5);
        point.p99_us = probe::quantile(&sorted, 0.99);
        point.mean_us =
            (!sorted.is_empty()).then(|| sorted.iter().sum::<f64>() / sorted.len() as f64);
        point.connect_p50_us = probe::quantile(&connect, 0.5);
        point.connect_p99_us = probe::quantile(&connect, 0.99);
        point.closed_p50_us = probe::quantile(&closed, 0.5);
        point.closed_p99_us = probe::quantile(&closed, 0.99);
        point.requests_per_s =
            (self.elapsed_s > 0.0).then(|| self.completed as f64 / self.elapsed_s);

        let (n, per) = (point.services, args.endpoints);
        let slow_samples = args.update_samples.min(SLOW_UPDATE_SAMPLES);
        match installed {
            Installed::Direct => {}
            Installed::Ebpf(lb) => {
                let adds = lb.time_adds(n, args.update_samples, per)?;
                record_adds(point, adds.iter().map(|s| s.wall).collect());
                point.add_one_p99_ms = p99(&adds);
                point.add_one_slow = slow(&adds);
                if args.maglev_samples > 0 {
                    let m = lb.time_maglev(n, args.maglev_samples, per)?;
                    point.maglev_samples = m.adds.len();
                    let wall = |v: &[ebpf::Sample]| v.iter().map(|s| s.wall).collect::<Vec<_>>();
                    let (mut adds, mut changes) = (wall(&m.adds), wall(&m.changes));
                    point.maglev_add_p50_ms = median(&mut adds).map(ms);
                    point.maglev_add_p99_ms = p99(&m.adds);
                    point.maglev_add_max_ms = adds.iter().max().copied().map(ms);
                    point.maglev_update_p50_ms = median(&mut changes).map(ms);
                    point.maglev_update_p99_ms = p99(&m.changes);
                    point.maglev_update_max_ms = changes.iter().max().copied().map(ms);
                    let all: Vec<ebpf::Sample> = m.adds.iter().chain(&m.changes).copied().collect();
                    point.maglev_slow = slow(&all);
                }
            }
            Installed::Iptables(rules) => {
                let restore = iptables::Restore {
                    binary: &args.iptables_restore,
                    netns: topo.node(),
                };
                let mut adds = Vec::new();
                for k in n..n + slow_samples {
                    adds.push(restore.restore(&iptables::add_one(k, per))?);
                }
                record_adds(point, adds);
                let mut full = Vec::new();
                for _ in 0..args.full_restores {
                    full.push(restore.restore(rules)?);
                }
                point.full_restore_ms = median(&mut full).map(ms);
            }
            Installed::Ipvs => {
                let ipvs = ipvs::Ipvs {
                    binary: &args.ipvsadm,
                    netns: topo.node(),
                };
                let mut adds = Vec::new();
                for k in n..n + slow_samples {
                    adds.push(ipvs.add_one(k, per)?);
                }
                record_adds(point, adds);
            }
        }
        Ok(())
    }
}

fn sorted_copy(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

fn record_adds(point: &mut Point, mut adds: Vec<Duration>) {
    point.add_one_samples = adds.len();
    point.add_one_p50_ms = median(&mut adds).map(ms);
    point.add_one_max_ms = adds.iter().max().copied().map(ms);
}

/// The 99th percentile of the samples' wall times (nearest rank), ms.
fn p99(samples: &[ebpf::Sample]) -> Option<f64> {
    let mut wall: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
    wall.sort();
    let rank = (wall.len() * 99).div_ceil(100);
    wall.get(rank.checked_sub(1)?).copied().map(ms)
}

/// The samples over 1 ms of wall time, with the thread's CPU time and preemptions in each.
fn slow(samples: &[ebpf::Sample]) -> report::SlowUpdates {
    let over: Vec<&ebpf::Sample> = samples
        .iter()
        .filter(|s| s.wall > Duration::from_millis(1))
        .collect();
    report::SlowUpdates {
        over_1ms: over.len(),
        preempted: over.iter().filter(|s| s.preempted > 0).count(),
        cpu_max_ms: samples.iter().map(|s| s.cpu).max().map(ms),
        worst: over
            .iter()
            .map(|s| (ms(s.wall), ms(s.cpu), s.preempted))
            .collect(),
    }
}

fn median(times: &mut [Duration]) -> Option<Duration> {
    times.sort();
    times.get(times.len() / 2).copied()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
