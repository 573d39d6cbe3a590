//! The bpf filesystem that holds the load balancer's pins.

use std::path::{Path, PathBuf};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{FsType, statfs},
};

use super::error::{Error, Result};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted; the agent mounts it there when missing.
const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == FsType(BPF_FS_MAGIC as _))
}

/// Makes sure `dir` exists on a bpf filesystem.
///
/// When `dir` lies under `/sys/fs/bpf` and nothing is mounted there yet, mounts bpffs there
/// (as kubelet-era agents do); any other location must already be on a bpffs.
///
/// # Errors
/// [`Error::NotBpffs`] when the location is not on a bpffs, or [`Error::Io`] when the mount or
/// the directory cannot be made.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    let anchor = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(anchor) {
        let default = Path::new(DEFAULT_MOUNT);
        if !(dir.starts_with(default) && default.is_dir() && !is_bpffs(default)) {
            return Err(Error::NotBpffs { path: dir.into() });
        }
        mount(
            Some("bpf"),
            default,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io_err("mount bpffs on", default.into(), e.into()))?;
        tracing::info!(path = DEFAULT_MOUNT, "mounted bpffs");
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir.into(), e))
}

pub(crate) fn io_err(op: &'static str, path: PathBuf, source: std::io::Error) -> Error {
    Error::Io { op, path, source }
}
