//! The node agent's images and node-pressure handling against a real control plane and a
//! real registry: Debian's `docker-registry` listening on the loopback of the node's own
//! network namespace (plain HTTP, `--insecure-registry`), filled with `skopeo copy` from an
//! OCI layout. Pods pull their images by `imagePullPolicy` (Always, IfNotPresent, Never), a
//! missing image and an invalid name are reported without harming the other pods,
//! `keelson-agent image pull`/`prune` work on the node's store (an image no container uses
//! goes, its layer shared with a used image stays), `kubectl attach` talks to a container's
//! main process, and a pod using memory beyond a small `--eviction-memory-capacity` is
//! evicted (reason Evicted, an Event, MemoryPressure on the Node) while a guaranteed pod
//! keeps running.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use keelson_e2e::{
    cluster::ControlPlane,
    node::{AgentOptions, NodeEnv, wait_for},
    oci_image::busybox_layout,
    place, require_root, run_ok, workspace_bin,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The registry's address inside the node's namespace (its own loopback).
const REGISTRY: &str = "127.0.0.1:5000";
/// A second registry there, with basic authentication.
const PRIVATE: &str = "127.0.0.1:5001";
/// Its user and password.
const CREDS: (&str, &str) = ("keelson", "s3cret-pull");

/// `docker-registry serve` in the node's namespace; killed on drop.
struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// A registry on `addr`, with basic authentication for [`CREDS`] if `auth`.
    fn start(node: &NodeEnv, addr: &str, auth: bool) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kt-registry-").tempdir()?;
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if auth {
            let htpasswd = dir.path().join("htpasswd");
            let out = run_ok(Command::new("htpasswd").args(["-Bbn", CREDS.0, CREDS.1]))
                .context("htpasswd (apt-get install apache2-utils)")?;
            fs::write(&htpasswd, &out.stdout)?;
            text += &format!(
                "auth:\n  htpasswd:\n    realm: keelson-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        fs::write(&config, text)?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("registry.log"))?);
        let fds = place(&mut cmd, node.netns(), None)?;
        let child = cmd
            .spawn()
            .context("starting docker-registry (apt-get install docker-registry)")?;
        drop(fds);
        let registry = Registry { child, _dir: dir };
        let wanted = if auth { 401 } else { 200 };
        wait_for("the registry to answer", Duration::from_secs(20), || {
            Ok(node
                .http_get(addr.parse()?, "/v2/")
                .ok()
                .filter(|(code, _)| *code == wanted)
                .map(drop))
        })?;
        Ok(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `skopeo copy` of the layout's image `tag` to `target` (`host:port/name:tag`), from
/// inside the namespace, with [`CREDS`] if `auth`.
fn push(node: &NodeEnv, layout: &Path, tag: &str, target: &str, auth: bool) -> Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--dest-tls-verify=false"]);
    if auth {
        cmd.arg(format!("--dest-creds={}:{}", CREDS.0, CREDS.1));
    }
    cmd.arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{target}"));
    let fds = place(&mut cmd, node.netns(), None)?;
    run_ok(&mut cmd).context("skopeo copy (apt-get install skopeo)")?;
    drop(fds);
    Ok(())
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Rewrites the layout's image with a config label, so it is another image (its own config
/// and manifest) sharing the busybox layer. Returns the new config digest.
fn relabel(layout: &Path, label: &str) -> Result<String> {
    let blobs = layout.join("blobs/sha256");
    let read = |digest: &str| -> Result<Value> {
        let hex = digest.strip_prefix("sha256:").context("digest")?;
        Ok(serde_json::from_slice(&fs::read(blobs.join(hex))?)?)
    };
    let put = |v: &Value| -> Result<(String, usize)> {
        let bytes = serde_json::to_vec(v)?;
        let hex = sha256(&bytes);
        fs::write(blobs.join(&hex), &bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };
    let mut index: Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .context("manifest digest")?
        .to_owned();
    let mut manifest = read(&mdigest)?;
    let mut config = read(manifest["config"]["digest"].as_str().context("config")?)?;
    config["config"]["Labels"] = json!({"variant": label});
    let (cdigest, csize) = put(&config)?;
    manifest["config"]["digest"] = json!(cdigest);
    manifest["config"]["size"] = json!(csize);
    let (mdigest, msize) = put(&manifest)?;
    index["manifests"][0]["digest"] = json!(mdigest);
    index["manifests"][0]["size"] = json!(msize);
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(cdigest)
}

fn get_json(cp: &ControlPlane, args: &[&str]) -> Result<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    Ok(serde_json::from_str(&cp.kubectl(&all)?)?)
}

fn waiting_reason(cp: &ControlPlane, pod: &str) -> Result<Option<String>> {
    let p = get_json(cp, &["pod", pod])?;
    Ok(
        p.pointer("/status/containerStatuses/0/state/waiting/reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
    )
}

fn phase(cp: &ControlPlane, pod: &str) -> Result<String> {
    let p = get_json(cp, &["pod", pod])?;
    Ok(p.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

fn wait_running(cp: &ControlPlane, pod: &str, t: Duration) -> Result<()> {
    wait_for(&format!("{pod} Running"), t, || {
        Ok((phase(cp, pod)? == "Running").then_some(()))
    })
}

fn describe(cp: &ControlPlane, pod: &str) -> Result<String> {
    cp.kubectl(&["describe", "pod", pod])
}

/// Waits until `kubectl describe pod` shows every one of `texts`.
fn wait_events(cp: &ControlPlane, pod: &str, texts: &[&str], t: Duration) -> Result<String> {
    let mut last = String::new();
    wait_for(&format!("events {texts:?} of {pod}"), t, || {
        last = describe(cp, pod)?;
        Ok(texts.iter().all(|x| last.contains(x)).then(|| last.clone()))
    })
    .with_context(|| format!("last description:\n{last}"))
}

fn pod_yaml(node: &str, name: &str, image: &str, extra: &str, container_extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n{extra}  containers:\n  \
         - name: {name}\n    image: '{image}'\n    command: [sleep, '3600']\n{container_extra}---\n"
    )
}

/// `keelson-agent image …` on the node's state directory, inside its namespace.
fn agent_image(node: &NodeEnv, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(workspace_bin("keelson-agent")?);
    cmd.arg("image")
        .args(args)
        .arg("--state-dir")
        .arg(node.state_dir());
    let fds = place(&mut cmd, node.netns(), None)?;
    let out = run_ok(&mut cmd)?;
    drop(fds);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the memory controller says of the pod `uid` of `env`'s agent, and the state of every
/// process in it (for a failed eviction: is the memory there, did the processes run?).
fn pod_memory_report(env: &NodeEnv, uid: &str) -> String {
    let Ok(root) = keelson_e2e::cgroup2_mount() else {
        return "no cgroup2 mount".into();
    };
    let Ok(rel) = env.cgroup2_dir().strip_prefix(&root) else {
        return "the node's cgroup is outside the cgroup2 mount".into();
    };
    let memory = Path::new("/sys/fs/cgroup/memory");
    let (dir, usage_file) = if memory.is_dir() {
        (memory.join(rel), "memory.usage_in_bytes")
    } else {
        (env.cgroup2_dir().to_owned(), "memory.current")
    };
    let dir = dir.join("pods").join(format!("pod{uid}"));
    let usage = fs::read_to_string(dir.join(usage_file)).unwrap_or_else(|e| e.to_string());
    let mut out = format!("{} {usage_file}={}", dir.display(), usage.trim());
    let mut dirs = vec![dir];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let fields: Vec<&str> = status
                .lines()
                .filter(|l| {
                    ["Name:", "State:", "VmRSS:", "SigIgn:", "SigBlk:"]
                        .iter()
                        .any(|k| l.starts_with(k))
                })
                .collect();
            let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            out += &format!(
                "\n  {pid} {} wchan={wchan}",
                fields.join(" ").replace('\t', " ")
            );
        }
    }
    out
}

#[test]
fn registry_pulls_gc_attach_and_memory_eviction() -> Result<()> {
    require_root()?;
    let started = Instant::now();
    let t = Duration::from_secs(60);
    let cp = ControlPlane::start()?;
    let env = NodeEnv::new(&keelson_e2e::unique_name("img"))?;
    let node = env.name().to_owned();
    let registry = Registry::start(&env, REGISTRY, false)?;
    let private = Registry::start(&env, PRIVATE, true)?;
    let scratch = tempfile::Builder::new().prefix("kt-images-").tempdir()?;
    let base = busybox_layout(&scratch.path().join("base"), "v1")?;
    push(
        &env,
        &base,
        "v1",
        &format!("{REGISTRY}/test/busybox:1"),
        false,
    )?;
    push(
        &env,
        &base,
        "v1",
        &format!("{REGISTRY}/test/busybox:latest"),
        false,
    )?;
    let other = busybox_layout(&scratch.path().join("other"), "v1")?;
    let other_config = relabel(&other, "other")?;
    push(
        &env,
        &other,
        "v1",
        &format!("{REGISTRY}/test/other:1"),
        false,
    )?;
    push(
        &env,
        &other,
        "v1",
        &format!("{REGISTRY}/test/byhand:1"),
        false,
    )?;
    let secret = busybox_layout(&scratch.path().join("secret"), "v1")?;
    relabel(&secret, "secret")?;
    push(
        &env,
        &secret,
        "v1",
        &format!("{PRIVATE}/test/secret:1"),
        true,
    )?;

    let _agent = env.start_agent_with(
        &cp,
        &AgentOptions {
            extra_args: [
                "--insecure-registry",
                REGISTRY,
                "--insecure-registry",
                PRIVATE,
                // Image GC only by hand here (the host's disk could be above any threshold).
                "--image-gc-high-threshold",
                "100",
                // memory.available = 160Mi - the pods' working set: pressure above 60Mi of pods.
                "--eviction-hard",
                "memory.available<100Mi",
                "--eviction-memory-capacity",
                "160Mi",
                "--eviction-pressure-transition-period",
                "30s",
            ]
            .map(String::from)
            .to_vec(),
            ..AgentOptions::default()
        },
    )?;
    wait_for("the node to register", t, || {
        Ok(cp.kubectl(&["get", "node", &node]).ok().map(drop))
    })?;

    let img = |name: &str| format!("{REGISTRY}/{name}");
    let mut m = String::new();
    // IfNotPresent by default (tagged, not latest): pulled once.
    m += &pod_yaml(&node, "pulled", &img("test/busybox:1"), "", "");
    // No tag: Always.
    m += &pod_yaml(&node, "always", &img("test/busybox"), "", "");
    // Never, and not in the store.
    m += &pod_yaml(
        &node,
        "never",
        &img("test/byhand:1"),
        "",
        "    imagePullPolicy: Never\n",
    );
    // Not in the registry.
    m += &pod_yaml(&node, "missing", &img("test/missing:1"), "", "");
    // Not a reference at all.
    m += &pod_yaml(&node, "invalid", "Not An Image", "", "");
    cp.apply(&m)?;

    wait_running(&cp, "pulled", t)?;
    wait_running(&cp, "always", t)?;
    wait_events(
        &cp,
        "pulled",
        &[
            &format!("Pulling image \"{}\"", img("test/busybox:1")),
            &format!("Successfully pulled image \"{}\"", img("test/busybox:1")),
        ],
        t,
    )?;
    wait_events(
        &cp,
        "always",
        &[&format!("Pulling image \"{}\"", img("test/busybox"))],
        t,
    )?;
    let reason = wait_for("never to be refused", t, || {
        Ok(waiting_reason(&cp, "never")?.filter(|r| r == "ErrImageNeverPull"))
    })?;
    ensure!(reason == "ErrImageNeverPull");
    wait_events(
        &cp,
        "never",
        &["is not present with pull policy of Never"],
        t,
    )?;
    wait_for("invalid to be refused", t, || {
        Ok(waiting_reason(&cp, "invalid")?.filter(|r| r == "InvalidImageName"))
    })?;
    // A failed pull: ErrImagePull, then ImagePullBackOff with a back-off.
    wait_for("missing to back off", t, || {
        Ok(waiting_reason(&cp, "missing")?.filter(|r| r == "ImagePullBackOff"))
    })?;
    wait_events(
        &cp,
        "missing",
        &[
            "Failed to pull image",
            "Error: ErrImagePull",
            "Back-off pulling image",
        ],
        t,
    )?;
    ensure!(
        phase(&cp, "pulled")? == "Running" && phase(&cp, "always")? == "Running",
        "a bad image harmed other pods"
    );

    // IfNotPresent again: no second pull. Always on a present image: pulled again.
    let mut m = pod_yaml(&node, "again", &img("test/busybox:1"), "", "");
    m += &pod_yaml(
        &node,
        "repull",
        &img("test/busybox:1"),
        "",
        "    imagePullPolicy: Always\n",
    );
    cp.apply(&m)?;
    wait_running(&cp, "again", t)?;
    wait_running(&cp, "repull", t)?;
    let again = wait_events(&cp, "again", &["already present on machine"], t)?;
    ensure!(!again.contains("Pulling image"), "again pulled:\n{again}");
    wait_events(&cp, "repull", &["Pulling image", "Successfully pulled"], t)?;

    // Basic authentication from an imagePullSecret; without it the registry refuses.
    cp.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server={PRIVATE}"),
        &format!("--docker-username={}", CREDS.0),
        &format!("--docker-password={}", CREDS.1),
    ])?;
    let secret_image = format!("{PRIVATE}/test/secret:1");
    cp.apply(&pod_yaml(&node, "anonymous", &secret_image, "", ""))?;
    wait_for("anonymous to be refused", t, || {
        Ok(waiting_reason(&cp, "anonymous")?
            .filter(|r| r == "ErrImagePull" || r == "ImagePullBackOff"))
    })?;
    cp.apply(&pod_yaml(
        &node,
        "private",
        &secret_image,
        "  imagePullSecrets: [{name: regcred}]\n",
        "",
    ))?;
    wait_running(&cp, "private", t)?;
    wait_events(&cp, "private", &["Successfully pulled image"], t)?;

    // The CLI pulls into the node's store; prune removes what no container uses, keeping
    // the layer the used image shares.
    let pulled = agent_image(
        &env,
        &[
            "pull",
            &img("test/other:1"),
            "--insecure-registry",
            REGISTRY,
        ],
    )?;
    ensure!(pulled.contains("test/other:1"), "pull: {pulled}");
    let listed = agent_image(&env, &["ls"])?;
    ensure!(listed.contains("test/other:1"), "ls: {listed}");
    let store = env.state_dir().join("images/blobs/sha256");
    let config_blob = store.join(other_config.trim_start_matches("sha256:"));
    ensure!(config_blob.exists(), "other's config blob was stored");
    let pruned = agent_image(&env, &["prune"])?;
    ensure!(pruned.contains("test/other:1"), "prune: {pruned}");
    ensure!(
        !pruned.contains("test/busybox:1"),
        "prune removed a used image: {pruned}"
    );
    let listed = agent_image(&env, &["ls"])?;
    ensure!(
        !listed.contains("test/other:1") && listed.contains("test/busybox:1"),
        "ls after prune: {listed}"
    );
    ensure!(!config_blob.exists(), "other's config blob is gone");
    ensure!(
        fs::read_dir(env.state_dir().join("images/layers"))?.count() == 1,
        "the shared layer stays"
    );
    // The pod that was refused with Never starts once the image is there, pulled by hand.
    agent_image(
        &env,
        &[
            "pull",
            &img("test/byhand:1"),
            "--insecure-registry",
            REGISTRY,
        ],
    )?;
    wait_running(&cp, "never", t)?;

    // kubectl attach: input to the main process's stdin, its output back; stdinOnce ends
    // its input when the client is done.
    cp.apply(
        &pod_yaml(
            &node,
            "attach",
            &img("test/busybox:1"),
            "  restartPolicy: Never\n",
            "    stdin: true\n    stdinOnce: true\n",
        )
        .replace(
            "command: [sleep, '3600']",
            "command: [sh, -c, 'echo ready; while read l; do echo got:$l; done; echo bye']",
        ),
    )?;
    wait_running(&cp, "attach", t)?;
    let out = cp.kubectl_with_stdin(&["attach", "-i", "attach", "-c", "attach"], b"hello\n")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.contains("got:hello") && stdout.contains("bye"),
        "attach: {out:?}"
    );
    wait_for("attach to succeed", t, || {
        Ok((phase(&cp, "attach")? == "Succeeded").then_some(()))
    })?;

    // Memory pressure: the BestEffort hog is evicted, the guaranteed pod stays.
    let mut m = pod_yaml(
        &node,
        "guaranteed",
        &img("test/busybox:1"),
        "",
        "    resources: {limits: {cpu: 100m, memory: 32Mi}, requests: {cpu: 100m, memory: 32Mi}}\n",
    );
    m += &pod_yaml(&node, "hog", &img("test/busybox:1"), "", "").replace(
        "command: [sleep, '3600']",
        // The shell must stay to hold the variable: a plain final `sleep` would be exec'd in
        // its place (busybox sh does so), freeing the 90 MB the moment they were filled.
        "command: [sh, -c, 'x=$(yes | head -c 90000000); echo filled; while sleep 3600; do :; done']",
    );
    cp.apply(&m)?;
    wait_running(&cp, "guaranteed", t)?;
    // Filling 90 MB through a shell variable and the 1 s pressure checks take long on a busy
    // 2-core CI machine: a wider margin here than for the other steps.
    let hog = wait_for("hog to be evicted", 2 * t, || {
        let p = get_json(&cp, &["pod", "hog"])?;
        Ok((p.pointer("/status/reason") == Some(&json!("Evicted"))).then_some(p))
    })
    .with_context(|| {
        let log = std::fs::read_to_string(cp.dir().join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let pod = get_json(&cp, &["pod", "hog"]).ok();
        let uid = pod
            .as_ref()
            .and_then(|p| p.pointer("/metadata/uid"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        format!(
            "hog: {}\nits cgroup: {}\nagent log (end):\n{}",
            pod.as_ref()
                .map_or_else(|| "not found".to_owned(), |p| p["status"].to_string()),
            pod_memory_report(&env, uid),
            tail.join("\n")
        )
    })?;
    ensure!(hog["status"]["phase"] == "Failed", "hog: {}", hog["status"]);
    let message = hog["status"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.starts_with("The node was low on resource: memory.")
            && message.contains("Threshold quantity: 100Mi")
            && message.contains("Container hog was using"),
        "eviction message: {message:?}"
    );
    wait_events(
        &cp,
        "hog",
        &["Evicted", "The node was low on resource: memory."],
        t,
    )?;
    let pressure = wait_for(
        "MemoryPressure on the node",
        Duration::from_secs(30),
        || {
            let n = get_json(&cp, &["node", &node])?;
            let on = n
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "MemoryPressure" && c["status"] == "True");
            Ok(on.then_some(n))
        },
    )?;
    ensure!(pressure["metadata"]["name"] == json!(node));
    // The hog's containers are gone and stay gone; the guaranteed pod keeps running.
    wait_for("hog's container to stop", t, || {
        let p = get_json(&cp, &["pod", "hog"])?;
        Ok(p.pointer("/status/containerStatuses/0/state/terminated")
            .is_some()
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        phase(&cp, "guaranteed")? == "Running",
        "guaranteed pod was harmed"
    );
    ensure!(phase(&cp, "pulled")? == "Running", "pulled pod was harmed");
    ensure!(phase(&cp, "hog")? == "Failed");

    drop(private);
    drop(registry);
    println!("agent images test took {:.1?}", started.elapsed());
    Ok(())
}
