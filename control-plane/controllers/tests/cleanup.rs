//! Pod garbage collection and Event expiry against a real API server (in-process,
//! in-memory store) with fake nodes.

mod common;

use std::time::Duration;

use common::{Cluster, EXIT_CODE, fast_options, wait_for};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn pod(name: &str, node: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"nodeName": node, "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox:1"}]},
    }))
    .expect("pod")
}

async fn names(pods: &Api<Pod>) -> Vec<String> {
    let mut out: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_pods_over_the_threshold_and_orphans_are_collected() {
    let c = Cluster::start(keelson_controllers::Options {
        terminated_pod_gc_threshold: 2,
        ..fast_options()
    })
    .await;
    c.add_node("n1", "4", "4Gi", json!([])).await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    for i in 0..4 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("done-{i}"), "n1", json!({EXIT_CODE: "0"})),
        )
        .await
        .expect("create");
        // Distinct creation times, so "oldest first" is well defined.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    pods.create(&PostParams::default(), &pod("running", "n1", json!({})))
        .await
        .expect("create");
    pods.create(&PostParams::default(), &pod("orphan", "ghost", json!({})))
        .await
        .expect("create");
    wait_for(
        "the two oldest finished pods and the orphan go",
        T,
        || async { names(&pods).await == ["done-2", "done-3", "running"] },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_expire_after_their_ttl() {
    // As with Kubernetes' etcd lease, the TTL runs from an Event's last write: its creation
    // or its last (series) timestamp, whichever is newer.
    let ttl = Duration::from_secs(3);
    let c = Cluster::start(keelson_controllers::Options {
        event_ttl: ttl,
        event_ttl_period: Duration::from_millis(200),
        ..fast_options()
    })
    .await;
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    let event = |name: &str| -> Event {
        let now = jiff::Timestamp::now().to_string();
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
            "reason": "Test", "message": "m", "type": "Normal",
            "firstTimestamp": now, "lastTimestamp": now,
        }))
        .expect("event")
    };
    events
        .create(&PostParams::default(), &event("old"))
        .await
        .expect("create");
    tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    events
        .create(&PostParams::default(), &event("fresh"))
        .await
        .expect("create");
    wait_for("the expired event goes", T, || async {
        events.get_opt("old").await.expect("get").is_none()
    })
    .await;
    assert!(
        events.get_opt("fresh").await.expect("get").is_some(),
        "an event younger than the TTL stays"
    );
}
