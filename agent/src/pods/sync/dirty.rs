//! What the pod sync loop has to do next. Whatever may change a pod's state sends a [`Wake`]
//! through one channel: watch events, supervisors whose container started or ended, probes
//! whose result changed, finished sandboxes, launches and status patches, and timers (restart back-off,
//! termination grace, pull retries). The loop syncs only the pods named since its last pass;
//! a periodic sweep over every pod catches what no wake-up reported, a few pods at a time, so
//! that a pod that just arrived never waits for a whole round over the node.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use tokio::sync::mpsc;

use super::launch::Launched;
use super::patches::PatchOutcome;
use crate::network::PodLink;

/// Pods synced between two looks at the channel while a sweep runs.
const SWEEP_CHUNK: usize = 8;

/// Something the sync loop reacts to.
pub(super) enum Wake {
    /// This pod (by uid) may have changed.
    Pod(String),
    /// Every pod may have changed (the watch listed them again).
    All,
    /// A pod's sandbox was made (with its network link, if it needed one) or failed.
    Sandbox(String, Result<Option<PodLink>, String>),
    /// A container's launch is over.
    Launched(Box<Launched>),
    /// A status patch was answered.
    Patched(PatchOutcome),
    /// The pod (by uid) is torn down: nothing of it is left on the node.
    TornDown(String),
}

/// The sending side, cloned into every task that may wake the loop.
#[derive(Clone)]
pub(super) struct Waker(mpsc::UnboundedSender<Wake>);

impl Waker {
    /// Sends `wake`; a loop that has ended no longer cares.
    pub(super) fn send(&self, wake: Wake) {
        let _ = self.0.send(wake);
    }

    /// Marks the pod `uid` for a sync.
    pub(super) fn pod(&self, uid: &str) {
        self.send(Wake::Pod(uid.to_owned()));
    }

    /// Marks the pod `uid` for a sync at `at` (a timer task).
    pub(super) fn pod_at(&self, uid: &str, at: Instant) {
        let this = self.clone();
        let uid = uid.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            this.send(Wake::Pod(uid));
        });
    }
}

/// A new channel: its waker and its receiver.
pub(super) fn channel() -> (Waker, mpsc::UnboundedReceiver<Wake>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Waker(tx), rx)
}

/// The pods waiting for a sync: those something reported (first, in arrival order) and those
/// of the running sweep.
#[derive(Default)]
pub(super) struct Queue {
    marked: VecDeque<String>,
    marked_set: HashSet<String>,
    sweep: VecDeque<String>,
}

impl Queue {
    /// Puts `uid` in line, once.
    pub(super) fn mark(&mut self, uid: String) {
        if self.marked_set.insert(uid.clone()) {
            self.marked.push_back(uid);
        }
    }

    /// Starts a sweep over `uids`, unless the last one is still going; false then.
    pub(super) fn start_sweep(&mut self, uids: impl IntoIterator<Item = String>) -> bool {
        if !self.sweep.is_empty() {
            return false;
        }
        self.sweep.extend(uids);
        true
    }

    /// Whether anything waits.
    pub(super) fn has_work(&self) -> bool {
        !self.marked.is_empty() || !self.sweep.is_empty()
    }

    /// The next pods to sync: every marked one, else the sweep's next few.
    pub(super) fn next_batch(&mut self) -> Vec<String> {
        if !self.marked.is_empty() {
            self.marked_set.clear();
            return self.marked.drain(..).collect();
        }
        let n = self.sweep.len().min(SWEEP_CHUNK);
        self.sweep.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_pods_come_first_once_each_and_sweeps_in_chunks() {
        let mut q = Queue::default();
        assert!(!q.has_work());
        assert!(q.start_sweep((0..20).map(|i| format!("s{i}"))));
        // A sweep still running is not restarted.
        assert!(!q.start_sweep(["x".to_owned()]));
        q.mark("a".into());
        q.mark("b".into());
        q.mark("a".into());
        assert_eq!(q.next_batch(), ["a", "b"]);
        assert_eq!(q.next_batch().len(), SWEEP_CHUNK);
        // A pod marked during the sweep goes before the sweep's rest.
        q.mark("c".into());
        assert_eq!(q.next_batch(), ["c"]);
        assert_eq!(q.next_batch().len(), SWEEP_CHUNK);
        assert_eq!(q.next_batch().len(), 20 - 2 * SWEEP_CHUNK);
        assert!(!q.has_work());
        assert!(q.start_sweep(["y".to_owned()]));
        assert_eq!(q.next_batch(), ["y"]);
    }

    #[tokio::test]
    async fn timers_wake_the_pod_when_due() {
        let (waker, mut rx) = channel();
        let delay = std::time::Duration::from_millis(100);
        let start = Instant::now();
        waker.pod_at("p", start + delay);
        waker.pod("q");
        assert!(matches!(rx.recv().await, Some(Wake::Pod(u)) if u == "q"));
        assert!(rx.try_recv().is_err(), "the timer fired early");
        assert!(matches!(rx.recv().await, Some(Wake::Pod(u)) if u == "p"));
        assert!(start.elapsed() >= delay);
    }
}
