//! `create <id> --bundle <dir>`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keelson_runtime::ContainerBuilder;

/// Options shared by `create` and `run`, spelled as runc spells them.
#[derive(Debug, clap::Args)]
pub struct CreateOptions {
    /// Path to the bundle directory (holding config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// File to write the container init's PID to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the master of the container's terminal.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Do not use pivot_root (MS_MOVE + chroot instead).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (no session keyring is made anyway).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Number of extra file descriptors to pass (only 0 is supported).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id.
    pub id: String,
    #[command(flatten)]
    pub options: CreateOptions,
}

/// Builds the container described by `options`.
pub fn create(
    root: &Path,
    id: &str,
    options: &CreateOptions,
) -> anyhow::Result<keelson_runtime::Container> {
    if options.preserve_fds > 0 {
        bail!("--preserve-fds is not supported");
    }
    let mut builder = ContainerBuilder::new(id, root)
        .with_bundle(&options.bundle)?
        .with_no_pivot(options.no_pivot);
    if let Some(pid_file) = &options.pid_file {
        builder = builder.with_pid_file(pid_file);
    }
    if let Some(socket) = &options.console_socket {
        builder = builder.with_console_socket(socket);
    }
    builder
        .build()
        .with_context(|| format!("create container {id}"))
}

/// Runs `create`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    create(root, &args.id, &args.options)?;
    Ok(0)
}
