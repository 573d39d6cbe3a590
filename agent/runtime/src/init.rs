//! The container's init: the process `clone(2)`d into the new namespaces. It
//! waits until the runtime placed it in its cgroup, joins and unshares the
//! remaining namespaces, prepares the root file system, hostname, rlimits,
//! terminal, user, capabilities and no_new_privs, reports "ready", blocks on
//! the exec FIFO until `start`, and finally `execve(2)`s the user process.

use std::collections::HashSet;
use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::sched::{CloneFlags, unshare};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::stat::{Mode, umask};
use nix::unistd::{
    AccessFlags, Gid, Uid, access, chdir, execve, setgroups, sethostname, setresgid, setresuid,
    setsid,
};
use oci_spec::runtime::{Capabilities, PosixRlimitType, Process, Spec};

use crate::cgroups::CgroupLayout;
use crate::channel;
use crate::hooks;
use crate::namespaces::{self, NamespacePlan};
use crate::rootfs::{self, RootfsConfig};
use crate::state::{ContainerStatus, OciState};

/// Errors of the init, sent to the runtime as text.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error(transparent)]
    Namespace(#[from] namespaces::NamespaceError),
    #[error("{syscall} {context}: {errno}")]
    Sys {
        syscall: &'static str,
        context: String,
        errno: nix::Error,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("capabilities: {0}")]
    Caps(String),
    #[error("spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Hook(#[from] hooks::HookError),
    #[error("executable {0:?} not found in $PATH")]
    NotFound(String),
}

type Result<T, E = InitError> = std::result::Result<T, E>;

fn sys(syscall: &'static str, context: impl Into<String>) -> impl FnOnce(nix::Error) -> InitError {
    let context = context.into();
    move |errno| InitError::Sys {
        syscall,
        context,
        errno,
    }
}

/// Everything the init needs, prepared by the runtime before `clone(2)`.
pub(crate) struct InitArgs {
    pub id: String,
    pub spec: Spec,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub plan: NamespacePlan,
    pub no_pivot: bool,
    pub cgroup_layout: CgroupLayout,
    pub cgroup_path: String,
    /// `O_PATH` descriptor of the exec FIFO, reopened for writing via /proc.
    pub fifo_fd: RawFd,
    /// The init's end of the socket pair.
    pub init_sock: RawFd,
    /// The runtime's end, closed first thing in the init.
    pub runtime_sock: RawFd,
    /// A connected `--console-socket`, if the process wants a terminal.
    pub console_sock: Option<RawFd>,
}

/// Runs the init; never returns. Called in the cloned child.
pub(crate) fn run(args: InitArgs) -> isize {
    // SAFETY: the fds were created by the runtime for the init and are not
    // owned by anything else in this (copied) address space.
    unsafe { libc::close(args.runtime_sock) };
    let mut sock = unsafe { UnixStream::from_raw_fd(args.init_sock) };
    // The runtime may block signals (`run` queues them to forward them):
    // the container starts with none blocked.
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    let mut ready_sent = false;
    let err = match setup(&args, &mut sock, &mut ready_sent) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    let message = err.to_string();
    if ready_sent || channel::send_failure(&mut sock, &message).is_err() {
        let _ = writeln!(std::io::stderr(), "keelson-runtime init: {message}");
    }
    // SAFETY: leaving the child without running the parent's exit handlers.
    unsafe { libc::_exit(1) }
}

fn setup(args: &InitArgs, sock: &mut UnixStream, ready_sent: &mut bool) -> Result<Infallible> {
    let host_pid = channel::read_go(sock)
        .map_err(|source| InitError::Io {
            action: "wait for the runtime",
            path: PathBuf::from("<sync socket>"),
            source,
        })?
        .ok_or_else(|| InitError::Spec("runtime aborted the creation".into()))?;
    let hook_state = OciState {
        oci_version: crate::container::OCI_VERSION.to_owned(),
        id: args.id.clone(),
        status: ContainerStatus::Creating,
        pid: Some(host_pid),
        bundle: args.bundle.clone(),
        rootfs: Some(args.rootfs.clone()),
        created: None,
        annotations: args.spec.annotations().clone().unwrap_or_default(),
    };
    let spec_hooks = args.spec.hooks().clone().unwrap_or_default();
    for (flag, path) in &args.plan.join {
        let file = namespaces::open(path)?;
        namespaces::enter(&file, *flag, path)?;
    }
    if args.plan.new_cgroup {
        unshare(CloneFlags::CLONE_NEWCGROUP).map_err(sys("unshare", "cgroup namespace"))?;
    }
    if !args.plan.new_mount_namespace() {
        return Err(InitError::Spec(
            "keelson-runtime needs a new mount namespace (linux.namespaces: mount, no path)".into(),
        ));
    }
    umask(Mode::empty());
    let linux = args.spec.linux().clone().unwrap_or_default();
    let mounts = args.spec.mounts().clone().unwrap_or_default();
    let devices = linux.devices().clone().unwrap_or_default();
    rootfs::prepare(&RootfsConfig {
        rootfs: &args.rootfs,
        bundle: &args.bundle,
        mounts: &mounts,
        propagation: linux.rootfs_propagation().as_deref(),
        devices: &devices,
        cgroup_layout: args.cgroup_layout,
        cgroup_path: &args.cgroup_path,
    })?;
    hooks::run(
        spec_hooks.create_container().as_deref().unwrap_or_default(),
        &hook_state,
    )?;
    rootfs::enter(&args.rootfs, args.no_pivot)?;
    if let Some(sysctl) = linux.sysctl() {
        for (key, value) in sysctl {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value).map_err(|source| InitError::Io {
                action: "write sysctl",
                path,
                source,
            })?;
        }
    }
    rootfs::mask_paths(linux.masked_paths().as_deref().unwrap_or_default())?;
    rootfs::readonly_paths(linux.readonly_paths().as_deref().unwrap_or_default())?;
    if args.spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        rootfs::readonly_root()?;
    }
    if let Some(hostname) = args.spec.hostname() {
        if !args.plan.new_uts_namespace() {
            return Err(InitError::Spec(
                "hostname set without a new UTS namespace".into(),
            ));
        }
        sethostname(hostname).map_err(sys("sethostname", hostname.clone()))?;
    }
    if let Some(domain) = args.spec.domainname() {
        let c = CString::new(domain.as_str())
            .map_err(|_| InitError::Spec("domainname has NUL".into()))?;
        // SAFETY: plain syscall with a valid buffer.
        if unsafe { libc::setdomainname(c.as_ptr(), domain.len()) } != 0 {
            return Err(sys("setdomainname", domain.clone())(nix::Error::last()));
        }
    }
    let process = args
        .spec
        .process()
        .clone()
        .ok_or_else(|| InitError::Spec("no process in config.json".into()))?;
    set_rlimits(&process)?;
    if let Some(adj) = process.oom_score_adj() {
        let path = PathBuf::from("/proc/self/oom_score_adj");
        std::fs::write(&path, adj.to_string()).map_err(|source| InitError::Io {
            action: "write",
            path,
            source,
        })?;
    }
    if process.terminal() == Some(true) {
        let console = args.console_sock.ok_or_else(|| {
            InitError::Spec("process.terminal is true but no --console-socket was given".into())
        })?;
        setup_terminal(console)?;
    } else {
        setsid().map_err(sys("setsid", ""))?;
    }
    if process.no_new_privileges() == Some(true) {
        nix::sys::prctl::set_no_new_privs().map_err(sys("prctl", "PR_SET_NO_NEW_PRIVS"))?;
    }
    set_user_and_caps(&process)?;
    let mask = process.user().umask().unwrap_or(0o022);
    umask(Mode::from_bits_truncate(mask));
    chdir(process.cwd().as_path()).map_err(sys("chdir", process.cwd().display().to_string()))?;
    let (c_path, c_argv, c_env) = exec_args(&process)?;

    channel::send(sock, channel::READY).map_err(|source| InitError::Io {
        action: "report ready",
        path: PathBuf::from("<sync socket>"),
        source,
    })?;
    *ready_sent = true;
    // End of report: the runtime's read_to_end returns. (The descriptor
    // itself is close-on-exec.)
    let _ = sock.shutdown(std::net::Shutdown::Both);

    wait_for_start(args.fifo_fd)?;
    hooks::run(
        spec_hooks.start_container().as_deref().unwrap_or_default(),
        &OciState {
            status: ContainerStatus::Created,
            ..hook_state
        },
    )?;
    crate::signal::reset_for_exec();
    let errno = match execve(&c_path, &c_argv, &c_env) {
        Ok(never) => match never {},
        Err(errno) => errno,
    };
    Err(sys("execve", c_path.to_string_lossy().into_owned())(errno))
}

fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes)
        .map_err(|_| InitError::Spec("argument or environment entry contains NUL".into()))
}

/// Blocks until `start` opens the FIFO for reading, then writes one byte.
fn wait_for_start(fifo_fd: RawFd) -> Result<()> {
    let path = PathBuf::from(format!("/proc/self/fd/{fifo_fd}"));
    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|source| InitError::Io {
            action: "open exec fifo (is /proc mounted?)",
            path: path.clone(),
            source,
        })?;
    fifo.write_all(b"0").map_err(|source| InitError::Io {
        action: "write exec fifo",
        path,
        source,
    })?;
    // The O_PATH descriptor is close-on-exec.
    drop(fifo);
    Ok(())
}

fn find_executable(program: &str, env: &[String]) -> Result<PathBuf> {
    let executable = |p: &Path| p.is_file() && access(p, AccessFlags::X_OK).is_ok();
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(InitError::NotFound(program.to_owned()))
        };
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path_var
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| InitError::NotFound(program.to_owned()))
}

fn set_rlimits(process: &Process) -> Result<()> {
    for limit in process.rlimits().as_deref().unwrap_or_default() {
        let resource = match limit.typ() {
            PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
            PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
            PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
            PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
            PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
            PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
            PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
            PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
            PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
            PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
            PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
            PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
            PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
            PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
            PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
            PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
        };
        let value = libc::rlimit {
            rlim_cur: limit.soft(),
            rlim_max: limit.hard(),
        };
        // SAFETY: plain syscall with a valid struct.
        if unsafe { libc::setrlimit(resource, &value) } != 0 {
            return Err(sys("setrlimit", format!("{:?}", limit.typ()))(
                nix::Error::last(),
            ));
        }
    }
    Ok(())
}

/// Opens a pseudo-terminal in the container's devpts, sends its master to
/// the `--console-socket`, and makes the slave the controlling terminal and
/// stdio.
fn setup_terminal(console: RawFd) -> Result<()> {
    let pty = nix::pty::openpty(None, None).map_err(sys("openpty", "/dev/ptmx"))?;
    let fds = [pty.master.as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        console,
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(sys("sendmsg", "console socket"))?;
    // SAFETY: the console socket is ours and done with.
    unsafe { libc::close(console) };
    drop(pty.master);
    setsid().map_err(sys("setsid", ""))?;
    let slave: OwnedFd = pty.slave;
    // SAFETY: TIOCSCTTY on a terminal we own.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(sys("ioctl", "TIOCSCTTY")(nix::Error::last()));
    }
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors.
        if unsafe { libc::dup2(slave.as_raw_fd(), target) } < 0 {
            return Err(sys("dup2", format!("pty to fd {target}"))(
                nix::Error::last(),
            ));
        }
    }
    Ok(())
}

fn to_caps(set: &Option<Capabilities>) -> Result<HashSet<caps::Capability>> {
    let mut out = HashSet::new();
    for cap in set.iter().flatten() {
        let name = format!("CAP_{cap}");
        match caps::Capability::from_str(&name) {
            Ok(c) => {
                out.insert(c);
            }
            Err(_) => {
                tracing::warn!(capability = %name, "capability unknown to this runtime, skipped")
            }
        }
    }
    Ok(out)
}

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> InitError {
    move |e| InitError::Caps(format!("{what}: {e}"))
}

fn set_user_and_caps(process: &Process) -> Result<()> {
    let spec_caps = process.capabilities().clone().unwrap_or_default();
    let bounding = to_caps(spec_caps.bounding())?;
    let effective = to_caps(spec_caps.effective())?;
    let permitted = to_caps(spec_caps.permitted())?;
    let inheritable = to_caps(spec_caps.inheritable())?;
    let ambient = to_caps(spec_caps.ambient())?;
    if process.capabilities().is_some() {
        for cap in caps::all() {
            if !bounding.contains(&cap)
                && caps::has_cap(None, caps::CapSet::Bounding, cap).unwrap_or(false)
            {
                caps::drop(None, caps::CapSet::Bounding, cap)
                    .map_err(caps_err("drop from bounding set"))?;
            }
        }
    }
    let user = process.user();
    let uid = Uid::from_raw(user.uid());
    let gid = Gid::from_raw(user.gid());
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&groups).map_err(sys("setgroups", format!("{groups:?}")))?;
    setresgid(gid, gid, gid).map_err(sys("setresgid", gid.to_string()))?;
    nix::sys::prctl::set_keepcaps(true).map_err(sys("prctl", "PR_SET_KEEPCAPS"))?;
    setresuid(uid, uid, uid).map_err(sys("setresuid", uid.to_string()))?;
    if process.capabilities().is_some() {
        caps::set(None, caps::CapSet::Inheritable, &inheritable)
            .map_err(caps_err("set inheritable"))?;
        caps::set(
            None,
            caps::CapSet::Effective,
            &effective.intersection(&permitted).copied().collect(),
        )
        .map_err(caps_err("set effective"))?;
        caps::set(None, caps::CapSet::Permitted, &permitted).map_err(caps_err("set permitted"))?;
        caps::clear(None, caps::CapSet::Ambient).map_err(caps_err("clear ambient"))?;
        // The kernel raises an ambient capability only if it is permitted
        // and inheritable; like runc, skip the others with a warning.
        for cap in ambient {
            if !(permitted.contains(&cap) && inheritable.contains(&cap)) {
                tracing::warn!(capability = %cap, "ambient capability not permitted and inheritable, skipped");
                continue;
            }
            caps::raise(None, caps::CapSet::Ambient, cap).map_err(caps_err("raise ambient"))?;
        }
    }
    Ok(())
}

/// What the helper of `exec` needs, prepared by the runtime before `fork`.
pub(crate) struct ExecArgs {
    /// The process to run.
    pub process: Process,
    /// The container's namespaces, opened from `/proc/<init>/ns/*`, in the
    /// order they are entered (mount last).
    pub namespaces: Vec<(CloneFlags, File, PathBuf)>,
    /// The helper's end of the socket pair.
    pub helper_sock: RawFd,
    /// The runtime's end, closed first thing.
    pub runtime_sock: RawFd,
    /// A connected `--console-socket`, if the process wants a terminal.
    pub console_sock: Option<RawFd>,
}

/// The forked helper of `exec`: enters the container's namespaces, forks
/// the process (which lands in the container's PID namespace), reports its
/// PID and exits. Never returns.
pub(crate) fn exec_helper(args: ExecArgs) -> ! {
    // SAFETY: the runtime's end is not used in the helper.
    unsafe { libc::close(args.runtime_sock) };
    // SAFETY: the helper's end was made for us and nothing else owns it.
    let mut sock = unsafe { UnixStream::from_raw_fd(args.helper_sock) };
    let result = exec_helper_steps(&args, &mut sock);
    if let Err(e) = result {
        let _ = channel::send_failure(&mut sock, &e.to_string());
    }
    // SAFETY: leave without the parent's exit handlers.
    unsafe { libc::_exit(0) }
}

fn exec_helper_steps(args: &ExecArgs, sock: &mut UnixStream) -> Result<()> {
    channel::read_go(sock)
        .map_err(|source| InitError::Io {
            action: "wait for the runtime",
            path: PathBuf::from("<sync socket>"),
            source,
        })?
        .ok_or_else(|| InitError::Spec("runtime aborted the exec".into()))?;
    for (flag, file, path) in &args.namespaces {
        namespaces::enter(file, *flag, path)?;
    }
    let (gate_read, gate_write) = nix::unistd::pipe().map_err(sys("pipe", "exec gate"))?;
    // SAFETY: the helper is single-threaded (a fork of the runtime).
    match unsafe { nix::unistd::fork() }.map_err(sys("fork", "exec process"))? {
        nix::unistd::ForkResult::Child => {
            drop(gate_write);
            // Wait until the helper told the runtime our PID, so that our
            // own report (if any) comes after it.
            let mut gate = File::from(gate_read);
            let mut byte = [0u8; 1];
            let _ = gate.read(&mut byte);
            drop(gate);
            let err = match exec_process(args) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let _ = channel::send_failure(sock, &err.to_string());
            // SAFETY: leave without the parent's exit handlers.
            unsafe { libc::_exit(127) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(gate_read);
            channel::send_pid(sock, child.as_raw()).map_err(|source| InitError::Io {
                action: "report exec pid",
                path: PathBuf::from("<sync socket>"),
                source,
            })?;
            let mut gate = File::from(gate_write);
            let _ = gate.write_all(b"1");
            Ok(())
        }
    }
}

fn exec_process(args: &ExecArgs) -> Result<Infallible> {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    let process = &args.process;
    if process.terminal() == Some(true) {
        let console = args.console_sock.ok_or_else(|| {
            InitError::Spec("process.terminal is true but no --console-socket was given".into())
        })?;
        setup_terminal(console)?;
    } else {
        setsid().map_err(sys("setsid", ""))?;
    }
    if process.no_new_privileges() == Some(true) {
        nix::sys::prctl::set_no_new_privs().map_err(sys("prctl", "PR_SET_NO_NEW_PRIVS"))?;
    }
    set_user_and_caps(process)?;
    if let Some(mask) = process.user().umask() {
        umask(Mode::from_bits_truncate(mask));
    }
    chdir(process.cwd().as_path()).map_err(sys("chdir", process.cwd().display().to_string()))?;
    let (c_path, c_argv, c_env) = exec_args(process)?;
    crate::signal::reset_for_exec();
    let errno = match execve(&c_path, &c_argv, &c_env) {
        Ok(never) => match never {},
        Err(errno) => errno,
    };
    Err(sys("execve", c_path.to_string_lossy().into_owned())(errno))
}

/// The program (resolved against the process's `PATH`), argv and environment of `process`,
/// ready for `execve`.
fn exec_args(process: &Process) -> Result<(CString, Vec<CString>, Vec<CString>)> {
    let argv = process.args().clone().unwrap_or_default();
    let env = process.env().clone().unwrap_or_default();
    let program = argv
        .first()
        .ok_or_else(|| InitError::Spec("process.args is empty".into()))?;
    let path = find_executable(program, &env)?;
    let c_path = cstring(path.as_os_str().as_bytes())?;
    let c_argv = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    let c_env = env
        .iter()
        .map(|e| cstring(e.as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    Ok((c_path, c_argv, c_env))
}
