//! Root tests of `keelson-runtime` through the real binary, on a busybox
//! bundle: isolation, exit codes, the create/start/state/kill/delete
//! lifecycle, namespace joining, memory and pids limits.

mod common;

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use common::{BundleOptions, Fixture};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn container_is_isolated() {
    let script = "echo pid=$$; echo host=$(hostname); ls -d /proc/[0-9]* | wc -l; \
                  cat /keelson-rootfs-marker; test -e /work && echo sees-host-work; \
                  echo cwd=$(pwd); echo env=$KEELSON_TEST; ls /dev; cat /proc/1/cmdline | tr '\\0' ' '; echo; \
                  grep -c ^CapEff /proc/self/status; grep ^NoNewPrivs /proc/self/status; \
                  echo hi > /dev/null && head -c 4 /dev/zero | wc -c; readlink /proc/self/ns/pid";
    let fx = Fixture::new("isolation", &BundleOptions::sh(script));
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("iso");
    let out = fx.output(&["run", "--bundle", &bundle, &id]);
    let text = stdout(&out);
    assert!(out.status.success(), "run failed: {}\n{text}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "pid=1", "not PID 1:\n{text}");
    assert_eq!(lines[1], "host=keelson-test", "hostname:\n{text}");
    // Only the shell and the `ls` pipeline's processes: no host processes.
    let visible: usize = lines[2].trim().parse().expect("process count");
    assert!(visible <= 4, "sees {visible} processes:\n{text}");
    assert_eq!(lines[3], "inside", "rootfs marker:\n{text}");
    assert!(
        !lines.contains(&"sees-host-work"),
        "sees the host's /work:\n{text}"
    );
    assert!(text.contains("cwd=/tmp"), "cwd:\n{text}");
    assert!(text.contains("env=1"), "env:\n{text}");
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm",
    ] {
        assert!(
            text.lines().any(|l| l == dev),
            "/dev/{dev} missing:\n{text}"
        );
    }
    assert!(text.contains("sh -c"), "PID 1 is not the shell:\n{text}");
    assert!(
        text.contains("NoNewPrivs:\t1"),
        "no_new_privs not set:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.trim() == "4"),
        "/dev/zero unreadable:\n{text}"
    );
    let host_pid_ns = fs::read_link("/proc/self/ns/pid").expect("host pid ns");
    assert!(
        !text.contains(&*host_pid_ns.to_string_lossy()),
        "shares the host's PID namespace:\n{text}"
    );
    // `run` removed the container and its cgroup.
    assert!(!fx.root.join(&id).exists(), "state left behind");
    assert!(!fx.cgroup_dir("memory").exists(), "cgroup left behind");
}

#[test]
fn capabilities_are_cut_to_the_spec() {
    // CAP_SYS_ADMIN is not in the spec's set: mounting must fail inside.
    let script = "grep ^CapBnd /proc/self/status; mount -t tmpfs none /mnt 2>/dev/null && echo mounted || echo denied";
    let fx = Fixture::new("caps", &BundleOptions::sh(script));
    fs::create_dir_all(fx.bundle.join("rootfs/mnt")).expect("mkdir mnt");
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let out = fx.output(&["run", &fx.id("caps"), "--bundle", &bundle]);
    let text = stdout(&out);
    assert!(out.status.success(), "run failed: {}", stderr(&out));
    assert!(
        text.contains("denied"),
        "mount allowed without CAP_SYS_ADMIN:\n{text}"
    );
    let bnd = text
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:\t"))
        .expect("CapBnd line");
    let mask = u64::from_str_radix(bnd.trim(), 16).expect("hex mask");
    // The 14 capabilities of the spec, nothing else.
    assert_eq!(mask.count_ones(), 14, "bounding set {bnd}");
    assert_eq!(mask & (1 << 21), 0, "CAP_SYS_ADMIN kept");
}

#[test]
fn exit_codes_propagate_through_run() {
    let fx = Fixture::new("exit", &BundleOptions::sh("exit 42"));
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let status = fx
        .cmd()
        .args(["run", "--bundle", &bundle, &fx.id("42")])
        .status()
        .expect("run");
    assert_eq!(status.code(), Some(42));
    fx.write_config(&BundleOptions::sh("true"));
    let status = fx
        .cmd()
        .args(["run", "--bundle", &bundle, &fx.id("0")])
        .status()
        .expect("run");
    assert_eq!(status.code(), Some(0));
    fx.write_config(&BundleOptions::sh("exec /no/such/program"));
    let out = fx.output(&["run", "--bundle", &bundle, &fx.id("missing")]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    fx.write_config(&BundleOptions {
        args: vec!["no-such-program".into()],
        ..BundleOptions::sh("")
    });
    let out = fx.output(&["run", "--bundle", &bundle, &fx.id("notfound")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not found"),
        "unexpected error: {}",
        stderr(&out)
    );
    assert!(
        !fx.root.join(fx.id("notfound")).exists(),
        "failed create left state"
    );
}

#[test]
fn lifecycle_through_the_binary() {
    let script = "trap 'exit 7' TERM; echo started > /tmp/started; while :; do sleep 0.05; done";
    let fx = Fixture::new("lifecycle", &BundleOptions::sh(script));
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("life");
    let pid_file = fx.dir.path().join("init.pid");
    // Flags after the id.
    let status = fx
        .cmd()
        .args(["create", &id, "--bundle", &bundle, "--pid-file"])
        .arg(&pid_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("create");
    assert!(status.success(), "create failed");
    let state = fx.state(&id);
    assert_eq!(state["status"], "created", "{state}");
    assert_eq!(state["id"], id.as_str());
    assert_eq!(state["ociVersion"], "1.2.0");
    assert_eq!(state["bundle"], bundle.as_str());
    let pid = state["pid"].as_i64().expect("pid");
    let from_file: i64 = fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid number");
    assert_eq!(pid, from_file);
    // The init sits in the cgroup2 tree too (hybrid: the controller-less
    // tree at /sys/fs/cgroup/unified; pure v2: the only tree).
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("init cgroups");
    let v2_line = cgroups
        .lines()
        .find(|l| l.starts_with("0::"))
        .expect("no cgroup2 membership");
    assert_eq!(v2_line, format!("0::/{}", fx.cgroup_path), "{cgroups}");
    assert!(
        fs::read_to_string(fx.bundle.join("rootfs/tmp/started")).is_err(),
        "user process ran before start"
    );
    // Another container may not take the same (busy) cgroup.
    let out = fx.output(&["create", "--bundle", &bundle, &fx.id("same-cgroup")]);
    assert!(!out.status.success(), "shared a busy cgroup");
    assert!(
        stderr(&out).contains("already has processes"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fx.state(&id)["status"],
        "created",
        "the first container suffered"
    );
    // A second create with the same id fails.
    let out = fx.output(&["create", "--bundle", &bundle, &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    let out = fx.output(&["start", &id]);
    assert!(out.status.success(), "start: {}", stderr(&out));
    fx.wait_status(&id, "running", Duration::from_secs(5));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fx.bundle.join("rootfs/tmp/started").exists() {
        assert!(std::time::Instant::now() < deadline, "process never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    // `list` and `ps` see it.
    let out = fx.output(&["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list JSON");
    assert_eq!(list[0]["id"], id.as_str(), "{list}");
    assert_eq!(list[0]["status"], "running", "{list}");
    let out = fx.output(&["ps", "--format", "json", &id]);
    let pids: Vec<i64> = serde_json::from_slice(&out.stdout).expect("ps JSON");
    assert!(pids.contains(&pid), "{pids:?} lacks the init {pid}");
    let out = fx.output(&["ps", &id]);
    assert!(stdout(&out).starts_with("UID"), "{}", stdout(&out));
    assert!(stdout(&out).contains("sh -c trap"), "{}", stdout(&out));
    // Starting twice is refused; delete without --force too.
    assert!(!fx.output(&["start", &id]).status.success());
    let out = fx.output(&["delete", &id]);
    assert!(!out.status.success(), "deleted a running container");

    let out = fx.output(&["kill", &id, "TERM"]);
    assert!(out.status.success(), "kill: {}", stderr(&out));
    fx.wait_status(&id, "stopped", Duration::from_secs(5));
    let state = fx.state(&id);
    assert!(
        state.get("pid").is_none(),
        "stopped state has a pid: {state}"
    );
    let out = fx.output(&["kill", &id, "KILL"]);
    assert!(!out.status.success(), "killed a stopped container");

    let out = fx.output(&["delete", &id]);
    assert!(out.status.success(), "delete: {}", stderr(&out));
    assert!(!fx.root.join(&id).exists());
    assert!(!fx.cgroup_dir("pids").exists(), "cgroup left behind");
    let out = fx.output(&["state", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("container {id} does not exist")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn kill_by_number_and_force_delete() {
    let fx = Fixture::new(
        "forcedel",
        &BundleOptions::sh("while :; do sleep 0.05; done"),
    );
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let (a, b) = (fx.id("a"), fx.id("b"));
    for id in [&a, &b] {
        if id == &b {
            fx.write_config_with_cgroup(&BundleOptions::sh("while :; do sleep 0.05; done"), "b");
        }
        let status = fx
            .cmd()
            .args(["create", "--bundle", &bundle, id])
            .stdout(Stdio::null())
            .status()
            .expect("create");
        assert!(status.success());
        assert!(fx.output(&["start", id]).status.success());
        fx.wait_status(id, "running", Duration::from_secs(5));
    }
    assert!(fx.output(&["kill", &a, "9"]).status.success());
    // A created (not started) container is deleted without --force.
    fx.write_config_with_cgroup(&BundleOptions::sh("while :; do sleep 0.05; done"), "c");
    let c = fx.id("c");
    let status = fx
        .cmd()
        .args(["create", "--bundle", &bundle, &c])
        .stdout(Stdio::null())
        .status()
        .expect("create");
    assert!(status.success());
    let init = fx.state(&c)["pid"].as_i64().expect("pid");
    let out = fx.output(&["delete", &c]);
    assert!(out.status.success(), "delete created: {}", stderr(&out));
    assert!(!fx.root.join(&c).exists());
    let alive = fs::read_to_string(format!("/proc/{init}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false);
    assert!(!alive, "init {init} of the deleted container still runs");
    fx.wait_status(&a, "stopped", Duration::from_secs(5));
    assert!(fx.output(&["delete", &a]).status.success());
    let out = fx.output(&["delete", "--force", &b]);
    assert!(out.status.success(), "delete --force: {}", stderr(&out));
    assert!(!fx.root.join(&b).exists());
}

#[test]
fn missing_container_does_not_exist() {
    let fx = Fixture::new("missing", &BundleOptions::sh("true"));
    for verb in [&["state"][..], &["start"], &["kill"], &["delete"]] {
        let mut args = verb.to_vec();
        args.push("nosuch");
        let out = fx.output(&args);
        assert!(!out.status.success(), "{verb:?} succeeded");
        assert!(
            stderr(&out).contains("container nosuch does not exist"),
            "{verb:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn joins_a_network_namespace_by_path() {
    require_unshare();
    let mut holder = std::process::Command::new("unshare")
        .args(["--net", "sleep", "30"])
        .spawn()
        .expect("unshare --net");
    let ns = format!("/proc/{}/ns/net", holder.id());
    // Wait until `unshare` has switched namespaces.
    let own = fs::read_link("/proc/self/ns/net").expect("own net ns");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let target = loop {
        let t = fs::read_link(&ns).expect("holder net ns");
        if t != own || std::time::Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let fx = Fixture::new(
        "netns",
        &BundleOptions {
            net_ns_path: Some(ns.clone().into()),
            ..BundleOptions::sh("readlink /proc/self/ns/net")
        },
    );
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let out = fx.output(&["run", "--bundle", &bundle, &fx.id("net")]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(out.status.success(), "run: {}", stderr(&out));
    assert_ne!(target, own, "unshare did not make a namespace");
    assert_eq!(stdout(&out).trim(), target.to_string_lossy());
}

fn require_unshare() {
    assert!(
        std::path::Path::new("/usr/bin/unshare").exists(),
        "util-linux's unshare is needed for this test"
    );
}

#[test]
fn memory_limit_kills_with_oom() {
    let fx = Fixture::new(
        "oom",
        &BundleOptions {
            memory_limit: Some(32 << 20),
            ..BundleOptions::sh("dd if=/dev/zero of=/dev/null bs=128M count=1")
        },
    );
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("oom");
    let out = fx.output(&["run", "--keep", "--bundle", &bundle, &id]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "not OOM-killed: {}",
        stderr(&out)
    );
    let dir = fx.cgroup_dir("memory");
    let (file, limit_file) = if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
        ("memory.events", "memory.max")
    } else {
        ("memory.oom_control", "memory.limit_in_bytes")
    };
    let limit = fs::read_to_string(dir.join(limit_file)).expect("memory limit");
    assert_eq!(limit.trim(), (32u64 << 20).to_string());
    let events = fs::read_to_string(dir.join(file)).expect("oom counters");
    let kills: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .expect("oom_kill counter");
    assert!(kills >= 1, "no OOM kill recorded: {events}");
    assert!(fx.output(&["delete", &id]).status.success());
}

#[test]
fn pids_limit_holds() {
    // busybox sh gives up at the first refused fork: fork from a child
    // shell, then count from the parent with a glob (no fork needed).
    let script = "sh -c 'i=0; while [ $i -lt 30 ]; do sleep 2 & i=$((i+1)); done' 2>/dev/null; \
                  set -- /proc/[0-9]*; echo $#";
    let fx = Fixture::new(
        "pids",
        &BundleOptions {
            pids_limit: Some(10),
            cpu: Some((512, 50_000, 100_000)),
            ..BundleOptions::sh(script)
        },
    );
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("pids");
    let out = fx.output(&["run", "--keep", "--bundle", &bundle, &id]);
    let dir = fx.cgroup_dir("pids");
    let max = fs::read_to_string(dir.join("pids.max")).expect("pids.max");
    assert_eq!(max.trim(), "10");
    // The CPU limits of the same spec (v1 files; v2 has cpu.max/cpu.weight).
    if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
        let cpu_max = fs::read_to_string(dir.join("cpu.max")).expect("cpu.max");
        assert_eq!(cpu_max.trim(), "50000 100000");
        let weight = fs::read_to_string(dir.join("cpu.weight")).expect("cpu.weight");
        assert_eq!(weight.trim(), "20");
    } else {
        let cpu = fx.cgroup_dir("cpu");
        let read = |f: &str| fs::read_to_string(cpu.join(f)).expect("cpu file");
        assert_eq!(read("cpu.shares").trim(), "512");
        assert_eq!(read("cpu.cfs_quota_us").trim(), "50000");
        assert_eq!(read("cpu.cfs_period_us").trim(), "100000");
    }
    let events = fs::read_to_string(dir.join("pids.events")).expect("pids.events");
    let refused: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("max "))
        .and_then(|v| v.trim().parse().ok())
        .expect("max counter");
    assert!(refused >= 1, "no fork refused: {events}\n{}", stderr(&out));
    let seen: usize = stdout(&out)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no count: {}\n{}", stdout(&out), stderr(&out)));
    assert!(seen <= 10, "saw {seen} processes under a limit of 10");
    assert!(seen >= 5, "only {seen} processes: the forks did not run");
    assert!(fx.output(&["delete", &id]).status.success());
}

#[test]
fn cgroup_namespace_hides_the_host_tree() {
    let fx = Fixture::new(
        "cgns",
        &BundleOptions {
            cgroup_ns: true,
            ..BundleOptions::sh(
                "cat /proc/self/cgroup; ls /sys/fs/cgroup; \
                 cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max",
            )
        },
    );
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let out = fx.output(&["run", "--bundle", &bundle, &fx.id("cg")]);
    let text = stdout(&out);
    assert!(out.status.success(), "run: {}", stderr(&out));
    assert!(
        !text.contains(common::CGROUP_PARENT),
        "cgroup path visible:\n{text}"
    );
    let memory_line = text
        .lines()
        .find(|l| l.contains(":memory:"))
        .unwrap_or("0::/");
    assert!(
        memory_line.ends_with(":/"),
        "not at the namespace root:\n{text}"
    );
    // The container's own cgroup is mounted at /sys/fs/cgroup: per
    // controller on v1, the unified tree on v2.
    let lines: Vec<&str> = text.lines().collect();
    if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
        assert!(lines.contains(&"cgroup.procs"), "{text}");
    } else {
        for controller in ["cpu", "cpuacct", "devices", "memory", "pids"] {
            assert!(lines.contains(&controller), "{controller} missing:\n{text}");
        }
    }
    assert_eq!(lines.last(), Some(&"max"), "pids.max not readable:\n{text}");
}

#[test]
fn bind_and_overlay_mounts_from_the_spec() {
    use oci_spec::runtime::MountBuilder;
    let script = "cat /data/hello; echo x > /data/new 2>/dev/null && echo data-writable || echo data-ro; \
                  cat /merged/lower.txt; echo up > /merged/written && echo overlay-writable";
    let fx = Fixture::new("mounts", &BundleOptions::sh(script));
    let host = fx.dir.path().join("host-data");
    let (lower, upper, work) = (
        fx.dir.path().join("lower"),
        fx.dir.path().join("upper"),
        fx.dir.path().join("work"),
    );
    for d in [&host, &lower, &upper, &work] {
        fs::create_dir_all(d).expect("mkdir");
    }
    fs::write(host.join("hello"), "from-host\n").expect("write");
    fs::write(lower.join("lower.txt"), "from-lower\n").expect("write");
    let mut spec = fx.spec(&BundleOptions::sh(script));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(
        MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source(&host)
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .expect("bind mount"),
    );
    mounts.push(
        MountBuilder::default()
            .destination("/merged")
            .typ("overlay")
            .source("overlay")
            .options(vec![
                format!("lowerdir={}", lower.display()),
                format!("upperdir={}", upper.display()),
                format!("workdir={}", work.display()),
            ])
            .build()
            .expect("overlay mount"),
    );
    spec.set_mounts(Some(mounts));
    fx.write_spec(&spec);
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let out = fx.output(&["run", "--bundle", &bundle, &fx.id("m")]);
    let text = stdout(&out);
    assert!(out.status.success(), "run: {}\n{text}", stderr(&out));
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["from-host", "data-ro", "from-lower", "overlay-writable"],
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fs::read_to_string(upper.join("written")).expect("upper layer"),
        "up\n"
    );
    assert!(!host.join("new").exists(), "wrote through a read-only bind");
    // Nothing of the container's mounts is visible on the host.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mountinfo.contains(&*fx.dir.path().to_string_lossy()),
        "container mounts leaked to the host"
    );
}

#[test]
fn user_rlimits_readonly_root_and_no_pivot() {
    use oci_spec::runtime::{PosixRlimitBuilder, PosixRlimitType, UserBuilder};
    let script = "id -u; id -g; id -G; ulimit -n; grep ^CapEff /proc/self/status; \
                  touch /newfile 2>/dev/null && echo root-writable || echo root-ro; \
                  cat /proc/sys/kernel/shmmni";
    let fx = Fixture::new("user", &BundleOptions::sh(script));
    let mut spec = fx.spec(&BundleOptions::sh(script));
    let mut process = spec.process().clone().expect("process");
    process.set_user(
        UserBuilder::default()
            .uid(1000u32)
            .gid(1001u32)
            .additional_gids(vec![1002u32, 1003])
            .build()
            .expect("user"),
    );
    process.set_rlimits(Some(vec![
        PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(321u64)
            .hard(654u64)
            .build()
            .expect("rlimit"),
    ]));
    let mut caps = process.capabilities().clone().expect("capabilities");
    let bind: std::collections::HashSet<_> = [oci_spec::runtime::Capability::NetBindService]
        .into_iter()
        .collect();
    caps.set_inheritable(Some(bind.clone()));
    caps.set_ambient(Some(bind));
    process.set_capabilities(Some(caps));
    spec.set_process(Some(process));
    let mut linux = spec.linux().clone().expect("linux");
    linux.set_sysctl(Some(
        [("kernel.shmmni".to_string(), "1234".to_string())]
            .into_iter()
            .collect(),
    ));
    spec.set_linux(Some(linux));
    let mut root = spec.root().clone().expect("root");
    root.set_readonly(Some(true));
    spec.set_root(Some(root));
    fx.write_spec(&spec);
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let out = fx.output(&["run", "--no-pivot", "--bundle", &bundle, &fx.id("u")]);
    let text = stdout(&out);
    assert!(out.status.success(), "run: {}\n{text}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1001");
    assert_eq!(lines[2], "1001 1002 1003");
    assert_eq!(lines[3], "321");
    // A non-root user keeps only its ambient capability (NET_BIND_SERVICE).
    assert_eq!(lines[4], "CapEff:\t0000000000000400");
    assert_eq!(lines[5], "root-ro");
    // sysctl of the container's own IPC namespace.
    assert_eq!(lines[6], "1234");
}

#[test]
fn terminal_goes_to_the_console_socket() {
    use std::io::{IoSliceMut, Read};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::net::UnixListener;

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

    let script = "test -t 0 && test -t 1 && echo on-a-tty; tty; exit 5";
    let fx = Fixture::new("console", &BundleOptions::sh(script));
    let mut spec = fx.spec(&BundleOptions::sh(script));
    let mut process = spec.process().clone().expect("process");
    process.set_terminal(Some(true));
    spec.set_process(Some(process));
    fx.write_spec(&spec);
    let socket = fx.dir.path().join("console.sock");
    let listener = UnixListener::bind(&socket).expect("bind console socket");
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("tty");
    let mut create = fx
        .cmd()
        .args(["create", "--bundle", &bundle, "--console-socket"])
        .arg(&socket)
        .arg(&id)
        .stdout(Stdio::null())
        .spawn()
        .expect("create");
    let (conn, _) = listener.accept().expect("accept console connection");
    let mut buf = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&conn),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .expect("recvmsg");
    let mut master: Option<OwnedFd> = None;
    for c in msg.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just gave us this descriptor.
            master = fds.first().map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    let master = master.expect("no pty master received");
    assert!(create.wait().expect("create").success(), "create failed");
    assert!(fx.output(&["start", &id]).status.success(), "start failed");
    let mut output = String::new();
    let mut file = fs::File::from(master);
    let mut chunk = [0u8; 256];
    // Read until the container exits and the pty hangs up (EIO).
    while let Ok(n) = file.read(&mut chunk) {
        if n == 0 {
            break;
        }
        output.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(output.contains("on-a-tty"), "not a terminal: {output:?}");
    assert!(output.contains("/dev/pts/0"), "tty name: {output:?}");
    fx.wait_status(&id, "stopped", Duration::from_secs(5));
    assert!(fx.output(&["delete", &id]).status.success());
}

#[test]
fn device_access_is_limited_by_the_cgroup() {
    // The spec grants CAP_MKNOD, so creating a node works, but on cgroup v1
    // the devices controller refuses to open devices not on the allow list.
    let script = "mknod /tmp/loop b 7 0 && echo made; \
                  head -c 1 /tmp/loop > /dev/null 2>/tmp/err; cat /tmp/err; \
                  head -c 1 /dev/urandom | wc -c";
    let fx = Fixture::new("devices", &BundleOptions::sh(script));
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let out = fx.output(&["run", "--bundle", &bundle, &fx.id("dev")]);
    let text = stdout(&out);
    assert!(out.status.success(), "run: {}\n{text}", stderr(&out));
    if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
        panic!("device rules are not enforced on cgroup v2 yet:\n{text}");
    }
    assert!(text.contains("made"), "mknod failed:\n{text}");
    assert!(
        text.contains("Operation not permitted"),
        "opened a denied block device:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.trim() == "1"),
        "urandom unreadable:\n{text}"
    );
}

#[test]
fn run_forwards_signals_to_the_container() {
    let script = "trap 'echo got-term; exit 9' TERM; echo ready > /tmp/ready; \
                  while :; do sleep 0.05; done";
    let fx = Fixture::new("forward", &BundleOptions::sh(script));
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let child = fx
        .cmd()
        .args(["run", "--bundle", &bundle, &fx.id("fwd")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fx.bundle.join("rootfs/tmp/ready").exists() {
        assert!(std::time::Instant::now() < deadline, "container never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal run");
    let out = child.wait_with_output().expect("wait run");
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "got-term");
}

#[test]
fn json_log_lines_carry_the_error_like_runc() {
    let fx = Fixture::new("jsonlog", &BundleOptions::sh("true"));
    let log = fx.dir.path().join("log.json");
    let out = fx
        .cmd()
        .arg("--log")
        .arg(&log)
        .args(["--log-format", "json", "start", "nosuch"])
        .output()
        .expect("start");
    assert!(!out.status.success());
    let text = fs::read_to_string(&log).expect("log file");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a log line")).expect("JSON log line");
    assert_eq!(last["level"], "error", "{text}");
    assert!(
        last["msg"]
            .as_str()
            .is_some_and(|m| m.contains("container nosuch does not exist")),
        "{text}"
    );
    assert!(last["time"].is_string(), "{text}");
}

/// A private containerd (own root, state and socket in the test's temp
/// dir, CRI plugin off); killed on drop. Its runc shim (containerd 1.6)
/// still makes its socket directory `/run/containerd/s`; the shim removes
/// its own socket when it exits.
struct Containerd {
    child: std::process::Child,
    socket: std::path::PathBuf,
    /// Whether `/run/containerd` is ours to remove (it did not exist).
    made_run_dir: bool,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.made_run_dir {
            // Only empty directories go; a shim still running keeps them.
            let _ = fs::remove_dir("/run/containerd/s");
            let _ = fs::remove_dir("/run/containerd/fifo");
            let _ = fs::remove_dir("/run/containerd");
        }
    }
}

impl Containerd {
    fn start(dir: &std::path::Path) -> Self {
        for bin in ["containerd", "ctr", "containerd-shim-runc-v2"] {
            assert!(
                std::path::Path::new("/usr/bin").join(bin).exists(),
                "{bin} is missing: apt-get install -y containerd"
            );
        }
        let made_run_dir = !std::path::Path::new("/run/containerd").exists();
        let socket = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root = dir.join("containerd-root").display(),
                state = dir.join("containerd-state").display(),
                sock = socket.display(),
            ),
        )
        .expect("containerd config");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let child = std::process::Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let me = Containerd {
            child,
            socket,
            made_run_dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !me.socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    fn ctr(&self) -> std::process::Command {
        let mut c = std::process::Command::new("ctr");
        c.arg("--address").arg(&self.socket).stdin(Stdio::null());
        c
    }
}

#[test]
fn containerd_runc_shim_drives_the_runtime() {
    let fx = Fixture::new("containerd", &BundleOptions::sh("true"));
    let daemon = Containerd::start(fx.dir.path());
    let rootfs = fx.bundle.join("rootfs");
    let cgroup = format!("/{}", fx.cgroup_path);
    let run_args = |id: &str| {
        let mut c = daemon.ctr();
        c.args(["run", "--rootfs", "--runtime", "io.containerd.runc.v2"])
            .arg("--fifo-dir")
            .arg(fx.dir.path().join("fifos"))
            .arg("--runc-binary")
            .arg(common::BIN)
            .arg("--runc-root")
            .arg(&fx.root)
            .arg("--cgroup")
            .arg(&cgroup);
        (c, id.to_owned())
    };

    // Foreground: create, start, wait, exit code, delete — all by the shim.
    let (mut c, id) = run_args(&fx.id("fg"));
    let out = c
        .arg("--rm")
        .arg(&rootfs)
        .arg(&id)
        .args(["sh", "-c", "echo in-pid=$$; exit 7"])
        .output()
        .expect("ctr run");
    assert_eq!(out.status.code(), Some(7), "ctr run: {}", stderr(&out));
    assert!(stdout(&out).contains("in-pid=1"), "{}", stdout(&out));

    // Detached: state through `task ls`, kill, delete.
    let (mut c, id) = run_args(&fx.id("bg"));
    let out = c
        .arg("-d")
        .arg(&rootfs)
        .arg(&id)
        .args(["sh", "-c", "while :; do sleep 0.05; done"])
        .output()
        .expect("ctr run -d");
    assert!(out.status.success(), "ctr run -d: {}", stderr(&out));
    let tasks = daemon.ctr().args(["task", "ls"]).output().expect("task ls");
    assert!(
        stdout(&tasks)
            .lines()
            .any(|l| l.contains(&id) && l.contains("RUNNING")),
        "{}",
        stdout(&tasks)
    );
    // `ctr task ps` goes through `ps --format json`.
    let ps = daemon
        .ctr()
        .args(["task", "ps", &id])
        .output()
        .expect("task ps");
    assert!(ps.status.success(), "task ps: {}", stderr(&ps));
    let task_pid = stdout(&tasks)
        .lines()
        .find(|l| l.contains(&id))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("task pid")
        .to_owned();
    assert!(stdout(&ps).contains(&task_pid), "{}", stdout(&ps));
    // `ctr task pause`/`resume` go through `pause`/`resume`.
    for (verb, shown) in [("pause", "PAUSED"), ("resume", "RUNNING")] {
        let out = daemon.ctr().args(["task", verb, &id]).output().expect(verb);
        assert!(out.status.success(), "task {verb}: {}", stderr(&out));
        let tasks = daemon.ctr().args(["task", "ls"]).output().expect("task ls");
        assert!(
            stdout(&tasks)
                .lines()
                .any(|l| l.contains(&id) && l.contains(shown)),
            "after {verb}: {}",
            stdout(&tasks)
        );
    }
    // `ctr task exec` goes through `exec --process … --detach`.
    let out = daemon
        .ctr()
        .args([
            "task",
            "exec",
            "--exec-id",
            "e1",
            "--fifo-dir",
            &fx.dir.path().join("fifos").to_string_lossy(),
            &id,
            "sh",
            "-c",
            "echo exec-ok; exit 4",
        ])
        .output()
        .expect("task exec");
    assert_eq!(out.status.code(), Some(4), "task exec: {}", stderr(&out));
    assert!(stdout(&out).contains("exec-ok"), "{}", stdout(&out));
    let out = daemon
        .ctr()
        .args(["task", "kill", "-s", "SIGKILL", &id])
        .output()
        .expect("task kill");
    assert!(out.status.success(), "task kill: {}", stderr(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = daemon.ctr().args(["task", "ls"]).output().expect("task ls");
        if stdout(&tasks)
            .lines()
            .any(|l| l.contains(&id) && l.contains("STOPPED"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", stdout(&tasks));
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = daemon
        .ctr()
        .args(["task", "rm", &id])
        .output()
        .expect("task rm");
    assert!(out.status.success(), "task rm: {}", stderr(&out));
    let out = daemon
        .ctr()
        .args(["container", "rm", &id])
        .output()
        .expect("container rm");
    assert!(out.status.success(), "container rm: {}", stderr(&out));
    assert!(!fx.root.join(&id).exists(), "state left behind");
    assert!(!fx.cgroup_dir("memory").exists(), "cgroup left behind");
}

#[test]
fn lifecycle_hooks_get_the_state() {
    use oci_spec::runtime::{Hook, HookBuilder, HooksBuilder};
    let fx = Fixture::new("hooks", &BundleOptions::sh("sleep 0.2"));
    let out = |name: &str| fx.dir.path().join(format!("{name}.json"));
    let writer = |target: &std::path::Path| -> Hook {
        HookBuilder::default()
            .path("/bin/sh")
            .args(vec![
                "sh".to_string(),
                "-c".to_string(),
                format!("cat > {}", target.display()),
            ])
            .env(vec!["PATH=/usr/bin:/bin".to_string()])
            .timeout(10i64)
            .build()
            .expect("hook")
    };
    let mut spec = fx.spec(&BundleOptions::sh("sleep 0.2"));
    spec.set_hooks(Some(
        HooksBuilder::default()
            .create_runtime(vec![writer(&out("create-runtime"))])
            .create_container(vec![writer(&out("create-container"))])
            // Runs inside the container: its /bin/sh, its /tmp.
            .start_container(vec![writer(std::path::Path::new(
                "/tmp/start-container.json",
            ))])
            .poststart(vec![writer(&out("poststart"))])
            .poststop(vec![writer(&out("poststop"))])
            .build()
            .expect("hooks"),
    ));
    fx.write_spec(&spec);
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("h");
    let run = fx.output(&["run", "--bundle", &bundle, &id]);
    assert!(run.status.success(), "run: {}", stderr(&run));
    let read = |path: std::path::PathBuf| -> serde_json::Value {
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("hook output {}: {e}", path.display()));
        serde_json::from_str(&text).expect("hook state JSON")
    };
    let create_runtime = read(out("create-runtime"));
    let create_container = read(out("create-container"));
    let start_container = read(fx.bundle.join("rootfs/tmp/start-container.json"));
    let poststart = read(out("poststart"));
    let poststop = read(out("poststop"));
    for state in [
        &create_runtime,
        &create_container,
        &start_container,
        &poststart,
        &poststop,
    ] {
        assert_eq!(state["id"], id.as_str(), "{state}");
        assert_eq!(state["bundle"], bundle.as_str(), "{state}");
    }
    assert_eq!(create_runtime["status"], "creating");
    assert_eq!(poststart["status"], "running");
    assert_eq!(poststop["status"], "stopped");
    let pid = create_runtime["pid"].as_i64().expect("pid");
    assert!(pid > 1, "{create_runtime}");
    assert_eq!(create_container["pid"].as_i64(), Some(pid));
    assert_eq!(poststart["pid"].as_i64(), Some(pid));

    // A failing createRuntime hook fails the creation and leaves nothing.
    let mut spec = fx.spec(&BundleOptions::sh("true"));
    spec.set_hooks(Some(
        HooksBuilder::default()
            .create_runtime(vec![
                HookBuilder::default()
                    .path("/bin/false")
                    .build()
                    .expect("hook"),
            ])
            .build()
            .expect("hooks"),
    ));
    fx.write_spec(&spec);
    let id = fx.id("bad");
    let run = fx.output(&["run", "--bundle", &bundle, &id]);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("hook /bin/false failed"),
        "{}",
        stderr(&run)
    );
    assert!(
        !fx.root.join(&id).exists(),
        "state left after a failed hook"
    );
    assert!(
        !fx.cgroup_dir("memory").exists(),
        "cgroup left after a failed hook"
    );
}

#[test]
fn exec_runs_in_the_container() {
    let script = "echo inside > /tmp/marker; while :; do sleep 0.05; done";
    let fx = Fixture::new("exec", &BundleOptions::sh(script));
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("x");
    let status = fx
        .cmd()
        .args(["create", "--bundle", &bundle, &id])
        .stdout(Stdio::null())
        .status()
        .expect("create");
    assert!(status.success());
    // Not running yet: exec is refused.
    let out = fx.output(&["exec", &id, "true"]);
    assert!(!out.status.success(), "exec into a created container");
    assert!(fx.output(&["start", &id]).status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fx.bundle.join("rootfs/tmp/marker").exists() {
        assert!(std::time::Instant::now() < deadline, "container never ran");
        std::thread::sleep(Duration::from_millis(20));
    }

    let out = fx.output(&[
        "exec",
        "--env",
        "EXTRA=yes",
        &id,
        "sh",
        "-c",
        "hostname; cat /tmp/marker; cat /proc/1/cmdline | tr '\\0' ' '; echo; \
         echo extra=$EXTRA; echo cwd=$(pwd); exit 6",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(6), "{}\n{text}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "keelson-test", "{text}");
    assert_eq!(lines[1], "inside", "{text}");
    assert!(lines[2].starts_with("sh -c echo inside"), "{text}");
    assert_eq!(lines[3], "extra=yes", "{text}");
    assert_eq!(lines[4], "cwd=/tmp", "{text}");

    let out = fx.output(&[
        "exec",
        "--user",
        "1000:1001",
        "--cwd",
        "/",
        &id,
        "sh",
        "-c",
        "id -u; id -g; pwd",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        ["1000", "1001", "/"]
    );

    let pid_file = fx.dir.path().join("exec.pid");
    let out = fx
        .cmd()
        .args(["exec", "--detach", "--pid-file"])
        .arg(&pid_file)
        .args([&id, "sleep", "30"])
        // The detached process keeps what it inherits: no pipes here.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("exec -d");
    assert!(out.success(), "exec --detach failed");
    let pid: i64 = fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let out = fx.output(&["ps", "--format", "json", &id]);
    let pids: Vec<i64> = serde_json::from_slice(&out.stdout).expect("ps JSON");
    assert!(
        pids.contains(&pid),
        "exec'd {pid} not in the cgroup: {pids:?}"
    );

    let out = fx.output(&["exec", &id, "no-such-program"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let out = fx.output(&["delete", "--force", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!fx.cgroup_dir("pids").exists(), "cgroup left behind");
}

#[test]
fn pause_resume_and_update() {
    let script = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.01; done";
    let fx = Fixture::new("pause", &BundleOptions::sh(script));
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("p");
    let status = fx
        .cmd()
        .args(["create", "--bundle", &bundle, &id])
        .stdout(Stdio::null())
        .status()
        .expect("create");
    assert!(status.success());
    assert!(fx.output(&["start", &id]).status.success());
    let count_file = fx.bundle.join("rootfs/tmp/count");
    let count = || -> u64 {
        fs::read_to_string(&count_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count() < 3 {
        assert!(std::time::Instant::now() < deadline, "counter never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = fx.output(&["pause", &id]);
    assert!(out.status.success(), "pause: {}", stderr(&out));
    assert_eq!(fx.state(&id)["status"], "paused");
    let frozen_at = count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), frozen_at, "counted while paused");
    assert!(!fx.output(&["pause", &id]).status.success(), "paused twice");
    assert!(
        !fx.output(&["exec", &id, "true"]).status.success(),
        "exec while paused"
    );

    let out = fx.output(&["resume", &id]);
    assert!(out.status.success(), "resume: {}", stderr(&out));
    assert_eq!(fx.state(&id)["status"], "running");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count() <= frozen_at {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress after resume"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // New limits for the live container, from flags and from JSON on stdin.
    let out = fx.output(&["update", "--pids-limit", "42", "--memory", "67108864", &id]);
    assert!(out.status.success(), "update: {}", stderr(&out));
    let pids_max = fs::read_to_string(fx.cgroup_dir("pids").join("pids.max")).expect("pids.max");
    assert_eq!(pids_max.trim(), "42");
    let limit_file = if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    let limit = fs::read_to_string(fx.cgroup_dir("memory").join(limit_file)).expect("limit");
    assert_eq!(limit.trim(), "67108864");
    let mut update = fx
        .cmd()
        .args(["update", "--resources", "-", &id])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("update -r -");
    {
        use std::io::Write;
        let mut stdin = update.stdin.take().expect("stdin");
        stdin
            .write_all(br#"{"pids":{"limit":43}}"#)
            .expect("write resources");
    }
    let out = update.wait_with_output().expect("update");
    assert!(out.status.success(), "update -r -: {}", stderr(&out));
    let pids_max = fs::read_to_string(fx.cgroup_dir("pids").join("pids.max")).expect("pids.max");
    assert_eq!(pids_max.trim(), "43");
    // A paused container is deleted with --force.
    assert!(fx.output(&["pause", &id]).status.success());
    let out = fx.output(&["delete", "--force", &id]);
    assert!(out.status.success(), "delete paused: {}", stderr(&out));
    assert!(!fx.root.join(&id).exists());
    assert!(!fx.cgroup_dir("pids").exists(), "cgroup left behind");
}

/// The runtime is a Rust program (it ignores SIGPIPE), and may itself be started with SIGINT
/// and SIGQUIT ignored (a background job of a shell): the container's processes, from `run` and
/// from `exec`, start with every signal at its default and none blocked, as under runc/crun.
/// With SIGPIPE ignored, `yes | head` would leave `yes` failing with EPIPE instead of dying.
#[test]
fn container_processes_start_with_default_signals() {
    let check = "grep -E '^Sig(Ign|Blk)' /proc/self/status; \
                 (yes; echo yes-exit=$? >&2) | head -c 2 >/dev/null";
    let fx = Fixture::new("signals", &BundleOptions::sh(check));
    let bundle = fx.bundle.to_string_lossy().into_owned();
    let id = fx.id("run");
    let mut cmd = fx.cmd();
    cmd.args(["run", "--bundle", &bundle, &id]);
    // SAFETY: signal(2) between fork and exec of the runtime only.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().expect("run");
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "run failed: {err}\n{text}");
    assert!(text.contains("SigIgn:\t0000000000000000"), "{text}");
    assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    // 128 + SIGPIPE: killed by the signal, not an EPIPE error.
    assert!(err.contains("yes-exit=141"), "{err}");

    fx.write_config(&BundleOptions::sh("while :; do sleep 0.05; done"));
    let id = fx.id("exec");
    let status = fx
        .cmd()
        .args(["run", "--detach", "--bundle", &bundle, &id])
        // The detached container keeps what it inherits: no pipes here.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run --detach");
    assert!(status.success());
    fx.wait_status(&id, "running", Duration::from_secs(5));
    let out = fx.output(&["exec", &id, "sh", "-c", check]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "exec failed: {err}\n{text}");
    assert!(text.contains("SigIgn:\t0000000000000000"), "{text}");
    assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    assert!(err.contains("yes-exit=141"), "{err}");
    let _ = fx.output(&["kill", &id, "KILL"]);
    fx.wait_status(&id, "stopped", Duration::from_secs(5));
    assert!(fx.output(&["delete", &id]).status.success());
}
