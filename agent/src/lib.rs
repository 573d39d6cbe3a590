//! Keelson's node agent.
//!
//! - [`boot`]: first boot of a network-booted node (NoCloud seed, then `node`);
//! - [`node`]: the Node object and its Lease heartbeat;
//! - [`image`]: the content-addressed image store (OCI layout and `docker save` import);
//! - [`pods`]: pod sandboxes, containers run by per-container supervisors through
//!   `keelson-runtime`, restart policy, probes, graceful deletion and pod status;
//! - [`network`]: the pod network (bridge, veth pairs, IPAM);
//! - [`logs`]: CRI log files and the HTTP endpoint that serves them;
//! - [`lb`] and [`proxy`]: the eBPF service load balancer and the proxy that keeps it in step
//!   with Services and EndpointSlices;
//! - [`dns`]: the cluster DNS server and the pods' resolv.conf and hosts files.
#![deny(missing_docs)]

pub mod boot;
pub mod dns;
pub mod image;
pub mod lb;
pub mod logs;
pub mod network;
pub mod node;
pub mod pods;
pub mod proxy;
mod svcwatch;
