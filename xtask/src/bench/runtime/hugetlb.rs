//! crun 1.8 refuses a hybrid cgroup layout while the cgroup2 tree still offers the `hugetlb`
//! controller. Mounting `hugetlb` as a v1 hierarchy takes it away from cgroup2; the guard
//! here does that for the benchmark only and undoes it (unmount, rmdir) when dropped, so the
//! host is left as it was, also when the benchmark fails.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

/// Where the v1 hierarchy is mounted (the directory DESIGN.md names).
const MOUNT_POINT: &str = "/sys/fs/cgroup/hugetlb";

/// Whether something is already mounted at [`MOUNT_POINT`].
pub fn mounted() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(MOUNT_POINT))
}

/// A `hugetlb` v1 mount this benchmark made; unmounted (and its directory removed, if the
/// benchmark made that too) on drop.
pub struct HugetlbV1 {
    dir: PathBuf,
    made_dir: bool,
}

impl HugetlbV1 {
    /// Mounts `hugetlb` as cgroup v1 at [`MOUNT_POINT`].
    ///
    /// # Errors
    /// Something is mounted there already, or the mount fails.
    pub fn mount() -> Result<Self> {
        if mounted() {
            bail!("{MOUNT_POINT} is already mounted");
        }
        let dir = PathBuf::from(MOUNT_POINT);
        let made_dir = !dir.exists();
        if made_dir {
            fs::create_dir(&dir).with_context(|| format!("creating {MOUNT_POINT}"))?;
        }
        let guard = HugetlbV1 { dir, made_dir };
        let out = Command::new("mount")
            .args(["-t", "cgroup", "-o", "hugetlb", "hugetlb", MOUNT_POINT])
            .output()
            .context("running mount")?;
        if !out.status.success() {
            // Dropping the guard removes the directory again; there is nothing to unmount,
            // and the failed unmount in drop is harmless.
            bail!(
                "mount -t cgroup -o hugetlb: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(guard)
    }
}

/// Removes the cgroups under `dir`, deepest first. A v1 hierarchy with cgroups left in it
/// survives its unmount and keeps the controller away from cgroup2; rmdir only succeeds on
/// cgroups without processes, so nothing running is touched.
fn remove_children(dir: &std::path::Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_children(&e.path());
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// Whether `hugetlb` is still bound to a v1 hierarchy (its hierarchy id in /proc/cgroups).
fn bound_to_v1() -> bool {
    fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .any(|(name, rest)| name == "hugetlb" && !rest.starts_with("0\t"))
}

fn umount(dir: &std::path::Path) {
    remove_children(dir);
    match Command::new("umount").arg(dir).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "warning: umount {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("warning: umount {}: {e}", dir.display()),
    }
}

impl Drop for HugetlbV1 {
    fn drop(&mut self) {
        // Right after crun's runs its removed cgroups may still be dying; a v1 root unmounted
        // then stays alive, hidden, and keeps hugetlb from cgroup2. Mount it again and retry
        // until the controller is back.
        // The root is released a moment after the unmount: wait for that before retrying.
        for attempt in 0..5 {
            if mounted() {
                umount(&self.dir);
            }
            for _ in 0..30 {
                if !bound_to_v1() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if !bound_to_v1() || attempt == 4 {
                break;
            }
            let _ = Command::new("mount")
                .args(["-t", "cgroup", "-o", "hugetlb", "hugetlb"])
                .arg(&self.dir)
                .output();
        }
        if mounted() {
            umount(&self.dir);
        }
        if bound_to_v1() {
            eprintln!("warning: hugetlb is still bound to a cgroup v1 hierarchy");
        }
        if self.made_dir
            && !mounted()
            && let Err(e) = fs::remove_dir(&self.dir)
        {
            eprintln!("warning: rmdir {}: {e}", self.dir.display());
        }
    }
}
