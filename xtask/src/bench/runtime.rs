//! `cargo xtask bench runtime`: keelson-runtime against runc (and crun, when installed) on one
//! OCI bundle — Debian's static busybox running `true`, with the spec `runc spec` writes (new
//! PID, mount, network, UTS and IPC namespaces, a cgroup). Each run is the whole container
//! lifecycle as a shim drives it: `run` (create, start, wait for the exit), then `delete`.
//! Prints p50/p99 per runtime, runs per second, and the Keelson/runc ratios; JSON goes to
//! `<target>/bench/runtime.json`.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd::{cargo, probe, run as run_cmd, step};

/// One runtime's results.
struct Measured {
    name: String,
    runs: usize,
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1);
    sorted.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The bundle: busybox's `true` in a root of its own, config from `runc spec`.
fn bundle(dir: &Path) -> Result<()> {
    let bin = dir.join("rootfs/bin");
    fs::create_dir_all(&bin)?;
    fs::copy("/bin/busybox", bin.join("busybox"))
        .context("copying /bin/busybox (apt-get install busybox-static)")?;
    for applet in ["true", "sh"] {
        symlink("busybox", bin.join(applet))?;
    }
    run_cmd(Command::new("runc").arg("spec").current_dir(dir))?;
    let config = fs::read_to_string(dir.join("config.json"))?;
    ensure!(
        config.contains("\"terminal\": true") && config.contains("\"sh\""),
        "unexpected `runc spec` output"
    );
    let config = config
        .replace("\"terminal\": true", "\"terminal\": false")
        .replace("\"sh\"", "\"true\"");
    fs::write(dir.join("config.json"), config)?;
    Ok(())
}

fn lifecycle(binary: &Path, root: &Path, bundle: &Path, id: &str) -> Result<Duration> {
    let started = Instant::now();
    let out = Command::new(binary)
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "{} run {id}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // `run` removes the container after its exit in runc and keelson-runtime alike; a
    // forced delete is what a shim sends anyway.
    let _ = Command::new(binary)
        .arg("--root")
        .arg(root)
        .args(["delete", "--force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    Ok(started.elapsed())
}

fn measure(name: &str, binary: &Path, work: &Path, runs: usize) -> Result<Measured> {
    let root = work.join(format!("state-{name}"));
    fs::create_dir_all(&root)?;
    let bundle = work.join("bundle");
    for i in 0..5 {
        lifecycle(binary, &root, &bundle, &format!("warm-{i}"))?;
    }
    let started = Instant::now();
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        samples.push(lifecycle(binary, &root, &bundle, &format!("bench-{i}"))?);
    }
    let wall = started.elapsed();
    samples.sort_unstable();
    Ok(Measured {
        name: name.to_owned(),
        runs,
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        per_second: runs as f64 / wall.as_secs_f64(),
    })
}

/// Build and run the runtime benchmark; `extra` may hold `--runs N` (default 200).
///
/// # Errors
/// runc is missing, the build fails or a container does not run.
pub fn run(extra: &[String]) -> Result<()> {
    let runs = match extra {
        [flag, n] if flag == "--runs" => n.parse().context("--runs N")?,
        [] => 200,
        other => bail!("unknown arguments {other:?} (expected: --runs N)"),
    };
    let Some(runc) = probe(Command::new("which").arg("runc")) else {
        bail!("runc is not installed: run `cargo xtask setup` (Debian package runc)");
    };
    step("build keelson-runtime (release)");
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "keelson-runtime",
        "--bin",
        "keelson-runtime",
    ]))?;
    let keelson = super::target_dir().join("release/keelson-runtime");
    let out_dir = super::target_dir().join("bench");
    let work = out_dir.join("runtime-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("bundle"))?;
    bundle(&work.join("bundle"))?;

    let mut runtimes: Vec<(&str, PathBuf)> = vec![
        ("keelson-runtime", keelson),
        ("runc", PathBuf::from(runc.trim())),
    ];
    if let Some(crun) = probe(Command::new("which").arg("crun")) {
        runtimes.push(("crun", PathBuf::from(crun.trim())));
    }
    step(&format!(
        "bench runtime: {runs} container lifecycles (run + delete) per runtime"
    ));
    let mut results = Vec::new();
    for (name, binary) in &runtimes {
        results.push(measure(name, binary, &work, runs)?);
    }
    let _ = fs::remove_dir_all(&work);
    // keelson-runtime's default cgroup parent (`keelson/` in each hierarchy) stays behind
    // empty; rmdir only removes it if nothing else uses it.
    for hierarchy in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = fs::remove_dir(hierarchy.path().join("keelson"));
    }

    println!(
        "{:<16} {:>6} {:>9} {:>9} {:>10}",
        "runtime", "runs", "p50 ms", "p99 ms", "runs/s"
    );
    for m in &results {
        println!(
            "{:<16} {:>6} {:>9.2} {:>9.2} {:>10.1}",
            m.name,
            m.runs,
            ms(m.p50),
            ms(m.p99),
            m.per_second
        );
    }
    let (k, r) = (&results[0], &results[1]);
    println!(
        "keelson-runtime / runc: p50 latency {:.2}x, p99 latency {:.2}x, runs/s {:.2}x",
        ms(k.p50) / ms(r.p50).max(1e-9),
        ms(k.p99) / ms(r.p99).max(1e-9),
        k.per_second / r.per_second.max(1e-9)
    );
    let entries: Vec<String> = results
        .iter()
        .map(|m| {
            format!(
                "{{\"runtime\":\"{}\",\"runs\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"runs_per_second\":{:.2}}}",
                m.name,
                m.runs,
                ms(m.p50),
                ms(m.p99),
                m.per_second
            )
        })
        .collect();
    let json = out_dir.join("runtime.json");
    fs::write(&json, format!("{{\"results\":[{}]}}\n", entries.join(",")))?;
    println!("results: {}", json.display());
    Ok(())
}
