//! Keelson's kernel-side programs: socket-level service load balancing.
//!
//! `cgroup/connect4` runs when a process in the attached cgroup calls `connect(2)` (TCP) or
//! connects a UDP socket. If the destination is a service frontend in [`SERVICES`], the
//! destination is rewritten to one of the service's backends, picked at random, before the
//! kernel routes anything: no per-packet NAT and no conntrack entry.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};
use keelson_ebpf_common::{
    Backend, BackendKey, MAX_BACKENDS, MAX_SERVICES, ServiceEntry, ServiceKey,
};

/// Service frontends, pinned by name so that an agent restart keeps them.
#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(MAX_SERVICES, 0);

/// Backend slots of every service, pinned by name so that an agent restart keeps them.
#[map(name = "BACKENDS")]
static BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

/// Returned by a cgroup sock_addr program to let the call proceed.
const ALLOW: i32 = 1;
/// Returned by a cgroup sock_addr program to fail the call (the caller sees `EPERM`).
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
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
        return ALLOW;
    };
    if service.count == 0 {
        // A service without ready endpoints refuses new connections at once.
        return REJECT;
    }
    // SAFETY: calling a helper that takes no arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.count;
    let backend_key = BackendKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: as above, read-only access to a map value.
    match unsafe { BACKENDS.get(backend_key) } {
        Some(backend) => {
            sa.user_ip4 = backend.addr;
            sa.user_port = u32::from(backend.port);
            ALLOW
        }
        // A slot past the end: user space is shrinking the service; refuse rather than leak
        // the connect to the virtual address.
        None => REJECT,
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
