//! Cluster DNS end to end: `keelson-agent node` in a network namespace of the test serves DNS
//! on its pod bridge; busybox pods resolve a Service by its full name and by its short name
//! through their search path, a headless Service's answer follows its pods as a Deployment
//! scales, a deleted Service stops resolving, and each pod's resolv.conf follows its
//! dnsPolicy. With the eBPF service proxy on the node's cgroup, a pod reaches a Service by
//! its name. All queries stay inside the node's namespace.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use keelson_e2e::{
    Bpffs,
    cluster::ControlPlane,
    node::{NodeEnv, wait_for},
    oci_image::busybox_layout,
    proxy::Proxy,
    require_root,
};
use serde_json::Value;

const IMAGE: &str = "keelson.test/busybox:1";
const NS: &str = "shop";

fn manifest(node: &str) -> String {
    let pod = |name: &str, extra: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}}}\n\
             spec:\n  nodeName: {node}\n{extra}  containers:\n  - name: c\n    image: {IMAGE}\n    \
             command: [sleep, '3600']\n"
        )
    };
    let mut m = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {NS}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        image: {IMAGE}
        command: [sh, -c, 'mkdir -p /www && echo hi > /www/index.html && exec httpd -f -p 8080 -h /www']
        ports: [{{containerPort: 8080, name: http}}]
        readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-pods, namespace: {NS}}}
spec:
  clusterIP: None
  selector: {{app: web}}
  ports: [{{name: http, port: 8080, targetPort: http}}]
"#
    );
    m += &pod("client", "");
    m += &pod("node-dns", "  dnsPolicy: Default\n");
    m += &pod(
        "custom-dns",
        "  dnsPolicy: None\n  dnsConfig:\n    nameservers: [192.0.2.53]\n    \
         searches: [corp.example]\n    options: [{name: ndots, value: '2'}]\n",
    );
    m
}

fn get_json(cp: &ControlPlane, args: &[&str]) -> Result<Value> {
    let mut all = vec!["get", "-n", NS];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    Ok(serde_json::from_str(&cp.kubectl(&all)?)?)
}

/// Runs `sh -c script` in the pod; its output (nslookup exits 1 when any query of the
/// search list failed, so the exit status is ignored).
fn exec(cp: &ControlPlane, pod: &str, script: &str) -> Result<String> {
    cp.kubectl(&[
        "exec",
        "-n",
        NS,
        pod,
        "--",
        "sh",
        "-c",
        &format!("{script}; true"),
    ])
}

/// The addresses busybox's nslookup printed as answers (the server's own line carries a
/// port and a tab).
fn answers(out: &str) -> BTreeSet<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("Address: "))
        .map(|a| a.trim().to_owned())
        .collect()
}

/// The IPs of the ready `app=web` pods.
fn ready_web_ips(cp: &ControlPlane) -> Result<BTreeSet<String>> {
    let pods = get_json(cp, &["pods", "-l", "app=web"])?;
    Ok(pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p.pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
        .filter_map(|p| p.pointer("/status/podIP")?.as_str().map(str::to_owned))
        .collect())
}

#[test]
fn pods_resolve_services_through_the_cluster_dns() -> Result<()> {
    require_root()?;
    let started = Instant::now();
    let cp = ControlPlane::start()?;
    let env = NodeEnv::new("kt-dns-node")?;
    let layout_dir = tempfile::tempdir()?;
    busybox_layout(layout_dir.path(), IMAGE)?;
    env.import_image(layout_dir.path(), IMAGE)?;
    let agent = env.start_agent(&cp)?;
    // The service proxy on the node's cgroup, so pods' connects to cluster IPs are balanced.
    let bpffs = Bpffs::mount()?;
    let proxy = Proxy::start(&cp, env.cgroup2_dir(), &bpffs.path().join("keelson"))?;
    let result = run(&cp, &env);
    drop(proxy);
    if result.is_err() {
        let log = std::fs::read_to_string(cp.dir().join("agent.log")).unwrap_or_default();
        eprintln!("--- agent log ---\n{log}");
    }
    drop(agent);
    eprintln!("cluster DNS test took {:?}", started.elapsed());
    result
}

fn run(cp: &ControlPlane, env: &NodeEnv) -> Result<()> {
    let t = Duration::from_secs(60);
    cp.apply(&manifest(env.name()))?;
    let client = wait_for("the client pod Running", t, || {
        let p = get_json(cp, &["pod", "client"])?;
        Ok((p.pointer("/status/phase") == Some(&Value::from("Running"))
            && p.pointer("/status/podIP").is_some())
        .then_some(p))
    })?;
    let client_ip = client["status"]["podIP"]
        .as_str()
        .context("podIP")?
        .to_owned();
    // The node's DNS server listens on the bridge: the first address of the pod CIDR.
    let (net, _) = client_ip.rsplit_once('.').context("IPv4 pod address")?;
    let gateway = format!("{net}.1");

    // ClusterFirst: the cluster DNS, the namespace's search path, ndots:5; the pod's own
    // name in its hosts file.
    let resolv = exec(cp, "client", "cat /etc/resolv.conf")?;
    ensure!(
        resolv.starts_with(&format!("nameserver {gateway}\n"))
            && resolv.contains(&format!(
                "\nsearch {NS}.svc.cluster.local svc.cluster.local cluster.local"
            ))
            && resolv.ends_with("options ndots:5\n"),
        "ClusterFirst resolv.conf:\n{resolv}"
    );
    let hosts = exec(cp, "client", "cat /etc/hosts")?;
    ensure!(
        hosts.contains("127.0.0.1\tlocalhost\n")
            && hosts.contains(&format!("{client_ip}\tclient\n")),
        "hosts:\n{hosts}"
    );
    // Default: the node's resolver configuration; None: only the pod's dnsConfig.
    let node_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let from_node = exec(cp, "node-dns", "cat /etc/resolv.conf")?;
    for line in node_resolv
        .lines()
        .filter(|l| l.starts_with("nameserver "))
        .take(3)
    {
        ensure!(
            from_node.contains(line),
            "Default resolv.conf lacks {line:?}:\n{from_node}"
        );
    }
    ensure!(
        !from_node.contains("cluster.local"),
        "Default resolv.conf:\n{from_node}"
    );
    let custom = exec(cp, "custom-dns", "cat /etc/resolv.conf")?;
    ensure!(
        custom == "nameserver 192.0.2.53\nsearch corp.example\noptions ndots:2\n",
        "None + dnsConfig resolv.conf:\n{custom}"
    );

    // A ClusterIP Service by its full name and by its short name through the search path.
    let cluster_ip = get_json(cp, &["service", "web"])?["spec"]["clusterIP"]
        .as_str()
        .context("clusterIP")?
        .to_owned();
    let full = format!("web.{NS}.svc.cluster.local");
    wait_for("the Service's name to resolve", t, || {
        let out = exec(cp, "client", &format!("nslookup {full}"))?;
        Ok(answers(&out).contains(&cluster_ip).then_some(()))
    })?;
    let short = exec(cp, "client", "nslookup web")?;
    ensure!(
        short.contains(&format!("Name:\t{full}")) && answers(&short) == [cluster_ip.clone()].into(),
        "short name through the search path:\n{short}"
    );
    let srv = exec(
        cp,
        "client",
        &format!("nslookup -type=SRV _http._tcp.{full}"),
    )?;
    ensure!(
        srv.contains(&format!("80 {full}")),
        "SRV of the named port:\n{srv}"
    );
    // …and reaches it by that name: the eBPF proxy sends the cluster IP's port 80 to a ready
    // web pod's port 8080.
    // (busybox-static's wget crashes in these pods; its nc does HTTP/1.0 well enough.)
    wait_for("the Service to answer by its short name", t, || {
        let out = exec(
            cp,
            "client",
            r"printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 web 80",
        )?;
        Ok((out.contains("HTTP/1.") && out.trim_end().ends_with("\nhi")).then_some(()))
    })?;
    let missing = exec(
        cp,
        "client",
        &format!("nslookup nope.{NS}.svc.cluster.local"),
    )?;
    ensure!(
        missing.contains("NXDOMAIN"),
        "a missing Service:\n{missing}"
    );

    // A headless Service answers with its ready pods, and follows them.
    let headless = format!("web-pods.{NS}.svc.cluster.local");
    let expect_pods = |replicas: usize| -> Result<()> {
        wait_for(
            &format!("{headless} to list {replicas} ready pods"),
            t,
            || {
                let ready = ready_web_ips(cp)?;
                if ready.len() != replicas {
                    return Ok(None);
                }
                let out = exec(cp, "client", &format!("nslookup {headless}"))?;
                Ok((answers(&out) == ready).then_some(()))
            },
        )
    };
    expect_pods(2)?;
    cp.kubectl(&["scale", "-n", NS, "deployment/web", "--replicas=3"])?;
    expect_pods(3)?;
    cp.kubectl(&["scale", "-n", NS, "deployment/web", "--replicas=1"])?;
    expect_pods(1)?;
    // Each endpoint also has a name of its own under the Service.
    let ip = ready_web_ips(cp)?.into_iter().next().context("a web pod")?;
    let by_name = exec(
        cp,
        "client",
        &format!("nslookup {}.{headless}", ip.replace('.', "-")),
    )?;
    ensure!(
        answers(&by_name) == [ip.clone()].into(),
        "endpoint by name:\n{by_name}"
    );

    // A deleted Service stops resolving.
    cp.kubectl(&["delete", "-n", NS, "service", "web"])?;
    wait_for("the deleted Service to be NXDOMAIN", t, || {
        let out = exec(cp, "client", &format!("nslookup {full}"))?;
        Ok(out.contains("NXDOMAIN").then_some(()))
    })?;
    Ok(())
}
