//! `keelson-agent proxy` for end-to-end tests: the eBPF service load balancer attached to a
//! cgroup2 directory the test made, following a control plane's Services and EndpointSlices.
//! Killed on drop.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{cluster::ControlPlane, workspace_bin};

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
