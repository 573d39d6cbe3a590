//! The per-container supervisor: a small process, detached from the agent (own session), that
//! mounts the container's overlay root, creates and starts it with the runtime library, copies
//! its stdout/stderr into the CRI log file, waits for it, records how it ended in `exit.json`,
//! and removes it. Because it is not the agent, containers keep running while the agent
//! restarts; the agent finds them again through the files the supervisor writes.
//!
//! It must run single-threaded until the container's init is cloned (the runtime library's
//! rule); the log copiers start only after that.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use keelson_runtime::ContainerBuilder;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::console::{self, ConsoleSocket, RESIZE_FIFO, TTY_FILE};
use super::layout::{ExitRecord, now_rfc3339, write_json};
use crate::logs::cri;
use crate::logs::rotate::{Limits, RotatingLog};

/// What a supervisor runs.
#[derive(Debug)]
pub struct SuperviseSpec {
    /// The runtime's state root.
    pub runtime_root: PathBuf,
    /// The container id.
    pub id: String,
    /// The attempt directory: `config.json`, `layers.json`, `rootfs/`.
    pub bundle: PathBuf,
    /// Where the overlay's `upper/` and `work/` are (on disk, unlike the bundle).
    pub writable_layer: PathBuf,
    /// The CRI log file.
    pub log: PathBuf,
    /// When the log rotates.
    pub log_limits: Limits,
    /// The container's cgroup path.
    pub cgroup_path: String,
    /// Gets one byte once the container runs (the agent's wake-up); closed when we exit.
    pub started: Option<OwnedFd>,
}

/// Moves what standard output is (the agent's start pipe) to a close-on-exec descriptor of
/// its own, which the container does not inherit, and points standard output at /dev/null.
pub fn take_stdout() -> Option<OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: duplicating our own standard output; the copy is owned by no one else.
    let fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return None;
    }
    // SAFETY: just made above.
    let taken = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        dup2(null.as_raw_fd(), 1);
    }
    Some(taken)
}

/// Errors before the container runs (recorded as a start error).
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// A file or mount operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] keelson_runtime::Error),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SuperviseError {
    let path = path.to_owned();
    move |source| SuperviseError::Io {
        action,
        path,
        source,
    }
}

/// The files of a supervisor in its attempt directory.
pub const PID_FILE: &str = "supervisor.pid";
/// Written once the container's process runs: its start time, RFC 3339.
pub const STARTED_FILE: &str = "started";
/// Written when the attempt is over.
pub const EXIT_FILE: &str = "exit.json";
/// A FIFO the agent makes in the attempt directory for a container with `stdin: true`: the
/// container reads it as its standard input, `kubectl attach` writes into it. The supervisor
/// holds it open for writing, so the container sees no end of input between attaches.
pub const STDIN_FIFO: &str = "stdin";
/// Present (made by the agent) when the container has `stdinOnce: true`.
pub const STDIN_ONCE: &str = "stdin-once";
/// Made by `attach` when its client closed stdin; with [`STDIN_ONCE`] the supervisor then
/// lets go of the FIFO, so the container reads end of input once the attach is gone.
pub const STDIN_CLOSED: &str = "stdin-closed";

/// The container's end of the stdin FIFO (read) and the supervisor's (write), if the bundle
/// has one.
fn open_stdin(bundle: &Path) -> Result<Option<(OwnedFd, OwnedFd)>, SuperviseError> {
    open_fifo(&bundle.join(STDIN_FIFO))
}

/// Both ends of the FIFO at `path`, if there is one: the reader's and a writer that keeps
/// the reader from seeing end of input.
fn open_fifo(path: &Path) -> Result<Option<(OwnedFd, OwnedFd)>, SuperviseError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
    use nix::sys::stat::Mode;
    let path = path.to_owned();
    if !fs::symlink_metadata(&path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt as _;
        m.file_type().is_fifo()
    }) {
        return Ok(None);
    }
    let err = |e: nix::Error| io_err("open", &path)(e.into());
    // Non-blocking so that opening the read end does not wait for a writer; the write end
    // opened next is that writer.
    let read = open(
        &path,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(err)?;
    let write = open(&path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(err)?;
    fcntl(&read, FcntlArg::F_SETFL(OFlag::O_RDONLY)).map_err(err)?;
    Ok(Some((read, write)))
}

/// With `stdinOnce`, drops the supervisor's write end of the FIFO once an attach closed stdin.
fn release_stdin_after_attach(bundle: PathBuf, keeper: OwnedFd) {
    std::thread::spawn(move || {
        while !bundle.join(STDIN_CLOSED).exists() {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        drop(keeper);
    });
}

/// Mounts the overlay root of the bundle from `layers.json` (lowest layer first), writable in
/// `layer`.
fn mount_rootfs(bundle: &Path, layer: &Path) -> Result<(), SuperviseError> {
    let layers_path = bundle.join("layers.json");
    let text = fs::read(&layers_path).map_err(io_err("read", &layers_path))?;
    let layers: Vec<PathBuf> = serde_json::from_slice(&text)
        .map_err(|e| io_err("parse", &layers_path)(std::io::Error::other(e)))?;
    let rootfs = bundle.join("rootfs");
    let (upper, work) = (layer.join("upper"), layer.join("work"));
    for d in [&rootfs, &upper, &work] {
        fs::create_dir_all(d).map_err(io_err("create", d))?;
    }
    // overlayfs wants the uppermost lower layer first.
    let lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let lower = if lower.is_empty() {
        // An image without layers: an empty directory as the only lower layer.
        let empty = bundle.join("empty");
        fs::create_dir_all(&empty).map_err(io_err("create", &empty))?;
        empty.display().to_string()
    } else {
        lower.join(":")
    };
    let options = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| io_err("mount overlay on", &rootfs)(e.into()))
}

fn dup2(from: RawFd, to: RawFd) {
    // SAFETY: plain descriptor duplication on descriptors this process owns.
    unsafe { libc::dup2(from, to) };
}

/// Copies lines from `pipe` into the shared log as CRI lines on `stream`.
fn copy_lines(pipe: OwnedFd, stream: &'static str, log: Arc<Mutex<RotatingLog>>) {
    let reader = BufReader::new(File::from(pipe));
    for line in reader.split(b'\n') {
        let Ok(line) = line else { break };
        let entry = cri::format_line(&jiff::Timestamp::now(), stream, &line);
        if let Ok(mut f) = log.lock() {
            let _ = f.write_entry(&entry);
        }
    }
}

/// Runs the container to its end and records it; returns its exit code.
pub fn supervise(spec: &SuperviseSpec) -> i32 {
    let _ = write_json(
        &spec.bundle.join(PID_FILE),
        &(
            std::process::id(),
            keelson_runtime::state::proc_start_time(std::process::id() as i32)
                .map(|(s, _)| s)
                .unwrap_or(0),
        ),
    );
    let record = match run(spec) {
        Ok(record) => record,
        Err(e) => {
            tracing::error!(id = %spec.id, error = %e, "container did not start");
            ExitRecord {
                exit_code: 128,
                reason: "StartError".to_owned(),
                message: e.to_string(),
                started_at: None,
                finished_at: now_rfc3339(),
            }
        }
    };
    let _ = umount2(&spec.bundle.join("rootfs"), MntFlags::MNT_DETACH);
    if let Err(e) = write_json(&spec.bundle.join(EXIT_FILE), &record) {
        tracing::error!(id = %spec.id, error = %e, "writing exit record");
    }
    record.exit_code
}

/// Gives the supervisor a mount namespace of its own, a slave of the host's (volumes the agent
/// mounts later still reach it), before it mounts the container's root. The host's mount table
/// then does not grow with every running container: it did, and every read of mountinfo
/// (cgroups-rs reads it for each cgroup it opens) and every copy of the table for a new
/// container's mount namespace got slower with each pod on the node. The overlay goes away
/// with the supervisor's namespace. Must run while the supervisor is single-threaded.
fn own_mount_namespace() -> Result<(), SuperviseError> {
    let root = Path::new("/");
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| io_err("unshare the mount namespace at", root)(e.into()))?;
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| io_err("make the mounts slaves at", root)(e.into()))
}

fn run(spec: &SuperviseSpec) -> Result<ExitRecord, SuperviseError> {
    own_mount_namespace()?;
    mount_rootfs(&spec.bundle, &spec.writable_layer)?;
    if let Some(dir) = spec.log.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let log = RotatingLog::open(&spec.log, spec.log_limits).map_err(io_err("open", &spec.log))?;
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io_err("pipe", &spec.log)(e.into()))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let stdin = open_stdin(&spec.bundle)?;
    // `tty: true`: the runtime hands us the terminal's master through this socket.
    let console = if spec.bundle.join(TTY_FILE).exists() {
        Some(ConsoleSocket::bind().map_err(io_err("bind a console socket for", &spec.bundle))?)
    } else {
        None
    };
    // The init inherits descriptors 0, 1 and 2: point them at the pipes (and the stdin FIFO)
    // while it is cloned.
    // SAFETY: duplicating our own standard descriptors.
    let saved_in = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
    let saved_out = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
    let saved_err = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
    if let Some((read, _)) = &stdin {
        dup2(read.as_raw_fd(), 0);
    }
    dup2(out_w.as_raw_fd(), 1);
    dup2(err_w.as_raw_fd(), 2);
    let built = ContainerBuilder::new(&spec.id, &spec.runtime_root)
        .with_bundle(&spec.bundle)
        .and_then(|b| {
            let b = b.with_cgroup_path(&spec.cgroup_path);
            match &console {
                Some(c) => b.with_console_socket(c.path()),
                None => b,
            }
            .build()
        });
    dup2(saved_in, 0);
    dup2(saved_out, 1);
    dup2(saved_err, 2);
    // SAFETY: closing the saved copies made above.
    unsafe {
        libc::close(saved_in);
        libc::close(saved_out);
        libc::close(saved_err);
    }
    drop(out_w);
    drop(err_w);
    let mut container = built?;
    // With a terminal, the container's stdio is the terminal; the supervisor feeds it the
    // stdin FIFO. Otherwise only the container reads the FIFO. The supervisor keeps a writer.
    let terminal = match &console {
        Some(c) => match c.receive_master() {
            Ok(master) => Some(master),
            Err(e) => {
                let _ = container.delete(true);
                return Err(io_err("receive the terminal on", c.path())(e));
            }
        },
        None => None,
    };
    // The socket was only needed for the hand-over: remove it now, so that a supervisor
    // killed later leaves no directory behind.
    drop(console);
    let stdin_keeper = match (stdin, &terminal) {
        (Some((read, write)), Some(master)) => {
            let master = master
                .try_clone()
                .map_err(io_err("clone the terminal of", &spec.bundle))?;
            console::relay_input(read, master);
            Some(write)
        }
        (stdin, _) => stdin.map(|(_, write)| write),
    };
    let _resize_keeper = match &terminal {
        Some(master) => match open_fifo(&spec.bundle.join(RESIZE_FIFO))? {
            Some((read, write)) => {
                let master = master
                    .try_clone()
                    .map_err(io_err("clone the terminal of", &spec.bundle))?;
                console::relay_resize(read, master);
                Some(write)
            }
            None => None,
        },
        None => None,
    };
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        return Err(e.into());
    }
    let started_at = now_rfc3339();
    let _ = fs::write(spec.bundle.join(STARTED_FILE), &started_at);
    if let Some(fd) = &spec.started {
        let _ = nix::unistd::write(fd, b"s");
    }
    // Held until the container ends, unless stdinOnce lets it go after the first attach.
    let _stdin_keeper = match stdin_keeper {
        Some(k) if spec.bundle.join(STDIN_ONCE).exists() => {
            release_stdin_after_attach(spec.bundle.clone(), k);
            None
        }
        other => other,
    };
    let log = Arc::new(Mutex::new(log));
    let copiers = [(out_r, "stdout"), (err_r, "stderr")].map(|(pipe, stream)| {
        let log = Arc::clone(&log);
        std::thread::spawn(move || copy_lines(pipe, stream, log))
    });
    let terminal_done = terminal.map(|master| console::copy_output(master, Arc::clone(&log)));
    let code = container.wait()?;
    for c in copiers {
        let _ = c.join();
    }
    // The terminal's output ends when its last holder closes it; a process that left the
    // container with it must not keep the exit from being recorded.
    if let Some(done) = terminal_done {
        let _ = done.recv_timeout(std::time::Duration::from_secs(2));
    }
    let oom = container
        .cgroup()
        .and_then(|c| Ok(c.oom_kill_count()?))
        .unwrap_or(0)
        > 0;
    let reason = if oom {
        "OOMKilled"
    } else if code == 0 {
        "Completed"
    } else {
        "Error"
    };
    if let Err(e) = container.delete(true) {
        tracing::warn!(id = %spec.id, error = %e, "removing the container");
    }
    Ok(ExitRecord {
        exit_code: code,
        reason: reason.to_owned(),
        message: String::new(),
        started_at: Some(started_at),
        finished_at: now_rfc3339(),
    })
}
