//! `GET /exec/{namespace}/{pod}/{container}?command=…&stdin=…&stdout=…&stderr=…`: runs a
//! command in a running container for `kubectl exec`, over a WebSocket speaking Kubernetes'
//! channel protocol (`v5.channel.k8s.io`, or `v4.channel.k8s.io`): every binary message starts
//! with a channel byte — 0 stdin, 1 stdout, 2 stderr, 3 the final `Status`, 4 terminal resize —
//! and in v5 a message `[255, channel]` closes that channel (the client's end of stdin).
//!
//! The process is started with `keelson-runtime exec`, so it joins the container's
//! namespaces and cgroup like any exec. Without a terminal, stdin/stdout/stderr are pipes;
//! with `tty=true` the runtime hands the pseudo-terminal's master to a console socket of
//! ours (as runc does), its output goes on stdout and resize messages set its window size.
//! The API server passes the upgrade through, so this is what `kubectl exec -it` talks to.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use super::server::{ServerState, current_attempt};
use crate::pods::layout::container_id;

pub(super) const STDIN: u8 = 0;
pub(super) const STDOUT: u8 = 1;
pub(super) const STDERR: u8 = 2;
const ERROR: u8 = 3;
pub(super) const RESIZE: u8 = 4;
/// v5: `[CLOSE, channel]` closes a channel.
pub(super) const CLOSE: u8 = 255;

pub(super) const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// What the client asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ExecQuery {
    pub(super) command: Vec<String>,
    pub(super) stdin: bool,
    pub(super) stdout: bool,
    pub(super) stderr: bool,
    pub(super) tty: bool,
}

impl ExecQuery {
    pub(super) fn parse(raw: &str) -> Self {
        let mut q = ExecQuery::default();
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            let on = matches!(v.as_ref(), "1" | "true" | "");
            match k.as_ref() {
                "command" => q.command.push(v.into_owned()),
                "stdin" => q.stdin = on,
                "stdout" => q.stdout = on,
                "stderr" => q.stderr = on,
                "tty" => q.tty = on,
                _ => {}
            }
        }
        q
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

/// The exec handler.
pub async fn exec(
    State(state): State<ServerState>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(raw): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let q = ExecQuery::parse(raw.as_deref().unwrap_or_default());
    if q.command.is_empty() {
        return bad_request("you must specify at least one command for the container".into());
    }
    let Some((uid, attempt)) = current_attempt(&state.layout, &namespace, &pod, &container) else {
        return (
            StatusCode::NOT_FOUND,
            format!("container \"{container}\" in pod \"{namespace}/{pod}\" is not on this node"),
        )
            .into_response();
    };
    let id = container_id(&uid, &container, attempt);
    let runtime = state.runtime_bin.clone();
    let root = state.layout.runtime_root();
    ws.protocols(PROTOCOLS)
        .on_upgrade(move |socket| async move {
            let v5 = socket.protocol().is_some_and(|p| p == PROTOCOLS[0]);
            if let Err(e) = session(socket, v5, runtime, root, id, q).await {
                tracing::debug!(error = %e, "exec session ended");
            }
        })
        .into_response()
}

/// Reads `from` and sends each chunk on `channel`.
async fn pump(mut from: impl AsyncRead + Unpin, channel: u8, out: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf[1..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                buf[0] = channel;
                if out.send(buf[..=n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The `Status` sent on the error channel when the command ends.
fn final_status(code: Option<i32>) -> String {
    match code {
        Some(0) => r#"{"metadata":{},"status":"Success"}"#.to_owned(),
        Some(c) => serde_json::json!({
            "metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {c}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]},
        })
        .to_string(),
        None => serde_json::json!({
            "metadata": {}, "status": "Failure",
            "message": "command terminated by a signal", "reason": "InternalError",
        })
        .to_string(),
    }
}

/// Where the client's stdin goes.
type StdinSink = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// A started exec: the runtime process, stdin, the terminal master (if any), output pumps.
type Started = (
    tokio::process::Child,
    Option<StdinSink>,
    Option<std::fs::File>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// `keelson-runtime --root ROOT exec`, killed if the session ends first.
fn runtime_exec(runtime: &Path, root: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(runtime);
    cmd.arg("--root").arg(root).arg("exec");
    cmd.kill_on_drop(true);
    cmd
}

fn start_with_pipes(
    runtime: &Path,
    root: &Path,
    id: &str,
    q: &ExecQuery,
    out: &mpsc::Sender<Vec<u8>>,
) -> anyhow::Result<Started> {
    let pipe = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    let mut child = runtime_exec(runtime, root)
        .arg(id)
        .arg("--")
        .args(&q.command)
        .stdin(pipe(q.stdin))
        .stdout(pipe(q.stdout))
        .stderr(pipe(q.stderr))
        .spawn()
        .with_context(|| format!("starting {}", runtime.display()))?;
    let mut pumps = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(stdout, STDOUT, out.clone())));
    }
    if let Some(stderr) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(stderr, STDERR, out.clone())));
    }
    let stdin = child.stdin.take().map(|s| Box::new(s) as StdinSink);
    Ok((child, stdin, None, pumps))
}

/// Runs the command on a pseudo-terminal whose master the runtime sends to our console
/// socket.
async fn start_with_terminal(
    runtime: &Path,
    root: &Path,
    id: &str,
    command: &[String],
    out: &mpsc::Sender<Vec<u8>>,
) -> anyhow::Result<Started> {
    let dir = tempfile::Builder::new().prefix("keelson-exec-").tempdir()?;
    let socket = dir.path().join("console.sock");
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    let mut child = runtime_exec(runtime, root)
        .arg("--tty")
        .arg("--console-socket")
        .arg(&socket)
        .arg(id)
        .arg("--")
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", runtime.display()))?;
    let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
    let conn = match accepted {
        Ok(Ok((conn, _))) => conn.into_std()?,
        _ => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err).await;
            }
            anyhow::bail!("the runtime sent no terminal: {}", err.trim());
        }
    };
    conn.set_nonblocking(false)?;
    let master = tokio::task::spawn_blocking(move || receive_fd(&conn)).await??;
    let master = std::fs::File::from(master);
    let reader = tokio::fs::File::from_std(master.try_clone()?);
    let writer = tokio::fs::File::from_std(master.try_clone()?);
    let mut pumps = vec![tokio::spawn(pump(reader, STDOUT, out.clone()))];
    // The runtime's own errors go to the user's terminal too (a TTY session has no stderr
    // channel); the command's output is on the pseudo-terminal.
    if let Some(stderr) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(stderr, STDOUT, out.clone())));
    }
    Ok((child, Some(Box::new(writer)), Some(master), pumps))
}

/// The file descriptor sent with SCM_RIGHTS on `conn`.
fn receive_fd(conn: &std::os::unix::net::UnixStream) -> anyhow::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .context("receiving the terminal")?;
    for c in msg.cmsgs().context("reading the control messages")? {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let Some(fd) = fds.first()
        {
            // SAFETY: the kernel just installed this descriptor in our table; we own it.
            return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    anyhow::bail!("the console socket carried no descriptor")
}

/// The (columns, rows) of a resize message (`{"Width": W, "Height": H}`).
pub(super) fn terminal_size(payload: &[u8]) -> Option<(u16, u16)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    let size = serde_json::from_slice::<Size>(payload).ok()?;
    Some((size.width, size.height))
}

/// Applies a resize message to the terminal.
fn resize(terminal: &std::fs::File, payload: &[u8]) {
    if let Some((columns, rows)) = terminal_size(payload) {
        crate::pods::console::set_size(terminal, columns, rows);
    }
}

async fn session(
    mut socket: WebSocket,
    v5: bool,
    runtime: PathBuf,
    root: PathBuf,
    id: String,
    q: ExecQuery,
) -> anyhow::Result<()> {
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
    let started = if q.tty {
        start_with_terminal(&runtime, &root, &id, &q.command, &out_tx).await
    } else {
        start_with_pipes(&runtime, &root, &id, &q, &out_tx)
    };
    drop(out_tx);
    let (mut child, mut stdin, terminal, pumps) = match started {
        Ok(s) => s,
        Err(e) => {
            let status = serde_json::json!({"metadata": {}, "status": "Failure",
                "message": format!("starting the command: {e:#}"), "reason": "InternalError"});
            return finish(socket, &status.to_string()).await;
        }
    };
    // Output until both pipes end, while feeding stdin from the client.
    loop {
        tokio::select! {
            chunk = out_rx.recv() => match chunk {
                Some(chunk) => socket.send(Message::Binary(chunk.into())).await?,
                None => break,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(data))) => match data.first() {
                    Some(&STDIN) => {
                        if let Some(w) = stdin.as_mut()
                            && w.write_all(&data[1..]).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    Some(&CLOSE) if v5 && data.get(1) == Some(&STDIN) => stdin = None,
                    Some(&RESIZE) => {
                        if let Some(t) = &terminal {
                            resize(t, &data[1..]);
                        }
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    // The client went away: the process goes too (kill on drop).
                    return Ok(());
                }
                Some(Ok(_)) => {}
            },
        }
    }
    drop(stdin);
    for p in pumps {
        let _ = p.await;
    }
    let status = child.wait().await?;
    finish(socket, &final_status(status.code())).await
}

/// Ends a session: the final `Status` on the error channel, then the closing handshake.
///
/// The handshake is waited for (briefly) rather than the socket dropped: a socket closed with
/// client messages still unread (a resize, a keystroke sent as the command exited) is reset
/// by the kernel, and a reset can discard the status and close frame before the client (or
/// the API server relaying the stream) has read them — kubectl then reports
/// "close 1006 (abnormal closure)" for a command that ended normally.
pub(super) async fn finish(mut socket: WebSocket, status: &str) -> anyhow::Result<()> {
    let mut msg = vec![ERROR];
    msg.extend(status.as_bytes());
    socket.send(Message::Binary(msg.into())).await?;
    socket
        .send(Message::Close(Some(CloseFrame {
            code: close_code::NORMAL,
            reason: "".into(),
        })))
        .await?;
    let drain = async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
    Ok(())
}

/// How long a finished session waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_like_the_kubelet() {
        let q = ExecQuery::parse("command=sh&command=-c&command=echo%20hi&stdin=true&stdout=1");
        assert_eq!(
            q,
            ExecQuery {
                command: vec!["sh".into(), "-c".into(), "echo hi".into()],
                stdin: true,
                stdout: true,
                stderr: false,
                tty: false,
            }
        );
    }

    #[test]
    fn final_status_carries_the_exit_code() {
        assert!(final_status(Some(0)).contains("Success"));
        let failed: serde_json::Value = serde_json::from_str(&final_status(Some(3))).unwrap();
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        assert_eq!(failed["reason"], "NonZeroExitCode");
    }
}
