//! Where a pod's state lives under the agent's state directory, and the small records kept
//! there so that a restarted agent finds its pods and containers again.
//!
//! ```text
//! <state>/pods/<uid>/pod.json                       namespace, name, uid
//! <state>/pods/<uid>/ns/{net,uts,ipc}                sandbox namespaces (bind mounts)
//! <state>/pods/<uid>/network.json                    the pod's address and host-side veth
//! <state>/pods/<uid>/volumes/<name>/                 emptyDir, configMap and secret volumes
//! <state>/pods/<uid>/containers/<name>/<n>/          attempt n (n = restart count):
//!     config.json layers.json rootfs/ upper/ work/   the OCI bundle (rootfs is an overlay)
//!     supervisor.pid started exit.json supervisor.log
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

    /// The runtime's state root (`keelson-runtime --root`).
    pub fn runtime_root(&self) -> PathBuf {
        self.root.join("runtime")
    }

    /// All pod directories.
    pub fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// One pod's directory.
    pub fn pod(&self, uid: &str) -> PathBuf {
        self.pods().join(uid)
    }

    /// The directory of a pod's volumes.
    pub fn volumes(&self, uid: &str) -> PathBuf {
        self.pod(uid).join("volumes")
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
