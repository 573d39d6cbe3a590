//! `cargo xtask bench scheduler`: fake nodes and 10k pending pods created through the API
//! while Keelson's scheduler runs; pods bound per second and create→bound p50/p99 at 500 and
//! 5000 nodes. The driver is the `bench_scheduler` example of `keelson-controllers` (an
//! in-process API server over the in-memory store).

use anyhow::Result;

use crate::cmd::{cargo, run as run_cmd, step};

/// Build and run the scheduler benchmark; `extra` is `[NODES[,NODES…] [PODS]]`.
///
/// # Errors
/// The build or the benchmark fails.
pub fn run(extra: &[String]) -> Result<()> {
    let out = super::target_dir().join("bench").join("scheduler.json");
    let nodes = extra.first().cloned().unwrap_or_else(|| "500,5000".into());
    let pods = extra.get(1).cloned().unwrap_or_else(|| "10000".into());
    step(&format!(
        "bench scheduler: {pods} pods on {nodes} nodes (release build)"
    ));
    run_cmd(
        cargo()
            .args([
                "run",
                "--release",
                "-p",
                "keelson-controllers",
                "--example",
                "bench_scheduler",
                "--",
            ])
            .args([nodes.as_str(), pods.as_str()])
            .arg(&out),
    )
}
