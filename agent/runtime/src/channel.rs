//! The socket pair between the runtime and a container's init during
//! `create`: the runtime says "go" once the init sits in its cgroup, and the
//! init answers "ready" (blocked on the exec FIFO, about to run the user
//! process) or an error message.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// The runtime lets the init proceed.
pub(crate) const GO: u8 = b'G';
/// The init finished its setup.
pub(crate) const READY: u8 = b'R';
/// The init failed; the rest of the stream is the message.
pub(crate) const FAILED: u8 = b'E';

/// What the init reported.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InitReport {
    /// Setup done.
    Ready,
    /// Setup failed with this message.
    Failed(String),
    /// The init went away without a word.
    Vanished,
}

/// Reads the init's report until it closes its end.
pub(crate) fn read_report(stream: &mut UnixStream) -> std::io::Result<InitReport> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    Ok(match bytes.split_first() {
        Some((&READY, _)) => InitReport::Ready,
        Some((&FAILED, rest)) => InitReport::Failed(String::from_utf8_lossy(rest).into_owned()),
        _ => InitReport::Vanished,
    })
}

/// Sends one byte.
pub(crate) fn send(stream: &mut UnixStream, byte: u8) -> std::io::Result<()> {
    stream.write_all(&[byte])
}

/// Lets the init proceed, telling it its host PID (for hook state).
pub(crate) fn send_go(stream: &mut UnixStream, pid: i32) -> std::io::Result<()> {
    let mut bytes = vec![GO];
    bytes.extend_from_slice(&pid.to_le_bytes());
    stream.write_all(&bytes)
}

/// Waits for [`send_go`]; returns the host PID, or `None` if the runtime
/// sent something else.
pub(crate) fn read_go(stream: &mut UnixStream) -> std::io::Result<Option<i32>> {
    let mut bytes = [0u8; 5];
    stream.read_exact(&mut bytes)?;
    if bytes[0] != GO {
        return Ok(None);
    }
    let mut pid = [0u8; 4];
    pid.copy_from_slice(&bytes[1..]);
    Ok(Some(i32::from_le_bytes(pid)))
}

/// The `exec` helper reports the PID of the process it forked.
pub(crate) const PID: u8 = b'P';

/// Sends [`PID`] and the PID.
pub(crate) fn send_pid(stream: &mut UnixStream, pid: i32) -> std::io::Result<()> {
    let mut bytes = vec![PID];
    bytes.extend_from_slice(&pid.to_le_bytes());
    stream.write_all(&bytes)
}

/// What the `exec` helper and its process reported: the PID, and an error
/// if the process failed before `execve`.
pub(crate) fn read_exec_report(
    stream: &mut UnixStream,
) -> std::io::Result<(Option<i32>, Option<String>)> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let mut rest = bytes.as_slice();
    let mut pid = None;
    if rest.len() >= 5 && rest[0] == PID {
        let mut raw = [0u8; 4];
        raw.copy_from_slice(&rest[1..5]);
        pid = Some(i32::from_le_bytes(raw));
        rest = &rest[5..];
    }
    let error = match rest.split_first() {
        Some((&FAILED, message)) => Some(String::from_utf8_lossy(message).into_owned()),
        Some(_) => Some("garbled report from the exec helper".to_owned()),
        None => None,
    };
    Ok((pid, error))
}

/// Sends a failure report.
pub(crate) fn send_failure(stream: &mut UnixStream, message: &str) -> std::io::Result<()> {
    let mut bytes = vec![FAILED];
    bytes.extend_from_slice(message.as_bytes());
    stream.write_all(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_carries_the_pid() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        send_go(&mut a, 4242).expect("send");
        assert_eq!(read_go(&mut b).expect("read"), Some(4242));
    }

    #[test]
    fn exec_reports_parse() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        send_pid(&mut b, 77).expect("pid");
        send_failure(&mut b, "execve: ENOENT").expect("failure");
        drop(b);
        assert_eq!(
            read_exec_report(&mut a).expect("read"),
            (Some(77), Some("execve: ENOENT".into()))
        );
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        send_pid(&mut b, 78).expect("pid");
        drop(b);
        assert_eq!(read_exec_report(&mut a).expect("read"), (Some(78), None));
    }

    #[test]
    fn reports_round_trip() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        send_failure(&mut b, "mount /proc: EPERM").expect("send");
        drop(b);
        assert_eq!(
            read_report(&mut a).expect("read"),
            InitReport::Failed("mount /proc: EPERM".into())
        );
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        send(&mut b, READY).expect("send");
        drop(b);
        assert_eq!(read_report(&mut a).expect("read"), InitReport::Ready);
        let (mut a, b) = UnixStream::pair().expect("pair");
        drop(b);
        assert_eq!(read_report(&mut a).expect("read"), InitReport::Vanished);
    }
}
