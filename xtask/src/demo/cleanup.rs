//! Removing what the demo's node left: processes in its cgroup trees (the agent's
//! per-container supervisors and the containers outlive the agent by design), mounts under
//! its state directory, and the cgroup directories in every hierarchy.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Mount points of every cgroup hierarchy (v1 controllers and cgroup2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fs = right.split_whitespace().next()?;
            (fs == "cgroup" || fs == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// SIGKILLs every process in the tree at `dir`; how many there were.
fn kill_tree(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on a process inside the demo's own cgroup tree.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            n += 1;
        }
    }
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            n += kill_tree(&e.path());
        }
    }
    n
}

fn remove_tree(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Kills the processes under `rel` (relative to each hierarchy's root) and removes the
/// directories; whether all of them are gone.
pub fn cgroups(rel: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cgroup_mounts()
        .iter()
        .map(|m| kill_tree(&m.join(rel)))
        .sum::<usize>()
        > 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut gone = true;
    for m in cgroup_mounts() {
        let dir = m.join(rel);
        for _ in 0..50 {
            remove_tree(&dir);
            if !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        gone &= !dir.exists();
    }
    gone
}

/// Lazily unmounts everything mounted at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) with a valid C string naming a mount point under our state dir.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
