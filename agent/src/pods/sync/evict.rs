//! Memory-pressure eviction of the node's pods. Once a second `memory.available` is
//! computed as the memory capacity (the machine's, or `--eviction-memory-capacity`) minus
//! the working set of every pod's cgroup; below the `--eviction-hard` threshold the node is
//! under memory pressure and one pod is evicted at a time, in the kubelet's order. An
//! evicted pod has its containers killed and is never restarted: `evicted.json` in its
//! directory records it (so it survives an agent restart), its status becomes phase
//! `Failed`, reason `Evicted`, and a Warning Event `Evicted` says why. The next pod is only
//! evicted once the previous one's containers are gone.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt as _;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{PodManager, PodRecord, View};
use crate::node::eviction::{PodUsage, eviction_order, format_bytes, observe_memory, working_set};
use crate::node::meminfo;
use crate::pods::events::Kind;
use crate::pods::layout::{container_id, latest_attempt, read_json, write_json};
use crate::pods::memory_bytes;
use crate::pods::status::{AttemptState, attempt_state, terminated};

/// Written into an evicted pod's directory.
pub(super) const EVICTED_FILE: &str = "evicted.json";
/// How often memory is checked (the sync loop's timer).
pub(super) const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// Why a pod was evicted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Eviction {
    /// The status message.
    pub message: String,
}

/// A container's memory request: `requests.memory`, else `limits.memory` (which the API
/// defaults requests to), else 0.
fn memory_request(c: &Container) -> u64 {
    let r = c.resources.as_ref();
    r.and_then(|r| r.requests.as_ref())
        .and_then(|m| m.get("memory"))
        .or_else(|| {
            r.and_then(|r| r.limits.as_ref())
                .and_then(|m| m.get("memory"))
        })
        .and_then(|q| memory_bytes(&q.0))
        .unwrap_or(0)
}

impl PodManager {
    /// Measures memory, reports pressure and evicts a pod if it is under the threshold; the
    /// sync loop calls it every [`CHECK_PERIOD`].
    pub(super) async fn check_memory(&mut self, pods: &[Arc<Pod>]) {
        let Some(cfg) = self.eviction else { return };
        let capacity = cfg.capacity.or_else(|| meminfo("MemTotal")).unwrap_or(0);
        let mut total = 0u64;
        let mut candidates = Vec::new();
        let mut evicting = false;
        for pod in pods {
            let Some(uid) = pod.uid() else { continue };
            let dir = self.cfg.layout.pod(&uid);
            if !dir.exists() {
                continue;
            }
            let usage = working_set(&format!("{}/pod{uid}", self.cfg.cgroup_parent)).unwrap_or(0);
            total += usage;
            if dir.join(EVICTED_FILE).exists() {
                evicting |= self.has_live_containers(&uid, pod);
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let spec = pod.spec.as_ref();
            candidates.push((
                PodUsage {
                    uid,
                    priority: spec.and_then(|s| s.priority).unwrap_or(0),
                    request: spec
                        .map(|s| s.containers.iter().map(memory_request).sum())
                        .unwrap_or(0),
                    usage,
                },
                Arc::clone(pod),
            ));
        }
        let available = capacity.saturating_sub(total);
        let threshold = cfg.threshold.bytes(capacity);
        let pressure = available < threshold;
        // Logged when the pods' working set moved by a MiB or more, or pressure changed: the
        // trail that shows whether a pod's memory was seen at all.
        let moved = self
            .last_memory_logged
            .is_none_or(|(ws, p)| p != pressure || ws.abs_diff(total) >= 1 << 20);
        if moved {
            self.last_memory_logged = Some((total, pressure));
            tracing::debug!(
                pods = candidates.len(),
                working_set = total,
                available,
                threshold,
                pressure,
                evicting,
                "memory check"
            );
        }
        observe_memory(pressure, cfg.transition);
        if !pressure || evicting {
            return;
        }
        let usages: Vec<PodUsage> = candidates.iter().map(|(u, _)| u.clone()).collect();
        let Some(victim) = eviction_order(&usages).first().map(|u| u.uid.clone()) else {
            return;
        };
        let Some(pod) = candidates
            .iter()
            .find(|(u, _)| u.uid == victim)
            .map(|(_, p)| Arc::clone(p))
        else {
            return;
        };
        let message = format!(
            "The node was low on resource: memory. Threshold quantity: {}, available: {}. {}",
            cfg.threshold.describe(),
            format_bytes(available),
            self.container_usage(&pod, &victim)
        );
        self.evict(&pod, message.trim_end().to_owned());
    }

    /// "Container x was using …, request is …, has larger consumption of memory." for each
    /// container using more than it requested.
    fn container_usage(&self, pod: &Pod, uid: &str) -> String {
        let mut out = String::new();
        for c in pod.spec.iter().flat_map(|s| &s.containers) {
            let cdir = self.cfg.layout.pod(uid).join("containers").join(&c.name);
            let Some(n) = latest_attempt(&cdir) else {
                continue;
            };
            let rel = format!("{}/pod{uid}/{}-{n}", self.cfg.cgroup_parent, c.name);
            let usage = working_set(&rel).unwrap_or(0);
            let request = memory_request(c);
            if usage > request {
                out += &format!(
                    "Container {} was using {}, request is {}, has larger consumption of memory. ",
                    c.name,
                    format_bytes(usage),
                    format_bytes(request)
                );
            }
        }
        out
    }

    fn has_live_containers(&self, uid: &str, pod: &Pod) -> bool {
        pod.spec.iter().flat_map(|s| &s.containers).any(|c| {
            let cdir = self.cfg.layout.pod(uid).join("containers").join(&c.name);
            latest_attempt(&cdir).is_some_and(|n| {
                matches!(
                    attempt_state(&cdir.join(n.to_string())),
                    AttemptState::Running(_) | AttemptState::Starting
                )
            })
        })
    }

    /// Marks `pod` evicted, reports it and kills its containers.
    fn evict(&mut self, pod: &Pod, message: String) {
        let record = super::pod_record(pod);
        let path = self.cfg.layout.pod(&record.uid).join(EVICTED_FILE);
        if let Err(e) = write_json(
            &path,
            &Eviction {
                message: message.clone(),
            },
        ) {
            tracing::warn!(pod = %record.name, error = %e, "recording an eviction");
            return;
        }
        tracing::warn!(pod = %record.name, namespace = %record.namespace, %message, "evicting");
        self.events
            .emit(pod, None, Kind::Warning, "Evicted", message.clone());
        self.stop_containers(pod, &record);
        // Its Failed/Evicted status goes out with its next sync: now.
        self.waker.pod(&record.uid);
    }

    fn stop_containers(&mut self, pod: &Pod, record: &PodRecord) {
        for c in pod.spec.iter().flat_map(|s| &s.containers) {
            let cdir = self
                .cfg
                .layout
                .pod(&record.uid)
                .join("containers")
                .join(&c.name);
            if let Some(n) = latest_attempt(&cdir)
                && matches!(
                    attempt_state(&cdir.join(n.to_string())),
                    AttemptState::Running(_) | AttemptState::Starting
                )
            {
                self.signal(&container_id(&record.uid, &c.name, n), Signal::SIGKILL);
            }
        }
    }

    /// The sync of an evicted pod: its containers are stopped (again, if one was still
    /// starting), nothing is started, the status says Failed/Evicted.
    pub(super) async fn sync_evicted(&mut self, pod: &Pod, record: &PodRecord) -> bool {
        let dir = self.cfg.layout.pod(&record.uid);
        let Some(eviction) = read_json::<Eviction>(&dir.join(EVICTED_FILE)) else {
            return false;
        };
        if self.pods.get(&record.uid).is_some_and(super::PodMem::busy) {
            // A container being launched is stopped once its launch is done (it wakes the pod).
            return true;
        }
        self.stop_containers(pod, record);
        let mut views = Vec::new();
        for c in pod.spec.iter().flat_map(|s| &s.containers) {
            let cdir = dir.join("containers").join(&c.name);
            let n = latest_attempt(&cdir);
            let state = n.map(|n| attempt_state(&cdir.join(n.to_string())));
            let view = match (n, state) {
                (Some(n), Some(AttemptState::Exited(rec))) => View {
                    status: terminated(&rec, &container_id(&record.uid, &c.name, n)),
                    running: false,
                    ready: false,
                    done: Some(rec.exit_code),
                    ever_started: true,
                },
                (Some(n), Some(AttemptState::Lost)) => {
                    self.reap_lost(
                        &cdir.join(n.to_string()),
                        &container_id(&record.uid, &c.name, n),
                    );
                    View::waiting("Evicted", "stopping the container".into())
                }
                (Some(_), Some(_)) => View::waiting("Evicted", "stopping the container".into()),
                _ => View {
                    status: json!({"terminated": {"exitCode": 137, "reason": "Evicted"}}),
                    running: false,
                    ready: false,
                    done: Some(137),
                    ever_started: false,
                },
            };
            views.push((c, view));
        }
        let mem = self.mem(record);
        mem.containers.clear();
        mem.evicted = Some(eviction.message);
        self.post_status(pod, record, &[], &views);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_default_to_limits() {
        let c: Container = serde_json::from_value(json!({
            "name": "a", "resources": {"limits": {"memory": "64Mi"}}
        }))
        .expect("container");
        assert_eq!(memory_request(&c), 64 << 20);
        let c: Container = serde_json::from_value(json!({
            "name": "a", "resources": {"requests": {"memory": "1Ki"}, "limits": {"memory": "2Ki"}}
        }))
        .expect("container");
        assert_eq!(memory_request(&c), 1024);
        let c: Container = serde_json::from_value(json!({"name": "a"})).expect("container");
        assert_eq!(memory_request(&c), 0);
    }
}
