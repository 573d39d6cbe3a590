//! `cargo xtask bench store`: Keelson's store against etcd, driven by `keelson-bench store`,
//! which starts both 3-member clusters on loopback and removes them when done.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd::{cargo, probe, run as run_cmd, step};

/// Build and run the store benchmark with `extra` driver arguments.
///
/// # Errors
/// etcd is missing, the build fails or the benchmark fails.
pub fn run(extra: &[String]) -> Result<()> {
    let Some(etcd) = probe(Command::new("which").arg("etcd")) else {
        bail!("etcd is not installed: run `cargo xtask setup` (Debian package etcd-server)");
    };
    step("build keelson-server and the benchmark driver (release)");
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "keelson-server",
        "-p",
        "keelson-bench",
    ]))?;
    let release = super::target_dir().join("release");
    let out = super::target_dir().join("bench");
    step("bench store: Keelson vs etcd, 3 members each, on loopback");
    run_cmd(
        Command::new(release.join("keelson-bench"))
            .arg("store")
            .arg("--server")
            .arg(release.join("keelson-server"))
            .arg("--etcd")
            .arg(Path::new(etcd.trim()))
            .arg("--out")
            .arg(&out)
            .args(extra),
    )
}
