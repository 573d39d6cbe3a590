//! Durable storage of one member: the Raft log, the Raft vote and the revisioned state machine,
//! in a single redb database file (`store.redb` in the member's data directory).
//!
//! Durability: log appends, vote changes, truncation and purging commit with an fsync before
//! openraft is told they are done (so before any write is acknowledged). All writes go through
//! one thread (see `writer.rs`) that commits whatever is queued in one transaction, so
//! one fsync covers every append waiting, and appends return before their fsync (openraft is
//! told through the append's callback) so that the leader replicates while it syncs. The
//! state machine commits without its own fsync: its writes become
//! durable with the next log commit, and after a crash openraft re-applies the committed log
//! after the last durably applied entry. Log purging only happens up to a snapshot, and the
//! purge's fsync makes every earlier state machine commit durable first.
//!
//! Corruption: redb checks the file's checksums when it is opened; on top of that every row is
//! decoded and checked for consistency (log indexes contiguous and matching their keys, events
//! inside the revision window) before a member serves anything. A failure is a
//! [`DiskError::Corrupt`] naming the file and what is wrong.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::mvcc::{Event, EventKind, KeyValue, Mvcc, MvccState, Revision, WriteResult};
use crate::store::types::{Entry, Node, NodeId, TypeConfig};
use crate::store::watch::WatchHub;
use crate::store::writer::{Done, Job, Writer};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const FORMAT_KEY: &str = "format";
const FORMAT_VERSION: u32 = 1;
const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const PURGED_KEY: &str = "last_purged";
const APPLIED_KEY: &str = "applied";
const MEMBERSHIP_KEY: &str = "membership";
const REVISION_KEY: &str = "revision";
const COMPACTED_KEY: &str = "compacted";
const SNAPSHOT_META_KEY: &str = "meta";
const SNAPSHOT_DATA_KEY: &str = "data";

/// The database file's name inside a member's data directory.
pub const DB_FILE: &str = "store.redb";

/// Errors of the on-disk store.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The data directory could not be created.
    #[error("creating data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// redb refused to open the file (this includes checksum failures).
    #[error("opening {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: redb::DatabaseError,
    },
    /// A database operation failed.
    #[error("{path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: redb::Error,
    },
    /// The file opened but its content is not a consistent store.
    #[error("{path} is corrupt: {what}")]
    Corrupt {
        /// The database file.
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
    /// A received snapshot could not be decoded.
    #[error("decoding snapshot {id}: {source}")]
    Snapshot {
        /// The snapshot's id.
        id: String,
        /// The cause.
        source: postcard::Error,
    },
    /// The database's writer thread is gone (the member is shutting down).
    #[error("the store's writer thread stopped")]
    WriterStopped,
    /// The writer thread could not be started.
    #[error("starting the writer thread: {0}")]
    StartWriter(#[source] std::io::Error),
    /// An earlier write to the database failed.
    #[error(transparent)]
    Earlier(Arc<DiskError>),
}

/// Local result alias for this module.
pub type Result<T, E = DiskError> = std::result::Result<T, E>;

fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|source| DiskError::Encode { what, source })
}

/// The database shared by the log store and the state machine of one member.
#[derive(Debug)]
pub(crate) struct Disk {
    db: Database,
    path: PathBuf,
    /// Dropped after `db` (fields drop in order): [`OpenGuard`] watches it to learn when the
    /// file is really closed, not merely when the last reference went away.
    alive: Arc<()>,
}

impl Disk {
    pub(crate) fn db_err(&self, source: impl Into<redb::Error>) -> DiskError {
        DiskError::Db {
            path: self.path.clone(),
            source: source.into(),
        }
    }

    fn corrupt(&self, what: String) -> DiskError {
        DiskError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        bytes: &[u8],
        what: impl FnOnce() -> String,
    ) -> Result<T> {
        postcard::from_bytes(bytes).map_err(|e| self.corrupt(format!("{}: {e}", what())))
    }

    pub(crate) fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<T>,
    ) -> Result<T> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(durability).map_err(|e| self.db_err(e))?;
        let value = f(&txn)?;
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(value)
    }

    fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        f(&txn)
    }

    fn get_meta<T: DeserializeOwned>(
        &self,
        txn: &ReadTransaction,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>> {
        let table = txn.open_table(table).map_err(|e| self.db_err(e))?;
        let Some(value) = table.get(key).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        self.decode(value.value(), || format!("{key} in {table:?}"))
            .map(Some)
    }

    pub(crate) fn put_meta<T: Serialize>(
        &self,
        txn: &WriteTransaction,
        table: TableDefinition<&str, &[u8]>,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        let bytes = encode(value, key)?;
        let mut table = txn.open_table(table).map_err(|e| self.db_err(e))?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    fn log_entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>> {
        self.read(|txn| {
            let table = txn.open_table(LOG).map_err(|e| self.db_err(e))?;
            let mut entries = Vec::new();
            for row in table.range(range).map_err(|e| self.db_err(e))? {
                let (key, value) = row.map_err(|e| self.db_err(e))?;
                let index = key.value();
                let entry: Entry = self.decode(value.value(), || format!("log entry {index}"))?;
                if entry.log_id.index != index {
                    return Err(
                        self.corrupt(format!("log row {index} holds entry {}", entry.log_id))
                    );
                }
                entries.push(entry);
            }
            Ok(entries)
        })
    }
}

fn io_read(e: DiskError) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

fn io_write_logs(e: DiskError) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

/// Open (or create) the database in `dir` and check it; returns the member's log store and
/// state machine. `history_limit` is the number of past events kept for watches (the same on
/// every member).
///
/// # Errors
/// [`DiskError::CreateDir`], [`DiskError::Open`] (including redb's checksum failures) and
/// [`DiskError::Corrupt`] when the file is not a consistent store.
pub fn open(dir: &Path, history_limit: usize) -> Result<(LogStore, StateMachine)> {
    std::fs::create_dir_all(dir).map_err(|source| DiskError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(DB_FILE);
    let existed = match std::fs::metadata(&path) {
        Ok(meta) if meta.len() == 0 => {
            return Err(DiskError::Corrupt {
                path,
                what: "file is empty".into(),
            });
        }
        Ok(_) => true,
        Err(_) => false,
    };
    let db = Database::builder()
        .set_check_integrity_on_open(true)
        .create(&path)
        .map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
    let disk = Arc::new(Disk {
        db,
        path,
        alive: Arc::new(()),
    });
    let (format, has_tables): (Option<u32>, bool) = disk.read(|txn| {
        let has_tables = txn
            .list_tables()
            .map_err(|e| disk.db_err(e))?
            .next()
            .is_some();
        let format = match txn.open_table(RAFT_META) {
            Ok(_) => disk.get_meta(txn, RAFT_META, FORMAT_KEY)?,
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(disk.db_err(e)),
        };
        Ok((format, has_tables))
    })?;
    match format {
        Some(FORMAT_VERSION) => {}
        Some(other) => return Err(disk.corrupt(format!("unknown format version {other}"))),
        // The tables and the marker are created in one transaction: tables without a marker
        // are someone else's database. A file with no table at all is a creation that was
        // interrupted before its first commit, and is set up anew.
        None if existed && has_tables => {
            return Err(disk.corrupt("no format marker: not a Keelson store".into()));
        }
        None => disk.write(Durability::Immediate, |txn| {
            for table in [RAFT_META, SM_META, KV, SNAPSHOT] {
                txn.open_table(table).map_err(|e| disk.db_err(e))?;
            }
            for table in [LOG, EVENTS] {
                txn.open_table(table).map_err(|e| disk.db_err(e))?;
            }
            disk.put_meta(txn, RAFT_META, FORMAT_KEY, &FORMAT_VERSION)
        })?,
    }
    check_log(&disk)?;
    let state = load_state_machine(&disk, history_limit)?;
    tracing::info!(
        path = %disk.path.display(),
        revision = state.mvcc.revision(),
        applied = ?state.applied,
        "opened store"
    );
    let writer = Writer::start(disk.clone()).map_err(DiskError::StartWriter)?;
    let log = LogStore {
        disk: disk.clone(),
        writer: writer.clone(),
        unflushed: Arc::default(),
    };
    let sm = StateMachine {
        disk,
        writer,
        shared: SharedState {
            inner: Arc::new(RwLock::new(state)),
        },
    };
    Ok((log, sm))
}

fn check_log(disk: &Disk) -> Result<()> {
    let purged: Option<LogId<NodeId>> =
        disk.read(|txn| disk.get_meta(txn, RAFT_META, PURGED_KEY))?;
    let entries = disk.log_entries(..)?;
    let mut expected = purged.map(|p| p.index + 1);
    for entry in &entries {
        if let Some(expected) = expected
            && entry.log_id.index != expected
        {
            return Err(disk.corrupt(format!(
                "log gap: expected index {expected}, found {}",
                entry.log_id.index
            )));
        }
        expected = Some(entry.log_id.index + 1);
    }
    Ok(())
}

fn load_state_machine(disk: &Disk, history_limit: usize) -> Result<SmState> {
    disk.read(|txn| {
        let applied = disk
            .get_meta::<Option<LogId<NodeId>>>(txn, SM_META, APPLIED_KEY)?
            .flatten();
        let membership = disk
            .get_meta::<StoredMembership<NodeId, Node>>(txn, SM_META, MEMBERSHIP_KEY)?
            .unwrap_or_default();
        let revision: Revision = disk.get_meta(txn, SM_META, REVISION_KEY)?.unwrap_or(0);
        let compacted: Revision = disk.get_meta(txn, SM_META, COMPACTED_KEY)?.unwrap_or(0);
        let mut kvs = Vec::new();
        let table = txn.open_table(KV).map_err(|e| disk.db_err(e))?;
        for row in table.iter().map_err(|e| disk.db_err(e))? {
            let (key, value) = row.map_err(|e| disk.db_err(e))?;
            let key = key.value();
            let kv: KeyValue = disk.decode(value.value(), || format!("key {key:?}"))?;
            if kv.key != key || kv.mod_revision > revision || kv.mod_revision == 0 {
                return Err(disk.corrupt(format!(
                    "key row {key:?} holds key {:?} at revision {} (store revision {revision})",
                    kv.key, kv.mod_revision
                )));
            }
            kvs.push(kv);
        }
        let mut history = Vec::new();
        let table = txn.open_table(EVENTS).map_err(|e| disk.db_err(e))?;
        let mut last = compacted;
        for row in table.iter().map_err(|e| disk.db_err(e))? {
            let (key, value) = row.map_err(|e| disk.db_err(e))?;
            let rev = key.value();
            let event: Event = disk.decode(value.value(), || format!("event {rev}"))?;
            if event.revision() != rev || rev <= last || rev > revision {
                return Err(disk.corrupt(format!(
                    "event row {rev} holds revision {} (window {compacted}..={revision})",
                    event.revision()
                )));
            }
            last = rev;
            history.push(event);
        }
        let mvcc = Mvcc::from_state(
            MvccState {
                revision,
                compacted,
                kvs,
                history,
            },
            history_limit,
        );
        Ok(SmState {
            mvcc,
            applied,
            membership,
            watchers: WatchHub::default(),
        })
    })
}

/// The Raft log and vote of one member.
///
/// Appends return at once and are fsynced by the [`Writer`] thread (one fsync for all appends
/// waiting), which then tells openraft through the append's callback; until then the entries
/// are served from `unflushed`. Vote, truncation and purge wait for their own fsync.
#[derive(Debug, Clone)]
pub struct LogStore {
    disk: Arc<Disk>,
    writer: Arc<Writer>,
    /// Appended entries not yet known to be on disk, by index.
    unflushed: Arc<Mutex<BTreeMap<u64, Entry>>>,
}

impl LogStore {
    fn unflushed(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.unflushed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Entries in `range`: the unflushed ones first (an entry leaves that map only once it is
    /// in the database, so looking there second cannot miss it), overriding the database's.
    fn entries(&self, range: impl RangeBounds<u64> + Clone) -> Result<Vec<Entry>> {
        // A scan, not `BTreeMap::range`, which panics on inverted bounds; the map is small.
        let unflushed: Vec<Entry> = self
            .unflushed()
            .iter()
            .filter(|(i, _)| range.contains(*i))
            .map(|(_, e)| e.clone())
            .collect();
        let mut entries: BTreeMap<u64, Entry> = self
            .disk
            .log_entries(range)?
            .into_iter()
            .map(|e| (e.log_id.index, e))
            .collect();
        entries.extend(unflushed.into_iter().map(|e| (e.log_id.index, e)));
        Ok(entries.into_values().collect())
    }
}

fn earlier(e: Arc<DiskError>) -> DiskError {
    DiskError::Earlier(e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        self.entries(range)
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let unflushed_last = self.unflushed().values().next_back().map(|e| e.log_id);
        let disk = &self.disk;
        disk.read(|txn| {
            let purged: Option<LogId<NodeId>> = disk.get_meta(txn, RAFT_META, PURGED_KEY)?;
            let table = txn.open_table(LOG).map_err(|e| disk.db_err(e))?;
            let last = match table.last().map_err(|e| disk.db_err(e))? {
                Some((key, value)) => {
                    let index = key.value();
                    let entry: Entry =
                        disk.decode(value.value(), || format!("log entry {index}"))?;
                    Some(entry.log_id)
                }
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last.max(unflushed_last),
            })
        })
        .map_err(|e| StorageIOError::read_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.writer
            .run(
                true,
                Box::new(move |disk, txn| disk.put_meta(txn, RAFT_META, VOTE_KEY, &vote)),
            )
            .await
            .map_err(|e| StorageIOError::write_vote(&earlier(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        let disk = &self.disk;
        disk.read(|txn| disk.get_meta(txn, RAFT_META, VOTE_KEY))
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not waited for nor fsynced on its own: losing it only means re-learning the commit
        // index.
        self.writer.detach(
            false,
            Box::new(move |disk, txn| disk.put_meta(txn, RAFT_META, COMMITTED_KEY, &committed)),
        );
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let disk = &self.disk;
        disk.read(|txn| disk.get_meta::<Option<LogId<NodeId>>>(txn, RAFT_META, COMMITTED_KEY))
            .map(Option::flatten)
            .map_err(io_read)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let ids: Vec<LogId<NodeId>> = entries.iter().map(|e| e.log_id).collect();
        self.unflushed()
            .extend(entries.iter().map(|e| (e.log_id.index, e.clone())));
        let unflushed = self.unflushed.clone();
        let job: Job = Box::new(move |disk, txn| {
            let mut table = txn.open_table(LOG).map_err(|e| disk.db_err(e))?;
            for entry in entries {
                let bytes = encode(&entry, "log entry")?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(|e| disk.db_err(e))?;
            }
            Ok(())
        });
        let done: Done = Box::new(move |result| {
            if result.is_ok() {
                let mut unflushed = unflushed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                // Only these very entries: a truncation may have replaced them meanwhile.
                for id in ids {
                    if unflushed.get(&id.index).map(|e| e.log_id) == Some(id) {
                        unflushed.remove(&id.index);
                    }
                }
            }
            callback.log_io_completed(result.map_err(|e| std::io::Error::other(e.to_string())));
        });
        self.writer.submit(true, job, done);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.unflushed().retain(|&index, _| index < log_id.index);
        // Queued after the appends it undoes, so it also removes what they write.
        let job: Job = Box::new(move |disk, txn| {
            let mut table = txn.open_table(LOG).map_err(|e| disk.db_err(e))?;
            table
                .retain_in(log_id.index.., |_, _| false)
                .map_err(|e| disk.db_err(e))
        });
        self.writer
            .run(true, job)
            .await
            .map_err(|e| io_write_logs(earlier(e)))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // openraft purges only flushed entries; this is for the map to stay small regardless.
        self.unflushed().retain(|&index, _| index > log_id.index);
        // Queued after every state machine write before it and fsynced: the applied state the
        // purged entries led to is durable before they are gone.
        let job: Job = Box::new(move |disk, txn| {
            disk.put_meta(txn, RAFT_META, PURGED_KEY, &log_id)?;
            let mut table = txn.open_table(LOG).map_err(|e| disk.db_err(e))?;
            table
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(|e| disk.db_err(e))
        });
        self.writer
            .run(true, job)
            .await
            .map_err(|e| io_write_logs(earlier(e)))
    }
}

/// The applied state of one member, in memory, kept in step with the database.
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
    disk: Arc<Disk>,
    writer: Arc<Writer>,
    shared: SharedState,
}

/// Tells whether the database file of a member is still open.
#[derive(Debug, Clone)]
pub struct OpenGuard(std::sync::Weak<()>);

impl OpenGuard {
    /// Whether some log store, state machine or snapshot builder still holds the file open.
    pub fn is_open(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl StateMachine {
    /// A handle that tells when the database file is closed (all users dropped).
    pub fn open_guard(&self) -> OpenGuard {
        OpenGuard(Arc::downgrade(&self.disk.alive))
    }

    /// A handle for local reads and watches.
    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    /// Apply `entries` in memory and queue their rows for the writer thread, without waiting:
    /// the state machine is made durable by the next fsynced commit (an append or a purge), and
    /// after a crash openraft re-applies the log after the last applied entry on disk.
    fn apply_entries(&self, entries: Vec<Entry>) -> Result<Vec<Vec<WriteResult>>> {
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
        let mut kv_rows = Vec::with_capacity(events.len());
        let mut event_rows = Vec::with_capacity(events.len());
        for event in &events {
            let kv = match event.kind {
                EventKind::Put => Some(encode(&event.kv, "key")?),
                EventKind::Delete => None,
            };
            kv_rows.push((event.kv.key.clone(), kv));
            event_rows.push((event.revision(), encode(event, "event")?));
        }
        let meta = SmMeta::of(state);
        self.writer.detach(
            false,
            Box::new(move |disk, txn| {
                let mut kv_table = txn.open_table(KV).map_err(|e| disk.db_err(e))?;
                for (key, kv) in &kv_rows {
                    match kv {
                        Some(bytes) => kv_table.insert(key.as_str(), bytes.as_slice()),
                        None => kv_table.remove(key.as_str()),
                    }
                    .map_err(|e| disk.db_err(e))?;
                }
                let mut event_table = txn.open_table(EVENTS).map_err(|e| disk.db_err(e))?;
                for (revision, bytes) in &event_rows {
                    event_table
                        .insert(revision, bytes.as_slice())
                        .map_err(|e| disk.db_err(e))?;
                }
                event_table
                    .retain_in(..=meta.compacted, |_, _| false)
                    .map_err(|e| disk.db_err(e))?;
                drop(kv_table);
                drop(event_table);
                meta.save(disk, txn)
            }),
        );
        state.watchers.publish(&events);
        Ok(responses)
    }

    async fn install(&self, meta: &SnapshotMeta<NodeId, Node>, data: &[u8]) -> Result<()> {
        let mvcc_state: MvccState =
            postcard::from_bytes(data).map_err(|source| DiskError::Snapshot {
                id: meta.snapshot_id.clone(),
                source,
            })?;
        let history_limit = self.shared.read().mvcc.history_limit();
        let mvcc = Mvcc::from_state(mvcc_state, history_limit);
        let full = mvcc.to_state();
        let kv_rows = full
            .kvs
            .iter()
            .map(|kv| Ok((kv.key.clone(), encode(kv, "key")?)))
            .collect::<Result<Vec<_>>>()?;
        let event_rows = full
            .history
            .iter()
            .map(|event| Ok((event.revision(), encode(event, "event")?)))
            .collect::<Result<Vec<_>>>()?;
        let sm_meta = SmMeta {
            applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            revision: mvcc.revision(),
            compacted: mvcc.compacted_revision(),
        };
        let snapshot_meta = meta.clone();
        let data = data.to_vec();
        // Queued after every earlier apply, so none of them can overwrite what this installs.
        let job: Job = Box::new(move |disk, txn| {
            txn.delete_table(KV).map_err(|e| disk.db_err(e))?;
            txn.delete_table(EVENTS).map_err(|e| disk.db_err(e))?;
            let mut kv_table = txn.open_table(KV).map_err(|e| disk.db_err(e))?;
            for (key, bytes) in &kv_rows {
                kv_table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| disk.db_err(e))?;
            }
            let mut event_table = txn.open_table(EVENTS).map_err(|e| disk.db_err(e))?;
            for (revision, bytes) in &event_rows {
                event_table
                    .insert(revision, bytes.as_slice())
                    .map_err(|e| disk.db_err(e))?;
            }
            drop(kv_table);
            drop(event_table);
            sm_meta.save(disk, txn)?;
            disk.put_meta(txn, SNAPSHOT, SNAPSHOT_META_KEY, &snapshot_meta)?;
            let mut snap = txn.open_table(SNAPSHOT).map_err(|e| disk.db_err(e))?;
            snap.insert(SNAPSHOT_DATA_KEY, data.as_slice())
                .map_err(|e| disk.db_err(e))?;
            Ok(())
        });
        self.writer.run(true, job).await.map_err(earlier)?;
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

/// The state machine's bookkeeping rows, as of some applied entry.
struct SmMeta {
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    revision: Revision,
    compacted: Revision,
}

impl SmMeta {
    fn of(state: &SmState) -> Self {
        SmMeta {
            applied: state.applied,
            membership: state.membership.clone(),
            revision: state.mvcc.revision(),
            compacted: state.mvcc.compacted_revision(),
        }
    }

    fn save(&self, disk: &Disk, txn: &WriteTransaction) -> Result<()> {
        disk.put_meta(txn, SM_META, APPLIED_KEY, &self.applied)?;
        disk.put_meta(txn, SM_META, MEMBERSHIP_KEY, &self.membership)?;
        disk.put_meta(txn, SM_META, REVISION_KEY, &self.revision)?;
        disk.put_meta(txn, SM_META, COMPACTED_KEY, &self.compacted)
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        let last = entries.last().map(|e| e.log_id);
        self.apply_entries(entries).map_err(|e| match last {
            Some(log_id) => StorageIOError::apply(log_id, &e).into(),
            None => StorageIOError::write_state_machine(&e).into(),
        })
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            writer: self.writer.clone(),
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
        self.install(meta, snapshot.get_ref())
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let disk = &self.disk;
        disk.read(|txn| {
            let Some(meta) =
                disk.get_meta::<SnapshotMeta<NodeId, Node>>(txn, SNAPSHOT, SNAPSHOT_META_KEY)?
            else {
                return Ok(None);
            };
            let table = txn.open_table(SNAPSHOT).map_err(|e| disk.db_err(e))?;
            let Some(data) = table.get(SNAPSHOT_DATA_KEY).map_err(|e| disk.db_err(e))? else {
                return Err(disk.corrupt("snapshot metadata without data".into()));
            };
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data.value().to_vec())),
            }))
        })
        .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}

/// Builds snapshots of the state machine from a consistent in-memory copy.
#[derive(Debug)]
pub struct SnapshotBuilder {
    writer: Arc<Writer>,
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
        let result = match encode(&mvcc_state, "snapshot") {
            Ok(data) => {
                let (stored, stored_meta) = (data.clone(), meta.clone());
                let job: Job = Box::new(move |disk, txn| {
                    disk.put_meta(txn, SNAPSHOT, SNAPSHOT_META_KEY, &stored_meta)?;
                    let mut table = txn.open_table(SNAPSHOT).map_err(|e| disk.db_err(e))?;
                    table
                        .insert(SNAPSHOT_DATA_KEY, stored.as_slice())
                        .map_err(|e| disk.db_err(e))?;
                    Ok(())
                });
                self.writer
                    .run(false, job)
                    .await
                    .map(|()| data)
                    .map_err(earlier)
            }
            Err(e) => Err(e),
        };
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
mod tests {
    use std::collections::BTreeMap;

    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, Membership};

    use super::*;
    use crate::store::mvcc::{Command, Outcome, RangeRequest};

    struct TempStoreBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for TempStoreBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let (log, sm) = open(dir.path(), 100).map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(TempStoreBuilder).expect("openraft storage suite");
    }

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn put_entry(index: u64, key: &str, value: &[u8]) -> Entry {
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(vec![Command::Put {
                key: key.into(),
                value: value.to_vec(),
            }]),
        }
    }

    fn membership_entry(index: u64) -> Entry {
        let nodes = BTreeMap::from([(1, Node::new("127.0.0.1:1"))]);
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Membership(Membership::new(vec![[1].into()], nodes)),
        }
    }

    async fn write_log(log: &mut LogStore, entries: Vec<Entry>) {
        log.blocking_append(entries).await.expect("append");
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entries = vec![
            membership_entry(1),
            put_entry(2, "/a", b"1"),
            put_entry(3, "/b", b"2"),
            put_entry(4, "/a", b"3"),
        ];
        {
            let (mut log, mut sm) = open(dir.path(), 2).expect("open");
            write_log(&mut log, entries.clone()).await;
            let results = sm.apply(entries.clone()).await.expect("apply");
            assert_eq!(results[0], []);
            assert!(matches!(
                results[3].as_slice(),
                [WriteResult {
                    revision: 3,
                    outcome: Outcome::Applied { .. }
                }]
            ));
            log.save_vote(&Vote::new(1, 1)).await.expect("vote");
        }
        let (mut log, mut sm) = open(dir.path(), 2).expect("reopen");
        assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new(1, 1)));
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_log_id, Some(log_id(4)));
        assert_eq!(
            log.try_get_log_entries(1..5).await.expect("entries"),
            entries
        );
        let (applied, membership) = sm.applied_state().await.expect("applied");
        assert_eq!(applied, Some(log_id(4)));
        assert_eq!(membership.log_id(), &Some(log_id(1)));
        let shared = sm.shared();
        let guard = shared.read();
        assert_eq!(guard.mvcc.revision(), 3);
        assert_eq!(guard.mvcc.compacted_revision(), 1);
        let all = guard.mvcc.range(&RangeRequest::default()).expect("range");
        let values: Vec<_> = all
            .kvs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone()))
            .collect();
        assert_eq!(values, [("/a", b"3".to_vec()), ("/b", b"2".to_vec())]);
        let revs: Vec<_> = guard
            .mvcc
            .events_after(1)
            .expect("events")
            .iter()
            .map(Event::revision)
            .collect();
        assert_eq!(revs, [2, 3]);
    }

    #[tokio::test]
    async fn snapshot_installs_on_another_member() {
        let source_dir = tempfile::tempdir().expect("tempdir");
        let target_dir = tempfile::tempdir().expect("tempdir");
        let (_log, mut source) = open(source_dir.path(), 10).expect("open");
        source
            .apply(vec![
                membership_entry(1),
                put_entry(2, "/x", b"x"),
                put_entry(3, "/y", b"y"),
            ])
            .await
            .expect("apply");
        let snapshot = source
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(3)));

        let (_tlog, mut target) = open(target_dir.path(), 10).expect("open target");
        target
            .apply(vec![put_entry(1, "/stale", b"s")])
            .await
            .expect("apply");
        let mut watch = {
            let shared = target.shared();
            let mut guard = shared.write();
            let backlog = guard.mvcc.events_after(1).expect("events");
            guard.watchers.register(String::new(), 1, backlog, 8)
        };
        target
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .expect("install");
        drop(target);
        drop(_tlog);
        // Revision 1 is still inside the new history window: the watcher sees events 2.
        assert_eq!(watch.next().await.map(|e| e.revision()), Some(2));
        let (_tlog, mut target) = open(target_dir.path(), 10).expect("reopen target");
        let (applied, _) = target.applied_state().await.expect("applied");
        assert_eq!(applied, Some(log_id(3)));
        let current = target
            .get_current_snapshot()
            .await
            .expect("snapshot")
            .expect("some");
        assert_eq!(current.meta, snapshot.meta);
        let shared = target.shared();
        let guard = shared.read();
        assert_eq!(guard.mvcc.get("/stale", None), Ok(None));
        assert_eq!(
            guard.mvcc.get("/y", None).expect("get").map(|kv| kv.value),
            Some(b"y".to_vec())
        );
    }

    fn write_sample(dir: &Path) {
        let (mut log, mut sm) = open(dir, 10).expect("open");
        let entries = vec![put_entry(1, "/k", b"UNIQUE-PAYLOAD-0123456789-ABCDEFGHIJ")];
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(async {
                write_log(&mut log, entries.clone()).await;
                sm.apply(entries).await.expect("apply");
            });
    }

    #[test]
    fn empty_file_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(DB_FILE), b"").expect("write");
        let err = open(dir.path(), 10).expect_err("empty file");
        assert!(matches!(err, DiskError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn truncated_file_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_sample(dir.path());
        let path = dir.path().join(DB_FILE);
        let len = std::fs::metadata(&path).expect("metadata").len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(len / 2).expect("truncate");
        drop(file);
        let err = open(dir.path(), 10).expect_err("truncated file");
        assert!(
            matches!(err, DiskError::Open { .. } | DiskError::Corrupt { .. }),
            "{err}"
        );
    }

    #[test]
    fn flipped_bytes_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_sample(dir.path());
        let path = dir.path().join(DB_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        let needle = b"UNIQUE-PAYLOAD";
        let positions: Vec<usize> = bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| w == needle)
            .map(|(i, _)| i)
            .collect();
        assert!(!positions.is_empty(), "sample value not found in the file");
        for pos in positions {
            bytes[pos + 3] ^= 0xff;
        }
        std::fs::write(&path, &bytes).expect("write");
        let err = open(dir.path(), 10).expect_err("corrupted file");
        assert!(
            matches!(err, DiskError::Open { .. } | DiskError::Corrupt { .. }),
            "{err}"
        );
    }

    #[test]
    fn undecodable_row_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_sample(dir.path());
        {
            let db = Database::create(dir.path().join(DB_FILE)).expect("open raw");
            let txn = db.begin_write().expect("txn");
            {
                let mut table = txn.open_table(LOG).expect("table");
                table
                    .insert(2u64, [0xffu8, 0xff, 0xff].as_slice())
                    .expect("insert");
            }
            txn.commit().expect("commit");
        }
        let err = open(dir.path(), 10).expect_err("garbage row");
        assert!(
            matches!(&err, DiskError::Corrupt { what, .. } if what.contains("log entry 2")),
            "{err}"
        );
    }

    #[test]
    fn interrupted_creation_is_set_up_anew() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Database::create(dir.path().join(DB_FILE)).expect("create"));
        let (_log, sm) = open(dir.path(), 10).expect("open a file without tables");
        assert_eq!(sm.shared().revision(), 0);
    }

    #[test]
    fn foreign_database_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = Database::create(dir.path().join(DB_FILE)).expect("create");
            let txn = db.begin_write().expect("txn");
            txn.open_table(TableDefinition::<u64, u64>::new("other"))
                .expect("table");
            txn.commit().expect("commit");
        }
        let err = open(dir.path(), 10).expect_err("foreign file");
        assert!(matches!(err, DiskError::Corrupt { .. }), "{err}");
    }
}
