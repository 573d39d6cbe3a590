//! The on-disk format of a member's Raft log: a write-ahead log of checksummed records in
//! preallocated segment files (`wal/<seq>.wal`), and its replay at start.
//!
//! A segment starts with a file header (magic, format version) and a [`Record::Start`] carrying
//! the log's state when the segment was created (vote, commit index, purge point, last log id),
//! so that older segments can be deleted once their entries are purged. Every record is
//! `[payload length u32 LE][crc32 of the payload u32 LE][postcard payload]`; an all-zero header
//! marks the end (segments are preallocated, so unwritten space reads as zeros).
//!
//! Torn writes: a crash during an unsynced write can leave the last segment's tail partly
//! written. As in etcd, a record whose checksum fails counts as torn only if it lies in the last
//! segment and one of its 512-byte sectors is all zeros (or it runs past the end of the file);
//! it and everything after it were never acknowledged, so they are zeroed and the log ends
//! before it. Any other damaged record, a short (truncated) segment, a missing segment or a gap
//! in the entries is reported as [`DiskError::Corrupt`].

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, fallocate};
use openraft::{LogId, Vote};
use serde::{Deserialize, Serialize};

use crate::store::storage::{DiskError, Result};
use crate::store::types::{Entry, NodeId};

/// First bytes of every segment.
const MAGIC: &[u8; 8] = b"KLSNWAL\n";
/// Version of the segment format, after the magic (u32 LE, then 4 reserved bytes).
const FORMAT_VERSION: u32 = 2;
/// Bytes of the file header.
const FILE_HEADER: u64 = 16;
/// Bytes of a record header (length and checksum).
pub(crate) const RECORD_HEADER: u64 = 8;
/// Default preallocated size of a segment.
pub(crate) const SEGMENT_BYTES: u64 = 16 << 20;
/// Room reserved for a segment's header and start record when sizing it.
const HEAD_ROOM: u64 = 4096;
/// Largest record accepted when reading.
const MAX_RECORD: u64 = 1 << 31;
/// Sector size for telling torn writes from corruption.
const SECTOR: u64 = 512;

/// A segment's file name.
pub(crate) fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The log's state when a segment was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SegmentStart {
    /// The segment's sequence number (its file name).
    pub(crate) seq: u64,
    /// Preallocated size of the file.
    pub(crate) size: u64,
    pub(crate) vote: Option<Vote<NodeId>>,
    pub(crate) committed: Option<LogId<NodeId>>,
    pub(crate) purged: Option<LogId<NodeId>>,
    /// Index of the first live entry (or of the next entry of an empty log).
    pub(crate) first: u64,
    /// The last log id before this segment's first record (an entry's or the purge point).
    pub(crate) last: Option<LogId<NodeId>>,
}

/// A record as read back.
#[derive(Debug, Deserialize)]
pub(crate) enum Record {
    Start(SegmentStart),
    Entry(Entry),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
    /// Entries from this index on are gone.
    Truncate(u64),
    /// Entries up to this log id are gone.
    Purge(LogId<NodeId>),
}

/// A record to write: encodes exactly as the [`Record`] variant of the same name.
#[derive(Debug, Serialize)]
pub(crate) enum RecordRef<'a> {
    Start(&'a SegmentStart),
    Entry(&'a Entry),
    Vote(&'a Vote<NodeId>),
    Committed(&'a Option<LogId<NodeId>>),
    Truncate(u64),
    Purge(&'a LogId<NodeId>),
}

/// Append `record`, framed, to `buf`; returns its length on disk.
pub(crate) fn encode_record(record: &RecordRef<'_>, buf: &mut Vec<u8>) -> Result<u64> {
    let start = buf.len();
    buf.extend_from_slice(&[0; RECORD_HEADER as usize]);
    if let Err(source) = postcard::to_io(record, &mut *buf) {
        buf.truncate(start);
        return Err(DiskError::Encode {
            what: "log record",
            source,
        });
    }
    let payload = &buf[start + RECORD_HEADER as usize..];
    let Ok(len) = u32::try_from(payload.len()) else {
        let len = payload.len();
        buf.truncate(start);
        return Err(DiskError::TooLarge(len));
    };
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok((buf.len() - start) as u64)
}

/// The file header and start record of a new segment.
pub(crate) fn segment_head(start: &SegmentStart) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    head.extend_from_slice(&[0; 4]);
    encode_record(&RecordRef::Start(start), &mut head)?;
    Ok(head)
}

/// The size of a new segment that must hold `payload` bytes of records after its head.
pub(crate) fn segment_size(payload: u64, segment_bytes: u64) -> u64 {
    segment_bytes.max((FILE_HEADER + HEAD_ROOM + payload).next_multiple_of(4096))
}

/// Whether a segment of `size` bytes whose records end at `end` has room for `len` more bytes.
pub(crate) fn fits(end: u64, len: u64, size: u64) -> bool {
    end + len <= size
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_path_buf();
    move |source| DiskError::Io { path, op, source }
}

/// Make the directory's entries (created or renamed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "syncing directory"))
}

/// Create segment `seq` of `size` bytes in `dir` starting with `head` (see [`segment_head`]):
/// written under a temporary name, preallocated, synced, then renamed into place, so that a
/// segment file under its final name is always whole.
pub(crate) fn create_segment(dir: &Path, seq: u64, size: u64, head: &[u8]) -> Result<File> {
    let path = dir.join(segment_name(seq));
    let tmp = dir.join(format!("{}.tmp", segment_name(seq)));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp, "creating"))?;
    file.write_all_at(head, 0)
        .map_err(io_err(&tmp, "writing"))?;
    let len = i64::try_from(size).map_err(|_| DiskError::TooLarge(usize::MAX))?;
    // Allocated up front so that appends do not change the file's size: an fdatasync then
    // has no metadata to write. Filesystems without fallocate get a sparse file.
    if fallocate(&file, FallocateFlags::empty(), 0, len).is_err() {
        file.set_len(size).map_err(io_err(&tmp, "sizing"))?;
    }
    file.sync_all().map_err(io_err(&tmp, "syncing"))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path, "renaming into place"))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Where an entry's record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) log_id: LogId<NodeId>,
    pub(crate) seq: u64,
    /// Offset of the record (its header) in the segment.
    pub(crate) offset: u64,
    /// Length of the record, header included.
    pub(crate) len: u64,
}

/// An open segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) seq: u64,
    pub(crate) file: File,
    pub(crate) size: u64,
}

/// The log as replayed from disk.
#[derive(Debug)]
pub(crate) struct Replayed {
    pub(crate) vote: Option<Vote<NodeId>>,
    pub(crate) committed: Option<LogId<NodeId>>,
    pub(crate) purged: Option<LogId<NodeId>>,
    /// Index of the first live entry.
    pub(crate) first: u64,
    /// Live entries.
    pub(crate) slots: VecDeque<Slot>,
    /// Every segment, oldest first; the last one is written next.
    pub(crate) segments: Vec<Segment>,
    /// Where the next record goes in the last segment.
    pub(crate) end: u64,
}

/// The log's state while records are replayed; entries of deleted segments are placeholders
/// (`None`) until a purge record covers them.
struct Replay {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
    first: u64,
    slots: VecDeque<Option<Slot>>,
}

fn next_index(id: Option<LogId<NodeId>>) -> u64 {
    id.map_or(0, |id| id.index + 1)
}

impl Replay {
    fn new(start: &SegmentStart) -> Self {
        let first = start.first;
        let missing = next_index(start.last).saturating_sub(first);
        Replay {
            vote: start.vote,
            committed: start.committed,
            purged: start.purged,
            first,
            slots: std::iter::repeat_n(None, missing as usize).collect(),
        }
    }

    /// The last log id, if known (unknown while the last entry is a placeholder).
    fn last(&self) -> Result<Option<LogId<NodeId>>, ()> {
        match self.slots.back() {
            Some(Some(slot)) => Ok(Some(slot.log_id)),
            Some(None) => Err(()),
            None => Ok(self.purged),
        }
    }

    fn next(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    fn apply(&mut self, record: Record, seq: u64, offset: u64, len: u64) -> Result<(), String> {
        match record {
            Record::Start(start) => {
                if start.seq != seq {
                    return Err(format!("start record names segment {}", start.seq));
                }
                if let Ok(last) = self.last()
                    && last != start.last
                {
                    return Err(format!(
                        "segment starts after log id {:?} but the log before it ends at {last:?}",
                        start.last
                    ));
                }
            }
            Record::Entry(entry) => {
                let log_id = entry.log_id;
                if log_id.index < next_index(self.purged) {
                    return Err(format!("entry {log_id} at or before the purge point"));
                }
                // An empty log may start anywhere past its purge point.
                if self.slots.is_empty() {
                    self.first = log_id.index;
                }
                if log_id.index != self.next() {
                    return Err(format!(
                        "entry {log_id} where index {} was expected",
                        self.next()
                    ));
                }
                if let Ok(Some(last)) = self.last()
                    && log_id < last
                {
                    return Err(format!("entry {log_id} follows entry {last}"));
                }
                self.slots.push_back(Some(Slot {
                    log_id,
                    seq,
                    offset,
                    len,
                }));
            }
            Record::Vote(vote) => self.vote = Some(vote),
            Record::Committed(committed) => self.committed = committed,
            Record::Truncate(index) => {
                if index < self.first || index > self.next() {
                    return Err(format!(
                        "truncation at {index} outside the log {}..{}",
                        self.first,
                        self.next()
                    ));
                }
                self.slots.truncate((index - self.first) as usize);
            }
            Record::Purge(log_id) => {
                if Some(log_id) < self.purged {
                    return Err(format!(
                        "purge to {log_id} after purge to {:?}",
                        self.purged
                    ));
                }
                let drop = (log_id.index + 1).saturating_sub(self.first);
                if drop >= self.slots.len() as u64 {
                    self.slots.clear();
                } else {
                    self.slots.drain(..drop as usize);
                }
                self.first = self.first.max(log_id.index + 1);
                self.purged = Some(log_id);
            }
        }
        Ok(())
    }
}

/// Replay the segments in `dir` (created if missing). `None` when there is no segment yet.
///
/// # Errors
/// [`DiskError::Corrupt`] for anything but a torn tail; [`DiskError::Io`].
pub(crate) fn replay(dir: &Path) -> Result<Option<Replayed>> {
    std::fs::create_dir_all(dir).map_err(io_err(dir, "creating"))?;
    let mut seqs = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io_err(dir, "listing"))? {
        let item = item.map_err(io_err(dir, "listing"))?;
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".wal.tmp") {
            // A segment whose creation was interrupted: never used.
            let path = item.path();
            std::fs::remove_file(&path).map_err(io_err(&path, "removing"))?;
        } else if let Some(seq) = parse_segment_name(name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    if let Some(pair) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
        return Err(DiskError::Corrupt {
            path: dir.join(segment_name(pair[0] + 1)),
            what: "segment missing".into(),
        });
    }
    let mut replay: Option<Replay> = None;
    let mut segments = Vec::with_capacity(seqs.len());
    let mut end = 0;
    for (i, &seq) in seqs.iter().enumerate() {
        let path = dir.join(segment_name(seq));
        let last_segment = i + 1 == seqs.len();
        let corrupt = |what: String| DiskError::Corrupt {
            path: path.clone(),
            what,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "opening"))?;
        let bytes = std::fs::read(&path).map_err(io_err(&path, "reading"))?;
        let scan = scan_segment(&bytes, last_segment).map_err(corrupt)?;
        let start = scan.start;
        if start.seq != seq {
            return Err(corrupt(format!("start record names segment {}", start.seq)));
        }
        if (bytes.len() as u64) < start.size {
            return Err(corrupt(format!(
                "truncated: {} of {} bytes",
                bytes.len(),
                start.size
            )));
        }
        let state = replay.get_or_insert_with(|| Replay::new(&start));
        for (offset, len, record) in scan.records {
            let at = offset;
            state
                .apply(record, seq, offset, len)
                .map_err(|what| corrupt(format!("record at offset {at}: {what}")))?;
        }
        if let Some((from, to)) = scan.torn {
            tracing::warn!(
                path = %path.display(),
                from,
                to,
                "discarding the torn tail of the log (an unacknowledged write cut by a crash)"
            );
            zero_range(&file, from, to).map_err(io_err(&path, "zeroing the torn tail"))?;
        }
        end = scan.end;
        segments.push(Segment {
            seq,
            file,
            size: start.size,
        });
    }
    let Some(state) = replay else {
        return Ok(None);
    };
    let mut slots = VecDeque::with_capacity(state.slots.len());
    for (i, slot) in state.slots.into_iter().enumerate() {
        let Some(slot) = slot else {
            return Err(DiskError::Corrupt {
                path: dir.to_path_buf(),
                what: format!(
                    "log entry {} is missing (a segment holding it was removed)",
                    state.first + i as u64
                ),
            });
        };
        slots.push_back(slot);
    }
    Ok(Some(Replayed {
        vote: state.vote,
        committed: state.committed,
        purged: state.purged,
        first: state.first,
        slots,
        segments,
        end,
    }))
}

fn zero_range(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; (to - from).min(1 << 20) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_data()
}

/// What one segment holds.
struct Scan {
    start: SegmentStart,
    /// Every record after the start record: offset, length on disk, content.
    records: Vec<(u64, u64, Record)>,
    /// Where the next record goes.
    end: u64,
    /// A torn tail to zero: `[from, to)`.
    torn: Option<(u64, u64)>,
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Whether some 512-byte sector (aligned in the file) of `range` is all zeros in `bytes`.
fn has_zero_sector(bytes: &[u8], from: u64, to: u64) -> bool {
    let mut at = from;
    while at < to {
        let sector_end = ((at / SECTOR) + 1) * SECTOR;
        let chunk_end = sector_end.min(to);
        if bytes[at as usize..chunk_end as usize]
            .iter()
            .all(|&b| b == 0)
        {
            return true;
        }
        at = chunk_end;
    }
    false
}

fn scan_segment(bytes: &[u8], last_segment: bool) -> Result<Scan, String> {
    if bytes.len() < FILE_HEADER as usize {
        return Err(format!("truncated: {} bytes", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("not a Keelson log segment (bad magic)".into());
    }
    let version = read_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "log format version {version}, this build reads version {FORMAT_VERSION}"
        ));
    }
    let len = bytes.len() as u64;
    let mut at = FILE_HEADER;
    let mut start = None;
    let mut records = Vec::new();
    // Ok(end) or Err(torn offset).
    let stop: Result<u64, u64> = loop {
        if at + RECORD_HEADER > len {
            break if bytes[at as usize..].iter().all(|&b| b == 0) {
                Ok(at)
            } else {
                Err(at)
            };
        }
        let size = u64::from(read_u32(bytes, at as usize));
        let crc = read_u32(bytes, at as usize + 4);
        if size == 0 && crc == 0 {
            break Ok(at);
        }
        let body = at + RECORD_HEADER;
        if size == 0 || size > MAX_RECORD || body + size > len {
            break Err(at);
        }
        let payload = &bytes[body as usize..(body + size) as usize];
        if crc32fast::hash(payload) != crc {
            if has_zero_sector(bytes, body, body + size) {
                break Err(at);
            }
            return Err(format!("checksum mismatch in the record at offset {at}"));
        }
        let record: Record = postcard::from_bytes(payload)
            .map_err(|e| format!("undecodable record at offset {at}: {e}"))?;
        match (record, start.is_some()) {
            (Record::Start(s), false) => start = Some(s),
            (_, false) => return Err("does not begin with a start record".into()),
            (Record::Start(_), true) => {
                return Err(format!("second start record at offset {at}"));
            }
            (record, true) => records.push((at, RECORD_HEADER + size, record)),
        }
        at = body + size;
    };
    let start = start.ok_or("does not begin with a start record")?;
    let end = match stop {
        Ok(end) | Err(end) => end,
    };
    let dirty_to = bytes[end as usize..]
        .iter()
        .rposition(|&b| b != 0)
        .map(|i| end + i as u64 + 1);
    let torn = match (stop, dirty_to) {
        (Ok(_), None) => None,
        (Err(at), _) if !last_segment => {
            return Err(format!("damaged record at offset {at}"));
        }
        (Ok(at), Some(_)) if !last_segment => {
            return Err(format!("data after the end of the log at offset {at}"));
        }
        (_, to) => Some((end, to.unwrap_or(end).max(end))),
    };
    Ok(Scan {
        start,
        records,
        end,
        torn,
    })
}

/// Read the records of consecutive `slots` of one segment and decode their entries.
pub(crate) fn read_entries(
    file: &File,
    path: impl Fn() -> PathBuf,
    slots: &[Slot],
) -> Result<Vec<Entry>> {
    let (Some(first), Some(last)) = (slots.first(), slots.last()) else {
        return Ok(Vec::new());
    };
    let from = first.offset;
    let to = last.offset + last.len;
    let mut bytes = vec![0u8; (to - from) as usize];
    file.read_exact_at(&mut bytes, from)
        .map_err(|source| DiskError::Io {
            path: path(),
            op: "reading",
            source,
        })?;
    let corrupt = |what: String| DiskError::Corrupt { path: path(), what };
    let mut entries = Vec::with_capacity(slots.len());
    for slot in slots {
        let at = (slot.offset - from) as usize;
        let size = read_u32(&bytes, at) as usize;
        let crc = read_u32(&bytes, at + 4);
        let body = at + RECORD_HEADER as usize;
        if RECORD_HEADER as usize + size != slot.len as usize {
            return Err(corrupt(format!(
                "record at offset {} changed length",
                slot.offset
            )));
        }
        let payload = &bytes[body..body + size];
        if crc32fast::hash(payload) != crc {
            return Err(corrupt(format!(
                "checksum mismatch in the record at offset {}",
                slot.offset
            )));
        }
        match postcard::from_bytes(payload) {
            Ok(Record::Entry(entry)) if entry.log_id == slot.log_id => entries.push(entry),
            Ok(_) => {
                return Err(corrupt(format!(
                    "record at offset {} is not entry {}",
                    slot.offset, slot.log_id
                )));
            }
            Err(e) => {
                return Err(corrupt(format!(
                    "undecodable record at offset {}: {e}",
                    slot.offset
                )));
            }
        }
    }
    Ok(entries)
}
