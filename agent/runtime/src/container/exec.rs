//! `exec`: runs another process in a running container — in its
//! namespaces and cgroup, with its own user, capabilities, cwd, env and
//! optional terminal.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork};
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use super::Container;
use crate::channel;
use crate::error::{Error, Result};
use crate::init::{self, ExecArgs};
use crate::namespaces;
use crate::state::ContainerStatus;

/// Options of [`Container::exec`].
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Unix socket that receives the master of the process's terminal.
    pub console_socket: Option<PathBuf>,
}

/// The order in which the container's namespaces are entered: the mount
/// namespace last, since entering it changes what `/proc` paths mean.
const ENTER_ORDER: [(LinuxNamespaceType, CloneFlags, &str); 6] = [
    (LinuxNamespaceType::Ipc, CloneFlags::CLONE_NEWIPC, "ipc"),
    (LinuxNamespaceType::Uts, CloneFlags::CLONE_NEWUTS, "uts"),
    (LinuxNamespaceType::Network, CloneFlags::CLONE_NEWNET, "net"),
    (LinuxNamespaceType::Pid, CloneFlags::CLONE_NEWPID, "pid"),
    (
        LinuxNamespaceType::Cgroup,
        CloneFlags::CLONE_NEWCGROUP,
        "cgroup",
    ),
    (LinuxNamespaceType::Mount, CloneFlags::CLONE_NEWNS, "mnt"),
];

impl Container {
    /// The `process` of the container's `config.json`, the base that `exec`
    /// overrides (args, env, cwd, user, terminal).
    ///
    /// # Errors
    /// [`Error::Bundle`] if the spec cannot be read or has no process.
    pub fn spec_process(&self) -> Result<Process> {
        let path = self.bundle().join("config.json");
        let spec = Spec::load(&path).map_err(|e| Error::Bundle {
            path: path.clone(),
            message: e.to_string(),
        })?;
        spec.process().clone().ok_or_else(|| Error::Bundle {
            path,
            message: "no process".into(),
        })
    }

    /// Starts `process` inside the running container and returns its host
    /// PID once it has exec'd. The calling process becomes a child
    /// subreaper, so it can [`waitpid`] the returned PID (see
    /// [`super::wait_forwarding_signals`]).
    ///
    /// # Errors
    /// [`Error::WrongStatus`] unless the container runs; [`Error::Init`] with
    /// the message of the helper or process that failed before `execve`.
    pub fn exec(&self, process: &Process, options: &ExecOptions) -> Result<Pid> {
        let status = self.status();
        if status != ContainerStatus::Running {
            return Err(Error::WrongStatus {
                id: self.id().to_owned(),
                status,
                action: "exec a process",
            });
        }
        let path = self.bundle().join("config.json");
        let spec = Spec::load(&path).map_err(|e| Error::Bundle {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let wanted: Vec<LinuxNamespaceType> = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .iter()
            .map(|n| n.typ())
            .collect();
        let mut ns = Vec::new();
        for (typ, flag, name) in ENTER_ORDER {
            if wanted.contains(&typ) {
                let path = PathBuf::from(format!("/proc/{}/ns/{name}", self.pid()));
                ns.push((flag, namespaces::open(&path)?, path));
            }
        }
        let console = match &options.console_socket {
            Some(path) => Some(
                UnixStream::connect(path)
                    .map_err(|e| Error::io("connect console socket", path, e))?,
            ),
            None => None,
        };
        let cgroup = self.cgroup()?;
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| Error::sys("prctl", "PR_SET_CHILD_SUBREAPER", e))?;
        let (mut runtime_sock, helper_sock) =
            UnixStream::pair().map_err(|e| Error::io("socketpair", "<sync>", e))?;
        let args = ExecArgs {
            process: process.clone(),
            namespaces: ns,
            helper_sock: helper_sock.as_raw_fd(),
            runtime_sock: runtime_sock.as_raw_fd(),
            console_sock: console.as_ref().map(|c| c.as_raw_fd()),
        };
        // SAFETY: the helper only runs `init::exec_helper`, which ends in
        // _exit; the runtime binary is single-threaded here.
        let helper = match unsafe { fork() }.map_err(|e| Error::sys("fork", "exec helper", e))? {
            ForkResult::Child => init::exec_helper(args),
            ForkResult::Parent { child } => child,
        };
        drop(args);
        drop(helper_sock);
        drop(console);
        let report = cgroup
            .add_process(helper.as_raw())
            .map_err(Error::from)
            .and_then(|()| {
                channel::send_go(&mut runtime_sock, helper.as_raw())
                    .map_err(|e| Error::io("signal exec helper", "<sync socket>", e))?;
                channel::read_exec_report(&mut runtime_sock)
                    .map_err(|e| Error::io("read exec report", "<sync socket>", e))
            });
        let _ = waitpid(helper, None);
        let (pid, error) = match report {
            Ok(r) => r,
            Err(e) => {
                let _ = nix::sys::signal::kill(helper, nix::sys::signal::Signal::SIGKILL);
                return Err(e);
            }
        };
        match (pid, error) {
            (Some(pid), None) => {
                tracing::info!(id = self.id(), pid, "exec'd");
                Ok(Pid::from_raw(pid))
            }
            (pid, Some(message)) => {
                if let Some(pid) = pid {
                    let _ = waitpid(Pid::from_raw(pid), None);
                }
                Err(Error::Init(message))
            }
            (None, None) => Err(Error::Init(
                "the exec helper exited without reporting".into(),
            )),
        }
    }
}
