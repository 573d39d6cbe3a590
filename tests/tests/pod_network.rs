//! The pod network across nodes, in a lab of network namespaces (see `keelson_e2e::lab`):
//! pod to pod on one node and across nodes with host-gateway routes (one subnet) and with
//! VXLAN (two subnets joined by a router, where host-gateway cannot work); routes following
//! nodes that join and leave; egress masquerade to an "outside" machine with no route back
//! to pods; hostPort reached from another node and from outside; IPAM across an agent
//! restart; a deleted pod's address and links freed.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use keelson_e2e::lab::{Lab, LabBuilder, PodInfo, Whoami, tcp_exchange};

const IMAGE: &str = "keelson.test/busybox:1";
const T: Duration = Duration::from_secs(30);

/// A busybox httpd answering `hello-from-<name>` on port 8080.
fn web(name: &str, host_port: Option<u16>) -> String {
    let mut c = format!(
        "    command: [sh, -c, 'mkdir -p /www && echo hello-from-{name} > /www/index.html && \
         exec httpd -f -p 8080 -h /www']\n"
    );
    if let Some(hp) = host_port {
        c += &format!("    ports: [{{containerPort: 8080, hostPort: {hp}}}]\n");
    }
    c
}

/// Whether `ip` is in `cidr` (`a.b.c.d/len`).
fn in_cidr(cidr: &str, ip: Ipv4Addr) -> bool {
    let Some((net, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(net) & mask == u32::from(ip) & mask
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Waits until `from` gets `hello-from-<to>` over HTTP from pod `to`.
fn pod_reaches(lab: &Lab, from: &PodInfo, to: &PodInfo) -> Result<()> {
    let body = lab.eventually(
        &format!("{} to reach {} at {}", from.name, to.name, to.ip),
        T,
        || {
            Ok(lab
                .http_from_pod(from, addr(to.ip, 8080), "/index.html")
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|(_, body)| body))
        },
    )?;
    ensure!(body.trim() == format!("hello-from-{}", to.name), "{body:?}");
    Ok(())
}

/// Keelson's routes on a node (`ip route show proto 75`).
fn keelson_routes(lab: &Lab, node: usize) -> Result<String> {
    lab.node(node).run("ip", &["route", "show", "proto", "75"])
}

fn host_veth(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(10)
        .collect();
    format!("kv{hex}")
}

#[test]
fn host_gw_routes_masquerade_host_ports_and_ipam() -> Result<()> {
    let started = std::time::Instant::now();
    let lab = LabBuilder::new(2)
        .with_busybox(IMAGE)
        .with_agent_args(&["--pod-network-mode", "host-gw"])
        .build()?;
    let (n0, n1) = (lab.node(0), lab.node(1));
    let (c0, c1) = (lab.pod_cidr(0)?, lab.pod_cidr(1)?);
    ensure!(c0 != c1, "both nodes got {c0}");

    lab.create_pod(0, "a1", IMAGE, &web("a1", None), "")?;
    lab.create_pod(0, "a2", IMAGE, &web("a2", None), "")?;
    lab.create_pod(1, "b1", IMAGE, &web("b1", Some(18080)), "")?;
    let a1 = lab.wait_pod("a1", T)?;
    let a2 = lab.wait_pod("a2", T)?;
    let b1 = lab.wait_pod("b1", T)?;
    ensure!(
        in_cidr(&c0, a1.ip) && in_cidr(&c0, a2.ip),
        "{a1:?} {a2:?} outside {c0}"
    );
    ensure!(in_cidr(&c1, b1.ip), "{b1:?} outside {c1}");

    // On one node, through the bridge; across nodes, through host-gw routes.
    pod_reaches(&lab, &a1, &a2)?;
    pod_reaches(&lab, &a1, &b1)?;
    pod_reaches(&lab, &b1, &a2)?;
    let routes = keelson_routes(&lab, 0)?;
    ensure!(
        routes.contains(&format!("{c1} via {} dev eth0", n1.ip())),
        "node-0's routes: {routes}"
    );
    ensure!(
        !n0.env().links()?.iter().any(|l| l.contains("vxlan")),
        "host-gw mode made a VXLAN device"
    );

    // Inside the cluster the source address is the pod's: no masquerade between pods.
    let _who = lab.whoami_in_pod(&a1, 9000)?;
    let seen = tcp_exchange_from(&lab, &b1, addr(a1.ip, 9000))?;
    ensure!(seen.trim() == format!("peer={}", b1.ip), "a1 saw {seen:?}");

    // Egress to a machine outside the cluster CIDR (with no route back to pods) works
    // because it is masqueraded to the node's address.
    let outside = lab.add_host(0)?;
    let _server = Whoami::start(outside.netns(), addr(outside.ip(), 9100))?;
    let seen = tcp_exchange_from(&lab, &a1, addr(outside.ip(), 9100))?;
    ensure!(
        seen.trim() == format!("peer={}", n0.ip()),
        "outside saw {seen:?}"
    );

    // hostPort: node-1's address:18080 reaches b1, from node-0 and from the outside host.
    let (code, body) = lab.eventually("b1's hostPort from node-0", T, || {
        Ok(n0.env().http_get(addr(n1.ip(), 18080), "/index.html").ok())
    })?;
    ensure!(
        code == 200 && body.trim() == "hello-from-b1",
        "{code} {body:?}"
    );
    let target = addr(n1.ip(), 18080);
    let reply = in_netns_on(outside.netns(), move || {
        tcp_exchange(target, "GET /index.html HTTP/1.0\r\n\r\n")
    })?;
    ensure!(reply.contains("hello-from-b1"), "from outside: {reply:?}");

    // A hostNetwork pod shares node-1's network: its address, its ports, no veth.
    let veths_before = n1
        .env()
        .links()?
        .iter()
        .filter(|l| l.starts_with("kv"))
        .count();
    let hn_cmd = "    command: [sh, -c, 'mkdir -p /www && echo hello-from-hn > /www/index.html && \
                  exec httpd -f -p 18081 -h /www']\n";
    lab.create_pod(1, "hn", IMAGE, hn_cmd, "  hostNetwork: true\n")?;
    let hn = lab.wait_pod("hn", T)?;
    ensure!(
        hn.ip == n1.ip(),
        "hostNetwork pod's IP {} is not node-1's",
        hn.ip
    );
    let (code, body) = lab.eventually("the hostNetwork pod from node-0", T, || {
        Ok(n0.env().http_get(addr(n1.ip(), 18081), "/index.html").ok())
    })?;
    ensure!(
        code == 200 && body.trim() == "hello-from-hn",
        "{code} {body:?}"
    );
    let veths_after = n1
        .env()
        .links()?
        .iter()
        .filter(|l| l.starts_with("kv"))
        .count();
    ensure!(veths_after == veths_before, "a hostNetwork pod got a veth");

    // IPAM across an agent restart: the pods keep their addresses, a new pod gets a new one.
    n0.kill_agent();
    n0.start_agent(lab.cp())?;
    lab.create_pod(0, "a3", IMAGE, &web("a3", None), "")?;
    let a3 = lab.wait_pod("a3", T)?;
    ensure!(
        a3.ip != a1.ip && a3.ip != a2.ip && in_cidr(&c0, a3.ip),
        "a3 got {} (a1 {}, a2 {})",
        a3.ip,
        a1.ip,
        a2.ip
    );
    pod_reaches(&lab, &b1, &a1)?;
    pod_reaches(&lab, &b1, &a3)?;

    // Deleting a pod frees its address and its veth; b1's hostPort goes with b1.
    let veth = host_veth(&a2.uid);
    ensure!(n0.env().links()?.contains(&veth), "no {veth} for a2");
    lab.cp().kubectl(&["delete", "pod", "a2", "--wait=false"])?;
    lab.eventually("a2 gone", T, || {
        Ok(lab.get_json(&["pod", "a2"])?.is_none().then_some(()))
    })?;
    lab.eventually("a2's veth removed", T, || {
        Ok((!n0.env().links()?.contains(&veth)).then_some(()))
    })?;
    let ipam = std::fs::read_to_string(n0.env().state_dir().join("ipam/allocations.json"))?;
    ensure!(
        !ipam.contains(&format!("\"{}\"", a2.ip)) && ipam.contains(&format!("\"{}\"", a1.ip)),
        "IPAM records after deleting a2: {ipam}"
    );
    lab.cp().kubectl(&["delete", "pod", "b1", "--wait=false"])?;
    lab.eventually("b1's hostPort rule removed", T, || {
        let table = n1.run("nft", &["list", "table", "ip", "keelson"])?;
        Ok((!table.contains("18080")).then_some(()))
    })?;

    // A node that leaves takes its route with it.
    n1.kill_agent();
    lab.cp().kubectl(&["delete", "node", n1.name()])?;
    lab.eventually("node-0 to drop the route to node-1's pods", T, || {
        Ok((!keelson_routes(&lab, 0)?.contains(&c1)).then_some(()))
    })?;
    eprintln!("host-gw lab test took {:?}", started.elapsed());
    Ok(())
}

#[test]
fn vxlan_joins_nodes_on_two_subnets() -> Result<()> {
    let started = std::time::Instant::now();
    // auto: the peer is behind the router, so VXLAN it is.
    let lab = LabBuilder::new(2)
        .with_two_subnets()
        .with_busybox(IMAGE)
        .build()?;
    let (n0, n1) = (lab.node(0), lab.node(1));
    ensure!(n0.subnet() != n1.subnet());
    let (c0, c1) = (lab.pod_cidr(0)?, lab.pod_cidr(1)?);
    lab.create_pod(0, "a", IMAGE, &web("a", None), "")?;
    lab.create_pod(1, "b", IMAGE, &web("b", None), "")?;
    let a = lab.wait_pod("a", T)?;
    let b = lab.wait_pod("b", T)?;
    pod_reaches(&lab, &a, &b).map_err(|e| e.context(lab.network_state()))?;
    pod_reaches(&lab, &b, &a)?;
    let _who = lab.whoami_in_pod(&b, 9000)?;
    let seen = tcp_exchange_from(&lab, &a, addr(b.ip, 9000))?;
    ensure!(seen.trim() == format!("peer={}", a.ip), "b saw {seen:?}");

    let vtep1 = c1.split('/').next().context("cidr")?;
    let routes = keelson_routes(&lab, 0)?;
    ensure!(
        routes.contains(&format!("{c1} via {vtep1} dev keelson.vxlan"))
            && routes.contains("onlink"),
        "node-0's routes: {routes}"
    );
    let link = n1.run("ip", &["-d", "link", "show", "keelson.vxlan"])?;
    ensure!(
        link.contains("vxlan id 1") && link.contains("dstport 8472"),
        "{link}"
    );
    let fdb = n1.run("bridge", &["fdb", "show", "dev", "keelson.vxlan"])?;
    ensure!(
        fdb.contains(&format!("dst {}", n0.ip())),
        "node-1's FDB: {fdb}"
    );
    ensure!(!c0.is_empty());

    // `--cleanup-network` removes the routes, the VXLAN device and the nftables table.
    n0.kill_agent();
    let agent = keelson_e2e::workspace_bin("keelson-agent")?;
    n0.run(&agent.to_string_lossy(), &["node", "--cleanup-network"])?;
    ensure!(keelson_routes(&lab, 0)?.trim().is_empty(), "routes left");
    ensure!(
        !n0.env().links()?.iter().any(|l| l == "keelson.vxlan"),
        "VXLAN device left"
    );
    ensure!(
        n0.run("nft", &["list", "table", "ip", "keelson"]).is_err(),
        "nftables table left"
    );
    eprintln!("vxlan lab test took {:?}", started.elapsed());
    Ok(())
}

/// A TCP exchange (empty message) from `pod`'s namespace, retried while routes settle.
fn tcp_exchange_from(lab: &Lab, pod: &PodInfo, to: SocketAddr) -> Result<String> {
    lab.eventually(&format!("{} to reach {to}", pod.name), T, || {
        Ok(lab.tcp_from_pod(pod, to, "").ok().filter(|r| !r.is_empty()))
    })
}

fn in_netns_on<T: Send + 'static>(
    netns: &keelson_e2e::Netns,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = netns.try_clone()?;
    std::thread::spawn(move || {
        ns.enter_current_thread()?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}
