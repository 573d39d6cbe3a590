//! `cargo xtask bench scheduler`: fake nodes and 10k pending pods through a real
//! `keelson-server` (release build, Raft store on disk): pods bound per second once the
//! scheduler starts on the backlog, then create→bound p50/p99 for pods streamed in, at 500
//! and 5000 nodes. The driver is the `bench_scheduler` example of `keelson-controllers`.

use anyhow::Result;

use crate::cmd::{cargo, run as run_cmd, step};

/// Build and run the scheduler benchmark; `extra` goes to the driver (e.g. `--nodes 500
/// --pods 2000 --concurrency 128`).
///
/// # Errors
/// The build or the benchmark fails.
pub fn run(extra: &[String]) -> Result<()> {
    let server = super::release_server()?;
    let out = super::target_dir().join("bench").join("scheduler.json");
    step("bench scheduler: 10k pods on 500 and 5000 nodes (release build)");
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
            .arg("--server")
            .arg(&server)
            .arg("--out")
            .arg(&out)
            .args(extra),
    )
}
