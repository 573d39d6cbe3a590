//! The service proxy: keeps the eBPF load balancer in step with the cluster's Services and
//! EndpointSlices, as kube-proxy does with iptables.
//!
//! Each change to a Service or one of its EndpointSlices recomputes only that Service's
//! frontends ([`desired`]) and writes only their map entries; after a (re)list the maps are
//! pruned of Services that no longer exist, so an agent restarted while Services were deleted
//! converges. [`health`] serves the health-check node ports of `externalTrafficPolicy: Local`
//! load balancers. Only ready endpoints (or, when a port has none, terminating but serving ones)
//! become backends. [`metrics`] serves the per-service counters.

pub mod desired;
mod external;
pub mod health;
pub mod metrics;
mod nodes;
mod sync;

pub use external::{ExternalFrontends, PacketMaps};
pub use sync::{Settings, SyncError, run, run_with};
