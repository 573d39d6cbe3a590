//! Backend selection, shared by every path that balances a service (the socket load balancer
//! here; a packet path calls [`choose`] with a 5-tuple hash): session affinity, Maglev or a
//! random slot, and the per-service counters.
//!
//! A packet path (the tc NodePort program) calls it once per new flow, after finding the
//! `ServiceEntry`: `choose(entry, config(entry), Client { kind: CLIENT_ADDR, id: saddr },
//! flow_hash(five_tuple_words(..)))` (the hash helpers are in `keelson-ebpf-common`, so that
//! every node hashes a 5-tuple alike). Each call counts one connection.
//!
//! The maps of this module are keyed by the backend-set id (`ServiceEntry::id`, fresh on every
//! backend change) where they describe one backend set — configuration and Maglev table — and
//! by the stable `ServiceConfig::stats_id` where they must outlive a change: affinity and
//! counters.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuHashMap},
};
use keelson_ebpf_common::{
    AffinityKey, AffinityValue, BPF_F_NO_PREALLOC, Backend, BackendKey, FLAG_AFFINITY, FLAG_MAGLEV,
    MAGLEV_SIZE, MAX_AFFINITY, MAX_MAGLEV_SERVICES, MAX_SERVICES, MaglevKey, ServiceConfig,
    ServiceEntry, ServiceStats,
};

use crate::BACKENDS;

/// Backend-set id → how that set is balanced.
#[map(name = "SVC_CONFIG")]
static SVC_CONFIG: HashMap<u32, ServiceConfig> = HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// (backend-set id, index) → slot: the Maglev lookup tables.
#[map(name = "MAGLEV")]
static MAGLEV: HashMap<MaglevKey, u32> =
    HashMap::pinned(MAGLEV_SIZE * MAX_MAGLEV_SERVICES, BPF_F_NO_PREALLOC);

/// (service, client) → the backend it was last sent to.
#[map(name = "AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// Stable service id → counters, per CPU. User space creates an entry with the service.
#[map(name = "LB_STATS")]
static LB_STATS: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Who is connecting, for affinity (`kind`, `client` of [`AffinityKey`]).
#[derive(Clone, Copy)]
pub struct Client {
    /// `CLIENT_NETNS` or `CLIENT_ADDR`.
    pub kind: u32,
    /// The netns cookie or the bound source address.
    pub id: u64,
}

/// A chosen backend.
pub struct Choice {
    /// Where to send the connection.
    pub backend: Backend,
}

/// The configuration of a backend set; `None` for sets written by an older agent.
#[inline(always)]
pub fn config(service: &ServiceEntry) -> Option<ServiceConfig> {
    // SAFETY: read-only access; user space replaces values whole.
    unsafe { SVC_CONFIG.get(service.id) }.copied()
}

/// Picks a backend of `service` (which has `count > 0`) for `client`, whose flow hashes to
/// `hash`, and counts the connection. `None` when the slot read is gone (user space is
/// replacing the set): the caller refuses.
#[inline(always)]
pub fn choose(
    service: &ServiceEntry,
    cfg: Option<ServiceConfig>,
    client: Client,
    hash: u32,
) -> Option<Choice> {
    let cfg = cfg.unwrap_or_default();
    let affinity = cfg.flags & FLAG_AFFINITY != 0;
    let akey = AffinityKey {
        stats_id: cfg.stats_id,
        kind: client.kind,
        client: client.id,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if affinity && let Some((slot, backend)) = remembered(service, &akey, &cfg, now) {
        remember(&akey, slot, &backend, now);
        count(cfg.stats_id, |s| {
            s.connections += 1;
            s.affinity_hits += 1;
        });
        return Some(Choice { backend });
    }
    let slot = if cfg.flags & FLAG_MAGLEV != 0 {
        let key = MaglevKey {
            service_id: service.id,
            index: hash % MAGLEV_SIZE,
        };
        // SAFETY: read-only access to a map value.
        *unsafe { MAGLEV.get(key) }?
    } else {
        // SAFETY: a helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        // `checked_rem` keeps a divide-by-zero panic path (which the verifier rejects) out
        // of the program; callers only pass services with backends.
        r.checked_rem(service.count)?
    };
    let key = BackendKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: read-only access to a map value.
    let backend = *unsafe { BACKENDS.get(key) }?;
    if affinity {
        remember(&akey, slot, &backend, now);
    }
    count(cfg.stats_id, |s| s.connections += 1);
    Some(Choice { backend })
}

/// The client's previous backend, if it is recent and still in the current set.
#[inline(always)]
fn remembered(
    service: &ServiceEntry,
    key: &AffinityKey,
    cfg: &ServiceConfig,
    now: u64,
) -> Option<(u32, Backend)> {
    // SAFETY: read-only access to a map value.
    let prev = *unsafe { AFFINITY.get(key) }?;
    let timeout = u64::from(cfg.affinity_timeout_secs) * 1_000_000_000;
    if now.wrapping_sub(prev.last_used_ns) > timeout || prev.slot >= service.count {
        return None;
    }
    let key = BackendKey {
        service_id: service.id,
        slot: prev.slot,
    };
    // SAFETY: as above.
    let backend = *unsafe { BACKENDS.get(key) }?;
    (backend.addr == prev.addr && backend.port == prev.port).then_some((prev.slot, backend))
}

#[inline(always)]
fn remember(key: &AffinityKey, slot: u32, backend: &Backend, now: u64) {
    let value = AffinityValue {
        last_used_ns: now,
        slot,
        addr: backend.addr,
        port: backend.port,
        pad: [0; 6],
    };
    // On failure the next connect simply chooses afresh.
    let _ = AFFINITY.insert(key, value, 0);
}

/// Counts a refused connect for the service with counter id `stats_id`.
#[inline(always)]
pub fn count_refused(stats_id: u32) {
    count(stats_id, |s| s.refused += 1);
}

#[inline(always)]
fn count(stats_id: u32, update: impl FnOnce(&mut ServiceStats)) {
    if let Some(stats) = LB_STATS.get_ptr_mut(stats_id) {
        // SAFETY: a per-CPU value of this CPU; programs do not migrate while running.
        update(unsafe { &mut *stats });
    }
}
