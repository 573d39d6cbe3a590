//! Applying cloud-config to the machine: its host name, and `write_files` written under a root
//! directory (`/` on a node; a temporary directory in tests).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use super::cloud_config::{CloudConfig, MetaData, WriteFile};
use super::{Error, Result};

/// Sets the kernel's host name: the one piece of the host outside the root directory.
pub trait HostName {
    /// Sets the host name.
    ///
    /// # Errors
    /// The system call failed.
    fn set(&self, name: &str) -> std::io::Result<()>;
}

/// The real host name, through `sethostname(2)` (needs `CAP_SYS_ADMIN` in the UTS namespace).
pub struct KernelHostName;

impl HostName for KernelHostName {
    fn set(&self, name: &str) -> std::io::Result<()> {
        nix::unistd::sethostname(name).map_err(std::io::Error::from)
    }
}

/// The host name to use: cloud-config's `hostname`, else meta-data's `local-hostname`.
pub fn hostname<'a>(cc: &'a CloudConfig, md: &'a MetaData) -> Option<&'a str> {
    cc.hostname
        .as_deref()
        .or(md.local_hostname.as_deref())
        .map(str::trim)
        .filter(|h| !h.is_empty())
}

/// Sets the host name and writes `/etc/hostname` under `root`.
///
/// # Errors
/// [`Error::Hostname`] when the name is not a valid host name or cannot be set;
/// [`Error::Io`] when `/etc/hostname` cannot be written.
pub fn set_hostname(name: &str, root: &Path, host: &dyn HostName) -> Result<()> {
    let valid = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid {
        return Err(Error::Hostname {
            name: name.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a host name"),
        });
    }
    host.set(name).map_err(|source| Error::Hostname {
        name: name.to_owned(),
        source,
    })?;
    write_file(
        &root.join("etc/hostname"),
        format!("{name}\n").as_bytes(),
        0o644,
        false,
    )
}

/// Where an absolute `write_files` path lands under `root`; `..` and relative paths are
/// refused so that seed data cannot write outside it.
///
/// # Errors
/// [`Error::BadFile`] for a relative path or one with `..`.
pub fn target(root: &Path, path: &str) -> Result<PathBuf> {
    let bad = |reason: &str| Error::BadFile {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(bad("the path must be absolute"));
    }
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad("the path must not contain '..'"));
            }
        }
    }
    if out == root {
        return Err(bad("the path names no file"));
    }
    Ok(out)
}

/// Writes every `write_files` entry under `root`, in order; returns the files written.
///
/// # Errors
/// The first entry that is invalid ([`Error::BadFile`]) or cannot be written ([`Error::Io`]);
/// entries before it are written.
pub fn write_files(files: &[WriteFile], root: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::with_capacity(files.len());
    for f in files {
        let path = target(root, &f.path)?;
        write_file(&path, &f.bytes()?, f.mode()?, f.append)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes a file with `mode`, creating its parent directories. A replaced file is written to a
/// temporary name and renamed, so a reader never sees half of it (or a secret with the wrong
/// mode).
fn write_file(path: &Path, bytes: &[u8], mode: u32, append: bool) -> Result<()> {
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io {
            op,
            path: p,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    if append {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode)
            .open(path)
            .map_err(io("opening", path))?;
        return f.write_all(bytes).map_err(io("appending to", path));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".keelson-tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    // The umask may have cut the mode given at creation.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of", &tmp))?;
    f.write_all(bytes).map_err(io("writing", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("renaming to", path))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::super::cloud_config::parse_user_data;
    use super::*;

    #[derive(Default)]
    struct FakeHost(RefCell<Vec<String>>);

    impl HostName for FakeHost {
        fn set(&self, name: &str) -> std::io::Result<()> {
            self.0.borrow_mut().push(name.to_owned());
            Ok(())
        }
    }

    #[test]
    fn writes_files_with_modes_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        let cc = parse_user_data(
            "#cloud-config\nwrite_files:\n\
             - path: /etc/keelson/bootstrap-kubeconfig\n  permissions: '0600'\n  content: secret\n\
             - path: /etc/keelson/agent-args\n  content: '--node-name n1'\n\
             - path: /etc/keelson/agent-args\n  append: true\n  content: ' --x'\n",
        )
        .unwrap();
        let written = write_files(&cc.write_files, root.path()).unwrap();
        assert_eq!(written.len(), 3);
        let kc = root.path().join("etc/keelson/bootstrap-kubeconfig");
        assert_eq!(std::fs::read_to_string(&kc).unwrap(), "secret");
        let mode = std::fs::metadata(&kc).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/keelson/agent-args")).unwrap(),
            "--node-name n1 --x"
        );
        assert!(
            !root
                .path()
                .join("etc/keelson/agent-args.keelson-tmp")
                .exists()
        );
    }

    #[test]
    fn refuses_paths_outside_the_root() {
        let root = Path::new("/r");
        assert_eq!(target(root, "/etc/x").unwrap(), Path::new("/r/etc/x"));
        assert!(target(root, "etc/x").is_err());
        assert!(target(root, "/etc/../../x").is_err());
        assert!(target(root, "/").is_err());
    }

    #[test]
    fn hostname_is_set_and_recorded() {
        let root = tempfile::tempdir().unwrap();
        let host = FakeHost::default();
        set_hostname("n1", root.path(), &host).unwrap();
        assert_eq!(*host.0.borrow(), vec!["n1".to_owned()]);
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/hostname")).unwrap(),
            "n1\n"
        );
        assert!(set_hostname("bad name;", root.path(), &host).is_err());
        assert_eq!(host.0.borrow().len(), 1);
    }

    #[test]
    fn hostname_prefers_cloud_config() {
        let md = MetaData {
            instance_id: None,
            local_hostname: Some("from-meta".into()),
        };
        let cc = parse_user_data("#cloud-config\nhostname: from-user\n").unwrap();
        assert_eq!(hostname(&cc, &md), Some("from-user"));
        assert_eq!(hostname(&CloudConfig::default(), &md), Some("from-meta"));
        assert_eq!(
            hostname(&CloudConfig::default(), &MetaData::default()),
            None
        );
    }
}
