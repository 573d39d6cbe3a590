//! The one thread that writes a member's log segments, with group commit.
//!
//! Every change to the log on disk (records written, segments created or removed) is a request
//! queued here. The thread takes all requests waiting, performs their writes in order and, if
//! any of them asked for durability, syncs the segments written once for all of them before
//! telling each request's callback. So concurrent appends share one fdatasync, the Raft core
//! never blocks on the disk while it could be replicating, and the async runtime's few threads
//! never block in an fsync.
//!
//! Older segments are synced before a newer one is first written, so that a crash can only
//! leave a torn write in the last segment (see `wal.rs`). After a failed operation the writer
//! refuses every later request: a later sync must never make durable a log that skipped a
//! failed write.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;

use crate::store::storage::{DiskError, Result};
use crate::store::wal;

/// Most requests handled in one round (one sync).
const MAX_REQUESTS: usize = 1024;

/// One operation on the segment files.
#[derive(Debug)]
pub(crate) enum Op {
    /// Create segment `seq` of `size` bytes starting with `head` (see [`wal::create_segment`]).
    Create { seq: u64, size: u64, head: Vec<u8> },
    /// Write `bytes` at `offset` of segment `seq`.
    Write {
        seq: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Delete segment `seq`: all its entries are purged and the purge is durable.
    Remove { seq: u64 },
}

/// Told the outcome once the request's operations are done (and synced, if asked).
pub(crate) type Done = Box<dyn FnOnce(Result<(), Arc<DiskError>>) + Send>;

struct Request {
    ops: Vec<Op>,
    sync: bool,
    done: Option<Done>,
}

/// The open segment files, shared by the writer thread (which creates and removes them) and
/// the log's readers; and how far records have been written.
#[derive(Debug)]
pub(crate) struct Files {
    dir: PathBuf,
    segments: Mutex<BTreeMap<u64, Arc<File>>>,
    /// (segment, offset): every record before this position is written (readable, maybe not
    /// yet durable).
    written: Mutex<(u64, u64)>,
}

impl Files {
    /// `segments` are the segments found at start; records up to `written` are on disk.
    pub(crate) fn new(dir: PathBuf, segments: Vec<(u64, File)>, written: (u64, u64)) -> Self {
        Files {
            dir,
            segments: Mutex::new(
                segments
                    .into_iter()
                    .map(|(seq, file)| (seq, Arc::new(file)))
                    .collect(),
            ),
            written: Mutex::new(written),
        }
    }

    fn segments(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<File>>> {
        self.segments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The file of segment `seq`, if it exists.
    pub(crate) fn get(&self, seq: u64) -> Option<Arc<File>> {
        self.segments().get(&seq).cloned()
    }

    /// The path of segment `seq`.
    pub(crate) fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(wal::segment_name(seq))
    }

    /// The position up to which records are written.
    pub(crate) fn written(&self) -> (u64, u64) {
        *self
            .written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_written(&self, position: (u64, u64)) {
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *written = (*written).max(position);
    }
}

/// Queues requests for the writer thread; the thread ends when this drops, after finishing
/// what was queued.
#[derive(Debug)]
pub(crate) struct Writer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Start the writer thread for `files`.
    pub(crate) fn start(files: Arc<Files>) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(&files, &rx))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queue `ops`; `done` learns how they went. `sync`: the segments written are synced
    /// before `done` runs.
    pub(crate) fn submit(&self, ops: Vec<Op>, sync: bool, done: Option<Done>) {
        let request = Request { ops, sync, done };
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::SendError(request)) = tx.send(request)
            && let Some(done) = request.done
        {
            done(Err(Arc::new(DiskError::WriterStopped)));
        }
    }

    /// Queue `ops` and wait until they are done (and synced, if asked).
    pub(crate) async fn run(&self, ops: Vec<Op>, sync: bool) -> Result<(), Arc<DiskError>> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.submit(
            ops,
            sync,
            Some(Box::new(move |result| {
                let _ = reply.send(result);
            })),
        );
        outcome
            .await
            .unwrap_or_else(|_| Err(Arc::new(DiskError::WriterStopped)))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has drained it; waiting here means the
        // files are closed when the last log handle is gone.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(files: &Files, rx: &mpsc::Receiver<Request>) {
    let mut failed: Option<Arc<DiskError>> = None;
    let mut dirty: BTreeMap<u64, Arc<File>> = BTreeMap::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_REQUESTS {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let outcome = match &failed {
            Some(e) => Err(e.clone()),
            None => execute(files, &mut dirty, &batch).map_err(|e| {
                tracing::error!(error = %e, "writing the store's log failed");
                failed.insert(Arc::new(e)).clone()
            }),
        };
        for request in batch {
            if let Some(done) = request.done {
                done(outcome.clone());
            }
        }
    }
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_path_buf();
    move |source| DiskError::Io { path, op, source }
}

fn execute(files: &Files, dirty: &mut BTreeMap<u64, Arc<File>>, batch: &[Request]) -> Result<()> {
    let mut sync = false;
    for request in batch {
        sync |= request.sync;
        for op in &request.ops {
            match op {
                Op::Create { seq, size, head } => {
                    let file = wal::create_segment(&files.dir, *seq, *size, head)?;
                    files.segments().insert(*seq, Arc::new(file));
                    files.set_written((*seq, head.len() as u64));
                }
                Op::Write { seq, offset, bytes } => {
                    let path = files.path(*seq);
                    let older: Vec<u64> = dirty.range(..*seq).map(|(s, _)| *s).collect();
                    for s in older {
                        if let Some(file) = dirty.remove(&s) {
                            file.sync_data().map_err(io(&files.path(s), "syncing"))?;
                        }
                    }
                    let file = files.get(*seq).ok_or_else(|| DiskError::Io {
                        path: path.clone(),
                        op: "writing",
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    })?;
                    file.write_all_at(bytes, *offset)
                        .map_err(io(&path, "writing"))?;
                    files.set_written((*seq, offset + bytes.len() as u64));
                    dirty.insert(*seq, file);
                }
                Op::Remove { seq } => {
                    dirty.remove(seq);
                    files.segments().remove(seq);
                    let path = files.path(*seq);
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io(&path, "removing")(e)),
                    }
                }
            }
        }
    }
    if sync {
        for (seq, file) in std::mem::take(dirty) {
            file.sync_data().map_err(io(&files.path(seq), "syncing"))?;
        }
    }
    Ok(())
}
