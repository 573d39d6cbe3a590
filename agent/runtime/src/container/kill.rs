//! `kill`: sends a signal to a container's init.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Container;
use crate::error::{Error, Result};
use crate::state::ContainerStatus;

impl Container {
    /// Sends `signal` to the container's init (created or running).
    ///
    /// # Errors
    /// [`Error::WrongStatus`] for a stopped container, [`Error::Sys`] if
    /// `kill(2)` fails.
    pub fn kill(&self, signal: Signal) -> Result<()> {
        let status = self.status();
        if status == ContainerStatus::Stopped {
            return Err(Error::WrongStatus {
                id: self.id().to_owned(),
                status,
                action: "send a signal",
            });
        }
        kill(Pid::from_raw(self.pid()), signal)
            .map_err(|e| Error::sys("kill", format!("{} ({signal})", self.pid()), e))?;
        tracing::info!(id = self.id(), %signal, "signalled");
        Ok(())
    }

    /// Sends `signal` to every process in the container's cgroup (`kill
    /// --all`), e.g. when the container shares a PID namespace.
    ///
    /// # Errors
    /// [`Error::Cgroup`] if the cgroup path is invalid; processes that exit
    /// meanwhile are skipped.
    pub fn kill_all(&self, signal: Signal) -> Result<()> {
        for pid in self.cgroup()?.processes() {
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(Error::sys("kill", format!("{pid} ({signal})"), e)),
            }
        }
        tracing::info!(id = self.id(), %signal, "signalled all processes");
        Ok(())
    }
}
