//! Service load balancing across a two-node lab (`keelson_e2e::lab`): each node runs
//! `keelson-agent node` and its own `keelson-agent proxy` (the eBPF load balancer on that
//! node's cgroup2 directory, pinned in a bpffs of the test's own). Checked from a pod and from
//! the nodes themselves: ClusterIP to backends on the same and on the other node, UDP, a
//! failing readiness probe taking a backend out of rotation and back, a Deployment scaled from
//! 0 to N and back (refused at once when empty), a blue-green selector switch and a `kill -9`
//! of the proxy, both under continuous short connections with zero failures.
//!
//! Every client runs inside the lab: in a pod (busybox `nc` through `kubectl exec`) or in a
//! node's namespace and cgroup (`netprobe`). The lab has no route out.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use keelson_e2e::{
    Bpffs,
    lab::{Lab, LabBuilder, LabNode, PodInfo, in_netns_file},
    node::wait_for,
    proxy::Proxy,
};
use serde_json::Value;

const IMAGE: &str = "keelson.test/busybox:1";
const T: Duration = Duration::from_secs(60);
const HTTP_GET: &str = "GET / HTTP/1.0\r\n\r\n";

/// The lab with a proxy per node. Dropped in field order: proxies, their bpffs (which detaches
/// the programs), then the lab.
struct Cluster {
    proxies: Mutex<Vec<Option<Proxy>>>,
    bpffs: Vec<Bpffs>,
    lab: Lab,
}

impl Cluster {
    fn start() -> Result<Self> {
        let lab = LabBuilder::new(2).with_busybox(IMAGE).build()?;
        let mut cluster = Cluster {
            proxies: Mutex::new(Vec::new()),
            bpffs: Vec::new(),
            lab,
        };
        for _ in 0..2 {
            cluster.bpffs.push(Bpffs::mount()?);
        }
        let proxies = (0..2)
            .map(|i| cluster.start_proxy(i).map(Some))
            .collect::<Result<Vec<_>>>()?;
        cluster.proxies = Mutex::new(proxies);
        Ok(cluster)
    }

    /// `kill -9` of node `node`'s proxy (its pinned programs and maps stay).
    fn kill_proxy(&self, node: usize) -> Result<()> {
        let proxy = self
            .proxies
            .lock()
            .map_err(|_| anyhow::anyhow!("proxies lock"))?[node]
            .take()
            .context("that proxy is not running")?;
        proxy.kill9();
        Ok(())
    }

    /// Starts node `node`'s proxy again, on the same cgroup and pins.
    fn restart_proxy(&self, node: usize) -> Result<()> {
        let proxy = self.start_proxy(node)?;
        self.proxies
            .lock()
            .map_err(|_| anyhow::anyhow!("proxies lock"))?[node] = Some(proxy);
        Ok(())
    }

    fn start_proxy(&self, node: usize) -> Result<Proxy> {
        Proxy::start(
            self.lab.cp(),
            self.lab.node(node).env().cgroup2_dir(),
            &self.bpffs[node].path().join("keelson"),
        )
    }

    fn node(&self, i: usize) -> &LabNode {
        self.lab.node(i)
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.lab.cp().kubectl(args)
    }

    fn cluster_ip(&self, service: &str) -> Result<Ipv4Addr> {
        let ip = self.kubectl(&[
            "get",
            "service",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?;
        ip.trim()
            .parse()
            .with_context(|| format!("cluster IP of {service}: {ip:?}"))
    }

    fn ready_replicas(&self, deployment: &str) -> Result<u64> {
        let d = self
            .lab
            .get_json(&["deployment", deployment])?
            .context("deployment gone")?;
        Ok(d.pointer("/status/readyReplicas")
            .and_then(Value::as_u64)
            .unwrap_or(0))
    }

    fn wait_ready_replicas(&self, deployment: &str, n: u64) -> Result<()> {
        self.lab.eventually(
            &format!("{deployment} to have {n} ready replicas"),
            T,
            || Ok((self.ready_replicas(deployment)? == n).then_some(())),
        )
    }

    fn pod_names(&self, selector: &str) -> Result<BTreeSet<String>> {
        let out = self.kubectl(&[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        Ok(out.split_whitespace().map(str::to_owned).collect())
    }

    /// Runs `script` in `pod`'s container.
    fn exec(&self, pod: &str, script: &str) -> Result<String> {
        self.kubectl(&["exec", pod, "--", "sh", "-c", script])
    }
}

/// What one request saw: the body (TCP) or reply (UDP), or the client's error.
type Answer = Result<String, String>;

/// One request with `netprobe` from `node` itself (its namespace and cgroup): the HTTP body
/// for TCP, the datagram for UDP (checking it came from `addr`, as the application must see).
fn ask(node: &LabNode, proto: &str, addr: SocketAddr) -> Result<Answer> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netprobe"));
    let message = if proto == "tcp" { HTTP_GET } else { "q" };
    cmd.args([proto, &addr.to_string(), message]);
    let placed = node.env().place_on_node(&mut cmd)?;
    let out = cmd.output().context("starting netprobe")?;
    drop(placed);
    if !out.status.success() {
        return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (reply, peer) = stdout
        .rsplit_once("\npeer: ")
        .context("netprobe printed no peer")?;
    ensure!(
        peer.trim() == addr.to_string(),
        "the application saw {peer:?} as its peer, not the service {addr}"
    );
    let reply = reply.strip_prefix("reply: ").unwrap_or(reply);
    let body = reply.split_once("\r\n\r\n").map_or(reply, |(_, b)| b);
    Ok(Ok(body.trim().to_owned()))
}

/// A TCP request that must succeed: the body.
fn body(node: &LabNode, addr: SocketAddr) -> Result<String> {
    ask(node, "tcp", addr)?.map_err(|e| anyhow::anyhow!("request to {addr} failed: {e}"))
}

/// Waits until `count` consecutive TCP requests from `node` are all answered by a body in
/// `expected`, and every body of `expected` was seen among them or before.
fn wait_for_exactly(
    c: &Cluster,
    node: usize,
    addr: SocketAddr,
    expected: &BTreeSet<String>,
    count: usize,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    let mut streak = 0;
    c.lab.eventually(
        &format!("{addr} answered by exactly {expected:?}"),
        T,
        || {
            match ask(c.node(node), "tcp", addr)? {
                Ok(b) if expected.contains(&b) => {
                    streak += 1;
                    seen.insert(b);
                }
                _ => {
                    streak = 0;
                    seen.clear();
                }
            }
            Ok((streak >= count && seen == *expected).then_some(()))
        },
    )
}

/// Waits until TCP connects from `node` to `addr` are refused at once (not a time-out).
fn wait_refused(c: &Cluster, node: usize, addr: SocketAddr) -> Result<()> {
    c.lab
        .eventually(&format!("{addr} refused"), T, || refused_now(c, node, addr))?;
    for _ in 0..5 {
        refused_now(c, node, addr)?.context("refused once, then not")?;
    }
    Ok(())
}

fn refused_now(c: &Cluster, node: usize, addr: SocketAddr) -> Result<Option<()>> {
    let start = Instant::now();
    let answer = ask(c.node(node), "tcp", addr)?;
    let took = start.elapsed();
    Ok(match answer {
        // netprobe's own start counts too; a hang would be its 3 s connect timeout.
        Err(e) if e.contains("Connection refused") && took < Duration::from_secs(1) => Some(()),
        _ => None,
    })
}

/// Short connections from `node` to `addr`, one after another, while `during` runs on this
/// thread; every answer, in order.
fn under_load<T>(
    c: &Cluster,
    node: usize,
    addr: SocketAddr,
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<Answer>)> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let load = s.spawn(|| -> Result<Vec<Answer>> {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                answers.push(ask(c.node(node), "tcp", addr)?);
            }
            Ok(answers)
        });
        let result = during();
        stop.store(true, Ordering::Relaxed);
        let answers = load
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        Ok((result?, answers))
    })
}

fn count_failures(answers: &[Answer]) -> (usize, Vec<&String>) {
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    (answers.len(), failed)
}

/// A container answering HTTP on 8080 with `body`, ready while `/www/ready` exists; YAML
/// lines after `- name:`, each indented by `indent`.
fn web_container(body: &str, indent: &str) -> String {
    [
        format!("image: {IMAGE}"),
        format!(
            "command: [sh, -c, 'mkdir -p /www && echo {body} > /www/index.html && touch /www/ready && exec httpd -f -p 8080 -h /www']"
        ),
        "readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 1, failureThreshold: 1}"
            .to_owned(),
    ]
    .iter()
    .map(|line| format!("{indent}{line}\n"))
    .collect()
}

fn web_pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: web}}}}\n\
         spec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: web\n{}",
        web_container(name, "    ")
    )
}

fn deployment(name: &str, labels: &str, replicas: u32, body: &str) -> String {
    format!(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{{labels}}}}}\n  template:\n    \
         metadata: {{labels: {{{labels}}}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      \
         containers:\n      - name: web\n{}",
        web_container(body, "        ")
    )
}

fn service(name: &str, selector: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{selector: {{{selector}}}, ports: [{ports}]}}\n"
    )
}

/// A UDP server inside a pod's network namespace answering `udp-<pod>`; stopped on drop.
struct UdpResponder {
    stop: Arc<AtomicBool>,
}

impl UdpResponder {
    fn start(lab: &Lab, pod: &PodInfo, port: u16) -> Result<Self> {
        let addr = SocketAddr::from((pod.ip, port));
        let socket = in_netns_file(&lab.pod_netns(pod), move || {
            let s = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let reply = format!("udp-{}", pod.name);
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(reply.as_bytes(), from);
                }
            }
        });
        Ok(UdpResponder { stop })
    }
}

impl Drop for UdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn services_balance_across_nodes_and_survive_changes_under_load() -> Result<()> {
    let started = Instant::now();
    let c = Cluster::start()?;
    let result = run(&c);
    if result.is_err() {
        eprintln!("{}", c.lab.logs());
    }
    eprintln!(
        "service load-balancer lab test took {:?}",
        started.elapsed()
    );
    result
}

fn run(c: &Cluster) -> Result<()> {
    let (n0, n1) = (c.node(0).name(), c.node(1).name());
    let mut manifest = web_pod("web-0", n0) + &web_pod("web-1", n1);
    manifest += &format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: default}}\n\
         spec:\n  nodeName: {n0}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    \
         image: {IMAGE}\n    command: [sleep, '3600']\n"
    );
    manifest += &service(
        "web",
        "app: web",
        "{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}",
    );
    c.lab.cp().apply(&manifest)?;
    let web = [c.lab.wait_pod("web-0", T)?, c.lab.wait_pod("web-1", T)?];
    ensure!(web[0].node == 0 && web[1].node == 1, "one backend per node");
    c.lab.wait_pod("client", T)?;
    let vip = c.cluster_ip("web")?;

    cluster_ip(c, vip, &web)?;
    readiness(c, SocketAddr::from((vip, 80)))?;
    scale_from_zero(c)?;
    blue_green(c)?;
    proxy_restart(c, SocketAddr::from((vip, 80)))?;
    Ok(())
}

/// ClusterIP from a pod on node 0 and from both nodes reaches the backend on node 0 and the
/// one on node 1; UDP too, answered from the service address.
fn cluster_ip(c: &Cluster, vip: Ipv4Addr, web: &[PodInfo; 2]) -> Result<()> {
    let http = SocketAddr::from((vip, 80));
    let both: BTreeSet<String> = ["web-0".into(), "web-1".into()].into();
    wait_for_exactly(c, 0, http, &both, 4)?;

    // From the client pod (node 0): busybox nc, 20 short connections.
    let out = c.exec(
        "client",
        &format!(
            "for i in $(seq 20); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {vip} 80 | tail -n 1; done"
        ),
    )?;
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for line in out.lines() {
        *per_backend.entry(line.trim()).or_default() += 1;
    }
    ensure!(
        per_backend.keys().copied().collect::<BTreeSet<_>>()
            == ["web-0", "web-1"].into_iter().collect()
            && per_backend.values().sum::<usize>() == 20,
        "20 requests from a pod, answered by both backends only: {per_backend:?}"
    );

    // From each node itself.
    for node in 0..2 {
        let seen: BTreeSet<String> = (0..20)
            .map(|_| body(c.node(node), http))
            .collect::<Result<_>>()?;
        ensure!(seen == both, "from node {node}: {seen:?}");
    }

    // UDP: datagrams to the service port reach both pods' port 5353 and come back from the
    // service address (`ask` checks the peer).
    let _udp = [
        UdpResponder::start(&c.lab, &web[0], 5353)?,
        UdpResponder::start(&c.lab, &web[1], 5353)?,
    ];
    let dns = SocketAddr::from((vip, 53));
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        match ask(c.node(0), "udp", dns)? {
            Ok(reply) => {
                seen.insert(reply);
            }
            Err(e) => bail!("UDP to {dns}: {e}"),
        }
    }
    ensure!(
        seen == ["udp-web-0".to_owned(), "udp-web-1".to_owned()].into(),
        "UDP answers: {seen:?}"
    );
    Ok(())
}

/// A readiness probe failing on web-1 takes it out of rotation; passing again brings it back.
fn readiness(c: &Cluster, http: SocketAddr) -> Result<()> {
    c.exec("web-1", "rm /www/ready")?;
    wait_for_exactly(c, 0, http, &["web-0".into()].into(), 15)?;
    c.exec("web-1", "touch /www/ready")?;
    wait_for_exactly(c, 0, http, &["web-0".into(), "web-1".into()].into(), 4)?;
    Ok(())
}

/// A Deployment at 0 replicas refuses at once; scaled to 3 all answer; back at 0 it refuses.
fn scale_from_zero(c: &Cluster) -> Result<()> {
    c.lab.cp().apply(
        &(deployment("scale", "app: scale", 0, "$(hostname)")
            + &service("scale", "app: scale", "{port: 80, targetPort: 8080}")),
    )?;
    let addr = SocketAddr::from((c.cluster_ip("scale")?, 80));
    wait_refused(c, 1, addr)?;

    c.kubectl(&["scale", "deployment/scale", "--replicas=3"])?;
    c.wait_ready_replicas("scale", 3)?;
    let names = c.pod_names("app=scale")?;
    ensure!(names.len() == 3, "pods: {names:?}");
    wait_for_exactly(c, 1, addr, &names, 6)?;

    c.kubectl(&["scale", "deployment/scale", "--replicas=0"])?;
    // While they stop (grace period), the pods are terminating endpoints that may still serve
    // new connections when nothing else does; once they are gone every connect is refused.
    c.lab.eventually("the scaled-down pods to be gone", T, || {
        Ok(c.pod_names("app=scale")?.is_empty().then_some(()))
    })?;
    wait_refused(c, 1, addr)?;
    Ok(())
}

/// The Service's selector moves from the blue Deployment to the green one while node 0 keeps
/// making short connections: none fails, and afterwards only green answers.
fn blue_green(c: &Cluster) -> Result<()> {
    c.lab.cp().apply(
        &(deployment("blue", "app: bg, color: blue", 2, "blue")
            + &deployment("green", "app: bg, color: green", 2, "green")
            + &service("bg", "app: bg, color: blue", "{port: 80, targetPort: 8080}")),
    )?;
    c.wait_ready_replicas("blue", 2)?;
    c.wait_ready_replicas("green", 2)?;
    let addr = SocketAddr::from((c.cluster_ip("bg")?, 80));
    wait_for_exactly(c, 0, addr, &["blue".into()].into(), 5)?;

    let ((), answers) = under_load(c, 0, addr, || {
        std::thread::sleep(Duration::from_secs(2));
        c.kubectl(&[
            "patch",
            "service",
            "bg",
            "-p",
            r#"{"spec":{"selector":{"app":"bg","color":"green"}}}"#,
        ])?;
        // Let the load run until it has seen green for a while.
        wait_for("green to answer", T, || {
            Ok((body(c.node(1), addr)? == "green").then_some(()))
        })?;
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    })?;
    let (total, failed) = count_failures(&answers);
    ensure!(
        failed.is_empty(),
        "{} of {total} requests failed during the switch, first: {:?}",
        failed.len(),
        failed.first()
    );
    let first_green = answers
        .iter()
        .position(|a| a.as_deref() == Ok("green"))
        .context("the load never reached green")?;
    ensure!(
        total >= 20 && first_green > 0,
        "too little load to tell: {total} requests, first green at {first_green}"
    );
    for _ in 0..10 {
        let b = body(c.node(0), addr)?;
        ensure!(b == "green", "after the switch {b} answered");
    }
    eprintln!("blue-green: {total} requests, 0 failed, green from request {first_green}");
    Ok(())
}

/// `kill -9` of node 0's proxy and its restart while node 0 keeps connecting: none fails.
fn proxy_restart(c: &Cluster, http: SocketAddr) -> Result<()> {
    let ((), answers) = under_load(c, 0, http, || {
        std::thread::sleep(Duration::from_secs(1));
        c.kill_proxy(0)?;
        std::thread::sleep(Duration::from_secs(2));
        c.restart_proxy(0)?;
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    })?;
    let (total, failed) = count_failures(&answers);
    ensure!(
        failed.is_empty(),
        "{} of {total} requests failed across the proxy's kill -9 and restart, first: {:?}",
        failed.len(),
        failed.first()
    );
    let seen: BTreeSet<&str> = answers.iter().filter_map(|a| a.as_deref().ok()).collect();
    ensure!(
        total >= 20 && seen == ["web-0", "web-1"].into(),
        "{total} requests answered by {seen:?}"
    );
    // The restarted proxy follows changes again.
    c.exec("web-1", "rm /www/ready")?;
    wait_for_exactly(c, 0, http, &["web-0".into()].into(), 10)?;
    eprintln!("proxy kill -9 and restart: {total} requests, 0 failed");
    Ok(())
}
