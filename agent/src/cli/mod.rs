//! Command-line interface: each sub-command parses its arguments and calls the library.

mod boot;
mod image;
mod lb;
mod node;
mod proxy;
mod supervise;

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
    /// Run this machine as a node: register it, run the pods bound to it, serve their logs.
    Node(Box<node::NodeArgs>),
    /// Manage the node's image store.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// First boot of a network-booted node: apply the NoCloud seed, then run `node`.
    Boot(boot::BootArgs),
    /// Supervise one container attempt (started by `node`).
    #[command(hide = true)]
    Supervise(supervise::SuperviseArgs),
}

impl Cli {
    /// The file this command logs to instead of stderr, if any.
    pub fn log_file(&self) -> Option<std::path::PathBuf> {
        match &self.command {
            Command::Supervise(args) => Some(args.log_file()),
            _ => None,
        }
    }

    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Lb(cmd) => cmd.run(),
            Command::Proxy(args) => args.run(),
            Command::Node(args) => (*args).run(),
            Command::Image(cmd) => cmd.run(),
            Command::Boot(args) => args.run(),
            Command::Supervise(args) => args.run(),
        }
    }
}
