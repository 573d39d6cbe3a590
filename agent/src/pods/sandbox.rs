//! A pod sandbox without a pause process: new network, UTS and IPC namespaces, made by a
//! short-lived thread and kept alive by bind-mounting their `/proc/thread-self/ns/*` files
//! under the pod's directory. Containers join them by path; the UTS namespace carries the pod's host name.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

/// The namespaces a sandbox holds, by their `/proc/<pid>/ns/` names.
pub const SANDBOX_NAMESPACES: [&str; 3] = ["net", "uts", "ipc"];

/// `statfs` magic of nsfs, the file system of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The namespace files of a sandbox in `dir`.
pub fn ns_path(dir: &Path, ns: &str) -> PathBuf {
    dir.join(ns)
}

/// Whether the sandbox in `dir` is complete (every namespace file is a held namespace).
pub fn exists(dir: &Path) -> bool {
    SANDBOX_NAMESPACES.iter().all(|ns| {
        nix::sys::statfs::statfs(&ns_path(dir, ns))
            .is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
    })
}

/// Creates the sandbox's namespaces under `dir` with `hostname`.
///
/// # Errors
/// When namespaces cannot be made or bind-mounted.
pub fn create(dir: &Path, hostname: &str) -> io::Result<()> {
    destroy(dir);
    fs::create_dir_all(dir)?;
    let dir = dir.to_owned();
    let hostname = hostname.to_owned();
    std::thread::spawn(move || -> io::Result<()> {
        // Only this thread moves; it ends right after.
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)?;
        nix::unistd::sethostname(&hostname)?;
        for ns in SANDBOX_NAMESPACES {
            let target = ns_path(&dir, ns);
            fs::File::create(&target)?;
            let source = format!("/proc/thread-self/ns/{ns}");
            mount(
                Some(source.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("sandbox thread panicked"))?
}

/// Releases the sandbox's namespaces (they go away with their last user) and removes `dir`.
pub fn destroy(dir: &Path) {
    for ns in SANDBOX_NAMESPACES {
        let path = ns_path(dir, ns);
        let _ = umount2(&path, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&path);
    }
    let _ = fs::remove_dir(dir);
}
