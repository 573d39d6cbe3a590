//! `keelson-agent proxy` for end-to-end tests: the eBPF service load balancer attached to a
//! cgroup2 directory the test made, following a control plane's Services and EndpointSlices.
//! [`ProxyBuilder`] starts one per node of a multi-node lab, inside the node's namespace with
//! the NodePort flags. Killed on drop.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{Netns, cluster::ControlPlane, place, workspace_bin};

/// A running `keelson-agent proxy`.
pub struct Proxy(Child);

impl Proxy {
    /// Starts the proxy for the sockets of `cgroup` (a cgroup2 directory), pinning its maps
    /// and links under `pins` (inside a bpffs the test mounted).
    ///
    /// # Errors
    /// The binary is missing or does not start.
    pub fn start(cp: &ControlPlane, cgroup: &Path, pins: &Path) -> Result<Proxy> {
        let child = Command::new(workspace_bin("keelson-agent")?)
            .arg("proxy")
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(pins)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting keelson-agent proxy")?;
        Ok(Proxy(child))
    }

    /// Ends the proxy with SIGKILL, leaving its pinned programs and maps in place.
    pub fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a `keelson-agent proxy` with the flags of one node of a multi-node lab: inside the
/// node's network namespace, with its name and addresses for nodePorts and the interfaces
/// whose traffic from outside reaches them.
pub struct ProxyBuilder {
    kubeconfig: PathBuf,
    cgroup: PathBuf,
    pins: PathBuf,
    node_name: Option<String>,
    node_ips: Vec<Ipv4Addr>,
    interfaces: Vec<String>,
    metrics: Option<SocketAddr>,
    log: Option<PathBuf>,
}

impl ProxyBuilder {
    /// A proxy using `kubeconfig`, balancing the sockets of `cgroup` (a cgroup2 directory),
    /// pinning under `pins` (inside a bpffs the test mounted).
    pub fn new(kubeconfig: &Path, cgroup: &Path, pins: &Path) -> Self {
        ProxyBuilder {
            kubeconfig: kubeconfig.into(),
            cgroup: cgroup.into(),
            pins: pins.into(),
            node_name: None,
            node_ips: Vec::new(),
            interfaces: Vec::new(),
            metrics: None,
            log: None,
        }
    }

    /// `--node-name` and one `--node-ip` per address.
    pub fn with_node(mut self, name: &str, ips: &[Ipv4Addr]) -> Self {
        self.node_name = Some(name.to_owned());
        self.node_ips.extend_from_slice(ips);
        self
    }

    /// `--nodeport-interface` (repeatable).
    pub fn with_nodeport_interface(mut self, interface: &str) -> Self {
        self.interfaces.push(interface.to_owned());
        self
    }

    /// `--metrics-listen` (an address inside the proxy's namespace).
    pub fn with_metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Appends the proxy's output to `path` (default: discarded).
    pub fn with_log(mut self, path: &Path) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Starts the proxy inside `netns`.
    ///
    /// # Errors
    /// The binary is missing, the log cannot be opened or the process does not start.
    pub fn start_in(self, netns: &Netns) -> Result<Proxy> {
        let mut cmd = Command::new(workspace_bin("keelson-agent")?);
        cmd.arg("proxy")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs")
            .arg(&self.pins);
        if let Some(name) = &self.node_name {
            cmd.args(["--node-name", name]);
        }
        for ip in &self.node_ips {
            cmd.args(["--node-ip", &ip.to_string()]);
        }
        for interface in &self.interfaces {
            cmd.args(["--nodeport-interface", interface]);
        }
        if let Some(addr) = self.metrics {
            cmd.args(["--metrics-listen", &addr.to_string()]);
        }
        match &self.log {
            Some(path) => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                cmd.env("RUST_LOG", "info")
                    .stdout(log.try_clone()?)
                    .stderr(log);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let fds = place(&mut cmd, netns, None)?;
        let child = cmd.spawn().context("starting keelson-agent proxy")?;
        drop(fds);
        Ok(Proxy(child))
    }
}
