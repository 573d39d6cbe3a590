//! Node lifecycle: a node's agent renews its Lease in `kube-node-lease`; a node whose Lease
//! has not changed for the grace period gets `Ready=Unknown` and the `unreachable` taints
//! (NoSchedule, so nothing new lands there, and NoExecute), and its pods are evicted once
//! their toleration of the taint runs out — pods without one get the default toleration
//! time. When the Lease is renewed again the taints go and the node is `Ready` again.
//!
//! Renewals are timed on this process's clock from when a Lease change was seen, so node and
//! control-plane clocks need not agree.

use std::{collections::HashMap, time::Duration};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, NodeCondition, Pod, Taint},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::reflector::Store,
};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    Options, Result,
    error::ApiContext as _,
    events::{Recorder, Type},
    informer::Informer,
    scheduler::plugins::tolerates,
    util,
};

/// The taint key of nodes whose agent stopped reporting.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// The taint key of nodes reporting not ready.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// The node lifecycle controller.
pub(crate) struct NodeLifecycle {
    client: Client,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pods: Store<Pod>,
    grace: Duration,
    period: Duration,
    default_toleration: Duration,
    recorder: Recorder,
}

struct Seen {
    version: String,
    at: Instant,
}

impl NodeLifecycle {
    /// Builds the controller over the shared caches.
    pub fn new(
        client: Client,
        opts: &Options,
        nodes: &Informer<Node>,
        leases: &Informer<Lease>,
        pods: &Informer<Pod>,
    ) -> Self {
        NodeLifecycle {
            recorder: Recorder::new(client.clone(), "node-controller"),
            client,
            nodes: nodes.store(),
            leases: leases.store(),
            pods: pods.store(),
            grace: opts.node_monitor_grace,
            period: opts.node_monitor_period,
            default_toleration: opts.default_toleration,
        }
    }

    /// Checks nodes every monitor period until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        for ready in [
            crate::informer::ready(&self.nodes, &cancel).await,
            crate::informer::ready(&self.leases, &cancel).await,
            crate::informer::ready(&self.pods, &cancel).await,
        ] {
            if !ready {
                return;
            }
        }
        let mut seen: HashMap<String, Seen> = HashMap::new();
        loop {
            if let Err(e) = self.tick(&mut seen).await
                && !e.is_conflict()
            {
                tracing::warn!(error = %e, "node lifecycle");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.period) => {}
            }
        }
    }

    async fn tick(&self, seen: &mut HashMap<String, Seen>) -> Result<()> {
        let now = Instant::now();
        let leases: HashMap<String, String> = self
            .leases
            .state()
            .iter()
            .filter(|l| l.metadata.namespace.as_deref() == Some("kube-node-lease"))
            .filter_map(|l| {
                let renew = l
                    .spec
                    .as_ref()
                    .and_then(|s| s.renew_time.as_ref())
                    .map(|t| t.0.to_string());
                Some((
                    l.metadata.name.clone()?,
                    format!(
                        "{}/{}",
                        l.metadata.resource_version.clone().unwrap_or_default(),
                        renew.unwrap_or_default()
                    ),
                ))
            })
            .collect();
        let nodes = self.nodes.state();
        seen.retain(|name, _| {
            nodes
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(name.as_str()))
        });
        let mut result = Ok(());
        for node in &nodes {
            let Some(name) = node.metadata.name.clone() else {
                continue;
            };
            let version = leases.get(&name).cloned().unwrap_or_default();
            let entry = seen.entry(name.clone()).or_insert_with(|| Seen {
                version: version.clone(),
                // Nodes present at start get a full grace period from now.
                at: now,
            });
            if entry.version != version {
                entry.version = version;
                entry.at = now;
            }
            let healthy = now.duration_since(entry.at) <= self.grace;
            let r = if healthy {
                self.mark_reachable(node).await
            } else {
                self.mark_unreachable(node).await
            };
            if let Err(e) = r {
                result = Err(e);
            }
            if let Err(e) = self.evict(node).await {
                result = Err(e);
            }
        }
        result
    }

    fn has_unreachable(node: &Node) -> bool {
        node.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == UNREACHABLE))
    }

    fn ready_status(node: &Node) -> Option<&NodeCondition> {
        node.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
    }

    async fn set_ready(
        &self,
        node: &Node,
        status: &str,
        reason: &str,
        message: &str,
    ) -> Result<()> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut conditions = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        conditions.retain(|c| c.type_ != "Ready");
        let now = util::now();
        conditions.push(NodeCondition {
            type_: "Ready".into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_transition_time: Some(now.clone()),
            last_heartbeat_time: Some(now),
        });
        let api: Api<Node> = Api::all(self.client.clone());
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conditions}})),
        )
        .await
        .ctx(|| format!("setting node {name} Ready={status}"))?;
        Ok(())
    }

    async fn mark_unreachable(&self, node: &Node) -> Result<()> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if !Self::has_unreachable(node) {
            let mut tainted = node.clone();
            let taints = tainted
                .spec
                .get_or_insert_with(Default::default)
                .taints
                .get_or_insert_with(Vec::new);
            for effect in ["NoSchedule", "NoExecute"] {
                taints.push(Taint {
                    key: UNREACHABLE.into(),
                    effect: effect.into(),
                    value: None,
                    time_added: Some(util::now()),
                });
            }
            let api: Api<Node> = Api::all(self.client.clone());
            api.replace(&name, &PostParams::default(), &tainted)
                .await
                .ctx(|| format!("tainting node {name} unreachable"))?;
            tracing::warn!(node = %name, "node lease expired: node unreachable");
            self.recorder.record(
                node,
                Type::Normal,
                "NodeNotReady",
                format!("Node {name} status is now: NodeNotReady"),
            );
        }
        if Self::ready_status(node).is_none_or(|c| c.status != "Unknown") {
            self.set_ready(
                node,
                "Unknown",
                "NodeStatusUnknown",
                "Kubelet stopped posting node status.",
            )
            .await?;
        }
        Ok(())
    }

    async fn mark_reachable(&self, node: &Node) -> Result<()> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if Self::has_unreachable(node) {
            let mut healed = node.clone();
            if let Some(t) = healed.spec.as_mut().and_then(|s| s.taints.as_mut()) {
                t.retain(|t| t.key != UNREACHABLE);
            }
            let api: Api<Node> = Api::all(self.client.clone());
            api.replace(&name, &PostParams::default(), &healed)
                .await
                .ctx(|| format!("removing the unreachable taint of node {name}"))?;
            tracing::info!(node = %name, "node lease renewed: node reachable again");
            self.recorder.record(
                node,
                Type::Normal,
                "NodeReady",
                format!("Node {name} status is now: NodeReady"),
            );
        }
        // Only undo what this controller set; the agent owns Ready otherwise.
        if Self::ready_status(node).is_some_and(|c| {
            c.status == "Unknown" && c.reason.as_deref() == Some("NodeStatusUnknown")
        }) {
            self.set_ready(
                node,
                "True",
                "NodeLeaseRenewed",
                "The node's lease is renewed again.",
            )
            .await?;
        }
        Ok(())
    }

    /// Deletes the pods on `node` whose toleration of its NoExecute taints has run out.
    async fn evict(&self, node: &Node) -> Result<()> {
        let taints: Vec<&Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .map(|t| t.iter().filter(|t| t.effect == "NoExecute").collect())
            .unwrap_or_default();
        if taints.is_empty() {
            return Ok(());
        }
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let now = jiff::Timestamp::now();
        let pods = self
            .pods
            .state_filter(|p| util::pod_node(p) == Some(name) && util::pod_active(p));
        for pod in pods {
            let tolerations = pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.clone())
                .unwrap_or_default();
            // The earliest moment any taint's toleration runs out; None: tolerated forever.
            let mut deadline: Option<jiff::Timestamp> = None;
            for t in &taints {
                let added = t.time_added.as_ref().map_or(now, |a| a.0);
                let seconds = match tolerations.iter().find(|tol| tolerates(tol, t)) {
                    Some(tol) => match tol.toleration_seconds {
                        Some(s) => s.max(0),
                        None => continue,
                    },
                    None if t.key == UNREACHABLE || t.key == NOT_READY => {
                        i64::try_from(self.default_toleration.as_secs()).unwrap_or(i64::MAX)
                    }
                    None => 0,
                };
                let at = added
                    .checked_add(jiff::SignedDuration::from_secs(seconds))
                    .unwrap_or(jiff::Timestamp::MAX);
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
            if deadline.is_some_and(|d| d <= now) {
                let ns = pod.metadata.namespace.clone().unwrap_or_default();
                let pod_name = pod.metadata.name.clone().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                match api.delete(&pod_name, &DeleteParams::default()).await {
                    Ok(_) => {
                        tracing::info!(pod = %format!("{ns}/{pod_name}"), node = %name, "evicted from a tainted node");
                        self.recorder.record(
                            pod.as_ref(),
                            Type::Normal,
                            "TaintManagerEviction",
                            format!("Marking for deletion Pod {ns}/{pod_name}"),
                        );
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e).ctx(|| format!("evicting pod {ns}/{pod_name}")),
                }
            }
        }
        Ok(())
    }
}
