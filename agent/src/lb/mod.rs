//! Service load balancing in eBPF.
//!
//! The kernel side (`ebpf/programs`) rewrites `connect(2)` to a service frontend into a connect
//! to one of its backends, at the `cgroup/connect4` hook. This module loads and attaches that
//! program, pins it and its maps under a bpffs directory so that they outlive the agent, and
//! offers a service-level API over the maps ([`ServiceTable`]). NodePort and externalIP
//! traffic from outside the node goes through tc programs on the node's interfaces
//! ([`attach_tc`]), which choose backends the same way over maps of their own.
//!
//! Backends are chosen at random, or by Maglev consistent hashing ([`Algorithm`]), optionally
//! with session affinity ([`ServiceOptions`]); the "client" of affinity and Maglev at this
//! socket layer is the connecting socket's bound source address if it has one, otherwise its
//! network namespace (`bpf_get_netns_cookie`): one pod, or the node itself. On the tc path
//! the client of affinity is the packet's source address, and Maglev hashes the flow's
//! source address and port, destination port and protocol (not the node address it reached,
//! so every node sends a flow to the same backend).
//!
//! Requires Linux 5.7 or later (cgroup BPF links, netns cookies in sock_addr programs) and a
//! bpffs mount.

mod bpffs;
mod error;
mod loader;
pub mod maglev;
mod maglev_slots;
pub mod maglev_tables;
pub mod maps;
mod selection;
mod service;
mod table;
mod tc;

pub use error::{Error, Result};
pub use loader::{AttachOutcome, Pins, attach, detach, open};
pub use selection::{
    Algorithm, DEFAULT_AFFINITY_TIMEOUT_SECS, SelectionMaps, SelectionStore, ServiceOptions,
    SummedPerCpu, UnknownAlgorithm, in_memory as in_memory_selection,
};
pub use service::{Frontend, ParseError, Protocol};
pub use table::{ServiceInfo, ServiceTable, Services};
pub use tc::{
    PacketMapsPinned, TC_LINK_VERSION, attach_tc, conntrack_flows, open_tc, tc_interfaces,
    tc_maps_pinned,
};
