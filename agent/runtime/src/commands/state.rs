//! `state <id>`: prints the OCI state JSON.

use std::path::Path;

use keelson_runtime::Container;

/// Arguments of `state`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id.
    pub id: String,
}

/// Runs `state`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    let state = Container::load(root, &args.id)?.oci_state();
    println!("{}", serde_json::to_string_pretty(&state)?);
    Ok(0)
}
