//! Parsing of signal names and numbers as `kill` accepts them
//! (`KILL`, `SIGKILL`, `sigterm`, `9`).

use std::str::FromStr;

use nix::sys::signal::Signal;

/// A signal that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unknown signal {0:?}")]
pub struct SignalError(pub String);

/// Parses a signal given by name (with or without the `SIG` prefix, any
/// case) or by number.
///
/// # Errors
/// [`SignalError`] if the text names no signal known to Linux.
pub fn parse_signal(text: &str) -> Result<Signal, SignalError> {
    let trimmed = text.trim();
    if let Ok(number) = trimmed.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| SignalError(text.to_owned()));
    }
    let upper = trimmed.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| SignalError(text.to_owned()))
}

/// The signals `run` forwards to the container (as `runc run` does).
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// The set of [`FORWARDED`] signals plus `SIGCHLD`.
pub fn forwarded_set() -> nix::sys::signal::SigSet {
    let mut mask = nix::sys::signal::SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    mask
}

/// Blocks the [`forwarded_set`] in the calling thread, so that they queue
/// until [`crate::Container::wait_forwarding_signals`] reads them. The
/// container's init unblocks all signals before it runs the user process.
///
/// # Errors
/// The errno of `pthread_sigmask(3)`.
pub fn block_forwarded() -> nix::Result<()> {
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&forwarded_set()),
        None,
    )
}

/// Gives every signal its default disposition and unblocks all of them, as a process
/// started by runc or crun finds them. Called in the container's init and exec helper just
/// before `execve(2)`: a caught signal is reset by `execve` itself, but an ignored one stays
/// ignored, and the processes the runtime is started from (a Rust supervisor, a shell in the
/// background) ignore `SIGPIPE` or `SIGINT`/`SIGQUIT`. A container that inherited an ignored
/// `SIGPIPE` sees `EPIPE` instead of dying, which changes what pipelines like `yes | head`
/// do.
pub fn reset_for_exec() {
    // The kernel's `struct sigaction` all zero is SIG_DFL with no flags and an empty mask,
    // whatever the architecture's field order; four words cover its size everywhere.
    // The raw system call, because glibc's wrapper refuses the two real-time signals it keeps
    // for itself, which a parent can still have left ignored.
    let default = [0u64; 4];
    for signo in 1..=libc::SIGRTMAX() {
        if signo != libc::SIGKILL && signo != libc::SIGSTOP {
            // SAFETY: rt_sigaction(2) reads a zeroed kernel sigaction of sufficient size; no
            // old action is written. An unknown signal number fails harmlessly. Nothing in
            // this process relies on a handler afterwards: it execs next.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signo,
                    default.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    std::mem::size_of::<u64>(),
                );
            }
        }
    }
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse_signal("KILL").ok(), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("SIGTERM").ok(), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("sigusr1").ok(), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("9").ok(), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("15").ok(), Some(Signal::SIGTERM));
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }
}
