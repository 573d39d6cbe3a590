//! cgroups for a container's memory, CPU and pids limits, through
//! `cgroups-rs`, on cgroup v1/hybrid hosts (one hierarchy per controller under
//! `/sys/fs/cgroup/<controller>`) and on pure cgroup v2 hosts (one unified
//! hierarchy at `/sys/fs/cgroup`). The backend is chosen once, by
//! [`CgroupManager::detect`], and dispatched by enum.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use cgroups_rs::CgroupPid;
use cgroups_rs::fs::devices::{DevicePermissions, DeviceType};
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::hierarchies::{self, V1, V2};
use cgroups_rs::fs::{Cgroup, DeviceResource, MaxValue, Resources};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, LinuxResources};

/// Errors of cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `cgroups-rs` failed.
    #[error("cgroup {path}: {action}: {source}")]
    Cgroups {
        /// The cgroup path relative to the hierarchy root.
        path: String,
        /// What was attempted.
        action: &'static str,
        /// The library's error.
        source: cgroups_rs::fs::error::Error,
    },
    /// The cgroup path is not acceptable.
    #[error("cgroup path {0:?} must be relative to the hierarchy root and must not contain '..'")]
    InvalidPath(String),
    /// A cgroup file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A cgroup directory or file could not be made, written or removed.
    #[error("write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The cgroup a new container should get already has processes.
    #[error("cgroup {0} already has processes: refusing to share it")]
    InUse(String),
    /// The cgroup still had processes after the timeout.
    #[error("cgroup {0} still has processes")]
    Busy(String),
}

type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// The controllers the runtime manages on v1 hierarchies.
const V1_CONTROLLERS: [&str; 6] = ["cpu", "cpuacct", "devices", "freezer", "memory", "pids"];

/// Devices every container may use (the list runc allows by default), as
/// (type, major, minor; -1 for any). Everyone may also `mknod` any device;
/// opening one needs a rule.
const DEFAULT_ALLOWED_DEVICES: [(DeviceType, i64, i64, &str); 11] = [
    (DeviceType::Char, -1, -1, "m"),
    (DeviceType::Block, -1, -1, "m"),
    (DeviceType::Char, 1, 3, "rwm"),
    (DeviceType::Char, 1, 5, "rwm"),
    (DeviceType::Char, 1, 7, "rwm"),
    (DeviceType::Char, 1, 8, "rwm"),
    (DeviceType::Char, 1, 9, "rwm"),
    (DeviceType::Char, 5, 0, "rwm"),
    (DeviceType::Char, 5, 2, "rwm"),
    (DeviceType::Char, 136, -1, "rwm"),
    (DeviceType::Char, 10, 200, "rwm"),
];

fn permissions(access: &str) -> Vec<DevicePermissions> {
    access
        .chars()
        .filter_map(DevicePermissions::from_char)
        .collect()
}

fn rule(allow: bool, devtype: DeviceType, major: i64, minor: i64, access: &str) -> DeviceResource {
    DeviceResource {
        allow,
        devtype,
        major,
        minor,
        access: permissions(access),
    }
}

/// The device rules of a container on cgroup v1: deny everything, then the
/// spec's `linux.resources.devices`, the devices of `linux.devices`, and the
/// default list.
pub fn device_rules(spec: Option<&LinuxResources>, devices: &[LinuxDevice]) -> Vec<DeviceResource> {
    let mut rules = vec![rule(false, DeviceType::All, -1, -1, "rwm")];
    for d in spec
        .and_then(|r| r.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let devtype = match d.typ() {
            Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => DeviceType::Char,
            Some(LinuxDeviceType::B) => DeviceType::Block,
            Some(LinuxDeviceType::P) => continue,
            Some(LinuxDeviceType::A) | None => DeviceType::All,
        };
        rules.push(rule(
            d.allow(),
            devtype,
            d.major().unwrap_or(-1),
            d.minor().unwrap_or(-1),
            d.access().as_deref().unwrap_or("rwm"),
        ));
    }
    for d in devices {
        let devtype = match d.typ() {
            LinuxDeviceType::B => DeviceType::Block,
            LinuxDeviceType::C | LinuxDeviceType::U => DeviceType::Char,
            LinuxDeviceType::P | LinuxDeviceType::A => continue,
        };
        rules.push(rule(true, devtype, d.major(), d.minor(), "rwm"));
    }
    for (devtype, major, minor, access) in DEFAULT_ALLOWED_DEVICES {
        rules.push(rule(true, devtype, major, minor, access));
    }
    rules
}
/// The controllers the runtime enables on the unified hierarchy.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Which cgroup layout the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// v1 controller hierarchies (possibly beside an empty cgroup2 tree: "hybrid").
    V1,
    /// One unified cgroup2 hierarchy mounted at `/sys/fs/cgroup`.
    V2,
}

impl CgroupLayout {
    /// Detects the host's layout from the file system type at `/sys/fs/cgroup`.
    pub fn detect() -> Self {
        if hierarchies::is_cgroup2_unified_mode() {
            CgroupLayout::V2
        } else {
            CgroupLayout::V1
        }
    }
}

/// A container's cgroup on a v1/hybrid host: one directory per controller,
/// plus, on a hybrid host, a directory of the same path in the
/// controller-less cgroup2 tree at `/sys/fs/cgroup/unified` (where cgroup
/// socket programs attach).
#[derive(Debug)]
pub struct V1Cgroup {
    cgroup: Cgroup,
    path: String,
    unified: Option<PathBuf>,
}

/// Where a hybrid host mounts its controller-less cgroup2 tree.
pub const HYBRID_UNIFIED_ROOT: &str = "/sys/fs/cgroup/unified";

/// The cgroup2 directory for `path` on a hybrid host, if the host has one.
fn hybrid_unified_dir(path: &str) -> Option<PathBuf> {
    let root = std::path::Path::new(HYBRID_UNIFIED_ROOT);
    let stat = nix::sys::statfs::statfs(root).ok()?;
    (stat.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC).then(|| root.join(path))
}

/// A container's cgroup on a pure v2 host: one directory for all controllers.
#[derive(Debug)]
pub struct V2Cgroup {
    cgroup: Cgroup,
    path: String,
}

/// A container's cgroup, dispatching to the host's layout.
#[derive(Debug)]
pub enum CgroupManager {
    /// cgroup v1 or hybrid host.
    V1(V1Cgroup),
    /// Pure cgroup v2 host.
    V2(V2Cgroup),
}

fn validate(path: &str) -> Result<String> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty())
    {
        return Err(CgroupError::InvalidPath(path.to_owned()));
    }
    Ok(trimmed.to_owned())
}

fn lib_err(
    path: &str,
    action: &'static str,
) -> impl FnOnce(cgroups_rs::fs::error::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Cgroups {
        path,
        action,
        source,
    }
}

fn controllers(list: &[&str]) -> Vec<String> {
    list.iter().map(|c| (*c).to_owned()).collect()
}

/// Converts OCI/v1 CPU shares (2…262144) to a cgroup v2 weight (1…10000),
/// with the formula runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

impl CgroupManager {
    /// Creates (or opens, if it exists) the cgroup at `path` — relative to
    /// each hierarchy's root, e.g. `keelson/<id>` — on the host's layout.
    ///
    /// # Errors
    /// [`CgroupError::InvalidPath`] for absolute-escaping paths,
    /// [`CgroupError::Cgroups`] if a directory cannot be made.
    pub fn create(path: &str) -> Result<Self> {
        Self::create_on(CgroupLayout::detect(), path)
    }

    /// As [`CgroupManager::create`], on the given layout.
    ///
    /// # Errors
    /// See [`CgroupManager::create`].
    pub fn create_on(layout: CgroupLayout, path: &str) -> Result<Self> {
        let path = validate(path)?;
        Ok(match layout {
            CgroupLayout::V1 => {
                let cgroup = Cgroup::new_with_specified_controllers(
                    Box::new(V1::new()),
                    &path,
                    Some(controllers(&V1_CONTROLLERS)),
                )
                .map_err(lib_err(&path, "create"))?;
                let unified = hybrid_unified_dir(&path);
                if let Some(dir) = &unified {
                    fs::create_dir_all(dir).map_err(|source| CgroupError::Write {
                        path: dir.clone(),
                        source,
                    })?;
                }
                CgroupManager::V1(V1Cgroup {
                    cgroup,
                    unified,
                    path,
                })
            }
            CgroupLayout::V2 => {
                let cgroup = Cgroup::new_with_specified_controllers(
                    Box::new(V2::new()),
                    &path,
                    Some(controllers(&V2_CONTROLLERS)),
                )
                .map_err(lib_err(&path, "create"))?;
                CgroupManager::V2(V2Cgroup { cgroup, path })
            }
        })
    }

    /// Opens an existing cgroup without creating anything.
    ///
    /// # Errors
    /// [`CgroupError::InvalidPath`].
    pub fn load(path: &str) -> Result<Self> {
        let path = validate(path)?;
        Ok(match CgroupLayout::detect() {
            CgroupLayout::V1 => CgroupManager::V1(V1Cgroup {
                cgroup: Cgroup::load_with_specified_controllers(
                    Box::new(V1::new()),
                    &path,
                    controllers(&V1_CONTROLLERS),
                ),
                unified: hybrid_unified_dir(&path),
                path,
            }),
            CgroupLayout::V2 => CgroupManager::V2(V2Cgroup {
                cgroup: Cgroup::load_with_specified_controllers(
                    Box::new(V2::new()),
                    &path,
                    controllers(&V2_CONTROLLERS),
                ),
                path,
            }),
        })
    }

    /// The cgroup path relative to the hierarchy roots.
    pub fn path(&self) -> &str {
        match self {
            CgroupManager::V1(c) => &c.path,
            CgroupManager::V2(c) => &c.path,
        }
    }

    /// The layout this cgroup lives on.
    pub fn layout(&self) -> CgroupLayout {
        match self {
            CgroupManager::V1(_) => CgroupLayout::V1,
            CgroupManager::V2(_) => CgroupLayout::V2,
        }
    }

    fn cgroup(&self) -> &Cgroup {
        match self {
            CgroupManager::V1(c) => &c.cgroup,
            CgroupManager::V2(c) => &c.cgroup,
        }
    }

    /// Applies the spec's memory, CPU and pids limits, and on v1 the device
    /// access rules (see [`device_rules`]; `devices` is `linux.devices`).
    /// Device rules are not enforced on cgroup v2, which needs an eBPF
    /// program for them.
    ///
    /// # Errors
    /// [`CgroupError::Cgroups`] if a limit cannot be written.
    pub fn apply(&self, spec: Option<&LinuxResources>, devices: &[LinuxDevice]) -> Result<()> {
        let default = LinuxResources::default();
        let mut resources = self.to_resources(spec.unwrap_or(&default));
        match self {
            CgroupManager::V1(_) => resources.devices.devices = device_rules(spec, devices),
            CgroupManager::V2(_) => {
                tracing::warn!(
                    path = self.path(),
                    "device access rules are not enforced on cgroup v2"
                );
            }
        }
        self.cgroup()
            .apply(&resources)
            .map_err(lib_err(self.path(), "apply limits"))
    }

    /// Changes the memory, CPU and pids limits of a live cgroup (device rules
    /// stay as they are).
    ///
    /// # Errors
    /// [`CgroupError::Cgroups`] if a limit cannot be written (e.g. a memory
    /// limit below current usage).
    pub fn update(&self, spec: &LinuxResources) -> Result<()> {
        self.cgroup()
            .apply(&self.to_resources(spec))
            .map_err(lib_err(self.path(), "update limits"))
    }

    /// Translates OCI resources into `cgroups-rs` resources for this layout.
    pub fn to_resources(&self, spec: &LinuxResources) -> Resources {
        let mut res = Resources::default();
        if let Some(memory) = spec.memory() {
            res.memory.memory_hard_limit = memory.limit();
            res.memory.memory_soft_limit = memory.reservation();
            res.memory.swappiness = memory.swappiness();
            res.memory.memory_swap_limit = match (self, memory.swap(), memory.limit()) {
                // v1 takes memory+swap together, as the OCI spec does.
                (CgroupManager::V1(_), swap, _) => swap,
                // v2 takes swap alone.
                (CgroupManager::V2(_), Some(swap), Some(limit)) if swap > 0 && limit > 0 => {
                    Some((swap - limit).max(0))
                }
                (CgroupManager::V2(_), swap, _) => swap,
            };
        }
        if let Some(cpu) = spec.cpu() {
            res.cpu.shares = match self {
                CgroupManager::V1(_) => cpu.shares(),
                CgroupManager::V2(_) => cpu.shares().map(shares_to_weight),
            };
            res.cpu.quota = cpu.quota();
            res.cpu.period = cpu.period();
        }
        if let Some(pids) = spec.pids() {
            res.pid.maximum_number_of_processes = Some(if pids.limit() > 0 {
                MaxValue::Value(pids.limit())
            } else {
                MaxValue::Max
            });
        }
        res
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    ///
    /// # Errors
    /// [`CgroupError::Cgroups`] if `cgroup.procs` cannot be written.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        self.cgroup()
            .add_task_by_tgid(CgroupPid::from(pid as u64))
            .map_err(lib_err(self.path(), "add process"))?;
        if let CgroupManager::V1(V1Cgroup {
            unified: Some(dir), ..
        }) = self
        {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Write {
                path: procs,
                source,
            })?;
        }
        Ok(())
    }

    /// The cgroup2 directory of this cgroup: the unified one on v2, the
    /// hybrid one beside the v1 controllers if the host has it.
    pub fn unified_dir(&self) -> Option<PathBuf> {
        match self {
            CgroupManager::V1(c) => c.unified.clone(),
            CgroupManager::V2(c) => Some(PathBuf::from("/sys/fs/cgroup").join(&c.path)),
        }
    }

    /// The PIDs in the cgroup (in the first controller's hierarchy).
    pub fn processes(&self) -> Vec<i32> {
        self.cgroup().procs().iter().map(|p| p.pid as i32).collect()
    }

    /// The directory of this cgroup in the memory hierarchy (v1) or the
    /// unified hierarchy (v2).
    pub fn memory_dir(&self) -> PathBuf {
        match self {
            CgroupManager::V1(c) => PathBuf::from("/sys/fs/cgroup/memory").join(&c.path),
            CgroupManager::V2(c) => PathBuf::from("/sys/fs/cgroup").join(&c.path),
        }
    }

    /// The directory of this cgroup in the pids hierarchy (v1) or the unified
    /// hierarchy (v2).
    pub fn pids_dir(&self) -> PathBuf {
        match self {
            CgroupManager::V1(c) => PathBuf::from("/sys/fs/cgroup/pids").join(&c.path),
            CgroupManager::V2(c) => PathBuf::from("/sys/fs/cgroup").join(&c.path),
        }
    }

    /// Freezes (`true`) or thaws (`false`) every process in the cgroup and
    /// waits until the kernel reports the new state: the v1 freezer
    /// controller, or `cgroup.freeze` on v2.
    ///
    /// # Errors
    /// [`CgroupError::Cgroups`]/[`CgroupError::Write`] if the state cannot
    /// be written, [`CgroupError::Busy`] if it does not settle in 5 s.
    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        match self {
            CgroupManager::V1(c) => {
                let freezer: &FreezerController = c.cgroup.controller_of().ok_or_else(|| {
                    CgroupError::Busy(format!("{}: no freezer controller", c.path))
                })?;
                let action = if frozen { "freeze" } else { "thaw" };
                if frozen {
                    freezer.freeze()
                } else {
                    freezer.thaw()
                }
                .map_err(lib_err(&c.path, action))?;
            }
            CgroupManager::V2(_) => {
                let file = self.memory_dir().join("cgroup.freeze");
                fs::write(&file, if frozen { "1" } else { "0" })
                    .map_err(|source| CgroupError::Write { path: file, source })?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.is_frozen()? != frozen {
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy(format!(
                    "{}: freezer did not settle",
                    self.path()
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Whether the cgroup is (completely) frozen.
    ///
    /// # Errors
    /// [`CgroupError::Read`] if the freezer state cannot be read.
    pub fn is_frozen(&self) -> Result<bool> {
        match self {
            CgroupManager::V1(c) => {
                let file = PathBuf::from("/sys/fs/cgroup/freezer")
                    .join(&c.path)
                    .join("freezer.state");
                let state = fs::read_to_string(&file)
                    .map_err(|source| CgroupError::Read { path: file, source })?;
                Ok(state.trim() == "FROZEN")
            }
            CgroupManager::V2(_) => {
                Ok(read_keyed(&self.memory_dir().join("cgroup.events"), "frozen")? == 1)
            }
        }
    }

    /// How many processes the kernel's OOM killer killed in this cgroup.
    ///
    /// # Errors
    /// [`CgroupError::Read`] if the counter file cannot be read.
    pub fn oom_kill_count(&self) -> Result<u64> {
        let file = match self {
            CgroupManager::V1(_) => self.memory_dir().join("memory.oom_control"),
            CgroupManager::V2(_) => self.memory_dir().join("memory.events"),
        };
        read_keyed(&file, "oom_kill")
    }

    /// How many forks the pids limit refused in this cgroup.
    ///
    /// # Errors
    /// [`CgroupError::Read`] if `pids.events` cannot be read.
    pub fn pids_limit_hits(&self) -> Result<u64> {
        read_keyed(&self.pids_dir().join("pids.events"), "max")
    }

    /// Removes the cgroup, waiting up to `timeout` for its processes to be
    /// gone (the kernel releases a cgroup a little after its last exit).
    ///
    /// # Errors
    /// [`CgroupError::Busy`] if processes remain, [`CgroupError::Cgroups`] if
    /// removing fails for another reason.
    pub fn remove(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if let CgroupManager::V1(V1Cgroup {
            unified: Some(dir), ..
        }) = self
        {
            remove_dir_when_empty(dir, deadline)?;
        }
        loop {
            if !self.cgroup().exists() {
                return Ok(());
            }
            let busy = !self.processes().is_empty();
            if !busy {
                match self.cgroup().delete() {
                    Ok(()) if !self.cgroup().exists() => return Ok(()),
                    Ok(()) => {}
                    Err(e) if Instant::now() >= deadline => {
                        return Err(lib_err(self.path(), "remove")(e));
                    }
                    Err(_) => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy(self.path().to_owned()));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Removes a cgroup directory, retrying while the kernel still counts exited
/// processes in it.
fn remove_dir_when_empty(dir: &std::path::Path, deadline: Instant) -> Result<()> {
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) if Instant::now() >= deadline => {
                return Err(CgroupError::Write {
                    path: dir.to_owned(),
                    source,
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Reads `key value` lines and returns the value of `key` (0 if absent).
fn read_keyed(file: &std::path::Path, key: &str) -> Result<u64> {
    let text = fs::read_to_string(file).map_err(|source| CgroupError::Read {
        path: file.to_owned(),
        source,
    })?;
    Ok(parse_keyed(&text, key))
}

fn parse_keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_conversion_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn paths_are_validated() {
        assert_eq!(validate("/keelson/c1/").ok().as_deref(), Some("keelson/c1"));
        assert!(validate("../x").is_err());
        assert!(validate("/").is_err());
        assert!(validate("a//b").is_err());
    }

    #[test]
    fn device_rules_start_with_deny_all() {
        let rules = device_rules(None, &[]);
        assert!(!rules[0].allow);
        assert_eq!(rules[0].devtype, DeviceType::All);
        assert!(
            rules
                .iter()
                .any(|r| r.allow && r.major == 1 && r.minor == 3)
        );
        assert!(
            !rules
                .iter()
                .any(|r| r.allow && r.devtype == DeviceType::Block && r.major == 8)
        );
    }

    #[test]
    fn keyed_files_parse() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_keyed(v1, "oom_kill"), 3);
        let v2 = "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n";
        assert_eq!(parse_keyed(v2, "max"), 5);
        assert_eq!(parse_keyed(v2, "missing"), 0);
    }
}
