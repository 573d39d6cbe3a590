//! The container's root file system: the spec's mounts (bind, overlay, proc,
//! sysfs, tmpfs, devpts, mqueue, cgroup) made inside the container's own
//! mount namespace, a minimal `/dev`, then `pivot_root` (or `MS_MOVE` +
//! `chroot` with `--no-pivot`), masked and read-only paths.
//!
//! Everything here runs in the container's init, after it entered a new mount
//! namespace: the first step makes every mount private, so nothing done here
//! propagates back to the host.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{chdir, chroot, pivot_root};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount};

use crate::cgroups::CgroupLayout;

/// Errors preparing the root file system.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// `mount(2)` failed.
    #[error("mount {source_path:?} on {target} (type {fstype:?}, flags {flags:?}): {errno}")]
    Mount {
        /// The mount source.
        source_path: Option<PathBuf>,
        /// The mount point.
        target: PathBuf,
        /// The file system type.
        fstype: Option<String>,
        /// The mount flags.
        flags: MsFlags,
        /// The errno.
        errno: nix::Error,
    },
    /// Another system call failed.
    #[error("{syscall} {path}: {errno}")]
    Sys {
        /// The call.
        syscall: &'static str,
        /// Its path argument.
        path: PathBuf,
        /// The errno.
        errno: nix::Error,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A path in the spec cannot be used.
    #[error("path {path}: {reason}")]
    BadPath {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
}

type Result<T, E = RootfsError> = std::result::Result<T, E>;

/// Mount options split into flags, propagation and file-system data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags for the mount itself (`MS_RDONLY`, `MS_NOSUID`, …).
    pub flags: MsFlags,
    /// Flags cleared by options such as `rw`, `suid`, `dev`, `exec`.
    pub cleared: MsFlags,
    /// Propagation flags applied after mounting (`MS_PRIVATE`, `MS_SLAVE`, …).
    pub propagation: MsFlags,
    /// Whether this is a bind mount (`bind` or `rbind`, or type `bind`).
    pub bind: bool,
    /// Whether the bind is recursive (`rbind`).
    pub recursive: bool,
    /// Options passed to the file system as data (`mode=755`, `lowerdir=…`).
    pub data: String,
}

/// Splits mount options as `mount(8)` understands them.
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions {
        flags: MsFlags::empty(),
        cleared: MsFlags::empty(),
        propagation: MsFlags::empty(),
        bind: false,
        recursive: false,
        data: String::new(),
    };
    let mut data = Vec::new();
    for option in options {
        let (set, clear, propagation) = match option.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty(), MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => {
                out.bind = true;
                continue;
            }
            "rbind" => {
                out.bind = true;
                out.recursive = true;
                continue;
            }
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            other => {
                data.push(other.to_owned());
                continue;
            }
        };
        out.flags = (out.flags | set) & !clear;
        out.cleared |= clear;
        out.propagation |= propagation;
    }
    out.data = data.join(",");
    out
}

/// Joins `unsafe_path` under `root`, resolving symlinks as if `root` were
/// `/`, so that neither `..` nor a symlink in the rootfs leads outside it.
///
/// # Errors
/// [`RootfsError::BadPath`] on a symlink loop, [`RootfsError::Io`] if a link
/// cannot be read.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> Result<PathBuf> {
    let mut pending: Vec<PathBuf> = unsafe_path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut resolved: Vec<PathBuf> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.components().next() {
            None | Some(Component::RootDir) | Some(Component::CurDir) => continue,
            Some(Component::ParentDir) => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(RootfsError::BadPath {
                        path: unsafe_path.to_owned(),
                        reason: "too many symlinks",
                    });
                }
                let target = fs::read_link(&candidate).map_err(|source| RootfsError::Io {
                    action: "readlink",
                    path: candidate.clone(),
                    source,
                })?;
                if target.is_absolute() {
                    resolved.clear();
                }
                pending.extend(
                    target
                        .components()
                        .rev()
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(resolved);
    Ok(out)
}

fn do_mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(source, target, fstype, flags, data).map_err(|errno| RootfsError::Mount {
        source_path: source.map(Path::to_owned),
        target: target.to_owned(),
        fstype: fstype.map(str::to_owned),
        flags,
        errno,
    })
}

fn mkdir_all(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| RootfsError::Io {
        action: "create directory",
        path: path.to_owned(),
        source,
    })
}

fn touch(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        mkdir_all(parent)?;
    }
    if path.exists() {
        return Ok(());
    }
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .open(path)
        .map(drop)
        .map_err(|source| RootfsError::Io {
            action: "create file",
            path: path.to_owned(),
            source,
        })
}

/// What [`prepare`] needs to know besides the spec's mounts.
#[derive(Debug, Clone)]
pub struct RootfsConfig<'a> {
    /// The container's root file system (absolute host path).
    pub rootfs: &'a Path,
    /// The bundle directory, against which relative bind sources resolve.
    pub bundle: &'a Path,
    /// The spec's mounts, in order.
    pub mounts: &'a [Mount],
    /// The spec's `linux.rootfsPropagation`.
    pub propagation: Option<&'a str>,
    /// The spec's `linux.devices`, created beside the default devices.
    pub devices: &'a [LinuxDevice],
    /// The host's cgroup layout, for mounts of type `cgroup`.
    pub cgroup_layout: CgroupLayout,
    /// The container's cgroup path, bind-mounted for `cgroup` mounts on v1.
    pub cgroup_path: &'a str,
}

/// Makes every mount private, turns the rootfs into a mount point and mounts
/// the spec's mounts and default devices into it.
///
/// # Errors
/// [`RootfsError`] naming the mount or path that failed.
pub fn prepare(cfg: &RootfsConfig<'_>) -> Result<()> {
    // Nothing we do from here on may propagate to the host.
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    do_mount(
        Some(cfg.rootfs),
        cfg.rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let mut dev_is_tmpfs = false;
    for m in cfg.mounts {
        mount_one(cfg, m)?;
        if m.destination() == Path::new("/dev") {
            dev_is_tmpfs = true;
        }
    }
    create_devices(cfg.rootfs, cfg.devices, dev_is_tmpfs)?;
    if let Some(propagation) = cfg.propagation {
        let opts = parse_options(&[propagation.to_owned()]);
        if !opts.propagation.is_empty() {
            do_mount(None, cfg.rootfs, None, opts.propagation, None)?;
        }
    }
    Ok(())
}

fn mount_one(cfg: &RootfsConfig<'_>, m: &Mount) -> Result<()> {
    let options = parse_options(m.options().as_deref().unwrap_or_default());
    let typ = m.typ().as_deref().unwrap_or("none");
    let dest = secure_join(cfg.rootfs, m.destination())?;
    let bind = options.bind || typ == "bind";
    if bind {
        let source = m.source().as_deref().ok_or_else(|| RootfsError::BadPath {
            path: m.destination().clone(),
            reason: "bind mount without a source",
        })?;
        let source = if source.is_absolute() {
            source.to_owned()
        } else {
            cfg.bundle.join(source)
        };
        let meta = fs::metadata(&source).map_err(|e| RootfsError::Io {
            action: "stat bind source",
            path: source.clone(),
            source: e,
        })?;
        if meta.is_dir() {
            mkdir_all(&dest)?;
        } else {
            touch(&dest)?;
        }
        let mut flags = MsFlags::MS_BIND;
        if options.recursive {
            flags |= MsFlags::MS_REC;
        }
        do_mount(Some(&source), &dest, None, flags, None)?;
        if !options.flags.is_empty() {
            do_mount(
                None,
                &dest,
                None,
                flags | MsFlags::MS_REMOUNT | options.flags,
                None,
            )?;
        }
    } else if typ == "cgroup" || typ == "cgroup2" {
        mount_cgroup(cfg, &dest, &options)?;
    } else {
        mkdir_all(&dest)?;
        let source = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
        let data = (!options.data.is_empty()).then_some(options.data.as_str());
        do_mount(Some(&source), &dest, Some(typ), options.flags, data)?;
    }
    if !options.propagation.is_empty() {
        do_mount(None, &dest, None, options.propagation, None)?;
    }
    Ok(())
}

/// `cgroup` mounts: on v2 the container's cgroup2 (its namespace root); on v1
/// a tmpfs holding bind mounts of the container's own controller directories.
fn mount_cgroup(cfg: &RootfsConfig<'_>, dest: &Path, options: &MountOptions) -> Result<()> {
    mkdir_all(dest)?;
    match cfg.cgroup_layout {
        CgroupLayout::V2 => do_mount(
            Some(Path::new("cgroup2")),
            dest,
            Some("cgroup2"),
            options.flags,
            None,
        ),
        CgroupLayout::V1 => {
            let base = options.flags & !MsFlags::MS_RDONLY;
            do_mount(
                Some(Path::new("tmpfs")),
                dest,
                Some("tmpfs"),
                base,
                Some("mode=755"),
            )?;
            for controller in ["cpu", "cpuacct", "devices", "freezer", "memory", "pids"] {
                let host = Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(cfg.cgroup_path);
                if !host.is_dir() {
                    continue;
                }
                let target = dest.join(controller);
                mkdir_all(&target)?;
                do_mount(Some(&host), &target, None, MsFlags::MS_BIND, None)?;
                do_mount(
                    None,
                    &target,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | options.flags,
                    None,
                )?;
            }
            if options.flags.contains(MsFlags::MS_RDONLY) {
                do_mount(
                    None,
                    dest,
                    None,
                    MsFlags::MS_REMOUNT | options.flags,
                    Some("mode=755"),
                )?;
            }
            Ok(())
        }
    }
}

/// The devices every container gets (`/dev/null`, `zero`, `full`, `random`,
/// `urandom`, `tty`), as (name, major, minor).
pub const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn create_devices(rootfs: &Path, extra: &[LinuxDevice], dev_is_tmpfs: bool) -> Result<()> {
    let dev = secure_join(rootfs, Path::new("/dev"))?;
    mkdir_all(&dev)?;
    for (name, major, minor) in DEFAULT_DEVICES {
        make_device(&dev.join(name), SFlag::S_IFCHR, major, minor, 0o666, None)?;
    }
    for device in extra {
        let kind = match device.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => continue,
        };
        let path = secure_join(rootfs, device.path())?;
        if let Some(parent) = path.parent() {
            mkdir_all(parent)?;
        }
        let owner = Some((device.uid().unwrap_or(0), device.gid().unwrap_or(0)));
        make_device(
            &path,
            kind,
            device.major() as u64,
            device.minor() as u64,
            device.file_mode().unwrap_or(0o666),
            owner,
        )?;
    }
    if dev_is_tmpfs {
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            let path = dev.join(link);
            if fs::symlink_metadata(&path).is_ok() {
                continue;
            }
            symlink(target, &path).map_err(|source| RootfsError::Io {
                action: "symlink",
                path,
                source,
            })?;
        }
    }
    Ok(())
}

fn make_device(
    path: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path).map_err(|source| RootfsError::Io {
            action: "replace device",
            path: path.to_owned(),
            source,
        })?;
    }
    mknod(
        path,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .map_err(|errno| RootfsError::Sys {
        syscall: "mknod",
        path: path.to_owned(),
        errno,
    })?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| RootfsError::Io {
            action: "chown",
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// Makes `rootfs` the root of the mount namespace: `pivot_root(2)` and a lazy
/// unmount of the old root, or with `no_pivot` a move of the rootfs onto `/`
/// and `chroot(2)` (for roots on ramfs, where `pivot_root` is refused).
///
/// # Errors
/// [`RootfsError::Sys`] or [`RootfsError::Mount`] naming the failing step.
pub fn enter(rootfs: &Path, no_pivot: bool) -> Result<()> {
    let sys = |syscall, path: &Path| {
        let path = path.to_owned();
        move |errno| RootfsError::Sys {
            syscall,
            path,
            errno,
        }
    };
    chdir(rootfs).map_err(sys("chdir", rootfs))?;
    if no_pivot {
        do_mount(Some(rootfs), Path::new("/"), None, MsFlags::MS_MOVE, None)?;
        chroot(".").map_err(sys("chroot", rootfs))?;
    } else {
        pivot_root(".", ".").map_err(sys("pivot_root", rootfs))?;
        // The old root is now mounted on top of the new one, at ".".
        do_mount(
            None,
            Path::new("."),
            None,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None,
        )?;
        umount2(".", MntFlags::MNT_DETACH).map_err(sys("umount2 old root", rootfs))?;
    }
    chdir("/").map_err(sys("chdir", Path::new("/")))?;
    Ok(())
}

/// Hides `paths` (the spec's `linux.maskedPaths`): `/dev/null` over files, an
/// empty read-only tmpfs over directories. Missing paths are skipped.
///
/// # Errors
/// [`RootfsError::Mount`].
pub fn mask_paths(paths: &[String]) -> Result<()> {
    for path in paths {
        let path = Path::new(path);
        match fs::metadata(path) {
            Err(_) => continue,
            Ok(meta) if meta.is_dir() => do_mount(
                Some(Path::new("tmpfs")),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            )?,
            Ok(_) => do_mount(
                Some(Path::new("/dev/null")),
                path,
                None,
                MsFlags::MS_BIND,
                None,
            )?,
        }
    }
    Ok(())
}

/// Makes `paths` (the spec's `linux.readonlyPaths`) read-only. Missing paths
/// are skipped.
///
/// # Errors
/// [`RootfsError::Mount`].
pub fn readonly_paths(paths: &[String]) -> Result<()> {
    for path in paths {
        let path = Path::new(path);
        if fs::symlink_metadata(path).is_err() {
            continue;
        }
        let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
        do_mount(Some(path), path, None, flags, None)?;
        do_mount(
            None,
            path,
            None,
            flags
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None,
        )?;
    }
    Ok(())
}

/// Remounts the new root read-only (`root.readonly`).
///
/// # Errors
/// [`RootfsError::Mount`].
pub fn readonly_root() -> Result<()> {
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> MountOptions {
        parse_options(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let o = opts(&["nosuid", "strictatime", "mode=755", "size=65536k"]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(o.data, "mode=755,size=65536k");
        assert!(!o.bind);
        let o = opts(&["rbind", "ro", "rprivate"]);
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        let o = opts(&["ro", "rw"]);
        assert!(o.flags.is_empty());
    }

    #[test]
    fn secure_join_stays_inside_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
        symlink("/usr/lib", root.join("lib")).expect("abs link");
        symlink("../../../../etc", root.join("escape")).expect("rel link");
        assert_eq!(
            secure_join(root, Path::new("/lib/x")).expect("join"),
            root.join("usr/lib/x")
        );
        assert_eq!(
            secure_join(root, Path::new("/escape/passwd")).expect("join"),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../proc")).expect("join"),
            root.join("proc")
        );
        symlink("loop", root.join("loop")).expect("loop link");
        assert!(secure_join(root, Path::new("/loop")).is_err());
    }
}
