//! `delete [--force] <id>`.

use std::path::Path;

use keelson_runtime::Container;

/// Arguments of `delete`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kill the container first if it is running.
    #[arg(short, long)]
    pub force: bool,
    /// The container id.
    pub id: String,
}

/// Runs `delete`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    match Container::load(root, &args.id) {
        Ok(container) => container.delete(args.force)?,
        // runc: deleting a missing container with --force is not an error.
        Err(keelson_runtime::Error::NotFound(_)) if args.force => {}
        Err(e) => return Err(e.into()),
    }
    Ok(0)
}
