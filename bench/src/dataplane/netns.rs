//! Network namespaces, cgroup2 directories and process placement for the dataplane benchmark.
//!
//! A namespace lives as long as its handle (an open `ns/net` file) and the processes in it, so
//! nothing is left behind even if the benchmark dies. Commands run inside one by entering it
//! between fork and exec.

use std::{
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// A network namespace with `lo` up, held by a file descriptor.
pub struct Netns {
    ns: File,
}

impl Netns {
    /// Creates it from a short-lived thread so that the caller keeps its own namespace.
    ///
    /// # Errors
    /// Namespaces are unavailable or `ip` cannot bring `lo` up.
    pub fn new() -> Result<Self> {
        let ns = std::thread::spawn(|| -> Result<File> {
            // SAFETY: unshare only changes this short-lived thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .context("unshare(CLONE_NEWNET): network namespaces are not available");
            }
            File::open("/proc/thread-self/ns/net").context("opening the new netns")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;
        let netns = Netns { ns };
        netns.run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    /// The path other processes open to reach this namespace.
    pub fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.ns.as_raw_fd())
    }

    /// Makes `cmd` start inside this namespace (and inside `cgroup`, if given).
    ///
    /// # Errors
    /// The cgroup's `cgroup.procs` cannot be opened.
    pub fn place(&self, cmd: &mut Command, cgroup: Option<&Cgroup2>) -> Result<Placed> {
        let procs = cgroup.map(Cgroup2::procs_file).transpose()?;
        let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
        let ns_fd = self.ns.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
        // calls (prctl, write, setns) on descriptors that stay open until the command is spawned.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the benchmark, so an interrupted run leaves no process behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = procs_fd
                    && libc::write(fd, b"0\n".as_ptr().cast(), 2) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Placed { _procs: procs })
    }

    /// Runs `cmd` to completion inside the namespace; fails with its output unless it
    /// succeeded.
    ///
    /// # Errors
    /// The command cannot start or fails.
    pub fn run(&self, cmd: &mut Command) -> Result<Output> {
        let placed = self.place(cmd, None)?;
        let out = run_ok(cmd);
        drop(placed);
        out
    }

    /// `ip <args>` inside the namespace.
    ///
    /// # Errors
    /// `ip` fails.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        self.run(Command::new("ip").args(args)).map(drop)
    }

    /// Writes a sysctl of this namespace (`/proc/sys/net` follows the writer's namespace).
    ///
    /// # Errors
    /// The namespace cannot be entered or the key written.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let ns = self
            .ns
            .try_clone()
            .context("duplicating the netns handle")?;
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        std::thread::spawn(move || -> Result<()> {
            // SAFETY: setns moves only this short-lived thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error()).context("setns");
            }
            fs::write(&path, value).with_context(|| format!("writing {path}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
    }
}

/// Keeps the descriptors [`Netns::place`] needs open until the command has been spawned.
pub struct Placed {
    _procs: Option<File>,
}

/// Runs a command to completion; fails, with its output, unless it succeeded.
///
/// # Errors
/// The command cannot start or exits non-zero.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A cgroup2 directory of the benchmark's own, removed on drop after killing what is left in
/// it (only processes the benchmark placed there).
pub struct Cgroup2 {
    path: PathBuf,
}

impl Cgroup2 {
    /// Creates `<cgroup2 mount>/<name>`.
    ///
    /// # Errors
    /// No cgroup2 hierarchy is mounted or the directory cannot be made.
    pub fn new(name: &str) -> Result<Self> {
        let path = cgroup2_mount()?.join(name);
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
        for _ in 0..100 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => {
                    let procs = fs::read_to_string(self.path.join("cgroup.procs"));
                    for pid in procs.iter().flat_map(|p| p.lines()) {
                        if let Ok(pid) = pid.trim().parse::<i32>() {
                            // SAFETY: plain kill(2) of a process this benchmark started.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// The first cgroup2 mount: `/sys/fs/cgroup/unified` on a hybrid host, `/sys/fs/cgroup` on a
/// pure v2 host.
fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 hierarchy is mounted")
}

/// A private bpffs mounted on a temporary directory; unmounting drops its pins, which
/// detaches the programs pinned there.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    /// Mounts it.
    ///
    /// # Errors
    /// The mount fails (no bpffs, or not root).
    pub fn mount() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kb-dataplane-bpffs-")
            .tempdir()
            .context("creating a directory for bpffs")?;
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
            .context("bpffs path")?;
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("mounting bpffs");
        }
        Ok(Bpffs { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
