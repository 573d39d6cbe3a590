//! Keelson's kernel-side programs: socket-level service load balancing.
//!
//! - `cgroup/connect4` (TCP connects, connected UDP) and `cgroup/sendmsg4` (unconnected UDP):
//!   if the destination is a service frontend in [`SERVICES`], rewrite it to one of the
//!   service's backends, picked at random, before the kernel routes anything — no per-packet
//!   NAT, no conntrack entry. The original frontend is remembered per socket in [`REVNAT`].
//! - `cgroup/getpeername4` and `cgroup/recvmsg4`: translate the backend back into the frontend,
//!   so the application sees the address it asked for.
//! - `nodeport` (tc, on the node's interfaces): NodePort and externalIPs from outside.
//!
//! A service with no ready backend, or a port that no service exposes on a known virtual IP,
//! is refused with `ECONNREFUSED`, as kube-proxy does.
#![no_std]
#![no_main]

mod nodeport;

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use keelson_ebpf_common::{
    Backend, BackendKey, MAX_BACKENDS, MAX_REVNAT, MAX_SERVICES, RevNatKey, RevNatValue,
    ServiceEntry, ServiceKey,
};

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
            refuse()
        } else {
            ALLOW
        };
    };
    if service.count == 0 {
        return refuse();
    }
    // SAFETY: calling a helper that takes no arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.count;
    let backend_key = BackendKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: as above, read-only access to a map value.
    let Some(backend) = (unsafe { BACKENDS.get(backend_key) }) else {
        // A slot past the end: user space is shrinking the service; refuse rather than let
        // the connect go to the virtual address.
        return refuse();
    };
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
