//! Removing what a pod left on the node once its containers are gone, in a task of its own:
//! its veth, hostPort rules, address, sandbox namespaces, cgroups and directories, then the
//! final delete of the pod object. Inside the sync loop this took tens of milliseconds per pod
//! (netlink, unmounts, cgroup and directory removal), and a deleted wave held up the sync of
//! every other pod meanwhile. The pod counts as busy until the task is done
//! ([`super::PodMem::busy`]); the loop then forgets it ([`Wake::TornDown`]).

use std::fs;
use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Preconditions};
use kube::{Api, ResourceExt as _};

use super::dirty::Wake;
use super::{PodManager, PodManagerConfig};
use crate::network::{PodLink, remove_pod_link};
use crate::pods::layout::PodRecord;
use crate::pods::sandbox;

/// Everything a teardown needs, owned by its task.
struct Teardown {
    cfg: PodManagerConfig,
    client: kube::Client,
    record: PodRecord,
    link: Option<PodLink>,
    /// The uid of the pod object to delete at the end, if there is one.
    delete: Option<String>,
}

impl Teardown {
    async fn run(self) {
        let Teardown {
            cfg,
            client,
            record,
            link,
            delete,
        } = self;
        if let Some(link) = link
            && let Err(e) = remove_pod_link(&link.host_veth).await
        {
            tracing::warn!(pod = %record.name, error = %e, "removing the pod's veth");
        }
        let local = {
            let (cfg, record) = (cfg.clone(), record.clone());
            tokio::task::spawn_blocking(move || remove_local(&cfg, &record))
        };
        if let Err(e) = local.await {
            tracing::warn!(pod = %record.name, error = %e, "removing the pod's state");
        }
        tracing::info!(pod = %record.name, namespace = %record.namespace, "pod removed from the node");
        let Some(uid) = delete else { return };
        let api: Api<Pod> = Api::namespaced(client, &record.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&record.name, &params).await {
            Ok(_) => tracing::info!(pod = %record.name, "pod deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(pod = %record.name, error = %e, "final delete"),
        }
    }
}

/// The pod's hostPort rules, address, namespaces, cgroups and directories.
fn remove_local(cfg: &PodManagerConfig, record: &PodRecord) {
    let uid = &record.uid;
    let dir = cfg.layout.pod(uid);
    if let Some(nat) = cfg.network.as_ref().and_then(|n| n.nat.as_ref())
        && let Err(e) = nat.set_host_ports(uid, Vec::new())
    {
        tracing::warn!(pod = %record.name, error = %e, "removing the pod's hostPorts");
    }
    if let Some(net) = &cfg.network
        && let Err(e) = net.ipam.release(uid)
    {
        tracing::warn!(pod = %record.name, error = %e, "releasing the pod's address");
    }
    // Container roots need no unmounting here: each is mounted only in its supervisor's own
    // mount namespace, gone with the supervisor.
    sandbox::destroy(&dir.join("ns"));
    remove_cgroup_everywhere(&format!("{}/pod{uid}", cfg.cgroup_parent));
    for d in [&dir, &cfg.layout.pod_data(uid)] {
        if let Err(e) = fs::remove_dir_all(d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pod = %record.name, error = %e, "removing the pod directory");
        }
    }
    if !record.name.is_empty() {
        let _ = fs::remove_dir_all(cfg.layout.pod_logs(record));
    }
}

/// Removes `<hierarchy>/<path>` in every mounted cgroup hierarchy (v1 controllers and the
/// cgroup2 tree), children first. Only empty cgroups can go; others are left.
fn remove_cgroup_everywhere(path: &str) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split_whitespace().next().unwrap_or_default();
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let Some(mount) = left.split_whitespace().nth(4) else {
            continue;
        };
        remove_tree(&Path::new(mount).join(path));
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl PodManager {
    /// Starts tearing the pod down in the background (once; a teardown under way is left to
    /// finish), then deletes `pod`'s object if there is one.
    pub(super) fn start_teardown(&mut self, record: &PodRecord, pod: Option<&Pod>) {
        let mem = self.mem(record);
        if mem.tearing_down {
            return;
        }
        mem.tearing_down = true;
        // Read from network.json when the pod's memory was made, set when its sandbox was.
        let link = mem.link.clone();
        let job = Teardown {
            cfg: self.cfg.clone(),
            client: self.client.clone(),
            record: record.clone(),
            link,
            delete: pod.and_then(|p| p.uid()),
        };
        let (waker, uid) = (self.waker.clone(), record.uid.clone());
        tokio::spawn(async move {
            job.run().await;
            waker.send(Wake::TornDown(uid));
        });
    }
}
