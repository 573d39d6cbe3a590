//! `exec <id> <command…>` or `exec --process <process.json> <id>`: runs a
//! process in a running container, as runc's `exec`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keelson_runtime::Container;
use keelson_runtime::container::{ExecOptions, wait_forwarding_signals};
use oci_spec::runtime::{Capabilities, Capability, Process, UserBuilder};

/// Arguments of `exec`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Unix socket that receives the master of the process's terminal.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Extra environment variables (KEY=VALUE).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Allocate a terminal (needs --console-socket).
    #[arg(short, long)]
    pub tty: bool,
    /// User as uid[:gid].
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional group ids.
    #[arg(short = 'g', long)]
    pub additional_gids: Vec<u32>,
    /// The process as an OCI process JSON file (overrides the other flags).
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Return once the process runs instead of waiting for it.
    #[arg(short, long)]
    pub detach: bool,
    /// File to write the process's host PID to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Set no_new_privs for the process.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Add a capability (e.g. CAP_NET_ADMIN) to the process's sets.
    #[arg(short, long)]
    pub cap: Vec<String>,
    /// The container id.
    pub id: String,
    /// The command and its arguments (unless --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn process_from_args(container: &Container, args: &Args) -> anyhow::Result<Process> {
    if let Some(path) = &args.process {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read process file {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("parse process file {}", path.display()));
    }
    if args.command.is_empty() {
        bail!("exec needs a command or --process");
    }
    let mut process = container.spec_process()?;
    process.set_args(Some(args.command.clone()));
    process.set_terminal(Some(args.tty));
    let mut env = process.env().clone().unwrap_or_default();
    env.extend(args.env.iter().cloned());
    process.set_env(Some(env));
    if let Some(cwd) = &args.cwd {
        process.set_cwd(cwd.clone());
    }
    if let Some(user) = &args.user {
        let (uid, gid): (u32, u32) = match user.split_once(':') {
            Some((u, g)) => (u.parse()?, g.parse()?),
            None => (user.parse()?, 0),
        };
        let mut builder = UserBuilder::default().uid(uid).gid(gid);
        if !args.additional_gids.is_empty() {
            builder = builder.additional_gids(args.additional_gids.clone());
        }
        process.set_user(builder.build()?);
    }
    if args.no_new_privs {
        process.set_no_new_privileges(Some(true));
    }
    if !args.cap.is_empty() {
        let mut caps = process.capabilities().clone().unwrap_or_default();
        for name in &args.cap {
            let cap: Capability = serde_json::from_value(serde_json::Value::String(name.clone()))
                .with_context(|| format!("unknown capability {name}"))?;
            let add = |set: &Option<Capabilities>| {
                let mut set = set.clone().unwrap_or_default();
                set.insert(cap);
                Some(set)
            };
            let (bounding, effective, permitted) = (
                add(caps.bounding()),
                add(caps.effective()),
                add(caps.permitted()),
            );
            caps.set_bounding(bounding);
            caps.set_effective(effective);
            caps.set_permitted(permitted);
        }
        process.set_capabilities(Some(caps));
    }
    Ok(process)
}

/// Runs `exec`; exits with the process's exit code unless detached.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    let container = Container::load(root, &args.id)?;
    let process = process_from_args(&container, args)?;
    if !args.detach {
        keelson_runtime::signal::block_forwarded()?;
    }
    let options = ExecOptions {
        console_socket: args.console_socket.clone(),
    };
    let pid = container
        .exec(&process, &options)
        .with_context(|| format!("exec in container {}", args.id))?;
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, pid.as_raw().to_string())
            .with_context(|| format!("write pid file {}", pid_file.display()))?;
    }
    if args.detach {
        return Ok(0);
    }
    let code = wait_forwarding_signals(pid)?;
    Ok(u8::try_from(code).unwrap_or(255))
}
