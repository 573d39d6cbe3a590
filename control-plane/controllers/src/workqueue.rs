//! A de-duplicating work queue of keys with delayed re-adds, drained by one worker per
//! controller (so one key is never reconciled twice at once).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

struct State<T> {
    queue: VecDeque<T>,
    queued: HashSet<T>,
}

/// Keys waiting to be reconciled.
pub(crate) struct WorkQueue<T> {
    state: Arc<Mutex<State<T>>>,
    notify: Arc<Notify>,
}

impl<T> Clone for WorkQueue<T> {
    fn clone(&self) -> Self {
        WorkQueue {
            state: Arc::clone(&self.state),
            notify: Arc::clone(&self.notify),
        }
    }
}

impl<T: Clone + Eq + Hash + Send + 'static> WorkQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        WorkQueue {
            state: Arc::new(Mutex::new(State {
                queue: VecDeque::new(),
                queued: HashSet::new(),
            })),
            notify: Arc::new(Notify::new()),
        }
    }

    /// Queues `key` unless it is already waiting.
    pub fn add(&self, key: T) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.queued.insert(key.clone()) {
            s.queue.push_back(key);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay`.
    pub fn add_after(&self, key: T, delay: Duration) {
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    fn pop(&self) -> Option<T> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = s.queue.pop_front()?;
        s.queued.remove(&key);
        Some(key)
    }

    /// Drains the queue with `reconcile` until `cancel`: `Ok(Some(d))` re-queues the key after
    /// `d`, errors re-queue it with a per-key exponential back-off.
    pub async fn run<F, Fut>(self, cancel: CancellationToken, name: &'static str, mut reconcile: F)
    where
        F: FnMut(T) -> Fut,
        Fut: Future<Output = crate::Result<Option<Duration>>>,
        T: std::fmt::Display,
    {
        let mut failures: HashMap<T, u32> = HashMap::new();
        loop {
            let key = loop {
                if let Some(k) = self.pop() {
                    break k;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = self.notify.notified() => {}
                }
            };
            if cancel.is_cancelled() {
                return;
            }
            match reconcile(key.clone()).await {
                Ok(requeue) => {
                    failures.remove(&key);
                    if let Some(d) = requeue {
                        self.add_after(key, d);
                    }
                }
                Err(e) => {
                    let n = failures.entry(key.clone()).or_insert(0);
                    *n = n.saturating_add(1);
                    let delay =
                        Duration::from_millis(50u64 << (*n).min(9)).min(Duration::from_secs(10));
                    if e.is_conflict() {
                        tracing::debug!(controller = name, %key, error = %e, "conflict, retrying");
                    } else {
                        tracing::warn!(controller = name, %key, error = %e, ?delay, "reconcile failed");
                    }
                    self.add_after(key, delay);
                }
            }
        }
    }
}
