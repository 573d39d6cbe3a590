//! Network namespaces, cgroup2 directories and bpffs for the dataplane benchmark: the e2e
//! tests' fixtures (`keelson-e2e`), which remove what they made when dropped, and the few
//! operations the benchmark adds on a namespace ([`NetnsExt`]).

use std::{
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::process::CommandExt as _,
    },
    process::{Command, Output},
};

use anyhow::{Context as _, Result};
pub use keelson_e2e::{Bpffs, Cgroup2, Netns, PlacedFds as Placed};

/// What the benchmark does with a namespace besides creating it.
pub trait NetnsExt {
    /// The path other processes open to reach this namespace.
    fn path(&self) -> String;
    /// Makes `cmd` start inside this namespace (and inside `cgroup`, if given), dying with
    /// the benchmark so that an interrupted run leaves no process behind.
    ///
    /// # Errors
    /// The cgroup's `cgroup.procs` cannot be opened.
    fn place(&self, cmd: &mut Command, cgroup: Option<&Cgroup2>) -> Result<Placed>;
    /// Runs `cmd` to completion inside the namespace; fails with its output unless it
    /// succeeded.
    ///
    /// # Errors
    /// The command cannot start or fails.
    fn run(&self, cmd: &mut Command) -> Result<Output>;
    /// `ip <args>` inside the namespace.
    ///
    /// # Errors
    /// `ip` fails.
    fn ip(&self, args: &[&str]) -> Result<()>;
    /// Writes a sysctl of this namespace (`/proc/sys/net` follows the writer's namespace).
    ///
    /// # Errors
    /// The namespace cannot be entered or the key written.
    fn sysctl(&self, key: &str, value: &str) -> Result<()>;
}

impl NetnsExt for Netns {
    fn path(&self) -> String {
        format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.as_fd().as_raw_fd()
        )
    }

    fn place(&self, cmd: &mut Command, cgroup: Option<&Cgroup2>) -> Result<Placed> {
        // SAFETY: prctl is async-signal-safe; the closure runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        keelson_e2e::place(cmd, self, cgroup)
    }

    fn run(&self, cmd: &mut Command) -> Result<Output> {
        let placed = NetnsExt::place(self, cmd, None)?;
        let out = keelson_e2e::run_ok(cmd);
        drop(placed);
        out
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        self.run(Command::new("ip").args(args)).map(drop)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                // Moves only this short-lived thread.
                self.enter_current_thread()?;
                fs::write(&path, value).with_context(|| format!("writing {path}"))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
        })
    }
}
