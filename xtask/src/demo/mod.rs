//! `cargo xtask up` / `down`: the local demo, a one-node cluster on this machine.
//!
//! - The control plane: `keelson-server`, a single-member Raft store serving the Kubernetes
//!   API on `https://10.250.250.1:6443` with the scheduler and controllers; the admin
//!   kubeconfig at `.keelson/admin.kubeconfig`.
//! - The node: a network namespace (`keelson-demo`) joined to the host by one veth pair
//!   (`10.250.250.1` on the host, `10.250.250.2` in the namespace; no route out of it), where
//!   `keelson-agent node` registers Node `keelson-demo` and runs its pods on a bridge, with a
//!   cgroup2 directory of its own (`keelson-demo`) holding them.
//! - A sample app: Deployment `demo/web` (two busybox httpd pods, image imported from Debian's
//!   static busybox) behind Service `demo/web`, whose EndpointSlices the controllers keep.
//! - The service proxy: `keelson-agent proxy`, the eBPF load balancer attached to the node's
//!   cgroup2 directory with its pins in a private bpffs under `.keelson/`.
//!
//! Nothing leaves this machine, and `down` removes all of it.

mod cleanup;
pub(crate) mod image;

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{cargo, probe, repo_root, run, step},
    setup,
};

const NETNS: &str = "keelson-demo";
const CGROUP: &str = "keelson-demo";
const NODE: &str = "keelson-demo";
/// The host's end of the veth pair, and the API's address.
const HOST_LINK: &str = "kdemo0";
const HOST_IP: &str = "10.250.250.1";
/// The node's address, in its namespace.
const NODE_IP: &str = "10.250.250.2";
const IMAGE: &str = "busybox:1.36";
const SERVICE_PORT: u16 = 80;
/// kubectl releases installed on this project's machines, newest first, then `kubectl`.
const KUBECTLS: [&str; 3] = [
    "/usr/lib/google-cloud-sdk/bin/kubectl.1.33",
    "/usr/lib/google-cloud-sdk/bin/kubectl",
    "kubectl",
];

/// Options of `cargo xtask up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Skip `setup` (for a machine already set up).
    #[arg(long)]
    no_setup: bool,
    /// Port of the Kubernetes API (on the host's end of the node's veth, 10.250.250.1).
    #[arg(long, default_value_t = 6443)]
    api_port: u16,
}

fn keelson_dir() -> PathBuf {
    repo_root().join(".keelson")
}

fn state_dir() -> PathBuf {
    keelson_dir().join("demo")
}

fn kubeconfig() -> PathBuf {
    keelson_dir().join("admin.kubeconfig")
}

fn agent_state() -> PathBuf {
    state_dir().join("agent")
}

fn pins_mount() -> PathBuf {
    state_dir().join("bpffs")
}

fn pins() -> PathBuf {
    pins_mount().join("keelson")
}

fn bin(name: &str) -> PathBuf {
    repo_root().join("target/debug").join(name)
}

fn kubectl_path() -> Option<&'static str> {
    KUBECTLS
        .into_iter()
        .find(|k| probe(Command::new(k).args(["version", "--client"])).is_some())
}

fn kubectl(args: &[&str]) -> Result<String> {
    let k = kubectl_path().context("no kubectl found")?;
    let out = Command::new(k)
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cgroup_dir() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .map(|root| root.join(CGROUP))
        .context("no cgroup2 hierarchy is mounted")
}

/// Starts a process in the background, detached from this one, logging to `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<u32> {
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    Ok(child.id())
}

/// Starts the demo and shows it working.
///
/// # Errors
/// Any step fails; what was created so far is left for `cargo xtask down`.
pub fn up(args: &UpArgs) -> Result<()> {
    if !args.no_setup {
        setup::all()?;
    }
    step("build");
    run(cargo().args([
        "build",
        "--bins",
        "--package",
        "keelson-agent",
        "--package",
        "keelson-runtime",
        "--package",
        "keelson-server",
    ]))?;

    step("remove what an earlier demo left");
    down()?;
    let state = state_dir();
    fs::create_dir_all(&state)?;
    let mut pids = Vec::new();

    step(&format!(
        "node network namespace {NETNS}: veth {HOST_IP} (host) <-> {NODE_IP} (node), no route out"
    ));
    run(Command::new("ip").args(["netns", "add", NETNS]))?;
    run(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;
    run(Command::new("ip").args([
        "link", "add", HOST_LINK, "type", "veth", "peer", "name", "eth0", "netns", NETNS,
    ]))?;
    run(Command::new("ip").args(["addr", "add", &format!("{HOST_IP}/30"), "dev", HOST_LINK]))?;
    run(Command::new("ip").args(["link", "set", HOST_LINK, "up"]))?;
    run(Command::new("ip").args([
        "-n",
        NETNS,
        "addr",
        "add",
        &format!("{NODE_IP}/30"),
        "dev",
        "eth0",
    ]))?;
    run(Command::new("ip").args(["-n", NETNS, "link", "set", "eth0", "up"]))?;

    let api = format!("{HOST_IP}:{}", args.api_port);
    step(&format!(
        "control plane: keelson-server, Kubernetes API on https://{api}"
    ));
    let pid = spawn_logged(
        Command::new(bin("keelson-server"))
            .args([
                "--id",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--init",
                "--api-listen",
                &api,
            ])
            .args(["--api-san", HOST_IP])
            .arg("--data-dir")
            .arg(state.join("server"))
            .arg("--admin-kubeconfig")
            .arg(kubeconfig()),
        &state.join("server.log"),
    )?;
    pids.push(pid);
    record_pids(&pids)?;
    println!(
        "keelson-server pid {pid}, log {}",
        state.join("server.log").display()
    );
    wait_until("the API is ready", 60, &state.join("server.log"), || {
        kubectl(&["get", "--raw", "/readyz"]).is_ok()
    })?;

    step(&format!(
        "image {IMAGE}: Debian's static busybox, imported into the node's store"
    ));
    let layout = state.join("image");
    image::busybox(&layout, IMAGE)?;
    print!(
        "{}",
        run_capture(
            Command::new(bin("keelson-agent"))
                .args(["image", "import"])
                .arg(&layout)
                .args(["--name", IMAGE, "--state-dir"])
                .arg(agent_state())
        )?
    );

    step(&format!(
        "node agent: keelson-agent node in {NETNS}, pods under cgroup {CGROUP}"
    ));
    let cgroup = cgroup_dir()?;
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let pid = spawn_logged(
        // nsenter switches only the network namespace: `ip netns exec` would also remount
        // /sys, hiding the cgroup2 hierarchy from the agent.
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NETNS}"))
            .arg(bin("keelson-agent"))
            .arg("node")
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .args([
                "--node-name",
                NODE,
                "--node-ip",
                NODE_IP,
                "--address",
                NODE_IP,
            ])
            .arg("--state-dir")
            .arg(agent_state())
            .arg("--cgroup2")
            .arg(&cgroup),
        &state.join("agent.log"),
    )?;
    pids.push(pid);
    record_pids(&pids)?;
    println!(
        "keelson-agent node pid {pid}, log {}",
        state.join("agent.log").display()
    );
    wait_until("the node is Ready", 60, &state.join("agent.log"), || {
        kubectl(&[
            "get",
            "node",
            NODE,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .is_ok_and(|s| s.trim() == "True")
    })?;
    print!("{}", kubectl(&["get", "nodes", "-o", "wide"])?);

    step("the agent's service proxy: eBPF load balancer following Services and EndpointSlices");
    fs::create_dir_all(pins_mount())?;
    run(Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(pins_mount()))?;
    let pid = spawn_logged(
        Command::new(bin("keelson-agent"))
            .arg("proxy")
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .arg("--cgroup")
            .arg(&cgroup)
            .arg("--bpffs")
            .arg(pins()),
        &state.join("proxy.log"),
    )?;
    pids.push(pid);
    record_pids(&pids)?;
    println!(
        "keelson-agent proxy pid {pid}, log {}",
        state.join("proxy.log").display()
    );

    step("sample app: Deployment demo/web (2 pods) behind Service demo/web");
    let manifest = state.join("web.yaml");
    fs::write(&manifest, web_manifest())?;
    print!(
        "{}",
        kubectl(&["apply", "-f", &manifest.to_string_lossy()])?
    );
    print!(
        "{}",
        kubectl(&[
            "-n",
            "demo",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=120s"
        ])?
    );
    print!("{}", kubectl(&["-n", "demo", "get", "pods", "-o", "wide"])?);
    let cluster_ip = kubectl(&[
        "-n",
        "demo",
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let vip = format!("{}:{SERVICE_PORT}", cluster_ip.trim());
    println!("Service demo/web has cluster IP {}", cluster_ip.trim());

    step(&format!(
        "requests to http://{vip}/ from a process in the node's cgroup"
    ));
    let fetch = client_command(&cgroup, &vip);
    let mut answered = 0;
    for _ in 0..150 {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(body) = probe(Command::new("sh").args(["-c", &fetch])) {
            print!("{body}");
            answered += 1;
            if answered == 6 {
                break;
            }
        }
    }
    if answered == 0 {
        bail!(
            "the Service did not answer; see the logs in {}",
            state.display()
        );
    }
    print!(
        "{}",
        run_capture(
            Command::new(bin("keelson-agent"))
                .args(["lb", "dump", "--bpffs"])
                .arg(pins())
        )?
    );

    println!(
        "\nKeelson demo is up:\n\
         - Kubernetes API on https://{api} (keelson-server: single-member Raft store, scheduler,\n  \
         controllers); admin kubeconfig {kubeconfig}\n\
         - node {NODE}: keelson-agent in network namespace {NETNS} ({NODE_IP})\n\
         - Deployment demo/web: two busybox httpd pods, behind Service demo/web {vip},\n  \
         load-balanced by keelson-agent proxy from the EndpointSlices the controllers keep\n\n\
         Try it:\n  \
         export KUBECONFIG={kubeconfig}\n  \
         kubectl get all -A\n  \
         kubectl -n demo logs deploy/web\n  \
         kubectl -n demo exec -it deploy/web -- sh\n  \
         kubectl -n demo scale deploy/web --replicas=3\n  \
         sudo sh -c '{fetch}'\n  \
         sudo {agent} lb dump --bpffs {pins}\n\
         Remove it:\n  cargo xtask down",
        kubeconfig = kubeconfig().display(),
        agent = bin("keelson-agent").display(),
        pins = pins().display(),
    );
    Ok(())
}

/// The sample app: two busybox httpd pods answering with their name, and their Service.
fn web_manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: demo}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: demo}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: httpd
        image: {IMAGE}
        imagePullPolicy: Never
        command: ["sh", "-c", "mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html && exec httpd -f -v -p 8080 -h /www"]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe:
          httpGet: {{path: /, port: http}}
          periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: {SERVICE_PORT}, targetPort: http}}]
"#
    )
}

/// Polls `ready` every 200 ms for up to `seconds`; on timeout names the log to read.
fn wait_until(what: &str, seconds: u64, log: &Path, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Runs a command and returns its stdout.
fn run_capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn record_pids(pids: &[u32]) -> Result<()> {
    fs::write(
        state_dir().join("pids"),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )
    .context("recording pids")
}

/// A shell command that fetches `vip` from a process in the node's namespace, in a leaf
/// cgroup under the node's cgroup2 directory (where the proxy's programs are attached).
fn client_command(cgroup: &Path, vip: &str) -> String {
    let leaf = cgroup.join("client");
    format!(
        "mkdir -p {leaf} && echo $$ > {leaf}/cgroup.procs && exec nsenter --net=/run/netns/{NETNS} \
         timeout 5 busybox wget -q -O - http://{vip}/",
        leaf = leaf.display()
    )
}

/// Removes everything `up` created; parts already gone are skipped.
///
/// # Errors
/// Something exists but cannot be removed.
pub fn down() -> Result<()> {
    let state = state_dir();
    if let Ok(pids) = fs::read_to_string(state.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // Only signal it if it is still a process this demo started.
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if ["keelson-server", "keelson-agent"]
                .iter()
                .any(|p| cmdline.contains(p))
            {
                // SAFETY: kill(2) on a pid we started and just checked.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                println!("stopped pid {pid}");
            }
        }
    }
    if pins().exists() && bin("keelson-agent").exists() {
        run(Command::new(bin("keelson-agent"))
            .args(["lb", "detach", "--bpffs"])
            .arg(pins()))?;
    }
    if probe(Command::new("mountpoint").args(["-q"]).arg(pins_mount())).is_some() {
        run(Command::new("umount").arg(pins_mount()))?;
    }
    // The containers and their supervisors outlive the agent by design: end them through
    // the node's cgroup trees, then unmount their roots and namespaces.
    if !cleanup::cgroups(CGROUP) {
        bail!("cannot remove the cgroup directories {CGROUP} (processes left in them?)");
    }
    cleanup::mounts_under(&state);
    if probe(Command::new("ip").args(["netns", "list"])).is_some_and(|l| {
        l.lines()
            .any(|n| n.split_whitespace().next() == Some(NETNS))
    }) {
        run(Command::new("ip").args(["netns", "del", NETNS]))?;
    }
    // Give the server a moment to exit before its data goes.
    std::thread::sleep(Duration::from_millis(300));
    if state.exists() {
        fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    let _ = fs::remove_file(kubeconfig());
    println!("demo removed");
    Ok(())
}
