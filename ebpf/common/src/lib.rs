//! Map keys and values shared by Keelson's kernel programs (`keelson-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel and user space agree
//! byte for byte. Addresses and ports are kept in network byte order, exactly as the kernel
//! hands them to `cgroup/connect4`, so the fast path never converts.
//!
//! Layout of the load balancer:
//! - [`SERVICES_MAP`]: `ServiceKey` (virtual IP, port, protocol) → [`ServiceEntry`] (service id
//!   and number of backend slots).
//! - [`BACKENDS_MAP`]: [`BackendKey`] (service id, slot) → [`Backend`] (address, port).
//! - [`VIPS_MAP`]: virtual IP → number of service ports on it, so that a connect to a port
//!   that no service exposes on a known virtual IP is refused rather than sent off the node.
//! - [`REVNAT_MAP`]: [`RevNatKey`] (socket cookie, backend) → [`RevNatValue`] (the frontend the
//!   socket asked for), written on connect/sendmsg and read by `getpeername4`/`recvmsg4` so
//!   the application sees the service address as its peer. An LRU map: it never fills up.
//!
//! Updating one service writes only its own entries, so the cost of an update does not grow
//! with the number of services.
#![no_std]
#![deny(missing_docs)]

/// Name of the services map; also its pin name under the agent's bpffs directory.
pub const SERVICES_MAP: &str = "SERVICES";
/// Name of the backends map; also its pin name under the agent's bpffs directory.
pub const BACKENDS_MAP: &str = "BACKENDS";
/// Name of the virtual-IP map; also its pin name.
pub const VIPS_MAP: &str = "VIPS";
/// Name of the reverse-translation map; also its pin name.
pub const REVNAT_MAP: &str = "REVNAT";
/// Capacity of the services map.
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the backends map.
pub const MAX_BACKENDS: u32 = 262_144;
/// Capacity of the reverse-translation LRU map (one entry per balanced socket and backend).
pub const MAX_REVNAT: u32 = 262_144;
/// Most backend slots one service may have.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 4_096;

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Identifies a service frontend: a virtual IPv4 address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    /// IP protocol number ([`IPPROTO_TCP`] or [`IPPROTO_UDP`]).
    pub proto: u8,
    /// Explicit padding; always zero.
    pub pad: u8,
}

/// What the kernel needs to know of a service to pick a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Service id: the first half of every [`BackendKey`] of this service.
    pub id: u32,
    /// Number of backend slots `0..count`; zero means no ready backend: connects are refused.
    pub count: u32,
}

/// Identifies one backend slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    /// The [`ServiceEntry::id`] this slot belongs to.
    pub service_id: u32,
    /// Slot index, `0..ServiceEntry::count`.
    pub slot: u32,
}

/// A backend endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub pad: u16,
}

/// Identifies a balanced socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub pad: u16,
}

/// The frontend a socket originally addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    /// Virtual IPv4 address, network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub pad: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are `#[repr(C)]`, `Copy`, made only of integers, with every
    // padding byte an explicit field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::RevNatValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceEntry>(), 8);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<RevNatKey>(), 16);
        assert_eq!(size_of::<RevNatValue>(), 8);
    }
}

// ---------------------------------------------------------------------------------------------
// Backend selection options: session affinity, Maglev, per-service counters.
//
// - [`SVC_CONFIG_MAP`]: backend-set id ([`ServiceEntry::id`]) → [`ServiceConfig`] (algorithm,
//   affinity, the service's stable counter id). Written under the fresh id before the service
//   entry is published, so it switches atomically with the backend set. A service without an
//   entry (written by an older agent) is balanced at random without affinity or counters.
// - [`MAGLEV_MAP`]: an array of whole lookup tables ([`MaglevTable`], [`MAGLEV_SIZE`] backend
//   slots each), two per Maglev service: table `2 * s` and `2 * s + 1` of service slot `s`.
//   A backend set's configuration names the table it uses ([`ServiceConfig::maglev_table`]);
//   a change writes the service's other table (not in use) and publishes it with the new set,
//   so readers see the old table or the new one, never a mix. The map is created with
//   [`BPF_F_MMAPABLE`]: user space writes a table through a memory mapping, no system call.
// - [`AFFINITY_MAP`]: [`AffinityKey`] (stable id, client) → [`AffinityValue`] (backend, last
//   use), an LRU map.
// - [`STATS_MAP`]: stable id → [`ServiceStats`], per CPU; id [`UNEXPOSED_STATS_ID`] counts
//   connects refused because no service has that port on a known virtual IP.

/// Name (and pin name) of the per-backend-set configuration map.
pub const SVC_CONFIG_MAP: &str = "SVC_CONFIG";
/// Name (and pin name) of the Maglev lookup-table map.
pub const MAGLEV_MAP: &str = "MAGLEV";
/// Name (and pin name) of the session-affinity map.
pub const AFFINITY_MAP: &str = "AFFINITY";
/// Name (and pin name) of the per-service counters map.
pub const STATS_MAP: &str = "LB_STATS";

/// Size of every service's Maglev lookup table: a prime, so that each backend's permutation
/// visits every entry. 1021 keeps the disruption of a backend change near the ideal 1/N for up
/// to about 100 backends per service while a table stays within one 4 KiB page.
pub const MAGLEV_SIZE: u32 = 1021;
/// Maglev services the socket path can hold; the Maglev map has two tables for each.
pub const MAX_MAGLEV_SERVICES: u32 = 1024;
/// Lookup tables per Maglev service: the one in use and the one the next change writes.
pub const MAGLEV_TABLES_PER_SERVICE: u32 = 2;
/// `BPF_F_MMAPABLE` (Linux 5.5): an array map user space can `mmap(2)`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Capacity of the session-affinity LRU map.
pub const MAX_AFFINITY: u32 = 65_536;
/// `BPF_F_NO_PREALLOC`: entries are allocated on insert, so unused capacity costs nothing.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// The counter id under which refusals of unexposed ports on known virtual IPs are counted.
pub const UNEXPOSED_STATS_ID: u32 = 0;

/// [`ServiceConfig::flags`]: pick backends with the Maglev table instead of at random.
pub const FLAG_MAGLEV: u32 = 1;
/// [`ServiceConfig::flags`]: `sessionAffinity: ClientIP`.
pub const FLAG_AFFINITY: u32 = 2;
/// [`ServiceConfig::flags`]: [`ServiceConfig::maglev_table`] names this set's Maglev table.
/// Sets written by an agent that kept tables in a hash map have [`FLAG_MAGLEV`] without it;
/// the programs balance those at random until the agent rewrites them.
pub const FLAG_MAGLEV_TABLE: u32 = 4;

/// How one backend set of a service is balanced.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceConfig {
    /// Stable id of the service frontend: key of its counters and affinity entries. Unlike
    /// [`ServiceEntry::id`] it survives backend changes. Never [`UNEXPOSED_STATS_ID`].
    pub stats_id: u32,
    /// [`FLAG_MAGLEV`] and [`FLAG_AFFINITY`].
    pub flags: u32,
    /// Session affinity timeout since last use, seconds.
    pub affinity_timeout_secs: u32,
    /// With [`FLAG_MAGLEV_TABLE`]: the index of this set's table in the Maglev map; zero
    /// otherwise.
    pub maglev_table: u32,
}

/// One Maglev lookup table: entry [`maglev_index`]`(flow hash)` → backend slot of the set that
/// uses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// The entries.
    pub entries: [u32; MAGLEV_SIZE as usize],
    /// Explicit padding to a multiple of 8 bytes (the kernel's array stride); always zero.
    /// It also keeps the verifier's bound of an entry's offset, which it tracks only to the
    /// byte (`4 * index` ≤ 4083), inside the value.
    pub pad: u32,
}

/// The entry of a Maglev table a flow hash selects: `hash * MAGLEV_SIZE / 2^32`, as even as a
/// modulo for a uniform hash, and a multiply and shift the verifier can bound (it tracks no
/// range through a modulo on every kernel), so a table is indexed without a runtime check.
#[must_use]
#[inline(always)]
pub const fn maglev_index(hash: u32) -> u32 {
    ((hash as u64 * MAGLEV_SIZE as u64) >> 32) as u32
}

/// [`AffinityKey::kind`]: the client is a network namespace (`bpf_get_netns_cookie`).
pub const CLIENT_NETNS: u32 = 0;
/// [`AffinityKey::kind`]: the client is the socket's bound IPv4 source address.
pub const CLIENT_ADDR: u32 = 1;

/// A client of a service, for session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The service's [`ServiceConfig::stats_id`].
    pub stats_id: u32,
    /// [`CLIENT_NETNS`] or [`CLIENT_ADDR`].
    pub kind: u32,
    /// The netns cookie, or the IPv4 source address (network byte order) widened.
    pub client: u64,
}

/// The backend a client was last sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns` of the last connection.
    pub last_used_ns: u64,
    /// The backend's slot in the set it was chosen from.
    pub slot: u32,
    /// Backend IPv4 address, network byte order; reused only while this slot still holds it.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub pad: [u8; 6],
}

/// Counters of one service frontend (per CPU in the kernel map; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Balanced connects and unconnected UDP sends.
    pub connections: u64,
    /// Connects refused: no ready backend (or, under [`UNEXPOSED_STATS_ID`], no such port).
    pub refused: u64,
    /// Connections that went to the client's previous backend through session affinity.
    pub affinity_hits: u64,
    /// Packets translated for the service on the tc path (to a backend and back).
    pub packets: u64,
    /// Traffic dropped for the service: refused connects on the socket path; on the tc path
    /// packets dropped for lack of a (local) backend, a free SNAT port or a route.
    pub drops: u64,
}

impl ServiceStats {
    /// The element-wise sum, wrapping like the kernel counters.
    #[must_use]
    pub fn wrapping_sum(self, other: ServiceStats) -> ServiceStats {
        ServiceStats {
            connections: self.connections.wrapping_add(other.connections),
            refused: self.refused.wrapping_add(other.refused),
            affinity_hits: self.affinity_hits.wrapping_add(other.affinity_hits),
            packets: self.packets.wrapping_add(other.packets),
            drops: self.drops.wrapping_add(other.drops),
        }
    }
}

/// A 64-bit finalizer (splitmix64): cheap, branch-free and the same on every node, so the
/// kernel's flow hash and user space's Maglev permutations agree across the cluster.
#[must_use]
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hash of a flow for Maglev: the socket load balancer passes (client identity, frontend);
/// a packet path passes the 5-tuple packed into the same two words (addresses in `a`, ports
/// and protocol in `b`). Only the ordering of the inputs matters, not their meaning.
#[must_use]
#[inline(always)]
pub const fn flow_hash(a: u64, b: u64) -> u32 {
    (mix64(a ^ mix64(b)) >> 32) as u32
}

/// Packs an IPv4 5-tuple (all fields in network byte order, as in packet headers) into the
/// two words [`flow_hash`] takes.
#[must_use]
#[inline(always)]
pub const fn five_tuple_words(
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
) -> (u64, u64) {
    (
        ((saddr as u64) << 32) | daddr as u64,
        ((sport as u64) << 32) | ((dport as u64) << 16) | proto as u64,
    )
}

/// The two words [`flow_hash`] takes for a flow arriving on the tc path: the 5-tuple without
/// its destination address, so that a flow to `<any node>:<nodePort>` hashes alike on every
/// node (an externalIP is the same address everywhere anyway). Fields in network byte order.
#[must_use]
#[inline(always)]
pub const fn packet_flow_words(saddr: u32, sport: u16, dport: u16, proto: u8) -> (u64, u64) {
    five_tuple_words(saddr, 0, sport, dport, proto)
}

#[cfg(feature = "user")]
mod pod_selection {
    // SAFETY: as in `pod`: `#[repr(C)]`, `Copy`, integers only, explicit padding.
    unsafe impl aya::Pod for super::ServiceConfig {}
    unsafe impl aya::Pod for super::MaglevTable {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::ServiceStats {}
}

#[cfg(test)]
mod selection_tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn selection_layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceConfig>(), 16);
        assert_eq!(size_of::<MaglevTable>(), 4 * MAGLEV_SIZE as usize + 4);
        assert_eq!(size_of::<MaglevTable>() % 8, 0);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityValue>(), 24);
        assert_eq!(size_of::<ServiceStats>(), 40);
    }

    #[test]
    fn maglev_index_covers_the_table_evenly() {
        assert_eq!(maglev_index(0), 0);
        assert_eq!(maglev_index(u32::MAX), MAGLEV_SIZE - 1);
        let mut counts = [0u32; MAGLEV_SIZE as usize];
        for c in 0..(MAGLEV_SIZE as u64 * 64) {
            counts[maglev_index(flow_hash(c, 7)) as usize] += 1;
        }
        // 64 hashes per entry on average: no entry is starved or crowded.
        assert!(counts.iter().all(|n| (20..=120).contains(n)), "{counts:?}");
    }

    #[test]
    fn flow_hash_is_deterministic_and_spreads() {
        assert_eq!(flow_hash(1, 2), flow_hash(1, 2));
        assert_ne!(flow_hash(1, 2), flow_hash(2, 1));
        let (a, b) = five_tuple_words(1, 2, 3, 4, 6);
        assert_ne!(flow_hash(a, b), flow_hash(a, b ^ 1));
        // Over many clients every bucket of a small table is hit.
        let mut hit = [false; 7];
        for c in 0..200u64 {
            hit[(flow_hash(c, 99) % 7) as usize] = true;
        }
        assert!(hit.iter().all(|h| *h));
    }

    #[test]
    fn packet_flows_hash_alike_whatever_node_address_they_reach() {
        let (a, b) = packet_flow_words(0x0a00_0001, 40000, 30900, IPPROTO_TCP);
        let (a2, b2) = five_tuple_words(0x0a00_0001, 0, 40000, 30900, IPPROTO_TCP);
        assert_eq!(flow_hash(a, b), flow_hash(a2, b2));
        let (c, d) = packet_flow_words(0x0a00_0001, 40001, 30900, IPPROTO_TCP);
        assert_ne!(flow_hash(a, b), flow_hash(c, d));
    }
}

// NodePort and externalIPs for traffic arriving from outside the node (tc programs).
//
// - [`NP_SERVICES_MAP`] / [`NP_BACKENDS_MAP`] / [`NP_ADDRS_MAP`]: the same layout as
//   `SERVICES`/`BACKENDS`/`VIPS`, holding the frontends reachable from outside (`<node IP>:
//   <nodePort>`, `<externalIP>:<port>`) with the backends the tc path may use (only this
//   node's endpoints under `externalTrafficPolicy: Local`).
// - [`NP_LOCAL_MAP`]: endpoint addresses on this node → number of services using them; a
//   flow to a backend not in it is SNATed to the node's address so replies come back here.
// - [`NP_CT_MAP`]: flow as it arrives ([`CtKey`]) → its translation ([`CtEntry`]), so every
//   packet of a flow goes to the same backend.
// - [`NP_REV_MAP`]: reply tuple ([`CtKey`]) → what to restore ([`RevEntry`]).
// - [`NP_SVC_CONFIG_MAP`], [`NP_MAGLEV_MAP`], [`NP_AFFINITY_MAP`], [`NP_STATS_MAP`]: the
//   selection maps of the socket path (same types), for the tc path's own frontends and ids:
//   a new flow picks its backend with the same `choose` (affinity keyed by the client's
//   address, Maglev over [`packet_flow_words`]); counters add packets and drops.
// Both conntrack maps are LRU maps: they never fill up, the oldest flows go first.
// ---------------------------------------------------------------------------------------------

/// Name (and pin name) of the external frontends map.
pub const NP_SERVICES_MAP: &str = "NP_SERVICES";
/// Name (and pin name) of the external frontends' backend slots.
pub const NP_BACKENDS_MAP: &str = "NP_BACKENDS";
/// Name (and pin name) of the map of addresses with external frontends.
pub const NP_ADDRS_MAP: &str = "NP_ADDRS";
/// Name (and pin name) of the map of this node's endpoint addresses.
pub const NP_LOCAL_MAP: &str = "NP_LOCAL";
/// Name (and pin name) of the forward conntrack map.
pub const NP_CT_MAP: &str = "NP_CT";
/// Name (and pin name) of the reply conntrack map.
pub const NP_REV_MAP: &str = "NP_REV";
/// Name (and pin name) of the tc path's per-backend-set configuration ([`ServiceConfig`]),
/// keyed by the ids of [`NP_SERVICES_MAP`] entries (an id space of its own).
pub const NP_SVC_CONFIG_MAP: &str = "NP_SVC_CONFIG";
/// Name (and pin name) of the tc path's Maglev tables (an array of [`MaglevTable`], laid out
/// as [`MAGLEV_MAP`]).
pub const NP_MAGLEV_MAP: &str = "NP_MAGLEV";
/// Name (and pin name) of the tc path's session-affinity LRU map (clients by address).
pub const NP_AFFINITY_MAP: &str = "NP_AFFINITY";
/// Name (and pin name) of the tc path's per-frontend counters ([`ServiceStats`], per CPU).
pub const NP_STATS_MAP: &str = "NP_STATS";
/// Maglev frontends the tc path can hold; its Maglev map has two tables for each.
pub const MAX_NP_MAGLEV_SERVICES: u32 = 256;
/// Capacity of the external frontends map.
pub const MAX_NP_SERVICES: u32 = 16_384;
/// Capacity of the external backends map.
pub const MAX_NP_BACKENDS: u32 = 65_536;
/// Capacity of the local endpoints map.
pub const MAX_NP_LOCAL: u32 = 16_384;
/// Capacity of each conntrack LRU map.
pub const MAX_NP_FLOWS: u32 = 131_072;
/// First source port used when SNATing a flow to a backend on another node; above Linux's
/// default ephemeral range (32768–60999) so that the node's own sockets rarely collide.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Number of SNAT source ports (`SNAT_PORT_MIN..=65535`).
pub const SNAT_PORT_COUNT: u16 = 4_536;

/// A flow's 5-tuple, addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source IPv4 address.
    pub saddr: u32,
    /// Destination IPv4 address.
    pub daddr: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding; always zero.
    pub pad: [u8; 3],
}

/// How a flow arriving from outside is translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Backend IPv4 address (the new destination).
    pub backend_addr: u32,
    /// SNAT source address, or 0 when the client's address is kept.
    pub snat_addr: u32,
    /// The [`ServiceEntry::id`] the backend was picked from; a different id now means the
    /// backend set changed since.
    pub service_id: u32,
    /// Backend port (the new destination port).
    pub backend_port: u16,
    /// SNAT source port (meaningful with `snat_addr`).
    pub snat_port: u16,
}

/// What a reply gets back: the frontend as its source and, for SNATed flows, the client as its
/// destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevEntry {
    /// Frontend address (the reply's new source).
    pub front_addr: u32,
    /// Client address (the reply's new destination when SNATed).
    pub client_addr: u32,
    /// Frontend port.
    pub front_port: u16,
    /// Client port.
    pub client_port: u16,
    /// 1 when the flow was SNATed (replies arrive on ingress), 0 otherwise (replies leave on
    /// egress).
    pub snat: u8,
    /// Explicit padding; always zero.
    pub pad: [u8; 3],
}

#[cfg(feature = "user")]
mod nodeport_pod {
    // SAFETY: `#[repr(C)]`, `Copy`, integers only, every padding byte an explicit field.
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::RevEntry {}
}

#[cfg(test)]
mod nodeport_layout_tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn conntrack_layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 16);
        assert_eq!(size_of::<RevEntry>(), 16);
        assert_eq!(
            u32::from(SNAT_PORT_MIN) + u32::from(SNAT_PORT_COUNT),
            65_536
        );
    }
}
