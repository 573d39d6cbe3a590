//! The node agent against a real control plane: `keelson-agent node` in a network namespace
//! and cgroup subtree of the test registers its Node and Lease, runs busybox pods from an
//! imported OCI image with their own network, hostname and PID namespace, restarts a failing
//! container with back-off, reports a bad image and an OOM kill, serves logs and exec (also
//! through `kubectl logs` / `kubectl exec` and the API server), follows a
//! readiness probe, mounts configMap/secret/emptyDir/hostPath volumes, runs init containers,
//! reports Events, rotates logs,
//! survives `kill -9`
//! without touching its containers, and stops a deleted pod
//! gracefully.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use keelson_e2e::{
    cluster::ControlPlane,
    node::{NodeEnv, wait_for},
    oci_image::busybox_layout,
    require_root, workspace_bin,
};
use serde_json::Value;

const IMAGE: &str = "keelson.test/busybox:1";

fn get_json(cp: &ControlPlane, args: &[&str]) -> Result<Option<Value>> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    match cp.kubectl(&all) {
        Ok(text) => Ok(Some(serde_json::from_str(&text)?)),
        Err(e) if e.to_string().contains("NotFound") || e.to_string().contains("not found") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn pod(cp: &ControlPlane, name: &str) -> Result<Value> {
    get_json(cp, &["pod", name])?.with_context(|| format!("pod {name} is gone"))
}

fn condition(o: &Value, kind: &str) -> Option<String> {
    o.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

fn container_status(p: &Value) -> Value {
    p.pointer("/status/containerStatuses/0")
        .cloned()
        .unwrap_or(Value::Null)
}

fn pods_manifest(node: &str) -> String {
    let pod = |name: &str, extra: &str, container: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  nodeName: {node}\n{extra}  containers:\n  - name: {name}\n    image: {IMAGE}\n{container}---\n"
        )
    };
    let mut m = String::new();
    // A web server that prints what it sees; ready while /www/ready.html exists (the test
    // makes and removes it through exec, not on a timer that a busy machine can outrun).
    m += &pod(
        "web",
        "",
        "    command: [sh, -c]\n    args:\n    - |\n      echo pid=$$ hostname=$(hostname)\n      \
         echo hello-from-web > /www/index.html\n      \
         exec httpd -f -p 8080 -h /www\n    ports: [{containerPort: 8080, name: http}]\n    \
         readinessProbe:\n      httpGet: {path: /ready.html, port: http}\n      \
         periodSeconds: 1\n      failureThreshold: 1\n",
    );
    // Fails at once, again and again.
    m += &pod(
        "crash",
        "  restartPolicy: Always\n",
        "    command: [sh, -c, 'echo boom; exit 3']\n",
    );
    // An image that is not there.
    m += &pod("bad", "", "    command: [sleep, '60']\n")
        .replace(&format!("image: {IMAGE}"), "image: keelson.test/nope:1");
    // Goes over its memory limit once.
    m += &pod(
        "hog",
        "  restartPolicy: Never\n",
        "    command: [dd, if=/dev/zero, of=/dev/null, bs=64M, count=1]\n    \
         resources: {limits: {memory: 16Mi}}\n",
    );
    // Writes more than the agent's 4 KiB log limit (set by the test harness).
    m += &pod(
        "chatty",
        "",
        "    command: [sh, -c, 'i=1; while [ $i -le 300 ]; do echo \"line $i of the chatty container\"; i=$((i+1)); done; sleep 3600']\n",
    );
    // Stops cleanly on SIGTERM.
    m += &pod(
        "sleeper",
        "  terminationGracePeriodSeconds: 20\n",
        "    command: [sh, -c, 'trap \"echo got-term; exit 0\" TERM; echo sleeping; while true; do sleep 0.2; done']\n",
    );
    m
}

/// A ConfigMap, a Secret and a pod mounting them with an emptyDir and a hostPath.
fn volumes_manifest(node: &str, host_dir: &std::path::Path) -> String {
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: app-config, namespace: default}}
data: {{greeting: hello}}
---
apiVersion: v1
kind: Secret
metadata: {{name: app-secret, namespace: default}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: vols, namespace: default}}
spec:
  nodeName: {node}
  volumes:
  - {{name: cfg, configMap: {{name: app-config}}}}
  - {{name: picked, configMap: {{name: app-config, items: [{{key: greeting, path: sub/renamed}}]}}}}
  - {{name: sec, secret: {{secretName: app-secret}}}}
  - {{name: scratch, emptyDir: {{}}}}
  - {{name: host, hostPath: {{path: {host}, type: DirectoryOrCreate}}}}
  containers:
  - name: writer
    image: {IMAGE}
    command: [sh, -c, 'echo from-writer > /scratch/shared; echo written-in-pod > /host/note; sleep 3600']
    volumeMounts:
    - {{name: scratch, mountPath: /scratch}}
    - {{name: host, mountPath: /host}}
  - name: reader
    image: {IMAGE}
    command: [sh, -c]
    args:
    - |
      echo greeting=$(cat /etc/cfg/greeting) renamed=$(cat /etc/picked/sub/renamed) password=$(cat /etc/sec/password)
      touch /etc/cfg/new 2>/dev/null || echo config-is-read-only
      while ! test -f /scratch/shared; do sleep 0.2; done
      echo shared=$(cat /scratch/shared)
      sleep 3600
    volumeMounts:
    - {{name: cfg, mountPath: /etc/cfg}}
    - {{name: picked, mountPath: /etc/picked}}
    - {{name: sec, mountPath: /etc/sec}}
    - {{name: scratch, mountPath: /scratch}}
---
apiVersion: v1
kind: Pod
metadata: {{name: init, namespace: default}}
spec:
  nodeName: {node}
  volumes: [{{name: work, emptyDir: {{}}}}]
  initContainers:
  - {{name: prepare, image: {IMAGE}, command: [sh, -c, 'echo prepared > /work/data'], volumeMounts: [{{name: work, mountPath: /work}}]}}
  - {{name: check, image: {IMAGE}, command: [sh, -c, 'test -f /work/data'], volumeMounts: [{{name: work, mountPath: /work}}]}}
  containers:
  - {{name: app, image: {IMAGE}, command: [sh, -c, 'cat /work/data; sleep 3600'], volumeMounts: [{{name: work, mountPath: /work}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: init-fails, namespace: default}}
spec:
  nodeName: {node}
  restartPolicy: Never
  initContainers:
  - {{name: broken, image: {IMAGE}, command: [sh, -c, 'exit 7']}}
  containers:
  - {{name: app, image: {IMAGE}, command: [sleep, '3600']}}
"#,
        host = host_dir.display()
    )
}

/// The host PID of a container from the runtime's state.
fn container_pid(env: &NodeEnv, p: &Value) -> Result<i64> {
    let id = container_status(p)["containerID"]
        .as_str()
        .and_then(|s| s.strip_prefix("keelson://"))
        .context("no containerID")?
        .to_owned();
    let out = keelson_e2e::run_ok(
        std::process::Command::new(workspace_bin("keelson-runtime")?)
            .arg("--root")
            .arg(env.state_dir().join("run/runtime"))
            .args(["state", &id]),
    )?;
    let state: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        state["status"] == "running",
        "container {id} is not running: {state}"
    );
    state["pid"].as_i64().context("no pid")
}

#[test]
fn the_node_agent_runs_pods() -> Result<()> {
    require_root()?;
    let started = Instant::now();
    let cp = ControlPlane::start()?;
    let env = NodeEnv::new("kt-node-1")?;
    let layout_dir = tempfile::tempdir()?;
    busybox_layout(layout_dir.path(), IMAGE)?;
    let imported = env.import_image(layout_dir.path(), IMAGE)?;
    ensure!(imported.contains("sha256:"), "import printed {imported}");
    let agent = env.start_agent(&cp)?;
    let result = run(&cp, &env, agent);
    if result.is_err() {
        let log = std::fs::read_to_string(cp.dir().join("agent.log")).unwrap_or_default();
        eprintln!("--- agent log ---\n{log}");
    }
    eprintln!("agent pod test took {:?}", started.elapsed());
    result
}

fn run(cp: &ControlPlane, env: &NodeEnv, agent: keelson_e2e::node::Agent) -> Result<()> {
    let t = Duration::from_secs(20);
    // The Node registers with its facts and turns Ready; its Lease is renewed.
    let node = wait_for("the Node to be Ready", t, || {
        Ok(get_json(cp, &["node", env.name()])?
            .filter(|n| condition(n, "Ready").as_deref() == Some("True")))
    })?;
    ensure!(
        node.pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
            == Some(&Value::from(env.agent_port())),
        "kubelet endpoint: {node}"
    );
    ensure!(node.pointer("/status/capacity/pods") == Some(&Value::from("110")));
    ensure!(
        node.pointer("/status/capacity/cpu")
            .is_some_and(|c| c != "0")
    );
    ensure!(
        node.pointer("/status/nodeInfo/kernelVersion")
            .is_some_and(|k| k != "")
    );
    for kind in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        ensure!(condition(&node, kind).is_some(), "no {kind} condition");
    }
    let lease = wait_for("the node Lease", t, || {
        get_json(cp, &["lease", "-n", "kube-node-lease", env.name()])
    })?;
    ensure!(lease.pointer("/spec/holderIdentity") == Some(&Value::from(env.name())));

    cp.apply(&pods_manifest(env.name()))?;
    let host_dir = env.state_dir().join("host-volume");
    cp.apply(&volumes_manifest(env.name(), &host_dir))?;

    // The web pod runs with an address of the pod CIDR and answers from inside the node.
    let web = wait_for("web Running with an IP", t, || {
        let p = pod(cp, "web")?;
        Ok((p.pointer("/status/phase") == Some(&Value::from("Running"))
            && p.pointer("/status/podIP").is_some())
        .then_some(p))
    })?;
    let ip = web["status"]["podIP"].as_str().context("podIP")?.to_owned();
    // From the agent's --pod-cidr, or from the podCIDR the control plane's IPAM gave the Node
    // (whichever the agent had when it set up its bridge).
    let assigned = get_json(cp, &["node", env.name()])?
        .and_then(|n| {
            n.pointer("/spec/podCIDR")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let in_cidr = |cidr: &str| {
        cidr.strip_suffix(".0/24")
            .is_some_and(|net| ip.starts_with(&format!("{net}.")))
    };
    ensure!(
        in_cidr(keelson_e2e::node::POD_CIDR) || in_cidr(&assigned),
        "podIP {ip} outside {} and {assigned}",
        keelson_e2e::node::POD_CIDR
    );
    let addr: SocketAddr = format!("{ip}:8080").parse()?;
    let (code, body) = wait_for("web to answer", t, || {
        Ok(env.http_get(addr, "/index.html").ok())
    })?;
    ensure!(
        code == 200 && body.contains("hello-from-web"),
        "{code} {body}"
    );

    // Volumes: configMap and secret files (read-only), an emptyDir shared by two
    // containers, and a hostPath created on the node.
    let vols = wait_for("vols Running", t, || {
        let p = pod(cp, "vols")?;
        Ok((p.pointer("/status/phase") == Some(&Value::from("Running"))).then_some(p))
    })?;
    ensure!(
        vols["status"]["containerStatuses"].as_array().map(Vec::len) == Some(2),
        "{vols}"
    );
    // Running means one container runs: the reader may still be starting (no logs yet).
    let seen = wait_for("the reader to see the writer's emptyDir file", t, || {
        let log = cp.kubectl(&["logs", "vols", "-c", "reader"]).ok();
        Ok(log.filter(|log| log.contains("shared=from-writer")))
    })?;
    for line in [
        "greeting=hello",
        "renamed=hello",
        "password=s3cret",
        "config-is-read-only",
    ] {
        ensure!(
            seen.contains(line),
            "{line} missing from reader's log:\n{seen}"
        );
    }
    let on_host = std::fs::read_to_string(host_dir.join("note"))?;
    ensure!(
        on_host.trim() == "written-in-pod",
        "hostPath file: {on_host:?}"
    );

    // Init containers run in order to success before the app container starts; a failed
    // one under restartPolicy Never fails the pod without starting the app.
    let init = wait_for("init Running", t, || {
        let p = pod(cp, "init")?;
        Ok((p.pointer("/status/phase") == Some(&Value::from("Running"))).then_some(p))
    })?;
    ensure!(
        condition(&init, "Initialized").as_deref() == Some("True"),
        "{init}"
    );
    for i in 0..2 {
        let s = &init["status"]["initContainerStatuses"][i];
        ensure!(
            s["state"]["terminated"]["reason"] == "Completed"
                && s["state"]["terminated"]["exitCode"] == 0,
            "init container {i}: {s}"
        );
    }
    let app_log = wait_for("the app's log", t, || {
        let log = cp.kubectl(&["logs", "init", "-c", "app"])?;
        Ok(log.contains("prepared").then_some(log))
    })?;
    ensure!(app_log.trim() == "prepared", "{app_log}");
    let failed = wait_for("init-fails Failed", t, || {
        let p = pod(cp, "init-fails")?;
        Ok((p.pointer("/status/phase") == Some(&Value::from("Failed"))).then_some(p))
    })?;
    ensure!(
        failed["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 7,
        "{failed}"
    );
    ensure!(
        container_status(&failed)["state"]["waiting"]["reason"] == "PodInitializing",
        "the app container must not start: {failed}"
    );

    // kubectl exec through the API server into the running container.
    let host = cp.kubectl(&["exec", "web", "--", "hostname"])?;
    ensure!(host.trim() == "web", "exec hostname: {host:?}");
    let etc = cp.kubectl(&["exec", "web", "--", "cat", "/etc/hostname"])?;
    ensure!(etc.trim() == "web", "/etc/hostname: {etc:?}");
    let piped = cp.kubectl_with_stdin(&["exec", "-i", "web", "--", "cat"], b"piped\n")?;
    ensure!(
        piped.status.success() && piped.stdout == b"piped\n",
        "exec -i cat: {piped:?}"
    );
    let on_tty = cp.kubectl_in_terminal(&[
        "exec",
        "-it",
        "web",
        "--",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo on-a-tty",
    ])?;
    ensure!(on_tty.contains("on-a-tty"), "exec -it: {on_tty:?}");
    let failed = cp.kubectl_with_stdin(
        &["exec", "web", "--", "sh", "-c", "echo oops >&2; exit 3"],
        b"",
    )?;
    ensure!(
        failed.status.code() == Some(3) && String::from_utf8_lossy(&failed.stderr).contains("oops"),
        "exec exit code: {failed:?}"
    );

    // Logs through the agent's endpoint: own hostname, PID 1 in its namespace.
    let (code, logs) = env.agent_get("/containerLogs/default/web/web")?;
    ensure!(code == 200, "logs: {code} {logs}");
    ensure!(logs.contains("pid=1 hostname=web"), "web logs: {logs:?}");
    let (_, stamped) =
        env.agent_get("/containerLogs/default/web/web?timestamps=true&tailLines=1")?;
    ensure!(
        stamped.lines().count() == 1 && stamped.contains("Z pid=1"),
        "{stamped:?}"
    );
    let (code, _) = env.agent_get("/containerLogs/default/web/nope")?;
    ensure!(code == 404);
    // The same log through the API server, as users read it.
    let via_api = cp.kubectl(&["logs", "web"])?;
    ensure!(
        via_api.contains("pid=1 hostname=web"),
        "kubectl logs: {via_api:?}"
    );

    // Readiness follows the probe: unready, ready once the file exists, unready again.
    ensure!(
        condition(&pod(cp, "web")?, "Ready").as_deref() == Some("False"),
        "web Ready before its readiness file exists"
    );
    cp.kubectl(&["exec", "web", "--", "touch", "/www/ready.html"])?;
    wait_for("web Ready", t, || {
        Ok((condition(&pod(cp, "web")?, "Ready").as_deref() == Some("True")).then_some(()))
    })?;
    let p = pod(cp, "web")?;
    ensure!(container_status(&p)["ready"] == true);
    cp.kubectl(&["exec", "web", "--", "rm", "/www/ready.html"])?;
    wait_for("web unready again", t, || {
        Ok((condition(&pod(cp, "web")?, "Ready").as_deref() == Some("False")).then_some(()))
    })?;

    // The failing container is restarted with back-off and reports its exit code.
    let crash = wait_for("crash restarted twice", t, || {
        let p = pod(cp, "crash")?;
        Ok((container_status(&p)["restartCount"].as_i64().unwrap_or(0) >= 2).then_some(p))
    })?;
    let cs = container_status(&crash);
    ensure!(
        cs.pointer("/lastState/terminated/exitCode") == Some(&Value::from(3)),
        "crash status: {cs}"
    );
    let (code, followed) = env.agent_get("/containerLogs/default/crash/crash?follow=true")?;
    ensure!(
        code == 200 && followed.contains("boom"),
        "followed logs {code}: {followed:?}"
    );
    let (code, prev) = env.agent_get("/containerLogs/default/crash/crash?previous=true")?;
    ensure!(
        code == 200 && prev.contains("boom"),
        "previous logs {code}: {prev:?}"
    );
    let via_api = cp.kubectl(&["logs", "crash", "--previous", "--tail=1"])?;
    ensure!(
        via_api.trim() == "boom",
        "kubectl logs --previous: {via_api:?}"
    );
    // Logs rotate by size: two files kept, kubectl logs reads the current one.
    let tail = wait_for("chatty's last line", t, || {
        let log = cp.kubectl(&["logs", "chatty"])?;
        Ok(log.contains("line 300 of").then_some(log))
    })?;
    ensure!(
        !tail.contains("line 1 of"),
        "the first lines were rotated away: {tail}"
    );
    let uid = pod(cp, "chatty")?["metadata"]["uid"]
        .as_str()
        .context("uid")?
        .to_owned();
    let dir = env
        .state_dir()
        .join(format!("logs/pods/default_chatty_{uid}/chatty"));
    let files: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    ensure!(
        files.len() == 2 && files.iter().any(|f| f == "0.log"),
        "log files in {}: {files:?}",
        dir.display()
    );

    // The agent's Events, as `kubectl describe pod` shows them.
    let described = wait_for("crash's BackOff event", t, || {
        let d = cp.kubectl(&["describe", "pod", "crash"])?;
        Ok(d.contains("BackOff").then_some(d))
    })?;
    for text in [
        "Created container crash",
        "Started container crash",
        "Back-off restarting failed container crash",
    ] {
        ensure!(
            described.contains(text),
            "{text:?} missing from:\n{described}"
        );
    }

    // The bad image is reported without harming the others.
    let bad = wait_for("bad to report its image", t, || {
        let p = pod(cp, "bad")?;
        let reason = container_status(&p)
            .pointer("/state/waiting/reason")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(reason.filter(|r| r == "ErrImagePull" || r == "ImagePullBackOff"))
    })?;
    ensure!(!bad.is_empty());
    ensure!(pod(cp, "web")?["status"]["phase"] == "Running");

    // The memory limit holds and the kill is reported as OOMKilled; Never means Failed.
    let hog = wait_for("hog to fail", t, || {
        let p = pod(cp, "hog")?;
        Ok((p["status"]["phase"] == "Failed").then_some(p))
    })?;
    let cs = container_status(&hog);
    ensure!(
        cs.pointer("/state/terminated/reason") == Some(&Value::from("OOMKilled")),
        "hog: {cs}"
    );
    ensure!(
        hog["status"]["qosClass"] == "Burstable",
        "qos: {}",
        hog["status"]["qosClass"]
    );

    // kill -9 of the agent: the container keeps running, same PID; the restarted agent
    // re-adopts it and keeps the status right.
    let sleeper = wait_for("sleeper Running", t, || {
        let p = pod(cp, "sleeper")?;
        Ok((p["status"]["phase"] == "Running"
            && container_status(&p)["state"]["running"].is_object())
        .then_some(p))
    })?;
    let pid = container_pid(env, &sleeper)?;
    // Its processes sit in a cgroup2 directory under the node's subtree.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let unified = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup2 line")?;
    ensure!(
        env.cgroup2_dir().ends_with(
            unified
                .trim_start_matches('/')
                .split("/pods/")
                .next()
                .unwrap_or_default()
        ),
        "sleeper's cgroup2 dir {unified} is not under the node's {}",
        env.cgroup2_dir().display()
    );
    agent.kill9();
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        container_pid(env, &sleeper)? == pid,
        "the container changed while the agent was down"
    );
    let _agent = env.start_agent(cp)?;
    let (code, body) = wait_for("web after the agent restart", t, || {
        Ok(env.http_get(addr, "/index.html").ok())
    })?;
    ensure!(code == 200 && body.contains("hello-from-web"));
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        container_pid(env, &sleeper)? == pid,
        "the restarted agent replaced the container"
    );
    let p = pod(cp, "sleeper")?;
    ensure!(
        p["status"]["phase"] == "Running",
        "sleeper after restart: {p}"
    );
    ensure!(container_status(&p)["restartCount"] == 0);
    ensure!(container_status(&p)["state"]["running"].is_object());

    // Deletion: SIGTERM stops it well before the grace period; the pod object and its veth go.
    let links_before = env.links()?;
    let veths_before = links_before.iter().filter(|l| l.starts_with("kv")).count();
    ensure!(veths_before == 9, "veths: {links_before:?}");
    let t0 = Instant::now();
    cp.kubectl(&["delete", "pod", "sleeper", "--wait=false"])?;
    wait_for("sleeper to be gone", t, || {
        Ok(get_json(cp, &["pod", "sleeper"])?.is_none().then_some(()))
    })?;
    let took = t0.elapsed();
    ensure!(
        took < Duration::from_secs(10),
        "deletion took {took:?} (grace 20 s: no SIGTERM?)"
    );
    ensure!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
        "the sleeper's process is still there"
    );
    let veths_after = env.links()?.iter().filter(|l| l.starts_with("kv")).count();
    ensure!(veths_after == 8, "veths after delete: {veths_after}");
    Ok(())
}
