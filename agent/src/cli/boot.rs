//! `keelson-agent boot`: first boot of a network-booted node — fetch the NoCloud seed, apply its
//! host name and `write_files`, then become `keelson-agent node` with the arguments the seed
//! wrote to `/etc/keelson/agent-args`.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use keelson_agent::boot::{agent_args, apply, cloud_config, seed};

use super::node::parse_duration;

#[derive(clap::Args)]
pub struct BootArgs {
    /// The NoCloud seed URL (`meta-data` and `user-data` under it); default: the `s=` of
    /// `ds=nocloud;s=URL` on the kernel command line.
    #[arg(long)]
    nocloud_url: Option<String>,
    /// How long to keep trying to fetch the seed (the network may still be coming up).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    seed_timeout: Duration,
    /// `--state-dir` for `node` unless agent-args sets it.
    #[arg(long, default_value = "/var/lib/keelson")]
    state_dir: PathBuf,
    /// `--cgroup2` for `node` unless agent-args sets it (created if missing); default:
    /// `keelson` under the cgroup2 mount.
    #[arg(long)]
    cgroup2: Option<PathBuf>,
    /// Apply the seed and print the `node` command line instead of running it.
    #[arg(long)]
    no_exec: bool,
}

/// The cgroup2 mount: `/sys/fs/cgroup` on a pure v2 system, `/sys/fs/cgroup/unified` on a
/// hybrid one.
fn cgroup2_mount() -> Option<PathBuf> {
    [
        "/sys/fs/cgroup",
        keelson_runtime::cgroups::HYBRID_UNIFIED_ROOT,
    ]
    .into_iter()
    .find(|p| {
        nix::sys::statfs::statfs(*p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
    })
    .map(PathBuf::from)
}

fn seed_url(flag: Option<String>) -> anyhow::Result<String> {
    if let Some(url) = flag {
        return Ok(url);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    seed::url_from_cmdline(&cmdline)
        .ok_or_else(|| keelson_agent::boot::Error::NoSeed(format!("cmdline: {}", cmdline.trim())))
        .map_err(Into::into)
}

impl BootArgs {
    pub fn run(self) -> anyhow::Result<()> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "keelson-agent boot needs root (host name, /etc, then the node's namespaces)"
        );
        let root = Path::new("/");
        let base = seed::base_url(&seed_url(self.nocloud_url.clone())?)?;
        println!("boot: NoCloud seed {base}");
        let deadline = Instant::now() + self.seed_timeout;
        let fetched = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(seed::fetch(&base, deadline))?;
        let meta = cloud_config::parse_meta_data(&fetched.meta_data)?;
        let config = cloud_config::parse_user_data(&fetched.user_data)?;
        if let Some(name) = apply::hostname(&config, &meta) {
            apply::set_hostname(name, root, &apply::KernelHostName)?;
            println!("boot: host name {name}");
        }
        for path in apply::write_files(&config.write_files, root)? {
            println!("boot: wrote {}", path.display());
        }
        let extra = agent_args::read(Path::new(agent_args::AGENT_ARGS))?;
        let cgroup2 = match self.cgroup2 {
            Some(dir) => dir,
            None => cgroup2_mount()
                .context("no cgroup2 hierarchy is mounted (the node image mounts one)")?
                .join("keelson"),
        };
        let args = agent_args::with_defaults(
            extra,
            &[
                ("--state-dir", self.state_dir.display().to_string()),
                ("--cgroup2", cgroup2.display().to_string()),
            ],
        );
        // `node` requires its cgroup2 directory to exist.
        if let Some(dir) = agent_args::value(&args, "--cgroup2") {
            std::fs::create_dir_all(dir).with_context(|| format!("creating cgroup {dir}"))?;
        }
        let exe = std::env::current_exe().context("locating keelson-agent")?;
        println!("boot: exec {} node {}", exe.display(), args.join(" "));
        if self.no_exec {
            return Ok(());
        }
        let err = std::process::Command::new(&exe)
            .arg("node")
            .args(&args)
            .exec();
        Err(err).with_context(|| format!("executing {} node", exe.display()))
    }
}
