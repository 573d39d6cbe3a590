//! Fan-out of applied events to watchers.
//!
//! A watcher registers with a key prefix and the backlog of events it missed (read from the
//! history window under the same lock that applies writes, so no event falls in between), then
//! receives every later matching event in revision order. A watcher that does not keep up
//! (its buffer is full) is dropped: its stream ends, and the caller resumes with a new watch
//! after the last revision it saw, exactly as a Kubernetes client does after a broken watch.

use tokio::sync::mpsc;

use crate::store::mvcc::{Event, Revision};

/// Events buffered per watcher beyond its initial backlog before it is considered too slow.
pub const DEFAULT_WATCH_BUFFER: usize = 1024;

/// The stream of events of one watch.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Event>,
    start_revision: Revision,
}

impl WatchStream {
    /// The next event, or `None` when the watch ended (the member shut down or the watcher
    /// fell too far behind): resume with a new watch after the last revision seen.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The underlying channel, for callers that want a plain receiver.
    pub fn into_receiver(self) -> mpsc::Receiver<Event> {
        self.rx
    }

    /// The revision after which this watch started delivering events.
    pub fn start_revision(&self) -> Revision {
        self.start_revision
    }
}

#[derive(Debug)]
struct Slot {
    prefix: String,
    tx: mpsc::Sender<Event>,
}

/// The registered watchers of one member.
#[derive(Debug, Default)]
pub(crate) struct WatchHub {
    slots: Vec<Slot>,
}

impl WatchHub {
    /// Register a watcher on `prefix` that first receives `backlog` (events after
    /// `start_revision`, already filtered by the caller or not: they are filtered here).
    pub(crate) fn register(
        &mut self,
        prefix: String,
        start_revision: Revision,
        backlog: Vec<Event>,
        buffer: usize,
    ) -> WatchStream {
        let backlog: Vec<Event> = backlog
            .into_iter()
            .filter(|e| e.kv.key.starts_with(&prefix))
            .collect();
        let (tx, rx) = mpsc::channel(backlog.len() + buffer.max(1));
        for event in backlog {
            // Capacity covers the whole backlog, and the receiver is alive: cannot fail.
            if tx.try_send(event).is_err() {
                break;
            }
        }
        self.slots.push(Slot { prefix, tx });
        WatchStream { rx, start_revision }
    }

    /// Deliver `events` (in revision order) to every matching watcher; drop watchers that are
    /// gone or too slow.
    pub(crate) fn publish(&mut self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        self.slots.retain(|slot| {
            for event in events.iter().filter(|e| e.kv.key.starts_with(&slot.prefix)) {
                if let Err(err) = slot.tx.try_send(event.clone()) {
                    if matches!(err, mpsc::error::TrySendError::Full(_)) {
                        tracing::warn!(prefix = %slot.prefix, "watcher too slow, closing it");
                    }
                    return false;
                }
            }
            !slot.tx.is_closed()
        });
    }

    /// Replace history after a snapshot install: each watcher gets the events it would have
    /// seen (from `events_after`), or is closed if they are no longer available.
    pub(crate) fn resync(
        &mut self,
        last_sent: Revision,
        events_after: impl Fn(Revision) -> Option<Vec<Event>>,
    ) {
        match events_after(last_sent) {
            Some(events) => self.publish(&events),
            None => self.slots.clear(),
        }
    }

    /// Number of live watchers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mvcc::{Command, Mvcc};

    fn events(n: usize) -> Vec<Event> {
        let mut m = Mvcc::new(100);
        (0..n)
            .filter_map(|i| {
                let key = if i % 2 == 0 { "a/x" } else { "b/x" };
                m.apply(Command::Put {
                    key: key.into(),
                    value: vec![i as u8],
                })
                .1
            })
            .collect()
    }

    #[tokio::test]
    async fn backlog_then_live_events_filtered_by_prefix() {
        let all = events(6);
        let mut hub = WatchHub::default();
        let mut w = hub.register("a/".into(), 0, all[..2].to_vec(), 8);
        hub.publish(&all[2..]);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(w.next().await.expect("event").revision());
        }
        assert_eq!(seen, [1, 3, 5]);
        assert_eq!(w.start_revision(), 0);
    }

    #[tokio::test]
    async fn slow_watcher_is_closed_after_its_buffer() {
        let all = events(10);
        let mut hub = WatchHub::default();
        let mut w = hub.register(String::new(), 0, Vec::new(), 3);
        hub.publish(&all);
        assert_eq!(hub.len(), 0);
        let mut n = 0;
        while w.next().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn dropped_watchers_are_removed() {
        let all = events(2);
        let mut hub = WatchHub::default();
        drop(hub.register(String::new(), 0, Vec::new(), 3));
        let _kept = hub.register(String::new(), 0, Vec::new(), 3);
        hub.publish(&all);
        assert_eq!(hub.len(), 1);
    }
}
