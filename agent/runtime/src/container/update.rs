//! `update`: changes the resource limits of a live container.

use oci_spec::runtime::LinuxResources;

use super::Container;
use crate::error::{Error, Result};
use crate::state::ContainerStatus;

impl Container {
    /// Applies new memory, CPU and pids limits to the container's cgroup.
    ///
    /// # Errors
    /// [`Error::WrongStatus`] for a stopped container; [`Error::Cgroup`] if
    /// the kernel refuses a limit.
    pub fn update(&self, resources: &LinuxResources) -> Result<()> {
        let status = self.status();
        if status == ContainerStatus::Stopped {
            return Err(Error::WrongStatus {
                id: self.id().to_owned(),
                status,
                action: "update its resources",
            });
        }
        self.cgroup()?.update(resources)?;
        tracing::info!(id = self.id(), "resources updated");
        Ok(())
    }
}
