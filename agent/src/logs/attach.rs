//! `GET /attach/{namespace}/{pod}/{container}?stdin=…&stdout=…&stderr=…`: attaches to the
//! running container's main process for `kubectl attach`, over the same WebSocket channel
//! protocol as exec ([`super::exec`]).
//!
//! The supervisor copies the process's stdout and stderr into the CRI log file, so attach
//! follows that file from its end and sends each new line on the channel of its stream. For a
//! container with `stdin: true` the supervisor gives the process a FIFO as stdin and keeps it
//! open; attach writes the client's input into it. With `stdinOnce: true`, closing stdin on
//! the client marks it closed and the process then reads end of input.
//!
//! A container with `tty: true` runs on a pseudo-terminal whose master its supervisor keeps
//! ([`crate::pods::console`]): the terminal's output is in the log (stdout), the stdin FIFO
//! feeds the terminal, and resize messages go to the supervisor's resize FIFO as
//! `<columns> <rows>` lines. A `tty=true` request to a container without a terminal gets the
//! plain streams, as kubectl does itself for a container without `tty: true`.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncWriteExt as _;

use super::cri;
use super::exec::{
    CLOSE, ExecQuery, PROTOCOLS, RESIZE, STDERR, STDIN, STDOUT, finish, terminal_size,
};
use super::server::{ServerState, current_attempt};
use crate::pods::console::RESIZE_FIFO;
use crate::pods::layout::PodRecord;
use crate::pods::status::{AttemptState, attempt_state};
use crate::pods::supervisor::{EXIT_FILE, STDIN_CLOSED, STDIN_FIFO};

/// How often the log is checked for new output.
const POLL: Duration = Duration::from_millis(50);

/// Follows a CRI log from where it ends now.
struct Tail {
    file: PathBuf,
    offset: u64,
}

impl Tail {
    fn at_end(file: PathBuf) -> Self {
        let offset = std::fs::metadata(&file).map_or(0, |m| m.len());
        Tail { file, offset }
    }

    /// The complete entries appended since the last call, as (stream, bytes).
    fn read_new(&mut self) -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        let Ok(mut f) = std::fs::File::open(&self.file) else {
            return out;
        };
        // A rotation started a new, shorter file: read it from its start.
        if f.metadata().is_ok_and(|m| m.len() < self.offset) {
            self.offset = 0;
        }
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut buf).is_err() {
            return out;
        }
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return out;
        };
        self.offset += end as u64 + 1;
        // Split on `\n` only: a terminal's lines end in `\r`, which the client needs.
        for line in String::from_utf8_lossy(&buf[..end]).split('\n') {
            if let Some(e) = cri::parse_line(line) {
                let mut bytes = e.content.as_bytes().to_vec();
                if !e.partial {
                    bytes.push(b'\n');
                }
                let stream = if e.stream == "stderr" {
                    "stderr"
                } else {
                    "stdout"
                };
                out.push((stream, bytes));
            }
        }
        out
    }
}

/// The attach handler.
pub async fn attach(
    State(state): State<ServerState>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(raw): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let q = ExecQuery::parse(raw.as_deref().unwrap_or_default());
    if !(q.stdin || q.stdout || q.stderr) {
        return (
            StatusCode::BAD_REQUEST,
            "you must specify at least one of stdin, stdout, stderr",
        )
            .into_response();
    }
    let Some((uid, attempt)) = current_attempt(&state.layout, &namespace, &pod, &container) else {
        return (
            StatusCode::NOT_FOUND,
            format!("container \"{container}\" in pod \"{namespace}/{pod}\" is not on this node"),
        )
            .into_response();
    };
    let adir = state.layout.attempt(&uid, &container, attempt);
    if !matches!(attempt_state(&adir), AttemptState::Running(_)) {
        return (
            StatusCode::BAD_REQUEST,
            format!("container {container} is not running"),
        )
            .into_response();
    }
    let record = PodRecord {
        namespace,
        name: pod,
        uid,
    };
    let log = state.layout.log_file(&record, &container, attempt);
    ws.protocols(PROTOCOLS)
        .on_upgrade(move |socket| async move {
            let v5 = socket.protocol().is_some_and(|p| p == PROTOCOLS[0]);
            if let Err(e) = session(socket, v5, adir, log, q).await {
                tracing::debug!(error = %e, "attach session ended");
            }
        })
        .into_response()
}

/// Passes a resize message on to the supervisor of a container with a terminal.
fn send_resize(adir: &std::path::Path, payload: &[u8]) {
    let Some((columns, rows)) = terminal_size(payload) else {
        return;
    };
    let fifo = adir.join(RESIZE_FIFO);
    // Non-blocking: the supervisor holds the reading end; without it, there is no one to tell.
    let sent = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .and_then(|mut f| {
            use std::io::Write as _;
            f.write_all(format!("{columns} {rows}\n").as_bytes())
        });
    if let Err(e) = sent {
        tracing::debug!(fifo = %fifo.display(), error = %e, "passing on a resize");
    }
}

async fn open_stdin(adir: &std::path::Path) -> Option<tokio::net::unix::pipe::Sender> {
    let fifo = adir.join(STDIN_FIFO);
    if !fifo.exists() {
        return None;
    }
    match tokio::net::unix::pipe::OpenOptions::new().open_sender(&fifo) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(fifo = %fifo.display(), error = %e, "opening the container's stdin");
            None
        }
    }
}

async fn session(
    mut socket: WebSocket,
    v5: bool,
    adir: PathBuf,
    log: PathBuf,
    q: ExecQuery,
) -> anyhow::Result<()> {
    let mut tail = Tail::at_end(log);
    let mut stdin = if q.stdin {
        open_stdin(&adir).await
    } else {
        None
    };
    let mark_closed = || {
        let _ = std::fs::write(adir.join(STDIN_CLOSED), b"");
    };
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Read the exit marker first, so output written before it is still sent.
                let over = adir.join(EXIT_FILE).exists() || !adir.exists();
                for (stream, bytes) in tail.read_new() {
                    let channel = match stream {
                        "stderr" if q.stderr => STDERR,
                        "stdout" if q.stdout => STDOUT,
                        _ => continue,
                    };
                    let mut msg = Vec::with_capacity(bytes.len() + 1);
                    msg.push(channel);
                    msg.extend(bytes);
                    socket.send(Message::Binary(msg.into())).await?;
                }
                if over {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(data))) => match data.first() {
                    Some(&STDIN) => {
                        if let Some(w) = stdin.as_mut()
                            && w.write_all(&data[1..]).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    Some(&CLOSE) if v5 && data.get(1) == Some(&STDIN) => {
                        stdin = None;
                        mark_closed();
                    }
                    Some(&RESIZE) => send_resize(&adir, &data[1..]),
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    // The client detached; the process keeps running.
                    if q.stdin {
                        mark_closed();
                    }
                    return Ok(());
                }
                Some(Ok(_)) => {}
            },
        }
    }
    finish(socket, r#"{"metadata":{},"status":"Success"}"#).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reads_only_new_complete_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("0.log");
        std::fs::write(&file, "2024-01-01T00:00:00Z stdout F old\n").expect("write");
        let mut tail = Tail::at_end(file.clone());
        assert!(tail.read_new().is_empty());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .expect("open");
        use std::io::Write as _;
        write!(
            f,
            "2024-01-01T00:00:01Z stdout P par\n2024-01-01T00:00:01Z stdout F t\n\
             2024-01-01T00:00:02Z stderr F oops\n2024-01-01T00:00:02Z stdout F tty\r\n\
             2024-01-01T00:00:03Z stdout F half"
        )
        .expect("write");
        let got = tail.read_new();
        assert_eq!(
            got,
            [
                ("stdout", b"par".to_vec()),
                ("stdout", b"t\n".to_vec()),
                ("stderr", b"oops\n".to_vec()),
                ("stdout", b"tty\r\n".to_vec())
            ]
        );
        // Rotated: a new, shorter file is read from its start.
        std::fs::write(&file, "2024-01-01T00:00:04Z stdout F new\n").expect("write");
        assert_eq!(tail.read_new(), [("stdout", b"new\n".to_vec())]);
    }
}
