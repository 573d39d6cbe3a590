//! The DaemonSet controller: one pod on every node the DaemonSet fits (see [`placement`]),
//! pinned to its node through required node affinity so the scheduler binds it there; pods
//! are labelled with the template's hash (`controller-revision-hash`), replaced within
//! `maxUnavailable` (or, with `maxSurge`, started beside the old pod first) under
//! RollingUpdate, or only when deleted under OnDelete; nodes joining,
//! changing or leaving add and remove pods; the status is what `kubectl rollout status`
//! reads.

mod history;
mod placement;
mod plan;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, DaemonSet},
        core::v1::{Node, Pod, PodSpec},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    Result,
    deployment::{scaled, template_hash},
    error::ApiContext as _,
    events::Recorder,
    expectations::Expectations,
    informer::{Change, Informer},
    podwrites::Writer,
    util::{self, Key},
    workqueue::WorkQueue,
};
use plan::{HASH_LABEL, NodePods};

/// The deprecated label Kubernetes still sets on daemon pods: the DaemonSet's generation.
const TEMPLATE_GENERATION: &str = "pod-template-generation";

/// The DaemonSet controller.
pub(crate) struct DaemonSets {
    client: Client,
    sets: Store<DaemonSet>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    revisions: Store<ControllerRevision>,
    queue: WorkQueue<Key>,
    expectations: Expectations<Key>,
    recorder: Recorder,
}

fn queue_all(queue: &WorkQueue<Key>, sets: &Store<DaemonSet>) {
    sets.state()
        .iter()
        .for_each(|d| queue.add(Key::of(d.as_ref())));
}

fn selects(ds: &DaemonSet, pod: &Pod) -> bool {
    ds.metadata.namespace == pod.metadata.namespace
        && ds.spec.as_ref().is_some_and(|s| {
            !util::selector_is_empty(&s.selector)
                && util::selector_matches(&s.selector, pod.metadata.labels.as_ref())
        })
}

/// What about a node matters to DaemonSets (not its heartbeats).
fn node_fingerprint(n: &Node) -> String {
    let spec = n.spec.as_ref();
    serde_json::to_string(&(
        &n.metadata.labels,
        spec.and_then(|s| s.taints.as_ref()),
        spec.and_then(|s| s.unschedulable),
    ))
    .unwrap_or_default()
}

impl DaemonSets {
    /// Registers the controller's handlers.
    pub fn register(
        client: Client,
        sets: &mut Informer<DaemonSet>,
        pods: &mut Informer<Pod>,
        nodes: &mut Informer<Node>,
        revisions: &mut Informer<ControllerRevision>,
    ) -> Arc<Self> {
        let queue = WorkQueue::new();
        let ds_store = sets.store();
        sets.queue_keys(&queue);
        {
            // A revision deleted behind our back is made again.
            let queue = queue.clone();
            revisions.on(move |c| {
                if let Change::Deleted(r) = c
                    && let Some(o) = util::controller_of(&r.metadata)
                    && o.kind == "DaemonSet"
                {
                    queue.add(Key::new(
                        r.metadata.namespace.as_deref().unwrap_or_default(),
                        &o.name,
                    ));
                }
            });
        }
        {
            let (queue, store) = (queue.clone(), ds_store.clone());
            pods.on(move |c| match c {
                Change::Applied(p) | Change::Deleted(p) => match util::controller_of(&p.metadata) {
                    Some(r) if r.kind == "DaemonSet" => queue.add(Key::new(
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        &r.name,
                    )),
                    Some(_) => {}
                    None => store
                        .state()
                        .iter()
                        .filter(|d| selects(d, p))
                        .for_each(|d| queue.add(Key::of(d.as_ref()))),
                },
                Change::Relisted => queue_all(&queue, &store),
            });
        }
        {
            // Every DaemonSet looks again when a node comes, goes, or changes its labels,
            // taints or cordon; heartbeats alone change nothing here.
            let (queue, store) = (queue.clone(), ds_store.clone());
            let seen: Mutex<HashMap<String, String>> = Mutex::new(HashMap::new());
            nodes.on(move |c| {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let changed = match c {
                    Change::Applied(n) => {
                        let name = n.metadata.name.clone().unwrap_or_default();
                        let print = node_fingerprint(n);
                        seen.insert(name, print.clone()).as_ref() != Some(&print)
                    }
                    Change::Deleted(n) => {
                        seen.remove(n.metadata.name.as_deref().unwrap_or_default());
                        true
                    }
                    Change::Relisted => true,
                };
                if changed {
                    queue_all(&queue, &store);
                }
            });
        }
        Arc::new(DaemonSets {
            recorder: Recorder::new(client.clone(), "daemonset-controller"),
            client,
            sets: ds_store,
            pods: pods.store(),
            nodes: nodes.store(),
            revisions: revisions.store(),
            queue,
            expectations: Expectations::new(),
        })
    }

    /// Reconciles until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        for ready in [
            crate::informer::ready(&self.sets, &cancel).await,
            crate::informer::ready(&self.pods, &cancel).await,
            crate::informer::ready(&self.nodes, &cancel).await,
        ] {
            if !ready {
                return;
            }
        }
        let this = Arc::clone(&self);
        self.queue
            .clone()
            .run(cancel, "daemonset", move |key| {
                let this = Arc::clone(&this);
                async move { this.reconcile(key).await }
            })
            .await;
    }

    /// The pods `ds` controls, adopting orphans its selector matches.
    async fn claim(&self, ds: &DaemonSet, in_ns: &[Arc<Pod>]) -> Result<Vec<Arc<Pod>>> {
        let uid = util::uid(ds);
        let ns = ds.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let mut owned = Vec::new();
        for p in in_ns {
            if util::pod_finished(p) && util::terminating(p.as_ref()) {
                continue;
            }
            match util::controller_of(&p.metadata) {
                Some(r) if r.uid == uid => owned.push(Arc::clone(p)),
                None if !util::terminating(p.as_ref()) && selects(ds, p) => {
                    let mut adopted = (**p).clone();
                    adopted
                        .metadata
                        .owner_references
                        .get_or_insert_with(Vec::new)
                        .push(util::controller_ref(ds));
                    let name = p.metadata.name.clone().unwrap_or_default();
                    match api.replace(&name, &PostParams::default(), &adopted).await {
                        Ok(p) => owned.push(Arc::new(p)),
                        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                        Err(e) => return Err(e).ctx(|| format!("adopting pod {ns}/{name}")),
                    }
                }
                _ => {}
            }
        }
        Ok(owned)
    }

    async fn reconcile(&self, key: Key) -> Result<Option<Duration>> {
        let Some(ds) = self.sets.get(&ObjectRef::new(&key.name).within(&key.ns)) else {
            self.expectations.forget(&key);
            return Ok(None);
        };
        let Some(spec) = ds.spec.as_ref() else {
            return Ok(None);
        };
        if util::terminating(ds.as_ref()) || util::selector_is_empty(&spec.selector) {
            return Ok(None);
        }
        let template = spec.template.clone();
        let hash = template_hash(&template);
        let mut pod_spec = template.spec.clone().unwrap_or_default();
        placement::add_default_tolerations(&mut pod_spec);

        let in_ns = self
            .pods
            .state_filter(|p| p.metadata.namespace.as_deref() == Some(key.ns.as_str()));
        let owned = self.claim(&ds, &in_ns).await?;
        let owned_refs: Vec<&Pod> = owned.iter().map(AsRef::as_ref).collect();
        history::sync(&self.client, &self.revisions, &key, &ds, &hash, &owned_refs).await?;
        let nodes = self.nodes.state();
        let mut by_node: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        let mut stray = Vec::new();
        for p in &owned {
            match placement::target_node(p) {
                Some(n) if nodes.iter().any(|x| x.metadata.name.as_deref() == Some(n)) => {
                    by_node.entry(n).or_default().push(p.as_ref());
                }
                // Its node is gone (or it was never pinned): it can run nowhere, and no
                // agent is left to finish its deletion.
                _ => stray.push(p.metadata.name.clone().unwrap_or_default()),
            }
        }
        let node_pods: Vec<NodePods<'_>> = nodes
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.as_deref()?;
                Some(NodePods {
                    name,
                    fit: placement::fit(&pod_spec, n),
                    pods: by_node.remove(name).unwrap_or_default(),
                })
            })
            .collect();

        let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
        let now = jiff::Timestamp::now();
        let by_name: HashMap<&str, &Pod> = in_ns
            .iter()
            .filter_map(|p| Some((p.metadata.name.as_deref()?, p.as_ref())))
            .collect();
        let met = self.expectations.met(&key, &by_name);
        let mut failure = None;
        if met {
            let strategy = spec.update_strategy.as_ref();
            let on_delete = strategy.and_then(|s| s.type_.as_deref()) == Some("OnDelete");
            let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
            let desired = node_pods.iter().filter(|n| n.fit.should_run).count();
            let desired = i32::try_from(desired).unwrap_or(i32::MAX);
            let max_surge = if on_delete {
                0
            } else {
                let s = scaled(rolling.and_then(|r| r.max_surge.as_ref()), desired, 0, true);
                usize::try_from(s).unwrap_or(0)
            };
            let surging = (max_surge > 0).then_some(hash.as_str());
            let mut todo = plan::manage(&node_pods, surging);
            // Replace old pods only once the nodes are settled, as Kubernetes does.
            let settled = todo.create_on.is_empty() && todo.delete.is_empty() && stray.is_empty();
            if !on_delete && settled {
                if max_surge > 0 {
                    let (delete, create_on) =
                        plan::surge(&node_pods, &hash, max_surge, min_ready, now);
                    todo.delete.extend(delete);
                    todo.create_on.extend(create_on);
                } else {
                    let max_unavailable =
                        max_unavailable(rolling.and_then(|r| r.max_unavailable.as_ref()), desired);
                    todo.delete.extend(plan::roll(
                        &node_pods,
                        &hash,
                        max_unavailable,
                        min_ready,
                        now,
                    ));
                }
            }
            let writer = self.writer(&key, &ds);
            let deletes: Vec<String> = todo.delete.into_iter().collect();
            if let Err(e) = writer.delete(deletes, &DeleteParams::default()).await {
                failure = Some(e);
            }
            // No agent is left to stop a pod whose node is gone: remove it at once, as
            // Kubernetes' pod garbage collector would.
            let at_once = DeleteParams::default().grace_period(0);
            if let Err(e) = writer.delete(stray, &at_once).await {
                failure = Some(e);
            }
            if let Err(e) = self
                .create_pods(&key, &ds, &pod_spec, &hash, todo.create_on)
                .await
            {
                failure = Some(e);
            }
        }
        let c = plan::counts(&node_pods, &hash, min_ready, now);
        let status = json!({
            "desiredNumberScheduled": c.desired,
            "currentNumberScheduled": c.current,
            "numberMisscheduled": c.misscheduled,
            "numberReady": c.ready,
            "numberAvailable": c.available,
            "numberUnavailable": c.desired - c.available,
            "updatedNumberScheduled": c.updated,
            "observedGeneration": ds.metadata.generation,
        });
        let current = ds.status.as_ref().map(|s| {
            json!({
                "desiredNumberScheduled": s.desired_number_scheduled,
                "currentNumberScheduled": s.current_number_scheduled,
                "numberMisscheduled": s.number_misscheduled,
                "numberReady": s.number_ready,
                "numberAvailable": s.number_available.unwrap_or(0),
                "numberUnavailable": s.number_unavailable.unwrap_or(0),
                "updatedNumberScheduled": s.updated_number_scheduled.unwrap_or(0),
                "observedGeneration": s.observed_generation,
            })
        });
        if current.as_ref() != Some(&status) {
            let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &key.ns);
            api.patch_status(
                &key.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .ctx(|| format!("updating the status of daemonset {key}"))?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if !met || (min_ready > 0 && c.ready > c.available) {
            return Ok(Some(Duration::from_secs(1)));
        }
        Ok(None)
    }

    fn writer<'a>(&'a self, key: &'a Key, ds: &'a DaemonSet) -> Writer<'a, DaemonSet> {
        Writer {
            key,
            owner: ds,
            recorder: &self.recorder,
            expectations: &self.expectations,
        }
    }

    /// Creates one pod pinned to each of `nodes`.
    async fn create_pods(
        &self,
        key: &Key,
        ds: &DaemonSet,
        spec: &PodSpec,
        hash: &str,
        nodes: Vec<String>,
    ) -> Result<()> {
        if nodes.is_empty() {
            return Ok(());
        }
        let meta = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.clone())
            .unwrap_or_default();
        let mut labels = meta.labels.unwrap_or_default();
        labels.insert(HASH_LABEL.into(), hash.into());
        let generation = ds.metadata.generation.unwrap_or(0);
        labels.insert(TEMPLATE_GENERATION.into(), generation.to_string());
        let pods = nodes
            .into_iter()
            .map(|node| {
                let mut spec = spec.clone();
                placement::pin_to_node(&mut spec, &node);
                Pod {
                    metadata: ObjectMeta {
                        generate_name: Some(format!("{}-", key.name)),
                        namespace: Some(key.ns.clone()),
                        labels: Some(labels.clone()),
                        annotations: meta.annotations.clone(),
                        owner_references: Some(vec![util::controller_ref(ds)]),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                    status: None,
                }
            })
            .collect();
        self.writer(key, ds).create(pods).await
    }
}

/// How many nodes may lack an available up-to-date pod during a rolling update without
/// surge: the strategy's `maxUnavailable` (default 1; a percentage of the desired count,
/// rounded up), and at least 1, since a DaemonSet cannot make room otherwise.
fn max_unavailable(v: Option<&IntOrString>, desired: i32) -> usize {
    let n = match v {
        None => 1,
        Some(v) => scaled(Some(v), desired, 0, true),
    };
    usize::try_from(n.max(1)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_unavailable_defaults_and_percentages() {
        assert_eq!(max_unavailable(None, 10), 1);
        assert_eq!(
            max_unavailable(Some(&IntOrString::String("25%".into())), 10),
            3
        );
        assert_eq!(max_unavailable(Some(&IntOrString::Int(0)), 10), 1);
        assert_eq!(max_unavailable(Some(&IntOrString::Int(4)), 10), 4);
    }
}
