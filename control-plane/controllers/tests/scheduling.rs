//! Scheduling by topology against a real API server (in-process, in-memory store) with fake
//! nodes: required pod anti-affinity per host, and topology spread constraints over zones,
//! with the pods that fit nowhere explained in Kubernetes' words.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Cluster, fast_options, live_pods, wait_for};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Event, Node, Pod},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);
const ZONE: &str = "topology.kubernetes.io/zone";

fn deployment(name: &str, replicas: i32, extra_spec: serde_json::Value) -> Deployment {
    let mut spec = json!({"containers": [{"name": "c", "image": "busybox:1",
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]});
    for (k, v) in extra_spec.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }))
    .expect("deployment")
}

/// Nodes `node-0..n`, in the given zones.
async fn nodes(c: &Cluster, zones: &[&str]) {
    let api: Api<Node> = Api::all(c.client.clone());
    for (i, zone) in zones.iter().enumerate() {
        let name = format!("node-{i}");
        c.add_node(&name, "4", "8Gi", json!([])).await;
        let labels = json!({"metadata": {"labels": {ZONE: zone}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(labels))
            .await
            .expect("label node");
    }
    for (i, zone) in zones.iter().enumerate() {
        c.in_scheduler_cache(&format!("node-{i}"), json!({ZONE: zone}))
            .await;
    }
}

/// The app's pods: how many are bound per node, and the messages of those not bound.
async fn placement(client: &Client, app: &str) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut bound = BTreeMap::new();
    let mut pending = Vec::new();
    for p in live_pods(client, "default", &format!("app={app}")).await {
        match p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            Some(n) => *bound.entry(n).or_insert(0) += 1,
            None => pending.push(unschedulable_message(&p).unwrap_or_default()),
        }
    }
    (bound, pending)
}

fn unschedulable_message(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })?
        .message
        .clone()
}

/// Waits until `bound` pods of the app are bound and `pending` more are unschedulable with
/// `message`; returns pods per node.
async fn settled(
    client: &Client,
    app: &str,
    bound: usize,
    pending: usize,
    message: &str,
) -> BTreeMap<String, usize> {
    let mut last = (BTreeMap::new(), Vec::new());
    let ok = tokio::time::timeout(T, async {
        loop {
            last = placement(client, app).await;
            if last.0.values().sum::<usize>() == bound
                && last.1.len() == pending
                && last.1.iter().all(|m| m == message)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "want {bound} bound and {pending} pending with {message:?}; have {last:?}"
    );
    last.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_anti_affinity_puts_one_replica_per_host() {
    let c = Cluster::start(fast_options()).await;
    nodes(&c, &["z1", "z1", "z2"]).await;
    let anti = json!({"affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"app": "web"}},
            "topologyKey": "kubernetes.io/hostname",
        }],
    }}});
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    api.create(&PostParams::default(), &deployment("web", 4, anti))
        .await
        .expect("create");
    let want = "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules.";
    let per_node = settled(&c.client, "web", 3, 1, want).await;
    assert_eq!(per_node.len(), 3, "one replica per node: {per_node:?}");
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    wait_for("a FailedScheduling event", T, || {
        let events = events.clone();
        async move {
            events.list(&ListParams::default()).await.is_ok_and(|l| {
                l.items.iter().any(|e| {
                    e.reason.as_deref() == Some("FailedScheduling")
                        && e.message.as_deref() == Some(want)
                })
            })
        }
    })
    .await;
    // Symmetry: a plain pod the replicas' anti-affinity selects may not join them either.
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let intruder: Pod = serde_json::from_value(json!({
        "metadata": {"name": "intruder", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox:1"}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &intruder)
        .await
        .expect("create pod");
    let existing =
        "0/3 nodes are available: 3 node(s) didn't satisfy existing pods anti-affinity rules.";
    wait_for("the intruder refused", T, || {
        let pods = pods.clone();
        async move {
            pods.get("intruder")
                .await
                .is_ok_and(|p| unschedulable_message(&p).as_deref() == Some(existing))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_spread_balances_zones() {
    let c = Cluster::start(fast_options()).await;
    // Two nodes in z1, one in z2: spreading per node alone would put 3 of 4 in z1.
    nodes(&c, &["z1", "z1", "z2"]).await;
    let spread = json!({"topologySpreadConstraints": [{
        "maxSkew": 1,
        "topologyKey": ZONE,
        "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": "api"}},
    }]});
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    api.create(&PostParams::default(), &deployment("api", 4, spread))
        .await
        .expect("create");
    let per_node = settled(&c.client, "api", 4, 0, "").await;
    let z2 = per_node.get("node-2").copied().unwrap_or(0);
    assert_eq!(z2, 2, "two replicas per zone: {per_node:?}");
    // With z2's only node cordoned z1 may run one more (skew 1), not two.
    let nodes: Api<Node> = Api::all(c.client.clone());
    nodes
        .patch(
            "node-2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .expect("cordon");
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.patch(
        "api",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 6}})),
    )
    .await
    .expect("scale");
    let want = "0/3 nodes are available: 1 node(s) were unschedulable, 2 node(s) didn't match pod topology spread constraints.";
    let per_node = settled(&c.client, "api", 5, 1, want).await;
    let z1: usize = ["node-0", "node-1"]
        .iter()
        .filter_map(|n| per_node.get(*n))
        .sum();
    assert_eq!(z1, 3, "{per_node:?}");
}
