//! `delete`: removes a container's cgroup and state, killing its processes
//! first if it is created, or running with `force`.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Container;
use crate::error::{Error, Result};
use crate::state::ContainerStatus;

/// How long `delete` waits for killed processes and the cgroup to go.
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);

impl Container {
    /// Deletes the container. A `created` container is killed first (as
    /// runc does); a `running` one only with `force`.
    ///
    /// # Errors
    /// [`Error::WrongStatus`] for a running container without `force`;
    /// [`Error::Cgroup`] if the cgroup cannot be removed; [`Error::Io`] if
    /// the state directory cannot be removed.
    pub fn delete(self, force: bool) -> Result<()> {
        let status = self.status();
        match status {
            ContainerStatus::Running | ContainerStatus::Paused if !force => {
                return Err(Error::WrongStatus {
                    id: self.id().to_owned(),
                    status,
                    action: "delete it without --force",
                });
            }
            ContainerStatus::Stopped => {}
            _ => {
                // ESRCH: it exited in the meantime, which is what we want.
                let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
                if status == ContainerStatus::Paused {
                    // Frozen processes die once thawed.
                    let _ = self.cgroup()?.set_frozen(false);
                }
                self.wait_gone(DELETE_TIMEOUT)?;
            }
        }
        let cgroup = self.cgroup()?;
        // Processes that escaped the init's PID namespace (none unless the
        // spec shares one) still hold the cgroup.
        for pid in cgroup.processes() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        cgroup.remove(DELETE_TIMEOUT)?;
        std::fs::remove_dir_all(self.state_dir())
            .map_err(|e| Error::io("remove state directory", self.state_dir(), e))?;
        tracing::info!(id = self.id(), "deleted");
        if let Some(hooks) = &self.record().hooks {
            let poststop = hooks.poststop().as_deref().unwrap_or_default();
            let mut state = self.oci_state();
            state.status = ContainerStatus::Stopped;
            state.pid = None;
            if let Err(e) = crate::hooks::run(poststop, &state) {
                tracing::warn!(id = self.id(), error = %e, "poststop hook failed");
            }
        }
        Ok(())
    }
}
