//! A worker joins by network boot: in a lab network namespace of the test (a bridge with the
//! control plane's address and a tap device for a VM, no route out), `keelson-server` serves the
//! API on the bridge address and `keelson-provisioner` serves DHCP, iPXE, the node image
//! (`cargo xtask node-image`) and the machine's NoCloud seed, whose user-data writes a bootstrap
//! kubeconfig (a token from `keelson token create`) and `/etc/keelson/agent-args`; the agent
//! trades the token for node credentials (a CSR the controllers approve and sign). A qemu VM (TCG) PXE-boots from its NIC's iPXE ROM,
//! runs `keelson-agent boot`, and the test asserts through the API that its Node registers and
//! turns Ready and that a pod the scheduler places on it runs and logs, inside the limits of its
//! spec on this pure cgroup v2 host (a pod allocating past its memory limit is OOMKilled).
//!
//! The VM (by PID), the servers, the tap, the bridge and the namespace are removed on drop,
//! also when the test fails.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use keelson_e2e::{cluster::KUBECTL, require_root, run_ok, workspace_bin};
use serde_json::Value;

/// The control plane's (and provisioner's) address on the lab bridge.
const SERVER_IP: &str = "192.0.2.1";
/// The VM's reserved address.
const VM_IP: &str = "192.0.2.10";
/// The VM NIC's MAC (not in the inventory: the machine is known by its SMBIOS UUID).
const VM_MAC: &str = "52:54:00:4b:00:01";
/// The VM's SMBIOS system UUID (`qemu -uuid`), the machine's key in the inventory: iPXE
/// sends it in DHCP option 97 and the provisioner matches the machine by it.
const VM_UUID: &str = "6b5e1f2a-9c3d-4e7f-8a1b-2c3d4e5f6a7b";
/// The machine's (and Node's) name.
const NODE: &str = "vm1";
/// The API port inside the lab namespace (its own, so any port is free).
const API_PORT: u16 = 6443;

/// The node image directory beside the test binaries' profile dir: `<target>/node-image`.
fn node_image() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // <target>/<profile>/deps/<test>
    let target = exe
        .ancestors()
        .nth(3)
        .context("test executable outside a target directory")?;
    let dir = target.join("node-image");
    for f in ["vmlinuz", "initrd.img"] {
        ensure!(
            dir.join(f).is_file(),
            "the node image is not built ({} is missing): run `cargo xtask node-image` \
             (`cargo xtask test` does)",
            dir.join(f).display()
        );
    }
    Ok(dir)
}

fn require_tools() -> Result<()> {
    for (path, package) in [
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
        ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
        ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
        (KUBECTL, "google-cloud-cli (kubectl 1.33)"),
    ] {
        ensure!(
            Path::new(path).exists(),
            "{path} is missing: install the Debian package {package}"
        );
    }
    Ok(())
}

/// A named network namespace with bridge `br0` (the servers' address) and `tap0` in it for the
/// VM; deleting the namespace removes both.
struct Lab {
    ns: String,
}

impl Lab {
    fn new() -> Result<Lab> {
        let ns = format!("kt-vmjoin-{}", std::process::id());
        // A leftover of a crashed run with the same PID.
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
        let lab = Lab { ns };
        let ip = |args: &[&str]| run_ok(Command::new("ip").arg("-n").arg(&lab.ns).args(args));
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", "br0", "type", "bridge"])?;
        ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", "br0"])?;
        ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip(&["link", "set", "tap0", "master", "br0"])?;
        ip(&["link", "set", "tap0", "up"])?;
        ip(&["link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// A command run inside the namespace.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A process killed by its PID and reaped on drop.
struct Proc {
    child: Child,
    what: &'static str,
}

impl Proc {
    fn spawn(what: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Proc { child, what })
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.what);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything of one run; fields drop in order: VM, provisioner, server, then the namespace.
struct Env {
    vm: Option<Proc>,
    provisioner: Option<Proc>,
    server: Option<Proc>,
    lab: Lab,
    dir: tempfile::TempDir,
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .lab
            .cmd(KUBECTL)
            .arg("--kubeconfig")
            .arg(self.path("admin.kubeconfig"))
            .args(args)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn get(&self, args: &[&str]) -> Result<Option<Value>> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend(["-o", "json"]);
        match self.kubectl(&all) {
            Ok(text) => Ok(Some(serde_json::from_str(&text)?)),
            Err(e) if e.to_string().contains("NotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The last lines of a log file, for failure messages.
    fn tail(&self, name: &str, lines: usize) -> String {
        let text = fs::read_to_string(self.path(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- VM console (last 60 lines) ---\n{}\n--- provisioner (last 15) ---\n{}\n\
             --- keelson-server (last 15) ---\n{}",
            self.tail("console.log", 60),
            self.tail("provisioner.log", 15),
            self.tail("server.log", 15)
        )
    }

    /// Polls `f` every second until it gives a value; fails with the logs after `timeout`, or
    /// as soon as a process of the test died.
    fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Env) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let died = [&mut self.vm, &mut self.provisioner, &mut self.server]
                .into_iter()
                .flatten()
                .find_map(|p| p.check_running().err());
            if let Some(e) = died {
                bail!("waiting for {what}: {e}\n{}", self.diagnostics());
            }
            match f(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!(
                    "{what}: not within {timeout:?} (last error: {last})\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn condition(o: &Value, kind: &str) -> Option<String> {
    o.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

/// The provisioner's inventory: the VM's machine on a profile that boots the node image, with
/// the user-data of the join contract: a bootstrap kubeconfig and the agent's arguments.
fn inventory(kubeconfig: &str) -> String {
    format!(
        r#"unknown = "ignore"

[dhcp]
pool_start = "192.0.2.100"
pool_end = "192.0.2.110"
prefix_len = 24
lease_secs = 3600

[profiles.node]
kernel = "vmlinuz"
initrd = ["initrd.img"]
cmdline = "console=ttyS0 panic=1"

[profiles.node.user_data]
hostname = "{NODE}"
runcmd = [["echo", "for installed servers only"]]

[[profiles.node.user_data.write_files]]
path = "/etc/keelson/bootstrap-kubeconfig"
permissions = "0600"
owner = "root:root"
content = '''
{kubeconfig}'''

[[profiles.node.user_data.write_files]]
path = "/etc/keelson/agent-args"
content = "--node-name {NODE} --bootstrap-kubeconfig /etc/keelson/bootstrap-kubeconfig --kubeconfig /var/lib/keelson/kubeconfig\n"

[[machines]]
name = "{NODE}"
uuid = "{VM_UUID}"
ip = "{VM_IP}"
profile = "node"
"#
    )
}

/// Two pods for the node: `hello` logs a greeting and what its cgroup looks like (the node
/// image is a pure cgroup v2 host), `oom` allocates past its memory limit.
fn pod_manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: hello
  namespace: default
spec:
  restartPolicy: Always
  containers:
  - name: hello
    image: {image}
    imagePullPolicy: Never
    resources:
      limits: {{cpu: 200m, memory: 64Mi}}
    command:
    - sh
    - -c
    - |
      echo hello from $(hostname)
      echo cgroup: $(cat /proc/self/cgroup)
      echo memory.max: $(cat /sys/fs/cgroup/memory.max)
      echo cpu.max: $(cat /sys/fs/cgroup/cpu.max)
      while true; do sleep 5; done
---
apiVersion: v1
kind: Pod
metadata:
  name: oom
  namespace: default
spec:
  restartPolicy: Never
  containers:
  - name: oom
    image: {image}
    imagePullPolicy: Never
    resources:
      limits: {{cpu: 100m, memory: 32Mi}}
    command: ["sh", "-c", "x=a; while true; do x=$x$x; done"]
"#,
        image = "busybox:1.36"
    )
}

#[test]
fn a_pxe_booted_vm_joins_and_runs_a_pod() -> Result<()> {
    require_root()?;
    require_tools()?;
    let image = node_image()?;
    let server_bin = workspace_bin("keelson-server")?;
    let provisioner_bin = workspace_bin("keelson-provisioner")?;
    let started = Instant::now();

    let lab = Lab::new()?;
    let dir = tempfile::Builder::new().prefix("kt-vmjoin-").tempdir()?;
    let mut env = Env {
        vm: None,
        provisioner: None,
        server: None,
        lab,
        dir,
    };

    // The control plane, on the bridge address (in the serving certificate too).
    let api = format!("{SERVER_IP}:{API_PORT}");
    let mut server = env.lab.cmd(&server_bin);
    server
        .args(["--id", "1", "--listen", "127.0.0.1:0", "--init"])
        .args(["--api-listen", &api, "--api-san", SERVER_IP])
        .arg("--data-dir")
        .arg(env.path("data"))
        .arg("--admin-kubeconfig")
        .arg(env.path("admin.kubeconfig"));
    env.server = Some(Proc::spawn(
        "keelson-server",
        &mut server,
        &env.path("server.log"),
    )?);
    env.wait_for("the API", Duration::from_secs(60), |env| {
        Ok(env
            .kubectl(&["get", "--raw", "/readyz"])
            .is_ok()
            .then_some(()))
    })?;

    // A short-lived bootstrap token for the machine, as a bootstrap kubeconfig.
    let bootstrap = env.path("bootstrap.kubeconfig");
    let out = env
        .lab
        .cmd(workspace_bin("keelson")?)
        .arg("--kubeconfig")
        .arg(env.path("admin.kubeconfig"))
        .args(["token", "create", "--ttl", "1h", "--write-kubeconfig"])
        .arg(&bootstrap)
        .output()
        .context("running keelson token create")?;
    ensure!(
        out.status.success(),
        "keelson token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kubeconfig = fs::read_to_string(&bootstrap).context("reading the bootstrap kubeconfig")?;

    // The provisioner: full DHCP on the bridge, iPXE script, node image, NoCloud seed.
    fs::write(env.path("inventory.toml"), inventory(&kubeconfig))?;
    let mut provisioner = env.lab.cmd(&provisioner_bin);
    provisioner
        .args(["serve", "--interface", "br0", "--listen", SERVER_IP])
        .arg("--inventory")
        .arg(env.path("inventory.toml"))
        .arg("--lease-file")
        .arg(env.path("leases.json"))
        .arg("--assets")
        .arg(&image);
    env.provisioner = Some(Proc::spawn(
        "keelson-provisioner",
        &mut provisioner,
        &env.path("provisioner.log"),
    )?);
    env.wait_for("the provisioner", Duration::from_secs(20), |env| {
        Ok(fs::read_to_string(env.path("provisioner.log"))?
            .contains("HTTP server running")
            .then_some(()))
    })?;

    // The VM: network boot from the virtio NIC's iPXE ROM, serial console to a file.
    let mut qemu = env.lab.cmd("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-m", "1024", "-smp", "2"])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-boot",
            "n",
            "-uuid",
            VM_UUID,
        ])
        .arg("-serial")
        .arg(format!("file:{}", env.path("console.log").display()))
        .args([
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={VM_MAC}"),
        ]);
    env.vm = Some(Proc::spawn("qemu", &mut qemu, &env.path("qemu.log"))?);

    // The Node registers from the VM's address and turns Ready.
    let node = env.wait_for("Node vm1 Ready", Duration::from_secs(240), |env| {
        Ok(env
            .get(&["node", NODE])?
            .filter(|n| condition(n, "Ready").as_deref() == Some("True")))
    })?;
    println!("Node {NODE} Ready after {:.0?}", started.elapsed());
    let addresses = node["status"]["addresses"].to_string();
    ensure!(
        addresses.contains(VM_IP),
        "Node addresses {addresses} lack the VM's {VM_IP}"
    );
    ensure!(
        env.tail("console.log", 10_000)
            .contains("keelson-init: starting keelson-agent boot"),
        "the VM console does not show the node image's init:\n{}",
        env.diagnostics()
    );

    // A pod with no nodeName: the scheduler places it on the only node, which runs it.
    fs::write(env.path("pod.yaml"), pod_manifest())?;
    env.kubectl(&["apply", "-f", &env.path("pod.yaml").to_string_lossy()])?;
    let pod = env.wait_for("pod hello Running", Duration::from_secs(120), |env| {
        Ok(env
            .get(&["pod", "hello", "-n", "default"])?
            .filter(|p| p["status"]["phase"] == "Running"))
    })?;
    ensure!(
        pod["spec"]["nodeName"] == NODE,
        "pod placed on {} instead of {NODE}",
        pod["spec"]["nodeName"]
    );
    println!(
        "pod hello Running on {NODE} after {:.0?}",
        started.elapsed()
    );
    // Its log, proxied by the API server from the agent in the VM.
    let log = env.wait_for("the pod's log", Duration::from_secs(30), |env| {
        let log = env.kubectl(&["logs", "hello", "-n", "default"])?;
        Ok(log.contains("cpu.max:").then_some(log))
    })?;
    ensure!(log.contains("hello from hello"), "pod log: {log}");
    // On this pure cgroup v2 host the container has its own cgroup namespace (its cgroup is
    // the root it sees) and the limits of its spec.
    for line in [
        "cgroup: 0::/\n",
        "memory.max: 67108864\n",
        "cpu.max: 20000 100000\n",
    ] {
        ensure!(log.contains(line), "pod log lacks {line:?}: {log}");
    }
    // The memory limit holds: the kernel's OOM killer ends the container, reported as such.
    let oom = env.wait_for("pod oom to fail", Duration::from_secs(120), |env| {
        Ok(env
            .get(&["pod", "oom", "-n", "default"])?
            .filter(|p| p["status"]["phase"] == "Failed"))
    })?;
    let terminated = &oom["status"]["containerStatuses"][0]["state"]["terminated"];
    ensure!(
        terminated["reason"] == "OOMKilled" && terminated["exitCode"] == 137,
        "pod oom ended otherwise: {terminated}"
    );
    println!("whole join in {:.0?}", started.elapsed());
    Ok(())
}
