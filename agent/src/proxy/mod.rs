//! The service proxy: keeps the eBPF load balancer in step with the cluster's Services and
//! EndpointSlices, as kube-proxy does with iptables.
//!
//! Each change to a Service or one of its EndpointSlices recomputes only that Service's
//! frontends ([`desired`]) and writes only their map entries; after a (re)list the maps are
//! pruned of Services that no longer exist, so an agent restarted while Services were deleted
//! converges. Only ready endpoints become backends.

pub mod desired;
mod external;
mod nodes;
mod sync;

pub use external::{ExternalFrontends, PacketMaps};
pub use sync::{SyncError, run};
