//! The controllers against a real API server (in-process, in-memory store) with fake nodes:
//! Deployments scaling and rolling, scheduling explained, nodes going unreachable, slices
//! following readiness, cascading deletion and node CIDRs.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Cluster, MANUAL_READY, fast_options, live_pods, wait_for};
use futures::StreamExt as _;
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{Event, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn deployment(
    name: &str,
    replicas: i32,
    strategy: serde_json::Value,
    annotations: serde_json::Value,
) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "strategy": strategy,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": {"containers": [{"name": "c", "image": "busybox:1",
                    "ports": [{"name": "web", "containerPort": 8080}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
            },
        },
    }))
    .expect("deployment")
}

async fn three_nodes(c: &Cluster) {
    for i in 0..3 {
        c.add_node(&format!("node-{i}"), "4", "8Gi", json!([]))
            .await;
    }
    for i in 0..3 {
        c.in_scheduler_cache(&format!("node-{i}"), json!({})).await;
    }
}

/// Waits until the Deployment reports a finished rollout, as `kubectl rollout status` does.
async fn rolled_out(client: &Client, name: &str, replicas: i32) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    wait_for(
        &format!("deployment {name} rolled out with {replicas}"),
        T,
        || {
            let api = api.clone();
            async move {
                let Ok(d) = api.get(name).await else {
                    return false;
                };
                let s = d.status.unwrap_or_default();
                d.metadata.generation <= s.observed_generation
                    && s.updated_replicas.unwrap_or(0) == replicas
                    && s.replicas.unwrap_or(0) == replicas
                    && s.available_replicas.unwrap_or(0) == replicas
                    && s.conditions.iter().flatten().any(|c| {
                        c.type_ == "Progressing"
                            && c.reason.as_deref() == Some("NewReplicaSetAvailable")
                    })
            }
        },
    )
    .await;
}

/// Where the pods went and why, for a failed placement assertion: every pod's node, every
/// node's taints and the events of the test's namespace and of its nodes.
async fn scheduling_report(client: &Client) -> String {
    let mut out = String::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for p in pods
        .list(&ListParams::default())
        .await
        .into_iter()
        .flatten()
    {
        let spec = p.spec.unwrap_or_default();
        out += &format!(
            "pod {} node={:?} deleting={}\n",
            p.metadata.name.unwrap_or_default(),
            spec.node_name,
            p.metadata.deletion_timestamp.is_some()
        );
    }
    let nodes: Api<Node> = Api::all(client.clone());
    for n in nodes
        .list(&ListParams::default())
        .await
        .into_iter()
        .flatten()
    {
        let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
        out += &format!(
            "node {} taints={:?}\n",
            n.metadata.name.unwrap_or_default(),
            taints.iter().map(|t| &t.key).collect::<Vec<_>>()
        );
    }
    let events: Api<Event> = Api::all(client.clone());
    for e in events
        .list(&ListParams::default())
        .await
        .into_iter()
        .flatten()
    {
        out += &format!(
            "event {} {} {}: {}\n",
            e.involved_object.kind.unwrap_or_default(),
            e.involved_object.name.unwrap_or_default(),
            e.reason.unwrap_or_default(),
            e.message.unwrap_or_default()
        );
    }
    out
}

async fn scale(client: &Client, name: &str, replicas: i32) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .expect("scale");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_scales_up_and_down_spread_over_nodes() {
    let c = Cluster::start(fast_options()).await;
    three_nodes(&c).await;
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    api.create(
        &PostParams::default(),
        &deployment("web", 3, json!({}), json!({})),
    )
    .await
    .expect("create");
    rolled_out(&c.client, "web", 3).await;
    let pods = live_pods(&c.client, "default", "app=web").await;
    let nodes: HashSet<String> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .collect();
    if nodes.len() != 3 {
        panic!(
            "three pods of one owner land on three nodes, not {}:\n{}",
            nodes.len(),
            scheduling_report(&c.client).await
        );
    }
    for p in &pods {
        let owner = p
            .metadata
            .owner_references
            .as_ref()
            .and_then(|r| r.first())
            .expect("owner");
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ReplicaSet", Some(true))
        );
    }
    let d = api.get("web").await.expect("get");
    assert_eq!(
        d.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("deployment.kubernetes.io/revision"))
            .map(String::as_str),
        Some("1")
    );

    scale(&c.client, "web", 6).await;
    rolled_out(&c.client, "web", 6).await;
    assert_eq!(live_pods(&c.client, "default", "app=web").await.len(), 6);
    scale(&c.client, "web", 1).await;
    rolled_out(&c.client, "web", 1).await;
    wait_for("one pod left", T, || async {
        live_pods(&c.client, "default", "app=web").await.len() == 1
    })
    .await;
    let rs: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let sets = rs.list(&ListParams::default()).await.expect("list");
    assert_eq!(sets.items.len(), 1, "scaling keeps one ReplicaSet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_stays_within_surge_and_rolls_back() {
    let c = Cluster::start(fast_options()).await;
    three_nodes(&c).await;
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let strategy =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    api.create(
        &PostParams::default(),
        &deployment("roll", 4, strategy, json!({"v": "1"})),
    )
    .await
    .expect("create");
    rolled_out(&c.client, "roll", 4).await;
    let first_rs: HashSet<String> = live_pods(&c.client, "default", "app=roll")
        .await
        .iter()
        .filter_map(|p| {
            p.metadata
                .labels
                .as_ref()?
                .get("pod-template-hash")
                .cloned()
        })
        .collect();
    assert_eq!(first_rs.len(), 1);

    // A watcher keeps the number of live pods and its maximum.
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let max = Arc::new(AtomicUsize::new(0));
    let watch_max = Arc::clone(&max);
    let watch = tokio::spawn(async move {
        let mut live: BTreeMap<String, bool> = BTreeMap::new();
        let mut events = watcher(pods, watcher::Config::default().labels("app=roll"))
            .default_backoff()
            .boxed();
        while let Some(Ok(e)) = events.next().await {
            match e {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    live.insert(
                        p.metadata.name.clone().unwrap_or_default(),
                        p.metadata.deletion_timestamp.is_none(),
                    );
                }
                watcher::Event::Delete(p) => {
                    live.remove(&p.metadata.name.clone().unwrap_or_default());
                }
                _ => {}
            }
            let n = live.values().filter(|l| **l).count();
            watch_max.fetch_max(n, Ordering::SeqCst);
        }
    });

    for (version, revision) in [("2", "2"), ("1", "3")] {
        api.patch(
            "roll",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"template": {"metadata": {"annotations": {"v": version}}}}}),
            ),
        )
        .await
        .expect("update template");
        let want = version.to_owned();
        wait_for(&format!("all pods at template v{version}"), T, || {
            let (client, want) = (c.client.clone(), want.clone());
            async move {
                let pods = live_pods(&client, "default", "app=roll").await;
                pods.len() == 4
                    && pods.iter().all(|p| {
                        p.metadata.annotations.as_ref().and_then(|a| a.get("v")) == Some(&want)
                    })
            }
        })
        .await;
        rolled_out(&c.client, "roll", 4).await;
        let d = api.get("roll").await.expect("get");
        assert_eq!(
            d.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("deployment.kubernetes.io/revision"))
                .map(String::as_str),
            Some(revision)
        );
    }
    let hashes: HashSet<String> = live_pods(&c.client, "default", "app=roll")
        .await
        .iter()
        .filter_map(|p| {
            p.metadata
                .labels
                .as_ref()?
                .get("pod-template-hash")
                .cloned()
        })
        .collect();
    assert_eq!(hashes, first_rs, "rolling back reuses the first ReplicaSet");
    watch.abort();
    let seen = max.load(Ordering::SeqCst);
    assert!(
        seen <= 5,
        "at most replicas + maxSurge = 5 pods at once, saw {seen}"
    );
    assert!(seen >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_is_explained_then_placed() {
    let c = Cluster::start(fast_options()).await;
    c.add_node("small-0", "2", "1Gi", json!([])).await;
    c.add_node("small-1", "2", "1Gi", json!([])).await;
    c.add_node(
        "gpu",
        "8",
        "16Gi",
        json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "big"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1",
            "resources": {"requests": {"memory": "2Gi"}}}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    let want = "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 Insufficient memory.";
    wait_for("PodScheduled=False", T, || {
        let pods = pods.clone();
        async move {
            let Ok(p) = pods.get("big").await else {
                return false;
            };
            p.status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                        && c.message.as_deref() == Some(want)
                })
        }
    })
    .await;
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
    // A node that fits arrives: the pod is retried and placed there.
    c.add_node("large", "4", "8Gi", json!([])).await;
    wait_for("the pod bound to the new node", T, || {
        let pods = pods.clone();
        async move {
            pods.get("big")
                .await
                .ok()
                .and_then(|p| p.spec?.node_name)
                .as_deref()
                == Some("large")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_node_goes_not_ready_and_its_pods_move() {
    let c = Cluster::start(fast_options()).await;
    three_nodes(&c).await;
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    api.create(
        &PostParams::default(),
        &deployment("move", 3, json!({}), json!({})),
    )
    .await
    .expect("create");
    rolled_out(&c.client, "move", 3).await;
    let on_dead = |pods: &[Pod]| {
        pods.iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-0"))
            .count()
    };
    // Spread one per node, unless the scheduler placed pods before it saw every new Node
    // (the Nodes are created just before the Deployment): at least one is on node-0.
    let before = on_dead(&live_pods(&c.client, "default", "app=move").await);
    assert!(before >= 1, "{before} pods on node-0");
    c.kill_node("node-0");
    let nodes: Api<Node> = Api::all(c.client.clone());
    wait_for("node-0 Ready=Unknown and tainted unreachable", T, || {
        let nodes = nodes.clone();
        async move {
            let Ok(n) = nodes.get("node-0").await else {
                return false;
            };
            let unknown = n
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "Unknown");
            let tainted = n
                .spec
                .and_then(|s| s.taints)
                .into_iter()
                .flatten()
                .any(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == "NoExecute");
            unknown && tainted
        }
    })
    .await;
    wait_for("the pod on node-0 replaced elsewhere", T, || async {
        let pods = live_pods(&c.client, "default", "app=move").await;
        pods.len() == 3 && on_dead(&pods) == 0
    })
    .await;
    rolled_out(&c.client, "move", 3).await;
    let other: Api<Node> = Api::all(c.client.clone());
    let healthy = other.get("node-1").await.expect("node-1");
    assert!(
        healthy
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_follow_pod_readiness() {
    let c = Cluster::start(fast_options()).await;
    c.add_node("node-0", "4", "8Gi", json!([])).await;
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "ep"},
        "spec": {"selector": {"app": "ep"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]},
    }))
    .expect("service");
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("service");
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    api.create(
        &PostParams::default(),
        &deployment("ep", 2, json!({}), json!({MANUAL_READY: "yes"})),
    )
    .await
    .expect("create");
    let slices: Api<EndpointSlice> = Api::namespaced(c.client.clone(), "default");
    let endpoints = |ready: bool| {
        let slices = slices.clone();
        async move {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=ep"))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            list.iter()
                .filter(|s| {
                    s.ports
                        .iter()
                        .flatten()
                        .any(|p| p.port == Some(8080) && p.name.as_deref() == Some("http"))
                })
                .flat_map(|s| s.endpoints.clone())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(ready))
                .count()
        }
    };
    wait_for("two not-ready endpoints", T, || async {
        endpoints(false).await == 2 && endpoints(true).await == 0
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let first = live_pods(&c.client, "default", "app=ep").await.remove(0);
    let name = first.metadata.name.clone().expect("name");
    let ready = json!({"status": {"conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(ready))
        .await
        .expect("ready");
    wait_for("one ready endpoint", T, || async {
        endpoints(true).await == 1 && endpoints(false).await == 1
    })
    .await;
    let not_ready = json!({"status": {"conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(not_ready))
        .await
        .expect("not ready");
    wait_for("no ready endpoint again", T, || async {
        endpoints(true).await == 0
    })
    .await;
    services
        .delete("ep", &DeleteParams::default())
        .await
        .expect("delete service");
    wait_for("slices gone with the service", T, || async {
        slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=ep"))
            .await
            .is_ok_and(|l| l.items.is_empty())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_deployment_cascades() {
    let c = Cluster::start(fast_options()).await;
    three_nodes(&c).await;
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    api.create(
        &PostParams::default(),
        &deployment("gone", 2, json!({}), json!({})),
    )
    .await
    .expect("create");
    rolled_out(&c.client, "gone", 2).await;
    api.delete("gone", &DeleteParams::background())
        .await
        .expect("delete");
    let rs: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    wait_for("ReplicaSets and pods collected", T, || {
        let (rs, pods) = (rs.clone(), pods.clone());
        async move {
            let no_rs = rs
                .list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.is_empty());
            let no_pods = pods
                .list(&ListParams::default().labels("app=gone"))
                .await
                .is_ok_and(|l| l.items.is_empty());
            no_rs && no_pods
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_pod_cidrs_that_are_reused_after_deletion() {
    let c = Cluster::start(fast_options()).await;
    c.add_node("a", "1", "1Gi", json!([])).await;
    c.add_node("b", "1", "1Gi", json!([])).await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    let cidr = |name: &'static str| {
        let nodes = nodes.clone();
        async move { nodes.get(name).await.ok().and_then(|n| n.spec?.pod_cidr) }
    };
    wait_for("both nodes have pod CIDRs", T, || async {
        cidr("a").await.is_some() && cidr("b").await.is_some()
    })
    .await;
    let (a, b) = (cidr("a").await.expect("a"), cidr("b").await.expect("b"));
    assert_ne!(a, b);
    for x in [&a, &b] {
        assert!(x.starts_with("10.244.") && x.ends_with(".0/24"), "{x}");
    }
    nodes
        .delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    // The freed CIDR goes round again once the others are taken; check it is not lost by
    // taking every other subnet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.add_node("c", "1", "1Gi", json!([])).await;
    wait_for("node c has a CIDR", T, || async {
        cidr("c").await.is_some()
    })
    .await;
    assert_ne!(cidr("c").await, Some(b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_failover_without_duplicates() {
    let c = Cluster::start(common::fast_options()).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.client.clone(), "kube-system");
    let holder = || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("keelson-controller-manager")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
        }
    };
    wait_for("the first manager leads", T, || async {
        holder().await.as_deref() == Some("test")
    })
    .await;
    let second = c.stop.child_token();
    c.spawn_controllers(
        keelson_controllers::Options {
            identity: "standby".into(),
            ..common::fast_options()
        },
        second.clone(),
    );
    three_nodes(&c).await;
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    api.create(
        &PostParams::default(),
        &deployment("ha", 3, json!({}), json!({})),
    )
    .await
    .expect("create");
    rolled_out(&c.client, "ha", 3).await;
    assert_eq!(holder().await.as_deref(), Some("test"), "the standby waits");
    // The leader stops (and hands the Lease back); the standby takes over.
    c.first.cancel();
    wait_for("the standby leads", T, || async {
        holder().await.as_deref() == Some("standby")
    })
    .await;
    scale(&c.client, "ha", 5).await;
    rolled_out(&c.client, "ha", 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let all = pods
        .list(&ListParams::default().labels("app=ha"))
        .await
        .expect("list");
    assert_eq!(all.items.len(), 5, "no duplicate pods across the handover");
    second.cancel();
}
