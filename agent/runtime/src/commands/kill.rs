//! `kill <id> [signal]`.

use std::path::Path;

use keelson_runtime::Container;
use keelson_runtime::signal::parse_signal;

/// Arguments of `kill`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Send the signal to every process in the container's cgroup.
    #[arg(short, long)]
    pub all: bool,
    /// The container id.
    pub id: String,
    /// Signal name (KILL, SIGTERM) or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// Runs `kill`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    let signal = parse_signal(&args.signal)?;
    let container = Container::load(root, &args.id)?;
    if args.all {
        container.kill_all(signal)?;
    } else {
        container.kill(signal)?;
    }
    Ok(0)
}
