//! The crate-level error type, gathering each module's errors.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The container's state could not be read or written.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A cgroup operation failed.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::CgroupError),
    /// A lifecycle hook failed.
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    /// A signal name or number was not understood.
    #[error(transparent)]
    Signal(#[from] crate::signal::SignalError),
    /// A namespace in the spec is not supported or could not be opened.
    #[error(transparent)]
    Namespace(#[from] crate::namespaces::NamespaceError),
    /// No container with this id exists under the state root.
    #[error("container {0} does not exist")]
    NotFound(String),
    /// A container with this id already exists under the state root.
    #[error("container {0} already exists")]
    AlreadyExists(String),
    /// The container id is not usable as a file name.
    #[error("invalid container id {0:?}: use letters, digits, '_', '-', '.' and '+'")]
    InvalidId(String),
    /// The bundle's `config.json` could not be read or is invalid.
    #[error("bundle {path}: {message}")]
    Bundle {
        /// The bundle directory or file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The operation does not fit the container's current status.
    #[error("container {id} is {status}: cannot {action}")]
    WrongStatus {
        /// The container id.
        id: String,
        /// Its current status.
        status: crate::state::ContainerStatus,
        /// What was asked.
        action: &'static str,
    },
    /// The container's init process reported a failure while setting up.
    #[error("container init failed: {0}")]
    Init(String),
    /// A system call in the runtime itself failed.
    #[error("{syscall} {context}: {source}")]
    Sys {
        /// The failing call.
        syscall: &'static str,
        /// What it was applied to.
        context: String,
        /// The errno.
        source: nix::Error,
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
    /// Waiting on the container timed out.
    #[error("timed out after {seconds} s waiting for container {id} to {what}")]
    Timeout {
        /// The container id.
        id: String,
        /// The awaited event.
        what: &'static str,
        /// How long we waited.
        seconds: u64,
    },
}

impl Error {
    pub(crate) fn sys(
        syscall: &'static str,
        context: impl Into<String>,
        source: nix::Error,
    ) -> Self {
        Error::Sys {
            syscall,
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
