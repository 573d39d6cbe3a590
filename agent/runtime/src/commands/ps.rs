//! `ps <id> [ps options]`: the container's processes — a JSON array of host
//! PIDs with `--format json` (what containerd's shim asks for), else the
//! host's `ps` output (default `-ef`) cut to the container's processes.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use keelson_runtime::Container;

use super::list::Format;

/// Arguments of `ps`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The container id.
    pub id: String,
    /// Options for ps(1).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// Runs `ps`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    let pids = Container::load(root, &args.id)?.pids()?;
    if let Format::Json = args.format {
        println!("{}", serde_json::to_string(&pids)?);
        return Ok(0);
    }
    let ps_args = if args.ps_args.is_empty() {
        vec!["-ef".to_owned()]
    } else {
        args.ps_args.clone()
    };
    let out = Command::new("ps")
        .args(&ps_args)
        .output()
        .context("run ps")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let pid_column = header
        .split_whitespace()
        .position(|c| c == "PID")
        .context("ps output has no PID column")?;
    let wanted: HashSet<String> = pids.iter().map(i32::to_string).collect();
    println!("{header}");
    for line in lines {
        if line
            .split_whitespace()
            .nth(pid_column)
            .is_some_and(|p| wanted.contains(p))
        {
            println!("{line}");
        }
    }
    Ok(0)
}
