//! What the node reports about the machine: CPUs, memory, kernel, OS, and the pressure
//! signals behind its conditions.

use std::ffi::CStr;
use std::path::Path;

/// Facts about the machine, read once at start.
#[derive(Debug, Clone)]
pub struct MachineInfo {
    /// Logical CPUs.
    pub cpus: usize,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// `uname -r`.
    pub kernel: String,
    /// `PRETTY_NAME` of `/etc/os-release`.
    pub os_image: String,
    /// The Kubernetes name of the architecture (`amd64`, `arm64`, …).
    pub arch: String,
    /// `/etc/machine-id`, if any.
    pub machine_id: String,
    /// The host name.
    pub hostname: String,
}

/// A `key: value kB` line of `/proc/meminfo`, in bytes.
pub fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

fn uname_release() -> String {
    // SAFETY: `utsname` is plain data; uname fills it with NUL-terminated strings.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

fn os_pretty_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| "Linux".to_owned())
}

impl MachineInfo {
    /// Reads the machine's facts.
    pub fn read() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        MachineInfo {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: meminfo("MemTotal").unwrap_or(0),
            kernel: uname_release(),
            os_image: os_pretty_name(),
            arch: arch.to_owned(),
            machine_id: std::fs::read_to_string("/etc/machine-id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
        }
    }
}

/// The pressure signals of the node conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    /// Available memory under the threshold.
    pub memory: bool,
    /// Free space of the state dir's file system under the threshold.
    pub disk: bool,
    /// Processes near the kernel's `pid_max`.
    pub pids: bool,
}

/// Memory available below this is memory pressure (the kubelet's default hard eviction
/// threshold).
const MEMORY_AVAILABLE_MIN: u64 = 100 << 20;
/// Free disk below this fraction is disk pressure.
const DISK_FREE_MIN_PERCENT: u64 = 10;

impl Pressure {
    /// Measures the pressure now; `state_dir` is where the node keeps images and logs.
    pub fn measure(state_dir: &Path) -> Self {
        let memory = meminfo("MemAvailable").is_some_and(|a| a < MEMORY_AVAILABLE_MIN);
        let disk = nix::sys::statvfs::statvfs(state_dir).is_ok_and(|s| {
            let total = s.blocks();
            total > 0 && s.blocks_available() * 100 / total < DISK_FREE_MIN_PERCENT
        });
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX);
        let procs = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                    .count() as u64
            })
            .unwrap_or(0);
        Pressure {
            memory,
            disk,
            pids: procs * 10 > pid_max * 9,
        }
    }
}
