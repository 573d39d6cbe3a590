//! NodePort and externalIPs end to end, in a two-node lab (see `keelson_e2e::lab`) with one
//! `keelson-agent proxy` per node, inside the node's namespace, on its cgroup, its own pins
//! and its `eth0`:
//! - a client outside the nodes reaches a NodePort Service on each node's address, TCP and
//!   UDP, and both pods (one per node) answer; a pod on the other node sees the node's
//!   address (SNAT), the local one the client's;
//! - with `externalTrafficPolicy: Local` only the node's own pod answers, and it sees the
//!   client's address; a node without a local endpoint does not answer at all;
//! - an externalIP routed to a node reaches the Service;
//! - from the node itself (its cgroup), a connect to its own or another node's address and
//!   nodePort is balanced at the socket;
//! - on the tc path, a Maglev Service reached through either node sends a client flow (same
//!   source address and port) to the same backend; `sessionAffinity: ClientIP` keeps a
//!   client on one backend over many connections (the random Service above spreads them);
//!   the proxies' `/metrics` count packets and new flows per frontend, and drops on a node
//!   without a local endpoint under `externalTrafficPolicy: Local`; a Local LoadBalancer's
//!   `healthCheckNodePort` answers 200 on the node with its endpoint and 503 on the other;
//! - with the nodes on two routed subnets joined by the VXLAN overlay, a NodePort through
//!   either node reaches the other node's pod through the tunnel (SNAT), TCP and UDP;
//! - `keelson-agent lb dump` shows the NodePort frontends, their counters and tracked flows;
//! - a flow through a node survives a `kill -9` and restart of its proxy, and an upgrade
//!   from tc links of an older version (replaced, not kept); `lb detach` removes the tc
//!   programs too.
//!
//! The backends are small servers the test runs inside the pods' network namespaces that
//! answer `<pod> peer=<source address>`.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use keelson_e2e::{
    Bpffs, Netns,
    lab::{Lab, LabBuilder, LabHost, LabNode, PodInfo, in_netns_file, run_in, tcp_exchange},
    proxy::{Proxy, ProxyBuilder},
    run_ok, workspace_bin,
};

const IMAGE: &str = "keelson.test/busybox:1";
const T: Duration = Duration::from_secs(40);
const TCP_PORT: u16 = 9000;
const UDP_PORT: u16 = 9001;
const NODE_PORT: u16 = 30900;
const NODE_PORT_UDP: u16 = 30901;
const NODE_PORT_LOCAL: u16 = 30910;
const NODE_PORT_ONE: u16 = 30920;
const NODE_PORT_MAGLEV: u16 = 30930;
const NODE_PORT_STICKY: u16 = 30940;
/// `np-sticky`'s affinity timeout: long enough for a burst of connections on a busy machine.
const STICKY_TIMEOUT_SECS: u32 = 8;
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The health-check node port of np-one (a LoadBalancer with the Local policy).
const HEALTH_PORT_ONE: u16 = 30919;
/// Each proxy's metrics endpoint, on the loopback of its node's namespace.
const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);
/// Source ports of the client flows sent through both nodes to the Maglev Service. The fixed
/// source ports are below the namespaces' ephemeral range (32768–60999): an ephemeral port
/// of an earlier request in TIME_WAIT (a socket without `SO_REUSEADDR`) can make binding one of
/// them fail with EADDRINUSE.
const MAGLEV_PORTS: std::ops::Range<u16> = 22_000..22_016;
/// The first source port of [`maglev_table_flips`]' flows (below the ephemeral range too).
const TABLE_FLIP_PORTS: u16 = 23_000;

fn manifest() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: np, namespace: default}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: np}}}}
  template:
    metadata: {{labels: {{app: np}}}}
    spec:
      terminationGracePeriodSeconds: 1
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - {{labelSelector: {{matchLabels: {{app: np}}}}, topologyKey: kubernetes.io/hostname}}
      containers:
      - {{name: main, image: {IMAGE}, command: [sleep, '3600']}}
---
apiVersion: v1
kind: Service
metadata: {{name: np-cluster, namespace: default}}
spec:
  type: NodePort
  selector: {{app: np}}
  externalIPs: [{EXTERNAL_IP}]
  ports:
  - {{name: tcp, port: {TCP_PORT}, targetPort: {TCP_PORT}, nodePort: {NODE_PORT}}}
  - {{name: udp, port: {UDP_PORT}, targetPort: {UDP_PORT}, nodePort: {NODE_PORT_UDP}, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: np-local, namespace: default}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {{app: np}}
  ports: [{{name: tcp, port: {TCP_PORT}, targetPort: {TCP_PORT}, nodePort: {NODE_PORT_LOCAL}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: np-one, namespace: default}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_PORT_ONE}
  selector: {{app: np, np-one: "yes"}}
  ports: [{{name: tcp, port: {TCP_PORT}, targetPort: {TCP_PORT}, nodePort: {NODE_PORT_ONE}}}]
---
apiVersion: v1
kind: Service
metadata:
  name: np-maglev
  namespace: default
  annotations: {{keelson.dev/lb-algorithm: maglev}}
spec:
  type: NodePort
  selector: {{app: np}}
  ports: [{{name: tcp, port: {TCP_PORT}, targetPort: {TCP_PORT}, nodePort: {NODE_PORT_MAGLEV}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: np-sticky, namespace: default}}
spec:
  type: NodePort
  selector: {{app: np}}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {STICKY_TIMEOUT_SECS}}}}}
  ports: [{{name: tcp, port: {TCP_PORT}, targetPort: {TCP_PORT}, nodePort: {NODE_PORT_STICKY}}}]
"#
    )
}

/// Answers `<name> peer=<source address>` over TCP (after the client half-closes) and UDP,
/// from a thread of the test inside a pod's network namespace. Stopped on drop.
struct Backend {
    stop: Arc<AtomicBool>,
}

impl Backend {
    fn start(lab: &Lab, pod: &PodInfo) -> Result<Self> {
        let ip = pod.ip;
        let (tcp, udp) = in_netns_file(&lab.pod_netns(pod), move || {
            let tcp = TcpListener::bind((ip, TCP_PORT)).context("binding the TCP backend")?;
            let udp = UdpSocket::bind((ip, UDP_PORT)).context("binding the UDP backend")?;
            Ok((tcp, udp))
        })?;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (Arc::clone(&stop), pod.name.clone());
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, peer)) => {
                        // A thread per connection: one flow is held open across a proxy
                        // restart while others come and go.
                        let name = name.clone();
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                            let mut request = Vec::new();
                            if conn.read_to_end(&mut request).is_ok() {
                                let _ = write!(conn, "{name} peer={}", peer.ip());
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let (flag, name) = (Arc::clone(&stop), pod.name.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{name} peer={}", peer.ip()).as_bytes(), peer);
                }
            }
        });
        Ok(Backend { stop })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One answer: which pod, and the source address it saw.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Answer {
    pod: String,
    peer: String,
}

fn parse_answer(text: &str) -> Result<Answer> {
    let (pod, peer) = text
        .trim()
        .split_once(" peer=")
        .with_context(|| format!("unexpected answer {text:?}"))?;
    Ok(Answer {
        pod: pod.to_owned(),
        peer: peer.to_owned(),
    })
}

/// Runs `f` on a thread inside `netns`.
fn in_ns<T: Send + 'static>(
    netns: &Netns,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = netns.try_clone()?;
    std::thread::spawn(move || {
        ns.enter_current_thread()?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

fn tcp_ask(netns: &Netns, addr: SocketAddr) -> Result<Answer> {
    in_ns(netns, move || parse_answer(&tcp_exchange(addr, "who")?))
}

/// A TCP request from the client's `src` address and port (reused: `SO_REUSEADDR`), so the
/// same flow can be sent through either node.
fn tcp_ask_from(netns: &Netns, src: SocketAddrV4, addr: SocketAddr) -> Result<Answer> {
    use nix::sys::{
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket,
            sockopt,
        },
        time::TimeVal,
    };
    let SocketAddr::V4(dst) = addr else {
        bail!("{addr} is not IPv4");
    };
    in_ns(netns, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        // Linux bounds a blocking connect by the send timeout.
        setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(2, 0))?;
        bind(fd.as_raw_fd(), &SockaddrIn::from(src)).with_context(|| format!("binding {src}"))?;
        connect(fd.as_raw_fd(), &SockaddrIn::from(dst))
            .with_context(|| format!("connecting from {src} to {dst}"))?;
        let mut conn = TcpStream::from(fd);
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        conn.write_all(b"who")?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        parse_answer(&reply)
    })
}

/// A UDP request from an unconnected socket; the reply must come from `addr` itself (the
/// frontend, not the backend), or the client would not take it as the answer.
fn udp_ask(netns: &Netns, addr: SocketAddr) -> Result<Answer> {
    in_ns(netns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send_to(b"who", addr)?;
        let mut buf = [0u8; 512];
        let (n, from) = sock
            .recv_from(&mut buf)
            .context("waiting for the UDP answer")?;
        ensure!(from == addr, "UDP answer came from {from}, not {addr}");
        parse_answer(&String::from_utf8_lossy(&buf[..n]))
    })
}

/// Asks `addr` until both pods have answered (every request must succeed).
fn both_answer(
    ask: impl Fn() -> Result<Answer>,
    pods: &[PodInfo],
    what: &str,
) -> Result<BTreeSet<Answer>> {
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(ask().with_context(|| format!("a request to {what}"))?);
        let names: BTreeSet<&str> = seen.iter().map(|a| a.pod.as_str()).collect();
        if pods.iter().all(|p| names.contains(p.name.as_str())) {
            return Ok(seen);
        }
    }
    bail!("{what}: not every pod answered in 40 requests: {seen:?}")
}

/// Retries `ask` until it succeeds (the proxies may still be syncing).
fn eventually_answers(ask: impl Fn() -> Result<Answer>, what: &str) -> Result<Answer> {
    let deadline = Instant::now() + T;
    loop {
        match ask() {
            Ok(a) => return Ok(a),
            Err(e) if Instant::now() > deadline => return Err(e.context(what.to_owned())),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `netprobe` from inside node `node`'s network namespace and cgroup (where its proxy's
/// socket programs apply).
fn probe_from_node(node: &LabNode, addr: SocketAddr) -> Result<Answer> {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(node.env().cgroup2_dir().join("cgroup.procs"))?;
    let ns = ns_file(node.env().netns())?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netprobe"));
    cmd.args(["tcp", &addr.to_string(), "who"]);
    let (procs_fd, ns_fd) = (procs.as_raw_fd(), ns.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe syscalls on descriptors that stay
    // open until the command has run.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0\n".as_ptr().cast(), 2) < 0
                || libc::setns(ns_fd, libc::CLONE_NEWNET) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output()?;
    drop((procs, ns));
    ensure!(
        out.status.success(),
        "netprobe to {addr} from {}: {}",
        node.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reply = stdout
        .lines()
        .find_map(|l| l.strip_prefix("reply: "))
        .unwrap_or_default();
    parse_answer(reply)
}

/// A descriptor of `netns`, opened from a thread inside it.
fn ns_file(netns: &Netns) -> Result<std::fs::File> {
    in_ns(netns, || {
        std::fs::File::open("/proc/thread-self/ns/net").context("opening the node's netns")
    })
}

/// An HTTP/1.0 GET of `path` on `addr` from inside `netns`, without a half-close (which an
/// HTTP server may take for the client going away): the whole response.
fn http_without_half_close(netns: &Netns, addr: SocketAddr, path: &str) -> Result<String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    in_ns(netns, move || {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response)
    })
}

/// The value of counter `name` on `node`'s metrics endpoint for the tc path's frontend of
/// Service default/`service` on the node's address and `port`.
fn tc_counter(node: &LabNode, name: &str, service: &str, port: u16) -> Result<u64> {
    let body = http_without_half_close(node.env().netns(), METRICS, "/metrics")?;
    ensure!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "/metrics on {}:\n{body}",
        node.name()
    );
    let labels = [
        "namespace=\"default\"".to_owned(),
        format!("service=\"{service}\""),
        format!("address=\"{}\"", node.ip()),
        format!("port=\"{port}\""),
        "path=\"tc\"".to_owned(),
    ];
    let line = body
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .with_context(|| format!("no {name} for {service} on {}:\n{body}", node.name()))?;
    let value = line.rsplit(' ').next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("bad counter value in {line:?}"))
}

fn lb_dump(pins: &Path) -> Result<String> {
    let out = run_ok(
        Command::new(workspace_bin("keelson-agent")?)
            .args(["lb", "dump", "--bpffs"])
            .arg(pins),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The proxy of `node`: in its namespace, on its cgroup, pins under `<bpffs>/<node name>`,
/// nodePorts on its address and `eth0`.
fn start_proxy(lab: &Lab, node: &LabNode, bpffs: &Bpffs, kubeconfig: &Path) -> Result<Proxy> {
    ProxyBuilder::new(
        kubeconfig,
        node.env().cgroup2_dir(),
        &bpffs.path().join(node.name()),
    )
    .with_node(node.name(), &[node.ip()])
    .with_nodeport_interface("eth0")
    .with_metrics_listen(METRICS)
    .with_log(&lab.cp().dir().join(format!("proxy-{}.log", node.name())))
    .start_in(node.env().netns())
}

#[test]
fn node_ports_and_external_ips_reach_ready_backends() -> Result<()> {
    let started = Instant::now();
    let lab = LabBuilder::new(2).with_busybox(IMAGE).build()?;
    let bpffs = Bpffs::mount()?;
    let kubeconfig = lab.cp().kubeconfig_via(Ipv4Addr::new(172, 29, 0, 1))?;
    let mut proxies = Vec::new();
    for node in lab.nodes() {
        proxies.push(Some(start_proxy(&lab, node, &bpffs, &kubeconfig)?));
    }
    let result = run(&lab, &bpffs, &kubeconfig, &mut proxies);
    if result.is_err() {
        print_proxy_logs(&lab);
    }
    drop(proxies);
    eprintln!("NodePort test took {:?}", started.elapsed());
    result
}

/// Prints every node's proxy log (after a failure).
fn print_proxy_logs(lab: &Lab) {
    for node in lab.nodes() {
        let path = lab.cp().dir().join(format!("proxy-{}.log", node.name()));
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        eprintln!("--- {} ---\n{log}", path.display());
    }
}

/// The nodes on two routed subnets, joined by the VXLAN overlay (host-gw cannot work there):
/// a NodePort reached through either node gets both pods, the other node's through the
/// tunnel with the frontend node's address as its source (SNAT), TCP and UDP.
#[test]
fn node_ports_cross_the_vxlan_overlay() -> Result<()> {
    let lab = LabBuilder::new(2)
        .with_two_subnets()
        .with_busybox(IMAGE)
        .build()?;
    ensure!(lab.node(0).subnet() != lab.node(1).subnet());
    let bpffs = Bpffs::mount()?;
    let kubeconfig = lab.cp().kubeconfig_via(Ipv4Addr::new(172, 29, 0, 1))?;
    let mut proxies = Vec::new();
    for node in lab.nodes() {
        proxies.push(start_proxy(&lab, node, &bpffs, &kubeconfig)?);
    }
    let result = (|| -> Result<()> {
        let pods = spread_pods(&lab)?;
        let _backends: Vec<Backend> = pods
            .iter()
            .map(|p| Backend::start(&lab, p))
            .collect::<Result<_>>()?;
        for (i, node) in lab.nodes().iter().enumerate() {
            // A client on the node's own subnet (lab hosts have no route off their subnet).
            let client = lab.add_host(node.subnet())?;
            let cns = client.netns();
            let front = SocketAddr::from((node.ip(), NODE_PORT));
            eventually_answers(
                || tcp_ask(cns, front),
                &format!("first answer from {front}"),
            )?;
            for answer in both_answer(|| tcp_ask(cns, front), &pods, &front.to_string())? {
                let expect = if answer.pod == pods[i].name {
                    client.ip()
                } else {
                    node.ip()
                };
                ensure!(
                    answer.peer == expect.to_string(),
                    "via {front}: {answer:?}, expected peer {expect}"
                );
            }
            let front = SocketAddr::from((node.ip(), NODE_PORT_UDP));
            eventually_answers(|| udp_ask(cns, front), &format!("UDP via {front}"))?;
            both_answer(|| udp_ask(cns, front), &pods, &format!("UDP {front}"))?;
        }
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", lab.network_state());
        print_proxy_logs(&lab);
    }
    drop(proxies);
    result
}

/// Applies [`manifest`] and waits for its two pods, one on each node (sorted by node).
fn spread_pods(lab: &Lab) -> Result<Vec<PodInfo>> {
    lab.cp().apply(&manifest())?;
    let names = lab.eventually("two np pods", T, || {
        let pods = lab.get_json(&["pods", "-l", "app=np"])?;
        let names: Vec<String> = pods
            .as_ref()
            .and_then(|p| p["items"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|p| p.pointer("/metadata/name")?.as_str().map(str::to_owned))
            .collect();
        Ok((names.len() == 2).then_some(names))
    })?;
    let mut pods = Vec::new();
    for name in &names {
        pods.push(lab.wait_pod(name, T)?);
    }
    pods.sort_by_key(|p| p.node);
    ensure!(
        pods[0].node == 0 && pods[1].node == 1,
        "the pods are not spread over both nodes: {pods:?}"
    );
    Ok(pods)
}

fn run(lab: &Lab, bpffs: &Bpffs, kubeconfig: &Path, proxies: &mut [Option<Proxy>]) -> Result<()> {
    let pods = spread_pods(lab)?;
    let _backends: Vec<Backend> = pods
        .iter()
        .map(|p| Backend::start(lab, p))
        .collect::<Result<_>>()?;
    // Only the pod on node-1 backs `np-one`.
    lab.cp()
        .kubectl(&["label", "pod", &pods[1].name, "np-one=yes"])?;

    let client = lab.add_host(0)?;
    let cns = client.netns();
    let client_ip = client.ip().to_string();

    // Cluster policy, TCP: both pods answer through either node; the remote pod sees the
    // node's address (SNAT), the local one the client's.
    for (i, node) in lab.nodes().iter().enumerate() {
        let front = SocketAddr::from((node.ip(), NODE_PORT));
        eventually_answers(
            || tcp_ask(cns, front),
            &format!("first answer from {front}"),
        )?;
        let seen = both_answer(|| tcp_ask(cns, front), &pods, &front.to_string())?;
        eprintln!("via {front}: {seen:?}");
        for answer in &seen {
            let local = answer.pod == pods[i].name;
            let expect = if local {
                client_ip.clone()
            } else {
                node.ip().to_string()
            };
            ensure!(
                answer.peer == expect,
                "via {front}: {answer:?}, expected peer {expect}"
            );
        }
    }

    // UDP, through each node; the answer comes back from the frontend.
    for node in lab.nodes() {
        let front = SocketAddr::from((node.ip(), NODE_PORT_UDP));
        eventually_answers(|| udp_ask(cns, front), &format!("UDP via {front}"))?;
        both_answer(|| udp_ask(cns, front), &pods, &format!("UDP {front}"))?;
    }

    // Local policy: only the node's own pod, which sees the client.
    for (i, node) in lab.nodes().iter().enumerate() {
        let front = SocketAddr::from((node.ip(), NODE_PORT_LOCAL));
        eventually_answers(|| tcp_ask(cns, front), &format!("local policy via {front}"))?;
        for _ in 0..10 {
            let answer = tcp_ask(cns, front)?;
            ensure!(
                answer
                    == Answer {
                        pod: pods[i].name.clone(),
                        peer: client_ip.clone()
                    },
                "local policy via {front}: {answer:?}"
            );
        }
    }

    // Local policy, endpoint only on node-1: node-1 answers, node-0 drops.
    let one = SocketAddr::from((lab.node(1).ip(), NODE_PORT_ONE));
    let answer = eventually_answers(|| tcp_ask(cns, one), "np-one via node-1")?;
    ensure!(answer.pod == pods[1].name, "{answer:?}");
    let silent = SocketAddr::from((lab.node(0).ip(), NODE_PORT_ONE));
    for _ in 0..3 {
        let got = tcp_ask(cns, silent);
        ensure!(
            got.is_err(),
            "node-0 has no np-one endpoint but answered: {got:?}"
        );
    }

    // Its health-check node port tells an outside load balancer the same: 200 on node-1,
    // 503 on node-0.
    for (i, (code, local)) in [(503, 0), (200, 1)].into_iter().enumerate() {
        let addr = SocketAddr::from((lab.node(i).ip(), HEALTH_PORT_ONE));
        let response = http_without_half_close(cns, addr, "/healthz")?;
        ensure!(
            response.starts_with(&format!("HTTP/1.0 {code}"))
                || response.starts_with(&format!("HTTP/1.1 {code}")),
            "health check {addr}: {response}"
        );
        ensure!(
            response.contains(&format!("\"localEndpoints\":{local}"))
                && response.contains("\"name\":\"np-one\""),
            "health check {addr}: {response}"
        );
    }

    selection_and_counters(lab, &client, &pods)?;
    maglev_table_flips(lab, &client, &pods)?;

    // An externalIP routed to node-0.
    run_in(
        cns,
        Command::new("ip").args([
            "route",
            "add",
            &format!("{EXTERNAL_IP}/32"),
            "via",
            &lab.node(0).ip().to_string(),
        ]),
    )?;
    let ext = SocketAddr::from((EXTERNAL_IP, TCP_PORT));
    eventually_answers(|| tcp_ask(cns, ext), "the externalIP")?;
    both_answer(|| tcp_ask(cns, ext), &pods, "the externalIP")?;

    // From node-0 itself: its own address and nodePort, balanced at the socket.
    let own = SocketAddr::from((lab.node(0).ip(), NODE_PORT));
    both_answer(
        || probe_from_node(lab.node(0), own),
        &pods,
        "node-0's own nodePort",
    )?;

    // And node-1's address and nodePort, also balanced at node-0's sockets (from the Nodes
    // in the API): node-0's own pod is reached directly, not through node-1 (whose tc path
    // would have SNATed it to node-1's address).
    let other = SocketAddr::from((lab.node(1).ip(), NODE_PORT));
    let seen = lab.eventually("node-1's nodePort balanced at node-0's sockets", T, || {
        let seen = both_answer(
            || probe_from_node(lab.node(0), other),
            &pods,
            "node-1's nodePort",
        )?;
        Ok(seen
            .iter()
            .all(|a| a.pod != pods[0].name || a.peer != lab.node(1).ip().to_string())
            .then_some(seen))
    })?;
    eprintln!("node-0 to {other}: {seen:?}");

    let dump = lb_dump(&bpffs.path().join(lab.node(0).name()))?;
    eprintln!("lb dump on node-0:\n{dump}");
    ensure!(
        dump.contains(&format!("{}:{NODE_PORT}/tcp ->", lab.node(0).ip()))
            && dump.contains("on eth0")
            && dump.contains(&format!("{EXTERNAL_IP}:{TCP_PORT}/tcp ->"))
            && dump.contains("maglev; connections ")
            && dump.contains(&format!(
                "random, affinity {STICKY_TIMEOUT_SECS}s; connections "
            )),
        "lb dump:\n{dump}"
    );
    ensure!(
        dump.lines()
            .any(|l| l.contains("packets ") && !l.contains("packets 0,")),
        "no tc frontend with packets in lb dump:\n{dump}"
    );
    let flows: usize = dump
        .lines()
        .find_map(|l| l.strip_prefix("conntrack: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no conntrack line in:\n{dump}"))?;
    ensure!(flows > 0, "no tracked flows:\n{dump}");

    // A flow through node-0 outlives a `kill -9` and restart of its proxy: programs, maps
    // and conntrack stay pinned, and the restarted proxy keeps the pinned tc links.
    let front = SocketAddr::from((lab.node(0).ip(), NODE_PORT));
    let mut open = in_ns(cns, move || {
        Ok(TcpStream::connect_timeout(&front, Duration::from_secs(2))?)
    })?;
    if let Some(p) = proxies[0].take() {
        p.kill9();
    }
    eventually_answers(|| tcp_ask(cns, front), "node-0 with its proxy killed")?;
    proxies[0] = Some(start_proxy(lab, lab.node(0), bpffs, kubeconfig)?);
    eventually_answers(|| tcp_ask(cns, front), "node-0 with its proxy restarted")?;
    open.set_read_timeout(Some(Duration::from_secs(3)))?;
    open.write_all(b"who")?;
    open.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    open.read_to_string(&mut reply)
        .context("the flow opened before the proxy restart")?;
    parse_answer(&reply)?;

    // An upgrade: node-0's tc links pinned under version 1's names (`tc-ingress@…`) are an
    // older agent's programs; the restarted proxy attaches its own in front of them, unpins
    // them, and a flow opened before keeps working through the shared conntrack maps.
    let pins = bpffs.path().join(lab.node(0).name());
    let mut open = in_ns(cns, move || {
        Ok(TcpStream::connect_timeout(&front, Duration::from_secs(2))?)
    })?;
    if let Some(p) = proxies[0].take() {
        p.kill9();
    }
    let mut renamed = Vec::new();
    for entry in std::fs::read_dir(&pins)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix("tc-")
            && let Some((direction, interface)) = rest.split_once('@')
            && let Some((direction, _)) = direction.split_once("_v")
        {
            let old = format!("tc-{direction}@{interface}");
            std::fs::rename(pins.join(&name), pins.join(&old))?;
            renamed.push((name, old));
        }
    }
    ensure!(renamed.len() == 2, "tc link pins on node-0: {renamed:?}");
    proxies[0] = Some(start_proxy(lab, lab.node(0), bpffs, kubeconfig)?);
    lab.eventually("the older tc links replaced", T, || {
        Ok(renamed
            .iter()
            .all(|(new, old)| pins.join(new).exists() && !pins.join(old).exists())
            .then_some(()))
    })?;
    eventually_answers(|| tcp_ask(cns, front), "node-0 after the upgrade")?;
    open.set_read_timeout(Some(Duration::from_secs(3)))?;
    open.write_all(b"who")?;
    open.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    open.read_to_string(&mut reply)
        .context("the flow opened before the upgrade")?;
    parse_answer(&reply)?;

    // `lb detach` removes the tc links with the rest: node-0 no longer serves nodePorts.
    if let Some(p) = proxies[0].take() {
        p.kill9();
    }
    let out = run_ok(
        Command::new(workspace_bin("keelson-agent")?)
            .args(["lb", "detach", "--bpffs"])
            .arg(&pins),
    )?;
    let out = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.contains("tc-ingress_v") && out.contains("tc-egress_v") && out.contains("@eth0"),
        "lb detach:\n{out}"
    );
    // The kernel frees an unpinned link after an RCU grace period: soon, not at once.
    let detached = Instant::now();
    let deadline = detached + Duration::from_secs(10);
    while let Ok(answer) = tcp_ask(cns, front) {
        ensure!(
            Instant::now() < deadline,
            "node-0 still serves its nodePort 10 s after detach: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "node-0 stopped serving {:?} after detach",
        detached.elapsed()
    );
    Ok(())
}

/// Sends one new flow per port of `ports` from the client through both nodes to the Maglev
/// Service; every flow must be answered, by the same pod through either node. Returns the
/// answering pods.
fn maglev_flows(lab: &Lab, client: &LabHost, ports: std::ops::Range<u16>) -> Result<Vec<String>> {
    let (node0, node1) = (lab.node(0), lab.node(1));
    let mut pods = Vec::new();
    for port in ports {
        let src = SocketAddrV4::new(client.ip(), port);
        let via0 = tcp_ask_from(
            client.netns(),
            src,
            SocketAddr::from((node0.ip(), NODE_PORT_MAGLEV)),
        )?;
        let via1 = tcp_ask_from(
            client.netns(),
            src,
            SocketAddr::from((node1.ip(), NODE_PORT_MAGLEV)),
        )?;
        ensure!(
            via0.pod == via1.pod,
            "flow from {src}: {via0:?} through node-0 but {via1:?} through node-1"
        );
        pods.push(via0.pod);
    }
    Ok(pods)
}

/// A Maglev Service's backend changes on the tc path. Each change writes the unused table of
/// the frontend's pair and flips to it with the new backend set, so once a node has the new
/// set every new flow uses the new table: shrunk to one backend, a stale two-backend table
/// would send about half the flows to a slot the set no longer has (dropped); grown back, the
/// flows spread over both again, still agreeing across nodes (the pair's other table).
fn maglev_table_flips(lab: &Lab, client: &LabHost, pods: &[PodInfo]) -> Result<()> {
    const FLOWS: u16 = 12;
    let mut next = TABLE_FLIP_PORTS;
    let mut ports = || {
        let range = next..next + FLOWS;
        next += FLOWS;
        range
    };
    let only = &pods[1].name;
    lab.cp().kubectl(&[
        "patch",
        "service",
        "np-maglev",
        "-p",
        r#"{"spec":{"selector":{"app":"np","np-one":"yes"}}}"#,
    ])?;
    // While the change spreads (EndpointSlice, then each proxy), flows may still see the old
    // set; failures then are retried.
    lab.eventually("np-maglev to send every flow to one pod", T, || {
        Ok(maglev_flows(lab, client, ports())
            .is_ok_and(|p| p.iter().all(|p| p == only))
            .then_some(()))
    })?;
    let chosen = maglev_flows(lab, client, ports()).context("np-maglev shrunk to one pod")?;
    ensure!(
        chosen.iter().all(|p| p == only),
        "np-maglev with one endpoint sent flows to {chosen:?}"
    );

    lab.cp().kubectl(&[
        "patch",
        "service",
        "np-maglev",
        "-p",
        r#"{"spec":{"selector":{"app":"np","np-one":null}}}"#,
    ])?;
    lab.eventually("np-maglev to spread over both pods again", T, || {
        Ok(maglev_flows(lab, client, ports())
            .is_ok_and(|p| p.iter().any(|p| p != only))
            .then_some(()))
    })?;
    let chosen: BTreeSet<String> = maglev_flows(lab, client, ports())
        .context("np-maglev grown back to two pods")?
        .into_iter()
        .collect();
    ensure!(
        chosen.len() == 2,
        "np-maglev with two endpoints sent {FLOWS} flows to {chosen:?} only"
    );
    Ok(())
}

/// The tc path's backend selection and counters, through both nodes from the outside client.
fn selection_and_counters(lab: &Lab, client: &LabHost, pods: &[PodInfo]) -> Result<()> {
    let cns = client.netns();
    let (node0, node1) = (lab.node(0), lab.node(1));

    // Maglev: the same client flow (address and source port) lands on the same backend
    // whichever node it enters through; over several flows both backends serve.
    for node in lab.nodes() {
        let front = SocketAddr::from((node.ip(), NODE_PORT_MAGLEV));
        eventually_answers(|| tcp_ask(cns, front), &format!("Maglev via {front}"))?;
    }
    let flows_before = tc_counter(
        node0,
        "keelson_lb_connections_total",
        "np-maglev",
        NODE_PORT_MAGLEV,
    )?;
    let packets_before = tc_counter(
        node0,
        "keelson_lb_packets_total",
        "np-maglev",
        NODE_PORT_MAGLEV,
    )?;
    let mut chosen = BTreeSet::new();
    for port in MAGLEV_PORTS {
        let src = SocketAddrV4::new(client.ip(), port);
        let via0 = tcp_ask_from(cns, src, SocketAddr::from((node0.ip(), NODE_PORT_MAGLEV)))?;
        let via1 = tcp_ask_from(cns, src, SocketAddr::from((node1.ip(), NODE_PORT_MAGLEV)))?;
        ensure!(
            via0.pod == via1.pod,
            "flow from {src}: {via0:?} through node-0 but {via1:?} through node-1"
        );
        chosen.insert(via0.pod);
    }
    eprintln!(
        "Maglev backends of {} flows: {chosen:?}",
        MAGLEV_PORTS.len()
    );
    ensure!(
        chosen.len() == pods.len(),
        "Maglev sent every flow to {chosen:?}"
    );
    let flows = u64::from(MAGLEV_PORTS.end - MAGLEV_PORTS.start);
    let flows_after = tc_counter(
        node0,
        "keelson_lb_connections_total",
        "np-maglev",
        NODE_PORT_MAGLEV,
    )?;
    let packets_after = tc_counter(
        node0,
        "keelson_lb_packets_total",
        "np-maglev",
        NODE_PORT_MAGLEV,
    )?;
    eprintln!(
        "node-0 np-maglev: {} new flows, {} packets",
        flows_after - flows_before,
        packets_after - packets_before
    );
    ensure!(
        flows_after - flows_before == flows,
        "node-0 counted {} new flows for {flows}",
        flows_after - flows_before
    );
    // Each exchange is several packets each way (handshake, request, answer, close).
    ensure!(
        packets_after - packets_before >= 4 * flows,
        "node-0 counted {} packets for {flows} flows",
        packets_after - packets_before
    );

    // ClientIP affinity: every connection of the client through a node goes to one backend
    // (the random np-cluster Service above spread the same client over both).
    for node in lab.nodes() {
        let front = SocketAddr::from((node.ip(), NODE_PORT_STICKY));
        let first = eventually_answers(|| tcp_ask(cns, front), &format!("affinity via {front}"))?;
        let hits_before = tc_counter(
            node,
            "keelson_lb_affinity_hits_total",
            "np-sticky",
            NODE_PORT_STICKY,
        )?;
        for _ in 0..20 {
            let answer = tcp_ask(cns, front)?;
            ensure!(
                answer.pod == first.pod,
                "affinity via {front}: {answer:?} after {first:?}"
            );
        }
        let hits = tc_counter(
            node,
            "keelson_lb_affinity_hits_total",
            "np-sticky",
            NODE_PORT_STICKY,
        )?;
        ensure!(
            hits - hits_before == 20,
            "{}: {} affinity hits for 20 connections",
            node.name(),
            hits - hits_before
        );
    }

    // The timeout counts from the client's last connection: once it has passed, the next
    // connection chooses afresh (no hit); the one after it sticks again.
    let front = SocketAddr::from((node0.ip(), NODE_PORT_STICKY));
    let hits = || {
        tc_counter(
            node0,
            "keelson_lb_affinity_hits_total",
            "np-sticky",
            NODE_PORT_STICKY,
        )
    };
    std::thread::sleep(Duration::from_secs(u64::from(STICKY_TIMEOUT_SECS) + 1));
    let before = hits()?;
    tcp_ask(cns, front)?;
    ensure!(hits()? == before, "an expired affinity was used");
    tcp_ask(cns, front)?;
    ensure!(
        hits()? == before + 1,
        "no affinity hit after a fresh choice"
    );

    // Drops: node-0 has no endpoint of the Local-policy np-one, so its SYNs are dropped.
    let silent = SocketAddr::from((node0.ip(), NODE_PORT_ONE));
    let drops_before = tc_counter(node0, "keelson_lb_drops_total", "np-one", NODE_PORT_ONE)?;
    for _ in 0..2 {
        ensure!(tcp_ask(cns, silent).is_err(), "node-0 answered np-one");
    }
    let drops = tc_counter(node0, "keelson_lb_drops_total", "np-one", NODE_PORT_ONE)?;
    eprintln!("node-0 np-one: {} drops", drops - drops_before);
    ensure!(
        drops - drops_before >= 2,
        "node-0 counted {} drops for two refused connects",
        drops - drops_before
    );
    Ok(())
}
