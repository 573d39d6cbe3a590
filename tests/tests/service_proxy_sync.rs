//! The agent's service proxy against a real control plane: Services and EndpointSlices made
//! with kubectl become eBPF load-balancer entries; readiness changes take effect; a killed
//! agent leaves traffic flowing and, restarted, removes what was deleted meanwhile.

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use keelson_e2e::{
    Bpffs, Cgroup2, Netns, cluster::ControlPlane, echo::EchoServer, place, proxy::Proxy,
    require_root,
};

const VIP: &str = "10.96.100.10:80";

/// Which backend answered a TCP request to `addr` from inside the cgroup, or the error.
fn ask(netns: &Netns, cgroup: &Cgroup2, addr: &str) -> Result<Result<String, String>> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netprobe"));
    cmd.args(["tcp", addr, "q"]);
    let fds = place(&mut cmd, netns, Some(cgroup))?;
    let out = cmd.output()?;
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

/// Polls until `check` holds for what the VIP answers, or fails after 20 s.
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

fn slice(name: &str, port: u16, ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
         endpoints: [{{addresses: [127.0.0.1], conditions: {{ready: {ready}}}}}]\n"
    )
}

#[test]
fn services_and_endpoint_slices_drive_the_load_balancer() -> Result<()> {
    require_root()?;
    let netns = Netns::new()?;
    let cgroup = Cgroup2::new("proxy")?;
    let bpffs = Bpffs::mount()?;
    let pins = bpffs.path().join("keelson");
    let a = EchoServer::tcp(&netns, "backend-a")?;
    let b = EchoServer::tcp(&netns, "backend-b")?;
    let cp = ControlPlane::start()?;

    cp.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec: {{clusterIP: 10.96.100.10, selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}\n---\n{}---\n{}",
        slice("web-a", a.addr().port(), true),
        slice("web-b", b.addr().port(), true)
    ))?;
    let proxy = Proxy::start(&cp, cgroup.path(), &pins)?;

    // Both ready endpoints receive connections.
    let mut seen = BTreeSet::new();
    eventually("both backends", || {
        if let Ok(name) = ask(&netns, &cgroup, VIP)? {
            seen.insert(name);
        }
        Ok(seen.len() == 2)
    })?;

    // An endpoint that turns unready stops receiving new connections.
    cp.apply(&slice("web-b", b.addr().port(), false))?;
    let mut streak = 0;
    eventually("only backend-a", || {
        streak = if ask(&netns, &cgroup, VIP)? == Ok("backend-a".into()) {
            streak + 1
        } else {
            0
        };
        Ok(streak >= 10)
    })?;

    // The agent dies: the pinned programs and maps keep serving.
    proxy.kill9();
    for _ in 0..5 {
        assert_eq!(ask(&netns, &cgroup, VIP)?, Ok("backend-a".into()));
    }

    // The Service goes away while no agent runs; a new agent removes it after its first sync.
    cp.kubectl(&["delete", "service", "web"])?;
    assert_eq!(
        ask(&netns, &cgroup, VIP)?,
        Ok("backend-a".into()),
        "still served until an agent syncs"
    );
    let _proxy = Proxy::start(&cp, cgroup.path(), &pins)?;
    eventually("the deleted Service to be gone", || {
        Ok(ask(&netns, &cgroup, VIP)?.is_err_and(|e| e.contains("unreachable")))
    })?;
    Ok(())
}
