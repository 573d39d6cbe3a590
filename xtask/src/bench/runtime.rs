//! `cargo xtask bench runtime`, two parts:
//!
//! 1. Container lifecycles: keelson-runtime against runc and crun (when installed) on one OCI
//!    bundle — Debian's static busybox running `true`, with the spec `runc spec` writes (new
//!    PID, mount, network, UTS and IPC namespaces, a cgroup). Each run is the whole container
//!    lifecycle as a shim drives it: `run` (create, start, wait for the exit), then `delete`.
//!    crun 1.8 needs `hugetlb` mounted as cgroup v1 on this hybrid host; [`hugetlb`] does that
//!    only when crun fails without it, and undoes it after crun's runs.
//! 2. Pod startup: API create → Running seen by a watch, for `--pods` pods on one node (the
//!    `pod_startup` example of `keelson-e2e`, driving release builds through the e2e fixtures),
//!    see [`pod_startup`].
//!
//! Prints p50/p99 per runtime, runs per second, the Keelson/runc and Keelson/crun ratios and
//! the pod startup percentiles; JSON goes to `<target>/bench/runtime.json`.

mod hugetlb;
mod pod_startup;

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

/// What `cargo xtask bench runtime -- …` accepts.
struct Options {
    runs: usize,
    pods: usize,
    batch: usize,
}

fn options(extra: &[String]) -> Result<Options> {
    let mut o = Options {
        runs: 200,
        pods: 100,
        batch: 20,
    };
    let mut it = extra.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => o.runs = value?.parse().context("--runs N")?,
            "--pods" => o.pods = value?.parse().context("--pods N")?,
            "--batch" => o.batch = value?.parse().context("--batch N")?,
            other => bail!(
                "unknown argument {other} (expected: --runs N, --pods N (0: skip), --batch N)"
            ),
        }
    }
    Ok(o)
}

/// Gets crun running on the bundle: as it is, or else with `hugetlb` mounted as cgroup v1
/// (the guard, kept until crun's runs are done). Err says why crun cannot run.
fn prepare_crun(crun: &Path, work: &Path) -> Result<Option<hugetlb::HugetlbV1>> {
    let root = work.join("state-crun-probe");
    fs::create_dir_all(&root)?;
    let bundle = work.join("bundle");
    let Err(first) = lifecycle(crun, &root, &bundle, "probe-0") else {
        return Ok(None);
    };
    if hugetlb::mounted() {
        bail!("crun fails with /sys/fs/cgroup/hugetlb already mounted: {first:#}");
    }
    step("crun refuses this cgroup layout; mounting hugetlb as cgroup v1 for the bench");
    let guard = hugetlb::HugetlbV1::mount()
        .with_context(|| format!("crun failed ({first:#}) and so did the workaround"))?;
    lifecycle(crun, &root, &bundle, "probe-1").with_context(|| {
        format!("crun fails even with hugetlb mounted as cgroup v1 (before: {first:#})")
    })?;
    Ok(Some(guard))
}

/// A JSON string literal (xtask has no JSON library; this text is an error message).
fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(1e-9)
}

/// Build and run the runtime benchmark; `extra` may hold `--runs N` (lifecycles per runtime,
/// default 200), `--pods N` (default 100, 0 skips pod startup) and `--batch N` (default 20).
///
/// # Errors
/// runc is missing, the build fails, a container does not run or pod startup fails. crun
/// that cannot run is reported, not an error.
pub fn run(extra: &[String]) -> Result<()> {
    let opts = options(extra)?;
    let Some(runc) = probe(Command::new("which").arg("runc")) else {
        bail!("runc is not installed: run `cargo xtask setup` (Debian package runc)");
    };
    if opts.pods > 0 {
        pod_startup::build()?;
    } else {
        step("build keelson-runtime (release)");
        run_cmd(cargo().args([
            "build",
            "--release",
            "-p",
            "keelson-runtime",
            "--bin",
            "keelson-runtime",
        ]))?;
    }
    let keelson = super::target_dir().join("release/keelson-runtime");
    let out_dir = super::target_dir().join("bench");
    let work = out_dir.join("runtime-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("bundle"))?;
    bundle(&work.join("bundle"))?;

    let runs = opts.runs;
    step(&format!(
        "bench runtime: {runs} container lifecycles (run + delete) per runtime"
    ));
    let mut results = vec![
        measure("keelson-runtime", &keelson, &work, runs)?,
        measure("runc", Path::new(runc.trim()), &work, runs)?,
    ];
    // crun last: the hugetlb mount it may need is only up while crun runs.
    let crun_error = match probe(Command::new("which").arg("crun")) {
        None => Some("crun is not installed (Debian package crun)".to_owned()),
        Some(crun) => {
            let crun = PathBuf::from(crun.trim());
            match prepare_crun(&crun, &work) {
                Err(e) => Some(format!("{e:#}")),
                Ok(guard) => {
                    let measured = measure("crun", &crun, &work, runs);
                    drop(guard);
                    match measured {
                        Ok(m) => {
                            results.push(m);
                            None
                        }
                        Err(e) => Some(format!("{e:#}")),
                    }
                }
            }
        }
    };
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

    let pods = if opts.pods > 0 {
        step(&format!(
            "bench runtime: pod startup, {} pods in waves of {} on one node",
            opts.pods, opts.batch
        ));
        Some(pod_startup::run(opts.pods, opts.batch, &out_dir)?)
    } else {
        None
    };

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
    let k = &results[0];
    let mut ratios = Vec::new();
    for other in &results[1..] {
        let (p50, p99, rate) = (
            ratio(ms(k.p50), ms(other.p50)),
            ratio(ms(k.p99), ms(other.p99)),
            ratio(k.per_second, other.per_second),
        );
        println!(
            "keelson-runtime / {}: p50 latency {p50:.2}x, p99 latency {p99:.2}x, runs/s {rate:.2}x",
            other.name
        );
        ratios.push(format!(
            "{{\"against\":\"{}\",\"p50_latency\":{p50:.3},\"p99_latency\":{p99:.3},\"runs_per_second\":{rate:.3}}}",
            other.name
        ));
    }
    if let Some(why) = &crun_error {
        println!("crun: not measured: {why}");
    }
    if let Some(p) = &pods {
        println!(
            "pod startup (create -> Running by watch, {} pods, waves of {}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (goal: p99 under 1 s)",
            p.pods, p.batch, p.p50_ms, p.p99_ms, p.max_ms
        );
    }
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
    let crun_note = crun_error
        .as_deref()
        .map_or_else(|| "null".to_owned(), json_string);
    let pods_json = pods
        .as_ref()
        .map_or_else(|| "null".to_owned(), |p| p.json.clone());
    let json = out_dir.join("runtime.json");
    fs::write(
        &json,
        format!(
            "{{\"results\":[{}],\"ratios\":[{}],\"crun_not_measured\":{crun_note},\"pod_startup\":{pods_json}}}\n",
            entries.join(","),
            ratios.join(",")
        ),
    )?;
    println!("results: {}", json.display());
    Ok(())
}
