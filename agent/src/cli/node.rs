//! `keelson-agent node`: run this machine as a node — register the Node, renew its Lease, serve
//! container logs over HTTP, set up the pod network and run the pods bound to it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use keelson_agent::logs::server;
use keelson_agent::network::{Ipam, ensure_bridge};
use keelson_agent::node::{self, MachineInfo, NodeConfig};
use keelson_agent::pods::{PodManager, PodManagerConfig, PodNetwork, StateLayout};

use super::proxy::{client, stop_signal};

#[derive(clap::Args)]
pub struct NodeArgs {
    /// kubeconfig of the cluster (default: `$KUBECONFIG`, then `~/.kube/config`). With
    /// `--bootstrap-kubeconfig`, where the node's own credentials are written.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A kubeconfig with a bootstrap token: when `--kubeconfig` is missing or its
    /// certificate expired, ask the control plane for node credentials with it (TLS
    /// bootstrap) and write them to `--kubeconfig`.
    #[arg(long, requires = "kubeconfig")]
    bootstrap_kubeconfig: Option<PathBuf>,
    /// How long to wait for the node certificate during the TLS bootstrap.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    bootstrap_timeout: Duration,
    /// The Node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Directory for images, pods, logs and IPAM records.
    #[arg(long, default_value = "/var/lib/keelson")]
    state_dir: PathBuf,
    /// Address of the agent's HTTP server (container logs).
    #[arg(long, default_value = "0.0.0.0")]
    address: IpAddr,
    /// Port of the agent's HTTP server (0: any free port); reported in the Node's
    /// status.daemonEndpoints.kubeletEndpoint.
    #[arg(long, default_value_t = 10250)]
    port: u16,
    /// The node's InternalIP (default: the first global IPv4 address of this namespace).
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// Pod CIDR used when the control plane has not set the Node's spec.podCIDR. Without
    /// either, pods get no network of their own beyond loopback.
    #[arg(long)]
    pod_cidr: Option<ipnet::Ipv4Net>,
    /// Name of the pod bridge.
    #[arg(long, default_value = "keelson0")]
    bridge: String,
    /// cgroup path, relative to the hierarchies' roots, under which pods get their cgroups
    /// (default: keelson/pods, or <--cgroup2 relative to the cgroup2 root>/pods).
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// The node's cgroup2 directory (where the eBPF service proxy attaches); pods' processes
    /// are placed in cgroup2 directories under it.
    #[arg(long)]
    cgroup2: Option<PathBuf>,
    /// The keelson-runtime binary (exec probes); default: beside this binary, else $PATH.
    #[arg(long)]
    runtime: Option<PathBuf>,
    /// First container restart delay (doubles per restart), e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    restart_backoff: Duration,
    /// Longest container restart delay.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    restart_backoff_max: Duration,
    /// How often every pod is reconciled without a change.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    resync: Duration,
    /// A container's log is rotated before it grows past this size (e.g. 10Mi, 512Ki).
    #[arg(long, default_value = "10Mi", value_parser = parse_size)]
    container_log_max_size: u64,
    /// Log files kept per container, the current one included.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    container_log_max_files: u32,
}

fn parse_size(s: &str) -> Result<u64, String> {
    keelson_agent::pods::memory_bytes(s).ok_or_else(|| format!("{s:?} is not a size like 10Mi"))
}

/// `500ms`, `10s`, `5m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let idx = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(idx);
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// The root of the cgroup2 hierarchy: `/sys/fs/cgroup/unified` on a hybrid host.
fn cgroup2_root() -> Option<PathBuf> {
    for p in [
        keelson_runtime::cgroups::HYBRID_UNIFIED_ROOT,
        "/sys/fs/cgroup",
    ] {
        if nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// The pods' cgroup parent, checked against `--cgroup2`.
fn cgroup_parent(parent: Option<&str>, cgroup2: Option<&Path>) -> anyhow::Result<String> {
    let Some(dir) = cgroup2 else {
        return Ok(parent
            .unwrap_or("keelson/pods")
            .trim_matches('/')
            .to_owned());
    };
    let root = cgroup2_root().context("--cgroup2 given but no cgroup2 hierarchy is mounted")?;
    let rel = dir.strip_prefix(&root).with_context(|| {
        format!(
            "--cgroup2 {} is not under {}",
            dir.display(),
            root.display()
        )
    })?;
    ensure!(dir.is_dir(), "--cgroup2 {} does not exist", dir.display());
    let rel = rel.to_string_lossy().trim_matches('/').to_owned();
    match parent {
        None if rel.is_empty() => Ok("pods".to_owned()),
        None => Ok(format!("{rel}/pods")),
        Some(p) => {
            let p = p.trim_matches('/');
            if !(rel.is_empty() || p == rel || p.starts_with(&format!("{rel}/"))) {
                bail!(
                    "--cgroup-parent {p} is outside --cgroup2 {}: pods' processes would escape \
                     the node's cgroup2 subtree",
                    dir.display()
                );
            }
            Ok(p.to_owned())
        }
    }
}

/// The first global IPv4 address that is not a pod link.
fn detect_node_ip(bridge: &str) -> IpAddr {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    };
    for a in addrs {
        if a.interface_name == bridge || a.interface_name.starts_with("kv") {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            let ip = sin.ip();
            if !ip.is_loopback() && !ip.is_link_local() {
                return IpAddr::V4(ip);
            }
        }
    }
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn runtime_bin(flag: Option<PathBuf>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("keelson-runtime")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("keelson-runtime"))
}

impl NodeArgs {
    pub fn run(self) -> anyhow::Result<()> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "keelson-agent node needs root (namespaces, cgroups, mounts)"
        );
        let machine = MachineInfo::read();
        let name = self
            .node_name
            .clone()
            .unwrap_or_else(|| machine.hostname.clone());
        ensure!(!name.is_empty(), "no --node-name and no host name");
        std::fs::create_dir_all(&self.state_dir)
            .with_context(|| format!("creating {}", self.state_dir.display()))?;
        let state_dir = std::fs::canonicalize(&self.state_dir)?;
        let layout = StateLayout::new(&state_dir);
        let parent = cgroup_parent(self.cgroup_parent.as_deref(), self.cgroup2.as_deref())?;
        let node_ip = self.node_ip.unwrap_or_else(|| detect_node_ip(&self.bridge));
        let agent_exe = std::env::current_exe().context("locating keelson-agent")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(async move {
            if let (Some(bootstrap), Some(kubeconfig)) =
                (&self.bootstrap_kubeconfig, &self.kubeconfig)
            {
                let cfg = node::bootstrap::BootstrapConfig {
                    bootstrap_kubeconfig: bootstrap.clone(),
                    kubeconfig: kubeconfig.clone(),
                    node_name: name.clone(),
                    timeout: self.bootstrap_timeout,
                };
                if node::bootstrap::ensure_credentials(&cfg)
                    .await
                    .context("TLS bootstrap of the node's credentials")?
                {
                    println!("node {name}: credentials written to {}", kubeconfig.display());
                }
            }
            let client = client(self.kubeconfig.as_ref()).await?;
            let listener = tokio::net::TcpListener::bind(SocketAddr::new(self.address, self.port))
                .await
                .with_context(|| format!("binding {}:{}", self.address, self.port))?;
            let port = listener.local_addr()?.port();
            let cfg = NodeConfig {
                name: name.clone(),
                internal_ip: node_ip,
                port,
                state_dir: state_dir.clone(),
                machine,
            };
            let registered = node::register(&client, &cfg).await?;
            let cidr = registered
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .and_then(|c| c.parse::<ipnet::Ipv4Net>().ok())
                .or(self.pod_cidr);
            let network = match cidr {
                Some(cidr) => {
                    let ipam = Ipam::new(&layout.ipam(), cidr)?;
                    ensure_bridge(&self.bridge, ipam.gateway(), ipam.cidr())
                        .await
                        .with_context(|| format!("setting up bridge {}", self.bridge))?;
                    Some(PodNetwork {
                        bridge: self.bridge.clone(),
                        ipam,
                    })
                }
                None => {
                    tracing::warn!("no pod CIDR (Node spec.podCIDR or --pod-cidr): pods get loopback only");
                    None
                }
            };
            println!(
                "node {name}: registered, logs on port {port}, pods under cgroup {parent}, state in {}",
                state_dir.display()
            );
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut http_stop = stop_rx.clone();
            let http_state = server::ServerState {
                layout: layout.clone(),
                runtime_bin: runtime_bin(self.runtime.clone()),
            };
            let http = tokio::spawn(server::serve(listener, http_state, async move {
                let _ = http_stop.wait_for(|s| *s).await;
            }));
            let beat = tokio::spawn(node::heartbeat(client.clone(), cfg));
            let manager = PodManager::new(
                client,
                PodManagerConfig {
                    node_name: name,
                    layout,
                    cgroup_parent: parent,
                    agent_exe,
                    runtime_bin: runtime_bin(self.runtime),
                    backoff_base: self.restart_backoff,
                    backoff_max: self.restart_backoff_max,
                    network,
                    host_ip: node_ip.to_string(),
                    resync: self.resync,
                    log_limits: keelson_agent::logs::rotate::Limits {
                        max_size: self.container_log_max_size,
                        max_files: self.container_log_max_files as usize,
                    },
                },
            )?;
            let result = manager.run(stop_signal()).await;
            let _ = stop_tx.send(true);
            beat.abort();
            let _ = http.await;
            println!("node agent stopped; containers keep running");
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn cgroup_parent_defaults() {
        assert_eq!(cgroup_parent(None, None).expect("default"), "keelson/pods");
        assert_eq!(cgroup_parent(Some("/a/b/"), None).expect("given"), "a/b");
    }
}
