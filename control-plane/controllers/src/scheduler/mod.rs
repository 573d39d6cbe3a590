//! The scheduler: places pending pods on nodes.
//!
//! One loop pops pods from the [`queue::SchedulingQueue`], runs the [`plugins`] over the
//! [`cache::Cache`] (starting at a rotating offset and stopping once enough feasible nodes
//! are found, so large clusters cost a bounded amount per pod), assumes the pod onto the best
//! node and writes the binding in the background, many at a time.

mod bind;
pub(crate) mod cache;
mod images;
pub(crate) mod plugins;
pub(crate) mod queue;
mod topology;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Client,
    runtime::reflector::{ObjectRef, Store},
};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    Options,
    events::Recorder,
    informer::{Change, Informer},
    util::{self, Key},
};
use cache::{Cache, PodReq};
use plugins::Reason;
use queue::SchedulingQueue;

struct State {
    cache: Cache,
    queue: SchedulingQueue,
    next_start: usize,
    /// A parked pod waits for other pods to be placed (pod affinity, topology spread): placing
    /// one counts as a cluster change, as kube-scheduler requeues on assigned-pod events.
    waiting_for_pods: bool,
}

impl State {
    /// Accounts a pod to a node, waking pods that wait for placements.
    /// Accounts a pod seen bound to `node`.
    fn place(&mut self, key: Key, node: &str, req: PodReq) {
        let added = self.cache.add_pod(key, node, req);
        self.placed(added);
    }

    /// Accounts a pod this scheduler decided to bind to `node`.
    fn assume(&mut self, key: Key, node: &str, req: PodReq) {
        let added = self.cache.assume_pod(key, node, req);
        self.placed(added);
    }

    fn placed(&mut self, added: bool) {
        if added && self.waiting_for_pods {
            self.waiting_for_pods = false;
            self.queue.cluster_changed();
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The scheduler, wired to the shared pod and node informers.
pub(crate) struct Scheduler {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    client: Client,
    name: String,
    concurrency: usize,
    pods: Store<Pod>,
    nodes: Store<Node>,
}

/// What one scheduling attempt decided.
enum Decision {
    /// Already placed and waiting for its binding.
    Skip,
    Bind(Arc<Pod>, String),
    Unschedulable(Arc<Pod>, String),
}

impl Scheduler {
    /// Registers the scheduler's handlers on the informers.
    pub fn register(
        client: Client,
        opts: &Options,
        pods: &mut Informer<Pod>,
        nodes: &mut Informer<Node>,
    ) -> Self {
        let state = Arc::new(Mutex::new(State {
            cache: Cache::default(),
            queue: SchedulingQueue::new(
                opts.scheduler_backoff_initial,
                opts.scheduler_backoff_max,
                opts.scheduler_retry_unschedulable,
            ),
            next_start: 0,
            waiting_for_pods: false,
        }));
        let wake = Arc::new(Notify::new());
        let name = opts.scheduler_name.clone();
        let pod_store = pods.store();
        {
            let (state, wake, name, store) = (
                Arc::clone(&state),
                Arc::clone(&wake),
                name.clone(),
                pod_store.clone(),
            );
            pods.on(move |change| {
                let mut s = lock(&state);
                match change {
                    Change::Applied(p) => {
                        // The cache already holds this object: share it rather than copy it.
                        let shared = || {
                            store
                                .get(&ObjectRef::from_obj(p))
                                .filter(|c| {
                                    c.metadata.resource_version == p.metadata.resource_version
                                })
                                .unwrap_or_else(|| Arc::new(p.clone()))
                        };
                        on_pod(&mut s, p, &name, shared)
                    }
                    Change::Deleted(p) => {
                        let key = Key::of(p);
                        s.queue.remove(&key);
                        if s.cache.remove_pod(&key) {
                            s.queue.cluster_changed();
                        }
                    }
                    Change::Relisted => {
                        let pods = store.state();
                        let unbound: HashSet<Key> = pods
                            .iter()
                            .filter(|p| util::pod_node(p).is_none())
                            .map(|p| Key::of(p.as_ref()))
                            .collect();
                        s.cache.clear_pods(|k| unbound.contains(k));
                        for p in pods {
                            on_pod(&mut s, &p, &name, || Arc::clone(&p));
                        }
                        s.queue.cluster_changed();
                    }
                }
                drop(s);
                wake.notify_one();
            });
        }
        let node_store = nodes.store();
        {
            let (state, wake, store) = (Arc::clone(&state), Arc::clone(&wake), node_store.clone());
            nodes.on(move |change| {
                let mut s = lock(&state);
                match change {
                    Change::Applied(n) => s.cache.upsert_node(n),
                    Change::Deleted(n) => s
                        .cache
                        .remove_node(n.metadata.name.as_deref().unwrap_or_default()),
                    Change::Relisted => {
                        let live: std::collections::HashSet<String> = store
                            .state()
                            .iter()
                            .filter_map(|n| n.metadata.name.clone())
                            .collect();
                        let gone: Vec<String> = s
                            .cache
                            .nodes
                            .iter()
                            .filter(|n| n.present && !live.contains(&n.name))
                            .map(|n| n.name.clone())
                            .collect();
                        for n in gone {
                            s.cache.remove_node(&n);
                        }
                        for n in store.state() {
                            s.cache.upsert_node(&n);
                        }
                    }
                }
                s.queue.cluster_changed();
                drop(s);
                wake.notify_one();
            });
        }
        Scheduler {
            state,
            wake,
            client,
            name,
            concurrency: opts.bind_concurrency.max(1),
            pods: pod_store,
            nodes: node_store,
        }
    }

    /// Schedules until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        if !crate::informer::ready(&self.pods, &cancel).await
            || !crate::informer::ready(&self.nodes, &cancel).await
        {
            return;
        }
        tracing::info!(scheduler = %self.name, "scheduler started");
        let binder = Arc::new(bind::Binder {
            client: self.client.clone(),
            recorder: Recorder::new(self.client.clone(), "default-scheduler"),
            no_binding_subresource: AtomicBool::new(false),
        });
        let permits = Arc::new(Semaphore::new(self.concurrency));
        loop {
            let decision = {
                let mut s = lock(&self.state);
                s.queue.flush();
                s.queue.pop().map(|pod| decide(&mut s, pod))
            };
            if matches!(decision, Some(Decision::Skip)) {
                continue;
            }
            let Some(decision) = decision else {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            };
            let permit = tokio::select! {
                () = cancel.cancelled() => return,
                p = Arc::clone(&permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (binder, state) = (Arc::clone(&binder), Arc::clone(&self.state));
            match decision {
                Decision::Bind(pod, node) => {
                    tokio::spawn(async move {
                        let result = binder.bind(&pod, &node).await;
                        drop(permit);
                        if let Err(e) = result {
                            let key = Key::of(pod.as_ref());
                            let mut s = lock(&state);
                            s.cache.remove_pod(&key);
                            if !e.is_not_found() && !e.is_conflict() {
                                tracing::warn!(pod = %key, %node, error = %e, "binding failed");
                                s.queue.park(key);
                            }
                        }
                    });
                }
                Decision::Skip => {}
                Decision::Unschedulable(pod, message) => {
                    tokio::spawn(async move {
                        binder.unschedulable(&pod, &message).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

fn responsible(pod: &Pod, name: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n == name)
}

/// Accounts a pod the informer saw; `shared` gives the cached copy a pending pod is queued
/// as.
fn on_pod(s: &mut State, p: &Pod, name: &str, shared: impl FnOnce() -> Arc<Pod>) {
    let key = Key::of(p);
    if let Some(node) = util::pod_node(p) {
        s.queue.remove(&key);
        if util::pod_finished(p) {
            if s.cache.remove_pod(&key) {
                s.queue.cluster_changed();
            }
        } else {
            s.place(key, node, PodReq::of(p));
        }
    } else if responsible(p, name) && util::pod_active(p) {
        s.queue.upsert(shared());
    } else {
        s.queue.remove(&key);
    }
}

/// How many feasible nodes to look for before choosing: all of them in small clusters, a
/// share that shrinks with size in large ones (as Kubernetes' adaptive percentage does).
fn enough(nodes: usize) -> usize {
    if nodes <= 100 {
        return nodes;
    }
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(100)
}

fn decide(s: &mut State, pod: Arc<Pod>) -> Decision {
    let key = Key::of(pod.as_ref());
    if s.cache.has_pod(&key) {
        return Decision::Skip;
    }
    let req = PodReq::of(&pod);
    let pre = topology::PreState::compute(&s.cache, &req);
    let with_images = s.cache.has_images() && !req.images.is_empty();
    let total = s.cache.nodes.len();
    let want = enough(s.cache.node_count());
    let mut feasible: Vec<(usize, i64, i64, plugins::Raw)> = Vec::with_capacity(want.min(total));
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut why = Vec::new();
    let start = if total == 0 { 0 } else { s.next_start % total };
    let mut examined = 0;
    for i in 0..total {
        if feasible.len() >= want {
            break;
        }
        examined += 1;
        let idx = (start + i) % total;
        let node = &s.cache.nodes[idx];
        if !node.present {
            continue;
        }
        why.clear();
        plugins::filter(node, &req, &pre, &mut why);
        if why.is_empty() {
            let (least, balanced) = plugins::resource_scores(node, &req);
            let image = if with_images {
                let cache = &s.cache;
                images::score(
                    &req.images,
                    &node.images,
                    |i| cache.image_spread(i),
                    cache.node_count(),
                )
            } else {
                0
            };
            feasible.push((
                idx,
                least,
                balanced,
                plugins::raw_scores(node, &req, &pre, image),
            ));
        } else {
            for r in why.drain(..) {
                s.waiting_for_pods |= matches!(r, Reason::Spread | Reason::PodAffinity);
                *reasons.entry(r).or_insert(0) += 1;
            }
        }
    }
    s.next_start = start + examined;
    if feasible.is_empty() {
        s.queue.park(key);
        return Decision::Unschedulable(pod, plugins::explain(s.cache.node_count(), &reasons));
    }
    let max_affinity = feasible.iter().map(|f| f.3.affinity).max().unwrap_or(0);
    let max_owner = feasible.iter().map(|f| f.3.same_owner).max().unwrap_or(0);
    let (min_pod, max_pod) = feasible
        .iter()
        .map(|f| f.3.pod_affinity)
        .fold((i64::MAX, i64::MIN), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let (min_spread, max_spread) = feasible
        .iter()
        .filter_map(|f| f.3.spread)
        .fold((f64::MAX, 0.0f64), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let score = |f: &(usize, i64, i64, plugins::Raw)| -> i64 {
        let affinity = if max_affinity > 0 {
            f.3.affinity * 100 / max_affinity
        } else {
            0
        };
        let spread = if max_owner > 0 {
            (max_owner - f.3.same_owner) * 100 / max_owner
        } else {
            100
        };
        // Weights as kube-scheduler's defaults: resources and images 1, the rest 2.
        let topology = plugins::spread_score(f.3.spread, min_spread, max_spread);
        let pod_affinity = if max_pod > min_pod {
            (f.3.pod_affinity - min_pod) * 100 / (max_pod - min_pod)
        } else {
            0
        };
        f.1 + f.2 + 2 * affinity + 2 * spread + 2 * topology + 2 * pod_affinity + f.3.image
    };
    let mut best = &feasible[0];
    let mut best_score = score(best);
    for f in &feasible[1..] {
        let sc = score(f);
        if sc > best_score {
            best = f;
            best_score = sc;
        }
    }
    let node = s.cache.nodes[best.0].name.clone();
    s.assume(key, &node, req);
    Decision::Bind(pod, node)
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    fn state(nodes: serde_json::Value) -> State {
        let mut s = State {
            cache: Cache::default(),
            queue: SchedulingQueue::new(
                Duration::from_secs(1),
                Duration::from_secs(1),
                Duration::from_secs(1),
            ),
            next_start: 0,
            waiting_for_pods: false,
        };
        for n in nodes.as_array().into_iter().flatten() {
            let n: Node = serde_json::from_value(n.clone()).expect("node");
            s.cache.upsert_node(&n);
        }
        s
    }

    fn node(name: &str, zone: &str, images: serde_json::Value) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "zone": zone}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}, "images": images},
        })
    }

    fn pod(name: &str, spec: serde_json::Value) -> Arc<Pod> {
        let mut spec = spec;
        if spec.get("containers").is_none() {
            spec["containers"] = json!([{"name": "c", "image": "busybox:1"}]);
        }
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
                "spec": spec,
            }))
            .expect("pod"),
        )
    }

    fn bound_to(d: Decision) -> String {
        match d {
            Decision::Bind(_, n) => n,
            Decision::Unschedulable(_, m) => panic!("unschedulable: {m}"),
            Decision::Skip => panic!("skipped"),
        }
    }

    #[test]
    fn image_locality_prefers_nodes_with_the_image() {
        let big = json!([{"names": ["docker.io/library/app@sha256:1", "docker.io/library/app:2"],
            "sizeBytes": 800 << 20}]);
        let mut s = state(json!([
            node("a", "z1", json!([])),
            node("b", "z1", big),
            node("c", "z1", json!([])),
        ]));
        let p = pod(
            "p",
            json!({"containers": [{"name": "c", "image": "app:2"}]}),
        );
        assert_eq!(bound_to(decide(&mut s, p)), "b");
    }

    #[test]
    fn soft_spread_and_anti_affinity_steer_decisions() {
        let mut s = state(json!([
            node("a", "z1", json!([])),
            node("b", "z1", json!([])),
            node("c", "z2", json!([])),
        ]));
        let soft = json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone",
            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": "web"}}}]});
        let first = bound_to(decide(&mut s, pod("w0", soft.clone())));
        let second = bound_to(decide(&mut s, pod("w1", soft.clone())));
        let zone = |n: &str| if n == "c" { "z2" } else { "z1" };
        assert_ne!(zone(&first), zone(&second), "{first} then {second}");
        let anti = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "zone"}]}}});
        let p = pod("w2", anti);
        s.queue.upsert(Arc::clone(&p));
        match decide(&mut s, p) {
            Decision::Unschedulable(_, m) => assert_eq!(
                m,
                "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules."
            ),
            _ => panic!("anti-affinity over both zones must leave the pod pending"),
        }
    }

    #[test]
    fn preferred_pod_affinity_scores_both_ways() {
        let nodes = json!([
            node("a", "z1", json!([])),
            node("b", "z2", json!([])),
            node("c", "z3", json!([])),
        ]);
        let term = |kind: &str, weight: i32| {
            json!({"affinity": {kind: {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": weight, "podAffinityTerm": {
                    "labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "zone"}}]}}})
        };
        // A web pod sits in z2; an incoming pod that prefers web pods goes there.
        let mut s = state(nodes.clone());
        s.place(
            Key::new("default", "w"),
            "b",
            PodReq::of(&pod("w", json!({}))),
        );
        let p = pod("likes", term("podAffinity", 100));
        assert_eq!(bound_to(decide(&mut s, p)), "b");
        // One that prefers to avoid web pods stays out of the zones that hold them.
        let avoid = term("podAntiAffinity", 100);
        let first = bound_to(decide(&mut s, pod("x1", avoid.clone())));
        assert_ne!(first, "b");
        // Symmetry: a placed pod preferring web pods pulls an incoming web pod to its zone.
        let mut s = state(nodes);
        let mut likes = (*pod("fan", term("podAffinity", 100))).clone();
        likes.metadata.labels = None;
        s.place(Key::new("default", "fan"), "c", PodReq::of(&likes));
        assert_eq!(bound_to(decide(&mut s, pod("w", json!({})))), "c");
    }

    #[test]
    fn placements_wake_pods_waiting_for_pods() {
        let mut s = state(json!([node("a", "z1", json!([]))]));
        let aff = json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "zone"}]}}});
        assert!(matches!(
            decide(&mut s, pod("w", aff)),
            Decision::Unschedulable(..)
        ));
        assert!(s.waiting_for_pods);
        bound_to(decide(&mut s, pod("other", json!({}))));
        assert!(
            !s.waiting_for_pods,
            "a placement counts as a cluster change"
        );
    }

    #[test]
    fn large_clusters_look_at_a_share_of_nodes() {
        assert_eq!(enough(3), 3);
        assert_eq!(enough(500), 230);
        assert_eq!(enough(5000), 500);
    }
}
