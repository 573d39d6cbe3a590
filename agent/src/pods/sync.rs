//! The pod sync: an idempotent reconcile of one pod at a time, run by the loop in
//! [`run`] for the pods something changed (see [`dirty`]) and, periodically, for every pod and
//! every pod directory left on disk. Status patches go out as soon as they are computed
//! ([`patches`]). All state that must survive an agent restart is on disk (see
//! [`super::layout`]); what is only in memory (probe tasks, the last status sent) is rebuilt
//! after a restart.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt as _;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::events::{Kind, Recorder};
use super::layout::{
    ExitRecord, PodRecord, StateLayout, container_id, latest_attempt, now_rfc3339, read_json,
    write_json,
};
use super::probe::{self, ProbeSet, ProbeTarget};
use super::status::{AttemptState, attempt_state, condition, rfc3339_seconds, terminated};
use super::supervisor::EXIT_FILE;
use crate::image::gc::GcPolicy;
use crate::image::{ImageStore, PullConfig, PullHandle, Puller};
use crate::network::{HostPort, Ipam, Nat, PodLink};
use dirty::{Wake, Waker};
use patches::{Patcher, StatusPatch};

mod dirty;
mod evict;
mod launch;
mod patches;
mod pulling;
mod run;
mod sandboxes;
mod teardown;

/// A container that ran this long has its restart back-off reset.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// The pod network of this node.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// The bridge's name.
    pub bridge: String,
    /// Addresses from the node's pod CIDR.
    pub ipam: Ipam,
    /// NAT for hostPorts (and egress masquerade), if the agent manages it.
    pub nat: Option<Nat>,
    /// The node's address: where hostPorts without a hostIP are bound.
    pub node_ip: std::net::Ipv4Addr,
}

/// The hostPorts `pod` asks for, pointing at `pod_ip`.
fn host_ports(pod: &Pod, node_ip: std::net::Ipv4Addr, pod_ip: std::net::Ipv4Addr) -> Vec<HostPort> {
    let spec = pod.spec.as_ref();
    spec.into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let host_port = u16::try_from(p.host_port?).ok().filter(|h| *h > 0)?;
            let container_port = u16::try_from(p.container_port).ok()?;
            let protocol = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
            if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
                return None;
            }
            let host_ip = p
                .host_ip
                .as_deref()
                .and_then(|h| h.parse::<std::net::Ipv4Addr>().ok())
                .filter(|h| !h.is_unspecified())
                .unwrap_or(node_ip);
            Some(HostPort {
                protocol,
                host_ip,
                host_port,
                pod_ip,
                container_port,
            })
        })
        .collect()
}

/// How the pod manager runs.
#[derive(Debug, Clone)]
pub struct PodManagerConfig {
    /// This node's name.
    pub node_name: String,
    /// The state directory.
    pub layout: StateLayout,
    /// cgroup path (relative to the hierarchies' roots) under which pods get their cgroups.
    pub cgroup_parent: String,
    /// The agent's own binary (runs `supervise`).
    pub agent_exe: PathBuf,
    /// The `keelson-runtime` binary (exec probes).
    pub runtime_bin: PathBuf,
    /// First restart delay; doubles per restart.
    pub backoff_base: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
    /// The pod network, if the agent manages one.
    pub network: Option<PodNetwork>,
    /// The node's address, reported as the pods' hostIP.
    pub host_ip: String,
    /// How often every pod is reconciled even without changes.
    pub resync: Duration,
    /// When container logs rotate.
    pub log_limits: crate::logs::rotate::Limits,
    /// What pods get as /etc/resolv.conf and /etc/hosts; `None`: the image's own files.
    pub dns: Option<crate::dns::PodDns>,
}

#[derive(Default)]
struct ContainerMem {
    probes: Option<(u32, ProbeSet)>,
    image_failures: u32,
    killed_attempt: Option<u32>,
    /// The attempt whose back-off was reported (one BackOff event per restart).
    backoff_reported: Option<u32>,
    /// The last start failure reported, so a repeated one is not reported again.
    failure_reported: Option<String>,
    /// The pull this container waits for.
    pull: Option<PullHandle>,
    /// Failed pulls in a row (the pull back-off doubles with each).
    pull_failures: u32,
    /// No new pull before this.
    pull_retry_at: Option<Instant>,
    /// The last pull's error.
    pull_error: String,
    /// The back-off of the last failure was reported.
    pull_backoff_reported: bool,
    /// The attempt whose launch task runs (see [`launch`]).
    launching: Option<u32>,
    /// The last launch failed: its reason and message, and when to try again.
    launch_failed: Option<(String, String, Instant)>,
}

struct PodMem {
    start_time: String,
    link: Option<PodLink>,
    containers: HashMap<String, ContainerMem>,
    conditions: HashMap<&'static str, (bool, String)>,
    last_status: Option<Value>,
    term_sent: Option<Instant>,
    kill_sent: bool,
    termed: HashSet<String>,
    /// The eviction message, once the pod was evicted.
    evicted: Option<String>,
    /// When this agent first synced the pod; cleared once it was reported Running.
    first_seen: Option<Instant>,
    /// Its sandbox is being made (see [`sandboxes`]).
    preparing: bool,
    /// It is being torn down (see [`teardown`]).
    tearing_down: bool,
    /// The last failure to make its sandbox, and when to try again.
    sandbox_error: Option<String>,
    sandbox_retry_at: Option<Instant>,
    /// When the earliest timer set for it fires (none is set for a later time meanwhile).
    requeue_at: Option<Instant>,
}

/// What one container contributes to the pod's status.
struct View {
    status: Value,
    running: bool,
    ready: bool,
    /// Exited and will not be restarted: its exit code.
    done: Option<i32>,
    /// Ran at least once (restarting counts as running for the phase).
    ever_started: bool,
}

impl View {
    /// A container that is not running, waiting for `reason`.
    fn waiting(reason: &str, message: String) -> Self {
        View {
            status: json!({"waiting": {"reason": reason, "message": message}}),
            running: false,
            ready: false,
            done: None,
            ever_started: false,
        }
    }
}

impl PodMem {
    /// A task works on the pod's sandbox or one of its containers: its state on disk is not
    /// complete, and the pod must not be torn down.
    fn busy(&self) -> bool {
        self.preparing
            || self.tearing_down
            || self.containers.values().any(|c| c.launching.is_some())
    }
}

/// Reconciles the pods of one node.
pub struct PodManager {
    cfg: PodManagerConfig,
    client: kube::Client,
    events: Recorder,
    images: ImageStore,
    puller: Arc<Puller>,
    image_gc: Option<GcPolicy>,
    last_image_gc: Option<Instant>,
    eviction: Option<crate::node::eviction::EvictionConfig>,
    /// The pods' working set and pressure the last logged memory check saw.
    last_memory_logged: Option<(u64, bool)>,
    pods: HashMap<String, PodMem>,
    /// Wakes the sync loop for a pod (see [`dirty`]).
    waker: Waker,
    /// The loop's end of the wake-up channel, until it runs.
    wakes: Option<tokio::sync::mpsc::UnboundedReceiver<Wake>>,
    /// Hands status patches to their sender task.
    patcher: Patcher,
    /// That task, until the loop starts it.
    patch_sender: Option<patches::Sender>,
}

/// How often the image file system is checked against the GC thresholds.
const IMAGE_GC_PERIOD: Duration = Duration::from_secs(30);

fn pod_record(pod: &Pod) -> PodRecord {
    PodRecord {
        namespace: pod.namespace().unwrap_or_else(|| "default".to_owned()),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
    }
}

/// The pod's QoS class: Guaranteed when every container's requests equal its CPU and memory
/// limits, BestEffort without any request or limit, Burstable otherwise.
fn qos_class(pod: &Pod) -> &'static str {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in &containers {
        let r = c.resources.clone().unwrap_or_default();
        let limits = r.limits.unwrap_or_default();
        let requests = r.requests.unwrap_or_default();
        any |= !limits.is_empty() || !requests.is_empty();
        for res in ["cpu", "memory"] {
            let limit = limits.get(res);
            let request = requests.get(res).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (guaranteed, any) {
        (true, _) => "Guaranteed",
        (false, true) => "Burstable",
        _ => "BestEffort",
    }
}

fn restart_wanted(policy: &str, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

impl PodManager {
    /// A manager for the node; the image store lives under the state dir.
    ///
    /// # Errors
    /// When the image store cannot be opened.
    pub fn new(client: kube::Client, cfg: PodManagerConfig) -> anyhow::Result<Self> {
        let images = ImageStore::open(cfg.layout.images())?;
        fs::create_dir_all(cfg.layout.pods())?;
        let (waker, wakes) = dirty::channel();
        let (patcher, patch_sender) = Patcher::new(client.clone(), waker.clone());
        Ok(PodManager {
            events: Recorder::new(client.clone(), cfg.node_name.clone()),
            puller: Arc::new(Puller::new(images.clone(), &PullConfig::default())),
            image_gc: None,
            last_image_gc: None,
            eviction: None,
            last_memory_logged: None,
            cfg,
            client,
            images,
            pods: HashMap::new(),
            waker,
            wakes: Some(wakes),
            patcher,
            patch_sender: Some(patch_sender),
        })
    }

    /// Pulls images as `pull` says (default: HTTPS to every registry).
    pub fn with_pull_config(mut self, pull: &PullConfig) -> Self {
        self.puller = Arc::new(Puller::new(self.images.clone(), pull));
        self
    }

    /// Evicts pods under memory pressure as `eviction` says (default: never).
    pub fn with_eviction(mut self, eviction: crate::node::eviction::EvictionConfig) -> Self {
        self.eviction = Some(eviction);
        self
    }

    /// Runs image garbage collection by `policy` (default: none).
    pub fn with_image_gc(mut self, policy: GcPolicy) -> Self {
        self.image_gc = Some(policy);
        self
    }

    /// Threshold image GC, at most every [`IMAGE_GC_PERIOD`]; images of the node's pods and
    /// of every container attempt on disk are kept.
    async fn image_gc(&mut self, pods: &[Arc<Pod>]) {
        let Some(policy) = self.image_gc else { return };
        if self
            .last_image_gc
            .is_some_and(|t| t.elapsed() < IMAGE_GC_PERIOD)
        {
            return;
        }
        self.last_image_gc = Some(Instant::now());
        let names: Vec<String> = pods
            .iter()
            .filter_map(|p| p.spec.as_ref())
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .filter_map(|c| c.image.clone())
            .collect();
        let store = self.images.clone();
        let pods_dir = self.cfg.layout.pods();
        let run = tokio::task::spawn_blocking(move || {
            let mut in_use = crate::image::gc::digests_in_use(&pods_dir);
            in_use.extend(store.digests_of(names.iter().map(String::as_str))?);
            store.collect_garbage(&policy, &in_use)
        });
        match run.await {
            Ok(Ok(Some(report))) => tracing::info!(
                removed = report.removed.len(),
                freed = report.freed_bytes,
                "image GC"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "image GC"),
            Err(e) => tracing::warn!(error = %e, "image GC task"),
        }
    }

    fn mem(&mut self, record: &PodRecord) -> &mut PodMem {
        let layout = &self.cfg.layout;
        self.pods.entry(record.uid.clone()).or_insert_with(|| {
            let dir = layout.pod(&record.uid);
            let start_time = fs::read_to_string(dir.join("start_time"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| rfc3339_seconds(&now_rfc3339()));
            PodMem {
                start_time,
                link: read_json(&dir.join("network.json")),
                containers: HashMap::new(),
                conditions: HashMap::new(),
                last_status: None,
                term_sent: None,
                kill_sent: false,
                termed: HashSet::new(),
                evicted: None,
                first_seen: Some(Instant::now()),
                preparing: false,
                tearing_down: false,
                sandbox_error: None,
                sandbox_retry_at: None,
                requeue_at: None,
            }
        })
    }

    /// Syncs the pod `uid` again at `at`, unless a timer fires for it before.
    fn requeue(&mut self, uid: &str, at: Instant) {
        let Some(mem) = self.pods.get_mut(uid) else {
            return;
        };
        let now = Instant::now();
        if mem.requeue_at.is_some_and(|t| t > now && t <= at) {
            return;
        }
        mem.requeue_at = Some(at);
        self.waker.pod_at(uid, at);
    }

    /// Drops what is kept in memory about the pod `uid` (gone from the node).
    fn forget(&mut self, uid: &str) {
        self.pods.remove(uid);
        self.patcher.forget(uid);
    }

    async fn sync_pod(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let record = pod_record(pod);
        let dir = self.cfg.layout.pod(&record.uid);
        let fresh = !dir.join("pod.json").exists();
        fs::create_dir_all(dir.join("containers"))?;
        if fresh {
            write_json(&dir.join("pod.json"), &record)?;
        }
        let start_time = self.mem(&record).start_time.clone();
        if fresh {
            fs::write(dir.join("start_time"), &start_time)?;
            tracing::info!(pod = %record.name, namespace = %record.namespace, "new pod");
        }
        if self.sync_evicted(pod, &record).await {
            return Ok(());
        }
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let started = Instant::now();
        let setup = self.sandbox_ready(pod, &record, host_network);
        let sandbox_ms = started.elapsed().as_millis() as u64;
        if setup.is_ok() {
            self.sync_host_ports(pod, &record);
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".to_owned());
        // Init containers run one after the other, each to success, before the others start;
        // a failed one is restarted unless the pod's policy is Never.
        let init_policy = if policy == "Never" {
            "Never"
        } else {
            "OnFailure"
        };
        let mut init_views = Vec::new();
        let mut initialized = setup.is_ok();
        for c in spec.init_containers.iter().flatten() {
            let view = match &setup {
                Ok(()) if initialized => self.sync_container(pod, &record, c, init_policy).await,
                Ok(()) => View::waiting("PodInitializing", String::new()),
                Err(e) => View::waiting("PodInitializing", e.clone()),
            };
            initialized &= view.done == Some(0);
            init_views.push((c, view));
        }
        let mut views = Vec::new();
        for c in &spec.containers {
            let view = match &setup {
                Ok(()) if initialized => self.sync_container(pod, &record, c, &policy).await,
                Ok(()) => View::waiting("PodInitializing", String::new()),
                Err(e) => View::waiting("ContainerCreating", e.clone()),
            };
            views.push((c, view));
        }
        let containers_ms = started.elapsed().as_millis() as u64 - sandbox_ms;
        self.post_status(pod, &record, &init_views, &views);
        if fresh || started.elapsed() > Duration::from_millis(20) {
            tracing::debug!(
                pod = %record.name,
                sandbox_ms,
                containers_ms,
                ms = started.elapsed().as_millis() as u64,
                "pod synced"
            );
        }
        Ok(())
    }

    /// Keeps the DNAT rules of the pod's hostPorts (rewritten only when they change).
    fn sync_host_ports(&mut self, pod: &Pod, record: &PodRecord) {
        let Some(net) = &self.cfg.network else { return };
        let Some(nat) = &net.nat else { return };
        let Some(pod_ip) = self
            .pods
            .get(&record.uid)
            .and_then(|m| m.link.as_ref())
            .map(|l| l.ip)
        else {
            return;
        };
        if let Err(e) = nat.set_host_ports(&record.uid, host_ports(pod, net.node_ip, pod_ip)) {
            tracing::warn!(pod = %record.name, error = %e, "setting the pod's hostPorts");
        }
    }

    fn backoff(&self, attempt: u32, rec: &ExitRecord) -> Duration {
        let ran = rec
            .started_at
            .as_deref()
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
            .zip(rec.finished_at.parse::<jiff::Timestamp>().ok())
            .map(|(s, f)| f.duration_since(s).unsigned_abs())
            .unwrap_or_default();
        if ran >= BACKOFF_RESET {
            return self.cfg.backoff_base;
        }
        let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
        self.cfg
            .backoff_base
            .saturating_mul(factor)
            .min(self.cfg.backoff_max)
    }

    async fn sync_container(
        &mut self,
        pod: &Pod,
        record: &PodRecord,
        c: &Container,
        policy: &str,
    ) -> View {
        let cdir = self
            .cfg
            .layout
            .pod(&record.uid)
            .join("containers")
            .join(&c.name);
        let waiting = View::waiting;
        // An attempt being launched: its directory is not complete yet.
        if let Some(n) = self
            .pods
            .get(&record.uid)
            .and_then(|m| m.containers.get(&c.name))
            .and_then(|m| m.launching)
        {
            let mut v = waiting("ContainerCreating", String::new());
            v.ever_started = n > 0;
            return v;
        }
        let latest = latest_attempt(&cdir);
        let Some(n) = latest else {
            return match self.start_attempt(pod, record, c, 0).await {
                Ok(()) => waiting("ContainerCreating", String::new()),
                Err((reason, message)) => waiting(&reason, message),
            };
        };
        let adir = cdir.join(n.to_string());
        let id = container_id(&record.uid, &c.name, n);
        match attempt_state(&adir) {
            AttemptState::Starting => {
                let mut v = waiting("ContainerCreating", String::new());
                v.ever_started = n > 0;
                v
            }
            AttemptState::Running(started_at) => {
                let target = ProbeTarget {
                    runtime_bin: self.cfg.runtime_bin.clone(),
                    runtime_root: self.cfg.layout.runtime_root(),
                    container_id: id.clone(),
                    netns: self.cfg.layout.pod(&record.uid).join("ns/net"),
                };
                let waker = self.waker.clone();
                let mem = self
                    .mem(record)
                    .containers
                    .entry(c.name.clone())
                    .or_default();
                if mem.probes.as_ref().is_none_or(|(a, _)| *a != n) {
                    // A probe result that changes readiness or calls for a restart syncs the
                    // pod at once.
                    let uid = record.uid.clone();
                    let on_change = move || waker.pod(&uid);
                    mem.probes = Some((n, probe::start(c, target, on_change)));
                }
                let status = mem.probes.as_ref().map(|(_, p)| Arc::clone(&p.status));
                let (ready, started, failed) = status.map_or((true, true, false), |s| {
                    (
                        s.ready.load(Ordering::SeqCst),
                        s.started.load(Ordering::SeqCst),
                        s.failed.load(Ordering::SeqCst),
                    )
                });
                let kill = failed && mem.killed_attempt != Some(n);
                if kill {
                    mem.killed_attempt = Some(n);
                    tracing::info!(pod = %record.name, container = %c.name, "probe failed: restarting");
                    self.events.emit(
                        pod,
                        Some(&c.name),
                        Kind::Warning,
                        "Unhealthy",
                        "Liveness probe failed".into(),
                    );
                    self.events.emit(
                        pod,
                        Some(&c.name),
                        Kind::Normal,
                        "Killing",
                        format!(
                            "Container {} failed liveness probe, will be restarted",
                            c.name
                        ),
                    );
                    self.signal(&id, Signal::SIGKILL);
                }
                let mut status = json!({"running": {"startedAt": rfc3339_seconds(&started_at)}});
                status["_started"] = json!(started);
                View {
                    status,
                    running: true,
                    ready: ready && started,
                    done: None,
                    ever_started: true,
                }
            }
            AttemptState::Exited(rec) => {
                if let Some(mem) = self.mem(record).containers.get_mut(&c.name) {
                    mem.probes = None;
                }
                let term = terminated(&rec, &id);
                if !restart_wanted(policy, rec.exit_code) {
                    return View {
                        status: term,
                        running: false,
                        ready: false,
                        done: Some(rec.exit_code),
                        ever_started: true,
                    };
                }
                let finished = rec
                    .finished_at
                    .parse::<jiff::Timestamp>()
                    .unwrap_or_else(|_| jiff::Timestamp::now());
                let delay = self.backoff(n, &rec);
                let elapsed = jiff::Timestamp::now()
                    .duration_since(finished)
                    .unsigned_abs();
                if elapsed >= delay {
                    match self.start_attempt(pod, record, c, n + 1).await {
                        Ok(()) => View {
                            status: json!({"waiting": {"reason": "ContainerCreating"}}),
                            running: false,
                            ready: false,
                            done: None,
                            ever_started: true,
                        },
                        Err((reason, message)) => {
                            let mut v = waiting(&reason, message);
                            v.ever_started = true;
                            v
                        }
                    }
                } else {
                    self.requeue(&record.uid, Instant::now() + (delay - elapsed));
                    let mem = self
                        .mem(record)
                        .containers
                        .entry(c.name.clone())
                        .or_default();
                    if mem.backoff_reported != Some(n) {
                        mem.backoff_reported = Some(n);
                        self.events.emit(
                            pod,
                            Some(&c.name),
                            Kind::Warning,
                            "BackOff",
                            format!(
                                "Back-off restarting failed container {} in pod {}_{}",
                                c.name, record.name, record.namespace
                            ),
                        );
                    }
                    View {
                        status: json!({"waiting": {"reason": "CrashLoopBackOff", "message":
                            format!("back-off {}s restarting failed container={} pod={}",
                                delay.as_secs(), c.name, record.name)}}),
                        running: false,
                        ready: false,
                        done: None,
                        ever_started: true,
                    }
                }
            }
            AttemptState::Lost => {
                self.reap_lost(&adir, &id);
                let mut v = waiting("ContainerCreating", "container supervisor lost".into());
                v.ever_started = true;
                v
            }
        }
    }

    /// An attempt whose supervisor vanished: stop what is left of it and record it as ended.
    fn reap_lost(&self, adir: &Path, id: &str) {
        let root = self.cfg.layout.runtime_root();
        if let Ok(c) = keelson_runtime::Container::load(&root, id) {
            let _ = c.delete(true);
        }
        let rec = ExitRecord {
            exit_code: 137,
            reason: "ContainerStatusUnknown".to_owned(),
            message: "the container's supervisor ended without recording an exit".to_owned(),
            started_at: fs::read_to_string(adir.join(super::supervisor::STARTED_FILE)).ok(),
            finished_at: now_rfc3339(),
        };
        let _ = write_json(&adir.join(EXIT_FILE), &rec);
    }

    fn signal(&self, id: &str, signal: Signal) {
        match keelson_runtime::Container::load(&self.cfg.layout.runtime_root(), id) {
            Ok(c) => {
                if let Err(e) = c.kill(signal) {
                    tracing::debug!(id, error = %e, "signal");
                }
            }
            Err(e) => tracing::debug!(id, error = %e, "signal: no container"),
        }
    }

    /// Computes the pod's status and hands it to the patch sender if it changed.
    fn post_status(
        &mut self,
        pod: &Pod,
        record: &PodRecord,
        init_views: &[(&Container, View)],
        views: &[(&Container, View)],
    ) {
        let initialized = init_views.iter().all(|(_, v)| v.done == Some(0));
        let init_failed = init_views
            .iter()
            .any(|(_, v)| v.done.is_some_and(|code| code != 0));
        let all_done = !views.is_empty() && views.iter().all(|(_, v)| v.done.is_some());
        let phase = if init_failed {
            "Failed"
        } else if !initialized {
            "Pending"
        } else if all_done {
            if views.iter().all(|(_, v)| v.done == Some(0)) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if views.iter().any(|(_, v)| v.running || v.ever_started) {
            "Running"
        } else {
            "Pending"
        };
        let ready = !views.is_empty() && views.iter().all(|(_, v)| v.ready && v.running);
        let statuses = self.container_statuses(record, views);
        let init_statuses = self.container_statuses(record, init_views);
        let now = rfc3339_seconds(&now_rfc3339());
        let host_ip = self.cfg.host_ip.clone();
        let mem = self.mem(record);
        let mut conditions = Vec::new();
        for (kind, on) in [
            ("PodScheduled", true),
            ("Initialized", initialized),
            ("ContainersReady", ready),
            ("Ready", ready),
        ] {
            let since = match mem.conditions.get(kind) {
                Some((was, since)) if *was == on => since.clone(),
                _ => {
                    mem.conditions.insert(kind, (on, now.clone()));
                    now.clone()
                }
            };
            conditions.push(condition(kind, on, &since));
        }
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": mem.start_time,
            "containerStatuses": statuses,
            "qosClass": qos_class(pod),
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        if host_network {
            status["podIP"] = json!(host_ip);
            status["podIPs"] = json!([{"ip": host_ip}]);
        } else if let Some(link) = &mem.link {
            status["podIP"] = json!(link.ip.to_string());
            status["podIPs"] = json!([{"ip": link.ip.to_string()}]);
        }
        if let Some(message) = &mem.evicted {
            status["phase"] = json!("Failed");
            status["reason"] = json!("Evicted");
            status["message"] = json!(message);
        }
        if mem.last_status.as_ref() == Some(&status) {
            return;
        }
        mem.last_status = Some(status.clone());
        self.patcher.send(StatusPatch {
            uid: record.uid.clone(),
            namespace: record.namespace.clone(),
            name: record.name.clone(),
            status,
            version: pod.metadata.resource_version.clone(),
        });
    }

    /// The `containerStatuses` (or `initContainerStatuses`) entries of `views`.
    fn container_statuses(&self, record: &PodRecord, views: &[(&Container, View)]) -> Vec<Value> {
        let layout = &self.cfg.layout;
        let mut statuses = Vec::new();
        for (c, v) in views {
            let cdir = layout.pod(&record.uid).join("containers").join(&c.name);
            let n = latest_attempt(&cdir).unwrap_or(0);
            let adir = cdir.join(n.to_string());
            let mut state = v.status.clone();
            let started = state
                .as_object_mut()
                .and_then(|o| o.remove("_started"))
                .and_then(|s| s.as_bool())
                .unwrap_or(v.running);
            // A waiting container after an exit: the attempt on disk is the last state.
            let mut restart_count = n;
            let mut last = json!({});
            if let AttemptState::Exited(rec) = attempt_state(&adir)
                && state.get("waiting").is_some()
            {
                last = terminated(&rec, &container_id(&record.uid, &c.name, n));
                restart_count = n;
            } else if n > 0
                && let Some(rec) =
                    read_json::<ExitRecord>(&cdir.join((n - 1).to_string()).join(EXIT_FILE))
            {
                last = terminated(&rec, &container_id(&record.uid, &c.name, n - 1));
            }
            let image_id = fs::read_to_string(adir.join("image"))
                .ok()
                .and_then(|s| s.lines().nth(1).map(str::to_owned))
                .unwrap_or_default();
            let mut s = json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": image_id,
                "ready": v.ready && v.running,
                "started": started && v.running,
                "restartCount": restart_count,
                "state": state,
                "lastState": last,
            });
            if adir.exists() {
                s["containerID"] = json!(format!(
                    "keelson://{}",
                    container_id(&record.uid, &c.name, n)
                ));
            }
            statuses.push(s);
        }
        statuses
    }

    /// Stops a pod (SIGTERM, SIGKILL after `grace` seconds), then removes everything it had
    /// on this node and, if the object still exists, deletes it for good.
    async fn terminate(&mut self, uid: &str, pod: Option<&Pod>, grace: i64) {
        if self.pods.get(uid).is_some_and(PodMem::busy) {
            // A sandbox or launch task still runs: stopped once it is done (it wakes the pod).
            return;
        }
        let dir = self.cfg.layout.pod(uid);
        let record = match pod {
            Some(p) => pod_record(p),
            None => match read_json::<PodRecord>(&dir.join("pod.json")) {
                Some(r) => r,
                None => PodRecord {
                    namespace: String::new(),
                    name: String::new(),
                    uid: uid.to_owned(),
                },
            },
        };
        let mut live = Vec::new();
        for entry in fs::read_dir(dir.join("containers"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = latest_attempt(&entry.path()) else {
                continue;
            };
            let adir = entry.path().join(n.to_string());
            let id = container_id(uid, &name, n);
            match attempt_state(&adir) {
                AttemptState::Running(_) | AttemptState::Starting => live.push(id),
                AttemptState::Lost => self.reap_lost(&adir, &id),
                AttemptState::Exited(_) => {}
            }
        }
        let mem = self.mem(&record);
        mem.containers.clear();
        if !live.is_empty() {
            let grace = Duration::from_secs(grace.max(0) as u64);
            let first = mem.term_sent.is_none();
            let since = *mem.term_sent.get_or_insert_with(Instant::now);
            let signal = if since.elapsed() >= grace {
                if mem.kill_sent {
                    return;
                }
                mem.kill_sent = true;
                Signal::SIGKILL
            } else {
                // Containers that outlive the grace period are killed then; those that end
                // sooner wake the loop through their supervisors.
                self.requeue(uid, since + grace);
                Signal::SIGTERM
            };
            if first {
                tracing::info!(pod = %record.name, grace = grace.as_secs(), "stopping pod");
            }
            if first && let Some(pod) = pod {
                for c in pod.spec.iter().flat_map(|s| &s.containers) {
                    self.events.emit(
                        pod,
                        Some(&c.name),
                        Kind::Normal,
                        "Killing",
                        format!("Stopping container {}", c.name),
                    );
                }
            }
            let root = self.cfg.layout.runtime_root();
            let mem = self.mem(&record);
            for id in &live {
                // SIGTERM once per container; containers created after the first round
                // (still starting then) get theirs when they appear.
                if signal == Signal::SIGTERM && mem.termed.contains(id) {
                    continue;
                }
                if let Ok(c) = keelson_runtime::Container::load(&root, id)
                    && c.kill(signal).is_ok()
                {
                    mem.termed.insert(id.clone());
                }
            }
            return;
        }
        self.start_teardown(&record, pod);
    }
}
