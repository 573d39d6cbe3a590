//! A container under a state root: created from a bundle by
//! [`ContainerBuilder`], then started, queried, signalled, waited for and
//! deleted through [`Container`]. Each verb lives in a file of its own.

mod builder;
mod delete;
mod exec;
mod kill;
mod pause;
mod start;
mod update;
mod wait;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

pub use builder::ContainerBuilder;
pub use exec::ExecOptions;
pub use wait::{exit_code, wait_forwarding_signals};

use crate::cgroups::CgroupManager;
use crate::error::{Error, Result};
use crate::state::{ContainerStatus, EXEC_FIFO, OciState, StateRecord, proc_start_time};

/// The OCI runtime spec version the state JSON reports.
pub const OCI_VERSION: &str = "1.2.0";

/// A container whose state lives in `<root>/<id>`.
#[derive(Debug)]
pub struct Container {
    state_dir: PathBuf,
    record: StateRecord,
}

/// Checks that `id` is usable as a directory name under the state root.
pub(crate) fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_owned()))
    }
}

impl Container {
    /// Loads container `id` from the state root `root`.
    ///
    /// # Errors
    /// [`Error::NotFound`] if there is no such container,
    /// [`Error::State`] if its record cannot be read.
    pub fn load(root: &Path, id: &str) -> Result<Self> {
        validate_id(id).map_err(|_| Error::NotFound(id.to_owned()))?;
        let state_dir = root.join(id);
        if !state_dir.join(crate::state::STATE_FILE).exists() {
            return Err(Error::NotFound(id.to_owned()));
        }
        let record = StateRecord::load(&state_dir)?;
        Ok(Container { state_dir, record })
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The host PID of the container's init.
    pub fn pid(&self) -> i32 {
        self.record.pid
    }

    /// The absolute bundle path.
    pub fn bundle(&self) -> &Path {
        &self.record.bundle
    }

    /// The container's state directory, `<root>/<id>`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The persisted record.
    pub fn record(&self) -> &StateRecord {
        &self.record
    }

    /// The container's cgroup.
    ///
    /// # Errors
    /// [`Error::Cgroup`] if the recorded path is invalid.
    pub fn cgroup(&self) -> Result<CgroupManager> {
        Ok(CgroupManager::load(&self.record.cgroup_path)?)
    }

    /// Whether the init process is still the one we started and not a zombie.
    fn init_alive(&self) -> bool {
        matches!(proc_start_time(self.record.pid),
            Some((start, zombie)) if start == self.record.start_time && !zombie)
    }

    /// The current status: `created` while the init waits on the exec FIFO,
    /// `running` after `start` (`paused` while frozen), `stopped` once the
    /// init has exited.
    pub fn status(&self) -> ContainerStatus {
        if !self.init_alive() {
            ContainerStatus::Stopped
        } else if self.state_dir.join(EXEC_FIFO).exists() {
            ContainerStatus::Created
        } else if self
            .cgroup()
            .and_then(|c| Ok(c.is_frozen()?))
            .unwrap_or(false)
        {
            ContainerStatus::Paused
        } else {
            ContainerStatus::Running
        }
    }

    /// The OCI state of the container, as `state <id>` prints it.
    pub fn oci_state(&self) -> OciState {
        let status = self.status();
        OciState {
            oci_version: OCI_VERSION.to_owned(),
            id: self.record.id.clone(),
            status,
            pid: (status != ContainerStatus::Stopped).then_some(self.record.pid),
            bundle: self.record.bundle.clone(),
            rootfs: Some(self.record.rootfs.clone()).filter(|p| !p.as_os_str().is_empty()),
            created: Some(
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(self.record.created),
                )
                .to_string(),
            ),
            annotations: self.record.annotations.clone(),
        }
    }

    /// The containers under the state root `root`, sorted by id; entries
    /// that are not containers are skipped.
    ///
    /// # Errors
    /// [`Error::Io`] if `root` exists but cannot be read.
    pub fn list(root: &Path) -> Result<Vec<Container>> {
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read state root", root, e)),
        };
        let mut out: Vec<Container> = entries
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_owned();
                Container::load(root, &id).ok()
            })
            .collect();
        out.sort_by(|a, b| a.id().cmp(b.id()));
        Ok(out)
    }

    /// The host PIDs of the container's processes (from its cgroup).
    ///
    /// # Errors
    /// [`Error::Cgroup`] if the recorded cgroup path is invalid.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let mut pids = self.cgroup()?.processes();
        pids.sort_unstable();
        Ok(pids)
    }

    /// Waits until the init is gone (exited; reaped or a zombie).
    pub(crate) fn wait_gone(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.init_alive() {
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    id: self.record.id.clone(),
                    what: "exit",
                    seconds: timeout.as_secs(),
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("web-1_a.b+c").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "x\0"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Writes a record for `pid` with `start_time` under `root/c1`.
    fn fake(root: &Path, pid: i32, start_time: u64) -> PathBuf {
        let dir = root.join("c1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        StateRecord {
            id: "c1".into(),
            pid,
            start_time,
            bundle: "/bundle".into(),
            rootfs: "/bundle/rootfs".into(),
            cgroup_path: "keelson-unit-test/none".into(),
            created: 0,
            annotations: Default::default(),
            hooks: None,
        }
        .save(&dir)
        .expect("save");
        dir
    }

    #[test]
    fn status_follows_the_init_and_the_fifo() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let me = std::process::id() as i32;
        let (start, _) = proc_start_time(me).expect("own start time");
        let dir = fake(tmp.path(), me, start);
        std::fs::write(dir.join(EXEC_FIFO), "").expect("fifo stand-in");
        let c = Container::load(tmp.path(), "c1").expect("load");
        assert_eq!(c.status(), ContainerStatus::Created);
        assert_eq!(c.oci_state().pid, Some(me));
        std::fs::remove_file(dir.join(EXEC_FIFO)).expect("rm");
        assert_eq!(c.status(), ContainerStatus::Running);
        // Same PID, other start time: a reused PID, the container stopped.
        fake(tmp.path(), me, start + 1);
        let c = Container::load(tmp.path(), "c1").expect("load");
        assert_eq!(c.status(), ContainerStatus::Stopped);
        assert_eq!(c.oci_state().pid, None);
    }

    #[test]
    fn missing_container_does_not_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Container::load(dir.path(), "nope").expect_err("must fail");
        assert_eq!(err.to_string(), "container nope does not exist");
    }
}
