//! `pause` and `resume`: freeze and thaw every process of a running
//! container through its cgroup's freezer.

use super::Container;
use crate::error::{Error, Result};
use crate::state::ContainerStatus;

impl Container {
    /// Freezes the container's processes.
    ///
    /// # Errors
    /// [`Error::WrongStatus`] unless running; [`Error::Cgroup`] if the
    /// freezer fails.
    pub fn pause(&self) -> Result<()> {
        let status = self.status();
        if status != ContainerStatus::Running {
            return Err(Error::WrongStatus {
                id: self.id().to_owned(),
                status,
                action: "pause it",
            });
        }
        self.cgroup()?.set_frozen(true)?;
        tracing::info!(id = self.id(), "paused");
        Ok(())
    }

    /// Thaws the processes of a paused container.
    ///
    /// # Errors
    /// [`Error::WrongStatus`] unless paused; [`Error::Cgroup`] if the
    /// freezer fails.
    pub fn resume(&self) -> Result<()> {
        let status = self.status();
        if status != ContainerStatus::Paused {
            return Err(Error::WrongStatus {
                id: self.id().to_owned(),
                status,
                action: "resume it",
            });
        }
        self.cgroup()?.set_frozen(false)?;
        tracing::info!(id = self.id(), "resumed");
        Ok(())
    }
}
