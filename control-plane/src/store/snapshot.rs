//! The snapshot file of one member (`snapshot` in its data directory): the state machine as
//! of some applied log entry, which is where the state machine is durable (the log after it is
//! replayed at start).
//!
//! Layout: magic, format version (u32 LE), crc32 of the body (u32 LE), body length (u64 LE),
//! then the body: the length of the encoded [`SnapshotMeta`] (u32 LE), the meta, and the
//! snapshot data. It is written under a temporary name, synced and renamed into place, so the
//! file is always whole; a damaged one is reported, never served.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use openraft::{LogId, SnapshotMeta};

use crate::store::storage::{DiskError, Result};
use crate::store::types::{Node, NodeId};
use crate::store::wal::sync_dir;

/// The snapshot's file name in a member's data directory.
pub const SNAPSHOT_FILE: &str = "snapshot";
const MAGIC: &[u8; 8] = b"KLSNSNP\n";
const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 24;

/// A snapshot as stored.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) meta: SnapshotMeta<NodeId, Node>,
    pub(crate) data: Vec<u8>,
}

/// Reads and writes a member's snapshot file; writes are serialized and never replace a
/// snapshot with an older one.
#[derive(Debug)]
pub(crate) struct SnapshotFile {
    path: PathBuf,
    dir: PathBuf,
    /// The last log id of the stored snapshot.
    stored: Mutex<Option<Option<LogId<NodeId>>>>,
}

impl SnapshotFile {
    pub(crate) fn new(dir: &Path, stored: Option<Option<LogId<NodeId>>>) -> Self {
        SnapshotFile {
            path: dir.join(SNAPSHOT_FILE),
            dir: dir.to_path_buf(),
            stored: Mutex::new(stored),
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> DiskError {
        let path = self.path.clone();
        move |source| DiskError::Io { path, op, source }
    }

    /// Read the stored snapshot, if any.
    ///
    /// # Errors
    /// [`DiskError::Corrupt`] if the file is damaged; [`DiskError::Io`].
    pub(crate) fn read(&self) -> Result<Option<Stored>> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("reading")(e)),
        };
        decode(&bytes).map(Some).map_err(|what| DiskError::Corrupt {
            path: self.path.clone(),
            what,
        })
    }

    /// Store `meta` and `data` durably, unless a newer snapshot is stored already. Blocking.
    ///
    /// # Errors
    /// [`DiskError::Io`], [`DiskError::Encode`].
    pub(crate) fn write(&self, meta: &SnapshotMeta<NodeId, Node>, data: &[u8]) -> Result<()> {
        let mut stored = self
            .stored
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(last) = *stored
            && last > meta.last_log_id
        {
            return Ok(());
        }
        let meta_bytes = postcard::to_allocvec(meta).map_err(|source| DiskError::Encode {
            what: "snapshot meta",
            source,
        })?;
        let meta_len =
            u32::try_from(meta_bytes.len()).map_err(|_| DiskError::TooLarge(meta_bytes.len()))?;
        let mut body = Vec::with_capacity(4 + meta_bytes.len() + data.len());
        body.extend_from_slice(&meta_len.to_le_bytes());
        body.extend_from_slice(&meta_bytes);
        body.extend_from_slice(data);
        let mut file = Vec::with_capacity(HEADER + body.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        file.extend_from_slice(&(body.len() as u64).to_le_bytes());
        file.extend_from_slice(&body);
        let tmp = self.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let io_tmp = |op| {
            let path = tmp.clone();
            move |source| DiskError::Io { path, op, source }
        };
        {
            use std::io::Write as _;
            let mut out = std::fs::File::create(&tmp).map_err(io_tmp("creating"))?;
            out.write_all(&file).map_err(io_tmp("writing"))?;
            out.sync_all().map_err(io_tmp("syncing"))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(self.io("renaming into place"))?;
        sync_dir(&self.dir)?;
        *stored = Some(meta.last_log_id);
        Ok(())
    }
}

fn decode(bytes: &[u8]) -> Result<Stored, String> {
    if bytes.len() < HEADER {
        return Err(format!("truncated: {} bytes", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("not a Keelson snapshot (bad magic)".into());
    }
    let word = |at: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&bytes[at..at + 4]);
        u32::from_le_bytes(w)
    };
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "snapshot format version {version}, this build reads version {FORMAT_VERSION}"
        ));
    }
    let crc = word(12);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    let body = &bytes[HEADER..];
    if body.len() as u64 != len {
        return Err(format!("truncated: body of {} of {len} bytes", body.len()));
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    if body.len() < 4 {
        return Err("body too short".into());
    }
    let meta_len = word(HEADER) as usize;
    let rest = &body[4..];
    if meta_len > rest.len() {
        return Err("meta runs past the end".into());
    }
    let meta = postcard::from_bytes(&rest[..meta_len])
        .map_err(|e| format!("undecodable snapshot meta: {e}"))?;
    Ok(Stored {
        meta,
        data: rest[meta_len..].to_vec(),
    })
}
