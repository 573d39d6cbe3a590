//! `start`: releases a created container's init from the exec FIFO, so that
//! it runs the user process.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Container;
use crate::error::{Error, Result};
use crate::state::{ContainerStatus, EXEC_FIFO};

/// How long `start` waits for the init to write to the FIFO.
const START_TIMEOUT: Duration = Duration::from_secs(10);

impl Container {
    /// Starts the user process of a created container.
    ///
    /// # Errors
    /// [`Error::WrongStatus`] unless the container is `created`;
    /// [`Error::Io`]/[`Error::Sys`] on the FIFO; [`Error::Init`] if the init
    /// exited instead of starting.
    pub fn start(&mut self) -> Result<()> {
        let status = self.status();
        if status != ContainerStatus::Created {
            return Err(Error::WrongStatus {
                id: self.id().to_owned(),
                status,
                action: "start",
            });
        }
        let path = self.state_dir().join(EXEC_FIFO);
        // Non-blocking, so that a dead init cannot hang us; the init's
        // blocking open for writing returns as soon as we are there.
        let mut fifo = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN)];
            let ready = poll(&mut fds, PollTimeout::from(100u16))
                .map_err(|e| Error::sys("poll", path.display().to_string(), e))?;
            if ready > 0 {
                break;
            }
            if self.status() == ContainerStatus::Stopped {
                return Err(Error::Init(format!(
                    "container {} exited before it could start",
                    self.id()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    id: self.id().to_owned(),
                    what: "start",
                    seconds: START_TIMEOUT.as_secs(),
                });
            }
        }
        let mut byte = [0u8; 1];
        let n = fifo
            .read(&mut byte)
            .map_err(|e| Error::io("read", &path, e))?;
        if n == 0 {
            return Err(Error::Init(format!(
                "container {} init closed the exec fifo without starting",
                self.id()
            )));
        }
        std::fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
        tracing::info!(id = self.id(), pid = self.pid(), "started");
        if let Some(hooks) = &self.record().hooks {
            let poststart = hooks.poststart().as_deref().unwrap_or_default();
            if let Err(e) = crate::hooks::run(poststart, &self.oci_state()) {
                tracing::warn!(id = self.id(), error = %e, "poststart hook failed");
            }
        }
        Ok(())
    }
}
