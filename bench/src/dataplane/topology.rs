//! The benchmark's topology, made fresh for every system and scale so that no state (rules,
//! conntrack, maps) leaks from one measurement into the next:
//!
//! ```text
//!   pod netns (client, + cgroup2 dir)       node netns                       server netns
//!   eth0 10.244.2.2/24 ── veth ── p0 10.244.2.1/24
//!                                  c0 10.244.0.2/24 ───── veth ─────  s0 10.244.0.1/24
//!   routes: 10.244.1.0/24,         routes: 10.244.1.0/24,              lo: backends
//!           10.96.0.0/16                   10.96.0.0/16                    10.244.1.1 … .16
//!           via 10.244.2.1                 via 10.244.0.1                  (echo server on
//!                                  forwarding on; the service rules        0.0.0.0:8080)
//!                                  (iptables, IPVS) live here
//! ```
//!
//! The client runs in a pod's namespace by default ([`Placement::Pod`]), as most Service
//! traffic starts in a pod: its packets enter the node through the pod's veth and traverse
//! the node's PREROUTING, FORWARD and POSTROUTING hooks. [`Placement::Node`] runs it in the
//! node's namespace instead (a host-network client: OUTPUT and POSTROUTING), as the first
//! version of this benchmark did. The node has the NAT table every node of a pod network has
//! (Keelson's agent writes `table ip keelson` with the pod network's masquerade rule), so that
//! connection tracking runs for every system, not only for the iptables rules.
//!
//! No namespace has a route anywhere else: a packet that is not translated ends in the
//! server namespace and is dropped there.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use super::netns::{Cgroup2, Netns, NetnsExt as _};

/// The backends' port.
pub const BACKEND_PORT: u16 = 8080;
/// The services' port.
pub const SERVICE_PORT: u16 = 80;
/// How many backend ("pod") addresses the server namespace answers on.
pub const BACKENDS: u32 = 16;
/// The node's address on the link to the server namespace.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The client pod's address.
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// The node's address on the pod's veth (the pod's gateway).
const POD_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
/// The cluster (pod) CIDR the client and backends belong to.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Destinations routed towards the backends: their addresses and the service range.
const ROUTED: [&str; 2] = ["10.244.1.0/24", "10.96.0.0/16"];

/// Backend `i` (wrapping over [`BACKENDS`]).
pub fn backend(i: u32) -> SocketAddrV4 {
    let base = u32::from(Ipv4Addr::new(10, 244, 1, 1));
    SocketAddrV4::new(Ipv4Addr::from(base + i % BACKENDS), BACKEND_PORT)
}

/// The virtual IP of service `k` (0-based), in 10.96.0.0/16.
pub fn service_vip(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + k)
}

/// The endpoints of service `k`: `per_service` consecutive backends.
pub fn endpoints(k: u32, per_service: u32) -> Vec<SocketAddrV4> {
    (0..per_service)
        .map(|i| backend(k * per_service + i))
        .collect()
}

/// Where the client process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// In a pod's network namespace behind a veth to the node.
    Pod,
    /// In the node's network namespace (a host-network client).
    Node,
}

/// Which CPUs the client and the echo server run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pinning {
    /// The client on the first CPU the benchmark may use, the server on the second, as two
    /// pods on different cores: every system pays the same cross-CPU wake-ups, instead of
    /// whichever the scheduler picked for that system's processes.
    Split,
    /// Both on the first CPU.
    Same,
    /// Wherever the scheduler puts them.
    None,
}

impl Pinning {
    /// The CPUs of the client and the server, from those the calling process may use.
    ///
    /// # Errors
    /// The affinity mask cannot be read, or `Split` with fewer than two CPUs.
    pub fn cpus(self) -> Result<(Option<usize>, Option<usize>)> {
        if self == Pinning::None {
            return Ok((None, None));
        }
        // SAFETY: `cpu_set_t` is a plain bit mask; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the mask's size is passed with it; 0 is the calling thread.
        let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("reading the CPU affinity");
        }
        // SAFETY: every index is inside the mask.
        let mut allowed =
            (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
        let first = allowed.next().context("no CPU in the affinity mask")?;
        match self {
            Pinning::Same => Ok((Some(first), Some(first))),
            _ => {
                let second = allowed
                    .next()
                    .context("`--pin split` needs two CPUs (use `--pin same` or `none`)")?;
                Ok((Some(first), Some(second)))
            }
        }
    }
}

/// How a topology is built.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Where the client runs.
    pub placement: Placement,
    /// Whether the node has the pod network's NAT table (and so connection tracking).
    pub node_nat: bool,
    /// The echo server's CPU.
    pub server_cpu: Option<usize>,
}

/// A client namespace and cgroup, a node namespace holding the service rules, a server
/// namespace with the echo server, and the veths between them.
pub struct Topology {
    // Field order is drop order: the server process first, then the cgroup, then namespaces.
    server: Child,
    cgroup: Cgroup2,
    pod: Option<Netns>,
    node: Netns,
    _server_ns: Netns,
}

impl Topology {
    /// Builds it; `tag` names the cgroup (`kt-<pid>-<n>-dp-<tag>`).
    ///
    /// # Errors
    /// A namespace, link, address, route, rule or the server cannot be made.
    pub fn new(tag: &str, options: Options) -> Result<Self> {
        let node = Netns::new()?;
        let server_ns = Netns::new()?;
        veth(&node, "c0", &server_ns, "s0")?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "c0"])?;
        node.ip(&["link", "set", "c0", "up"])?;
        server_ns.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", "s0"])?;
        server_ns.ip(&["link", "set", "s0", "up"])?;
        for i in 0..BACKENDS {
            let ip = backend(i).ip().to_string();
            server_ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        }
        for dst in ROUTED {
            node.ip(&["route", "add", dst, "via", &SERVER_IP.to_string()])?;
        }
        let pod = match options.placement {
            Placement::Node => None,
            Placement::Pod => {
                let pod = Netns::new()?;
                veth(&pod, "eth0", &node, "p0")?;
                pod.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"])?;
                pod.ip(&["link", "set", "eth0", "up"])?;
                node.ip(&["addr", "add", &format!("{POD_GW}/24"), "dev", "p0"])?;
                node.ip(&["link", "set", "p0", "up"])?;
                for dst in ROUTED {
                    pod.ip(&["route", "add", dst, "via", &POD_GW.to_string()])?;
                }
                let pods = format!("{}/24", Ipv4Addr::from(u32::from(POD_IP) & !0xff));
                server_ns.ip(&["route", "add", &pods, "via", &NODE_IP.to_string()])?;
                node.sysctl("net.ipv4.ip_forward", "1")?;
                Some(pod)
            }
        };
        if options.node_nat {
            node_nat(&node)?;
        }
        // Many short connections: use the whole port range (closes are RSTs, so no TIME_WAIT).
        pod.as_ref()
            .unwrap_or(&node)
            .sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        let cgroup = Cgroup2::new(&format!("dp-{tag}"))?;
        let server = start_server(&server_ns, options.server_cpu)?;
        Ok(Topology {
            server,
            cgroup,
            pod,
            node,
            _server_ns: server_ns,
        })
    }

    /// The namespace the client runs in.
    pub fn client(&self) -> &Netns {
        self.pod.as_ref().unwrap_or(&self.node)
    }

    /// The node's namespace, where service rules go.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The client's cgroup2 directory.
    pub fn cgroup(&self) -> &Cgroup2 {
        &self.cgroup
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A veth pair `a_name` in `a`, `b_name` in `b`.
fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        &b.path(),
    ])
}

/// The NAT table Keelson's agent writes on every node (`agent/src/network/nft.rs`): empty
/// DNAT chains for hostPorts and the pod network's masquerade of traffic leaving the cluster
/// CIDR. Its hooks make the node track connections, as every node of a pod network does.
fn node_nat(node: &Netns) -> Result<()> {
    let script = format!(
        "table ip keelson {{\n\
         chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         chain output {{ type nat hook output priority -100; policy accept; }}\n\
         chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
         ip saddr {CLUSTER_CIDR} ip daddr != {CLUSTER_CIDR} masquerade\n}}\n}}\n"
    );
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let placed = node.place(&mut cmd, None)?;
    let mut child = cmd
        .spawn()
        .context("starting nft (Debian package nftables) for the node's NAT table")?;
    drop(placed);
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .context("feeding nft the node's NAT table")?;
    }
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft failed on the node's NAT table ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Starts `keelson-bench dataplane-server` in `netns` and waits until it listens.
fn start_server(netns: &Netns, cpu: Option<usize>) -> Result<Child> {
    let exe = std::env::current_exe().context("locating keelson-bench")?;
    let mut cmd = Command::new(exe);
    cmd.args(["dataplane-server", "--port", &BACKEND_PORT.to_string()]);
    if let Some(cpu) = cpu {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let placed = netns.place(&mut cmd, None)?;
    let mut child = cmd.spawn().context("starting the echo server")?;
    drop(placed);
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line).ok();
    }
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the echo server did not start (said {line:?})");
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_laid_out_as_documented() {
        assert_eq!(service_vip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(service_vip(10_000), Ipv4Addr::new(10, 96, 39, 17));
        assert_eq!(backend(0).to_string(), "10.244.1.1:8080");
        assert_eq!(backend(BACKENDS).to_string(), "10.244.1.1:8080");
        assert_eq!(
            endpoints(1, 2),
            vec![backend(2), backend(3)],
            "consecutive backends per service"
        );
    }
}
