//! `wait`: reaps the init of a container this process created, and turns
//! its end into a shell-style exit code; optionally forwarding the signals
//! this process receives to the container, as `runc run` does.

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::Container;
use crate::error::{Error, Result};

/// The exit code a shell reports for `status`: the code for a normal exit,
/// 128 + the signal number for a death by signal.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

impl Container {
    /// Waits for the init to exit and returns its exit code (128 + signal
    /// number if killed). Only the process that created the container (its
    /// parent) can do this.
    ///
    /// # Errors
    /// [`Error::Sys`] if `waitpid(2)` fails (e.g. `ECHILD` in another process).
    pub fn wait(&self) -> Result<i32> {
        loop {
            let status = waitpid(Pid::from_raw(self.pid()), None)
                .map_err(|e| Error::sys("waitpid", self.pid().to_string(), e))?;
            if let Some(code) = exit_code(status) {
                tracing::info!(id = self.id(), code, "exited");
                return Ok(code);
            }
        }
    }
}

impl Container {
    /// As [`Container::wait`], but SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1,
    /// SIGUSR2 and SIGWINCH sent to this process meanwhile are forwarded to
    /// the container's init (through a `signalfd`; the calling thread's
    /// signal mask is restored afterwards).
    ///
    /// # Errors
    /// [`Error::Sys`] if the signal mask, `signalfd` or `waitpid` fail.
    pub fn wait_forwarding_signals(&self) -> Result<i32> {
        let code = wait_forwarding_signals(Pid::from_raw(self.pid()))?;
        tracing::info!(id = self.id(), code, "exited");
        Ok(code)
    }
}

/// Waits for child `pid` to exit, forwarding the [`crate::signal::FORWARDED`]
/// signals this process receives to it; returns its shell-style exit code.
///
/// # Errors
/// [`Error::Sys`] if the signal mask, `signalfd` or `waitpid` fail.
pub fn wait_forwarding_signals(pid: Pid) -> Result<i32> {
    let mask = crate::signal::forwarded_set();
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), Some(&mut old))
        .map_err(|e| Error::sys("pthread_sigmask", "block", e))?;
    let result = forward_until_exit(pid, &mask);
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    result
}

fn forward_until_exit(pid: Pid, mask: &SigSet) -> Result<i32> {
    let sfd = SignalFd::with_flags(mask, SfdFlags::SFD_CLOEXEC)
        .map_err(|e| Error::sys("signalfd", "", e))?;
    loop {
        // Checked before every read, so an exit before the mask was set is
        // not missed.
        let status = waitpid(pid, Some(WaitPidFlag::WNOHANG))
            .map_err(|e| Error::sys("waitpid", pid.to_string(), e))?;
        if let Some(code) = exit_code(status) {
            return Ok(code);
        }
        let info = sfd
            .read_signal()
            .map_err(|e| Error::sys("read", "signalfd", e))?;
        let Some(info) = info else { continue };
        let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        if signal != Signal::SIGCHLD {
            tracing::debug!(%pid, %signal, "forwarding");
            let _ = kill(pid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_codes_follow_the_shell() {
        let pid = Pid::from_raw(1);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }
}
