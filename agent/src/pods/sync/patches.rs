//! Status patches, sent as soon as a pod's sync computes them rather than at the end of a
//! round: a task takes them from a channel and sends up to [`PATCH_CONCURRENCY`] at once, one
//! at a time per pod. A newer status of a pod whose patch is in flight replaces any older one
//! waiting and goes out after it, preconditioned on the resourceVersion that patch returned.
//! Every answer goes back to the sync loop (a [`Wake::Patched`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::dirty::{Wake, Waker};

/// Status patches in flight at once.
const PATCH_CONCURRENCY: usize = 16;

/// A status computed by a pod's sync.
pub(super) struct StatusPatch {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub status: Value,
    /// The resourceVersion of the pod the status was computed from (the watch's copy).
    pub version: Option<String>,
}

/// How the API server answered a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Stored.
    Accepted,
    /// The pod changed since the version the patch named (409).
    Conflict,
    /// Any other failure (logged).
    Failed,
}

/// A patch's answer, for the sync loop's bookkeeping.
pub(super) struct PatchOutcome {
    pub uid: String,
    pub name: String,
    pub status: Value,
    pub answer: Answer,
}

enum Message {
    Patch(StatusPatch),
    /// The pod is gone from the node: drop what is kept about it.
    Forget(String),
}

/// The sync loop's handle on the sender task.
#[derive(Clone)]
pub(super) struct Patcher(mpsc::UnboundedSender<Message>);

impl Patcher {
    /// A handle and the sender task to run (it ends when every handle is dropped).
    pub(super) fn new(client: kube::Client, waker: Waker) -> (Self, Sender) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sender = Sender {
            client,
            waker,
            rx,
            lanes: Lanes::default(),
        };
        (Patcher(tx), sender)
    }

    /// Queues `patch`.
    pub(super) fn send(&self, patch: StatusPatch) {
        let _ = self.0.send(Message::Patch(patch));
    }

    /// Forgets the pod `uid` (removed from the node).
    pub(super) fn forget(&self, uid: &str) {
        let _ = self.0.send(Message::Forget(uid.to_owned()));
    }
}

/// The resourceVersion to patch at: the watch's copy, or the one our own last patch returned
/// if the watch has not caught up with it yet. A patch carrying it is refused (409) if anyone
/// else changed the pod since, above all if it was deleted meanwhile: the API server ends a
/// terminating pod on any write, and a status computed before the deletion must not end it
/// before its containers were stopped.
fn patch_version(seen: Option<&str>, ours: Option<u64>) -> Option<String> {
    match (seen, ours) {
        (Some(seen), Some(ours)) => Some(match seen.parse::<u64>() {
            Ok(seen) => seen.max(ours).to_string(),
            Err(_) => seen.to_owned(),
        }),
        (Some(seen), None) => Some(seen.to_owned()),
        (None, ours) => ours.map(|v| v.to_string()),
    }
}

/// Patches waiting and in flight, one lane per pod.
#[derive(Default)]
struct Lanes {
    /// The resourceVersion our last accepted patch of each pod returned.
    versions: HashMap<String, u64>,
    in_flight: HashSet<String>,
    /// The newest status of each pod not sent yet (and when it came), in arrival order.
    waiting: HashMap<String, (StatusPatch, Instant)>,
    order: VecDeque<String>,
    /// Pods forgotten while their patch was in flight.
    forget_after: HashSet<String>,
}

impl Lanes {
    fn enqueue(&mut self, p: StatusPatch) {
        let uid = p.uid.clone();
        if self
            .waiting
            .insert(uid.clone(), (p, Instant::now()))
            .is_none()
        {
            self.order.push_back(uid);
        }
    }

    fn forget(&mut self, uid: &str) {
        self.versions.remove(uid);
        self.waiting.remove(uid);
        self.order.retain(|u| u != uid);
        if self.in_flight.contains(uid) {
            self.forget_after.insert(uid.to_owned());
        }
    }

    /// The oldest waiting patch of a pod with none in flight, now in flight, with the
    /// version to send it at.
    fn next_ready(&mut self) -> Option<(StatusPatch, Instant, Option<String>)> {
        let i = self
            .order
            .iter()
            .position(|uid| !self.in_flight.contains(uid))?;
        let uid = self.order.remove(i)?;
        let (p, queued) = self.waiting.remove(&uid)?;
        let version = patch_version(p.version.as_deref(), self.versions.get(&uid).copied());
        self.in_flight.insert(uid);
        Some((p, queued, version))
    }

    /// The patch of `uid` was answered; with its new version if accepted.
    fn finish(&mut self, uid: &str, accepted: Option<u64>) {
        self.in_flight.remove(uid);
        let forgotten = self.forget_after.remove(uid);
        if let Some(version) = accepted.filter(|v| *v > 0 && !forgotten) {
            self.versions.insert(uid.to_owned(), version);
        }
    }
}

/// The task that sends the patches.
pub(super) struct Sender {
    client: kube::Client,
    waker: Waker,
    rx: mpsc::UnboundedReceiver<Message>,
    lanes: Lanes,
}

type Sent = (StatusPatch, Instant, Result<u64, kube::Error>);

impl Sender {
    /// Sends patches until every [`Patcher`] is dropped.
    pub(super) async fn run(mut self) {
        let mut running = FuturesUnordered::new();
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(Message::Patch(p)) => self.lanes.enqueue(p),
                    Some(Message::Forget(uid)) => self.lanes.forget(&uid),
                    None => break,
                },
                Some(sent) = running.next(), if !running.is_empty() => self.finish(sent),
            }
            while running.len() < PATCH_CONCURRENCY
                && let Some((p, queued, version)) = self.lanes.next_ready()
            {
                running.push(send(self.client.clone(), p, version, queued));
            }
        }
    }

    fn finish(&mut self, (p, queued, result): Sent) {
        self.lanes.finish(&p.uid, result.as_ref().ok().copied());
        let answer = match result {
            Ok(_) => Answer::Accepted,
            // Changed (or being deleted) since: the sync loop syncs it again.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!(pod = %p.name, "status update: the pod changed meanwhile");
                Answer::Conflict
            }
            Err(e) => {
                tracing::warn!(pod = %p.name, error = %e, "status update");
                Answer::Failed
            }
        };
        tracing::debug!(
            pod = %p.name,
            ms = queued.elapsed().as_millis() as u64,
            ?answer,
            "status patch answered"
        );
        self.waker.send(Wake::Patched(PatchOutcome {
            uid: p.uid,
            name: p.name,
            status: p.status,
            answer,
        }));
    }
}

/// Sends one patch at `version`; the pod's new resourceVersion (0 if unreadable).
async fn send(
    client: kube::Client,
    p: StatusPatch,
    version: Option<String>,
    queued: Instant,
) -> Sent {
    let api: Api<Pod> = Api::namespaced(client, &p.namespace);
    let mut body = json!({ "status": &p.status });
    if let Some(v) = version {
        body["metadata"] = json!({ "resourceVersion": v });
    }
    let result = api
        .patch_status(&p.name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(|pod| {
            pod.metadata
                .resource_version
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        });
    (p, queued, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_patches_name_the_newest_version_known() {
        // The watch is behind our own last patch: ours.
        assert_eq!(patch_version(Some("7"), Some(9)), Some("9".into()));
        // Someone changed the pod after our patch (a deletion): theirs.
        assert_eq!(patch_version(Some("12"), Some(9)), Some("12".into()));
        assert_eq!(patch_version(Some("5"), None), Some("5".into()));
        assert_eq!(patch_version(None, Some(3)), Some("3".into()));
        assert_eq!(patch_version(None, None), None);
        // Not a number: sent as the watch has it.
        assert_eq!(patch_version(Some("x1"), Some(3)), Some("x1".into()));
    }

    fn patch(uid: &str, phase: &str, version: &str) -> StatusPatch {
        StatusPatch {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            status: json!({ "phase": phase }),
            version: Some(version.into()),
        }
    }

    #[test]
    fn one_patch_in_flight_per_pod_the_newest_waits_and_chains_its_version() {
        let mut lanes = Lanes::default();
        lanes.enqueue(patch("a", "Pending", "5"));
        lanes.enqueue(patch("b", "Pending", "6"));
        let (first, _, v) = lanes.next_ready().expect("a");
        assert_eq!((first.uid.as_str(), v.as_deref()), ("a", Some("5")));
        // Two newer statuses of `a` while its patch is in flight: only the last one waits.
        lanes.enqueue(patch("a", "Running", "5"));
        lanes.enqueue(patch("a", "Succeeded", "5"));
        let (second, _, _) = lanes.next_ready().expect("b");
        assert_eq!(second.uid, "b");
        assert!(lanes.next_ready().is_none(), "a's patch is still in flight");
        // Accepted at version 8: a's waiting patch goes out at 8, not the watch's 5.
        lanes.finish("a", Some(8));
        let (third, _, v) = lanes.next_ready().expect("a again");
        assert_eq!(third.status["phase"], "Succeeded");
        assert_eq!(v.as_deref(), Some("8"));
        assert!(lanes.next_ready().is_none());
    }

    #[test]
    fn forgotten_pods_keep_nothing() {
        let mut lanes = Lanes::default();
        lanes.enqueue(patch("a", "Pending", "5"));
        let _ = lanes.next_ready().expect("a");
        lanes.enqueue(patch("a", "Running", "5"));
        lanes.forget("a");
        assert!(
            lanes.next_ready().is_none(),
            "the waiting patch was dropped"
        );
        lanes.finish("a", Some(9));
        assert!(lanes.versions.is_empty() && lanes.in_flight.is_empty());
        assert!(lanes.forget_after.is_empty() && lanes.order.is_empty());
    }
}
