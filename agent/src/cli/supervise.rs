//! `keelson-agent supervise` (hidden): the per-container supervisor the node agent starts,
//! detached, for each container attempt.

use std::path::PathBuf;

use keelson_agent::{
    logs::rotate::Limits,
    pods::{SuperviseSpec, supervise},
};

#[derive(clap::Args)]
pub struct SuperviseArgs {
    /// The runtime's state root.
    #[arg(long)]
    runtime_root: PathBuf,
    /// The container id.
    #[arg(long)]
    id: String,
    /// The attempt's bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// The directory of the container's writable layer (`upper/`, `work/`).
    #[arg(long)]
    writable_layer: PathBuf,
    /// The CRI log file.
    #[arg(long)]
    log: PathBuf,
    /// The container's cgroup path.
    #[arg(long)]
    cgroup_path: String,
    /// Rotate the log before it grows past this many bytes (0: never).
    #[arg(long, default_value_t = Limits::default().max_size)]
    log_max_size: u64,
    /// Log files kept, the current one included.
    #[arg(long, default_value_t = Limits::default().max_files)]
    log_max_files: usize,
    /// Leave the caller's session first (so that the supervisor outlives the agent).
    #[arg(long)]
    detach: bool,
    /// Standard output is a pipe that gets one byte once the container runs, and closes when
    /// the supervisor ends; the supervisor's own stdout becomes /dev/null.
    #[arg(long)]
    started_on_stdout: bool,
}

impl SuperviseArgs {
    /// Where the supervisor's own messages go.
    pub fn log_file(&self) -> PathBuf {
        self.bundle.join("supervisor.log")
    }

    pub fn run(self) -> anyhow::Result<()> {
        if self.detach
            && let Err(e) = nix::unistd::setsid()
        {
            tracing::warn!(error = %e, "leaving the agent's session");
        }
        let started = if self.started_on_stdout {
            keelson_agent::pods::supervisor::take_stdout()
        } else {
            None
        };
        let spec = SuperviseSpec {
            runtime_root: self.runtime_root,
            id: self.id,
            writable_layer: self.writable_layer,
            bundle: self.bundle,
            log: self.log,
            log_limits: Limits {
                max_size: self.log_max_size,
                max_files: self.log_max_files.max(1),
            },
            cgroup_path: self.cgroup_path,
            started,
        };
        let code = supervise(&spec);
        tracing::info!(id = %spec.id, code, "container ended");
        Ok(())
    }
}
