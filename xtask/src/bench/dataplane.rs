//! `cargo xtask bench dataplane`: Service load balancing with 100, 1,000 and 10,000 services —
//! Keelson's eBPF socket load balancer against kube-proxy's iptables layout, IPVS and direct
//! connects to the pod — driven by `keelson-bench dataplane`, which builds its namespaces,
//! cgroups and pins itself and removes them when done.

use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd::{cargo, probe, run as run_cmd, step};

/// Build and run the dataplane benchmark with `extra` driver arguments.
///
/// # Errors
/// Not root, iptables is missing, the build fails or the benchmark fails.
pub fn run(extra: &[String]) -> Result<()> {
    if probe(Command::new("id").arg("-u")).is_none_or(|uid| uid.trim() != "0") {
        bail!("the dataplane benchmark needs root (network namespaces, cgroups, BPF, iptables)");
    }
    if probe(Command::new("which").arg("iptables-legacy-restore")).is_none() {
        bail!("iptables is not installed: run `cargo xtask setup` (Debian package iptables)");
    }
    // The `bench-driver` profile (workspace Cargo.toml): release settings, full optimisation
    // for the code on the measured path, the set-up-only dependencies unoptimised.
    step("build the benchmark driver with the agent's load balancer (profile bench-driver)");
    run_cmd(cargo().args(["build", "--profile", "bench-driver", "-p", "keelson-bench"]))?;
    let release = super::target_dir().join("bench-driver");
    let out = super::target_dir().join("bench");
    step("bench dataplane: eBPF vs iptables vs IPVS vs direct, 100/1,000/10,000 services");
    run_cmd(
        Command::new(release.join("keelson-bench"))
            .arg("dataplane")
            .arg("--out")
            .arg(&out)
            .args(extra),
    )
}
