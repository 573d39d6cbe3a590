//! A node for end-to-end tests: `keelson-agent node` in a network namespace of its own, with
//! its processes in a cgroup2 directory made for the test and its state in a temporary
//! directory. On drop every process of the node (agent, supervisors, containers) is killed,
//! every mount under its state directory undone and every cgroup it made removed.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Cgroup2, Netns, cluster::ControlPlane, place, workspace_bin};

/// The pod CIDR the test node uses (inside its own namespace, with no route out).
pub const POD_CIDR: &str = "10.244.7.0/24";

/// Relays TCP connections accepted on one loopback to a port on another: loopback to loopback
/// only, between the host's namespace and the node's.
pub(crate) struct Relay {
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Accepts on `listener` and connects each connection with `connect`.
    fn start(
        listener: TcpListener,
        connect: impl Fn() -> Result<TcpStream> + Send + 'static,
    ) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((accepted, _)) => {
                        let _ = accepted.set_nonblocking(false);
                        if let Ok(other) = connect() {
                            pipe(accepted, other);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Relay { stop })
    }

    /// The control plane's port, reachable at the same `127.0.0.1` port inside the node's
    /// namespace (whose own loopback is a different one), so the agent uses the kubeconfig
    /// as it is.
    fn api(netns: &Netns, port: u16) -> Result<Self> {
        let ns = netns.try_clone()?;
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            ns.enter_current_thread()?;
            Ok(TcpListener::bind(("127.0.0.1", port))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("relay thread panicked"))??;
        Relay::start(listener, move || {
            Ok(TcpStream::connect(("127.0.0.1", port))?)
        })
    }

    /// The agent's port inside the node's namespace, reachable at the same port on the
    /// host's loopback, so the API server can proxy logs and exec to the node's address.
    pub(crate) fn agent(netns: &Netns, listener: TcpListener) -> Result<Self> {
        let port = listener.local_addr()?.port();
        let ns = netns.try_clone()?;
        Relay::start(listener, move || {
            let ns = ns.try_clone()?;
            std::thread::spawn(move || -> Result<TcpStream> {
                ns.enter_current_thread()?;
                Ok(TcpStream::connect(("127.0.0.1", port))?)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("relay thread panicked"))?
        })
    }
}

/// The control plane's API port relayed into a test namespace (at the same `127.0.0.1`
/// port), for processes there that use the admin kubeconfig as it is. Stops on drop.
pub struct ApiRelay {
    _relay: Relay,
}

impl ApiRelay {
    /// Starts relaying into `netns`.
    ///
    /// # Errors
    /// When the listener cannot be made inside the namespace.
    pub fn start(netns: &Netns, cp: &ControlPlane) -> Result<Self> {
        Ok(ApiRelay {
            _relay: Relay::api(netns, api_port(&cp.kubeconfig())?)?,
        })
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    for (mut from, mut to) in [(a, b2), (b, a2)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The port of the kubeconfig's `server: https://127.0.0.1:PORT`.
fn api_port(kubeconfig: &Path) -> Result<u16> {
    let text = fs::read_to_string(kubeconfig)?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server:"))
        .and_then(|s| s.trim().rsplit(':').next())
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .context("no server port in the kubeconfig")
}

/// The node's namespace, cgroup and state directory.
pub struct NodeEnv {
    relays: std::sync::Mutex<Vec<Relay>>,
    /// The agent's port: inside the node's namespace, and relayed on the host's loopback.
    agent_port: u16,
    agent_listener: std::sync::Mutex<Option<TcpListener>>,
    name: String,
    state: tempfile::TempDir,
    netns: Netns,
    cgroup: Cgroup2,
}

/// How [`NodeEnv::start_agent_with`] starts the agent. The default is a single node reached
/// through loopback relays: `--node-ip 127.0.0.1`, `--pod-cidr` [`POD_CIDR`].
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// kubeconfig for the agent (default: the control plane's admin kubeconfig).
    pub kubeconfig: Option<PathBuf>,
    /// `--node-ip`: the address the API server (and other nodes) reach the agent at.
    pub node_ip: String,
    /// `--pod-cidr` (None: wait for the control plane's podCIDR).
    pub pod_cidr: Option<String>,
    /// Relay the API into the node's loopback and the agent's port onto the host's.
    pub relays: bool,
    /// The log file's name in the control plane's scratch directory.
    pub log: String,
    /// More flags for `keelson-agent node`.
    pub extra_args: Vec<String>,
    /// Credential flags used instead of `--kubeconfig` (e.g. `--bootstrap-kubeconfig F
    /// --kubeconfig G`).
    pub credentials: Vec<std::ffi::OsString>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            kubeconfig: None,
            node_ip: "127.0.0.1".into(),
            pod_cidr: Some(POD_CIDR.into()),
            relays: true,
            log: "agent.log".into(),
            extra_args: Vec::new(),
            credentials: Vec::new(),
        }
    }
}

/// A running `keelson-agent node`, killed on drop.
pub struct Agent(Child);

impl Agent {
    /// `kill -9` and reap.
    pub fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl NodeEnv {
    /// Makes the namespace, the cgroup2 directory and the state directory.
    ///
    /// # Errors
    /// When namespaces or cgroup2 are not available.
    pub fn new(name: &str) -> Result<Self> {
        let state = tempfile::Builder::new().prefix("kt-node-").tempdir()?;
        // A free port on the host's loopback, for the agent's relay; the agent listens on the
        // same number inside its namespace.
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        Ok(NodeEnv {
            relays: std::sync::Mutex::new(Vec::new()),
            agent_port: listener.local_addr()?.port(),
            agent_listener: std::sync::Mutex::new(Some(listener)),
            name: name.to_owned(),
            state,
            netns: Netns::new()?,
            cgroup: Cgroup2::new("node")?,
        })
    }

    /// The agent's HTTP port (inside the node's namespace, relayed on the host's loopback).
    pub fn agent_port(&self) -> u16 {
        self.agent_port
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// The node's cgroup2 directory (`--cgroup2`).
    pub fn cgroup2_dir(&self) -> &Path {
        self.cgroup.path()
    }

    /// Makes `cmd` start on the node itself: in its network namespace and its cgroup2
    /// directory, so that the node's socket programs (the service proxy) see it.
    ///
    /// # Errors
    /// The cgroup cannot be opened.
    pub fn place_on_node(&self, cmd: &mut Command) -> Result<crate::PlacedFds> {
        place(cmd, &self.netns, Some(&self.cgroup))
    }

    /// The node's network namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Imports an image into the node's store with `keelson-agent image import`.
    ///
    /// # Errors
    /// When the import fails.
    pub fn import_image(&self, layout: &Path, name: &str) -> Result<String> {
        let out = crate::run_ok(
            Command::new(workspace_bin("keelson-agent")?)
                .args(["image", "import"])
                .arg(layout)
                .args(["--name", name, "--state-dir"])
                .arg(self.state_dir()),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the agent against `cp` with a short restart back-off; its output goes to
    /// `agent.log` in the control plane's scratch directory.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn start_agent(&self, cp: &ControlPlane) -> Result<Agent> {
        self.start_agent_with(cp, &AgentOptions::default())
    }

    /// Starts the agent against `cp` as `opts` say.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn start_agent_with(&self, cp: &ControlPlane, opts: &AgentOptions) -> Result<Agent> {
        if opts.relays {
            let mut relays = self
                .relays
                .lock()
                .map_err(|_| anyhow::anyhow!("relay lock"))?;
            if relays.is_empty() {
                relays.push(Relay::api(&self.netns, api_port(&cp.kubeconfig())?)?);
                let listener = self
                    .agent_listener
                    .lock()
                    .map_err(|_| anyhow::anyhow!("listener lock"))?
                    .take()
                    .context("the agent relay's listener is gone")?;
                relays.push(Relay::agent(&self.netns, listener)?);
            }
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cp.dir().join(&opts.log))?;
        let mut cmd = Command::new(workspace_bin("keelson-agent")?);
        cmd.arg("node").args(["--node-name", &self.name]);
        if opts.credentials.is_empty() {
            cmd.arg("--kubeconfig")
                .arg(opts.kubeconfig.clone().unwrap_or_else(|| cp.kubeconfig()));
        } else {
            cmd.args(&opts.credentials);
        }
        if let Some(cidr) = &opts.pod_cidr {
            cmd.args(["--pod-cidr", cidr]);
        }
        cmd.args([
            "--port",
            &self.agent_port.to_string(),
            "--node-ip",
            &opts.node_ip,
        ])
        .args(&opts.extra_args)
        .arg("--state-dir")
        .arg(self.state_dir())
        .arg("--cgroup2")
        .arg(self.cgroup.path())
        .args(["--restart-backoff", "1s", "--resync", "250ms"])
        // Small logs so that tests see them rotate.
        .args([
            "--container-log-max-size",
            "4Ki",
            "--container-log-max-files",
            "2",
        ])
        // KEELSON_E2E_AGENT_LOG overrides the agent's log filter (e.g. the pod startup
        // driver's timings at `keelson_agent::pods=debug`). The memory-pressure checks
        // log at debug when the pods' working set moves (what a missed eviction needs).
        .env(
            "RUST_LOG",
            std::env::var("KEELSON_E2E_AGENT_LOG").unwrap_or_else(|_| {
                "info,keelson_agent::logs=debug,keelson_agent::pods::sync::evict=debug".to_owned()
            }),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        let fds = place(&mut cmd, &self.netns, Some(&self.cgroup))?;
        let child = cmd.spawn().context("starting keelson-agent node")?;
        drop(fds);
        Ok(Agent(child))
    }

    /// Runs `f` on a thread inside the node's network namespace.
    ///
    /// # Errors
    /// What `f` returns, or a failure to enter the namespace.
    pub fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ns = self.netns.try_clone()?;
        std::thread::spawn(move || {
            ns.enter_current_thread()?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    }

    /// An HTTP GET from inside the node's namespace: (status, body).
    ///
    /// # Errors
    /// Connection failures.
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        self.in_netns(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .with_context(|| format!("connecting to {addr}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            Ok((status, body.to_owned()))
        })
    }

    /// A GET on the agent's HTTP server.
    ///
    /// # Errors
    /// Connection failures.
    pub fn agent_get(&self, path: &str) -> Result<(u16, String)> {
        self.http_get(SocketAddr::from(([127, 0, 0, 1], self.agent_port)), path)
    }

    /// The names of the links in the node's namespace.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn links(&self) -> Result<Vec<String>> {
        self.in_netns(|| {
            let out = crate::run_ok(Command::new("ip").args(["-o", "link", "show"]))?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    let name = l.split(':').nth(1)?.trim();
                    Some(name.split('@').next()?.to_owned())
                })
                .collect())
        })
    }

    fn cgroup_rel(&self) -> Option<PathBuf> {
        let root = crate::cgroup2_mount().ok()?;
        self.cgroup
            .path()
            .strip_prefix(root)
            .ok()
            .map(Path::to_owned)
    }
}

/// Every cgroup mount point (v1 controllers and cgroup2).
fn cgroup_mounts() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fs = right.split_whitespace().next()?;
            (fs == "cgroup" || fs == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// Kills every process in the cgroup tree at `dir`.
fn kill_tree(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            n += 1;
        }
    }
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            n += kill_tree(&e.path());
        }
    }
    n
}

fn remove_tree(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

impl Drop for NodeEnv {
    fn drop(&mut self) {
        let rel = self.cgroup_rel();
        // Processes first (supervisors and containers are all inside the node's trees).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut left = 0;
            for m in cgroup_mounts() {
                if let Some(rel) = &rel {
                    left += kill_tree(&m.join(rel));
                }
            }
            if left == 0 || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for m in mounts_under(self.state.path()) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(rel) = &rel {
            for m in cgroup_mounts() {
                let dir = m.join(rel);
                for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove_tree(&e.path());
                    }
                }
                // The cgroup2 directory itself is removed by its own guard.
                if !dir.starts_with(self.cgroup.path()) {
                    let _ = fs::remove_dir(&dir);
                }
            }
        }
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout`.
///
/// # Errors
/// On timeout (with `what`), or when `check` fails.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
