//! Which namespaces a container gets, from the spec's `linux.namespaces`:
//! new ones are created by `clone(2)` (the cgroup namespace by `unshare(2)`
//! once the init sits in its cgroup), and entries with a `path` are joined
//! with `setns(2)`.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};

/// Errors planning or entering namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// The spec asks for a namespace type this runtime does not handle.
    #[error("namespace type {0} is not supported by keelson-runtime")]
    Unsupported(String),
    /// The spec lists a namespace type twice.
    #[error("namespace type {0} is listed twice")]
    Duplicate(String),
    /// The namespace file could not be opened.
    #[error("open namespace {path}: {source}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `setns(2)` failed.
    #[error("setns {path}: {source}")]
    Setns {
        /// The namespace file.
        path: PathBuf,
        /// The errno.
        source: nix::Error,
    },
}

type Result<T, E = NamespaceError> = std::result::Result<T, E>;

/// The namespaces of a container, sorted by how they are entered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePlan {
    /// Namespaces created by `clone(2)`.
    pub clone_flags: CloneFlags,
    /// Existing namespaces (other than PID) joined by the init with `setns(2)`.
    pub join: Vec<(CloneFlags, PathBuf)>,
    /// An existing PID namespace, joined before the init is cloned.
    pub join_pid: Option<PathBuf>,
    /// Whether the init unshares a new cgroup namespace after entering its cgroup.
    pub new_cgroup: bool,
}

fn flag_of(typ: LinuxNamespaceType) -> Result<CloneFlags> {
    Ok(match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        other => return Err(NamespaceError::Unsupported(other.to_string())),
    })
}

impl NamespacePlan {
    /// Plans the namespaces of `namespaces` (the spec's `linux.namespaces`).
    ///
    /// # Errors
    /// [`NamespaceError::Unsupported`] for user and time namespaces,
    /// [`NamespaceError::Duplicate`] for a type listed twice.
    pub fn from_spec(namespaces: &[LinuxNamespace]) -> Result<Self> {
        let mut plan = NamespacePlan {
            clone_flags: CloneFlags::empty(),
            join: Vec::new(),
            join_pid: None,
            new_cgroup: false,
        };
        let mut seen = CloneFlags::empty();
        for ns in namespaces {
            let flag = flag_of(ns.typ())?;
            if seen.contains(flag) {
                return Err(NamespaceError::Duplicate(ns.typ().to_string()));
            }
            seen |= flag;
            match (ns.path(), ns.typ()) {
                (Some(path), LinuxNamespaceType::Pid) => plan.join_pid = Some(path.clone()),
                (Some(path), _) => plan.join.push((flag, path.clone())),
                (None, LinuxNamespaceType::Cgroup) => plan.new_cgroup = true,
                (None, _) => plan.clone_flags |= flag,
            }
        }
        Ok(plan)
    }

    /// Whether the container gets a mount namespace of its own.
    pub fn new_mount_namespace(&self) -> bool {
        self.clone_flags.contains(CloneFlags::CLONE_NEWNS)
    }

    /// Whether the container gets a UTS namespace of its own.
    pub fn new_uts_namespace(&self) -> bool {
        self.clone_flags.contains(CloneFlags::CLONE_NEWUTS)
    }
}

/// Opens a namespace file for [`enter`].
///
/// # Errors
/// [`NamespaceError::Open`].
pub fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| NamespaceError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Moves the calling thread into the namespace `file` of type `flag`.
///
/// # Errors
/// [`NamespaceError::Setns`].
pub fn enter(file: &File, flag: CloneFlags, path: &Path) -> Result<()> {
    setns(file.as_fd(), flag).map_err(|source| NamespaceError::Setns {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxNamespaceBuilder;

    fn ns(typ: LinuxNamespaceType, path: Option<&str>) -> LinuxNamespace {
        let mut b = LinuxNamespaceBuilder::default().typ(typ);
        if let Some(p) = path {
            b = b.path(p);
        }
        b.build().expect("namespace")
    }

    #[test]
    fn plans_new_and_joined_namespaces() {
        let plan = NamespacePlan::from_spec(&[
            ns(LinuxNamespaceType::Pid, None),
            ns(LinuxNamespaceType::Mount, None),
            ns(LinuxNamespaceType::Network, Some("/run/netns/x")),
            ns(LinuxNamespaceType::Cgroup, None),
        ])
        .expect("plan");
        assert_eq!(
            plan.clone_flags,
            CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS
        );
        assert_eq!(
            plan.join,
            vec![(CloneFlags::CLONE_NEWNET, PathBuf::from("/run/netns/x"))]
        );
        assert!(plan.new_cgroup);
        assert!(plan.join_pid.is_none());
    }

    #[test]
    fn rejects_user_namespaces_and_duplicates() {
        assert!(NamespacePlan::from_spec(&[ns(LinuxNamespaceType::User, None)]).is_err());
        assert!(
            NamespacePlan::from_spec(&[
                ns(LinuxNamespaceType::Uts, None),
                ns(LinuxNamespaceType::Uts, None)
            ])
            .is_err()
        );
    }
}
