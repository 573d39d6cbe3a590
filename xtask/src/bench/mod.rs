//! `cargo xtask bench <suite>`: build the benchmark driver and what it measures in release mode,
//! then run one suite. Results go to `<target dir>/bench/<suite>.json` with plots beside it.
//!
//! Adding a suite: a variant in [`Suite`] and one match arm in [`run`].

mod api;
mod dataplane;
mod runtime;
mod scheduler;
mod store;

use std::path::PathBuf;

use anyhow::Result;

use crate::cmd::{cargo, repo_root, run as run_cmd, step};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    #[arg(value_enum)]
    suite: Suite,
    /// Extra arguments for the suite's driver (e.g. `-- --seconds 3 --clients 1,16`).
    #[arg(last = true)]
    extra: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Suite {
    /// A 3-member Keelson store against a 3-member etcd: writes/s, p50/p99 latency, ratios.
    Store,
    /// The API server, one member: creates/gets/lists of 10k pods, mutating-call p99, watch
    /// fan-out to 1000 watchers.
    Api,
    /// The container runtime against runc (and crun): container lifecycles, p50/p99, ratio.
    Runtime,
    /// The scheduler: pods bound/s and p99 create→bound latency at 500 and 5000 nodes.
    Scheduler,
    /// Service load balancing at 100/1,000/10,000 services: the eBPF socket LB against
    /// kube-proxy's iptables layout, IPVS and direct-to-pod connects (latency, conn/s, updates).
    Dataplane,
}

/// Runs the chosen suite.
///
/// # Errors
/// The build or the benchmark fails.
pub fn run(args: &BenchArgs) -> Result<()> {
    match args.suite {
        Suite::Store => store::run(&args.extra),
        Suite::Api => api::run(&args.extra),
        Suite::Runtime => runtime::run(&args.extra),
        Suite::Scheduler => scheduler::run(&args.extra),
        Suite::Dataplane => dataplane::run(&args.extra),
    }
}

/// Builds `keelson-server` in release mode; returns the binary.
fn release_server() -> Result<PathBuf> {
    step("build keelson-server (release)");
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "keelson-server",
        "--bin",
        "keelson-server",
    ]))?;
    Ok(target_dir().join("release").join("keelson-server"))
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target/` at the repository root).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from)
}
