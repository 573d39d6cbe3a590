//! `start <id>`.

use std::path::Path;

use keelson_runtime::Container;

/// Arguments of `start`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id.
    pub id: String,
}

/// Runs `start`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    Container::load(root, &args.id)?.start()?;
    Ok(0)
}
