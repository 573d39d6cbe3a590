//! The agent's eBPF service proxy, end to end with the real `keelson-agent` binary.
//!
//! Inside a network namespace and a cgroup2 directory that the test creates, `cgroup/connect4`
//! must turn a connect to a service's virtual IP into a connect to a backend listening in that
//! namespace. The namespace has only `lo`: a connect that is *not* rewritten fails with
//! "Network is unreachable", so nothing can leave it.

use std::{collections::BTreeSet, path::Path, process::Command};

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

/// Connects from a fresh process placed in `netns` (and `cgroup`, if given) to `addr`.
/// Returns the server's reply, or the client's error text.
fn probe(
    netns: &Netns,
    cgroup: Option<&Cgroup2>,
    addr: &str,
    msg: &str,
) -> Result<Result<String, String>> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netprobe"));
    cmd.args(["tcp", addr, msg]);
    let fds = place(&mut cmd, netns, cgroup)?;
    let out = cmd.output().context("starting netprobe")?;
    drop(fds);
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(if out.status.success() {
        Ok(stdout
            .strip_prefix("reply: ")
            .unwrap_or(&stdout)
            .trim_end()
            .to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    })
}

#[test]
fn connect4_sends_service_connects_to_ready_backends_only_inside_its_cgroup() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("lb")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let a = EchoServer::start(&netns, "backend-a")?;
    let b = EchoServer::start(&netns, "backend-b")?;
    let cg = cgroup.path().to_str().context("cgroup path")?;

    let out = lb(&pins, &["attach", "--cgroup", cg])?;
    ensure!(out.contains("attached"), "attach said: {out}");
    // Attaching again keeps the pinned program (what an agent restart does).
    let out = lb(&pins, &["attach", "--cgroup", cg])?;
    ensure!(
        out.contains("already attached"),
        "second attach said: {out}"
    );

    // One backend: the bytes arrive at it and its answer comes back.
    lb(&pins, &["set", VIP, &a.addr().to_string()])?;
    let reply = probe(&netns, Some(&cgroup), VIP, "hello")?;
    assert_eq!(reply, Ok("backend-a:hello".to_owned()));

    // The same connect from outside the cgroup is not touched: the VIP is unroutable there.
    let outside = probe(&netns, None, VIP, "hello")?;
    let err = outside.expect_err("a connect outside the cgroup must not reach a backend");
    assert!(err.contains("unreachable"), "unexpected error: {err}");

    // Two backends: new connections spread over both.
    lb(
        &pins,
        &["set", VIP, &a.addr().to_string(), &b.addr().to_string()],
    )?;
    let mut seen = BTreeSet::new();
    for i in 0..40 {
        let reply = probe(&netns, Some(&cgroup), VIP, &i.to_string())?
            .map_err(|e| anyhow::anyhow!("connect {i} failed: {e}"))?;
        seen.insert(reply.split(':').next().unwrap_or_default().to_owned());
    }
    assert_eq!(
        seen,
        BTreeSet::from(["backend-a".to_owned(), "backend-b".to_owned()])
    );

    // Only backend b stays ready: every new connection goes to it.
    lb(&pins, &["set", VIP, &b.addr().to_string()])?;
    for i in 0..10 {
        let reply = probe(&netns, Some(&cgroup), VIP, "x")?;
        assert_eq!(reply, Ok("backend-b:x".to_owned()), "connect {i}");
    }

    // A service with no ready backend refuses at once instead of hanging.
    lb(&pins, &["set", "10.96.0.11:80"])?;
    let refused = probe(&netns, Some(&cgroup), "10.96.0.11:80", "x")?;
    assert!(
        refused.is_err(),
        "a service without backends must refuse: {refused:?}"
    );

    let dump = lb(&pins, &["dump"])?;
    assert_eq!(
        dump.lines().collect::<Vec<_>>(),
        vec![
            format!("10.96.0.10:80/tcp -> {}", b.addr()),
            "10.96.0.11:80/tcp -> (no backends: connects refused)".to_owned(),
        ]
    );

    // Detaching removes the pins and with them the program: connects are plain again.
    let out = lb(&pins, &["detach"])?;
    ensure!(out.contains("removed"), "detach said: {out}");
    let after = probe(&netns, Some(&cgroup), VIP, "hello")?;
    let err = after.expect_err("after detach the VIP must not be rewritten");
    assert!(err.contains("unreachable"), "unexpected error: {err}");
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
