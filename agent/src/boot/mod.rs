//! First boot of a network-booted node: read the machine's cloud-init NoCloud seed, apply what a
//! node image needs of it, and say how to start `keelson-agent node`.
//!
//! - [`seed`]: where the seed is (`ds=nocloud;s=URL` on the kernel command line) and fetching
//!   `meta-data` and `user-data` from it over plain HTTP;
//! - [`cloud_config`]: the subset of `#cloud-config` the node image honours (`hostname`,
//!   `write_files`); everything else (`runcmd`, `packages`, …) is for installed servers;
//! - [`apply`]: the host name and the files, written under a root directory;
//! - [`agent_args`]: the `keelson-agent node` arguments from `/etc/keelson/agent-args`, with the
//!   image's defaults.

pub mod agent_args;
pub mod apply;
pub mod cloud_config;
pub mod seed;

use std::path::PathBuf;

/// Errors of the first-boot steps, each naming the URL, document or file involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `--nocloud-url` and no `ds=nocloud;s=…` on the kernel command line.
    #[error("no NoCloud seed: pass --nocloud-url or boot with ds=nocloud;s=URL ({0})")]
    NoSeed(String),
    /// The seed URL is not a plain `http://` URL.
    #[error("bad seed URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A document could not be fetched before the deadline.
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// The document's URL.
        url: String,
        /// The last failure.
        reason: String,
    },
    /// A seed document is not what the node image understands.
    #[error("{doc}: {reason}")]
    Parse {
        /// `meta-data` or `user-data`.
        doc: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A `write_files` entry cannot be honoured.
    #[error("write_files entry {path:?}: {reason}")]
    BadFile {
        /// The entry's path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Setting the host name failed.
    #[error("setting the host name to {name:?}: {source}")]
    Hostname {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
