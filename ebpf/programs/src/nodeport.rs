//! NodePort and externalIPs for traffic that arrives from outside the node: tc programs on
//! the node's interfaces (clsact ingress and egress).
//!
//! - Ingress, a packet to an external frontend (`<node IP>:<nodePort>`, `<externalIP>:<port>`
//!   in [`NP_SERVICES`]): a new flow picks a backend with the socket path's selection
//!   ([`select::choose`] over this path's own maps, [`Tc`]): at random, by Maglev over a
//!   hash of the flow without its destination address (so every node picks the same backend
//!   for a flow), with session affinity keyed by the client's address; the flow is remembered
//!   in [`NP_CT`] so later packets keep it, and DNATed. A backend on this node
//!   ([`NP_LOCAL`]) gets the packet with the client's address as its source, handed to the
//!   stack, which routes it to the pod; its replies leave through egress, where the source is
//!   turned back into the frontend. A backend on another node gets it SNATed to this node's
//!   address on the route towards it, so its replies come back here; they arrive on ingress,
//!   are turned back into frontend → client and sent out again. When the route to the
//!   backend leaves through another device (a tunnel), the SNAT address is this node's address
//!   towards the client instead, so the replies come back to this interface.
//! - SNATed packets are sent with `bpf_redirect_neigh` after a `bpf_fib_lookup`, not handed to
//!   the stack: their source is now a local address arriving on an interface, which the
//!   stack drops as a martian (and it would not forward a reply addressed to the node to the
//!   client either). The FIB lookup gives both the output device and, with
//!   `BPF_FIB_LOOKUP_SRC` (Linux 6.7), the node address to SNAT to.
//!
//! - Counters ([`NP_STATS`], per frontend): a connection per new flow, a packet per packet
//!   translated in either direction, a drop per packet dropped (no backend, e.g.
//!   `externalTrafficPolicy: Local` without a local endpoint; no free SNAT port; no route).
//!
//! Checksums are fixed incrementally with the l3/l4 csum helpers (`BPF_F_PSEUDO_HDR` for
//! addresses, `BPF_F_MARK_MANGLED_0` so a UDP checksum of zero stays "none").
//! Only IPv4 TCP and UDP without fragmentation beyond the first fragment are translated;
//! everything else passes untouched.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC,
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
    programs::TcContext,
};
use keelson_ebpf_common::{
    AffinityKey, AffinityValue, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, Backend, BackendKey,
    CLIENT_ADDR, CtEntry, CtKey, IPPROTO_TCP, IPPROTO_UDP, MAGLEV_TABLES_PER_SERVICE, MAX_AFFINITY,
    MAX_NP_BACKENDS, MAX_NP_FLOWS, MAX_NP_LOCAL, MAX_NP_MAGLEV_SERVICES, MAX_NP_SERVICES,
    MaglevTable, RevEntry, SNAT_PORT_COUNT, SNAT_PORT_MIN, ServiceConfig, ServiceEntry, ServiceKey,
    ServiceStats, flow_hash, packet_flow_words,
};

use crate::select::{self, Maps};

/// External frontends → backend slots the tc path may use.
#[map(name = "NP_SERVICES")]
static NP_SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(MAX_NP_SERVICES, 0);

/// Backend slots of the external frontends.
#[map(name = "NP_BACKENDS")]
static NP_BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(MAX_NP_BACKENDS, 0);

/// Addresses with external frontends → number of them (kept by the agent's service table).
#[map(name = "NP_ADDRS")]
static NP_ADDRS: HashMap<u32, u32> = HashMap::pinned(MAX_NP_SERVICES, 0);

/// Endpoint addresses on this node.
#[map(name = "NP_LOCAL")]
static NP_LOCAL: HashMap<u32, u32> = HashMap::pinned(MAX_NP_LOCAL, 0);

/// Flows from clients, as they arrive → their translation.
#[map(name = "NP_CT")]
static NP_CT: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_NP_FLOWS, 0);

/// Reply tuples → what the reply gets back.
#[map(name = "NP_REV")]
static NP_REV: LruHashMap<CtKey, RevEntry> = LruHashMap::pinned(MAX_NP_FLOWS, 0);

/// Backend-set id of [`NP_SERVICES`] → how that set is balanced.
#[map(name = "NP_SVC_CONFIG")]
static NP_SVC_CONFIG: HashMap<u32, ServiceConfig> =
    HashMap::pinned(MAX_NP_SERVICES, BPF_F_NO_PREALLOC);

/// Maglev tables of the external frontends, two per Maglev frontend (written by user space
/// through a memory mapping).
#[map(name = "NP_MAGLEV")]
static NP_MAGLEV: Array<MaglevTable> = Array::pinned(
    MAGLEV_TABLES_PER_SERVICE * MAX_NP_MAGLEV_SERVICES,
    BPF_F_MMAPABLE,
);

/// (frontend, client address) → the backend it was last sent to.
#[map(name = "NP_AFFINITY")]
static NP_AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// Stable frontend id → counters, per CPU. User space creates an entry with the frontend.
#[map(name = "NP_STATS")]
static NP_STATS: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::pinned(MAX_NP_SERVICES, BPF_F_NO_PREALLOC);

/// The tc path's selection maps.
pub struct Tc;

impl Maps for Tc {
    #[inline(always)]
    fn backends() -> &'static HashMap<BackendKey, Backend> {
        &NP_BACKENDS
    }
    #[inline(always)]
    fn configs() -> &'static HashMap<u32, ServiceConfig> {
        &NP_SVC_CONFIG
    }
    #[inline(always)]
    fn maglev() -> &'static Array<MaglevTable> {
        &NP_MAGLEV
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey, AffinityValue> {
        &NP_AFFINITY
    }
    #[inline(always)]
    fn stats() -> &'static PerCpuHashMap<u32, ServiceStats> {
        &NP_STATS
    }
}

/// `TC_ACT_OK` (`TCX_PASS`): let the packet go on. Written out because the bindings' type
/// for the `TC_ACT_*` constants differs between target architectures.
const TC_PASS: i32 = 0;
/// `TC_ACT_SHOT` (`TCX_DROP`).
const TC_DROP: i32 = 2;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;
const AF_INET: u8 = 2;
/// The fragment offset bits of the IPv4 flags/fragment field (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Tries at finding a free SNAT port before giving up on the packet.
const SNAT_TRIES: u32 = 4;

/// Where the parts of a parsed packet are.
struct Packet {
    /// The flow as it arrived.
    tuple: CtKey,
    /// Offset of the L4 header.
    l4: usize,
    /// Offset of the L4 checksum.
    csum: usize,
    /// Extra l4_csum_replace flags (UDP: keep a zero checksum zero).
    csum_flags: u64,
    /// TCP flags (0 for UDP).
    tcp_flags: u8,
}

#[classifier]
pub fn nodeport_ingress(ctx: TcContext) -> i32 {
    match ingress(&ctx) {
        Ok(action) => action,
        // A packet that cannot be parsed or rewritten is not ours to judge.
        Err(()) => TC_PASS,
    }
}

#[classifier]
pub fn nodeport_egress(ctx: TcContext) -> i32 {
    // A packet that cannot be parsed or rewritten is not ours to judge.
    let _ = egress(&ctx);
    TC_PASS
}

fn parse(ctx: &TcContext) -> Result<Packet, ()> {
    let proto: u16 = ctx.load(12).map_err(drop)?;
    if u16::from_be(proto) != ETH_P_IP {
        return Err(());
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(drop)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(());
    }
    let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(drop)?;
    if u16::from_be(frag) & IP_OFFSET_MASK != 0 {
        // Non-first fragments carry no ports.
        return Err(());
    }
    let l4_proto: u8 = ctx.load(ETH_HLEN + 9).map_err(drop)?;
    let l4 = ETH_HLEN + ihl;
    let (csum, csum_flags, tcp_flags) = match l4_proto {
        IPPROTO_TCP => (l4 + 16, 0, ctx.load::<u8>(l4 + 13).map_err(drop)?),
        IPPROTO_UDP => (l4 + 6, u64::from(BPF_F_MARK_MANGLED_0), 0),
        _ => return Err(()),
    };
    Ok(Packet {
        tuple: CtKey {
            saddr: ctx.load(IP_SADDR_OFF).map_err(drop)?,
            daddr: ctx.load(IP_DADDR_OFF).map_err(drop)?,
            sport: ctx.load(l4).map_err(drop)?,
            dport: ctx.load(l4 + 2).map_err(drop)?,
            proto: l4_proto,
            pad: [0; 3],
        },
        l4,
        csum,
        csum_flags,
        tcp_flags,
    })
}

fn ingress(ctx: &TcContext) -> Result<i32, ()> {
    let pkt = parse(ctx)?;
    // A reply from a backend on another node to a flow SNATed here.
    // SAFETY: map values are only read; entries are replaced whole.
    if let Some(rev) = unsafe { NP_REV.get(pkt.tuple) }
        && rev.snat == 1
    {
        let rev = *rev;
        set_saddr(ctx, &pkt, pkt.tuple.saddr, rev.front_addr)?;
        set_sport(ctx, &pkt, pkt.tuple.sport, rev.front_port)?;
        set_daddr(ctx, &pkt, pkt.tuple.daddr, rev.client_addr)?;
        set_dport(ctx, &pkt, pkt.tuple.dport, rev.client_port)?;
        let action = forward(ctx, rev.client_addr, rev.front_addr);
        count_reply(&rev, pkt.tuple.proto, action);
        return Ok(action);
    }
    // SAFETY: read-only lookup; most packets stop here.
    if unsafe { NP_ADDRS.get(pkt.tuple.daddr) }.is_none() {
        return Ok(TC_PASS);
    }
    let front = ServiceKey {
        addr: pkt.tuple.daddr,
        port: pkt.tuple.dport,
        proto: pkt.tuple.proto,
        pad: 0,
    };
    // SAFETY: as above.
    let Some(service) = (unsafe { NP_SERVICES.get(front) }).copied() else {
        return Ok(TC_PASS);
    };
    let cfg = select::config::<Tc>(&service);
    // A frontend written without configuration has no counters: id 0 has no entry here.
    let stats_id = cfg.stats_id;
    // SAFETY: as above.
    let known = unsafe { NP_CT.get(pkt.tuple) }.copied();
    let flow = match known {
        // A flow keeps its backend; only a new connection (a SYN, or any UDP datagram) after
        // the backend set changed picks again, so removed backends stop receiving new flows.
        Some(flow)
            if flow.service_id == service.id
                || !(pkt.tuple.proto == IPPROTO_UDP || is_syn(pkt.tcp_flags)) =>
        {
            flow
        }
        _ => match new_flow(ctx, &pkt, &service, cfg) {
            Some(flow) => flow,
            // No backend (under `externalTrafficPolicy: Local`, a node without a local
            // endpoint drops the traffic, as kube-proxy does), no free SNAT port, no route.
            None => {
                select::count_drop::<Tc>(stats_id);
                return Ok(TC_DROP);
            }
        },
    };
    set_daddr(ctx, &pkt, pkt.tuple.daddr, flow.backend_addr)?;
    set_dport(ctx, &pkt, pkt.tuple.dport, flow.backend_port)?;
    if flow.snat_addr == 0 {
        // A local backend: the stack routes the packet to the pod.
        select::count_packet::<Tc>(stats_id);
        return Ok(TC_PASS);
    }
    set_saddr(ctx, &pkt, pkt.tuple.saddr, flow.snat_addr)?;
    set_sport(ctx, &pkt, pkt.tuple.sport, flow.snat_port)?;
    let action = forward(ctx, flow.backend_addr, flow.snat_addr);
    count(stats_id, action);
    Ok(action)
}

/// Counts a packet sent on with `action` for the frontend with counter id `stats_id`.
#[inline(always)]
fn count(stats_id: u32, action: i32) {
    if action == TC_DROP {
        select::count_drop::<Tc>(stats_id);
    } else {
        select::count_packet::<Tc>(stats_id);
    }
}

/// Counts a reply (sent on with `action`) for the frontend it comes from.
#[inline(always)]
fn count_reply(rev: &RevEntry, proto: u8, action: i32) {
    let front = ServiceKey {
        addr: rev.front_addr,
        port: rev.front_port,
        proto,
        pad: 0,
    };
    // SAFETY: read-only lookups.
    let Some(service) = (unsafe { NP_SERVICES.get(front) }) else {
        return;
    };
    // Id 0 (no configuration) has no counters here.
    count(select::config::<Tc>(service).stats_id, action);
}

fn is_syn(flags: u8) -> bool {
    flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

/// Picks a backend for a new flow and records it in both conntrack maps; `None` when the
/// packet must be dropped: the frontend has no backend, or the flow cannot be SNATed or
/// recorded.
fn new_flow(
    ctx: &TcContext,
    pkt: &Packet,
    service: &ServiceEntry,
    cfg: ServiceConfig,
) -> Option<CtEntry> {
    if service.count == 0 {
        return None;
    }
    let client = select::Client {
        kind: CLIENT_ADDR,
        id: u64::from(pkt.tuple.saddr),
    };
    let (a, b) = packet_flow_words(
        pkt.tuple.saddr,
        pkt.tuple.sport,
        pkt.tuple.dport,
        pkt.tuple.proto,
    );
    // `None`: a slot past the end; user space is shrinking the service.
    let backend = select::choose::<Tc>(service, cfg, client, flow_hash(a, b))?.backend;
    let mut flow = CtEntry {
        backend_addr: backend.addr,
        snat_addr: 0,
        service_id: service.id,
        backend_port: backend.port,
        snat_port: 0,
    };
    // SAFETY: read-only lookup.
    let local = unsafe { NP_LOCAL.get(backend.addr) }.is_some();
    let mut reply = CtKey {
        saddr: backend.addr,
        daddr: pkt.tuple.saddr,
        sport: backend.port,
        dport: pkt.tuple.sport,
        proto: pkt.tuple.proto,
        pad: [0; 3],
    };
    if !local {
        let (out, mut src) = fib(ctx, backend.addr, pkt.tuple.saddr, true)?;
        // SAFETY: the kernel hands tc programs a valid `__sk_buff`.
        if out != unsafe { (*ctx.skb.skb).ifindex } {
            // The backend is reached through another device (the VXLAN overlay): its replies
            // to that device's address would come back through the tunnel, where this
            // program does not run. This node's address towards the client brings them back
            // to this interface.
            src = fib(ctx, pkt.tuple.saddr, pkt.tuple.daddr, true)?.1;
        }
        flow.snat_addr = src;
        flow.snat_port = snat_port(&mut reply, src)?;
    }
    let rev = RevEntry {
        front_addr: pkt.tuple.daddr,
        client_addr: pkt.tuple.saddr,
        front_port: pkt.tuple.dport,
        client_port: pkt.tuple.sport,
        snat: u8::from(!local),
        pad: [0; 3],
    };
    NP_REV.insert(reply, rev, 0).ok()?;
    NP_CT.insert(pkt.tuple, flow, 0).ok()?;
    Some(flow)
}

/// A source port on `addr` that no SNATed flow to the same backend uses; fills it into
/// `reply`'s destination. `None` when a few tries found none free.
fn snat_port(reply: &mut CtKey, addr: u32) -> Option<u16> {
    reply.daddr = addr;
    for _ in 0..SNAT_TRIES {
        // SAFETY: a helper without arguments.
        let n = (unsafe { bpf_get_prandom_u32() } % u32::from(SNAT_PORT_COUNT)) as u16;
        reply.dport = (SNAT_PORT_MIN + n).to_be();
        // SAFETY: read-only lookup.
        if unsafe { NP_REV.get(*reply) }.is_none() {
            return Some(reply.dport);
        }
    }
    None
}

/// Looks up the route to `dst` as if forwarding a packet from `src` that came in on the
/// packet's interface: the output interface and, with `want_src`, the address this node
/// uses on that route.
fn fib(ctx: &TcContext, dst: u32, src: u32, want_src: bool) -> Option<(u32, u32)> {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) parameter block.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    // SAFETY: the kernel hands tc programs a valid `__sk_buff`.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    let mut flags = BPF_FIB_LOOKUP_SKIP_NEIGH;
    if want_src {
        flags |= BPF_FIB_LOOKUP_SRC;
    }
    // SAFETY: `params` lives on the stack for the call and its size is passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the lookup filled in the source address (it was an IPv4 lookup).
    Some((params.ifindex, unsafe { params.__bindgen_anon_3.ipv4_src }))
}

/// Sends a rewritten packet towards `dst` on the interface the FIB names, with the L2 header
/// filled in by the neighbour subsystem.
fn forward(ctx: &TcContext, dst: u32, src: u32) -> i32 {
    match fib(ctx, dst, src, false) {
        // SAFETY: no parameter block (the helper looks the next hop up itself).
        Some((ifindex, _)) => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        None => TC_DROP,
    }
}

fn egress(ctx: &TcContext) -> Result<(), ()> {
    let pkt = parse(ctx)?;
    // A reply from a local backend to a client whose address was kept.
    // SAFETY: read-only access to a map value.
    let Some(rev) = (unsafe { NP_REV.get(pkt.tuple) }).copied() else {
        return Ok(());
    };
    if rev.snat != 0 {
        return Ok(());
    }
    set_saddr(ctx, &pkt, pkt.tuple.saddr, rev.front_addr)?;
    set_sport(ctx, &pkt, pkt.tuple.sport, rev.front_port)?;
    count_reply(&rev, pkt.tuple.proto, TC_PASS);
    Ok(())
}

fn set_addr(ctx: &TcContext, pkt: &Packet, off: usize, old: u32, new: u32) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let flags = u64::from(BPF_F_PSEUDO_HDR) | pkt.csum_flags | 4;
    ctx.l4_csum_replace(pkt.csum, u64::from(old), u64::from(new), flags)
        .map_err(drop)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(drop)?;
    ctx.store(off, &new, 0).map_err(drop)
}

fn set_port(ctx: &TcContext, pkt: &Packet, off: usize, old: u16, new: u16) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(pkt.csum, u64::from(old), u64::from(new), pkt.csum_flags | 2)
        .map_err(drop)?;
    ctx.store(off, &new, 0).map_err(drop)
}

fn set_saddr(ctx: &TcContext, pkt: &Packet, old: u32, new: u32) -> Result<(), ()> {
    set_addr(ctx, pkt, IP_SADDR_OFF, old, new)
}

fn set_daddr(ctx: &TcContext, pkt: &Packet, old: u32, new: u32) -> Result<(), ()> {
    set_addr(ctx, pkt, IP_DADDR_OFF, old, new)
}

fn set_sport(ctx: &TcContext, pkt: &Packet, old: u16, new: u16) -> Result<(), ()> {
    set_port(ctx, pkt, pkt.l4, old, new)
}

fn set_dport(ctx: &TcContext, pkt: &Packet, old: u16, new: u16) -> Result<(), ()> {
    set_port(ctx, pkt, pkt.l4 + 2, old, new)
}
