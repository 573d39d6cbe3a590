//! `run <id> --bundle <dir>`: create, start, wait, delete; exits with the
//! container's exit code.

use std::path::Path;

use super::create::{CreateOptions, create};

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id.
    pub id: String,
    #[command(flatten)]
    pub options: CreateOptions,
    /// Return after starting instead of waiting for the container.
    #[arg(short, long)]
    pub detach: bool,
    /// Keep the container's state after it exits.
    #[arg(long)]
    pub keep: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_subreaper: bool,
}

/// Runs `run`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    if !args.detach {
        // Queue signals from now on, so that none is lost before waiting.
        keelson_runtime::signal::block_forwarded()?;
    }
    let mut container = create(root, &args.id, &args.options)?;
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        return Err(e.into());
    }
    if args.detach {
        return Ok(0);
    }
    let code = container.wait_forwarding_signals()?;
    if !args.keep {
        container.delete(true)?;
    }
    Ok(u8::try_from(code).unwrap_or(255))
}
