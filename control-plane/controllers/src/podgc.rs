//! Pod garbage collection, as Kubernetes' podgc controller does it, every period:
//! - terminated pods (Succeeded or Failed) above the threshold go, oldest first;
//! - pods bound to a node that no longer exists (seen missing for the quarantine time, then
//!   confirmed by a live read) are marked Failed with a `DisruptionTarget` condition and
//!   deleted at once, since no agent is left to finish them;
//! - pods being deleted that were never scheduled are deleted at once, for the same reason.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
    runtime::reflector::Store,
};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Options, util::Key};

/// The pod garbage collector.
pub(crate) struct PodGc {
    client: Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    threshold: usize,
    period: Duration,
    quarantine: Duration,
}

/// What one sweep removes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Sweep {
    /// Terminated pods over the threshold, oldest first.
    pub terminated: Vec<Key>,
    /// Pods whose node has been missing for the quarantine time (with that node's name).
    pub orphaned: Vec<(Key, String)>,
    /// Pods being deleted that no node will ever finish.
    pub unscheduled_terminating: Vec<Key>,
}

fn terminated(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Plans a sweep. `missing_since` remembers when each pod's node was first seen missing; it
/// is updated here (pods whose node is back, or that are gone, are forgotten).
pub(crate) fn plan(
    pods: &[Arc<Pod>],
    nodes: &HashSet<String>,
    threshold: usize,
    quarantine: Duration,
    now: Instant,
    missing_since: &mut HashMap<Key, Instant>,
) -> Sweep {
    let mut out = Sweep::default();
    if threshold > 0 {
        let mut done: Vec<&Arc<Pod>> = pods.iter().filter(|p| terminated(p)).collect();
        if done.len() > threshold {
            done.sort_by(|a, b| {
                let t = |p: &Pod| p.metadata.creation_timestamp.clone().map(|t| t.0);
                t(a).cmp(&t(b))
                    .then_with(|| a.metadata.name.cmp(&b.metadata.name))
            });
            let excess = done.len() - threshold;
            out.terminated = done[..excess].iter().map(|p| Key::of(p.as_ref())).collect();
        }
    }
    let mut seen = HashSet::new();
    for p in pods {
        let key = Key::of(p.as_ref());
        let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
        match node {
            Some(n) if !nodes.contains(n) => {
                seen.insert(key.clone());
                let since = *missing_since.entry(key.clone()).or_insert(now);
                if now.duration_since(since) >= quarantine {
                    out.orphaned.push((key, n.to_owned()));
                }
            }
            None if p.metadata.deletion_timestamp.is_some() => {
                out.unscheduled_terminating.push(key);
            }
            _ => {}
        }
    }
    missing_since.retain(|k, _| seen.contains(k));
    out
}

impl PodGc {
    /// Builds the collector over the shared caches.
    pub fn new(client: Client, opts: &Options, pods: Store<Pod>, nodes: Store<Node>) -> Self {
        PodGc {
            client,
            pods,
            nodes,
            threshold: opts.terminated_pod_gc_threshold,
            period: opts.pod_gc_period,
            quarantine: opts.pod_gc_quarantine,
        }
    }

    /// Sweeps every period until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut missing_since = HashMap::new();
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let nodes: HashSet<String> = self
                .nodes
                .state()
                .iter()
                .filter_map(|n| n.metadata.name.clone())
                .collect();
            let sweep = plan(
                &self.pods.state(),
                &nodes,
                self.threshold,
                self.quarantine,
                Instant::now(),
                &mut missing_since,
            );
            self.apply(sweep).await;
        }
    }

    async fn apply(&self, sweep: Sweep) {
        for key in sweep.terminated {
            self.delete(&key, "terminated pod over the threshold").await;
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        for (key, node) in sweep.orphaned {
            // The cache may lag: only a node the API does not have makes a pod an orphan.
            match nodes.get_opt(&node).await {
                Ok(None) => {}
                Ok(Some(_)) => continue,
                Err(e) => {
                    tracing::warn!(%key, %node, error = %e, "pod gc: reading node");
                    continue;
                }
            }
            self.fail_orphan(&key, &node).await;
            self.delete(&key, "pod of a deleted node").await;
        }
        for key in sweep.unscheduled_terminating {
            self.delete(&key, "unscheduled terminating pod").await;
        }
    }

    async fn fail_orphan(&self, key: &Key, node: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.ns);
        let now = crate::util::now();
        let status = json!({"status": {
            "phase": "Failed",
            "conditions": [{
                "type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
                "message": format!("PodGC: node {node} no longer exists"),
                "lastTransitionTime": now,
            }],
        }});
        if let Err(e) = api
            .patch_status(
                &key.name,
                &PatchParams::default(),
                &Patch::Strategic(status),
            )
            .await
        {
            tracing::debug!(%key, error = %e, "pod gc: marking orphan failed");
        }
    }

    async fn delete(&self, key: &Key, why: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.ns);
        match api
            .delete(&key.name, &DeleteParams::default().grace_period(0))
            .await
        {
            Ok(_) => tracing::info!(%key, "pod gc: deleted {why}"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::warn!(%key, error = %e, "pod gc: deleting {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: Option<&str>, phase: Option<&str>, created: &str) -> Arc<Pod> {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "d", "creationTimestamp": created},
            "spec": {"containers": [], "nodeName": node},
            "status": {"phase": phase},
        }))
        .expect("pod");
        Arc::new(p)
    }

    fn names(keys: &[Key]) -> Vec<&str> {
        keys.iter().map(|k| k.name.as_str()).collect()
    }

    #[test]
    fn terminated_pods_over_the_threshold_go_oldest_first() {
        let pods = vec![
            pod("new", Some("n"), Some("Succeeded"), "2026-01-03T00:00:00Z"),
            pod("old", Some("n"), Some("Failed"), "2026-01-01T00:00:00Z"),
            pod("mid", Some("n"), Some("Succeeded"), "2026-01-02T00:00:00Z"),
            pod(
                "running",
                Some("n"),
                Some("Running"),
                "2025-01-01T00:00:00Z",
            ),
        ];
        let nodes = HashSet::from(["n".to_owned()]);
        let mut m = HashMap::new();
        let now = Instant::now();
        let s = plan(&pods, &nodes, 1, Duration::ZERO, now, &mut m);
        assert_eq!(names(&s.terminated), ["old", "mid"]);
        let s = plan(&pods, &nodes, 0, Duration::ZERO, now, &mut m);
        assert!(s.terminated.is_empty(), "threshold 0 turns it off");
    }

    #[test]
    fn orphans_wait_for_the_quarantine() {
        let pods = vec![
            pod(
                "lost",
                Some("gone"),
                Some("Running"),
                "2026-01-01T00:00:00Z",
            ),
            pod("fine", Some("n"), Some("Running"), "2026-01-01T00:00:00Z"),
        ];
        let nodes = HashSet::from(["n".to_owned()]);
        let mut m = HashMap::new();
        let t0 = Instant::now();
        let q = Duration::from_secs(40);
        assert!(plan(&pods, &nodes, 0, q, t0, &mut m).orphaned.is_empty());
        let s = plan(&pods, &nodes, 0, q, t0 + q, &mut m);
        assert_eq!(s.orphaned.len(), 1);
        assert_eq!(s.orphaned[0].0.name, "lost");
        assert_eq!(s.orphaned[0].1, "gone");
        // The node came back: the clock starts over.
        let back = HashSet::from(["n".to_owned(), "gone".to_owned()]);
        assert!(plan(&pods, &back, 0, q, t0 + q, &mut m).orphaned.is_empty());
        assert!(m.is_empty());
    }

    #[test]
    fn unscheduled_terminating_pods_go_at_once() {
        let mut p = (*pod("p", None, Some("Pending"), "2026-01-01T00:00:00Z")).clone();
        p.metadata.deletion_timestamp = Some(crate::util::now());
        let pending = pod("q", None, Some("Pending"), "2026-01-01T00:00:00Z");
        let s = plan(
            &[Arc::new(p), pending],
            &HashSet::new(),
            0,
            Duration::ZERO,
            Instant::now(),
            &mut HashMap::new(),
        );
        assert_eq!(names(&s.unscheduled_terminating), ["p"]);
    }
}
