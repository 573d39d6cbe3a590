//! Shared helpers of the provisioner's integration tests: a two-namespace lab joined by a veth
//! pair (192.0.2.0/24 only inside it, no route out), servers running inside the server
//! namespace, and client processes that are killed by PID when the test ends. Everything is
//! named with a per-test prefix and removed on drop, also when the test fails.
#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

/// Server address inside the lab.
pub const SERVER_IP: &str = "192.0.2.1";
/// Client address inside the lab (when the client gets a static one).
pub const CLIENT_IP: &str = "192.0.2.2";
/// The client's MAC (the reserved machine `node-1` in the test inventories).
pub const CLIENT_MAC: &str = "52:54:00:12:34:56";

/// Fails with a clear message unless running as root with the needed tools.
pub fn require_root_and(tools: &[(&str, &str)]) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the provisioner's network tests need root (they create network namespaces and veth \
         pairs); run `cargo test -p keelson-provisioner` as root"
    );
    require_tools(tools);
}

/// Fails with a clear message unless the tools are on `PATH`.
pub fn require_tools(tools: &[(&str, &str)]) {
    for (tool, package) in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` not found: install the Debian package `{package}`"
        );
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Two network namespaces (server `…-s`, client `…-c`) joined by a veth pair.
pub struct Lab {
    /// Server namespace name.
    pub server_ns: String,
    /// Client namespace name.
    pub client_ns: String,
    /// Server-side interface.
    pub server_if: String,
    /// Client-side interface.
    pub client_if: String,
}

impl Lab {
    /// Creates the lab; `tag` (≤ 4 characters) makes names unique per test.
    pub fn new(tag: &str, client_addr: bool) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            server_ns: format!("kprov-{tag}-{pid}-s"),
            client_ns: format!("kprov-{tag}-{pid}-c"),
            server_if: format!("kp{tag}{}s", pid % 100_000),
            client_if: format!("kp{tag}{}c", pid % 100_000),
        };
        // Leftovers of a crashed run with the same PID.
        let _ = Command::new("ip")
            .args(["netns", "del", &lab.server_ns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &lab.client_ns])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &lab.server_ns]);
        // From here on, Drop cleans up whatever was created.
        ip(&["netns", "add", &lab.client_ns]);
        ip(&[
            "link",
            "add",
            &lab.server_if,
            "netns",
            &lab.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &lab.client_if,
            "netns",
            &lab.client_ns,
        ]);
        let (s, c) = (lab.server_ns.as_str(), lab.client_ns.as_str());
        ip(&[
            "-n",
            c,
            "link",
            "set",
            &lab.client_if,
            "address",
            CLIENT_MAC,
        ]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            &lab.server_if,
        ]);
        if client_addr {
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("{CLIENT_IP}/24"),
                "dev",
                &lab.client_if,
            ]);
        }
        for (ns, dev) in [(s, lab.server_if.as_str()), (c, lab.client_if.as_str())] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        lab.wait_ready();
        lab
    }

    /// Waits until the addresses left the "tentative" state and the link is up.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let out = run(Command::new("ip").args([
                "-n",
                &self.client_ns,
                "link",
                "show",
                &self.client_if,
            ]));
            if String::from_utf8_lossy(&out.stdout).contains("LOWER_UP") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("veth {} did not come up", self.client_if);
    }

    /// A command run inside the client namespace.
    pub fn client_cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client_ns, program]);
        c
    }

    /// A command run inside the server namespace.
    pub fn server_cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.server_ns, program]);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting the namespaces removes the veth pair too.
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that entered the network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file =
                    File::open(Path::new("/run/netns").join(ns)).expect("opening the namespace");
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("namespace thread panicked")
    })
}

/// A boxed server future.
pub type ServerFuture = Pin<Box<dyn Future<Output = Result<(), String>>>>;

/// A server running on its own thread and runtime inside a namespace; stopped on drop.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// The shutdown future handed to servers.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Running {
    /// Enters `ns`, calls `make` (which binds sockets there and returns the server future) and
    /// runs the future until [`Running::stop`] or drop. Returns once the sockets are bound.
    pub fn start<F>(ns: &str, make: F) -> Running
    where
        F: FnOnce(Shutdown) -> Result<ServerFuture, String> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let path = Path::new("/run/netns").join(ns);
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let file = File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let shutdown: Shutdown = Box::pin(async move {
                let _ = rx.await;
            });
            // Sockets are registered with the runtime inside the server future, so build it
            // within the runtime context.
            let fut = rt.block_on(async { make(shutdown) });
            let fut = match fut {
                Ok(f) => {
                    let _ = ready_tx.send(Ok(()));
                    f
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            rt.block_on(fut)
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("server failed to start: {e}"),
            Err(e) => panic!("server did not start: {e}"),
        }
        Running {
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Stops the server and returns how it ended.
    pub fn stop(mut self) -> Result<(), String> {
        self.halt()
    }

    fn halt(&mut self) -> Result<(), String> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| "server thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// A child process killed (by its PID) and reaped on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Spawns `cmd` with piped stdout/stderr.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        ChildGuard(Some(child))
    }

    /// The PID.
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; returns the output.
    pub fn terminate(mut self, timeout: Duration) -> Option<Output> {
        let mut child = self.0.take()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return child.wait_with_output().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait_with_output().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test inventory: `node-1` (the lab client's MAC) reserved at 192.0.2.10, a pool of
/// 192.0.2.100–110, profile `worker` with a kernel, an initrd and some cloud-config.
pub const INVENTORY: &str = r#"
unknown = "default"
default_profile = "worker"

[dhcp]
pool_start = "192.0.2.100"
pool_end = "192.0.2.110"
prefix_len = 24
dns = ["192.0.2.1"]
lease_secs = 600

[profiles.worker]
kernel = "vmlinuz"
initrd = ["initrd.img"]
cmdline = "console=ttyS0 quiet"
user_data = { hostname = "node-1", packages = ["curl"], ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx test@keelson"], runcmd = [["echo", "joined"]] }

[[machines]]
name = "node-1"
mac = "52:54:00:12:34:56"
ip = "192.0.2.10"
"#;
