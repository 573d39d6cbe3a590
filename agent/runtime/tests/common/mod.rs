//! Shared helpers of the runtime's root tests: a busybox bundle in a temp
//! dir, a temp state root, the real binary, and guards that remove every
//! container, cgroup and directory a test made, also when it fails.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder, get_default_mounts,
};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keelson-runtime");
/// The parent of every test cgroup, in each hierarchy.
pub const CGROUP_PARENT: &str = "keelson-runtime-test";

/// Fails the test with a clear message unless we run as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "keelson-runtime tests need root (namespaces, mounts, cgroups); run them as root"
    );
}

/// A unique, per-test name: `<test>-<pid>`.
pub fn test_name(test: &str) -> String {
    format!("kt-{test}-{}", std::process::id())
}

/// What the bundle's config.json says.
#[derive(Debug, Clone)]
pub struct BundleOptions {
    pub args: Vec<String>,
    pub hostname: String,
    pub memory_limit: Option<i64>,
    pub pids_limit: Option<i64>,
    /// CPU (shares, quota µs, period µs).
    pub cpu: Option<(u64, i64, u64)>,
    pub net_ns_path: Option<PathBuf>,
    pub cgroup_ns: bool,
}

impl BundleOptions {
    pub fn sh(script: &str) -> Self {
        BundleOptions {
            args: vec!["sh".into(), "-c".into(), script.into()],
            hostname: "keelson-test".into(),
            memory_limit: None,
            pids_limit: None,
            cpu: None,
            net_ns_path: None,
            cgroup_ns: false,
        }
    }
}

/// A test's bundle, state root and cgroup; removes all of it on drop.
pub struct Fixture {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub bundle: PathBuf,
    pub root: PathBuf,
    pub cgroup_path: String,
}

fn copy_busybox(rootfs: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: apt-get install -y busybox-static"
    );
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
    fs::copy(busybox, bin.join("busybox")).expect("copy busybox");
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    assert!(list.status.success(), "busybox --list failed");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = bin.join(applet);
        if applet != "busybox" && !link.exists() {
            symlink("busybox", &link).expect("applet link");
        }
    }
    for dir in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        fs::create_dir_all(rootfs.join(dir)).expect("mkdir rootfs dir");
    }
    fs::write(rootfs.join("keelson-rootfs-marker"), "inside\n").expect("marker");
}

impl Fixture {
    /// Makes the bundle for `opts`, named after `test`.
    pub fn new(test: &str, opts: &BundleOptions) -> Self {
        require_root();
        let name = test_name(test);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .expect("tempdir");
        let bundle = dir.path().join("bundle");
        let rootfs = bundle.join("rootfs");
        copy_busybox(&rootfs);
        let root = dir.path().join("state");
        let cgroup_path = format!("{CGROUP_PARENT}/{name}");
        let fixture = Fixture {
            name,
            dir,
            bundle,
            root,
            cgroup_path,
        };
        fixture.write_config(opts);
        fixture
    }

    /// (Re)writes config.json with oci-spec's builders.
    pub fn write_config(&self, opts: &BundleOptions) {
        self.write_spec(&self.spec(opts));
    }

    /// Saves `spec` as the bundle's config.json.
    pub fn write_spec(&self, spec: &Spec) {
        spec.save(self.bundle.join("config.json"))
            .expect("save config.json");
    }

    /// The spec for `opts`, built with oci-spec's builders.
    pub fn spec(&self, opts: &BundleOptions) -> Spec {
        let caps = [
            Capability::Chown,
            Capability::DacOverride,
            Capability::Fsetid,
            Capability::Fowner,
            Capability::Mknod,
            Capability::NetRaw,
            Capability::Setgid,
            Capability::Setuid,
            Capability::Setfcap,
            Capability::Setpcap,
            Capability::NetBindService,
            Capability::SysChroot,
            Capability::Kill,
            Capability::AuditWrite,
        ]
        .into_iter()
        .collect::<std::collections::HashSet<_>>();
        let process = ProcessBuilder::default()
            .terminal(false)
            .user(
                UserBuilder::default()
                    .uid(0u32)
                    .gid(0u32)
                    .build()
                    .expect("user"),
            )
            .args(opts.args.clone())
            .env(vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                "KEELSON_TEST=1".to_string(),
            ])
            .cwd("/tmp")
            .no_new_privileges(true)
            .capabilities(
                LinuxCapabilitiesBuilder::default()
                    .bounding(caps.clone())
                    .effective(caps.clone())
                    .permitted(caps.clone())
                    .inheritable(std::collections::HashSet::new())
                    .ambient(std::collections::HashSet::new())
                    .build()
                    .expect("caps"),
            )
            .build()
            .expect("process");
        let mut namespaces = Vec::new();
        for typ in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Mount,
        ] {
            namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(typ)
                    .build()
                    .expect("ns"),
            );
        }
        let mut net = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
        if let Some(path) = &opts.net_ns_path {
            net = net.path(path.clone());
        }
        namespaces.push(net.build().expect("net ns"));
        if opts.cgroup_ns {
            namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(LinuxNamespaceType::Cgroup)
                    .build()
                    .expect("cgroup ns"),
            );
        }
        let mut resources = LinuxResourcesBuilder::default();
        if let Some(limit) = opts.memory_limit {
            resources = resources.memory(
                LinuxMemoryBuilder::default()
                    .limit(limit)
                    .swap(limit)
                    .build()
                    .expect("memory"),
            );
        }
        if let Some((shares, quota, period)) = opts.cpu {
            resources = resources.cpu(
                oci_spec::runtime::LinuxCpuBuilder::default()
                    .shares(shares)
                    .quota(quota)
                    .period(period)
                    .build()
                    .expect("cpu"),
            );
        }
        if let Some(limit) = opts.pids_limit {
            resources = resources.pids(
                LinuxPidsBuilder::default()
                    .limit(limit)
                    .build()
                    .expect("pids"),
            );
        }
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .cgroups_path(PathBuf::from(format!("/{}", self.cgroup_path)))
            .resources(resources.build().expect("resources"))
            .masked_paths(vec!["/proc/kcore".to_string(), "/proc/keys".to_string()])
            .readonly_paths(vec![
                "/proc/sys".to_string(),
                "/proc/sysrq-trigger".to_string(),
            ])
            .build()
            .expect("linux");
        SpecBuilder::default()
            .version("1.2.0")
            .root(
                RootBuilder::default()
                    .path("rootfs")
                    .readonly(false)
                    .build()
                    .expect("root"),
            )
            .process(process)
            .hostname(opts.hostname.clone())
            .mounts(get_default_mounts())
            .linux(linux)
            .build()
            .expect("spec")
    }

    /// Rewrites config.json for `opts` with the cgroup `<cgroup_path>-<suffix>`
    /// (each container needs a cgroup of its own).
    pub fn write_config_with_cgroup(&self, opts: &BundleOptions, suffix: &str) {
        let mut spec = self.spec(opts);
        let mut linux = spec.linux().clone().expect("linux");
        linux.set_cgroups_path(Some(PathBuf::from(format!(
            "/{}-{suffix}",
            self.cgroup_path
        ))));
        spec.set_linux(Some(linux));
        self.write_spec(&spec);
    }

    /// A container id for this test.
    pub fn id(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.name)
    }

    /// The runtime binary with `--root` set.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--root").arg(&self.root);
        c
    }

    /// Runs the binary with `args`, stdin/stdout/stderr captured.
    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn keelson-runtime")
    }

    /// `state <id>` parsed as JSON.
    pub fn state(&self, id: &str) -> serde_json::Value {
        let out = self.output(&["state", id]);
        assert!(
            out.status.success(),
            "state {id} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("state JSON")
    }

    /// Polls `state` until `status` or panics after `timeout`.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(id);
            if state["status"] == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never became {status}: {state}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A host path of this test's cgroup in `controller` (v1) or unified (v2).
    pub fn cgroup_dir(&self, controller: &str) -> PathBuf {
        if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
            Path::new("/sys/fs/cgroup").join(&self.cgroup_path)
        } else {
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(&self.cgroup_path)
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Containers left by a failed test: delete them through the runtime.
        if let Ok(entries) = fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let _ = self
                    .cmd()
                    .args(["delete", "--force", &id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // Then any cgroup directory of ours that is still there.
        let unified = cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode();
        let bases: Vec<PathBuf> = if unified {
            vec![PathBuf::from("/sys/fs/cgroup")]
        } else {
            [
                "cpu", "cpuacct", "devices", "freezer", "memory", "pids", "unified",
            ]
            .iter()
            .map(|c| Path::new("/sys/fs/cgroup").join(c))
            .collect()
        };
        for base in bases {
            // This test's cgroups: `<parent>/<name>` and `<parent>/<name>-*`.
            let parent = base.join(CGROUP_PARENT);
            let ours: Vec<PathBuf> = fs::read_dir(&parent)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&self.name))
                .map(|e| e.path())
                .collect();
            for dir in ours {
                if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // The shared parent goes when the last test leaves it.
            let _ = fs::remove_dir(base.join(CGROUP_PARENT));
        }
    }
}
