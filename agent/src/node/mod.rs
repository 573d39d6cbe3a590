//! The node's presence in the cluster: its Node object (capacity, addresses, system info,
//! conditions, the port of the agent's HTTP server) and its Lease heartbeat.

pub mod bootstrap;
pub mod eviction;
mod machine;

pub use machine::{MachineInfo, Pressure, meminfo};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// The namespace node Leases live in.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How often the Lease is renewed and the conditions refreshed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// The Lease's duration: a node missing four renewals is considered gone.
const LEASE_SECONDS: i32 = 40;
/// Pods per node, as the kubelet's default.
pub const MAX_PODS: u32 = 110;

/// Errors of node registration and heartbeats.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// An API call failed.
    #[error("{action} {name}: {source}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// The object.
        name: String,
        /// The cause.
        source: kube::Error,
    },
}

/// Results of this module.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// How this node registers.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The Node's name.
    pub name: String,
    /// The address other nodes and the control plane reach this node at.
    pub internal_ip: IpAddr,
    /// The port of the agent's HTTP server (logs).
    pub port: u16,
    /// Where the agent keeps its state (disk pressure is measured there).
    pub state_dir: PathBuf,
    /// The machine's facts.
    pub machine: MachineInfo,
}

fn condition(kind: &str, on: bool, reason: &str, message: &str, now: Timestamp) -> NodeCondition {
    NodeCondition {
        type_: kind.to_owned(),
        status: if on { "True" } else { "False" }.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

impl NodeConfig {
    /// The status the node reports now.
    fn status(&self, previous: Option<&Node>) -> serde_json::Value {
        let now = Timestamp::now();
        let mut p = Pressure::measure(&self.state_dir);
        // With memory eviction on, its signal (over the pods' cgroups) is the one reported.
        if let Some(memory) = eviction::memory_pressure() {
            p.memory = memory;
        }
        let mut conditions = vec![
            condition(
                "MemoryPressure",
                p.memory,
                if p.memory {
                    "KubeletHasInsufficientMemory"
                } else {
                    "KubeletHasSufficientMemory"
                },
                "memory available on the node",
                now,
            ),
            condition(
                "DiskPressure",
                p.disk,
                if p.disk {
                    "KubeletHasDiskPressure"
                } else {
                    "KubeletHasNoDiskPressure"
                },
                "free space of the agent's state directory",
                now,
            ),
            condition(
                "PIDPressure",
                p.pids,
                if p.pids {
                    "KubeletHasInsufficientPID"
                } else {
                    "KubeletHasSufficientPID"
                },
                "processes against the kernel's pid_max",
                now,
            ),
            condition(
                "Ready",
                true,
                "KubeletReady",
                "keelson-agent is posting ready status",
                now,
            ),
        ];
        // Keep the transition time of conditions whose status did not change.
        let old = previous
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        for c in &mut conditions {
            if let Some(o) = old
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == c.status)
            {
                c.last_transition_time = o.last_transition_time.clone();
            }
        }
        let m = &self.machine;
        let resources = json!({
            "cpu": m.cpus.to_string(),
            "memory": format!("{}Ki", m.memory_bytes / 1024),
            "pods": MAX_PODS.to_string(),
            "ephemeral-storage": "0",
        });
        json!({
            "capacity": resources,
            "allocatable": resources,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.internal_ip.to_string()},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "nodeInfo": {
                "machineID": m.machine_id,
                "systemUUID": m.machine_id,
                "bootID": std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                    .map(|s| s.trim().to_owned()).unwrap_or_default(),
                "kernelVersion": m.kernel,
                "osImage": m.os_image,
                "containerRuntimeVersion": concat!("keelson://", env!("CARGO_PKG_VERSION")),
                "kubeletVersion": "v1.33.0-keelson",
                "kubeProxyVersion": "v1.33.0-keelson",
                "operatingSystem": "linux",
                "architecture": m.arch,
            },
        })
    }
}

/// Creates the Node if it does not exist and posts its status; returns the Node as stored
/// (its `spec.podCIDR` comes from the control plane).
///
/// # Errors
/// [`NodeError::Api`] if the API refuses.
pub async fn register(client: &kube::Client, cfg: &NodeConfig) -> Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let api_err = |action| {
        let name = cfg.name.clone();
        move |source| NodeError::Api {
            action,
            name,
            source,
        }
    };
    let existing = nodes
        .get_opt(&cfg.name)
        .await
        .map_err(api_err("get node"))?;
    if existing.is_none() {
        let labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_owned(), cfg.name.clone()),
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            ("kubernetes.io/arch".to_owned(), cfg.machine.arch.clone()),
        ]);
        let node = Node {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => tracing::info!(node = %cfg.name, "registered the node"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(api_err("create node")(e)),
        }
    }
    update_status(client, cfg, existing.as_ref()).await
}

async fn update_status(
    client: &kube::Client,
    cfg: &NodeConfig,
    old: Option<&Node>,
) -> Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = json!({"status": cfg.status(old)});
    nodes
        .patch_status(&cfg.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| NodeError::Api {
            action: "update node status",
            name: cfg.name.clone(),
            source,
        })
}

async fn renew_lease(client: &kube::Client, cfg: &NodeConfig) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = MicroTime(Timestamp::now());
    let err = |action| {
        let name = cfg.name.clone();
        move |source| NodeError::Api {
            action,
            name,
            source,
        }
    };
    match leases.get_opt(&cfg.name).await.map_err(err("get lease"))? {
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.holder_identity = Some(cfg.name.clone());
            spec.lease_duration_seconds = Some(LEASE_SECONDS);
            spec.renew_time = Some(now);
            leases
                .replace(&cfg.name, &PostParams::default(), &lease)
                .await
                .map_err(err("renew lease"))?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(LEASE_NAMESPACE.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.name.clone()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    ..LeaseSpec::default()
                }),
            };
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map_err(err("create lease"))?;
        }
    }
    Ok(())
}

/// Renews the Lease and refreshes the Node's status every [`HEARTBEAT`] until dropped;
/// failures are logged and retried at the next beat.
pub async fn heartbeat(client: kube::Client, cfg: NodeConfig) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut last: Option<Node> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = eviction::PRESSURE_CHANGED.notified() => {}
        }
        if let Err(e) = renew_lease(&client, &cfg).await {
            tracing::warn!(error = %e, "lease renewal failed");
        }
        match update_status(&client, &cfg, last.as_ref()).await {
            Ok(n) => last = Some(n),
            Err(e) => tracing::warn!(error = %e, "node status update failed"),
        }
    }
}
