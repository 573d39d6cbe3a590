//! Errors of the service load balancer.

use std::path::PathBuf;

use super::service::Frontend;

/// A failure of the service load balancer, with the object that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A map operation failed.
    #[error("{op} on BPF map {map} failed")]
    Map {
        /// What was attempted.
        op: &'static str,
        /// The map's name.
        map: &'static str,
        /// The cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// A pinned map could not be opened.
    #[error("cannot open pinned map {}: is the load balancer attached (`keelson-agent lb attach`)?", path.display())]
    OpenPin {
        /// The pin's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// The embedded eBPF object could not be loaded.
    #[error("loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded into the kernel or attached.
    #[error("program {program}: {op} failed")]
    Program {
        /// The program's name.
        program: &'static str,
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The embedded object lacks a program the agent expects (a build mismatch).
    #[error("program {program} is missing from the embedded eBPF object")]
    MissingProgram {
        /// The program's name.
        program: &'static str,
    },
    /// A program's link could not be turned into a pinnable link.
    #[error("program {program}: link is not a BPF link (kernel older than 5.7?)")]
    Link {
        /// The program's name.
        program: &'static str,
        /// The cause.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A link could not be pinned.
    #[error("pinning {} failed", path.display())]
    Pin {
        /// The pin's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: aya::pin::PinError,
    },
    /// The pin directory is not on a bpf filesystem.
    #[error(
        "{} is not on a bpf filesystem; mount one first (`mount -t bpf bpf /sys/fs/bpf`)",
        path.display()
    )]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("{op} {} failed", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path it was attempted on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A service was given more backends than a service may have.
    #[error("service {frontend} has {count} backends; at most {max} are supported")]
    TooManyBackends {
        /// The service.
        frontend: Frontend,
        /// How many were given.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// All service ids are in use.
    #[error("no free service id left")]
    IdsExhausted,
    /// Every Maglev table pair is taken by another Maglev service.
    #[error("service {frontend} cannot use Maglev: all {max} Maglev services' tables are taken")]
    MaglevTablesExhausted {
        /// The service.
        frontend: Frontend,
        /// How many Maglev services the map holds.
        max: u32,
    },
}

/// Result of load balancer operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
