//! The revisioned key-value store the API server keeps objects in.
//!
//! The model is etcd's: every write gets the store's next revision, which the API server
//! hands out as the object's `resourceVersion`; watches resume from a revision as long as it
//! is inside the store's history window, and fail with [`StorageError::Compacted`] (HTTP 410
//! Gone) when it is older. `keelson-server` implements this trait over its Raft store;
//! [`memory::MemoryStore`] is the single-process implementation used in tests.

pub mod encrypted;
pub mod memory;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// A store revision; also the `resourceVersion` of objects and lists.
pub type Revision = i64;

/// A stored value with the revisions that created and last modified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The value (a JSON-encoded object).
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
}

/// Where a paged range continues: after `key`, reading at `revision` (so that every page of
/// one list sees the same state, where the store can do that).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Continue {
    /// The last key returned.
    pub key: String,
    /// The revision the first page was read at.
    pub revision: Revision,
}

/// One page of a prefix range.
#[derive(Clone, Debug, Default)]
pub struct RangePage {
    /// Keys and values in key order.
    pub items: Vec<(String, Versioned)>,
    /// The revision the page was read at.
    pub revision: Revision,
    /// Whether more keys follow the last one returned.
    pub more: bool,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted.
    Delete,
}

/// A change, as delivered to watchers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The key.
    pub key: String,
    /// The value after a put (with its revisions); for a delete, the value before it, with
    /// `mod_revision` set to the deletion's revision.
    pub current: Versioned,
    /// The value before the change, if there was one.
    pub previous: Option<Versioned>,
}

impl Event {
    /// The revision of the write.
    pub fn revision(&self) -> Revision {
        self.current.mod_revision
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// Create of a key that exists.
    #[error("key {0} already exists")]
    AlreadyExists(String),
    /// The key does not exist.
    #[error("key {0} not found")]
    NotFound(String),
    /// The key's revision is not the expected one.
    #[error("key {key} is at revision {actual}, not {expected}")]
    Conflict {
        /// The key.
        key: String,
        /// The revision the caller expected.
        expected: Revision,
        /// The revision the key is at.
        actual: Revision,
    },
    /// A watch or paged read asked for a revision older than the history kept.
    #[error("revision {requested} has been compacted; the oldest available is {oldest}")]
    Compacted {
        /// What was asked for.
        requested: Revision,
        /// The oldest revision still available.
        oldest: Revision,
    },
    /// The store cannot serve right now (no quorum, shutting down, …).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be decrypted or encrypted (encryption at rest).
    #[error("{0}")]
    Transform(String),
}

/// A revisioned key-value store.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Creates `key`; fails with [`StorageError::AlreadyExists`] if it exists.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Versioned, StorageError>;

    /// Replaces `key`'s value, only if its `mod_revision` is `expected` when given.
    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<Revision>,
    ) -> Result<Versioned, StorageError>;

    /// Deletes `key`, only if its `mod_revision` is `expected` when given; returns the value
    /// it had, with `mod_revision` set to the deletion's revision.
    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<Versioned, StorageError>;

    /// The current value of `key`.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StorageError>;

    /// The value of `key` as this member last applied it: cheaper than [`Storage::get`] and
    /// possibly stale, for checks that tolerate that (as Kubernetes' admission checks read
    /// informer caches).
    async fn get_local(&self, key: &str) -> Result<Option<Versioned>, StorageError> {
        self.get(key).await
    }

    /// Up to `limit` keys (0: no limit) starting with `prefix`, continuing a paged range if
    /// `from` is given (a continuation older than the history kept is
    /// [`StorageError::Compacted`]).
    async fn range(
        &self,
        prefix: &str,
        from: Option<&Continue>,
        limit: usize,
    ) -> Result<RangePage, StorageError>;

    /// The current revision.
    async fn revision(&self) -> Result<Revision, StorageError>;

    /// Events for keys starting with `prefix` after revision `after`, then live ones, in
    /// revision order. The channel closes when the watcher falls too far behind or the store
    /// shuts down; the client then watches again from the last revision it saw.
    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<mpsc::Receiver<Event>, StorageError>;
}
