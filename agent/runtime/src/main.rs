//! `keelson-runtime`: the OCI runtime command line, mirroring runc's, over
//! the `keelson_runtime` library. Each verb is a file in `commands/`.

mod commands;
mod logging;

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// An OCI container runtime on Linux namespaces, cgroups and pivot_root.
#[derive(Debug, Parser)]
#[command(name = "keelson-runtime", version, disable_version_flag = true)]
struct Cli {
    /// Print the version.
    #[arg(short = 'v', long, action = clap::ArgAction::Version)]
    version: Option<bool>,
    /// Directory for container state (tmpfs recommended).
    #[arg(long, global = true, default_value = keelson_runtime::DEFAULT_STATE_ROOT)]
    root: PathBuf,
    /// Write log messages to this file instead of stderr.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log debug messages.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility; cgroups are always managed through
    /// the file system.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility (no checkpoint/restore).
    #[arg(long, global = true)]
    criu: Option<PathBuf>,
    /// Accepted for runc compatibility; only `false`/`auto` as root work.
    #[arg(long, global = true)]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a container from a bundle; its process waits for `start`.
    Create(commands::create::Args),
    /// Run the user process of a created container.
    Start(commands::start::Args),
    /// Print the state of a container as OCI state JSON.
    State(commands::state::Args),
    /// Send a signal to a container's init (default SIGTERM).
    Kill(commands::kill::Args),
    /// Delete a container's resources.
    Delete(commands::delete::Args),
    /// Create, start and wait for a container; exit with its exit code.
    Run(commands::run::Args),
    /// Run a process in a running container.
    Exec(commands::exec::Args),
    /// Freeze every process of a running container.
    Pause(commands::pause::Args),
    /// Thaw a paused container.
    Resume(commands::pause::Args),
    /// Change the resource limits of a live container.
    Update(commands::update::Args),
    /// List the containers under the state root.
    List(commands::list::Args),
    /// Show the processes of a container.
    Ps(commands::ps::Args),
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let default = if cli.debug { "debug" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match (&cli.log, cli.log_format) {
        (Some(path), format) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("open log file {}: {e}", path.display()))?;
            let builder = builder
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false);
            match format {
                LogFormat::Json => builder.event_format(logging::LogrusJson).init(),
                LogFormat::Text => builder.init(),
            }
        }
        (None, LogFormat::Json) => builder
            .event_format(logging::LogrusJson)
            .with_writer(std::io::stderr)
            .init(),
        (None, LogFormat::Text) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("keelson-runtime: {e:#}");
        return ExitCode::FAILURE;
    }
    if cli.systemd_cgroup {
        tracing::warn!("--systemd-cgroup is ignored: cgroups are managed through the file system");
    }
    if matches!(cli.rootless.as_deref(), Some("true")) {
        eprintln!("keelson-runtime: rootless containers are not supported");
        return ExitCode::FAILURE;
    }
    let result = match &cli.command {
        Command::Create(args) => commands::create::run(&cli.root, args),
        Command::Start(args) => commands::start::run(&cli.root, args),
        Command::State(args) => commands::state::run(&cli.root, args),
        Command::Kill(args) => commands::kill::run(&cli.root, args),
        Command::Delete(args) => commands::delete::run(&cli.root, args),
        Command::Run(args) => commands::run::run(&cli.root, args),
        Command::Exec(args) => commands::exec::run(&cli.root, args),
        Command::Pause(args) => commands::pause::pause(&cli.root, args),
        Command::Resume(args) => commands::pause::resume(&cli.root, args),
        Command::Update(args) => commands::update::run(&cli.root, args),
        Command::List(args) => commands::list::run(&cli.root, args),
        Command::Ps(args) => commands::ps::run(&cli.root, args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if cli.log.is_some() {
                tracing::error!("{e:#}");
            }
            eprintln!("keelson-runtime: {e:#}");
            ExitCode::FAILURE
        }
    }
}
