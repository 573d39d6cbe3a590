//! The ReplicaSet controller: keeps `spec.replicas` active pods matching the template, adopts
//! orphans its selector matches, and reports replicas/ready/available in the status.
//!
//! Between writing pods and seeing them in the cache it remembers what it asked for
//! ("expectations"), so that a cache that lags behind never makes it create or delete twice.

use std::{cmp::Reverse, collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    Result,
    error::ApiContext as _,
    events::{Recorder, Type},
    expectations::Expectations,
    informer::{Change, Informer},
    util::{self, Key},
    workqueue::WorkQueue,
};

/// Pods created or deleted at most per reconcile.
const BURST: usize = 500;
/// Concurrent writes per reconcile.
const PARALLEL: usize = 16;
/// The ReplicaSet controller.
pub(crate) struct ReplicaSets {
    client: Client,
    sets: Store<ReplicaSet>,
    pods: Store<Pod>,
    queue: WorkQueue<Key>,
    expectations: Expectations<Key>,
    recorder: Recorder,
}

fn enqueue_for_pod(queue: &WorkQueue<Key>, sets: &Store<ReplicaSet>, pod: &Pod) {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    match util::controller_of(&pod.metadata) {
        Some(r) if r.kind == "ReplicaSet" => queue.add(Key::new(ns, &r.name)),
        Some(_) => {}
        None => {
            for rs in sets.state() {
                if rs.metadata.namespace.as_deref() == Some(ns)
                    && rs.spec.as_ref().is_some_and(|s| {
                        !util::selector_is_empty(&s.selector)
                            && util::selector_matches(&s.selector, pod.metadata.labels.as_ref())
                    })
                {
                    queue.add(Key::of(rs.as_ref()));
                }
            }
        }
    }
}

impl ReplicaSets {
    /// Registers the controller's handlers.
    pub fn register(
        client: Client,
        sets: &mut Informer<ReplicaSet>,
        pods: &mut Informer<Pod>,
    ) -> Arc<Self> {
        let queue = WorkQueue::new();
        let (rs_store, pod_store) = (sets.store(), pods.store());
        sets.queue_keys(&queue);
        {
            let (queue, store) = (queue.clone(), rs_store.clone());
            pods.on(move |c| match c {
                Change::Applied(p) | Change::Deleted(p) => enqueue_for_pod(&queue, &store, p),
                Change::Relisted => store
                    .state()
                    .iter()
                    .for_each(|rs| queue.add(Key::of(rs.as_ref()))),
            });
        }
        Arc::new(ReplicaSets {
            recorder: Recorder::new(client.clone(), "replicaset-controller"),
            client,
            sets: rs_store,
            pods: pod_store,
            queue,
            expectations: Expectations::new(),
        })
    }

    /// Reconciles until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if !crate::informer::ready(&self.sets, &cancel).await
            || !crate::informer::ready(&self.pods, &cancel).await
        {
            return;
        }
        let this = Arc::clone(&self);
        self.queue
            .clone()
            .run(cancel, "replicaset", move |key| {
                let this = Arc::clone(&this);
                async move { this.reconcile(key).await }
            })
            .await;
    }

    async fn reconcile(&self, key: Key) -> Result<Option<Duration>> {
        let Some(rs) = self.sets.get(&ObjectRef::new(&key.name).within(&key.ns)) else {
            self.expectations.forget(&key);
            return Ok(None);
        };
        let Some(spec) = rs.spec.as_ref() else {
            return Ok(None);
        };
        if util::terminating(rs.as_ref()) || util::selector_is_empty(&spec.selector) {
            return Ok(None);
        }
        let uid = util::uid(rs.as_ref()).to_owned();
        let in_ns = self
            .pods
            .state_filter(|p| p.metadata.namespace.as_deref() == Some(key.ns.as_str()));
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &key.ns);
        let mut owned: Vec<Arc<Pod>> = Vec::new();
        for p in &in_ns {
            if util::pod_finished(p) {
                continue;
            }
            match util::controller_of(&p.metadata) {
                Some(r) if r.uid == uid => owned.push(Arc::clone(p)),
                Some(_) => {}
                None if !util::terminating(p.as_ref())
                    && util::selector_matches(&spec.selector, p.metadata.labels.as_ref()) =>
                {
                    let mut adopted = (**p).clone();
                    adopted
                        .metadata
                        .owner_references
                        .get_or_insert_with(Vec::new)
                        .push(util::controller_ref(rs.as_ref()));
                    let name = p.metadata.name.clone().unwrap_or_default();
                    match pods_api
                        .replace(&name, &PostParams::default(), &adopted)
                        .await
                    {
                        Ok(p) => owned.push(Arc::new(p)),
                        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                        Err(e) => return Err(e).ctx(|| format!("adopting pod {}/{name}", key.ns)),
                    }
                }
                None => {}
            }
        }
        let by_name: HashMap<&str, &Pod> = in_ns
            .iter()
            .filter_map(|p| Some((p.metadata.name.as_deref()?, p.as_ref())))
            .collect();
        let met = self.expectations.met(&key, &by_name);
        let active: Vec<&Arc<Pod>> = owned
            .iter()
            .filter(|p| !util::terminating(p.as_ref()))
            .collect();
        let want = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
        let mut failure = None;
        if met {
            if active.len() < want {
                let n = (want - active.len()).min(BURST);
                if let Err(e) = self.create_pods(&key, &rs, n, &pods_api).await {
                    failure = Some(e);
                }
            } else if active.len() > want {
                let victims = pick_victims(&active, active.len() - want);
                if let Err(e) = self.delete_pods(&key, &rs, victims, &pods_api).await {
                    failure = Some(e);
                }
            }
        }
        let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
        let now = jiff::Timestamp::now();
        let ready = active.iter().filter(|p| util::pod_ready(p)).count();
        let available = active
            .iter()
            .filter(|p| util::pod_available(p, min_ready, now))
            .count();
        let labelled = active
            .iter()
            .filter(|p| {
                spec.template
                    .as_ref()
                    .and_then(|t| t.metadata.as_ref())
                    .and_then(|m| m.labels.as_ref())
                    .is_none_or(|want| {
                        want.iter().all(|(k, v)| {
                            p.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
                        })
                    })
            })
            .count();
        let status = json!({
            "replicas": active.len(),
            "fullyLabeledReplicas": labelled,
            "readyReplicas": ready,
            "availableReplicas": available,
            "observedGeneration": rs.metadata.generation,
        });
        let current = rs.status.as_ref().map(|s| {
            json!({
                "replicas": s.replicas,
                "fullyLabeledReplicas": s.fully_labeled_replicas.unwrap_or(0),
                "readyReplicas": s.ready_replicas.unwrap_or(0),
                "availableReplicas": s.available_replicas.unwrap_or(0),
                "observedGeneration": s.observed_generation,
            })
        });
        if current.as_ref() != Some(&status) {
            let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &key.ns);
            api.patch_status(
                &key.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .ctx(|| format!("updating the status of replicaset {key}"))?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if !met {
            return Ok(Some(Duration::from_secs(1)));
        }
        // Pods ready but not yet available need another look when they become so.
        if min_ready > 0 && ready > available {
            return Ok(Some(Duration::from_secs(1)));
        }
        Ok(None)
    }

    async fn create_pods(
        &self,
        key: &Key,
        rs: &ReplicaSet,
        n: usize,
        api: &Api<Pod>,
    ) -> Result<()> {
        let template = rs
            .spec
            .as_ref()
            .and_then(|s| s.template.clone())
            .unwrap_or_default();
        let meta = template.metadata.unwrap_or_default();
        let pod = Pod {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", key.name)),
                namespace: Some(key.ns.clone()),
                labels: meta.labels,
                annotations: meta.annotations,
                owner_references: Some(vec![util::controller_ref(rs)]),
                ..ObjectMeta::default()
            },
            spec: template.spec,
            status: None,
        };
        let pp = PostParams::default();
        let results: Vec<_> = futures::stream::iter(0..n)
            .map(|_| api.create(&pp, &pod))
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut names = Vec::new();
        let mut error = None;
        for r in results {
            match r {
                Ok(p) => names.push(p.metadata.name.unwrap_or_default()),
                Err(e) => error = Some(e),
            }
        }
        if !names.is_empty() {
            self.recorder.record(
                rs,
                Type::Normal,
                "SuccessfulCreate",
                format!("Created {} pod(s): {}", names.len(), names.join(", ")),
            );
        }
        self.expectations.expect(key, names, Vec::new());
        match error {
            Some(e) => Err(e).ctx(|| format!("creating pods for replicaset {key}")),
            None => Ok(()),
        }
    }

    async fn delete_pods(
        &self,
        key: &Key,
        rs: &ReplicaSet,
        victims: Vec<&Arc<Pod>>,
        api: &Api<Pod>,
    ) -> Result<()> {
        let names: Vec<String> = victims
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let results: Vec<_> = futures::stream::iter(names)
            .map(|n| {
                let api = api.clone();
                async move { (api.delete(&n, &DeleteParams::default()).await, n) }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut deleted = Vec::new();
        let mut error = None;
        for (r, n) in results {
            match r {
                Ok(_) => deleted.push(n),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                // A conflict with a concurrent write: retried, and not expected meanwhile.
                Err(e) => error = Some(e),
            }
        }
        if !deleted.is_empty() {
            self.recorder.record(
                rs,
                Type::Normal,
                "SuccessfulDelete",
                format!("Deleted {} pod(s): {}", deleted.len(), deleted.join(", ")),
            );
        }
        self.expectations.expect(key, Vec::new(), deleted);
        match error {
            Some(e) => Err(e).ctx(|| format!("deleting pods of replicaset {key}")),
            None => Ok(()),
        }
    }
}

/// The pods to delete first, in Kubernetes' order: unscheduled, then pending, then not
/// ready, then the lowest `controller.kubernetes.io/pod-deletion-cost`, then those sharing
/// their node with more of the set's pods (so that scaling down keeps the set spread), then
/// the most recently ready, then the youngest.
fn pick_victims<'a>(active: &[&'a Arc<Pod>], n: usize) -> Vec<&'a Arc<Pod>> {
    let phase_rank = |p: &Pod| match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Running") => 2,
        _ => 1,
    };
    let mut on_node: HashMap<&str, usize> = HashMap::new();
    for p in active {
        if let Some(node) = util::pod_node(p) {
            *on_node.entry(node).or_default() += 1;
        }
    }
    let mut ranked: Vec<&'a Arc<Pod>> = active.to_vec();
    ranked.sort_by_key(|p| {
        let ready_since = util::pod_ready_since(p).flatten().map(|t| t.0);
        let co_located = util::pod_node(p).map_or(0, |n| on_node.get(n).copied().unwrap_or(0));
        (
            util::pod_node(p).is_some(),
            phase_rank(p),
            util::pod_ready(p),
            deletion_cost(p),
            Reverse(co_located),
            Reverse(ready_since),
            Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)),
        )
    });
    ranked.truncate(n);
    ranked
}

/// The pod's `controller.kubernetes.io/pod-deletion-cost` (0 when absent or not an int32, as
/// Kubernetes treats it).
fn deletion_cost(pod: &Pod) -> i32 {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("controller.kubernetes.io/pod-deletion-cost"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: Option<&str>, ready: bool) -> Arc<Pod> {
        let mut v = json!({
            "metadata": {"name": name},
            "spec": {"containers": []},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        });
        if let Some(n) = node {
            v["spec"]["nodeName"] = json!(n);
        }
        Arc::new(serde_json::from_value(v).expect("pod"))
    }

    #[test]
    fn unscheduled_and_unready_pods_go_first() {
        let (a, b, c) = (
            pod("ready", Some("n"), true),
            pod("unready", Some("n"), false),
            pod("pending", None, false),
        );
        let active = vec![&a, &b, &c];
        let names: Vec<_> = pick_victims(&active, 2)
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(names, ["pending", "unready"]);
    }

    #[test]
    fn doubled_up_and_cheap_pods_go_before_others() {
        let (a, b, c, d) = (
            pod("alone", Some("n1"), true),
            pod("shared-1", Some("n2"), true),
            pod("shared-2", Some("n2"), true),
            pod("cheap", Some("n3"), true),
        );
        let mut cheap = (*d).clone();
        cheap.metadata.annotations = Some(
            [(
                "controller.kubernetes.io/pod-deletion-cost".to_owned(),
                "-5".to_owned(),
            )]
            .into(),
        );
        let d = Arc::new(cheap);
        let active = vec![&a, &b, &c, &d];
        let names: Vec<_> = pick_victims(&active, 2)
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(names[0], "cheap");
        assert!(names[1].starts_with("shared-"), "{names:?}");
    }
}
