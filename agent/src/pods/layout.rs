//! Where a pod's state lives under the agent's state directory, and the small records kept
//! there so that a restarted agent finds its pods and containers again.
//!
//! What only matters while the machine is up (records, bundles, the runtime's state) lives in
//! `<state>/run`, a tmpfs the agent mounts there (as containerd and runc keep theirs in
//! `/run`); what must be on disk (volumes, the containers' writable layers, logs, images) stays
//! under `<state>`. Small files made and removed for every pod on a disk file system cost far
//! more: on ext4 without a journal, each new inode skips every inode deleted in the last minutes
//! (`recently_deleted`), so starting 100 pods right after 100 others were removed took seconds
//! of kernel time.
//!
//! ```text
//! <state>/run/pods/<uid>/pod.json                   namespace, name, uid
//! <state>/run/pods/<uid>/ns/{net,uts,ipc}            sandbox namespaces (bind mounts)
//! <state>/run/pods/<uid>/network.json                the pod's address and host-side veth
//! <state>/run/pods/<uid>/containers/<name>/<n>/      attempt n (n = restart count):
//!     config.json layers.json rootfs/               the OCI bundle (rootfs is an overlay)
//!     supervisor.pid started exit.json supervisor.log
//! <state>/run/runtime/<container id>/                the runtime's state
//! <state>/pods/<uid>/volumes/<name>/                 emptyDir, configMap and secret volumes
//! <state>/pods/<uid>/rootfs-<name>-<n>/{upper,work}  attempt n's writable layer
//! <state>/logs/pods/<ns>_<name>_<uid>/<container>/<n>.log   CRI log of attempt n
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The identity of a pod whose state is on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

/// How an attempt of a container ended, written by its supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Shell-style exit code (128 + signal for a signal death).
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled`, `StartError`.
    pub reason: String,
    /// Details (the runtime's message for a start error).
    #[serde(default)]
    pub message: String,
    /// When the process started (RFC 3339), if it did.
    #[serde(default)]
    pub started_at: Option<String>,
    /// When it ended (RFC 3339).
    pub finished_at: String,
}

/// Paths of the agent's state directory.
#[derive(Debug, Clone)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    /// The layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateLayout { root: root.into() }
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image store.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The directory of what lasts only while the machine is up (a tmpfs: [`Self::mount_run`]).
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Makes [`Self::run`] a tmpfs unless it is one already (a restarted agent finds its
    /// pods there again); returns whether it mounted one.
    ///
    /// # Errors
    /// When the directory cannot be made or the tmpfs not mounted.
    pub fn mount_run(&self) -> io::Result<bool> {
        use nix::sys::statfs::{TMPFS_MAGIC, statfs};
        let dir = self.run();
        fs::create_dir_all(&dir)?;
        if statfs(&dir).map_err(io::Error::from)?.filesystem_type() == TMPFS_MAGIC {
            return Ok(false);
        }
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .map_err(io::Error::from)?;
        Ok(true)
    }

    /// The runtime's state root (`keelson-runtime --root`).
    pub fn runtime_root(&self) -> PathBuf {
        self.run().join("runtime")
    }

    /// All pod directories.
    pub fn pods(&self) -> PathBuf {
        self.run().join("pods")
    }

    /// One pod's directory.
    pub fn pod(&self, uid: &str) -> PathBuf {
        self.pods().join(uid)
    }

    /// The directories of the pods' data on disk.
    pub fn pods_data(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// One pod's data on disk: its volumes and its containers' writable layers.
    pub fn pod_data(&self, uid: &str) -> PathBuf {
        self.pods_data().join(uid)
    }

    /// The directory of a pod's volumes.
    pub fn volumes(&self, uid: &str) -> PathBuf {
        self.pod_data(uid).join("volumes")
    }

    /// The writable layer (`upper/`, `work/`) of attempt `n` of a container.
    pub fn writable_layer(&self, uid: &str, container: &str, n: u32) -> PathBuf {
        self.pod_data(uid).join(format!("rootfs-{container}-{n}"))
    }

    /// The directory of attempt `n` of a container.
    pub fn attempt(&self, uid: &str, container: &str, n: u32) -> PathBuf {
        self.pod(uid)
            .join("containers")
            .join(container)
            .join(n.to_string())
    }

    /// The pod log directories.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs/pods")
    }

    /// A pod's log directory, named as the kubelet names it.
    pub fn pod_logs(&self, pod: &PodRecord) -> PathBuf {
        self.logs()
            .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid))
    }

    /// The CRI log file of attempt `n` of a container.
    pub fn log_file(&self, pod: &PodRecord, container: &str, n: u32) -> PathBuf {
        self.pod_logs(pod).join(container).join(format!("{n}.log"))
    }

    /// The IPAM records.
    pub fn ipam(&self) -> PathBuf {
        self.root.join("ipam")
    }
}

/// The highest attempt number present for a container, if any.
pub fn latest_attempt(dir: &Path) -> Option<u32> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
}

/// Writes `value` as JSON to `path` atomically.
///
/// # Errors
/// I/O errors.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(value).map_err(io::Error::other)?;
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

/// Reads JSON from `path`; `None` if it does not exist or cannot be parsed.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether process `pid` runs and started at `start` (so not a recycled PID).
pub fn process_alive(pid: i32, start: u64) -> bool {
    matches!(keelson_runtime::state::proc_start_time(pid), Some((s, zombie)) if s == start && !zombie)
}

/// The runtime container id of an attempt.
pub fn container_id(uid: &str, container: &str, n: u32) -> String {
    format!("{uid}-{container}-{n}")
}

/// Now in RFC 3339 with nanoseconds, UTC.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}
