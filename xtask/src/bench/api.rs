//! `cargo xtask bench api`: a single-member keelson-server (release build, Raft store on
//! disk) driven through HTTPS: creates, gets and lists of 10k pods, single-object mutating
//! calls one at a time against the 10 ms p99 goal, and watch fan-out to 1000 watchers. The
//! driver is the `bench_api` example of `keelson-apiserver`.

use anyhow::Result;

use crate::cmd::{cargo, run as run_cmd, step};

/// Build and run the API benchmark; `extra` goes to the driver (e.g. `--pods 2000`).
///
/// # Errors
/// The build or the benchmark fails.
pub fn run(extra: &[String]) -> Result<()> {
    let server = super::release_server()?;
    let out = super::target_dir().join("bench").join("api.json");
    step("bench api: one member, 10k pods, 1000 watchers (release build)");
    run_cmd(
        cargo()
            .args([
                "run",
                "--release",
                "-p",
                "keelson-apiserver",
                "--example",
                "bench_api",
                "--",
            ])
            .arg("--server")
            .arg(&server)
            .arg("--out")
            .arg(&out)
            .args(extra),
    )
}
