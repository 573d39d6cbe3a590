//! The state of a container as the OCI runtime spec describes it, and the
//! record persisted under the state root (`<root>/<id>/state.json`).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The name of the persisted record in a container's state directory.
pub const STATE_FILE: &str = "state.json";
/// The FIFO the container's init blocks on between `create` and `start`.
pub const EXEC_FIFO: &str = "exec.fifo";

/// Errors reading or writing the persisted state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid state record.
    #[error("parse {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
}

type Result<T, E = StateError> = std::result::Result<T, E>;

/// The status of a container (OCI runtime spec, "State").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    /// The container is being created.
    Creating,
    /// Created: the init waits for `start`.
    Created,
    /// The user process runs.
    Running,
    /// The container's processes are frozen (`pause`).
    Paused,
    /// The init process has exited.
    Stopped,
}

impl fmt::Display for ContainerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerStatus::Creating => "creating",
            ContainerStatus::Created => "created",
            ContainerStatus::Running => "running",
            ContainerStatus::Paused => "paused",
            ContainerStatus::Stopped => "stopped",
        })
    }
}

/// The state JSON printed by `state <id>` (OCI runtime spec, "State").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    /// The version of the OCI runtime spec the state follows.
    pub oci_version: String,
    /// The container id.
    pub id: String,
    /// The current status.
    pub status: ContainerStatus,
    /// The host PID of the container's init, absent once stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The absolute path of the bundle.
    pub bundle: PathBuf,
    /// The container's root file system (runc prints it; go-runc reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// When the container was created, RFC 3339 (runc prints it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The annotations of the container's spec.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// What the runtime persists about a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// The container id.
    pub id: String,
    /// The host PID of the init process.
    pub pid: i32,
    /// The init's start time (`/proc/<pid>/stat` field 22, clock ticks after
    /// boot), to tell it from a later process that reuses the PID.
    pub start_time: u64,
    /// The absolute bundle path.
    pub bundle: PathBuf,
    /// The absolute rootfs path.
    #[serde(default)]
    pub rootfs: PathBuf,
    /// The cgroup path, relative to each hierarchy's root.
    pub cgroup_path: String,
    /// Seconds since the epoch when the container was created.
    pub created: u64,
    /// The spec's annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The spec's hooks, for `start` (poststart) and `delete` (poststop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<oci_spec::runtime::Hooks>,
}

impl StateRecord {
    /// Writes the record to `<dir>/state.json` atomically (write, then rename).
    ///
    /// # Errors
    /// [`StateError::Io`] if the file cannot be written.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(".state.json.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
        let io = |action, source| StateError::Io {
            action,
            path: tmp.clone(),
            source,
        };
        let mut file = fs::File::create(&tmp).map_err(|e| io("create", e))?;
        file.write_all(&json).map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("sync", e))?;
        fs::rename(&tmp, &path).map_err(|source| StateError::Io {
            action: "rename",
            path: path.clone(),
            source,
        })
    }

    /// Reads `<dir>/state.json`.
    ///
    /// # Errors
    /// [`StateError::Io`] if unreadable, [`StateError::Parse`] if invalid.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let bytes = fs::read(&path).map_err(|source| StateError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
    }
}

/// Reads a process's start time (field 22 of `/proc/<pid>/stat`) and whether
/// it is a zombie. `None` if the process does not exist.
pub fn proc_start_time(pid: i32) -> Option<(u64, bool)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); field 22 is at index 19.
    let zombie = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    let start = fields.get(19)?.parse().ok()?;
    Some((start, zombie))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_state_json_uses_spec_field_names() {
        let state = OciState {
            oci_version: "1.2.0".into(),
            id: "c1".into(),
            status: ContainerStatus::Created,
            pid: Some(42),
            bundle: "/b".into(),
            rootfs: None,
            created: None,
            annotations: HashMap::new(),
        };
        let json = serde_json::to_value(&state).expect("serialize");
        assert_eq!(json["ociVersion"], "1.2.0");
        assert_eq!(json["status"], "created");
        assert_eq!(json["pid"], 42);
        assert_eq!(json["bundle"], "/b");
        assert!(json.get("annotations").is_none());
    }

    #[test]
    fn record_round_trips_through_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = StateRecord {
            id: "c1".into(),
            pid: 7,
            start_time: 99,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            cgroup_path: "keelson/c1".into(),
            created: 1,
            annotations: HashMap::new(),
            hooks: None,
        };
        record.save(dir.path()).expect("save");
        assert_eq!(StateRecord::load(dir.path()).expect("load"), record);
    }

    #[test]
    fn own_start_time_is_readable() {
        let (start, zombie) = proc_start_time(std::process::id() as i32).expect("own stat");
        assert!(start > 0);
        assert!(!zombie);
    }
}
