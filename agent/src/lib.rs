//! Keelson's node agent.
//!
//! Today the agent holds the eBPF load balancer ([`lb`]): socket-level load balancing of
//! Service virtual IPs to backends, attached to a cgroup2 subtree; and the service proxy
//! ([`proxy`]) that keeps it in step with the cluster's Services and EndpointSlices. Pod
//! lifecycle, the container runtime and the pod network join them as they land.
#![deny(missing_docs)]

pub mod lb;
pub mod proxy;
