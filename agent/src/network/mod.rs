//! The pod network: on each node a bridge holding the first address of the node's pod CIDR,
//! a veth pair per pod with one end in the pod's network namespace, and IPAM that hands out
//! addresses from the CIDR and remembers them on disk; between nodes, routes to every peer's
//! pod CIDR (host-gateway or VXLAN, [`peers`]); and NAT in nftables for egress masquerade and
//! hostPorts ([`nft`]).

mod ipam;
mod link;
pub mod nft;
pub mod peers;
pub mod routes;
pub mod vxlan;

pub use ipam::Ipam;
pub use link::{PodLink, ensure_bridge, remove_pod_link, setup_pod_link};
pub use nft::{HostPort, Nat};
pub use peers::{Peer, PeerConfig, PeerRouter};
pub use routes::Mode;
pub use vxlan::VxlanConfig;

use std::path::PathBuf;

/// Errors of the pod network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A netlink request failed.
    #[error("{action}: {source}")]
    Netlink {
        /// What was being done.
        action: String,
        /// The cause.
        source: rtnetlink::Error,
    },
    /// A file or namespace operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CIDR has no free address left.
    #[error("no free address left in {0}")]
    Exhausted(String),
    /// The CIDR is not usable.
    #[error("pod CIDR {0} is not usable: {1}")]
    Cidr(String, String),
}

/// Results of the pod network.
pub type Result<T, E = NetworkError> = std::result::Result<T, E>;
