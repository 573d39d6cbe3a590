//! Pod sandboxes and network links, made in the background: namespaces and veths are the
//! slowest part of a pod's start, so a new pod's sync starts a task for them and goes on;
//! pods of one wave get theirs at the same time, and nothing else waits. The task's result
//! comes back as a [`Wake::Sandbox`], which syncs the pod again to start its containers. A
//! failure is reported in the pod's status and retried after [`SANDBOX_RETRY`].

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use nix::mount::{MntFlags, umount2};

use super::dirty::Wake;
use super::{PodManager, PodManagerConfig};
use crate::network::{PodLink, setup_pod_link};
use crate::pods::layout::{PodRecord, write_json};
use crate::pods::sandbox;

/// How long after a failure a sandbox is tried again.
const SANDBOX_RETRY: Duration = Duration::from_secs(1);

/// Puts the node's network namespace (the agent's own) in place of the sandbox's fresh one
/// at `path`, for a hostNetwork pod: its containers join the node's network by that path.
fn share_node_netns(path: &Path) -> anyhow::Result<()> {
    umount2(path, MntFlags::MNT_DETACH)?;
    nix::mount::mount(
        Some("/proc/thread-self/ns/net"),
        path,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )?;
    Ok(())
}

/// The host side of the pod's veth: `kv` and the first hex digits of its uid.
fn host_veth(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(10)
        .collect();
    format!("kv{hex}")
}

/// Makes the pod's sandbox if it has none, and its network link if `needs_link` (hostNetwork
/// pods share the node's network instead); returns the link it made.
async fn make_sandbox(
    cfg: PodManagerConfig,
    record: &PodRecord,
    hostname: String,
    host_network: bool,
    needs_link: bool,
) -> anyhow::Result<Option<PodLink>> {
    let started = Instant::now();
    let ns = cfg.layout.pod(&record.uid).join("ns");
    let net = cfg.network.as_ref().filter(|_| needs_link && !host_network);
    // Namespaces and the address (a file under a lock) are made off the async workers.
    let (dir, uid) = (ns.clone(), record.uid.clone());
    let ipam = net.map(|n| n.ipam.clone());
    let (made, ip) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let made = !sandbox::exists(&dir);
        if made {
            sandbox::create(&dir, &hostname)?;
            if host_network {
                share_node_netns(&dir.join("net"))?;
            }
        }
        let ip = ipam.map(|ipam| ipam.allocate(&uid)).transpose()?;
        Ok((made, ip))
    })
    .await??;
    if made {
        tracing::debug!(pod = %record.name, ms = started.elapsed().as_millis() as u64, "sandbox made");
    }
    let (Some(net), Some(ip)) = (net, ip) else {
        return Ok(None);
    };
    let started = Instant::now();
    let veth = host_veth(&record.uid);
    setup_pod_link(
        &net.bridge,
        &ns.join("net"),
        &veth,
        ip,
        net.ipam.gateway(),
        net.ipam.cidr(),
    )
    .await?;
    let link = PodLink {
        ip,
        host_veth: veth,
    };
    write_json(&cfg.layout.pod(&record.uid).join("network.json"), &link)?;
    tracing::info!(pod = %record.name, %ip, ms = started.elapsed().as_millis() as u64, "pod network ready");
    Ok(Some(link))
}

impl PodManager {
    /// Whether the pod's sandbox (and network link) are ready. If not, starts making them
    /// (unless that is under way or waits for its retry) and says why the pod waits: the
    /// last failure, or nothing while it is being made.
    pub(super) fn sandbox_ready(
        &mut self,
        pod: &Pod,
        record: &PodRecord,
        host_network: bool,
    ) -> Result<(), String> {
        let ns = self.cfg.layout.pod(&record.uid).join("ns");
        let network = self.cfg.network.is_some();
        let mem = self.mem(record);
        let needs_link = !host_network && network && mem.link.is_none();
        if !needs_link && sandbox::exists(&ns) {
            return Ok(());
        }
        let why = mem.sandbox_error.clone().unwrap_or_default();
        if mem.preparing || mem.sandbox_retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(why);
        }
        mem.preparing = true;
        let (cfg, waker, record) = (self.cfg.clone(), self.waker.clone(), record.clone());
        let hostname = crate::dns::pod_files::pod_hostname(pod);
        tokio::spawn(async move {
            let result = make_sandbox(cfg, &record, hostname, host_network, needs_link)
                .await
                .map_err(|e| e.to_string());
            waker.send(Wake::Sandbox(record.uid, result));
        });
        Err(why)
    }

    /// Takes in the outcome of a sandbox task.
    pub(super) fn sandbox_done(&mut self, uid: &str, result: Result<Option<PodLink>, String>) {
        let Some(mem) = self.pods.get_mut(uid) else {
            return;
        };
        mem.preparing = false;
        match result {
            Ok(link) => {
                if link.is_some() {
                    mem.link = link;
                }
                mem.sandbox_error = None;
                mem.sandbox_retry_at = None;
            }
            Err(e) => {
                tracing::debug!(uid, error = %e, "sandbox (retried)");
                let at = Instant::now() + SANDBOX_RETRY;
                mem.sandbox_error = Some(e);
                mem.sandbox_retry_at = Some(at);
                self.requeue(uid, at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_an_interface_name() {
        let name = host_veth("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        assert_eq!(name, "kv0f1e2d3c4b");
        assert!(name.len() < 16, "IFNAMSIZ");
    }
}
