//! `pause <id>` and `resume <id>`.

use std::path::Path;

use keelson_runtime::Container;

/// Arguments of `pause` and `resume`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id.
    pub id: String,
}

/// Runs `pause`.
pub fn pause(root: &Path, args: &Args) -> anyhow::Result<u8> {
    Container::load(root, &args.id)?.pause()?;
    Ok(0)
}

/// Runs `resume`.
pub fn resume(root: &Path, args: &Args) -> anyhow::Result<u8> {
    Container::load(root, &args.id)?.resume()?;
    Ok(0)
}
