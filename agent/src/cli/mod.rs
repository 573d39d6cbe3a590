//! Command-line interface: each sub-command parses its arguments and calls the library.

mod lb;
mod proxy;

/// Keelson's node agent.
#[derive(clap::Parser)]
#[command(name = "keelson-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Inspect and drive the eBPF service load balancer.
    #[command(subcommand)]
    Lb(lb::LbCommand),
    /// Run the service proxy: keep the load balancer in step with Services and EndpointSlices.
    Proxy(proxy::ProxyArgs),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Lb(cmd) => cmd.run(),
            Command::Proxy(args) => args.run(),
        }
    }
}
