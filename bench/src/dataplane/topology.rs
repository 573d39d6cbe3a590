//! The benchmark's topology, made fresh for every system and scale so that no state (rules,
//! conntrack, maps) leaks from one measurement into the next:
//!
//! ```text
//!   client netns (+ cgroup2 dir)            server netns
//!   c0 10.244.0.2/24  ───── veth ─────  s0 10.244.0.1/24
//!   routes: 10.244.1.0/24, 10.96.0.0/16     lo: backends 10.244.1.1 … .16, :8080
//!           via 10.244.0.1                  (one echo server on 0.0.0.0:8080)
//! ```
//!
//! Neither namespace has a route anywhere else: a packet that is not translated ends in the
//! server namespace and is dropped there.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use super::netns::{Cgroup2, Netns};

/// The backends' port.
pub const BACKEND_PORT: u16 = 8080;
/// The services' port.
pub const SERVICE_PORT: u16 = 80;
/// How many backend ("pod") addresses the server namespace answers on.
pub const BACKENDS: u32 = 16;
/// The client's address; inside the cluster CIDR, as a pod's would be.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The cluster (pod) CIDR the client and backends belong to.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

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

/// A client namespace and cgroup, a server namespace with the echo server, and the veth.
pub struct Topology {
    // Field order is drop order: the server process first, then the cgroup, then namespaces.
    server: Child,
    cgroup: Cgroup2,
    client: Netns,
    _server_ns: Netns,
}

impl Topology {
    /// Builds it; `tag` names the cgroup (`kb-dp-<pid>-<tag>`).
    ///
    /// # Errors
    /// A namespace, link, address, route or the server cannot be made.
    pub fn new(tag: &str) -> Result<Self> {
        let client = Netns::new()?;
        let server_ns = Netns::new()?;
        client.ip(&[
            "link",
            "add",
            "c0",
            "type",
            "veth",
            "peer",
            "name",
            "s0",
            "netns",
            &server_ns.path(),
        ])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"])?;
        client.ip(&["link", "set", "c0", "up"])?;
        server_ns.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", "s0"])?;
        server_ns.ip(&["link", "set", "s0", "up"])?;
        for i in 0..BACKENDS {
            let ip = backend(i).ip().to_string();
            server_ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        }
        let gw = SERVER_IP.to_string();
        for dst in ["10.244.1.0/24", "10.96.0.0/16"] {
            client.ip(&["route", "add", dst, "via", &gw])?;
        }
        // Many short connections: use the whole port range (closes are RSTs, so no TIME_WAIT).
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        let cgroup = Cgroup2::new(&format!("kb-dp-{}-{tag}", std::process::id()))?;
        let server = start_server(&server_ns)?;
        Ok(Topology {
            server,
            cgroup,
            client,
            _server_ns: server_ns,
        })
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
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

/// Starts `keelson-bench dataplane-server` in `netns` and waits until it listens.
fn start_server(netns: &Netns) -> Result<Child> {
    let exe = std::env::current_exe().context("locating keelson-bench")?;
    let mut cmd = Command::new(exe);
    cmd.args(["dataplane-server", "--port", &BACKEND_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
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
