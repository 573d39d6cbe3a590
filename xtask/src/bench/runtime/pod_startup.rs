//! Pod startup latency: the `pod_startup` example of `keelson-e2e` starts a release
//! `keelson-server` on loopback and one `keelson-agent node` in a network namespace and cgroup2
//! directory of its own (the e2e fixtures, which clean up after themselves), creates the pods
//! and writes its results as JSON; this side builds it, runs it and reads the numbers back.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::cmd::{cargo, run as run_cmd, step};

/// What the driver measured.
pub struct PodStartup {
    pub pods: usize,
    pub batch: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The driver's JSON as written, embedded in `runtime.json`.
    pub json: String,
}

/// Builds the release binaries the driver starts (and keelson-runtime for the lifecycle part),
/// in one cargo invocation so they share their dependencies' builds.
///
/// # Errors
/// The build fails.
pub fn build() -> Result<()> {
    step(
        "build keelson-server, keelson-agent, keelson-runtime and the pod startup driver (release)",
    );
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "keelson-server",
        "-p",
        "keelson-agent",
        "-p",
        "keelson-runtime",
        "-p",
        "keelson-e2e",
        "--bins",
        "--example",
        "pod_startup",
    ]))
}

/// A number field of the driver's flat JSON object.
fn number(json: &str, key: &str) -> Result<f64> {
    let at = json
        .find(&format!("\"{key}\""))
        .with_context(|| format!("no {key} in the driver's JSON"))?;
    let rest = json[at + key.len() + 2..]
        .trim_start()
        .trim_start_matches(':')
        .trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+')))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .with_context(|| format!("{key} in the driver's JSON is not a number"))
}

/// Runs the driver for `pods` pods created in waves of `batch`.
///
/// # Errors
/// The driver fails or writes no readable result.
pub fn run(pods: usize, batch: usize, out_dir: &Path) -> Result<PodStartup> {
    let driver = super::super::target_dir().join("release/examples/pod_startup");
    let out = out_dir.join("pod-startup.json");
    let _ = fs::remove_file(&out);
    run_cmd(
        Command::new(&driver)
            .args(["--pods", &pods.to_string(), "--batch", &batch.to_string()])
            .arg("--out")
            .arg(&out),
    )
    .context("the pod startup driver failed")?;
    let json = fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let _ = fs::remove_file(&out);
    Ok(PodStartup {
        pods,
        batch,
        p50_ms: number(&json, "p50_ms")?,
        p99_ms: number(&json, "p99_ms")?,
        max_ms: number(&json, "max_ms")?,
        json: json.trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::number;

    #[test]
    fn reads_numbers_of_the_driver_json() {
        let json = r#"{"pods":100,"p50_ms":412.5,"p99_ms": 980.25,"max_ms":1.2e3}"#;
        assert_eq!(number(json, "p50_ms").ok(), Some(412.5));
        assert_eq!(number(json, "p99_ms").ok(), Some(980.25));
        assert_eq!(number(json, "max_ms").ok(), Some(1200.0));
        assert!(number(json, "wall_s").is_err());
    }
}
