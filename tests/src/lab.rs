//! A multi-node lab for end-to-end tests: a "lab" network namespace holding one bridge per
//! subnet (and routing between them when there are two), the control plane inside it, and N
//! nodes, each a [`NodeEnv`] (own network namespace, cgroup2 subtree and state directory)
//! whose `eth0` is a veth onto a lab bridge, running `keelson-agent node` with the podCIDR the
//! control plane gives it. Nothing in the lab has a route out of it: the lab namespace is
//! joined to the host only through loopback relays of the API port.
//!
//! ```text
//!            lab netns (router; keelson-server on 0.0.0.0:PORT)
//!   lab0 172.29.0.1/24                      lab1 172.29.1.1/24   (two-subnet variant)
//!    │            │            │              │
//!  node-0       node-2       host           node-1
//!  .0.10        .0.12        .0.200         .1.11
//! ```
//!
//! Everything goes on drop, also on panic: the nodes' processes (by cgroup, hence by PID),
//! mounts and cgroups through [`NodeEnv`]'s guard, the control plane by PID, and the
//! namespaces with every link and bridge in them when their last handle closes.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    Netns,
    cluster::ControlPlane,
    node::{Agent, AgentOptions, NodeEnv, wait_for},
    place, run_ok,
};

/// The lab's first subnet; subnet `i` is `172.29.<i>.0/24` with the router at `.1`.
const SUBNET_PREFIX: [u8; 2] = [172, 29];

fn subnet_gateway(subnet: usize) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], subnet as u8, 1)
}

/// Runs `cmd` to completion inside `netns`.
///
/// # Errors
/// The command cannot start or fails.
pub fn run_in(netns: &Netns, cmd: &mut Command) -> Result<Output> {
    let fds = place(cmd, netns, None)?;
    let out = run_ok(cmd);
    drop(fds);
    out
}

fn ip_in(netns: &Netns, args: &[&str]) -> Result<Output> {
    run_in(netns, Command::new("ip").args(args))
}

/// The path by which other processes reach the namespace `netns` of this process.
fn ns_path(netns: &Netns) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), netns.raw_fd())
}

/// Writes a sysctl of the network namespace `netns` (`/proc/sys/net` follows the writer's
/// namespace).
fn net_sysctl(netns: &Netns, key: &str, value: &str) -> Result<()> {
    let ns = netns.try_clone()?;
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_owned();
    std::thread::spawn(move || -> Result<()> {
        ns.enter_current_thread()?;
        std::fs::write(&path, value).with_context(|| format!("writing {path}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
}

/// Runs `f` on a thread inside the network namespace file at `path` (a pod's `ns/net`).
///
/// # Errors
/// What `f` returns, or the namespace cannot be entered.
pub fn in_netns_file<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = Netns {
        ns: File::open(path).with_context(|| format!("opening {}", path.display()))?,
    };
    std::thread::spawn(move || {
        ns.enter_current_thread()?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Connects to `addr` from the calling thread's namespace, sends `message`, half-closes and
/// reads the reply.
///
/// # Errors
/// Connection failures and timeouts.
pub fn tcp_exchange(addr: SocketAddr, message: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(message.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

/// An HTTP/1.0 GET from the calling thread's namespace: (status, body).
///
/// # Errors
/// Connection failures and timeouts.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let text = tcp_exchange(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// A TCP server on a thread inside a namespace that answers every connection with
/// `peer=<client address>` and closes it: tells a test which source address arrived.
/// Stopped on drop.
pub struct Whoami {
    stop: Arc<AtomicBool>,
}

impl Whoami {
    /// Listens on `addr` inside `netns`.
    ///
    /// # Errors
    /// The namespace cannot be entered or the address bound.
    pub fn start(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        let ns = netns.try_clone()?;
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            ns.enter_current_thread()?;
            let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("whoami thread panicked"))??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = writeln!(conn, "peer={}", peer.ip());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Whoami { stop })
    }
}

impl Drop for Whoami {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A namespace on a lab subnet that is not a node: a client or server "outside" the cluster,
/// with an address on the subnet and no route to any pod CIDR.
pub struct LabHost {
    netns: Netns,
    ip: Ipv4Addr,
}

impl LabHost {
    /// Its namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Its address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// A node of the lab.
pub struct LabNode {
    agent: Mutex<Option<Agent>>,
    env: NodeEnv,
    ip: Ipv4Addr,
    subnet: usize,
    opts: AgentOptions,
}

impl LabNode {
    /// The node's namespace, state directory and cgroup.
    pub fn env(&self) -> &NodeEnv {
        &self.env
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        self.env.name()
    }

    /// The node's address (its InternalIP).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The index of its subnet.
    pub fn subnet(&self) -> usize {
        self.subnet
    }

    /// Runs a command to completion in the node's network namespace.
    ///
    /// # Errors
    /// The command fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = run_in(self.env.netns(), Command::new(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kill -9` of the agent (its pods keep running).
    pub fn kill_agent(&self) {
        let agent = self.agent.lock().ok().and_then(|mut a| a.take());
        if let Some(agent) = agent {
            agent.kill9();
        }
    }

    /// Starts the agent again (after [`LabNode::kill_agent`]).
    ///
    /// # Errors
    /// It cannot be started.
    pub fn start_agent(&self, cp: &ControlPlane) -> Result<()> {
        let agent = self.env.start_agent_with(cp, &self.opts)?;
        let mut slot = self
            .agent
            .lock()
            .map_err(|_| anyhow::anyhow!("agent lock"))?;
        *slot = Some(agent);
        Ok(())
    }
}

/// A pod that runs, as the lab saw it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// Its name.
    pub name: String,
    /// Its UID.
    pub uid: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The index of its node.
    pub node: usize,
}

/// Builds a [`Lab`].
pub struct LabBuilder {
    nodes: usize,
    subnets: usize,
    agent_args: Vec<String>,
    image: Option<String>,
}

impl LabBuilder {
    /// `nodes` nodes on one subnet.
    pub fn new(nodes: usize) -> Self {
        LabBuilder {
            nodes,
            subnets: 1,
            agent_args: Vec::new(),
            image: None,
        }
    }

    /// Nodes alternate between two subnets joined by the lab namespace as a router, so that
    /// no node can reach a node of the other subnet directly (host-gw cannot work there).
    pub fn with_two_subnets(mut self) -> Self {
        self.subnets = 2;
        self
    }

    /// More flags for every node's `keelson-agent node`.
    pub fn with_agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Imports the busybox test image as `name` into every node.
    pub fn with_busybox(mut self, name: &str) -> Self {
        self.image = Some(name.to_owned());
        self
    }

    /// Creates the lab and waits until every node is Ready with its podCIDR.
    ///
    /// # Errors
    /// Any step fails (whatever was made is removed again).
    pub fn build(self) -> Result<Lab> {
        crate::require_root()?;
        let netns = Netns::new()?;
        net_sysctl(&netns, "net.ipv4.ip_forward", "1")?;
        let mut subnets = Vec::new();
        for s in 0..self.subnets {
            let bridge = format!("lab{s}");
            ip_in(&netns, &["link", "add", &bridge, "type", "bridge"])?;
            ip_in(
                &netns,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", subnet_gateway(s)),
                    "dev",
                    &bridge,
                ],
            )?;
            ip_in(&netns, &["link", "set", &bridge, "up"])?;
            subnets.push(subnet_gateway(s));
        }
        let api_ip = subnet_gateway(0);
        let cp = ControlPlane::start_in(&netns, api_ip)?;
        let kubeconfig = cp.kubeconfig_via(api_ip)?;
        let mut lab = Lab {
            nodes: Vec::new(),
            hosts: Mutex::new(Vec::new()),
            cp,
            netns,
            subnets,
            _layout: None,
        };
        let layout = match &self.image {
            Some(name) => {
                let dir = tempfile::Builder::new().prefix("kt-image-").tempdir()?;
                crate::oci_image::busybox_layout(dir.path(), name)?;
                Some(dir)
            }
            None => None,
        };
        for k in 0..self.nodes {
            let subnet = k % self.subnets;
            let ip = Ipv4Addr::new(
                SUBNET_PREFIX[0],
                SUBNET_PREFIX[1],
                subnet as u8,
                10 + k as u8,
            );
            let name = format!("node-{k}");
            let env = NodeEnv::new(&name)?;
            lab.attach(env.netns(), &format!("n{k}"), ip, subnet, true)?;
            if let (Some(image), Some(dir)) = (&self.image, &layout) {
                env.import_image(dir.path(), image)?;
            }
            let extra = self.agent_args.clone();
            let opts = AgentOptions {
                kubeconfig: Some(kubeconfig.clone()),
                node_ip: ip.to_string(),
                pod_cidr: None,
                relays: false,
                log: format!("agent-{name}.log"),
                extra_args: extra,
                credentials: Vec::new(),
            };
            let node = LabNode {
                agent: Mutex::new(None),
                env,
                ip,
                subnet,
                opts,
            };
            node.start_agent(&lab.cp)?;
            lab.nodes.push(node);
        }
        lab._layout = layout;
        for node in &lab.nodes {
            let name = node.name().to_owned();
            wait_for(
                &format!("{name} Ready with a podCIDR"),
                Duration::from_secs(40),
                || {
                    let Some(n) = lab.get_json(&["node", &name])? else {
                        return Ok(None);
                    };
                    let ready = n
                        .pointer("/status/conditions")
                        .and_then(Value::as_array)
                        .is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        });
                    Ok((ready && n.pointer("/spec/podCIDR").is_some()).then_some(()))
                },
            )
            .map_err(|e| e.context(lab.logs()))?;
        }
        Ok(lab)
    }
}

/// A running lab. Dropping it removes everything it made.
pub struct Lab {
    // Dropped in this order: nodes (their processes, mounts and cgroups), outside hosts, the
    // control plane, then the lab namespace with its bridges.
    nodes: Vec<LabNode>,
    hosts: Mutex<Vec<Arc<LabHost>>>,
    cp: ControlPlane,
    netns: Netns,
    subnets: Vec<Ipv4Addr>,
    _layout: Option<tempfile::TempDir>,
}

impl Lab {
    /// Connects `netns` to subnet `subnet` through a veth (`eth0` inside, `<tag>` on the lab
    /// bridge) with address `ip` and, for nodes, a default route via the lab router.
    fn attach(
        &self,
        netns: &Netns,
        tag: &str,
        ip: Ipv4Addr,
        subnet: usize,
        default_route: bool,
    ) -> Result<()> {
        let outer = format!("l-{tag}");
        ip_in(
            netns,
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &outer,
                "netns",
                &ns_path(&self.netns),
            ],
        )?;
        ip_in(
            &self.netns,
            &[
                "link",
                "set",
                &outer,
                "master",
                &format!("lab{subnet}"),
                "up",
            ],
        )?;
        ip_in(netns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ip_in(netns, &["link", "set", "eth0", "up"])?;
        if default_route {
            ip_in(
                netns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &self.subnets[subnet].to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// A namespace on subnet `subnet` at `172.29.<subnet>.<200 + n>` with no route beyond
    /// its subnet: an "outside" machine that cannot answer pod addresses.
    ///
    /// # Errors
    /// The namespace or its link cannot be made.
    pub fn add_host(&self, subnet: usize) -> Result<Arc<LabHost>> {
        let mut hosts = self
            .hosts
            .lock()
            .map_err(|_| anyhow::anyhow!("hosts lock"))?;
        let n = hosts.len();
        let ip = Ipv4Addr::new(
            SUBNET_PREFIX[0],
            SUBNET_PREFIX[1],
            subnet as u8,
            200 + n as u8,
        );
        let netns = Netns::new()?;
        self.attach(&netns, &format!("h{n}"), ip, subnet, false)?;
        let host = Arc::new(LabHost { netns, ip });
        hosts.push(Arc::clone(&host));
        Ok(host)
    }

    /// The control plane (kubectl works from the host through a relay).
    pub fn cp(&self) -> &ControlPlane {
        &self.cp
    }

    /// The lab (router) namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &LabNode {
        &self.nodes[i]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    /// `kubectl get … -o json`, `None` when not found.
    ///
    /// # Errors
    /// kubectl fails otherwise.
    pub fn get_json(&self, args: &[&str]) -> Result<Option<Value>> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        match self.cp.kubectl(&all) {
            Ok(text) => Ok(Some(serde_json::from_str(&text)?)),
            Err(e) if e.to_string().contains("NotFound") || e.to_string().contains("not found") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The Node's podCIDR.
    ///
    /// # Errors
    /// The Node or its podCIDR is missing.
    pub fn pod_cidr(&self, node: usize) -> Result<String> {
        let n = self
            .get_json(&["node", self.nodes[node].name()])?
            .context("node gone")?;
        Ok(n.pointer("/spec/podCIDR")
            .and_then(Value::as_str)
            .context("no podCIDR")?
            .to_owned())
    }

    /// Creates pod `name` in `default` on node `node` from the container spec `container`
    /// (YAML lines of one container, indented by four spaces, without `- name:`), plus
    /// optional pod-level `extra` YAML (indented by two spaces).
    ///
    /// # Errors
    /// kubectl fails.
    pub fn create_pod(
        &self,
        node: usize,
        name: &str,
        image: &str,
        container: &str,
        extra: &str,
    ) -> Result<()> {
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  nodeName: {}\n  terminationGracePeriodSeconds: 1\n{extra}  containers:\n  - name: main\n    image: {image}\n{container}",
            self.nodes[node].name()
        );
        self.cp.apply(&manifest)?;
        Ok(())
    }

    /// Waits until pod `name` runs with an address.
    ///
    /// # Errors
    /// It does not within `timeout`.
    pub fn wait_pod(&self, name: &str, timeout: Duration) -> Result<PodInfo> {
        let found = wait_for(&format!("pod {name} Running"), timeout, || {
            let Some(p) = self.get_json(&["pod", name])? else {
                return Ok(None);
            };
            let running = p.pointer("/status/phase") == Some(&Value::from("Running"));
            let ip = p
                .pointer("/status/podIP")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<Ipv4Addr>().ok());
            Ok(ip.filter(|_| running).map(|ip| (p, ip)))
        })
        .map_err(|e| e.context(self.logs()))?;
        let (p, ip) = found;
        let node_name = p
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        Ok(PodInfo {
            name: name.to_owned(),
            uid: p
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .context("no uid")?
                .to_owned(),
            ip,
            node: self
                .nodes
                .iter()
                .position(|n| n.name() == node_name)
                .context("pod on an unknown node")?,
        })
    }

    /// The pod's network namespace file (held by the agent under its state directory).
    pub fn pod_netns(&self, pod: &PodInfo) -> PathBuf {
        self.nodes[pod.node]
            .env
            .state_dir()
            .join("run/pods")
            .join(&pod.uid)
            .join("ns/net")
    }

    /// An HTTP GET from inside `pod`'s network namespace.
    ///
    /// # Errors
    /// Connection failures.
    pub fn http_from_pod(
        &self,
        pod: &PodInfo,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String)> {
        let path = path.to_owned();
        in_netns_file(&self.pod_netns(pod), move || http_get(addr, &path))
    }

    /// A TCP exchange from inside `pod`'s network namespace.
    ///
    /// # Errors
    /// Connection failures.
    pub fn tcp_from_pod(&self, pod: &PodInfo, addr: SocketAddr, message: &str) -> Result<String> {
        let message = message.to_owned();
        in_netns_file(&self.pod_netns(pod), move || tcp_exchange(addr, &message))
    }

    /// A [`Whoami`] server inside `pod`'s network namespace.
    ///
    /// # Errors
    /// The namespace cannot be entered or the port bound.
    pub fn whoami_in_pod(&self, pod: &PodInfo, port: u16) -> Result<Whoami> {
        let ns = Netns {
            ns: File::open(self.pod_netns(pod))?,
        };
        Whoami::start(&ns, SocketAddr::from((pod.ip, port)))
    }

    /// Each node's routes, neighbours, VXLAN FDB and links, for failure messages.
    pub fn network_state(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out += &format!("--- {} ({}) ---\n", n.name(), n.ip());
            for (prog, args) in [
                ("ip", &["-d", "link", "show"][..]),
                ("ip", &["addr", "show"][..]),
                ("ip", &["route", "show"][..]),
                ("ip", &["neigh", "show"][..]),
                ("bridge", &["fdb", "show", "dev", "keelson.vxlan"][..]),
            ] {
                let text = n.run(prog, args).unwrap_or_else(|e| e.to_string());
                out += &format!("$ {prog} {}\n{text}\n", args.join(" "));
            }
        }
        out
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let path = self.cp.dir().join(&n.opts.log);
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            out += &format!("--- {} ---\n{log}\n", path.display());
        }
        out
    }

    /// Fails unless `check` holds within `timeout`, showing the agents' logs otherwise.
    ///
    /// # Errors
    /// On timeout.
    pub fn eventually<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        wait_for(what, timeout, check).map_err(|e| e.context(self.logs()))
    }
}
