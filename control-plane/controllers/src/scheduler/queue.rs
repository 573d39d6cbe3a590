//! The scheduling queue: pending pods by priority (then arrival), and the pods that did not
//! fit, held back with an exponential back-off until the cluster changes in a way that may
//! help (a node added or changed, a bound pod gone) or a periodic retry comes due.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use tokio::time::Instant;

use crate::util::Key;

struct Parked {
    until: Instant,
    /// The cluster-change counter when the pod failed.
    seen: u64,
    since: Instant,
}

/// Pending pods.
pub struct SchedulingQueue {
    heap: BinaryHeap<(i32, Reverse<u64>, Key)>,
    /// The latest object of every pending pod, and the sequence number of its heap entry
    /// (0 when not in the heap).
    pending: HashMap<Key, (Arc<Pod>, u64)>,
    parked: HashMap<Key, Parked>,
    attempts: HashMap<Key, u32>,
    seq: u64,
    changes: u64,
    backoff_initial: Duration,
    backoff_max: Duration,
    retry_parked: Duration,
}

impl SchedulingQueue {
    /// An empty queue.
    pub fn new(backoff_initial: Duration, backoff_max: Duration, retry_parked: Duration) -> Self {
        SchedulingQueue {
            heap: BinaryHeap::new(),
            pending: HashMap::new(),
            parked: HashMap::new(),
            attempts: HashMap::new(),
            seq: 0,
            changes: 0,
            backoff_initial,
            backoff_max,
            retry_parked,
        }
    }

    fn push(&mut self, key: Key) {
        let Some((pod, seq)) = self.pending.get_mut(&key) else {
            return;
        };
        if *seq != 0 {
            return;
        }
        self.seq += 1;
        *seq = self.seq;
        let priority = pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
        self.heap.push((priority, Reverse(self.seq), key));
    }

    /// A pending pod was added or changed.
    pub fn upsert(&mut self, pod: Arc<Pod>) {
        let key = Key::of(pod.as_ref());
        match self.pending.get_mut(&key) {
            Some(entry) => entry.0 = pod,
            None => {
                self.pending.insert(key.clone(), (pod, 0));
            }
        }
        if !self.parked.contains_key(&key) {
            self.push(key);
        }
    }

    /// A pod is no longer pending (bound or deleted).
    pub fn remove(&mut self, key: &Key) {
        self.pending.remove(key);
        self.parked.remove(key);
        self.attempts.remove(key);
    }

    /// The next pod to schedule.
    pub fn pop(&mut self) -> Option<Arc<Pod>> {
        while let Some((_, Reverse(seq), key)) = self.heap.pop() {
            if let Some((pod, s)) = self.pending.get_mut(&key)
                && *s == seq
            {
                *s = 0;
                return Some(Arc::clone(pod));
            }
        }
        None
    }

    /// The pod did not fit: back off before trying again.
    pub fn park(&mut self, key: Key) {
        if !self.pending.contains_key(&key) {
            return;
        }
        let attempts = self.attempts.entry(key.clone()).or_insert(0);
        *attempts += 1;
        let backoff = self
            .backoff_initial
            .saturating_mul(1 << (*attempts - 1).min(16))
            .min(self.backoff_max);
        let now = Instant::now();
        let parked = Parked {
            until: now + backoff,
            seen: self.changes,
            since: now,
        };
        self.parked.insert(key, parked);
    }

    /// Something changed that may let parked pods fit.
    pub fn cluster_changed(&mut self) {
        self.changes += 1;
    }

    /// Moves parked pods whose back-off is over and that may fit now back to the heap.
    pub fn flush(&mut self) {
        let now = Instant::now();
        let changes = self.changes;
        let retry = self.retry_parked;
        let due: Vec<Key> = self
            .parked
            .iter()
            .filter(|(_, p)| p.until <= now && (p.seen < changes || now >= p.since + retry))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            self.parked.remove(&k);
            self.push(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, priority: i32) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"containers": [], "priority": priority},
            }))
            .expect("pod"),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn priority_order_and_backoff() {
        let mut q = SchedulingQueue::new(
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        q.upsert(pod("low", 0));
        q.upsert(pod("high", 10));
        q.upsert(pod("low2", 0));
        let order: Vec<String> = std::iter::from_fn(|| q.pop())
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(order, ["high", "low", "low2"]);
        q.park(Key::new("default", "low"));
        q.cluster_changed();
        q.flush();
        assert!(q.pop().is_none(), "still backing off");
        tokio::time::advance(Duration::from_millis(1100)).await;
        q.flush();
        assert_eq!(
            q.pop().and_then(|p| p.metadata.name.clone()).as_deref(),
            Some("low")
        );
        // Without a cluster change a parked pod waits for the periodic retry.
        q.park(Key::new("default", "low"));
        tokio::time::advance(Duration::from_secs(5)).await;
        q.flush();
        assert!(q.pop().is_none());
        tokio::time::advance(Duration::from_secs(60)).await;
        q.flush();
        assert!(q.pop().is_some());
    }
}
