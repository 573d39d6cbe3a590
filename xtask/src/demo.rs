//! `cargo xtask up` / `down`: the local demo.
//!
//! Everything lives in a network namespace of its own (`keelson-demo`, only `lo`, no route out),
//! a cgroup2 directory of its own and a private bpffs under `.keelson/`, so the demo sends
//! nothing outside this machine and `down` removes all of it. What runs today: a sample app
//! (two busybox httpd backends) behind a Service VIP served by the agent's eBPF load balancer.
//! The control plane and pod runtime join the demo as they land (see the README's status).

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{cargo, probe, repo_root, run, step},
    setup,
};

const NETNS: &str = "keelson-demo";
const CGROUP: &str = "keelson-demo";
const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 2] = ["127.0.0.1:8081", "127.0.0.1:8082"];

/// Options of `cargo xtask up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Skip `setup` (for a machine already set up).
    #[arg(long)]
    no_setup: bool,
}

fn state_dir() -> PathBuf {
    repo_root().join(".keelson/demo")
}

fn pins_mount() -> PathBuf {
    state_dir().join("bpffs")
}

fn pins() -> PathBuf {
    pins_mount().join("keelson")
}

fn agent() -> PathBuf {
    repo_root().join("target/debug/keelson-agent")
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

/// Starts the demo and shows it working.
///
/// # Errors
/// Any step fails; what was created so far is left for `cargo xtask down`.
pub fn up(args: &UpArgs) -> Result<()> {
    if !args.no_setup {
        setup::all()?;
    }
    step("build");
    run(cargo().args(["build", "--bins", "--package", "keelson-agent"]))?;

    step("remove what an earlier demo left");
    down()?;

    step(&format!(
        "network namespace {NETNS} (only lo, no route out)"
    ));
    run(Command::new("ip").args(["netns", "add", NETNS]))?;
    run(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;

    step("sample app: two HTTP backends in the namespace");
    let state = state_dir();
    let mut pids = Vec::new();
    for (i, backend) in BACKENDS.iter().enumerate() {
        let www = state.join(format!("www-{i}"));
        fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
        fs::write(
            www.join("index.html"),
            format!("hello from backend-{i} ({backend})\n"),
        )?;
        let log = fs::File::create(state.join(format!("backend-{i}.log")))?;
        let child = Command::new("ip")
            .args([
                "netns", "exec", NETNS, "busybox", "httpd", "-f", "-p", backend, "-h",
            ])
            .arg(&www)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting busybox httpd (is busybox-static installed?)")?;
        println!(
            "backend-{i}: busybox httpd on {backend}, pid {}",
            child.id()
        );
        pids.push(child.id());
    }
    fs::write(
        state.join("pids"),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;

    step("eBPF service load balancer");
    let cgroup = cgroup_dir()?;
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    fs::create_dir_all(pins_mount())?;
    run(Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(pins_mount()))?;
    run(Command::new(agent())
        .args(["lb", "attach", "--cgroup"])
        .arg(&cgroup)
        .arg("--bpffs")
        .arg(pins()))?;
    run(Command::new(agent())
        .args(["lb", "set", VIP])
        .args(BACKENDS)
        .arg("--bpffs")
        .arg(pins()))?;

    step(&format!(
        "requests to the Service VIP http://{VIP}/ from inside the cgroup"
    ));
    let fetch = client_command(&cgroup);
    let mut answered = 0;
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Some(body) = probe(Command::new("sh").args(["-c", &fetch])) {
            print!("{body}");
            answered += 1;
            if answered == 6 {
                break;
            }
        }
    }
    if answered == 0 {
        bail!("the Service VIP did not answer; see {}", state.display());
    }

    println!(
        "\nKeelson demo is up:\n\
         - network namespace {NETNS}, cgroup {cgroup}, pins under {pins}\n\
         - Service {VIP} -> {backends} (busybox httpd, pids {pids:?})\n\n\
         Try it:\n  \
         sudo sh -c '{fetch}'\n  \
         sudo {agent} lb dump --bpffs {pins}\n\
         Remove it:\n  cargo xtask down\n\n\
         Not in the demo yet: the API server and kubeconfig, the pod runtime (see README).",
        cgroup = cgroup.display(),
        pins = pins().display(),
        backends = BACKENDS.join(", "),
        agent = agent().display(),
    );
    Ok(())
}

/// A shell command that fetches the VIP from a process in the demo's cgroup and namespace.
fn client_command(cgroup: &Path) -> String {
    format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{NETNS} \
         timeout 5 busybox wget -q -O - http://{VIP}/",
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
            // Only signal it if it is still the httpd we started.
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("httpd") {
                // SAFETY: kill(2) on a pid we started and just checked.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                println!("stopped backend pid {pid}");
            }
        }
    }
    if pins().exists() && agent().exists() {
        run(Command::new(agent())
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
            std::thread::sleep(std::time::Duration::from_millis(20));
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
    if state.exists() {
        fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    println!("demo removed");
    Ok(())
}
