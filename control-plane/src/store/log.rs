//! The Raft log store of one member: entries, vote and commit index in the write-ahead log
//! (`wal.rs`), written by the writer thread (`writer.rs`).
//!
//! In memory it keeps where every live entry lies on disk and the most recent entries
//! themselves (what replication reads), so that appends and the replication that follows them
//! never read the disk. Appends are encoded and placed here, on the caller's task, then handed to
//! the writer thread: they return at once and openraft learns through the append's callback
//! when they are durable (one fdatasync for all appends waiting).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};

use crate::store::storage::{DataDir, DiskError, Result};
use crate::store::types::{Entry, NodeId, TypeConfig};
use crate::store::wal::{self, RecordRef, Replayed, SegmentStart, Slot};
use crate::store::writer::{Done, Files, Op, Writer};

/// Encoded bytes of recent entries kept in memory beyond those not yet written.
const CACHE_BYTES: u64 = 32 << 20;

/// The log of one member; clones share it (openraft's readers are clones).
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Dropped first: joins the writer thread, so the files are closed before `dir` goes.
    writer: Writer,
    files: Arc<Files>,
    state: Mutex<State>,
    _dir: Arc<DataDir>,
}

#[derive(Debug)]
struct State {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// `committed` changed since its last record: it goes out with the next write.
    committed_unwritten: bool,
    purged: Option<LogId<NodeId>>,
    /// Index of the first live entry (after the purge point, or where an empty log started).
    first: u64,
    /// Where each live entry lies.
    slots: VecDeque<Slot>,
    /// The most recent entries (a suffix of the log) with their encoded sizes.
    cache: VecDeque<(Entry, u64)>,
    cache_bytes: u64,
    /// Segments on disk (or queued for creation) and their sizes.
    segments: BTreeMap<u64, u64>,
    /// Where the next record goes in the last segment.
    end: u64,
    segment_bytes: u64,
}

/// Records placed in the log and not yet handed to the writer.
struct Pending {
    ops: Vec<Op>,
    buf: Vec<u8>,
    /// Segment and offset of `buf`'s first byte.
    at: (u64, u64),
}

impl Pending {
    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let (seq, offset) = self.at;
            self.ops.push(Op::Write {
                seq,
                offset,
                bytes: std::mem::take(&mut self.buf),
            });
        }
    }
}

impl State {
    fn first(&self) -> u64 {
        self.first
    }

    fn next(&self) -> u64 {
        self.first() + self.slots.len() as u64
    }

    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.slots.back().map(|s| s.log_id).or(self.purged)
    }

    fn tail(&self) -> u64 {
        self.segments.keys().next_back().copied().unwrap_or(0)
    }

    /// Start placing records; a commit index not yet written goes first.
    fn begin(&mut self) -> Result<Pending> {
        let mut pending = Pending {
            ops: Vec::new(),
            buf: Vec::new(),
            at: (self.tail(), self.end),
        };
        if self.committed_unwritten {
            let committed = self.committed;
            self.place(&mut pending, &RecordRef::Committed(&committed))?;
            self.committed_unwritten = false;
        }
        Ok(pending)
    }

    /// Place `record` at the end of the log (in a new segment if the last one is full);
    /// returns its segment, offset and length. Called before the record's effect is applied
    /// to this state, so that a new segment's start record describes the log before it.
    fn place(&mut self, pending: &mut Pending, record: &RecordRef<'_>) -> Result<(u64, u64, u64)> {
        let start = pending.buf.len();
        let len = wal::encode_record(record, &mut pending.buf)?;
        let tail = self.tail();
        let size = self.segments.get(&tail).copied().unwrap_or(0);
        if !wal::fits(self.end, len, size) {
            let bytes = pending.buf.split_off(start);
            pending.flush();
            let seq = tail + 1;
            let size = wal::segment_size(len, self.segment_bytes);
            let head = wal::segment_head(&SegmentStart {
                seq,
                size,
                vote: self.vote,
                committed: self.committed,
                purged: self.purged,
                first: self.first,
                last: self.last_log_id(),
            })?;
            self.end = head.len() as u64;
            self.segments.insert(seq, size);
            pending.ops.push(Op::Create { seq, size, head });
            pending.buf = bytes;
            pending.at = (seq, self.end);
        }
        let offset = self.end;
        self.end += len;
        Ok((self.tail(), offset, len))
    }

    /// Drop the entries from `index` on.
    fn truncate(&mut self, pending: &mut Pending, index: u64) -> Result<()> {
        self.place(pending, &RecordRef::Truncate(index))?;
        let keep = index.saturating_sub(self.first()) as usize;
        let before = self.slots.len();
        self.slots.truncate(keep);
        // Cached entries are a suffix of the slots: drop those past the new end.
        for _ in 0..(before - self.slots.len()).min(self.cache.len()) {
            if let Some((_, bytes)) = self.cache.pop_back() {
                self.cache_bytes -= bytes;
            }
        }
        Ok(())
    }

    /// Drop cached entries beyond the budget that are already written.
    fn trim_cache(&mut self, written: (u64, u64)) {
        let first_slot = self.slots.len() - self.cache.len();
        let mut evict = 0;
        while self.cache_bytes > CACHE_BYTES && evict < self.cache.len() {
            let slot = &self.slots[first_slot + evict];
            if (slot.seq, slot.offset + slot.len) > written {
                break;
            }
            self.cache_bytes -= self.cache[evict].1;
            evict += 1;
        }
        self.cache.drain(..evict);
    }

    /// Keep the cache a suffix of the live slots.
    fn drop_cache_beyond(&mut self) {
        while self.cache.len() > self.slots.len() {
            if let Some((_, bytes)) = self.cache.pop_front() {
                self.cache_bytes -= bytes;
            }
        }
    }
}

fn write_err(e: impl Into<Arc<DiskError>>) -> StorageError<NodeId> {
    let e: Arc<DiskError> = e.into();
    StorageIOError::write_logs(&DiskError::Earlier(e)).into()
}

impl LogStore {
    /// The log as replayed from `replayed`, written from now on by a new writer thread.
    pub(crate) fn start(
        dir: Arc<DataDir>,
        replayed: Replayed,
        segment_bytes: u64,
    ) -> Result<LogStore> {
        let (tail, end) = (replayed.segments.last().map_or(0, |s| s.seq), replayed.end);
        let segments = replayed.segments.iter().map(|s| (s.seq, s.size)).collect();
        let files = Arc::new(Files::new(
            dir.wal_dir(),
            replayed
                .segments
                .into_iter()
                .map(|s| (s.seq, s.file))
                .collect(),
            (tail, end),
        ));
        let writer = Writer::start(files.clone()).map_err(DiskError::StartWriter)?;
        let state = State {
            vote: replayed.vote,
            committed: replayed.committed,
            committed_unwritten: false,
            purged: replayed.purged,
            first: replayed.first,
            slots: replayed.slots,
            cache: VecDeque::new(),
            cache_bytes: 0,
            segments,
            end,
            segment_bytes,
        };
        let log = LogStore {
            inner: Arc::new(Inner {
                writer,
                files,
                state: Mutex::new(state),
                _dir: dir,
            }),
        };
        log.remove_purged_segments();
        Ok(log)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Entries in `range` that the log holds, in order.
    fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>> {
        let (disk_slots, cached) = {
            let state = self.state();
            let first = state.first();
            let next = state.next();
            let from = match range.start_bound() {
                Bound::Included(&i) => i,
                Bound::Excluded(&i) => i.saturating_add(1),
                Bound::Unbounded => first,
            }
            .max(first);
            let to = match range.end_bound() {
                Bound::Included(&i) => i.saturating_add(1),
                Bound::Excluded(&i) => i,
                Bound::Unbounded => next,
            }
            .min(next);
            if from >= to {
                return Ok(Vec::new());
            }
            let cache_first = next - state.cache.len() as u64;
            let disk_to = to.min(cache_first);
            let disk_slots: Vec<Slot> = (from..disk_to)
                .map(|i| state.slots[(i - first) as usize])
                .collect();
            let cached: Vec<Entry> = (from.max(cache_first)..to)
                .map(|i| state.cache[(i - cache_first) as usize].0.clone())
                .collect();
            (disk_slots, cached)
        };
        let mut entries = Vec::with_capacity(disk_slots.len() + cached.len());
        for group in disk_slots.chunk_by(|a, b| a.seq == b.seq && a.offset + a.len == b.offset) {
            let seq = group[0].seq;
            let file = self
                .inner
                .files
                .get(seq)
                .ok_or_else(|| DiskError::Corrupt {
                    path: self.inner.files.path(seq),
                    what: format!("segment of log entry {} is gone", group[0].log_id),
                })?;
            entries.extend(wal::read_entries(
                &file,
                || self.inner.files.path(seq),
                group,
            )?);
        }
        entries.extend(cached);
        Ok(entries)
    }

    /// Write the records `place` places (it also updates the state) and wait until they are
    /// durable.
    async fn write_record(
        &self,
        place: impl FnOnce(&mut State, &mut Pending) -> Result<()>,
    ) -> Result<(), Arc<DiskError>> {
        let ops = {
            let mut state = self.state();
            let mut pending = state.begin().map_err(Arc::new)?;
            place(&mut state, &mut pending).map_err(Arc::new)?;
            pending.flush();
            pending.ops
        };
        self.inner.writer.run(ops, true).await
    }

    /// Delete the segments holding only purged entries (never the last one).
    fn remove_purged_segments(&self) {
        let ops: Vec<Op> = {
            let mut state = self.state();
            let keep_from = state.slots.front().map_or(state.tail(), |s| s.seq);
            let removable: Vec<u64> = state.segments.range(..keep_from).map(|(s, _)| *s).collect();
            for seq in &removable {
                state.segments.remove(seq);
            }
            removable
                .into_iter()
                .map(|seq| Op::Remove { seq })
                .collect()
        };
        if !ops.is_empty() {
            self.inner.writer.submit(ops, false, None);
        }
    }
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
        let state = self.state();
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: state.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.write_record(|state, pending| {
            state.place(pending, &RecordRef::Vote(&vote))?;
            state.vote = Some(vote);
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_vote(&DiskError::Earlier(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.state().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Written with the next record and durable with the next sync: no disk work (nor a
        // wake-up of the writer) per commit. Losing it only means re-learning the commit index
        // from the leader.
        let mut state = self.state();
        state.committed = committed;
        state.committed_unwritten = true;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.state().committed)
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
        let ops = {
            let mut state = self.state();
            let mut pending = state.begin().map_err(|e| StorageIOError::write_logs(&e))?;
            for entry in entries {
                // An empty log may start at any index past its purge point.
                let index = entry.log_id.index;
                if index < state.purged.map_or(0, |p| p.index + 1) {
                    // Already in the snapshot: the log no longer holds such entries.
                    continue;
                }
                // openraft truncates before it overwrites; an overwrite implies it anyway.
                if index < state.next() {
                    let from = index.max(state.first());
                    state
                        .truncate(&mut pending, from)
                        .map_err(|e| StorageIOError::write_logs(&e))?;
                }
                // An empty log may start anywhere past its purge point.
                if state.slots.is_empty() {
                    state.first = index;
                }
                if index != state.next() {
                    return Err(StorageIOError::write_logs(&DiskError::Gap {
                        index: entry.log_id.index,
                        expected: state.next(),
                    })
                    .into());
                }
                let (seq, offset, len) = state
                    .place(&mut pending, &RecordRef::Entry(&entry))
                    .map_err(|e| StorageIOError::write_logs(&e))?;
                state.slots.push_back(Slot {
                    log_id: entry.log_id,
                    seq,
                    offset,
                    len,
                });
                state.cache.push_back((entry, len));
                state.cache_bytes += len;
            }
            pending.flush();
            let written = self.inner.files.written();
            state.trim_cache(written);
            pending.ops
        };
        let done: Done = Box::new(move |result| {
            callback.log_io_completed(result.map_err(|e| std::io::Error::other(e.to_string())));
        });
        self.inner.writer.submit(ops, true, Some(done));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write_record(|state, pending| state.truncate(pending, log_id.index))
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write_record(|state, pending| {
            state.place(pending, &RecordRef::Purge(&log_id))?;
            let drop = (log_id.index + 1).saturating_sub(state.first()) as usize;
            let drop = drop.min(state.slots.len());
            state.slots.drain(..drop);
            state.first = state.first.max(log_id.index + 1);
            state.purged = Some(log_id);
            state.drop_cache_beyond();
            Ok(())
        })
        .await
        .map_err(write_err)?;
        // The purge is durable: the segments it emptied can go.
        self.remove_purged_segments();
        Ok(())
    }
}
