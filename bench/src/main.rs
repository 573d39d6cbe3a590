//! `keelson-bench <suite>`: the benchmark driver behind `cargo xtask bench <suite>`.
//!
//! Each suite starts what it measures (Keelson and the system it is compared with) on this
//! machine, drives both with the same client-side code, prints a table and writes every figure
//! to `<out>/<suite>.json` with plots beside it. Everything it starts is stopped and removed on
//! exit, on failure and on Ctrl-C.

mod dataplane;
mod machine;
mod store;

use clap::Parser as _;

#[derive(clap::Parser)]
#[command(name = "keelson-bench", about = "Keelson's benchmarks")]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(clap::Subcommand)]
enum Suite {
    /// A 3-member Keelson store against a 3-member etcd: writes/s and p50/p99 latency.
    Store(store::StoreArgs),
    /// Service load balancing with 100/1,000/10,000 services: Keelson's eBPF socket LB against
    /// kube-proxy's iptables layout, IPVS and direct-to-pod connects.
    Dataplane(dataplane::DataplaneArgs),
    /// The dataplane benchmark's echo server (started by `dataplane` in its own namespace).
    #[command(hide = true)]
    DataplaneServer(dataplane::ServerArgs),
    /// The dataplane benchmark's client (started by `dataplane` in its own namespace).
    #[command(hide = true)]
    DataplaneClient(dataplane::ClientArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let run = async {
        match cli.suite {
            Suite::Store(args) => store::run(&args).await,
            Suite::Dataplane(args) => dataplane::run(args).await,
            Suite::DataplaneServer(args) => dataplane::serve(&args),
            Suite::DataplaneClient(args) => dataplane::client(&args),
        }
    };
    // Dropping the run future on Ctrl-C drops its guards: processes killed, temp dirs removed.
    let result = tokio::select! {
        result = run => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = sigterm() => Err(anyhow::anyhow!("terminated")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelson-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (e.g. from `timeout`), so that guards clean up as on Ctrl-C.
async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
