//! Memory-pressure eviction, the pure and measuring parts: the `--eviction-hard` threshold
//! (kubelet syntax: `memory.available<100Mi` or `memory.available<10%`), the working set of a
//! cgroup (usage minus inactive file cache, as the kubelet computes it, on cgroup v1 and v2),
//! the order in which pods are evicted, and the node's MemoryPressure signal, which the Node
//! heartbeat reports. The pod manager acts on them (`pods::sync`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keelson_runtime::cgroups::CgroupLayout;

use crate::pods::memory_bytes;

/// A hard eviction threshold on `memory.available`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// An absolute amount of memory.
    Bytes(u64),
    /// A share of the node's memory capacity, in percent.
    Percent(f64),
}

impl Threshold {
    /// The threshold in bytes for a node of `capacity` bytes.
    pub fn bytes(&self, capacity: u64) -> u64 {
        match *self {
            Threshold::Bytes(b) => b,
            Threshold::Percent(p) => (capacity as f64 * p / 100.0) as u64,
        }
    }

    /// As the kubelet writes it (`100Mi`, `10%`).
    pub fn describe(&self) -> String {
        match *self {
            Threshold::Bytes(b) => format_bytes(b),
            Threshold::Percent(p) => format!("{p}%"),
        }
    }
}

/// How the agent evicts pods under memory pressure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvictionConfig {
    /// Evict when `memory.available` is below this.
    pub threshold: Threshold,
    /// The memory capacity `memory.available` is computed from (default: the machine's).
    pub capacity: Option<u64>,
    /// How long MemoryPressure stays on after pressure was last seen.
    pub transition: Duration,
}

/// Parses `--eviction-hard` (comma-separated `signal<quantity` entries). Only
/// `memory.available` is acted on; `None` if it is not given.
///
/// # Errors
/// A malformed entry, an operator other than `<`, a bad quantity, or a signal this agent does
/// not evict on.
pub fn parse_eviction_hard(spec: &str) -> Result<Option<Threshold>, String> {
    let mut out = None;
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (signal, value) = entry.split_once('<').ok_or_else(|| {
            format!("{entry:?}: expected signal<quantity, e.g. memory.available<100Mi")
        })?;
        let (signal, value) = (signal.trim(), value.trim());
        if signal != "memory.available" {
            return Err(format!(
                "{entry:?}: only memory.available is supported for eviction (not {signal})"
            ));
        }
        let threshold = match value.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("{entry:?}: bad percentage"))?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(format!("{entry:?}: percentage out of range"));
                }
                Threshold::Percent(p)
            }
            None => Threshold::Bytes(
                memory_bytes(value).ok_or_else(|| format!("{entry:?}: bad quantity {value:?}"))?,
            ),
        };
        out = Some(threshold);
    }
    Ok(out)
}

/// Bytes as a Kubernetes quantity, in the largest binary unit that divides them (`100Mi`),
/// else in `Ki`.
pub fn format_bytes(b: u64) -> String {
    for (shift, unit) in [(30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if b >= 1 << shift && b.is_multiple_of(1 << shift) {
            return format!("{}{unit}", b >> shift);
        }
    }
    if b >= 1024 {
        format!("{}Ki", b / 1024)
    } else {
        b.to_string()
    }
}

fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The working set of the cgroup directory `dir`: usage minus inactive file pages (never
/// below zero). `None` if it cannot be read (the cgroup is gone).
pub fn working_set_in(dir: &Path, layout: CgroupLayout) -> Option<u64> {
    let (usage_file, inactive_key) = match layout {
        CgroupLayout::V1 => ("memory.usage_in_bytes", "total_inactive_file"),
        CgroupLayout::V2 => ("memory.current", "inactive_file"),
    };
    let usage: u64 = std::fs::read_to_string(dir.join(usage_file))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let inactive = std::fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|s| stat_value(&s, inactive_key))
        .unwrap_or(0);
    Some(usage.saturating_sub(inactive))
}

/// The memory-controller directory of cgroup `rel` (relative to the hierarchy roots) on this
/// host.
pub fn memory_dir(rel: &str) -> (PathBuf, CgroupLayout) {
    let layout = CgroupLayout::detect();
    let root = match layout {
        CgroupLayout::V1 => "/sys/fs/cgroup/memory",
        CgroupLayout::V2 => "/sys/fs/cgroup",
    };
    (Path::new(root).join(rel.trim_matches('/')), layout)
}

/// The working set of cgroup `rel` on this host.
pub fn working_set(rel: &str) -> Option<u64> {
    let (dir, layout) = memory_dir(rel);
    working_set_in(&dir, layout)
}

/// What eviction ranking needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodUsage {
    /// The pod's uid.
    pub uid: String,
    /// `spec.priority` (0 if unset).
    pub priority: i32,
    /// The sum of its containers' memory requests.
    pub request: u64,
    /// Its working set.
    pub usage: u64,
}

/// The kubelet's order for memory pressure: pods using more than they requested first, then
/// lower priority first, then by how far usage is above the request.
pub fn eviction_order(pods: &[PodUsage]) -> Vec<&PodUsage> {
    let mut v: Vec<&PodUsage> = pods.iter().collect();
    v.sort_by(|a, b| {
        let exceeds = |p: &PodUsage| p.usage > p.request;
        exceeds(b)
            .cmp(&exceeds(a))
            .then(a.priority.cmp(&b.priority))
            .then_with(|| {
                let over = |p: &PodUsage| i128::from(p.usage) - i128::from(p.request);
                over(b).cmp(&over(a))
            })
    });
    v
}

/// The node's memory-pressure signal: observed by the pod manager's eviction check, reported
/// by the Node heartbeat. Pressure stays on for a transition period after it was last seen,
/// so that it does not flap (the kubelet's `--eviction-pressure-transition-period`).
struct Signal {
    last_pressure: Option<Instant>,
    period: Duration,
    observed: bool,
}

static MEMORY: Mutex<Signal> = Mutex::new(Signal {
    last_pressure: None,
    period: Duration::from_secs(300),
    observed: false,
});

/// Wakes the Node heartbeat when memory pressure begins, so the condition is posted at once.
pub static PRESSURE_CHANGED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Records one observation of memory pressure (`pressure`), with the transition period to
/// apply.
pub fn observe_memory(pressure: bool, period: Duration) {
    let mut s = MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    let before = current(&s);
    s.observed = true;
    s.period = period;
    if pressure {
        s.last_pressure = Some(Instant::now());
    }
    if current(&s) != before {
        PRESSURE_CHANGED.notify_one();
    }
}

fn current(s: &Signal) -> bool {
    s.last_pressure.is_some_and(|t| t.elapsed() < s.period)
}

/// The memory pressure the eviction check reports, if it runs.
pub fn memory_pressure() -> Option<bool> {
    let s = MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    s.observed.then(|| current(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_like_the_kubelet() {
        assert_eq!(
            parse_eviction_hard("memory.available<100Mi"),
            Ok(Some(Threshold::Bytes(100 << 20)))
        );
        assert_eq!(
            parse_eviction_hard(" memory.available < 10% "),
            Ok(Some(Threshold::Percent(10.0)))
        );
        assert_eq!(parse_eviction_hard(""), Ok(None));
        assert!(parse_eviction_hard("memory.available>1Gi").is_err());
        assert!(parse_eviction_hard("nodefs.available<10%").is_err());
        assert!(parse_eviction_hard("memory.available<lots").is_err());
        assert!(parse_eviction_hard("memory.available<120%").is_err());
        assert_eq!(Threshold::Percent(10.0).bytes(1000), 100);
        assert_eq!(Threshold::Bytes(7).bytes(1000), 7);
    }

    #[test]
    fn bytes_format_as_quantities() {
        assert_eq!(format_bytes(100 << 20), "100Mi");
        assert_eq!(format_bytes(3 << 30), "3Gi");
        assert_eq!(format_bytes((100 << 20) + 1024), "102401Ki");
        assert_eq!(format_bytes(1500), "1Ki");
        assert_eq!(format_bytes(12), "12");
    }

    #[test]
    fn working_set_subtracts_inactive_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("memory.usage_in_bytes"), "1000\n").expect("write");
        std::fs::write(
            dir.path().join("memory.stat"),
            "cache 10\ninactive_file 1\ntotal_inactive_file 300\n",
        )
        .expect("write");
        assert_eq!(working_set_in(dir.path(), CgroupLayout::V1), Some(700));
        std::fs::write(dir.path().join("memory.current"), "200\n").expect("write");
        assert_eq!(working_set_in(dir.path(), CgroupLayout::V2), Some(199));
        std::fs::write(dir.path().join("memory.current"), "0\n").expect("write");
        assert_eq!(working_set_in(dir.path(), CgroupLayout::V2), Some(0));
        assert_eq!(
            working_set_in(&dir.path().join("gone"), CgroupLayout::V1),
            None
        );
    }

    #[test]
    fn pods_over_their_requests_go_first() {
        let p = |uid: &str, priority, request, usage| PodUsage {
            uid: uid.into(),
            priority,
            request,
            usage,
        };
        let pods = [
            p("guaranteed", 0, 100, 90),
            p("besteffort-small", 0, 0, 10),
            p("burstable-big", 0, 50, 400),
            p("besteffort-big", 0, 0, 300),
            p("important", 1000, 0, 900),
        ];
        let order: Vec<&str> = eviction_order(&pods)
            .iter()
            .map(|p| p.uid.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "burstable-big",
                "besteffort-big",
                "besteffort-small",
                "important",
                "guaranteed"
            ]
        );
    }
}
