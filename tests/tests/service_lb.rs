//! Backend selection of the eBPF load balancer, end to end with the real `keelson-agent`:
//! session affinity against random spreading, Maglev's agreement between two independent
//! load balancers, terminating endpoints (established connections keep working, new ones go
//! elsewhere, and the fallback to terminating endpoints when nothing else serves), and the
//! per-service counters on the proxy's metrics endpoint.
//!
//! Everything runs in a network namespace with only `lo`, a cgroup2 directory and a private
//! bpffs that the test creates and removes.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use keelson_e2e::{
    Bpffs, Cgroup2, Netns, cluster::ControlPlane, echo::EchoServer, place, require_root, run_ok,
    workspace_bin,
};

/// Runs `keelson-agent lb <args…> --bpffs <pins>` and returns its stdout.
fn lb(pins: &Path, args: &[&str]) -> Result<String> {
    let out = run_ok(
        Command::new(workspace_bin("keelson-agent")?)
            .arg("lb")
            .args(args)
            .arg("--bpffs")
            .arg(pins),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One TCP request to `addr` from a fresh process in `netns` and `cgroup`: the name of the
/// backend that answered, or the client's error text.
fn ask(netns: &Netns, cgroup: &Cgroup2, addr: &str) -> Result<Result<String, String>> {
    probe(netns, cgroup, &["tcp", addr, "q"])
}

/// [`ask`] that must succeed.
fn backend(netns: &Netns, cgroup: &Cgroup2, addr: &str) -> Result<String> {
    ask(netns, cgroup, addr)?.map_err(|e| anyhow::anyhow!("request to {addr} failed: {e}"))
}

/// Polls until `check` holds, or fails after 20 s.
fn eventually(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check()? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn client_ip_affinity_keeps_one_backend_while_random_spreads() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("lb-aff")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let servers = ["a", "b", "c"]
        .map(|n| EchoServer::tcp(&netns, &format!("backend-{n}")))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let addrs: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    let vip = "10.96.0.30:80";
    lb(
        &pins,
        &[
            "attach",
            "--cgroup",
            cgroup.path().to_str().context("cgroup path")?,
        ],
    )?;

    // Random: new connections from one client spread over the backends.
    let mut args = vec!["set", vip];
    args.extend(addrs.iter().map(String::as_str));
    lb(&pins, &args)?;
    let seen: BTreeSet<String> = (0..30)
        .map(|_| backend(&netns, &cgroup, vip))
        .collect::<Result<_>>()?;
    ensure!(seen.len() >= 2, "random selection used only {seen:?}");

    // ClientIP affinity: every connection of this client (its network namespace) goes to
    // the backend its first one got.
    let mut affinity = args.clone();
    affinity.extend(["--affinity-timeout", "60"]);
    lb(&pins, &affinity)?;
    let first = backend(&netns, &cgroup, vip)?;
    for _ in 0..20 {
        assert_eq!(backend(&netns, &cgroup, vip)?, first);
    }
    let dump = lb(&pins, &["dump"])?;
    ensure!(
        dump.contains("random, affinity 60s; connections 51, refused 0, affinity hits 20"),
        "dump: {dump}"
    );

    // That backend leaves the service: the client is not sent to it again, and sticks to
    // its new one.
    let index = ["a", "b", "c"]
        .iter()
        .position(|n| format!("backend-{n}") == first)
        .with_context(|| format!("unknown backend {first}"))?;
    let mut rest = vec!["set", vip, "--affinity-timeout", "60"];
    rest.extend(
        addrs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, a)| a.as_str()),
    );
    lb(&pins, &rest)?;
    let second = backend(&netns, &cgroup, vip)?;
    ensure!(second != first, "still sent to the removed backend {first}");
    for _ in 0..10 {
        assert_eq!(backend(&netns, &cgroup, vip)?, second);
    }

    // The timeout counts from the last connection: after it has passed, the next connect
    // chooses afresh (no affinity hit); the one right after it sticks again.
    rest[3] = "1";
    lb(&pins, &rest)?;
    let hits = || -> Result<u64> {
        let dump = lb(&pins, &["dump"])?;
        dump.split("affinity hits ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.trim_end_matches(',').parse().ok())
            .with_context(|| format!("no affinity hits in dump: {dump}"))
    };
    backend(&netns, &cgroup, vip)?;
    let before = hits()?;
    std::thread::sleep(Duration::from_millis(1500));
    backend(&netns, &cgroup, vip)?;
    assert_eq!(hits()?, before, "an expired affinity was used");
    backend(&netns, &cgroup, vip)?;
    assert_eq!(hits()?, before + 1);
    Ok(())
}

#[test]
fn maglev_sends_a_client_to_the_same_backend_from_two_load_balancers() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let names = ["a", "b", "c", "d", "e"];
    let servers = names
        .map(|n| EchoServer::tcp(&netns, &format!("backend-{n}")))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut addrs: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    let vip = "10.96.0.31:80";

    // Two independent load balancers (as on two nodes): own cgroup, own pins, backends
    // given in different orders; the client is the same network namespace.
    let mut chosen = Vec::new();
    let mut guards = Vec::new();
    for round in 0..2 {
        let cgroup = Cgroup2::new(&format!("lb-maglev{round}"))?;
        let bpffs = Bpffs::mount()?;
        let pins = bpffs.path().join("keelson");
        lb(
            &pins,
            &[
                "attach",
                "--cgroup",
                cgroup.path().to_str().context("cgroup path")?,
            ],
        )?;
        let mut args = vec!["set", vip, "--algorithm", "maglev"];
        args.extend(addrs.iter().map(String::as_str));
        lb(&pins, &args)?;
        let first = backend(&netns, &cgroup, vip)?;
        for _ in 0..15 {
            assert_eq!(
                backend(&netns, &cgroup, vip)?,
                first,
                "load balancer {round}"
            );
        }
        chosen.push(first);
        addrs.reverse();
        guards.push((cgroup, bpffs));
    }
    assert_eq!(chosen[0], chosen[1], "the two load balancers disagree");
    Ok(())
}

/// One TCP request to `addr` from a fresh process in `netns` and `cgroup` whose socket is
/// bound to `source` first (a client address of its own): the answering backend's name, or
/// the client's error text.
fn ask_from(
    netns: &Netns,
    cgroup: &Cgroup2,
    addr: &str,
    source: &str,
) -> Result<Result<String, String>> {
    probe(netns, cgroup, &["tcp", addr, "q", source])
}

/// Runs netprobe with `args` in `netns` and `cgroup`: the name of the backend that answered,
/// or the client's error text.
fn probe(netns: &Netns, cgroup: &Cgroup2, args: &[&str]) -> Result<Result<String, String>> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netprobe"));
    cmd.args(args);
    let fds = place(&mut cmd, netns, Some(cgroup))?;
    let out = cmd.output().context("starting netprobe")?;
    drop(fds);
    Ok(if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let reply = text
            .lines()
            .find_map(|l| l.strip_prefix("reply: "))
            .unwrap_or_default();
        Ok(reply.split(':').next().unwrap_or_default().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    })
}

#[test]
fn maglev_changes_flip_tables_and_keep_clients_on_valid_backends() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("lb-flip")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let servers = ["a", "b", "c"]
        .map(|n| EchoServer::tcp(&netns, &format!("backend-{n}")))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let addr = |i: usize| servers[i].addr().to_string();
    let name = |i: usize| format!("backend-{}", ["a", "b", "c"][i]);
    let cg = cgroup.path().to_str().context("cgroup path")?;
    lb(&pins, &["attach", "--cgroup", cg])?;
    let vip = "10.96.0.34:80";
    let set = |backends: &[usize]| -> Result<()> {
        let addrs: Vec<String> = backends.iter().map(|i| addr(*i)).collect();
        let mut args = vec!["set", vip, "--algorithm", "maglev"];
        args.extend(addrs.iter().map(String::as_str));
        lb(&pins, &args).map(drop)
    };
    // Clients with addresses of their own (on the namespace's loopback): Maglev hashes each
    // to a table entry, so together they exercise most of the table.
    let clients: Vec<String> = (10..34).map(|i| format!("127.0.0.{i}")).collect();
    // Each client once: every request must be answered by a backend of `allowed`.
    let round = |allowed: &[usize]| -> Result<Vec<String>> {
        let allowed: Vec<String> = allowed.iter().map(|i| name(*i)).collect();
        let mut got = Vec::new();
        for c in &clients {
            let b = ask_from(&netns, &cgroup, vip, c)?
                .map_err(|e| anyhow::anyhow!("client {c}: {e}"))?;
            ensure!(
                allowed.contains(&b),
                "client {c} reached {b}, not one of {allowed:?}"
            );
            got.push(b);
        }
        Ok(got)
    };

    set(&[0, 1])?;
    let two = round(&[0, 1])?;
    ensure!(two.contains(&name(0)) && two.contains(&name(1)), "{two:?}");
    assert_eq!(
        round(&[0, 1])?,
        two,
        "Maglev moved clients without a change"
    );

    // Grown to three: the new set's table (the pair's other one) is in use at once — the old
    // two-backend table never names slot 2, where c is.
    set(&[0, 1, 2])?;
    let three = round(&[0, 1, 2])?;
    ensure!(
        three.contains(&name(2)),
        "no client reached the new backend: {three:?}"
    );
    assert_eq!(round(&[0, 1, 2])?, three);

    // b leaves and c takes its slot (1): the previous table, naming slot 2, would now send
    // c's clients to a slot the set no longer has (refused). None is refused.
    set(&[0, 2])?;
    let after = round(&[0, 2])?;
    ensure!(after.contains(&name(2)), "{after:?}");
    // Clients of the surviving backends mostly stay where they were, c's too although its
    // slot changed. Maglev promises minimal disruption, not none: a few table entries of
    // surviving backends can change hands (which ones depends on the backends' addresses,
    // here random ports), so a few such clients may move — never most of them.
    let survivors: Vec<(&String, &String, &String)> = clients
        .iter()
        .zip(&three)
        .zip(&after)
        .map(|((c, before), now)| (c, before, now))
        .filter(|(_, before, _)| **before != name(1))
        .collect();
    let moved: Vec<_> = survivors.iter().filter(|(_, b, n)| b != n).collect();
    ensure!(
        moved.len() * 2 < survivors.len(),
        "{} of {} clients of surviving backends moved: {moved:?}",
        moved.len(),
        survivors.len()
    );

    // Under continuous connects, backend changes back and forth (each flipping to the other
    // table of the pair) never refuse a connection nor send one anywhere but a backend.
    let stop = AtomicBool::new(false);
    let requests = std::thread::scope(|scope| -> Result<usize> {
        let load = scope.spawn(|| -> Result<usize> {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let c = &clients[n % clients.len()];
                let b = ask_from(&netns, &cgroup, vip, c)?
                    .map_err(|e| anyhow::anyhow!("client {c} during changes: {e}"))?;
                ensure!(b.starts_with("backend-"), "client {c} reached {b}");
                n += 1;
            }
            Ok(n)
        });
        let changed = [[0, 1], [1, 2], [0, 2], [2, 0], [1, 0], [0, 2]]
            .into_iter()
            .cycle()
            .take(12)
            .try_for_each(|backends| set(&backends));
        stop.store(true, Ordering::Relaxed);
        let requests = load
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        changed?;
        Ok(requests)
    })?;
    ensure!(requests > 0, "no request during the changes");
    eprintln!("{requests} requests during 12 Maglev changes, all answered by a backend");
    round(&[0, 2])?;
    Ok(())
}

/// A TCP server in `netns` that answers every line of every connection with
/// `<name>:<line>`, each connection on its own thread, until dropped.
struct LineEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LineEcho {
    fn start(netns: &Netns, name: &str) -> Result<Self> {
        let ns = netns.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let name = name.to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let listener = ns
                .enter_current_thread()
                .and_then(|()| Ok(TcpListener::bind("127.0.0.1:0")?))
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    Ok(l)
                });
            let listener = match listener.and_then(|l| Ok((l.local_addr()?, l))) {
                Ok((addr, l)) => {
                    let _ = tx.send(Ok(addr));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let name = name.clone();
                        std::thread::spawn(move || serve_lines(conn, &name));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let addr = rx.recv().context("echo thread ended before listening")??;
        Ok(LineEcho {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

fn serve_lines(conn: TcpStream, name: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if writer
            .write_all(format!("{name}:{line}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

impl Drop for LineEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A long-lived connection held by an `lbclient` process in the test's netns and cgroup.
struct Session {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Session {
    fn open(netns: &Netns, cgroup: &Cgroup2, addr: &str) -> Result<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lbclient"));
        cmd.arg(addr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let fds = place(&mut cmd, netns, Some(cgroup))?;
        let mut child = cmd.spawn().context("starting lbclient")?;
        drop(fds);
        let input = child.stdin.take().context("lbclient stdin")?;
        let output = BufReader::new(child.stdout.take().context("lbclient stdout")?);
        let mut session = Session {
            child,
            input,
            output,
        };
        let peer = session.line()?;
        ensure!(peer == format!("peer: {addr}"), "lbclient said {peer:?}");
        Ok(session)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.output.read_line(&mut line)? == 0 {
            bail!("lbclient ended (its connection failed)");
        }
        Ok(line.trim_end().to_owned())
    }

    /// What `getpeername(2)` says now.
    fn peer(&mut self) -> Result<String> {
        self.command("?peer", "peer: ")
    }

    /// Sends `msg` over the connection; the reply, `<backend>:<msg>`.
    fn exchange(&mut self, msg: &str) -> Result<String> {
        self.command(msg, "reply: ")
    }

    /// Writes `line` to lbclient; its answer, which starts with `prefix`, without it.
    fn command(&mut self, line: &str, prefix: &str) -> Result<String> {
        writeln!(self.input, "{line}")?;
        self.input.flush()?;
        let line = self.line()?;
        line.strip_prefix(prefix)
            .map(str::to_owned)
            .with_context(|| format!("lbclient said {line:?}"))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `keelson-agent proxy` with a metrics endpoint; killed on drop.
struct MetricsProxy {
    child: Child,
    metrics: SocketAddr,
}

impl MetricsProxy {
    fn start(cp: &ControlPlane, cgroup: &Path, pins: &Path) -> Result<Self> {
        // A free loopback port for the metrics endpoint.
        let metrics = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(workspace_bin("keelson-agent")?)
            .arg("proxy")
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(pins)
            .args(["--metrics-listen", &metrics.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting keelson-agent proxy")?;
        Ok(MetricsProxy { child, metrics })
    }

    /// The value of the series `name` labelled with Service default/web, port 80/tcp.
    fn counter(&self, name: &str) -> Result<u64> {
        self.service_counter(name, "web")
    }

    /// The value of the series `name` labelled with Service default/`service`, port 80/tcp.
    fn service_counter(&self, name: &str, service: &str) -> Result<u64> {
        let mut conn = TcpStream::connect(self.metrics).context("connecting to /metrics")?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let line = response
            .lines()
            .find(|l| {
                l.starts_with(&format!("{name}{{"))
                    && l.contains("namespace=\"default\"")
                    && l.contains(&format!("service=\"{service}\""))
                    && l.contains("port=\"80\"")
                    && l.contains("protocol=\"tcp\"")
            })
            .with_context(|| format!("no {name} series for default/{service} in:\n{response}"))?;
        let value = line.rsplit(' ').next().unwrap_or_default();
        value
            .parse()
            .with_context(|| format!("bad counter value in {line:?}"))
    }
}

impl Drop for MetricsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const WEB_VIP: &str = "10.96.101.10:80";

fn slice(name: &str, port: u16, conditions: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
         endpoints: [{{addresses: [127.0.0.1], conditions: {conditions}}}]\n"
    )
}

const READY: &str = "{ready: true, serving: true, terminating: false}";
const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";
const NOT_READY: &str = "{ready: false, serving: false, terminating: false}";

#[test]
fn terminating_endpoints_keep_their_connections_and_metrics_count_connects() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("lb-term")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let servers = [
        LineEcho::start(&netns, "backend-a")?,
        LineEcho::start(&netns, "backend-b")?,
    ];
    let port = |name: &str| servers[usize::from(name == "backend-b")].addr.port();
    let cp = ControlPlane::start()?;
    cp.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec: {{clusterIP: 10.96.101.10, selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}\n---\n{}---\n{}",
        slice("web-a", port("backend-a"), READY),
        slice("web-b", port("backend-b"), READY)
    ))?;
    let proxy = MetricsProxy::start(&cp, cgroup.path(), &pins)?;

    // Every answered request is one balanced connect; count them to check the metrics.
    let mut connects = 0u64;
    let ask_counted = |connects: &mut u64| -> Result<Result<String, String>> {
        let answer = ask(&netns, &cgroup, WEB_VIP)?;
        if answer.is_ok() {
            *connects += 1;
        }
        Ok(answer)
    };
    let mut seen = BTreeSet::new();
    eventually("both backends", || {
        if let Ok(name) = ask_counted(&mut connects)? {
            seen.insert(name);
        }
        Ok(seen.len() == 2)
    })?;

    // A long-lived connection; its backend then starts terminating.
    let mut session = Session::open(&netns, &cgroup, WEB_VIP)?;
    connects += 1;
    let reply = session.exchange("1")?;
    let (mine, _) = reply.split_once(':').context("reply")?;
    let mine = mine.to_owned();
    let other = if mine == "backend-a" {
        "backend-b"
    } else {
        "backend-a"
    };
    let slice_of = |name: &str| {
        if name == "backend-a" {
            "web-a"
        } else {
            "web-b"
        }
    };
    cp.apply(&slice(slice_of(&mine), port(&mine), TERMINATING))?;

    // New connections go to the other backend only; the established one keeps working.
    let mut streak = 0;
    eventually("new connections to avoid the terminating backend", || {
        streak = if ask_counted(&mut connects)? == Ok(other.to_owned()) {
            streak + 1
        } else {
            0
        };
        Ok(streak >= 10)
    })?;
    assert_eq!(session.exchange("2")?, format!("{mine}:2"));

    // The other backend goes away too: only the terminating-but-serving one is left, and,
    // as with kube-proxy, new connections fall back to it.
    cp.apply(&slice(slice_of(other), port(other), NOT_READY))?;
    let mut streak = 0;
    eventually("the fallback to the terminating backend", || {
        streak = if ask_counted(&mut connects)? == Ok(mine.clone()) {
            streak + 1
        } else {
            0
        };
        Ok(streak >= 5)
    })?;
    assert_eq!(session.exchange("3")?, format!("{mine}:3"));
    drop(session);

    // The counters on the metrics endpoint match the connections made.
    assert_eq!(proxy.counter("keelson_lb_connections_total")?, connects);
    assert_eq!(proxy.counter("keelson_lb_refused_total")?, 0);
    assert_eq!(proxy.counter("keelson_lb_affinity_hits_total")?, 0);

    // No endpoint serves any more: connects are refused at once, and counted.
    cp.apply(&slice(slice_of(&mine), port(&mine), NOT_READY))?;
    let mut refusals = 0u64;
    eventually("connects to be refused", || {
        let answer = ask_counted(&mut connects)?;
        let refused = answer.is_err_and(|e| e.contains("Connection refused"));
        refusals += u64::from(refused);
        Ok(refused)
    })?;
    assert_eq!(proxy.counter("keelson_lb_refused_total")?, refusals);
    assert_eq!(proxy.counter("keelson_lb_connections_total")?, connects);
    Ok(())
}

/// Pins a new BPF hash map with the given key and value sizes at `path` (what an older agent
/// with another map layout would have left there).
fn pin_hash_map(path: &Path, key_size: u32, value_size: u32) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    // `union bpf_attr`, zero beyond the fields set.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_HASH, key_size, value_size, 16]);
    // SAFETY: BPF_MAP_CREATE reads the attribute buffer, which outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    ensure!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let fd = fd as i32;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = u64::from(fd as u32);
    // SAFETY: BPF_OBJ_PIN reads the buffer and the path, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor this function created; the pin keeps the map.
    unsafe { libc::close(fd) };
    ensure!(rc == 0, "BPF_OBJ_PIN {}: {err}", path.display());
    Ok(())
}

#[test]
fn an_upgrade_replaces_older_programs_and_maps_of_another_layout() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("lb-upgrade")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let a = EchoServer::tcp(&netns, "backend-a")?;
    let cg = cgroup.path().to_str().context("cgroup path")?;
    let vip = "10.96.0.32:80";

    // Maps of these names with another layout are pinned: they are replaced, not misread
    // (the programs would not even load against them). `MAGLEV` as version 3 and older
    // pinned it: a hash map of (set id, index) → slot, now an array of whole tables.
    std::fs::create_dir(&pins)?;
    pin_hash_map(&pins.join("SVC_CONFIG"), 4, 4)?;
    pin_hash_map(&pins.join("MAGLEV"), 8, 4)?;
    let out = lb(&pins, &["attach", "--cgroup", cg])?;
    ensure!(out.contains("attached"), "attach said: {out}");
    lb(&pins, &["set", vip, &a.addr().to_string()])?;
    assert_eq!(backend(&netns, &cgroup, vip)?, "backend-a");
    let maglev_vip = "10.96.0.33:80";
    lb(
        &pins,
        &[
            "set",
            maglev_vip,
            "--algorithm",
            "maglev",
            &a.addr().to_string(),
        ],
    )?;
    assert_eq!(backend(&netns, &cgroup, maglev_vip)?, "backend-a");

    // A connection made before the upgrade: the reverse translation map is pinned, so the
    // new programs still show its service address as the peer.
    let lines = LineEcho::start(&netns, "backend-lines")?;
    let lines_vip = "10.96.0.34:80";
    lb(&pins, &["set", lines_vip, &lines.addr.to_string()])?;
    let mut session = Session::open(&netns, &cgroup, lines_vip)?;

    // Links pinned under the names an older agent used (version 1: the bare program name)
    // are older programs: the next attach puts this version's beside them, then removes
    // them; the services in the shared maps keep answering throughout.
    let programs = ["connect4", "sendmsg4", "recvmsg4", "getpeername4"];
    // This build's version, as its link pins carry it (`connect4_v<N>`).
    let version = std::fs::read_dir(&pins)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| n.strip_prefix("connect4_v").map(str::to_owned))
        .context("no connect4 link pin")?;
    for p in programs {
        std::fs::rename(pins.join(format!("{p}_v{version}")), pins.join(p))
            .with_context(|| format!("renaming the {p} link pin"))?;
    }
    assert_eq!(backend(&netns, &cgroup, vip)?, "backend-a");
    let out = lb(&pins, &["attach", "--cgroup", cg])?;
    ensure!(
        out.contains("attached") && !out.contains("already"),
        "attach said: {out}"
    );
    for p in programs {
        ensure!(!pins.join(p).exists(), "old link {p} still pinned");
        ensure!(
            pins.join(format!("{p}_v{version}")).exists(),
            "{p}_v{version} not pinned"
        );
    }
    assert_eq!(session.peer()?, lines_vip);
    assert_eq!(session.exchange("still")?, "backend-lines:still");
    assert_eq!(backend(&netns, &cgroup, vip)?, "backend-a");
    assert_eq!(backend(&netns, &cgroup, maglev_vip)?, "backend-a");
    Ok(())
}

#[test]
fn service_affinity_and_maglev_annotation_are_programmed_by_the_proxy() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("lb-opts")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let a = EchoServer::tcp(&netns, "backend-a")?;
    let b = EchoServer::tcp(&netns, "backend-b")?;
    let cp = ControlPlane::start()?;
    let endpoint = |name: &str, port: u16| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: sticky}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
             endpoints: [{{addresses: [127.0.0.1], conditions: {{ready: true}}}}]\n"
        )
    };
    cp.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: default, \
         annotations: {{keelson.dev/lb-algorithm: maglev}}}}\n\
         spec: {{clusterIP: 10.96.101.20, selector: {{app: sticky}}, ports: [{{name: http, port: 80}}], \
         sessionAffinity: ClientIP, sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 30}}}}}}\n---\n{}---\n{}",
        endpoint("sticky-a", a.addr().port()),
        endpoint("sticky-b", b.addr().port()),
    ))?;
    let proxy = MetricsProxy::start(&cp, cgroup.path(), &pins)?;
    let vip = "10.96.101.20:80";

    let mut first = None;
    eventually("the Service to be programmed", || {
        first = ask(&netns, &cgroup, vip)?.ok();
        Ok(first.is_some())
    })?;
    let first = first.context("no backend")?;
    for _ in 0..10 {
        assert_eq!(backend(&netns, &cgroup, vip)?, first);
    }
    let dump = lb(&pins, &["dump"])?;
    ensure!(dump.contains("maglev, affinity 30s"), "dump: {dump}");
    assert_eq!(
        proxy.service_counter("keelson_lb_connections_total", "sticky")?,
        11
    );
    assert_eq!(
        proxy.service_counter("keelson_lb_affinity_hits_total", "sticky")?,
        10
    );
    Ok(())
}
