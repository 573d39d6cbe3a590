//! `cargo xtask <task>`: the one entry point for developer and CI tasks.
//!
//! - `setup`: installs what the build, the tests and the demo need (idempotent) and checks the
//!   kernel features Keelson relies on.
//! - `test`: setup, then formatting, lints and every test — what CI runs.
//! - `up` / `down`: the local demo on this machine, inside a network namespace of its own.
//! - `node-image`: the kernel and initramfs a worker network-boots (`target/node-image/`).
//! - `bench <suite>`: a benchmark against the alternative, measured in the same run.

mod bench;
mod cmd;
mod demo;
mod node_image;
mod setup;
mod suite;

use clap::Parser as _;

#[derive(clap::Parser)]
#[command(name = "cargo xtask", about = "Keelson's developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(clap::Subcommand)]
enum Task {
    /// Install toolchain pieces and packages (idempotent) and check kernel features.
    Setup,
    /// Setup, `cargo fmt --check`, clippy (host crates and the eBPF crate), then every test.
    Test(suite::TestArgs),
    /// Start the local demo: the eBPF service proxy in front of a sample app, in its own netns.
    Up(demo::UpArgs),
    /// Remove everything `up` created.
    Down,
    /// Build the node image: kernel + initramfs a worker PXE-boots (target/node-image/).
    NodeImage(node_image::NodeImageArgs),
    /// Run a benchmark suite (release build) and write target/bench/<suite>.json and plots.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::all(),
        Task::Test(args) => suite::all(&args),
        Task::Up(args) => demo::up(&args),
        Task::Down => demo::down(),
        Task::NodeImage(args) => node_image::build(&args).map(|_| ()),
        Task::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
