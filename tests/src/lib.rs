//! Shared fixtures for Keelson's end-to-end tests.
//!
//! Every fixture creates a resource of its own — a network namespace, a cgroup2 directory, a
//! bpffs instance — named with a per-test prefix, and removes it when dropped, also when the
//! test fails. Traffic stays inside namespaces the test created: they have only a loopback
//! interface and no route out.
//!
//! The tests need root, BPF and namespaces. Without them they fail with a message that says
//! what is missing; they are never skipped silently.

use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, RawFd},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sched::{CloneFlags, setns, unshare};

pub mod cluster;
pub mod echo;
pub mod lab;
pub mod node;
pub mod oci_image;
pub mod proxy;

/// Fails with a clear message unless the tests run as root.
///
/// # Errors
/// When the effective user is not root.
pub fn require_root() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "this end-to-end test needs root (BPF, namespaces, cgroups): run it as root, e.g. \
         through `cargo xtask test` in CI"
    );
    Ok(())
}

/// A name unique to this test process and call: `kt-<pid>-<n>-<what>`.
pub fn unique_name(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "kt-{}-{}-{what}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of a binary of this workspace, built beside the test executable (`cargo build --bins`
/// first; `cargo xtask test` does).
///
/// # Errors
/// When the binary has not been built.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no profile directory")?;
    let bin = dir.join(name);
    ensure!(
        bin.is_file(),
        "{} is not built: run `cargo build --bins` first (`cargo xtask test` does)",
        bin.display()
    );
    Ok(bin)
}

/// Runs a command to completion and fails, with its output, unless it succeeded.
///
/// # Errors
/// The command could not start or exited non-zero.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A network namespace with only `lo`, up. It lives as long as this handle (and any socket
/// created in it): nothing is left behind, even if the test process dies.
pub struct Netns {
    ns: File,
}

impl Netns {
    /// Creates the namespace from a short-lived thread, so the test thread keeps its own.
    ///
    /// # Errors
    /// When namespaces are not available or `ip` cannot bring `lo` up.
    pub fn new() -> Result<Self> {
        std::thread::spawn(|| -> Result<File> {
            unshare(CloneFlags::CLONE_NEWNET)
                .context("unshare(CLONE_NEWNET): network namespaces are not available")?;
            let ns = File::open("/proc/thread-self/ns/net").context("opening the new netns")?;
            // A child forked from this thread starts in the new namespace.
            run_ok(Command::new("ip").args(["link", "set", "lo", "up"]))
                .context("bringing lo up in the test namespace (is iproute2 installed?)")?;
            Ok(ns)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
        .map(|ns| Netns { ns })
    }

    /// Moves the calling thread into the namespace. Use it on a thread of its own.
    ///
    /// # Errors
    /// When `setns` fails.
    pub fn enter_current_thread(&self) -> Result<()> {
        setns(self.ns.as_fd(), CloneFlags::CLONE_NEWNET).context("setns into the test netns")
    }

    /// A second handle on the same namespace.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated.
    pub fn try_clone(&self) -> Result<Netns> {
        Ok(Netns {
            ns: self
                .ns
                .try_clone()
                .context("duplicating the netns handle")?,
        })
    }

    fn raw_fd(&self) -> RawFd {
        self.ns.as_raw_fd()
    }
}

/// The namespace's file descriptor, e.g. for `/proc/<pid>/fd/<fd>` paths (`ip link … netns`).
impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ns.as_fd()
    }
}

/// A cgroup2 directory made for one test, removed on drop (after killing what is left in it).
pub struct Cgroup2 {
    path: PathBuf,
}

impl Cgroup2 {
    /// Creates `<cgroup2 mount>/<unique name>`; on a hybrid host the cgroup2 mount is
    /// `/sys/fs/cgroup/unified`, on a pure v2 host `/sys/fs/cgroup`.
    ///
    /// # Errors
    /// When no cgroup2 hierarchy is mounted or the directory cannot be made.
    pub fn new(what: &str) -> Result<Self> {
        let root = cgroup2_mount()?;
        let path = root.join(unique_name(what));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup2 { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn procs_file(&self) -> Result<File> {
        let p = self.path.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => {
                    // Only processes this test put there can be inside.
                    if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
                        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// The first cgroup2 mount point in this mount namespace.
///
/// # Errors
/// When there is none.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 hierarchy is mounted (need /sys/fs/cgroup or /sys/fs/cgroup/unified)")
}

/// A private bpffs instance mounted on a temporary directory; unmounting it drops every pin
/// made there, which detaches pinned programs.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    /// Mounts a fresh bpffs.
    ///
    /// # Errors
    /// When the mount fails (no bpffs support, or not root).
    pub fn mount() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kt-bpffs-")
            .tempdir()
            .context("creating a temp dir for bpffs")?;
        nix::mount::mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting bpffs (is CONFIG_BPF_SYSCALL on?)")?;
        Ok(Bpffs { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("warning: unmounting {}: {e}", self.dir.path().display());
        }
    }
}

/// Makes `cmd` start inside `cgroup` (if any) and then inside `netns`, from its first
/// instruction: the child moves itself between fork and exec.
///
/// # Errors
/// When the cgroup's `cgroup.procs` cannot be opened.
pub fn place(cmd: &mut Command, netns: &Netns, cgroup: Option<&Cgroup2>) -> Result<PlacedFds> {
    let procs = cgroup.map(Cgroup2::procs_file).transpose()?;
    let procs_fd = procs.as_ref().map(File::as_raw_fd);
    let ns_fd = netns.raw_fd();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (write, setns) on descriptors that stay open until the command is spawned.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" moves the writing process.
                if libc::write(fd, b"0\n".as_ptr().cast(), 2) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(PlacedFds { _procs: procs })
}

/// Keeps the descriptors [`place`] needs open until the command has been spawned.
pub struct PlacedFds {
    _procs: Option<File>,
}
