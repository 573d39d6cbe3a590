//! An in-process [`Storage`](super::Storage): the model a replicated store must behave like,
//! and the store behind the API server's tests.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Continue, Event, EventKind, RangePage, Revision, Storage, StorageError, Versioned};

/// How many events each watcher may have in flight before it is cut off.
const WATCH_BUFFER: usize = 1024;

/// A revisioned key-value store in memory with a bounded event history.
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

struct Inner {
    revision: Revision,
    kv: BTreeMap<String, Versioned>,
    history: VecDeque<Event>,
    history_limit: usize,
    /// Revisions at or below this are no longer in `history`.
    compacted: Revision,
    watchers: Vec<(String, mpsc::Sender<Event>)>,
}

impl MemoryStore {
    /// A store that keeps the last `history_limit` events for watches to resume from.
    pub fn new(history_limit: usize) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                revision: 1,
                kv: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit,
                compacted: 1,
                watchers: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every mutation completes
        // before fan-out), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(10_000)
    }
}

impl Inner {
    fn commit(&mut self, event: Event) {
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.revision();
            }
        }
        // Watchers that are gone or too slow are dropped; they re-watch from their last
        // revision.
        self.watchers.retain(|(prefix, tx)| {
            !event.key.starts_with(prefix.as_str()) || tx.try_send(event.clone()).is_ok()
        });
    }

    fn check(&self, key: &str, expected: Option<Revision>) -> Result<&Versioned, StorageError> {
        let current = self
            .kv
            .get(key)
            .ok_or_else(|| StorageError::NotFound(key.to_owned()))?;
        match expected {
            Some(expected) if expected != current.mod_revision => Err(StorageError::Conflict {
                key: key.to_owned(),
                expected,
                actual: current.mod_revision,
            }),
            _ => Ok(current),
        }
    }
}

#[async_trait]
impl Storage for MemoryStore {
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Versioned, StorageError> {
        let mut inner = self.lock();
        if inner.kv.contains_key(key) {
            return Err(StorageError::AlreadyExists(key.to_owned()));
        }
        inner.revision += 1;
        let v = Versioned {
            value,
            create_revision: inner.revision,
            mod_revision: inner.revision,
        };
        inner.kv.insert(key.to_owned(), v.clone());
        inner.commit(Event {
            kind: EventKind::Put,
            key: key.to_owned(),
            current: v.clone(),
            previous: None,
        });
        Ok(v)
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<Revision>,
    ) -> Result<Versioned, StorageError> {
        let mut inner = self.lock();
        let previous = inner.check(key, expected)?.clone();
        inner.revision += 1;
        let v = Versioned {
            value,
            create_revision: previous.create_revision,
            mod_revision: inner.revision,
        };
        inner.kv.insert(key.to_owned(), v.clone());
        inner.commit(Event {
            kind: EventKind::Put,
            key: key.to_owned(),
            current: v.clone(),
            previous: Some(previous),
        });
        Ok(v)
    }

    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<Versioned, StorageError> {
        let mut inner = self.lock();
        inner.check(key, expected)?;
        let previous = inner
            .kv
            .remove(key)
            .ok_or_else(|| StorageError::NotFound(key.to_owned()))?;
        inner.revision += 1;
        let gone = Versioned {
            mod_revision: inner.revision,
            ..previous.clone()
        };
        inner.commit(Event {
            kind: EventKind::Delete,
            key: key.to_owned(),
            current: gone.clone(),
            previous: Some(previous),
        });
        Ok(gone)
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StorageError> {
        Ok(self.lock().kv.get(key).cloned())
    }

    async fn range(
        &self,
        prefix: &str,
        from: Option<&Continue>,
        limit: usize,
    ) -> Result<RangePage, StorageError> {
        // This store keeps no old versions: later pages read the current state.
        let inner = self.lock();
        let lower = match from {
            Some(c) => std::ops::Bound::Excluded(c.key.clone()),
            None => std::ops::Bound::Included(prefix.to_owned()),
        };
        let mut items = Vec::new();
        let mut more = false;
        for (k, v) in inner
            .kv
            .range((lower, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            if limit != 0 && items.len() == limit {
                more = true;
                break;
            }
            items.push((k.clone(), v.clone()));
        }
        Ok(RangePage {
            items,
            revision: inner.revision,
            more,
        })
    }

    async fn revision(&self) -> Result<Revision, StorageError> {
        Ok(self.lock().revision)
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<mpsc::Receiver<Event>, StorageError> {
        let mut inner = self.lock();
        if after < inner.compacted {
            return Err(StorageError::Compacted {
                requested: after,
                oldest: inner.compacted,
            });
        }
        let backlog: Vec<Event> = inner
            .history
            .iter()
            .filter(|e| e.revision() > after && e.key.starts_with(prefix))
            .cloned()
            .collect();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER.max(backlog.len() + 1));
        for e in backlog {
            // Cannot fail: the channel has room for the whole backlog.
            let _ = tx.try_send(e);
        }
        inner.watchers.push((prefix.to_owned(), tx));
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revisions_and_compare_and_swap() {
        let s = MemoryStore::default();
        let a = s.create("/a", b"1".to_vec()).await.unwrap();
        assert_eq!(
            s.create("/a", b"x".to_vec()).await,
            Err(StorageError::AlreadyExists("/a".into()))
        );
        let a2 = s
            .update("/a", b"2".to_vec(), Some(a.mod_revision))
            .await
            .unwrap();
        assert_eq!(a2.create_revision, a.create_revision);
        assert!(a2.mod_revision > a.mod_revision);
        assert!(matches!(
            s.update("/a", b"3".to_vec(), Some(a.mod_revision)).await,
            Err(StorageError::Conflict { .. })
        ));
        assert!(matches!(
            s.delete("/a", Some(a.mod_revision)).await,
            Err(StorageError::Conflict { .. })
        ));
        s.delete("/a", Some(a2.mod_revision)).await.unwrap();
        assert_eq!(s.get("/a").await.unwrap(), None);
        assert_eq!(
            s.delete("/a", None).await,
            Err(StorageError::NotFound("/a".into()))
        );
    }

    #[tokio::test]
    async fn range_pages_by_prefix() {
        let s = MemoryStore::default();
        for k in ["/p/a", "/p/b", "/p/c", "/q/a"] {
            s.create(k, vec![]).await.unwrap();
        }
        let page = s.range("/p/", None, 2).await.unwrap();
        let keys: Vec<_> = page.items.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["/p/a", "/p/b"]);
        assert!(page.more);
        let from = Continue {
            key: "/p/b".into(),
            revision: page.revision,
        };
        let page = s.range("/p/", Some(&from), 2).await.unwrap();
        let keys: Vec<_> = page.items.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["/p/c"]);
        assert!(!page.more);
    }

    #[tokio::test]
    async fn watch_resumes_from_history_and_reports_compaction() {
        let s = MemoryStore::new(3);
        let first = s.create("/w/a", b"1".to_vec()).await.unwrap();
        s.create("/other", vec![]).await.unwrap();
        s.update("/w/a", b"2".to_vec(), None).await.unwrap();
        let mut rx = s.watch("/w/", first.mod_revision).await.unwrap();
        let e = rx.recv().await.unwrap();
        assert_eq!(
            (e.kind, e.current.value.as_slice()),
            (EventKind::Put, &b"2"[..])
        );
        s.delete("/w/a", None).await.unwrap();
        let e = rx.recv().await.unwrap();
        assert_eq!(e.kind, EventKind::Delete);
        assert_eq!(e.previous.unwrap().value, b"2");

        // Three more writes push the first ones out of the window.
        for k in ["/x", "/y", "/z"] {
            s.create(k, vec![]).await.unwrap();
        }
        assert!(matches!(
            s.watch("/w/", first.mod_revision).await,
            Err(StorageError::Compacted { .. })
        ));
    }
}
