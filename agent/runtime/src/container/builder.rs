//! `create`: a builder that turns an OCI bundle into a created container —
//! state directory, cgroup, exec FIFO and an init cloned into its new
//! namespaces, waiting for `start`.

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sched::{CloneFlags, clone};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{Pid, mkfifo};
use oci_spec::runtime::Spec;

use super::{Container, validate_id};
use crate::cgroups::{CgroupError, CgroupManager};
use crate::channel::{self, InitReport};
use crate::error::{Error, Result};
use crate::hooks;
use crate::init::{self, InitArgs};
use crate::namespaces::{self, NamespacePlan};
use crate::state::{ContainerStatus, EXEC_FIFO, OciState, StateRecord, proc_start_time};

/// Stack size of the cloned init before it execs.
const INIT_STACK: usize = 8 << 20;

/// Creates a container from a bundle.
///
/// ```no_run
/// # fn main() -> keelson_runtime::Result<()> {
/// use keelson_runtime::ContainerBuilder;
/// let mut c = ContainerBuilder::new("web", "/run/keelson-runtime")
///     .with_bundle("/srv/bundles/web")?
///     .build()?;
/// c.start()?;
/// let code = c.wait()?;
/// c.delete(false)?;
/// # let _ = code; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ContainerBuilder {
    id: String,
    root: PathBuf,
    bundle: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    console_socket: Option<PathBuf>,
    no_pivot: bool,
    cgroup_path: Option<String>,
}

/// Undoes a half-made creation unless disarmed.
struct Cleanup {
    state_dir: PathBuf,
    cgroup: Option<CgroupManager>,
    child: Option<Pid>,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(pid) = self.child {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        if let Some(cgroup) = &self.cgroup
            && let Err(e) = cgroup.remove(Duration::from_secs(5))
        {
            tracing::warn!(error = %e, "removing cgroup after failed create");
        }
        let _ = fs::remove_dir_all(&self.state_dir);
    }
}

impl ContainerBuilder {
    /// A builder for container `id` with state under `root`.
    pub fn new(id: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        ContainerBuilder {
            id: id.into(),
            root: root.into(),
            bundle: None,
            pid_file: None,
            console_socket: None,
            no_pivot: false,
            cgroup_path: None,
        }
    }

    /// The bundle directory holding `config.json`.
    ///
    /// # Errors
    /// [`Error::Bundle`] if the directory does not exist.
    pub fn with_bundle(mut self, bundle: impl AsRef<Path>) -> Result<Self> {
        let bundle = bundle.as_ref();
        let abs = fs::canonicalize(bundle).map_err(|e| Error::Bundle {
            path: bundle.to_owned(),
            message: e.to_string(),
        })?;
        self.bundle = Some(abs);
        Ok(self)
    }

    /// Writes the init's host PID to this file once created.
    pub fn with_pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// Sends the master of the container's terminal to this Unix socket
    /// (for `process.terminal: true`).
    pub fn with_console_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.console_socket = Some(path.into());
        self
    }

    /// Uses `MS_MOVE` + `chroot` instead of `pivot_root`.
    pub fn with_no_pivot(mut self, no_pivot: bool) -> Self {
        self.no_pivot = no_pivot;
        self
    }

    /// Overrides the cgroup path (default: the spec's `linux.cgroupsPath`,
    /// else `keelson/<id>`).
    pub fn with_cgroup_path(mut self, path: impl Into<String>) -> Self {
        self.cgroup_path = Some(path.into());
        self
    }

    /// Creates the container: its init runs in new namespaces and cgroup and
    /// waits for [`Container::start`].
    ///
    /// The init is `clone(2)`d from the calling process and runs Rust code
    /// (allocating) until it execs: call this from a single-threaded process,
    /// as the `keelson-runtime` binary does. In a multi-threaded process a
    /// thread holding the allocator's lock at that instant would deadlock the
    /// init; such callers should run the binary instead.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::AlreadyExists`], [`Error::Bundle`] for
    /// an unreadable spec, [`Error::Namespace`]/[`Error::Cgroup`] for setup
    /// failures in the runtime, [`Error::Init`] with the init's own message
    /// if it failed inside the container. Nothing is left behind on error.
    pub fn build(self) -> Result<Container> {
        validate_id(&self.id)?;
        let bundle = match &self.bundle {
            Some(b) => b.clone(),
            None => std::env::current_dir().map_err(|e| Error::io("getcwd", ".", e))?,
        };
        let config = bundle.join("config.json");
        let spec = Spec::load(&config).map_err(|e| Error::Bundle {
            path: config.clone(),
            message: e.to_string(),
        })?;
        let root_path = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| Error::Bundle {
                path: config.clone(),
                message: "no root.path".into(),
            })?;
        let rootfs = if root_path.is_absolute() {
            root_path
        } else {
            bundle.join(root_path)
        };
        let rootfs = fs::canonicalize(&rootfs).map_err(|e| Error::Bundle {
            path: rootfs.clone(),
            message: format!("rootfs: {e}"),
        })?;
        let linux = spec.linux().clone().unwrap_or_default();
        let plan = NamespacePlan::from_spec(linux.namespaces().as_deref().unwrap_or_default())?;
        warn_unsupported(&spec, &self.id);
        if spec.process().is_none() {
            return Err(Error::Bundle {
                path: config,
                message: "no process".into(),
            });
        }

        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| Error::io("create state root", &self.root, e))?;
        let state_dir = self.root.join(&self.id);
        match fs::DirBuilder::new().mode(0o700).create(&state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(self.id.clone()));
            }
            Err(e) => return Err(Error::io("create state directory", &state_dir, e)),
        }
        let mut cleanup = Cleanup {
            state_dir: state_dir.clone(),
            cgroup: None,
            child: None,
            armed: true,
        };

        let cgroup_path = self
            .cgroup_path
            .clone()
            .or_else(|| {
                linux
                    .cgroups_path()
                    .as_ref()
                    .map(|p| p.display().to_string())
            })
            .unwrap_or_else(|| format!("keelson/{}", self.id));
        let cgroup = CgroupManager::create(&cgroup_path)?;
        if !cgroup.processes().is_empty() {
            // Not ours: leave it alone (the cleanup does not know it yet).
            return Err(CgroupError::InUse(cgroup.path().to_owned()).into());
        }
        let cgroup_layout = cgroup.layout();
        let cgroup_path = cgroup.path().to_owned();
        cleanup.cgroup = Some(cgroup);
        if let Some(cgroup) = &cleanup.cgroup {
            let devices = linux.devices().clone().unwrap_or_default();
            cgroup.apply(linux.resources().as_ref(), &devices)?;
        }

        let fifo_path = state_dir.join(EXEC_FIFO);
        mkfifo(&fifo_path, Mode::from_bits_truncate(0o622))
            .map_err(|e| Error::sys("mkfifo", fifo_path.display().to_string(), e))?;
        // The init may run as another user: let it open the FIFO for writing.
        fs::set_permissions(&fifo_path, fs::Permissions::from_mode(0o622))
            .map_err(|e| Error::io("chmod", &fifo_path, e))?;
        let fifo: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&fifo_path)
            .map_err(|e| Error::io("open", &fifo_path, e))?
            .into();
        let console = match &self.console_socket {
            Some(path) => Some(
                UnixStream::connect(path)
                    .map_err(|e| Error::io("connect console socket", path, e))?,
            ),
            None => None,
        };
        let (mut runtime_sock, init_sock) =
            UnixStream::pair().map_err(|e| Error::io("socketpair", "<sync>", e))?;

        let args = InitArgs {
            id: self.id.clone(),
            spec: spec.clone(),
            bundle: bundle.clone(),
            rootfs: rootfs.clone(),
            plan: plan.clone(),
            no_pivot: self.no_pivot,
            cgroup_layout,
            cgroup_path: cgroup_path.clone(),
            fifo_fd: fifo.as_raw_fd(),
            init_sock: init_sock.as_raw_fd(),
            runtime_sock: runtime_sock.as_raw_fd(),
            console_sock: console.as_ref().map(|c| c.as_raw_fd()),
        };
        let pid = clone_init(args, &plan)?;
        cleanup.child = Some(pid);
        drop(init_sock);
        drop(fifo);
        drop(console);

        if let Some(cgroup) = &cleanup.cgroup {
            cgroup.add_process(pid.as_raw())?;
        }
        channel::send_go(&mut runtime_sock, pid.as_raw())
            .map_err(|e| Error::io("signal init", "<sync socket>", e))?;
        match channel::read_report(&mut runtime_sock)
            .map_err(|e| Error::io("read init report", "<sync socket>", e))?
        {
            InitReport::Ready => {}
            InitReport::Failed(message) => return Err(Error::Init(message)),
            InitReport::Vanished => {
                return Err(Error::Init("the init exited without reporting".into()));
            }
        }

        let (start_time, _) = proc_start_time(pid.as_raw())
            .ok_or_else(|| Error::Init("the init vanished after reporting ready".into()))?;
        if let Some(hooks) = spec.hooks() {
            let state = OciState {
                oci_version: super::OCI_VERSION.to_owned(),
                id: self.id.clone(),
                status: ContainerStatus::Creating,
                pid: Some(pid.as_raw()),
                bundle: bundle.clone(),
                rootfs: Some(rootfs.clone()),
                created: None,
                annotations: spec.annotations().clone().unwrap_or_default(),
            };
            hooks::run(hooks.prestart().as_deref().unwrap_or_default(), &state)?;
            hooks::run(
                hooks.create_runtime().as_deref().unwrap_or_default(),
                &state,
            )?;
        }
        let record = StateRecord {
            id: self.id.clone(),
            pid: pid.as_raw(),
            start_time,
            bundle,
            rootfs,
            cgroup_path,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            annotations: spec.annotations().clone().unwrap_or_default(),
            hooks: spec.hooks().clone(),
        };
        record.save(&state_dir)?;
        if let Some(pid_file) = &self.pid_file {
            write_pid_file(pid_file, pid.as_raw())?;
        }
        cleanup.armed = false;
        tracing::info!(id = %self.id, pid = pid.as_raw(), "created");
        Ok(Container { state_dir, record })
    }
}

/// Logs the parts of the spec this runtime does not apply, so that nothing
/// is dropped silently.
fn warn_unsupported(spec: &Spec, id: &str) {
    let linux = spec.linux().clone().unwrap_or_default();
    let process = spec.process().clone().unwrap_or_default();
    let ignored = [
        ("linux.seccomp", linux.seccomp().is_some()),
        ("linux.intelRdt", linux.intel_rdt().is_some()),
        ("linux.personality", linux.personality().is_some()),
        ("linux.mountLabel", linux.mount_label().is_some()),
        (
            "process.apparmorProfile",
            process.apparmor_profile().is_some(),
        ),
        ("process.selinuxLabel", process.selinux_label().is_some()),
        ("process.ioPriority", process.io_priority().is_some()),
        ("process.scheduler", process.scheduler().is_some()),
    ];
    for (field, present) in ignored {
        if present {
            tracing::warn!(id, field, "not supported by keelson-runtime: ignored");
        }
    }
}

fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    let tmp = path.with_extension("keelson-tmp");
    fs::write(&tmp, pid.to_string()).map_err(|e| Error::io("write pid file", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io("rename pid file", path, e))
}

/// Clones the init into its new namespaces. An existing PID namespace is
/// joined around the `clone(2)` by this thread and left again right after.
fn clone_init(args: InitArgs, plan: &NamespacePlan) -> Result<Pid> {
    let restore: Option<File> = match &plan.join_pid {
        Some(path) => {
            let own = namespaces::open(Path::new("/proc/thread-self/ns/pid"))?;
            let target = namespaces::open(path)?;
            namespaces::enter(&target, CloneFlags::CLONE_NEWPID, path)?;
            Some(own)
        }
        None => None,
    };
    let mut stack = vec![0u8; INIT_STACK];
    let mut args = Some(args);
    let callback = Box::new(move || match args.take() {
        Some(a) => init::run(a),
        None => 1,
    });
    // SAFETY: the child gets a copy of this address space and only runs
    // `init::run`, which ends in execve or _exit. The runtime binary is
    // single-threaded when it creates containers.
    let result = unsafe {
        clone(
            callback,
            &mut stack,
            plan.clone_flags,
            Some(Signal::SIGCHLD as libc::c_int),
        )
    };
    if let Some(own) = restore {
        namespaces::enter(
            &own,
            CloneFlags::CLONE_NEWPID,
            Path::new("/proc/thread-self/ns/pid"),
        )?;
    }
    let pid = result.map_err(|e| Error::sys("clone", format!("{:?}", plan.clone_flags), e))?;
    Ok(pid)
}
