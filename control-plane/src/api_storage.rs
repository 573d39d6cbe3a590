//! The Raft store as the API server's [`Storage`]: objects live in the replicated,
//! revisioned key-value store, and store revisions are the objects' resourceVersions.

use async_trait::async_trait;
use keelson_apiserver::storage::{
    Continue, Event, EventKind, RangePage, Revision, Storage, StorageError, Versioned,
};
use tokio::sync::mpsc;

use crate::store::{
    Consistency, Store, StoreError,
    mvcc::{self, KeyValue, MvccError, Outcome, RangeRequest},
};

/// How many converted events may wait for a slow API watcher.
const WATCH_BUFFER: usize = 1024;

/// The API server's view of a store member.
pub struct RaftStorage {
    store: std::sync::Arc<Store>,
}

impl RaftStorage {
    /// Wraps a started member.
    pub fn new(store: std::sync::Arc<Store>) -> Self {
        RaftStorage { store }
    }
}

fn rev(r: mvcc::Revision) -> Revision {
    Revision::try_from(r).unwrap_or(Revision::MAX)
}

fn versioned(kv: KeyValue) -> Versioned {
    Versioned {
        value: kv.value,
        create_revision: rev(kv.create_revision),
        mod_revision: rev(kv.mod_revision),
    }
}

fn store_err(e: StoreError) -> StorageError {
    match e {
        StoreError::Revision(MvccError::Compacted {
            requested,
            compacted,
        }) => StorageError::Compacted {
            requested: rev(requested),
            oldest: rev(compacted),
        },
        other => StorageError::Unavailable(other.to_string()),
    }
}

fn expected(r: Option<Revision>) -> Option<mvcc::Revision> {
    // A negative revision matches nothing; u64::MAX never exists either.
    r.map(|r| mvcc::Revision::try_from(r).unwrap_or(mvcc::Revision::MAX))
}

fn write_outcome(
    key: &str,
    expected: Option<Revision>,
    outcome: Outcome,
) -> Result<KeyValue, StorageError> {
    match outcome {
        Outcome::Applied { kv, .. } => Ok(kv),
        Outcome::AlreadyExists { .. } => Err(StorageError::AlreadyExists(key.to_owned())),
        Outcome::NotFound => Err(StorageError::NotFound(key.to_owned())),
        Outcome::RevisionMismatch { current } => Err(StorageError::Conflict {
            key: key.to_owned(),
            expected: expected.unwrap_or_default(),
            actual: rev(current.mod_revision),
        }),
    }
}

fn event(e: mvcc::Event) -> Event {
    Event {
        kind: match e.kind {
            mvcc::EventKind::Put => EventKind::Put,
            mvcc::EventKind::Delete => EventKind::Delete,
        },
        key: e.kv.key.clone(),
        current: match (&e.kind, &e.prev) {
            // A delete carries the value it removed, at the deletion's revision.
            (mvcc::EventKind::Delete, Some(prev)) => Versioned {
                mod_revision: rev(e.kv.mod_revision),
                ..versioned(prev.clone())
            },
            _ => versioned(e.kv),
        },
        previous: e.prev.map(versioned),
    }
}

#[async_trait]
impl Storage for RaftStorage {
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Versioned, StorageError> {
        let result = self.store.create(key, value).await.map_err(store_err)?;
        write_outcome(key, None, result.outcome).map(versioned)
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        want: Option<Revision>,
    ) -> Result<Versioned, StorageError> {
        let result = self
            .store
            .update(key, value, expected(want))
            .await
            .map_err(store_err)?;
        write_outcome(key, want, result.outcome).map(versioned)
    }

    async fn delete(&self, key: &str, want: Option<Revision>) -> Result<Versioned, StorageError> {
        let result = self
            .store
            .delete(key, expected(want))
            .await
            .map_err(store_err)?;
        let revision = rev(result.revision);
        match result.outcome {
            Outcome::Applied { kv, prev } => Ok(Versioned {
                mod_revision: revision,
                ..versioned(prev.unwrap_or(kv))
            }),
            other => write_outcome(key, want, other).map(versioned),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StorageError> {
        self.store
            .get(key, None, Consistency::Linearizable)
            .await
            .map(|kv| kv.map(versioned))
            .map_err(store_err)
    }

    async fn get_local(&self, key: &str) -> Result<Option<Versioned>, StorageError> {
        self.store
            .get(key, None, Consistency::Serializable)
            .await
            .map(|kv| kv.map(versioned))
            .map_err(store_err)
    }

    async fn range(
        &self,
        prefix: &str,
        from: Option<&Continue>,
        limit: usize,
    ) -> Result<RangePage, StorageError> {
        let request = RangeRequest {
            prefix: prefix.to_owned(),
            limit,
            revision: None,
            continue_from: from.map(|c| mvcc::Continue {
                revision: expected(Some(c.revision)).unwrap_or_default(),
                after_key: c.key.clone(),
            }),
        };
        let response = self
            .store
            .range(&request, Consistency::Linearizable)
            .await
            .map_err(store_err)?;
        Ok(RangePage {
            more: response.continue_token.is_some(),
            revision: rev(response.revision),
            items: response
                .kvs
                .into_iter()
                .map(|kv| (kv.key.clone(), versioned(kv)))
                .collect(),
        })
    }

    async fn revision(&self) -> Result<Revision, StorageError> {
        Ok(rev(self.store.local_revision()))
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<mpsc::Receiver<Event>, StorageError> {
        let after = mvcc::Revision::try_from(after).unwrap_or(0);
        let mut events = self
            .store
            .watch(prefix, after)
            .await
            .map_err(store_err)?
            .into_receiver();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if tx.send(event(e)).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
