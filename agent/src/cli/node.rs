//! `keelson-agent node`: run this machine as a node — register the Node, renew its Lease, serve
//! container logs over HTTP, set up the pod network and run the pods bound to it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use keelson_agent::dns;
use keelson_agent::logs::server;
use keelson_agent::network::{Ipam, Nat, PeerConfig, VxlanConfig, ensure_bridge, peers};
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
    /// A registry (`host:port`) pulled from over plain HTTP instead of HTTPS; repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Image GC starts when the image file system is this full (percent; 100 turns GC off).
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_high_threshold: u8,
    /// Image GC frees space down to this usage (percent).
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_low_threshold: u8,
    /// Hard eviction threshold, kubelet syntax: `memory.available<100Mi` or
    /// `memory.available<10%` (memory.available = capacity minus the pods' working set);
    /// empty turns eviction off.
    #[arg(long, default_value = "memory.available<100Mi", value_parser = parse_eviction)]
    eviction_hard: EvictionHard,
    /// The memory capacity eviction counts from (default: the machine's), e.g. 300Mi.
    #[arg(long, value_parser = parse_size)]
    eviction_memory_capacity: Option<u64>,
    /// How long MemoryPressure stays True after pressure was last seen.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    eviction_pressure_transition_period: Duration,
    /// The cluster domain: the DNS server answers for it and pods search it.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The nameserver of pods with dnsPolicy ClusterFirst (default: the pod bridge's address,
    /// where this agent serves DNS).
    #[arg(long)]
    cluster_dns: Option<IpAddr>,
    /// Address of the agent's DNS server (default: the pod bridge's address, port 53).
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// Run no DNS server on this node (pods still get --cluster-dns as nameserver).
    #[arg(long)]
    no_dns_server: bool,
    /// Resolver for names outside the cluster domain, `ip` or `ip:port`; repeatable
    /// (default: the nameservers of --resolv-conf, except the DNS server's own address).
    #[arg(long, value_parser = parse_upstream)]
    dns_upstream: Vec<SocketAddr>,
    /// The node's resolver configuration: the default upstreams, and what pods with
    /// dnsPolicy Default get.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// How other nodes' pods are reached: `host-gw` (a route via the peer's InternalIP),
    /// `vxlan` (an overlay), or `auto` (host-gw for peers on a directly connected subnet,
    /// VXLAN for the others).
    #[arg(long, default_value = "auto")]
    pod_network_mode: keelson_agent::network::Mode,
    /// VXLAN network identifier (the same on every node).
    #[arg(long, default_value_t = 1)]
    vxlan_vni: u32,
    /// VXLAN UDP port (the same on every node).
    #[arg(long, default_value_t = 8472)]
    vxlan_port: u16,
    /// The cluster's pod network: pod traffic to destinations outside it is masqueraded.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::Ipv4Net,
    /// SNAT pod traffic leaving the cluster CIDR to the node's address.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    masquerade: bool,
    /// How long to wait for the control plane to set the Node's spec.podCIDR when no
    /// --pod-cidr is given.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pod_cidr_wait: Duration,
    /// Remove what the agent set up for the pod network (routes to peers, the VXLAN device,
    /// the `ip keelson` nftables table) and exit.
    #[arg(long)]
    cleanup_network: bool,
}

/// A parsed `--eviction-hard`.
#[derive(Debug, Clone)]
struct EvictionHard(Option<node::eviction::Threshold>);

fn parse_eviction(s: &str) -> Result<EvictionHard, String> {
    node::eviction::parse_eviction_hard(s).map(EvictionHard)
}

/// `ip` (port 53) or `ip:port`.
fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is not an address like 192.0.2.53 or 192.0.2.53:5353"))
}

/// Binds the node's DNS server and returns its task, or `None` when it should not run.
async fn start_dns(
    args: &NodeArgs,
    client: &kube::Client,
    gateway: Option<IpAddr>,
    cluster_dns: Option<IpAddr>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if args.no_dns_server {
        return Ok(None);
    }
    let Some(addr) = args.dns_listen.or(gateway.map(|g| SocketAddr::new(g, 53))) else {
        tracing::warn!("no pod network and no --dns-listen: no DNS server on this node");
        return Ok(None);
    };
    let sockets = dns::server::Sockets::bind(addr)
        .await
        .context("starting the DNS server (--no-dns-server to run none)")?;
    let bound = sockets.local_addr()?;
    let upstreams = if args.dns_upstream.is_empty() {
        let text = std::fs::read_to_string(&args.resolv_conf).unwrap_or_default();
        let own: Vec<SocketAddr> = std::iter::once(bound)
            .chain(cluster_dns.map(|ip| SocketAddr::new(ip, 53)))
            .collect();
        dns::forward::upstreams_from(
            &dns::resolv::ResolvConf::parse(&text).nameserver_ips(),
            &own,
        )
    } else {
        args.dns_upstream.clone()
    };
    let zone = dns::Zone::shared(&args.cluster_domain)?;
    println!(
        "cluster DNS for {} on {bound}, other names forwarded to {upstreams:?}",
        args.cluster_domain
    );
    let forwarder = dns::Forwarder::new(upstreams, Duration::from_secs(2));
    let client = client.clone();
    Ok(Some(tokio::spawn(async move {
        let mut stop = stop;
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = dns::run(client, zone, sockets, Some(forwarder), shutdown).await {
            tracing::error!(error = %e, "cluster DNS stopped");
        }
    })))
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
        // Pod veths, the bridge and the VXLAN device hold pod-network addresses.
        if a.interface_name == bridge
            || a.interface_name.starts_with("kv")
            || a.interface_name == VxlanConfig::default().name
        {
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

/// `--cleanup-network`: routes to peers, the VXLAN device and the nftables table go.
fn cleanup_network() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime
        .block_on(peers::cleanup(&VxlanConfig::default().name))
        .context("removing routes and the VXLAN device")?;
    Nat::remove_table().context("removing the nftables table")?;
    println!("pod network routes, VXLAN device and nftables table removed");
    Ok(())
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
        ensure!(
            self.image_gc_low_threshold <= self.image_gc_high_threshold,
            "--image-gc-low-threshold ({}) must not exceed --image-gc-high-threshold ({})",
            self.image_gc_low_threshold,
            self.image_gc_high_threshold
        );
        if self.cleanup_network {
            return cleanup_network();
        }
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
        if layout
            .mount_run()
            .with_context(|| format!("mounting a tmpfs on {}", layout.run().display()))?
        {
            tracing::info!(dir = %layout.run().display(), "mounted a tmpfs for the pods' volatile state");
        }
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
            let mut cidr = registered
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .and_then(|c| c.parse::<ipnet::Ipv4Net>().ok())
                .or(self.pod_cidr);
            if cidr.is_none() {
                cidr = peers::wait_for_pod_cidr(&client, &name, self.pod_cidr_wait)
                    .await
                    .context("waiting for the Node's spec.podCIDR")?;
            }
            let node_v4 = peers::ipv4(node_ip).unwrap_or(Ipv4Addr::LOCALHOST);
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let network = match cidr {
                Some(cidr) => {
                    let ipam = Ipam::new(&layout.ipam(), cidr)?;
                    ensure_bridge(&self.bridge, ipam.gateway(), ipam.cidr())
                        .await
                        .with_context(|| format!("setting up bridge {}", self.bridge))?;
                    if let Err(e) = peers::enable_forwarding() {
                        tracing::warn!(error = %e, "pods cannot reach beyond this node");
                    }
                    // Without nftables (e.g. a minimal node image) pods still get their
                    // network; only egress masquerade and hostPorts are missing, said loudly.
                    let nat = match Nat::new(self.masquerade.then_some(self.cluster_cidr)) {
                        Ok(nat) => Some(nat),
                        Err(e) => {
                            tracing::error!(
                                error = %e,
                                "no nftables table: pods get no egress masquerade and no hostPorts"
                            );
                            None
                        }
                    };
                    let peer_cfg = PeerConfig {
                        node_name: name.clone(),
                        node_ip: node_v4,
                        pod_cidr: ipam.cidr(),
                        mode: self.pod_network_mode,
                        vxlan: VxlanConfig {
                            vni: self.vxlan_vni,
                            port: self.vxlan_port,
                            ..VxlanConfig::default()
                        },
                        resync: Duration::from_secs(10),
                    };
                    let mut peers_stop = stop_rx.clone();
                    let peers_client = client.clone();
                    tokio::spawn(async move {
                        let stop = async move {
                            let _ = peers_stop.wait_for(|s| *s).await;
                        };
                        if let Err(e) = peers::run(peers_client, peer_cfg, stop).await {
                            tracing::error!(error = %e, "routes to the other nodes");
                        }
                    });
                    Some(PodNetwork {
                        bridge: self.bridge.clone(),
                        ipam,
                        nat,
                        node_ip: node_v4,
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
            let gateway = network.as_ref().map(|n| IpAddr::V4(n.ipam.gateway()));
            let cluster_dns = self.cluster_dns.or(gateway);
            let dns_task = start_dns(&self, &client, gateway, cluster_dns, stop_rx.clone()).await?;
            let pod_dns = dns::PodDns {
                cluster_dns: cluster_dns.into_iter().collect(),
                cluster_domain: self.cluster_domain.clone(),
                node_resolv_conf: self.resolv_conf.clone(),
                node_hosts: PathBuf::from("/etc/hosts"),
            };
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
                    dns: Some(pod_dns),
                },
            )?;
            let manager = manager
                .with_pull_config(&keelson_agent::image::PullConfig {
                    insecure_registries: self.insecure_registries.clone(),
                });
            let manager = match self.eviction_hard.0 {
                Some(threshold) => manager.with_eviction(node::eviction::EvictionConfig {
                    threshold,
                    capacity: self.eviction_memory_capacity,
                    transition: self.eviction_pressure_transition_period,
                }),
                None => manager,
            };
            let manager = if self.image_gc_high_threshold < 100 {
                manager.with_image_gc(keelson_agent::image::gc::GcPolicy {
                    high_percent: self.image_gc_high_threshold,
                    low_percent: self.image_gc_low_threshold,
                    ..Default::default()
                })
            } else {
                manager
            };
            let result = manager.run(stop_signal()).await;
            let _ = stop_tx.send(true);
            beat.abort();
            let _ = http.await;
            if let Some(task) = dns_task {
                let _ = task.await;
            }
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
