//! `cargo xtask test`: what CI runs — setup, formatting, lints, then every test (unit and
//! end-to-end, which start the real binaries as root in namespaces they create).

use std::process::Command;

use anyhow::Result;

use crate::{
    cmd::{cargo, repo_root, run, step},
    setup,
};

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip `setup` (for quick local runs on a machine already set up).
    #[arg(long)]
    no_setup: bool,
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// Runs the suite.
///
/// # Errors
/// Any step fails.
pub fn all(args: &TestArgs) -> Result<()> {
    let started = std::time::Instant::now();
    if !args.no_setup {
        setup::all()?;
    }

    step("formatting");
    run(cargo().args(["fmt", "--all", "--check"]))?;

    step("clippy: host crates");
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;

    step("clippy: eBPF programs (nightly, bpfel-unknown-none)");
    run(Command::new("rustup").current_dir(repo_root()).args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "keelson-ebpf",
        "--bins",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/ebpf-clippy",
        "--",
        "-D",
        "warnings",
    ]))?;

    step("build the binaries the end-to-end tests start");
    run(cargo().args(["build", "--bins"]))?;

    // vm_join boots it; cached, so a warm run only checks its inputs. It carries the debug
    // binaries just built: a release build of the agent would add many minutes on a 2-core CI
    // machine, and the test only needs the node to join and run a pod.
    crate::node_image::build(&crate::node_image::NodeImageArgs {
        debug: true,
        ..crate::node_image::NodeImageArgs::default()
    })?;

    step("tests");
    run(cargo()
        .args(["test", "--no-fail-fast"])
        .args(&args.cargo_test_args))?;

    println!("\nall checks and tests passed in {:.0?}", started.elapsed());
    Ok(())
}
