//! Keelson's kernel-side programs: socket-level service load balancing.
//!
//! - `cgroup/connect4` (TCP connects, connected UDP) and `cgroup/sendmsg4` (unconnected UDP):
//!   if the destination is a service frontend in [`SERVICES`], rewrite it to one of the
//!   service's backends, chosen by [`select`] (random, Maglev, session affinity), before the
//!   kernel routes anything — no per-packet
//!   NAT, no conntrack entry. The original frontend is remembered per socket in [`REVNAT`].
//! - `cgroup/getpeername4` and `cgroup/recvmsg4`: translate the backend back into the frontend,
//!   so the application sees the address it asked for.
//! - `nodeport` (tc, on the node's interfaces): NodePort and externalIPs from outside, with the
//!   same backend selection over maps of its own.
//!
//! A service with no ready backend, or a port that no service exposes on a known virtual IP,
//! is refused with `ECONNREFUSED`, as kube-proxy does.
#![no_std]
#![no_main]

mod nodeport;
mod select;

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use keelson_ebpf_common::{
    Backend, BackendKey, CLIENT_ADDR, CLIENT_NETNS, MAX_BACKENDS, MAX_REVNAT, MAX_SERVICES,
    RevNatKey, RevNatValue, ServiceEntry, ServiceKey, UNEXPOSED_STATS_ID, flow_hash,
};
use select::Socket;

/// Service frontends. Every map is pinned by name so that an agent restart keeps it.
#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(MAX_SERVICES, 0);

/// Backend slots of every service.
#[map(name = "BACKENDS")]
static BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

/// Virtual IPs (network byte order) → number of service ports on them.
#[map(name = "VIPS")]
static VIPS: HashMap<u32, u32> = HashMap::pinned(MAX_SERVICES, 0);

/// (socket, backend) → the frontend the socket addressed.
#[map(name = "REVNAT")]
static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(MAX_REVNAT, 0);

/// Returned by a cgroup sock_addr program to let the call proceed.
const ALLOW: i32 = 1;
/// Returned by a cgroup sock_addr program to fail the call (with the errno set by
/// `bpf_set_retval`, `EPERM` otherwise).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    balance(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    balance(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

fn refuse() -> i32 {
    // SAFETY: plain helper call; cgroup programs may set the syscall's return value.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// Rewrites a destination that is a service frontend into one of its backends.
fn balance(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the duration of the program, and
    // nothing else references it meanwhile.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    // `user_port` is a 32-bit field (the verifier wants 4-byte loads) holding the port in
    // network byte order in its low 16 bits.
    let key = ServiceKey {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        proto: sa.protocol as u8,
        pad: 0,
    };
    // SAFETY: map values are only read here; user space replaces entries whole.
    let Some(service) = (unsafe { SERVICES.get(key) }) else {
        // SAFETY: as above.
        return if unsafe { VIPS.get(key.addr) }.is_some() {
            select::count_refused::<Socket>(UNEXPOSED_STATS_ID);
            refuse()
        } else {
            ALLOW
        };
    };
    let cfg = select::config::<Socket>(service);
    if service.count == 0 {
        // A set without configuration has no counters of its own.
        if cfg.stats_id != UNEXPOSED_STATS_ID {
            select::count_refused::<Socket>(cfg.stats_id);
        }
        return refuse();
    }
    let client = client(ctx, sa);
    let frontend = (u64::from(key.addr) << 32) | (u64::from(key.port) << 8) | u64::from(key.proto);
    let hash = flow_hash(client.id ^ (u64::from(client.kind) << 63), frontend);
    let Some(choice) = select::choose::<Socket>(service, cfg, client, hash) else {
        // A slot past the end: user space is shrinking the service; refuse rather than let
        // the connect go to the virtual address.
        return refuse();
    };
    let backend = choice.backend;
    // SAFETY: the context is a socket-address context, which the helper accepts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = RevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        pad: 0,
    };
    let original = RevNatValue {
        addr: key.addr,
        port: key.port,
        pad: 0,
    };
    // On failure the peer shows as the backend; the connection itself still works.
    let _ = REVNAT.insert(rev_key, original, 0);
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    ALLOW
}

/// The client for affinity and Maglev: the socket's source address if it was bound to one,
/// otherwise its network namespace (a pod, or the node itself).
#[inline(always)]
fn client(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> select::Client {
    // SAFETY: `sk` is the kernel's socket pointer for this call; the verifier checks the load.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: reading `src_ip4` of the program's own socket, a field sock_addr programs may read.
    let bound = if sk.is_null() {
        0
    } else {
        unsafe { (*sk).src_ip4 }
    };
    if bound != 0 {
        return select::Client {
            kind: CLIENT_ADDR,
            id: u64::from(bound),
        };
    }
    select::Client {
        kind: CLIENT_NETNS,
        // SAFETY: sock_addr programs may call this helper with their context.
        id: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    }
}

/// Shows the frontend instead of the backend this socket was balanced to.
fn reverse(ctx: &SockAddrContext) {
    // SAFETY: as in `balance`.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the context is a socket-address context, which the helper accepts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = RevNatKey {
        cookie,
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        pad: 0,
    };
    // SAFETY: read-only access to a map value.
    if let Some(original) = unsafe { REVNAT.get(key) } {
        sa.user_ip4 = original.addr;
        sa.user_port = u32::from(original.port);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The kernel refuses programs without a GPL-compatible license to call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
