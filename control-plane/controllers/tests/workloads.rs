//! DaemonSets, Jobs, legacy Endpoints and owner-reference propagation against a real API
//! server (in-process, in-memory store) with fake nodes.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Cluster, EXIT_CODE, KUBECTL, MANUAL_READY, fast_options, live_pods, wait_for};
use futures::StreamExt as _;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, ReplicaSet},
    batch::v1::Job,
    core::v1::{ConfigMap, Endpoints, Event, Node, Pod, Service},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn options() -> keelson_controllers::Options {
    keelson_controllers::Options {
        job_backoff_initial: Duration::from_millis(100),
        job_backoff_max: Duration::from_millis(400),
        ..fast_options()
    }
}

async fn patch_node(c: &Cluster, name: &str, patch: serde_json::Value) {
    let nodes: Api<Node> = Api::all(c.client.clone());
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch node");
}

fn daemonset(name: &str, spec: serde_json::Value) -> DaemonSet {
    let mut v = json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1",
                    "resources": {"requests": {"cpu": "10m"}}}]},
            },
        },
    });
    if let (Some(base), Some(extra)) = (v["spec"].as_object_mut(), spec.as_object()) {
        base.extend(extra.clone());
    }
    serde_json::from_value(v).expect("daemonset")
}

/// Node of each live pod of `app`, bound or not.
async fn pods_by_node(client: &Client, app: &str) -> BTreeMap<String, Vec<Pod>> {
    let mut out: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for p in live_pods(client, "default", &format!("app={app}")).await {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        out.entry(node).or_default().push(p);
    }
    out
}

async fn ds_status(client: &Client, name: &str) -> (i64, serde_json::Value) {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), "default");
    let Ok(ds) = api.get(name).await else {
        return (0, json!(null));
    };
    let s = ds.status.unwrap_or_default();
    (
        ds.metadata.generation.unwrap_or(0),
        json!({
            "desired": s.desired_number_scheduled,
            "current": s.current_number_scheduled,
            "ready": s.number_ready,
            "available": s.number_available.unwrap_or(0),
            "updated": s.updated_number_scheduled.unwrap_or(0),
            "misscheduled": s.number_misscheduled,
            "observed": s.observed_generation.unwrap_or(0),
        }),
    )
}

/// Waits until the DaemonSet runs exactly one ready pod on each of `nodes` and says so.
async fn daemon_on(client: &Client, name: &str, nodes: &[&str]) {
    let want: BTreeMap<String, usize> = nodes.iter().map(|n| ((*n).to_owned(), 1)).collect();
    let n = nodes.len();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let placed: BTreeMap<String, usize> = pods_by_node(client, name)
            .await
            .into_iter()
            .map(|(k, v)| (k, v.len()))
            .collect();
        let (generation, status) = ds_status(client, name).await;
        let wanted = json!({"desired": n, "current": n, "ready": n, "available": n,
            "updated": n, "misscheduled": 0, "observed": generation});
        if placed == want && status == wanted {
            return;
        }
        // Say where it got stuck: pods per node, the status, and the pods' conditions.
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for daemonset {name} on {nodes:?}: pods per node {placed:?}, \
             status {status} (wanted {wanted}), pods {:?}",
            live_pods(client, "default", &format!("app={name}"))
                .await
                .iter()
                .map(|p| (
                    p.metadata.name.clone().unwrap_or_default(),
                    p.status.as_ref().and_then(|s| s.conditions.clone()),
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_runs_on_every_eligible_node_as_nodes_come_and_go() {
    let c = Cluster::start(options()).await;
    for (name, disk) in [("a", "ssd"), ("b", "ssd"), ("c", "hdd"), ("d", "ssd")] {
        c.add_node(name, "2", "2Gi", json!([])).await;
        patch_node(&c, name, json!({"metadata": {"labels": {"disk": disk}}})).await;
    }
    // b: a taint the DaemonSet does not tolerate; d: cordoned, which daemon pods tolerate.
    patch_node(
        &c,
        "b",
        json!({"spec": {"taints": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]}}),
    )
    .await;
    patch_node(
        &c,
        "d",
        json!({"spec": {"unschedulable": true, "taints": [
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
    )
    .await;
    let api: Api<DaemonSet> = Api::namespaced(c.client.clone(), "default");
    api.create(
        &PostParams::default(),
        &daemonset(
            "agent",
            json!({"template": {
            "metadata": {"labels": {"app": "agent"}},
            "spec": {"nodeSelector": {"disk": "ssd"},
                "containers": [{"name": "c", "image": "busybox:1"}]}}}),
        ),
    )
    .await
    .expect("create");
    daemon_on(&c.client, "agent", &["a", "d"]).await;

    let pods = pods_by_node(&c.client, "agent").await;
    let pod = &pods["a"][0];
    let spec = pod.spec.as_ref().expect("spec");
    let terms = &spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("required node affinity")
        .node_selector_terms;
    let field = &terms[0].match_fields.as_ref().expect("matchFields")[0];
    assert_eq!(
        (field.key.as_str(), field.values.as_deref()),
        ("metadata.name", Some(&["a".to_owned()][..]))
    );
    let tolerations: HashSet<(String, String)> = spec
        .tolerations
        .iter()
        .flatten()
        .map(|t| {
            (
                t.key.clone().unwrap_or_default(),
                t.effect.clone().unwrap_or_default(),
            )
        })
        .collect();
    for (key, effect) in [
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ] {
        assert!(
            tolerations.contains(&(key.into(), effect.into())),
            "{key}:{effect}"
        );
    }
    let labels = pod.metadata.labels.as_ref().expect("labels");
    assert!(labels.contains_key("controller-revision-hash"));
    assert_eq!(
        labels.get("pod-template-generation").map(String::as_str),
        Some("1")
    );
    let owner = &pod.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("DaemonSet", Some(true))
    );

    // A node joins; another stops matching; a third leaves.
    c.add_node("e", "2", "2Gi", json!([])).await;
    patch_node(&c, "e", json!({"metadata": {"labels": {"disk": "ssd"}}})).await;
    daemon_on(&c.client, "agent", &["a", "d", "e"]).await;
    patch_node(&c, "a", json!({"metadata": {"labels": {"disk": "hdd"}}})).await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    nodes
        .delete("e", &DeleteParams::default())
        .await
        .expect("delete node");
    daemon_on(&c.client, "agent", &["d"]).await;
    // An untolerated NoExecute taint evicts the daemon pod.
    patch_node(
        &c,
        "d",
        json!({"spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
            {"key": "maintenance", "effect": "NoExecute"}]}}),
    )
    .await;
    daemon_on(&c.client, "agent", &[]).await;
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    let list = events.list(&ListParams::default()).await.expect("events");
    assert!(list.items.iter().any(|e| {
        e.reason.as_deref() == Some("SuccessfulCreate")
            && e.involved_object.kind.as_deref() == Some("DaemonSet")
    }));
}

/// Runs kubectl against the cluster in namespace `default`; panics unless it succeeds.
async fn kubectl(c: &Cluster, args: &[&str]) -> String {
    let out = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(["-n", "default"])
        .args(args)
        .output()
        .await
        .expect("run kubectl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_rolls_within_max_unavailable_and_kubectl_sees_it() {
    let c = Cluster::start(options()).await;
    let names = ["n0", "n1", "n2", "n3"];
    for n in names {
        c.add_node(n, "2", "2Gi", json!([])).await;
    }
    let api: Api<DaemonSet> = Api::namespaced(c.client.clone(), "default");
    let strategy = json!({"updateStrategy": {"type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1}}});
    api.create(&PostParams::default(), &daemonset("roll", strategy))
        .await
        .expect("create");
    daemon_on(&c.client, "roll", &names).await;

    // Watch the ready, live pods: never fewer than 4 - maxUnavailable.
    let watch = PodCounts::watch(&c.client, "app=roll");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old_hash = pods_by_node(&c.client, "roll").await["n0"][0]
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("controller-revision-hash").cloned())
        .expect("hash");
    api.patch(
        "roll",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {"v": "2"}}}}})),
    )
    .await
    .expect("update template");
    let out = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args([
            "rollout",
            "status",
            "daemonset/roll",
            "-n",
            "default",
            "--timeout=30s",
        ])
        .output()
        .await
        .expect("run kubectl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("daemon set \"roll\" successfully rolled out"),
        "kubectl rollout status: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon_on(&c.client, "roll", &names).await;
    let (seen, _) = watch.stop();
    assert!(
        seen >= 3,
        "at most one node without a ready pod, saw {seen} ready"
    );
    let placed = pods_by_node(&c.client, "roll").await;
    let hashes: HashSet<String> = placed
        .values()
        .flatten()
        .filter_map(|p| {
            p.metadata
                .labels
                .as_ref()?
                .get("controller-revision-hash")
                .cloned()
        })
        .collect();
    assert_eq!(hashes.len(), 1);
    assert!(!hashes.contains(&old_hash), "every pod replaced");

    // History and rollback through kubectl, from the DaemonSet's ControllerRevisions.
    let revisions = |out: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
            .map(str::to_owned)
            .collect()
    };
    let history = kubectl(&c, &["rollout", "history", "daemonset/roll"]).await;
    assert_eq!(revisions(&history), ["1", "2"], "{history}");
    let undo = kubectl(&c, &["rollout", "undo", "daemonset/roll"]).await;
    assert!(undo.contains("rolled back"), "{undo}");
    kubectl(
        &c,
        &["rollout", "status", "daemonset/roll", "--timeout=30s"],
    )
    .await;
    daemon_on(&c.client, "roll", &names).await;
    wait_for("every pod back on the first template", T, || async {
        pods_by_node(&c.client, "roll")
            .await
            .values()
            .flatten()
            .all(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("controller-revision-hash"))
                    == Some(&old_hash)
            })
    })
    .await;
    // The first template's revision became the newest.
    let history = kubectl(&c, &["rollout", "history", "daemonset/roll"]).await;
    assert_eq!(revisions(&history), ["2", "3"], "{history}");

    // OnDelete: a new template reaches only the pods deleted by hand.
    api.patch(
        "roll",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null},
            "template": {"metadata": {"annotations": {"v": "3"}}}}}),
        ),
    )
    .await
    .expect("switch to OnDelete");
    let status = |field: &'static str| {
        let client = c.client.clone();
        async move { ds_status(&client, "roll").await.1[field].as_i64() }
    };
    wait_for("OnDelete observed", T, || async {
        let (generation, s) = ds_status(&c.client, "roll").await;
        s["observed"] == json!(generation) && s["updated"] == json!(0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status("updated").await,
        Some(0),
        "nothing replaced on its own"
    );
    let victim = pods_by_node(&c.client, "roll").await["n2"][0]
        .metadata
        .name
        .clone()
        .expect("name");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    pods.delete(&victim, &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for("the replaced pod runs the new template", T, || async {
        status("updated").await == Some(1) && status("available").await == Some(4)
    })
    .await;
    let fresh = &pods_by_node(&c.client, "roll").await["n2"][0];
    assert_eq!(
        fresh
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("v"))
            .map(String::as_str),
        Some("3")
    );

    // maxSurge: a new pod starts beside each old one before it goes, so every node keeps a
    // ready pod, and one node at a time runs two.
    let watch = PodCounts::watch(&c.client, "app=roll");
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.patch(
        "roll",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"updateStrategy": {"type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"annotations": {"v": "4"}}}}})),
    )
    .await
    .expect("switch to surge");
    wait_for("every pod at v4", T, || async {
        let pods = live_pods(&c.client, "default", "app=roll").await;
        pods.len() == 4
            && pods.iter().all(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("v"))
                    .map(String::as_str)
                    == Some("4")
            })
    })
    .await;
    daemon_on(&c.client, "roll", &names).await;
    let (min_ready, max_live) = watch.stop();
    assert_eq!(min_ready, 4, "no node without a ready pod while surging");
    assert_eq!(max_live, 5, "one surge pod at a time");
}

/// Follows the pods of a label selector: the fewest ready and the most live (not being
/// deleted) at any moment after the first list.
struct PodCounts {
    task: tokio::task::JoinHandle<()>,
    min_ready: Arc<AtomicUsize>,
    max_live: Arc<AtomicUsize>,
}

impl PodCounts {
    fn watch(client: &Client, labels: &str) -> Self {
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let min_ready = Arc::new(AtomicUsize::new(usize::MAX));
        let max_live = Arc::new(AtomicUsize::new(0));
        let (min, max) = (Arc::clone(&min_ready), Arc::clone(&max_live));
        let config = watcher::Config::default().labels(labels);
        let task = tokio::spawn(async move {
            // name → (live, ready)
            let mut seen: BTreeMap<String, (bool, bool)> = BTreeMap::new();
            let mut events = watcher(pods, config).default_backoff().boxed();
            let mut synced = false;
            while let Some(Ok(e)) = events.next().await {
                match e {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                        let live = p.metadata.deletion_timestamp.is_none();
                        let ready = live
                            && p.status
                                .iter()
                                .flat_map(|s| s.conditions.iter().flatten())
                                .any(|c| c.type_ == "Ready" && c.status == "True");
                        seen.insert(p.metadata.name.clone().unwrap_or_default(), (live, ready));
                    }
                    watcher::Event::Delete(p) => {
                        seen.remove(&p.metadata.name.clone().unwrap_or_default());
                    }
                    watcher::Event::InitDone => synced = true,
                    watcher::Event::Init => {}
                }
                if synced {
                    min.fetch_min(seen.values().filter(|s| s.1).count(), Ordering::SeqCst);
                    max.fetch_max(seen.values().filter(|s| s.0).count(), Ordering::SeqCst);
                }
            }
        });
        PodCounts {
            task,
            min_ready,
            max_live,
        }
    }

    /// Stops watching; the fewest ready and the most live pods seen.
    fn stop(self) -> (usize, usize) {
        self.task.abort();
        (
            self.min_ready.load(Ordering::SeqCst),
            self.max_live.load(Ordering::SeqCst),
        )
    }
}

fn job(name: &str, spec: serde_json::Value, annotations: serde_json::Value) -> Job {
    let mut v = json!({
        "metadata": {"name": name},
        "spec": {
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox:1"}]},
            },
        },
    });
    if let (Some(base), Some(extra)) = (v["spec"].as_object_mut(), spec.as_object()) {
        base.extend(extra.clone());
    }
    serde_json::from_value(v).expect("job")
}

fn condition(job: &Job, type_: &str) -> Option<(String, String)> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

async fn job_pods(client: &Client, name: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_completes_within_parallelism_then_expires() {
    let c = Cluster::start(options()).await;
    c.add_node("n0", "4", "8Gi", json!([])).await;
    c.add_node("n1", "4", "8Gi", json!([])).await;
    // Count the pods running at once.
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let max = Arc::new(AtomicUsize::new(0));
    let watch_max = Arc::clone(&max);
    let watch = tokio::spawn(async move {
        let mut running: BTreeMap<String, bool> = BTreeMap::new();
        let mut events = watcher(pods, watcher::Config::default().labels("job-name=work"))
            .default_backoff()
            .boxed();
        while let Some(Ok(e)) = events.next().await {
            if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = e {
                let active = !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                ) && p.metadata.deletion_timestamp.is_none();
                running.insert(p.metadata.name.clone().unwrap_or_default(), active);
                let n = running.values().filter(|a| **a).count();
                watch_max.fetch_max(n, Ordering::SeqCst);
            }
        }
    });
    let api: Api<Job> = Api::namespaced(c.client.clone(), "default");
    let created = api
        .create(
            &PostParams::default(),
            &job(
                "work",
                json!({"completions": 5, "parallelism": 2, "ttlSecondsAfterFinished": 2}),
                json!({EXIT_CODE: "0"}),
            ),
        )
        .await
        .expect("create");
    let uid = created.metadata.uid.clone().expect("uid");
    let kubectl_wait = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args([
            "wait",
            "--for=condition=complete",
            "job/work",
            "-n",
            "default",
            "--timeout=20s",
        ])
        .output();
    let kubectl_wait = tokio::spawn(kubectl_wait);
    wait_for("the job complete", T, || async {
        api.get("work").await.is_ok_and(|j| {
            let s = j.status.clone().unwrap_or_default();
            condition(&j, "Complete").is_some()
                && s.succeeded == Some(5)
                && s.active.unwrap_or(0) == 0
                && s.completion_time.is_some()
                && s.start_time.is_some()
        })
    })
    .await;
    let done = api.get("work").await.expect("get");
    assert_eq!(
        condition(&done, "Complete"),
        Some((
            "CompletionsReached".into(),
            "Reached expected number of succeeded pods".into()
        ))
    );
    assert!(condition(&done, "SuccessCriteriaMet").is_some());
    let out = kubectl_wait.await.expect("join").expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl wait: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pods = job_pods(&c.client, "work").await;
    assert_eq!(pods.len(), 5, "no pod more than the completions");
    for p in &pods {
        let l = p.metadata.labels.as_ref().expect("labels");
        assert_eq!(l.get("batch.kubernetes.io/controller-uid"), Some(&uid));
        assert_eq!(l.get("controller-uid"), Some(&uid));
        assert_eq!(l.get("job-name").map(String::as_str), Some("work"));
        let owner = &p.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Job", uid.as_str())
        );
    }
    watch.abort();
    let seen = max.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&seen),
        "at most parallelism = 2 pods at once, saw {seen}"
    );
    // ttlSecondsAfterFinished: the Job goes, and its pods with it.
    wait_for("the finished job deleted with its pods", T, || async {
        api.get_opt("work").await.is_ok_and(|j| j.is_none())
            && job_pods(&c.client, "work").await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_fails_past_its_backoff_limit_or_deadline() {
    let c = Cluster::start(options()).await;
    c.add_node("n0", "4", "8Gi", json!([])).await;
    let api: Api<Job> = Api::namespaced(c.client.clone(), "default");
    api.create(
        &PostParams::default(),
        &job("crash", json!({"backoffLimit": 2}), json!({EXIT_CODE: "1"})),
    )
    .await
    .expect("create");
    api.create(
        &PostParams::default(),
        &job(
            "slow",
            json!({"activeDeadlineSeconds": 1, "parallelism": 2, "completions": 4}),
            json!({}),
        ),
    )
    .await
    .expect("create");
    wait_for("crash failed", T, || async {
        api.get("crash").await.is_ok_and(|j| {
            condition(&j, "Failed")
                == Some((
                    "BackoffLimitExceeded".into(),
                    "Job has reached the specified backoff limit".into(),
                ))
                && j.status.as_ref().and_then(|s| s.failed) == Some(3)
        })
    })
    .await;
    let crash = api.get("crash").await.expect("get");
    assert!(condition(&crash, "FailureTarget").is_some());
    assert!(
        crash
            .status
            .as_ref()
            .and_then(|s| s.completion_time.clone())
            .is_none()
    );
    // Under OnFailure the container restarts count against the limit.
    let mut flaky = job("flaky", json!({"backoffLimit": 3}), json!({EXIT_CODE: "2"}));
    if let Some(spec) = flaky.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        spec.restart_policy = Some("OnFailure".into());
    }
    api.create(&PostParams::default(), &flaky)
        .await
        .expect("create");
    wait_for("flaky failed on restarts", T, || async {
        api.get("flaky").await.is_ok_and(|j| {
            condition(&j, "Failed").is_some_and(|(r, _)| r == "BackoffLimitExceeded")
        })
    })
    .await;
    wait_for("slow failed at its deadline", T, || async {
        api.get("slow").await.is_ok_and(|j| {
            condition(&j, "Failed").is_some_and(|(r, _)| r == "DeadlineExceeded")
                && j.status.as_ref().and_then(|s| s.active).unwrap_or(0) == 0
        })
    })
    .await;
    wait_for("the slow job's pods stopped", T, || async {
        job_pods(&c.client, "slow").await.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        job_pods(&c.client, "crash").await.len(),
        3,
        "no pod after the limit"
    );
    // A suspended Job starts nothing until resumed.
    api.create(
        &PostParams::default(),
        &job(
            "paused",
            json!({"suspend": true, "parallelism": 2, "completions": 2}),
            json!({}),
        ),
    )
    .await
    .expect("create");
    wait_for("paused reported suspended", T, || async {
        api.get("paused").await.is_ok_and(|j| {
            condition(&j, "Suspended") == Some(("JobSuspended".into(), "Job suspended".into()))
        })
    })
    .await;
    assert!(job_pods(&c.client, "paused").await.is_empty());
    api.patch(
        "paused",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": false}})),
    )
    .await
    .expect("resume");
    wait_for("paused resumed with two pods", T, || async {
        api.get("paused").await.is_ok_and(|j| {
            condition(&j, "Suspended").is_none()
                && j.status.as_ref().and_then(|s| s.active) == Some(2)
        })
    })
    .await;
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    wait_for("a BackoffLimitExceeded event", T, || async {
        events.list(&ListParams::default()).await.is_ok_and(|l| {
            l.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("BackoffLimitExceeded"))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_endpoints_follow_readiness_and_leave_selectorless_services_alone() {
    let c = Cluster::start(options()).await;
    c.add_node("n0", "4", "8Gi", json!([])).await;
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]},
    }))
    .expect("service");
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("service");
    let manual: Service = serde_json::from_value(json!({
        "metadata": {"name": "manual"},
        "spec": {"ports": [{"port": 80}]},
    }))
    .expect("service");
    services
        .create(&PostParams::default(), &manual)
        .await
        .expect("service");
    let endpoints: Api<Endpoints> = Api::namespaced(c.client.clone(), "default");
    let mine: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "manual"},
        "subsets": [{"addresses": [{"ip": "192.0.2.10"}], "ports": [{"port": 8080}]}],
    }))
    .expect("endpoints");
    endpoints
        .create(&PostParams::default(), &mine)
        .await
        .expect("endpoints");
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}, "annotations": {MANUAL_READY: "y"}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1",
                    "ports": [{"name": "web", "containerPort": 8080}]}]}}},
    }))
    .expect("deployment");
    Api::<Deployment>::namespaced(c.client.clone(), "default")
        .create(&PostParams::default(), &deploy)
        .await
        .expect("deployment");
    let counts = || async {
        let Ok(Some(e)) = endpoints.get_opt("web").await else {
            return None;
        };
        let subsets = e.subsets.unwrap_or_default();
        let ok = subsets.iter().all(|s| {
            s.ports.as_ref().is_some_and(|p| {
                p.len() == 1 && p[0].port == 8080 && p[0].name.as_deref() == Some("http")
            })
        });
        ok.then(|| {
            (
                subsets
                    .iter()
                    .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                    .sum::<usize>(),
                subsets
                    .iter()
                    .map(|s| s.not_ready_addresses.as_ref().map_or(0, Vec::len))
                    .sum::<usize>(),
            )
        })
    };
    wait_for("two not-ready addresses", T, || async {
        counts().await == Some((0, 2))
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let first = live_pods(&c.client, "default", "app=web").await.remove(0);
    let name = first.metadata.name.clone().expect("name");
    let ready = json!({"status": {"conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(ready))
        .await
        .expect("ready");
    wait_for("one ready, one not", T, || async {
        counts().await == Some((1, 1))
    })
    .await;
    let e = endpoints.get("web").await.expect("get");
    let address = e
        .subsets
        .as_ref()
        .and_then(|s| s[0].addresses.as_ref())
        .expect("addresses");
    assert_eq!(
        address[0]
            .target_ref
            .as_ref()
            .and_then(|r| r.name.as_deref()),
        Some(name.as_str())
    );
    assert_eq!(address[0].node_name.as_deref(), Some("n0"));
    // The selector-less Service's Endpoints are its user's.
    let theirs = endpoints.get("manual").await.expect("manual endpoints");
    assert_eq!(theirs.subsets, mine.subsets);
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete service");
    wait_for("endpoints gone with the service", T, || async {
        endpoints.get_opt("web").await.is_ok_and(|e| e.is_none())
    })
    .await;
}

fn propagation(policy: PropagationPolicy) -> DeleteParams {
    DeleteParams {
        propagation_policy: Some(policy),
        ..DeleteParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonsets_and_jobs_are_collected_orphaned_or_deleted_in_the_foreground() {
    let c = Cluster::start(options()).await;
    c.add_node("n0", "4", "8Gi", json!([])).await;
    c.add_node("n1", "4", "8Gi", json!([])).await;
    let daemons: Api<DaemonSet> = Api::namespaced(c.client.clone(), "default");
    let jobs: Api<Job> = Api::namespaced(c.client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");

    // Orphan: the DaemonSet goes, its pods stay without the owner reference.
    daemons
        .create(&PostParams::default(), &daemonset("keep", json!({})))
        .await
        .expect("create");
    daemon_on(&c.client, "keep", &["n0", "n1"]).await;
    let kept: HashSet<String> = live_pods(&c.client, "default", "app=keep")
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    daemons
        .delete("keep", &propagation(PropagationPolicy::Orphan))
        .await
        .expect("delete");
    wait_for("the orphaning daemonset gone", T, || async {
        daemons.get_opt("keep").await.is_ok_and(|d| d.is_none())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let left = live_pods(&c.client, "default", "app=keep").await;
    let names: HashSet<String> = left
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, kept, "orphaned pods stay");
    assert!(
        left.iter().all(|p| p
            .metadata
            .owner_references
            .as_ref()
            .is_none_or(Vec::is_empty)),
        "and no longer name their owner"
    );

    // Foreground: the Job's pods go first, then the Job.
    jobs.create(
        &PostParams::default(),
        &job("fg", json!({"parallelism": 2}), json!({})),
    )
    .await
    .expect("create");
    wait_for("two job pods running", T, || async {
        job_pods(&c.client, "fg").await.len() == 2
            && jobs
                .get("fg")
                .await
                .is_ok_and(|j| j.status.and_then(|s| s.active) == Some(2))
    })
    .await;
    jobs.delete("fg", &propagation(PropagationPolicy::Foreground))
        .await
        .expect("delete");
    let saw_waiting = AtomicBool::new(false);
    wait_for("the job gone after its pods", T, || async {
        match jobs.get_opt("fg").await {
            Ok(Some(j)) => {
                if j.metadata.deletion_timestamp.is_some() {
                    saw_waiting.store(true, Ordering::SeqCst);
                }
                false
            }
            Ok(None) => {
                assert!(
                    job_pods(&c.client, "fg").await.is_empty(),
                    "the job went before its pods"
                );
                true
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(
        saw_waiting.load(Ordering::SeqCst),
        "the job waited, terminating, for its pods"
    );

    // Foreground through two levels: Deployment → ReplicaSet → pods.
    let deploys: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let tree: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "tree"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "tree"}},
            "template": {"metadata": {"labels": {"app": "tree"}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}},
    }))
    .expect("deployment");
    deploys
        .create(&PostParams::default(), &tree)
        .await
        .expect("create");
    wait_for("two tree pods", T, || async {
        live_pods(&c.client, "default", "app=tree").await.len() == 2
    })
    .await;
    deploys
        .delete("tree", &propagation(PropagationPolicy::Foreground))
        .await
        .expect("delete");
    let sets: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    wait_for("the deployment gone after its tree", T, || async {
        match deploys.get_opt("tree").await {
            Ok(None) => {
                let pods = pods
                    .list(&ListParams::default().labels("app=tree"))
                    .await
                    .expect("pods");
                let sets = sets.list(&ListParams::default()).await.expect("sets");
                assert!(
                    pods.items.is_empty() && sets.items.is_empty(),
                    "the deployment went before its replica set and pods"
                );
                true
            }
            _ => false,
        }
    })
    .await;

    // Background: a DaemonSet deleted plainly loses its pods afterwards.
    let bg = daemons
        .create(&PostParams::default(), &daemonset("bg", json!({})))
        .await
        .expect("create");
    // Anything can depend on it, not just what its controller made.
    let maps: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let config: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "bg-config", "ownerReferences": [{"apiVersion": "apps/v1",
            "kind": "DaemonSet", "name": "bg", "uid": bg.metadata.uid}]},
        "data": {"k": "v"},
    }))
    .expect("config map");
    maps.create(&PostParams::default(), &config)
        .await
        .expect("config map");
    daemon_on(&c.client, "bg", &["n0", "n1"]).await;
    daemons
        .delete("bg", &DeleteParams::background())
        .await
        .expect("delete");
    wait_for(
        "the daemonset's pods and config map collected",
        T,
        || async {
            pods.list(&ListParams::default().labels("app=bg"))
                .await
                .is_ok_and(|l| l.items.is_empty())
                && maps.get_opt("bg-config").await.is_ok_and(|m| m.is_none())
        },
    )
    .await;
}
