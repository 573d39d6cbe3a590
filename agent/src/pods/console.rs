//! The pseudo-terminal of a container with `tty: true`, on the supervisor's side: the runtime
//! sends the terminal's master to a console socket of ours (as runc does); the supervisor keeps
//! it for the container's life, copies what the container writes into the CRI log (stdout),
//! feeds it what `kubectl attach` writes into the stdin FIFO, and applies the window sizes
//! that attach writes into the resize FIFO (`<columns> <rows>` lines).

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::logs::cri;
use crate::logs::rotate::RotatingLog;

/// Made by the agent in the attempt directory of a container with `tty: true`.
pub const TTY_FILE: &str = "tty";
/// A FIFO the agent makes beside [`TTY_FILE`]: attach writes window sizes into it.
pub const RESIZE_FIFO: &str = "resize";

/// The window size a terminal starts with, until a client says otherwise.
const DEFAULT_SIZE: (u16, u16) = (80, 24);

/// A console socket bound in a private temporary directory (socket paths are short, the
/// attempt directory's may not be).
pub struct ConsoleSocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Binds a fresh console socket.
    ///
    /// # Errors
    /// The directory or the socket cannot be made.
    pub fn bind() -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("kc-").tempdir()?;
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path)?;
        Ok(ConsoleSocket {
            _dir: dir,
            path,
            listener,
        })
    }

    /// Where the runtime connects.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The terminal's master, sent by the runtime (which connected during the container's
    /// creation, so the connection is already queued).
    ///
    /// # Errors
    /// No connection, or it carried no descriptor.
    pub fn receive_master(&self) -> std::io::Result<File> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        self.listener.set_nonblocking(true)?;
        let (conn, _) = self.listener.accept()?;
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 256];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c
                && let Some(fd) = fds.first()
            {
                // SAFETY: the kernel just installed this descriptor in our table; we own it.
                let master = File::from(unsafe { OwnedFd::from_raw_fd(*fd) });
                set_size(&master, DEFAULT_SIZE.0, DEFAULT_SIZE.1);
                return Ok(master);
            }
        }
        Err(std::io::Error::other(
            "the console socket carried no descriptor",
        ))
    }
}

/// Sets the terminal's window size.
pub fn set_size(terminal: &File, columns: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is an open terminal.
    unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// The CRI entries for one chunk of terminal output: every complete line as a full entry,
/// the rest (a prompt, an echoed key) as a partial one, so that followers see it at once.
fn entries(chunk: &[u8]) -> Vec<u8> {
    let now = jiff::Timestamp::now();
    let mut out = Vec::new();
    let mut lines = chunk.split(|b| *b == b'\n').peekable();
    while let Some(line) = lines.next() {
        if lines.peek().is_some() {
            out.extend(cri::format_line(&now, "stdout", line));
        } else if !line.is_empty() {
            out.extend(cri::format_partial(&now, "stdout", line));
        }
    }
    out
}

/// Copies the terminal's output into the log until the container side closes; the receiver
/// gets a message when done.
pub fn copy_output(master: File, log: Arc<Mutex<RotatingLog>>) -> mpsc::Receiver<()> {
    let (done, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut master = master;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match master.read(&mut buf) {
                // EIO: every descriptor of the terminal's other side is closed.
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let text = entries(&buf[..n]);
                    if let Ok(mut f) = log.lock() {
                        let _ = f.write_entry(&text);
                    }
                }
            }
        }
        let _ = done.send(());
    });
    rx
}

/// Feeds what attach writes into the stdin FIFO to the terminal. When the FIFO ends (the
/// supervisor let go of it for `stdinOnce`), the terminal gets end of input (^D).
pub fn relay_input(fifo: OwnedFd, mut master: File) {
    std::thread::spawn(move || {
        let mut fifo = File::from(fifo);
        let mut buf = [0u8; 4096];
        loop {
            match fifo.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if master.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = master.write_all(&[0x04]);
    });
}

/// Applies the `<columns> <rows>` lines written into the resize FIFO.
pub fn relay_resize(fifo: OwnedFd, master: File) {
    std::thread::spawn(move || {
        for line in BufReader::new(File::from(fifo)).lines() {
            let Ok(line) = line else { break };
            if let Some((columns, rows)) = parse_size(&line) {
                set_size(&master, columns, rows);
            }
        }
    });
}

/// `<columns> <rows>`.
fn parse_size(line: &str) -> Option<(u16, u16)> {
    let mut it = line.split_whitespace();
    let columns = it.next()?.parse().ok()?;
    let rows = it.next()?.parse().ok()?;
    Some((columns, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_output_becomes_full_and_partial_entries() {
        let text = String::from_utf8(entries(b"one\r\ntwo\r\n/ # ")).expect("utf-8");
        let parsed: Vec<_> = text.split('\n').filter_map(cri::parse_line).collect();
        let got: Vec<_> = parsed
            .iter()
            .map(|e| (e.stream, e.partial, e.content))
            .collect();
        assert_eq!(
            got,
            [
                ("stdout", false, "one\r"),
                ("stdout", false, "two\r"),
                ("stdout", true, "/ # "),
            ]
        );
        assert!(entries(b"").is_empty());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("120 40"), Some((120, 40)));
        assert_eq!(parse_size("120"), None);
        assert_eq!(parse_size("x 40"), None);
    }

    #[test]
    fn a_terminal_round_trip_through_the_relays() {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let master = File::from(pty.master);
        let slave = File::from(pty.slave);
        // Raw mode on the slave: bytes pass unchanged, no echo.
        let mut t = nix::sys::termios::tcgetattr(&slave).expect("tcgetattr");
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &t)
            .expect("tcsetattr");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        relay_input(r, master.try_clone().expect("clone"));
        let (rr, rw) = nix::unistd::pipe().expect("pipe");
        relay_resize(rr, master.try_clone().expect("clone"));
        File::from(w).write_all(b"hi").expect("write");
        let mut got = [0u8; 2];
        (&slave).read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hi");
        File::from(rw).write_all(b"132 43\n").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes one winsize to a valid pointer.
            unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
            if (ws.ws_col, ws.ws_row) == (132, 43) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "size not applied");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
