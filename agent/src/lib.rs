//! Keelson's node agent.
//!
//! Today the agent holds the eBPF service proxy ([`lb`]): socket-level load balancing of
//! Service virtual IPs to backends, attached to a cgroup2 subtree. Pod lifecycle, the
//! container runtime and the pod network join it as they land.
#![deny(missing_docs)]

pub mod lb;
