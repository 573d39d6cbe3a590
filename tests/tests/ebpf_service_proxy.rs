//! The agent's eBPF service proxy, end to end with the real `keelson-agent` binary.
//!
//! Inside a network namespace and a cgroup2 directory that the test creates, the programs must
//! turn a connect (or a UDP send) to a service's virtual IP into one to a backend listening in
//! that namespace, and show the application the virtual IP as its peer. The namespace has only
//! `lo`: a connect that is *not* rewritten fails with "Network is unreachable", so nothing can
//! leave it.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use keelson_e2e::{
    Bpffs, Cgroup2, Netns, echo::EchoServer, place, require_root, run_ok, workspace_bin,
};

const VIP: &str = "10.96.0.10:80";

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

/// What a client saw: the reply and the peer address, as the application sees them.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    reply: String,
    peer: String,
}

/// A client in its own process, placed in `netns` (and `cgroup`, if given).
struct Client<'a> {
    netns: &'a Netns,
    cgroup: Option<&'a Cgroup2>,
}

impl Client<'_> {
    /// Sends `msg` over `proto` ("tcp" or "udp") to `addr`: what came back, or the client's
    /// error text.
    fn send(&self, proto: &str, addr: &str, msg: &str) -> Result<Result<Seen, String>> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netprobe"));
        cmd.args([proto, addr, msg]);
        let fds = place(&mut cmd, self.netns, self.cgroup)?;
        let out = cmd.output().context("starting netprobe")?;
        drop(fds);
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .to_owned()
        };
        Ok(Ok(Seen {
            reply: field("reply: "),
            peer: field("peer: "),
        }))
    }

    /// The backend name that answered a TCP request to `addr`.
    fn backend(&self, addr: &str) -> Result<String> {
        let seen = self
            .send("tcp", addr, "who")?
            .map_err(|e| anyhow::anyhow!("request to {addr} failed: {e}"))?;
        Ok(seen.reply.split(':').next().unwrap_or_default().to_owned())
    }
}

#[test]
fn service_connects_reach_ready_backends_only_inside_the_cgroup() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("lb")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let a = EchoServer::tcp(&netns, "backend-a")?;
    let b = EchoServer::tcp(&netns, "backend-b")?;
    let cg = cgroup.path().to_str().context("cgroup path")?;
    let inside = Client {
        netns: &netns,
        cgroup: Some(&cgroup),
    };
    let outside = Client {
        netns: &netns,
        cgroup: None,
    };

    let out = lb(&pins, &["attach", "--cgroup", cg])?;
    ensure!(out.contains("attached"), "attach said: {out}");
    // Attaching again keeps the pinned programs (what an agent restart does).
    let out = lb(&pins, &["attach", "--cgroup", cg])?;
    ensure!(
        out.contains("already attached"),
        "second attach said: {out}"
    );

    // One backend: the bytes arrive there, the answer comes back, and the application sees
    // the service address as its peer.
    lb(&pins, &["set", VIP, &a.addr().to_string()])?;
    let seen = inside.send("tcp", VIP, "hello")?;
    assert_eq!(
        seen,
        Ok(Seen {
            reply: "backend-a:hello".into(),
            peer: VIP.into()
        })
    );

    // The same connect from outside the cgroup is not touched: the VIP is unroutable there.
    let err = outside
        .send("tcp", VIP, "hello")?
        .expect_err("a connect outside the cgroup must not reach a backend");
    assert!(err.contains("unreachable"), "unexpected error: {err}");

    // Two backends: new connections spread over both.
    lb(
        &pins,
        &["set", VIP, &a.addr().to_string(), &b.addr().to_string()],
    )?;
    let seen: BTreeSet<String> = (0..40)
        .map(|_| inside.backend(VIP))
        .collect::<Result<_>>()?;
    assert_eq!(
        seen,
        BTreeSet::from(["backend-a".into(), "backend-b".into()])
    );

    // Only backend b stays ready: every new connection goes to it.
    lb(&pins, &["set", VIP, &b.addr().to_string()])?;
    for _ in 0..10 {
        assert_eq!(inside.backend(VIP)?, "backend-b");
    }

    // A service with no ready backend refuses at once, as kube-proxy does; so does a port
    // that no service exposes on a known virtual IP.
    lb(&pins, &["set", "10.96.0.11:80"])?;
    for addr in ["10.96.0.11:80", "10.96.0.10:81"] {
        let err = inside.send("tcp", addr, "x")?.expect_err("must be refused");
        assert!(err.contains("Connection refused"), "{addr}: {err}");
    }

    let dump = lb(&pins, &["dump"])?;
    // Service lines; indented lines under each carry options and counters.
    assert_eq!(
        dump.lines()
            .filter(|l| l.contains(" -> "))
            .collect::<Vec<_>>(),
        vec![
            format!("10.96.0.10:80/tcp -> {}", b.addr()),
            "10.96.0.11:80/tcp -> (no backends: connects refused)".to_owned(),
        ]
    );

    // Detaching removes the pins and with them the programs: connects are plain again. The
    // kernel frees an unpinned link after an RCU grace period: soon, not at once.
    let out = lb(&pins, &["detach"])?;
    ensure!(out.contains("removed"), "detach said: {out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match inside.send("tcp", VIP, "hello")? {
            Err(err) => break err,
            Ok(answer) => ensure!(
                Instant::now() < deadline,
                "the VIP is still rewritten 10 s after detach (reply {:?})",
                answer.reply
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(err.contains("unreachable"), "unexpected error: {err}");
    Ok(())
}

#[test]
fn udp_datagrams_to_a_service_are_answered_from_the_service_address() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("lb-udp")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let dns = EchoServer::udp(&netns, "dns-a")?;
    let cg = cgroup.path().to_str().context("cgroup path")?;
    let frontend = "10.96.0.53:53";

    lb(&pins, &["attach", "--cgroup", cg])?;
    lb(
        &pins,
        &["set", &format!("{frontend}/udp"), &dns.addr().to_string()],
    )?;
    let inside = Client {
        netns: &netns,
        cgroup: Some(&cgroup),
    };
    // Unconnected (`sendmsg4` balances each datagram) and connected (`connect4` once, then
    // `getpeername4` as well) sockets alike.
    for mode in ["udp", "udp-connected"] {
        for i in 0..5 {
            let seen = inside.send(mode, frontend, &format!("q{i}"))?;
            // `recvmsg4` (and `getpeername4`) show the service, not the backend.
            assert_eq!(
                seen,
                Ok(Seen {
                    reply: format!("dns-a:q{i}"),
                    peer: frontend.into()
                }),
                "{mode}"
            );
        }
    }
    // The TCP port of the same number is not a service.
    let err = inside
        .send("tcp", frontend, "x")?
        .expect_err("no TCP service on that port");
    assert!(err.contains("Connection refused"), "{err}");
    Ok(())
}

#[test]
fn lb_commands_report_clear_errors() -> Result<()> {
    require_root()?;
    let bpffs = Bpffs::mount()?;
    let agent = workspace_bin("keelson-agent")?;

    // Nothing attached yet: `set` explains what is missing.
    let out = Command::new(&agent)
        .args(["lb", "set", VIP, "127.0.0.1:8080", "--bpffs"])
        .arg(bpffs.path().join("keelson"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is the load balancer attached"),
        "stderr: {err}"
    );

    // A pin directory that is not on a bpffs is refused with the fix in the message.
    let not_bpf = tempfile::tempdir()?;
    let cgroup = Cgroup2::new("lb-err")?;
    let out = Command::new(&agent)
        .args(["lb", "attach", "--cgroup"])
        .arg(cgroup.path())
        .arg("--bpffs")
        .arg(not_bpf.path().join("keelson"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not on a bpf filesystem"), "stderr: {err}");

    // Malformed frontends are rejected by the argument parser.
    let out = Command::new(&agent)
        .args(["lb", "set", "10.96.0.10", "--bpffs"])
        .arg(bpffs.path())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("IPV4:PORT"), "stderr: {err}");
    Ok(())
}
