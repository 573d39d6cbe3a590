//! `update [flags] <id>`: new resource limits for a live container, from
//! flags or from an OCI `LinuxResources` JSON (`--resources FILE`, `-` for
//! stdin), as runc's `update`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use keelson_runtime::Container;
use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources};

/// Arguments of `update`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// LinuxResources JSON file, or `-` for stdin (overrides the flags).
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long)]
    pub memory: Option<i64>,
    /// Memory plus swap limit in bytes.
    #[arg(long)]
    pub memory_swap: Option<i64>,
    /// Maximum number of pids.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long)]
    pub cpu_shares: Option<u64>,
    /// CPU CFS quota in microseconds.
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// The container id.
    pub id: String,
}

fn resources(args: &Args) -> anyhow::Result<LinuxResources> {
    if let Some(path) = &args.resources {
        let mut text = String::new();
        if path == Path::new("-") {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("read stdin")?;
        } else {
            text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
        }
        return serde_json::from_str(&text).context("parse LinuxResources JSON");
    }
    let mut res = LinuxResources::default();
    if args.memory.is_some() || args.memory_swap.is_some() {
        let mut m = LinuxMemoryBuilder::default();
        if let Some(v) = args.memory {
            m = m.limit(v);
        }
        if let Some(v) = args.memory_swap {
            m = m.swap(v);
        }
        res.set_memory(Some(m.build()?));
    }
    if let Some(limit) = args.pids_limit {
        res.set_pids(Some(LinuxPidsBuilder::default().limit(limit).build()?));
    }
    if args.cpu_shares.is_some() || args.cpu_quota.is_some() || args.cpu_period.is_some() {
        let mut c = LinuxCpuBuilder::default();
        if let Some(v) = args.cpu_shares {
            c = c.shares(v);
        }
        if let Some(v) = args.cpu_quota {
            c = c.quota(v);
        }
        if let Some(v) = args.cpu_period {
            c = c.period(v);
        }
        res.set_cpu(Some(c.build()?));
    }
    Ok(res)
}

/// Runs `update`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    let container = Container::load(root, &args.id)?;
    container.update(&resources(args)?)?;
    Ok(0)
}
