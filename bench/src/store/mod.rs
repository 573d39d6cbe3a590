//! `keelson-bench store`: a 3-member Keelson store against a 3-member etcd on loopback, the
//! same closed-loop write workload on both (8-byte keys, 256-byte values), at several
//! concurrencies. Points alternate between the systems so that noise from other work on the
//! machine spreads over both.

mod cluster;
mod load;
mod report;
mod target;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

use crate::machine;
use cluster::{EtcdCluster, KeelsonCluster};
use load::Workload;
use report::{Point, Report, WorkloadInfo};
use target::{Etcd, Keelson, System};

/// Options of the store benchmark.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// The `keelson-server` binary to start (a release build).
    #[arg(long)]
    server: PathBuf,
    /// The `etcd` binary to compare with.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Directory for `store.json` and `store.svg`.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Concurrent clients per point (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    clients: Vec<usize>,
    /// Measured seconds per point.
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds before each point.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Most connections per point; clients share them round robin.
    #[arg(long, default_value_t = 8)]
    max_connections: usize,
}

const VALUE_BYTES: usize = 256;
const KEY_BYTES: usize = 8;

/// Run the benchmark.
///
/// # Errors
/// A cluster does not start, a point cannot run, or the results cannot be written.
pub async fn run(args: &StoreArgs) -> Result<()> {
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Field order of the guards below: clusters drop (processes killed) before the temp dir.
    let tmp = tempfile::Builder::new()
        .prefix("keelson-bench-store-")
        .tempdir()
        .context("creating a temporary directory")?;
    let machine = machine::probe(tmp.path());
    println!("data under {}", tmp.path().display());
    println!(
        "starting a 3-member Keelson store ({})",
        args.server.display()
    );
    let keelson = KeelsonCluster::start(&args.server, tmp.path()).await?;
    println!("starting a 3-member etcd ({})", args.etcd.display());
    let etcd = EtcdCluster::start(&args.etcd, tmp.path()).await?;
    println!("{}", etcd.version);
    let keelson_target = Keelson {
        addrs: keelson.addrs.clone(),
    };
    let etcd_target = Etcd {
        url: etcd.leader_url.clone(),
    };
    let mut points = Vec::new();
    for &clients in &args.clients {
        let workload = Workload {
            clients,
            warmup: Duration::from_secs_f64(args.warmup),
            measure: Duration::from_secs_f64(args.seconds),
            value_bytes: VALUE_BYTES,
        };
        let connections = clients.min(args.max_connections).max(1);
        points.push(measure(&keelson_target, workload, connections).await?);
        points.push(measure(&etcd_target, workload, connections).await?);
    }
    let ratios = report::ratios(&points);
    let report = Report {
        suite: "store",
        started_unix_s,
        machine,
        workload: WorkloadInfo {
            members: 3,
            key_bytes: KEY_BYTES,
            value_bytes: VALUE_BYTES,
            clients: args.clients.clone(),
            warmup_s: args.warmup,
            measure_s: args.seconds,
            connections: format!(
                "min(clients, {}) connections per point, shared round robin",
                args.max_connections
            ),
        },
        etcd_version: etcd.version.clone(),
        goals: report::goals(&ratios),
        points,
        ratios,
    };
    drop(keelson);
    drop(etcd);
    report::print_table(&report);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = args.out.join("store.json");
    let svg = args.out.join("store.svg");
    report::write_json(&report, &json)?;
    report::write_svg(&report, &svg)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

async fn measure<S: System>(system: &S, workload: Workload, connections: usize) -> Result<Point> {
    let mut writers = Vec::with_capacity(connections);
    for _ in 0..connections {
        writers.push(system.connect().await?);
    }
    print!(
        "{:<8} {:>4} clients over {} connections ... ",
        system.name(),
        workload.clients,
        connections
    );
    std::io::Write::flush(&mut std::io::stdout()).ok();
    let m = load::drive(&writers, workload).await?;
    let point = Point {
        system: system.name(),
        clients: workload.clients,
        connections,
        ops: m.ops,
        errors: m.errors,
        first_error: m.first_error.clone(),
        writes_per_s: m.writes_per_s(),
        p50_ms: m.quantile_ms(0.5),
        p99_ms: m.quantile_ms(0.99),
        p999_ms: m.quantile_ms(0.999),
        mean_ms: m.mean_ms(),
        max_ms: m.quantile_ms(1.0),
    };
    println!(
        "{:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms{}",
        point.writes_per_s,
        point.p50_ms,
        point.p99_ms,
        match &point.first_error {
            Some(e) => format!(", {} errors (first: {e})", point.errors),
            None => String::new(),
        }
    );
    Ok(point)
}
