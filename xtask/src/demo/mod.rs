//! `cargo xtask up` / `down`: the local demo.
//!
//! What runs today:
//! - the control plane: `keelson-server`, a single-member Raft store serving the Kubernetes
//!   API on `https://127.0.0.1:6443` with the scheduler and controllers, and the admin
//!   kubeconfig at `.keelson/admin.kubeconfig`;
//! - a sample app (two busybox httpd backends) in a network namespace of its own
//!   (`keelson-demo`, only `lo`, no route out), and a Service for it created through the API;
//! - the agent's service proxy (`keelson-agent proxy`): the eBPF load balancer on a cgroup2
//!   directory of its own, with its pins in a private bpffs under `.keelson/`, following the
//!   Service and its EndpointSlices through the API.
//!
//! The backends run as plain processes behind a Service without a selector, whose
//! EndpointSlices `up` writes: the demo does not start a node agent with a pod network yet.
//! Nothing leaves this machine, and `down` removes all of it.

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
const SERVICE_PORT: u16 = 80;
const BACKENDS: [&str; 2] = ["127.0.0.1:8081", "127.0.0.1:8082"];
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
    /// Address of the Kubernetes API.
    #[arg(long, default_value = "127.0.0.1:6443")]
    api: String,
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
        "keelson-server",
    ]))?;

    step("remove what an earlier demo left");
    down()?;
    let state = state_dir();
    fs::create_dir_all(&state)?;
    let mut pids = Vec::new();

    step(&format!(
        "control plane: keelson-server, Kubernetes API on https://{}",
        args.api
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
                &args.api,
            ])
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
    let deadline = Instant::now() + Duration::from_secs(60);
    while kubectl(&["get", "--raw", "/readyz"]).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the API did not come up; see {}",
                state.join("server.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    print!("{}", kubectl(&["get", "namespaces"])?);

    step(&format!(
        "network namespace {NETNS} (only lo, no route out)"
    ));
    run(Command::new("ip").args(["netns", "add", NETNS]))?;
    run(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;

    step("sample app: two HTTP backends in the namespace");
    for (i, backend) in BACKENDS.iter().enumerate() {
        let www = state.join(format!("www-{i}"));
        fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
        fs::write(
            www.join("index.html"),
            format!("hello from backend-{i} ({backend})\n"),
        )?;
        let pid = spawn_logged(
            Command::new("ip")
                .args([
                    "netns", "exec", NETNS, "busybox", "httpd", "-f", "-p", backend, "-h",
                ])
                .arg(&www),
            &state.join(format!("backend-{i}.log")),
        )?;
        println!("backend-{i}: busybox httpd on {backend}, pid {pid}");
        pids.push(pid);
    }
    record_pids(&pids)?;

    // A Service without a selector, as for any backends outside the cluster's pods: its
    // EndpointSlices are written by hand, and the EndpointSlice controller leaves them be.
    step("the Service and its EndpointSlices, through the Kubernetes API");
    let manifest = state.join("web.yaml");
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\n\
         spec: {{ports: [{{name: http, port: {SERVICE_PORT}}}]}}\n"
    );
    for (i, backend) in BACKENDS.iter().enumerate() {
        let (ip, port) = backend.split_once(':').context("backend address")?;
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-{i}, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
             endpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]\n"
        ));
    }
    fs::write(&manifest, yaml)?;
    print!(
        "{}",
        kubectl(&["apply", "-f", &manifest.to_string_lossy()])?
    );
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

    step("the agent's service proxy: eBPF load balancer following Services and EndpointSlices");
    let cgroup = cgroup_dir()?;
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
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

    step(&format!("requests to http://{vip}/ from inside the cgroup"));
    let fetch = client_command(&cgroup, &vip);
    let mut answered = 0;
    for _ in 0..100 {
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
        bail!("the Service did not answer; see {}", state.display());
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
         - Kubernetes API on https://{api} (keelson-server, single-member Raft store)\n\
         - admin kubeconfig: {kubeconfig}\n\
         - Service demo/web {vip} -> {backends} (busybox httpd in netns {NETNS}),\n  \
         load-balanced by keelson-agent proxy from the Service's EndpointSlices\n\n\
         Try it:\n  \
         KUBECONFIG={kubeconfig} kubectl get all -A\n  \
         sudo sh -c '{fetch}'\n  \
         sudo {agent} lb dump --bpffs {pins}\n\
         Remove it:\n  cargo xtask down\n\n\
         Not in the demo yet: a node agent running the backends as pods (see README); the\n\
         backends are plain processes and `up` wrote their EndpointSlices.",
        api = args.api,
        kubeconfig = kubeconfig().display(),
        backends = BACKENDS.join(", "),
        agent = bin("keelson-agent").display(),
        pins = pins().display(),
    );
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

/// A shell command that fetches `vip` from a process in the demo's cgroup and namespace.
fn client_command(cgroup: &Path, vip: &str) -> String {
    format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{NETNS} \
         timeout 5 busybox wget -q -O - http://{vip}/",
        cgroup.display()
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
            if ["httpd", "keelson-server", "keelson-agent"]
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
    if let Ok(cgroup) = cgroup_dir()
        && cgroup.exists()
    {
        // Processes left in it are demo clients.
        if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process in the demo's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let mut removed = false;
        for _ in 0..50 {
            if fs::remove_dir(&cgroup).is_ok() {
                removed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !removed {
            bail!("cannot remove {}", cgroup.display());
        }
        println!("removed cgroup {}", cgroup.display());
    }
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
