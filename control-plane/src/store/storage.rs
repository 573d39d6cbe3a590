//! Durable storage of one member, in its data directory:
//! - `wal/`: the Raft log, vote and commit index in a write-ahead log (see `wal.rs`, written
//!   by the thread in `writer.rs`, served by [`LogStore`]);
//! - `snapshot`: the state machine as of some applied entry (see `snapshot.rs`);
//! - `store.lock`: held while a process has the directory open.
//!
//! Durability: an append is acknowledged to openraft only once it is fdatasynced (one sync
//! shared by every append waiting), and so is the vote. The state machine lives in memory: it
//! is durable through the log, replayed from the last snapshot at start (openraft re-applies
//! the committed entries after the snapshot before serving), and every snapshot is synced to
//! disk before the log behind it may be purged. Snapshots and purging keep the disk bounded.
//!
//! Corruption: every log record and the snapshot carry a crc32; segments and the snapshot are
//! checked when a member opens its directory, along with the log's consistency (contiguous
//! indexes, no missing segment, the log not purged past the snapshot). A failure is a
//! [`DiskError::Corrupt`] naming the file and what is wrong; only the torn tail of the last
//! segment (an unsynced write cut by a crash) is repaired.

use std::fmt::Debug;
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};

use crate::store::mvcc::{Mvcc, MvccState, Revision, WriteResult};
use crate::store::snapshot::SnapshotFile;
use crate::store::types::{Entry, Node, NodeId, TypeConfig};
use crate::store::wal::{self, Replayed, SegmentStart};
use crate::store::watch::WatchHub;

pub use crate::store::log::LogStore;
pub use crate::store::snapshot::SNAPSHOT_FILE;

/// The directory of the write-ahead log inside a member's data directory.
pub const WAL_DIR: &str = "wal";
/// The lock file inside a member's data directory.
pub const LOCK_FILE: &str = "store.lock";
/// The database of the first on-disk format (redb), refused with an explanation.
pub const OLD_DB_FILE: &str = "store.redb";

/// Errors of the on-disk store.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process (or member) has the data directory open.
    #[error("{path} is locked: another keelson-server uses this data directory")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The data directory holds a store of the first on-disk format.
    #[error(
        "{path} is a store of an older on-disk format (a single redb database) that this \
         keelson-server does not read: start this member with an empty data directory and let \
         it join the cluster again (it catches up from the other members), or run the older \
         keelson-server"
    )]
    OldFormat {
        /// The old database file.
        path: PathBuf,
    },
    /// A file is damaged or the files are not a consistent store.
    #[error("{path} is corrupt: {what}")]
    Corrupt {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A value could not be encoded.
    #[error("encoding {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The cause.
        source: postcard::Error,
    },
    /// A record is too large for the log format.
    #[error("a log record of {0} bytes is too large")]
    TooLarge(usize),
    /// openraft appended an entry that does not follow the log.
    #[error("append of entry {index} where {expected} was expected")]
    Gap {
        /// The entry's index.
        index: u64,
        /// The next index of the log.
        expected: u64,
    },
    /// A received snapshot could not be decoded.
    #[error("decoding snapshot {id}: {source}")]
    Snapshot {
        /// The snapshot's id.
        id: String,
        /// The cause.
        source: postcard::Error,
    },
    /// The log's writer thread is gone (the member is shutting down).
    #[error("the store's writer thread stopped")]
    WriterStopped,
    /// The writer thread could not be started.
    #[error("starting the writer thread: {0}")]
    StartWriter(#[source] std::io::Error),
    /// A blocking task failed.
    #[error("storage task failed: {0}")]
    Task(String),
    /// An earlier write failed.
    #[error(transparent)]
    Earlier(Arc<DiskError>),
}

/// Local result alias for this module.
pub type Result<T, E = DiskError> = std::result::Result<T, E>;

fn encode<T: serde::Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|source| DiskError::Encode { what, source })
}

/// A member's data directory, locked while open.
#[derive(Debug)]
pub(crate) struct DataDir {
    path: PathBuf,
    _lock: File,
    /// [`OpenGuard`] watches this to learn when every user of the directory is gone.
    alive: Arc<()>,
}

impl DataDir {
    pub(crate) fn wal_dir(&self) -> PathBuf {
        self.path.join(WAL_DIR)
    }
}

/// Open (or create) the store in `dir` and check it; returns the member's log store and state
/// machine. `history_limit` is the number of past events kept for watches (the same on every
/// member).
///
/// # Errors
/// [`DiskError::Io`], [`DiskError::Locked`], [`DiskError::OldFormat`] and
/// [`DiskError::Corrupt`] when the files are damaged or not a consistent store.
pub fn open(dir: &Path, history_limit: usize) -> Result<(LogStore, StateMachine)> {
    open_with(dir, history_limit, wal::SEGMENT_BYTES)
}

/// [`open`] with log segments of `segment_bytes`.
pub(crate) fn open_with(
    dir: &Path,
    history_limit: usize,
    segment_bytes: u64,
) -> Result<(LogStore, StateMachine)> {
    let io = |path: &Path, op| {
        let path = path.to_path_buf();
        move |source| DiskError::Io { path, op, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir, "creating"))?;
    let old = dir.join(OLD_DB_FILE);
    if old.exists() {
        return Err(DiskError::OldFormat { path: old });
    }
    let lock_path = dir.join(LOCK_FILE);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path, "opening"))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(DiskError::Locked { path: lock_path });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path, "locking")(e)),
    }
    let data_dir = Arc::new(DataDir {
        path: dir.to_path_buf(),
        _lock: lock,
        alive: Arc::new(()),
    });
    let snapshots = SnapshotFile::new(dir, None);
    let stored = snapshots.read()?;
    let wal_dir = data_dir.wal_dir();
    let replayed = match wal::replay(&wal_dir)? {
        Some(replayed) => replayed,
        None if stored.is_some() => {
            return Err(DiskError::Corrupt {
                path: wal_dir,
                what: "a snapshot exists but the log is missing".into(),
            });
        }
        None => {
            let replayed = new_log(&wal_dir, segment_bytes)?;
            // The new `wal/` directory itself must survive a power loss.
            wal::sync_dir(dir)?;
            replayed
        }
    };
    let snapshot_last = stored.as_ref().and_then(|s| s.meta.last_log_id);
    if replayed.purged > snapshot_last {
        return Err(DiskError::Corrupt {
            path: dir.join(SNAPSHOT_FILE),
            what: format!(
                "the log is purged up to {:?} but the snapshot only covers up to {snapshot_last:?} \
                 (snapshot missing or replaced by an older one)",
                replayed.purged
            ),
        });
    }
    let state = match stored {
        Some(stored) => {
            let mvcc_state: MvccState =
                postcard::from_bytes(&stored.data).map_err(|e| DiskError::Corrupt {
                    path: dir.join(SNAPSHOT_FILE),
                    what: format!("undecodable state: {e}"),
                })?;
            SmState {
                mvcc: Mvcc::from_state(mvcc_state, history_limit),
                applied: stored.meta.last_log_id,
                membership: stored.meta.last_membership,
                watchers: WatchHub::default(),
            }
        }
        None => SmState {
            mvcc: Mvcc::new(history_limit),
            applied: None,
            membership: StoredMembership::default(),
            watchers: WatchHub::default(),
        },
    };
    tracing::info!(
        path = %dir.display(),
        snapshot = ?state.applied,
        revision = state.mvcc.revision(),
        log_entries = replayed.slots.len(),
        "opened store"
    );
    let snapshots = Arc::new(SnapshotFile::new(dir, Some(snapshot_last)));
    let log = LogStore::start(data_dir.clone(), replayed, segment_bytes)?;
    let sm = StateMachine {
        dir: data_dir,
        snapshots,
        shared: SharedState {
            inner: Arc::new(RwLock::new(state)),
        },
    };
    Ok((log, sm))
}

/// Create the first segment of an empty log.
fn new_log(wal_dir: &Path, segment_bytes: u64) -> Result<Replayed> {
    let start = SegmentStart {
        seq: 1,
        size: wal::segment_size(0, segment_bytes),
        vote: None,
        committed: None,
        purged: None,
        first: 0,
        last: None,
    };
    let head = wal::segment_head(&start)?;
    let file = wal::create_segment(wal_dir, start.seq, start.size, &head)?;
    Ok(Replayed {
        vote: None,
        committed: None,
        purged: None,
        first: 0,
        slots: Default::default(),
        segments: vec![wal::Segment {
            seq: start.seq,
            file,
            size: start.size,
        }],
        end: head.len() as u64,
    })
}

/// The applied state of one member, in memory.
#[derive(Debug)]
pub(crate) struct SmState {
    pub(crate) mvcc: Mvcc,
    pub(crate) applied: Option<LogId<NodeId>>,
    pub(crate) membership: StoredMembership<NodeId, Node>,
    pub(crate) watchers: WatchHub,
}

/// A shared, read-mostly handle on a member's applied state: serves local reads and watches.
#[derive(Debug, Clone)]
pub struct SharedState {
    inner: Arc<RwLock<SmState>>,
}

impl SharedState {
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, SmState> {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, SmState> {
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The last applied revision.
    pub fn revision(&self) -> Revision {
        self.read().mvcc.revision()
    }

    /// The index of the last applied log entry.
    pub fn applied_index(&self) -> Option<u64> {
        self.read().applied.map(|id| id.index)
    }
}

/// The revisioned state machine of one member.
#[derive(Debug)]
pub struct StateMachine {
    dir: Arc<DataDir>,
    snapshots: Arc<SnapshotFile>,
    shared: SharedState,
}

/// Tells whether the data directory of a member is still open.
#[derive(Debug, Clone)]
pub struct OpenGuard(std::sync::Weak<()>);

impl OpenGuard {
    /// Whether some log store, state machine or snapshot builder still holds the files open.
    pub fn is_open(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// Run blocking file work off the async runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DiskError::Task(e.to_string()))?
}

impl StateMachine {
    /// A handle that tells when the files are closed (all users dropped).
    pub fn open_guard(&self) -> OpenGuard {
        OpenGuard(Arc::downgrade(&self.dir.alive))
    }

    /// A handle for local reads and watches.
    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    /// Apply `entries` in memory and tell the watchers.
    fn apply_entries(&self, entries: Vec<Entry>) -> Vec<Vec<WriteResult>> {
        let mut guard = self.shared.write();
        let state = &mut *guard;
        let mut responses = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        for entry in entries {
            state.applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Vec::new()),
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    responses.push(Vec::new());
                }
                EntryPayload::Normal(commands) => {
                    let mut results = Vec::with_capacity(commands.len());
                    for command in commands {
                        let (result, event) = state.mvcc.apply(command);
                        results.push(result);
                        events.extend(event);
                    }
                    responses.push(results);
                }
            }
        }
        if !events.is_empty() {
            state.watchers.publish(&events);
        }
        responses
    }

    async fn install(&self, meta: &SnapshotMeta<NodeId, Node>, data: Vec<u8>) -> Result<()> {
        let mvcc_state: MvccState =
            postcard::from_bytes(&data).map_err(|source| DiskError::Snapshot {
                id: meta.snapshot_id.clone(),
                source,
            })?;
        let history_limit = self.shared.read().mvcc.history_limit();
        let mvcc = Mvcc::from_state(mvcc_state, history_limit);
        // Durable before the state machine moves to it: the log before it may be purged next.
        let (snapshots, stored_meta) = (self.snapshots.clone(), meta.clone());
        blocking(move || snapshots.write(&stored_meta, &data)).await?;
        let mut guard = self.shared.write();
        let state = &mut *guard;
        let last_sent = state.mvcc.revision();
        state.mvcc = mvcc;
        state.applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        let mvcc = state.mvcc.clone();
        state
            .watchers
            .resync(last_sent, |rev| mvcc.events_after(rev).ok());
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let state = self.shared.read();
        Ok((state.applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<WriteResult>>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        Ok(self.apply_entries(entries.into_iter().collect()))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            _dir: self.dir.clone(),
            snapshots: self.snapshots.clone(),
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.install(meta, snapshot.into_inner())
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let snapshots = self.snapshots.clone();
        let stored = blocking(move || snapshots.read())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

/// Builds snapshots of the state machine from a consistent in-memory copy.
#[derive(Debug)]
pub struct SnapshotBuilder {
    _dir: Arc<DataDir>,
    snapshots: Arc<SnapshotFile>,
    shared: SharedState,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (mvcc_state, applied, membership) = {
            let state = self.shared.read();
            (
                state.mvcc.to_state(),
                state.applied,
                state.membership.clone(),
            )
        };
        let snapshot_id = match applied {
            Some(log_id) => format!(
                "{}-{}-{}",
                log_id.leader_id, log_id.index, mvcc_state.revision
            ),
            None => format!("empty-{}", mvcc_state.revision),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let snapshots = self.snapshots.clone();
        let stored_meta = meta.clone();
        // Encoded and synced off the runtime: the log behind it is purged once this returns.
        let result = blocking(move || {
            let data = encode(&mvcc_state, "snapshot")?;
            snapshots.write(&stored_meta, &data)?;
            Ok(data)
        })
        .await;
        match result {
            Ok(data) => Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }),
            Err(e) => Err(StorageIOError::write_snapshot(Some(meta.signature()), &e).into()),
        }
    }
}

#[cfg(test)]
#[path = "storage_tests.rs"]
mod tests;
