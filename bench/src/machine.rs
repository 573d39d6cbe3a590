//! What the machine a benchmark ran on looks like: CPU, cores, kernel, the disk under the data
//! directories and how long one small synchronous write takes on it.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Facts about this machine, recorded with every benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// CPUs available to this process.
    pub cores: usize,
    /// The running kernel's release.
    pub kernel: String,
    /// The block device holding the data directories, with its model and kind.
    pub disk: String,
    /// Median time of a 4 KiB write followed by `fdatasync` in the data directory, in ms.
    pub fdatasync_ms: f64,
}

/// Probe this machine; `data_dir` is where the benchmark keeps its data.
pub fn probe(data_dir: &Path) -> MachineInfo {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let kernel = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    MachineInfo {
        cpu_model,
        cores,
        kernel,
        disk: disk_of(data_dir),
        fdatasync_ms: fdatasync_ms(data_dir).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
    }
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The device mounted at the longest mount point containing `dir`, described from sysfs.
fn disk_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let Some((device, fs)) = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.next()?, f.next()?))
        })
        .filter(|(_, mount, _)| dir.starts_with(mount))
        .max_by_key(|(_, mount, _)| mount.len())
        .map(|(dev, _, fs)| (dev.to_string(), fs.to_string()))
    else {
        return "unknown".into();
    };
    let name = device.trim_start_matches("/dev/");
    let base: String = name
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .trim_end_matches('p')
        .to_string();
    let sys = Path::new("/sys/block").join(&base);
    let model = read_trimmed(sys.join("device/model")).unwrap_or_default();
    let kind = match read_trimmed(sys.join("queue/rotational")).as_deref() {
        Some("0") => "non-rotational",
        Some("1") => "reported rotational",
        _ => "unknown kind",
    };
    let model = if model.is_empty() {
        String::new()
    } else {
        format!(" {model}")
    };
    format!("{device}{model} ({fs}, {kind})")
}

/// Median of 30 small synchronous writes in `dir`.
fn fdatasync_ms(dir: &Path) -> Option<Duration> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).ok()?;
    let block = [0u8; 4096];
    let mut times = Vec::new();
    for _ in 0..30 {
        let start = Instant::now();
        file.write_all(&block).ok()?;
        file.sync_data().ok()?;
        times.push(start.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    times.sort();
    times.get(times.len() / 2).copied()
}
