//! Keelson's container runtime: runs OCI bundles (a `config.json` plus a root
//! filesystem) with Linux namespaces, cgroups, bind/overlay mounts and
//! `pivot_root`, without containerd or runc.
//!
//! The entry points are [`ContainerBuilder`] (create a container from a
//! bundle) and [`Container`] (load, start, query, signal, wait for and delete
//! a container whose state lives under a state root such as
//! `/run/keelson-runtime`). The `keelson-runtime` binary wraps them in a
//! command line that mirrors runc's.
//!
//! How a container comes to be: `create` makes `<root>/<id>/` with an
//! `exec.fifo`, creates the cgroup (v1/hybrid or v2, see [`cgroups`]) and
//! `clone(2)`s the init into new PID, mount, UTS, IPC and network namespaces
//! (or joins those the spec gives a `path` for, see [`namespaces`]). The
//! runtime moves the init into its cgroup, the init prepares its root file
//! system ([`rootfs`]), hostname, rlimits, terminal, user and capabilities,
//! reports back over a socket pair and blocks opening the FIFO; `start`
//! opens the FIFO, the init execs the user process. Status is derived from
//! the init's PID and start time plus the FIFO's presence ([`state`]).
//!
//! [`Container::exec`] runs further processes in a running container (its
//! namespaces and cgroup); [`hooks`] runs the spec's lifecycle hooks.
//!
//! Not supported (logged when the spec asks for it): user namespaces
//! (refused), seccomp, AppArmor/SELinux labels, device rules on pure cgroup
//! v2, checkpoint/restore.
//!
//! Requires Linux ≥ 4.6 (cgroup namespaces) and root.
#![deny(missing_docs)]

pub mod cgroups;
mod channel;
pub mod container;
pub mod error;
pub mod hooks;
mod init;
pub mod namespaces;
pub mod rootfs;
pub mod signal;
pub mod state;

pub use cgroups::CgroupManager;
pub use container::{Container, ContainerBuilder};
pub use error::{Error, Result};
pub use state::{ContainerStatus, OciState};

/// The default state root of the command line, as runc's `/run/runc`.
pub const DEFAULT_STATE_ROOT: &str = "/run/keelson-runtime";
