//! Backend selection, shared by every path that balances a service: session affinity, Maglev
//! or a random slot, and the per-service counters. Each path has maps of its own (its own
//! frontends and id spaces), named by a [`Maps`] implementation: [`Socket`] for the cgroup
//! programs, `nodeport::Tc` for the tc programs.
//!
//! The socket path hashes (client identity, frontend); the tc path calls [`choose`] once per
//! new flow with `Client { kind: CLIENT_ADDR, id: saddr }` and the hash of
//! `packet_flow_words(..)` (in `keelson-ebpf-common`, so that every node hashes a flow alike).
//! Each call counts one connection.
//!
//! The maps are keyed by the backend-set id (`ServiceEntry::id`, fresh on every backend
//! change) where they describe one backend set — its configuration, which names its Maglev
//! table — and by the stable `ServiceConfig::stats_id` where they must outlive a change:
//! affinity and counters. Maglev tables are whole values of an array map; user space writes a
//! service's unused table and publishes it with the new set, so a reader sees one table whole.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
};
use keelson_ebpf_common::{
    AffinityKey, AffinityValue, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, Backend, BackendKey,
    FLAG_AFFINITY, FLAG_MAGLEV_TABLE, MAGLEV_TABLES_PER_SERVICE, MAX_AFFINITY, MAX_MAGLEV_SERVICES,
    MAX_SERVICES, MaglevTable, ServiceConfig, ServiceEntry, ServiceStats, maglev_index,
};

use crate::BACKENDS;

/// The maps one path selects with. Every function is inlined, so that the programs refer to
/// the maps directly (the verifier needs map pointers as constants).
pub trait Maps {
    /// Backend slots.
    fn backends() -> &'static HashMap<BackendKey, Backend>;
    /// Backend-set id → configuration.
    fn configs() -> &'static HashMap<u32, ServiceConfig>;
    /// Maglev tables.
    fn maglev() -> &'static Array<MaglevTable>;
    /// Session affinity.
    fn affinity() -> &'static LruHashMap<AffinityKey, AffinityValue>;
    /// Counters.
    fn stats() -> &'static PerCpuHashMap<u32, ServiceStats>;
}

/// The socket load balancer's maps.
pub struct Socket;

impl Maps for Socket {
    #[inline(always)]
    fn backends() -> &'static HashMap<BackendKey, Backend> {
        &BACKENDS
    }
    #[inline(always)]
    fn configs() -> &'static HashMap<u32, ServiceConfig> {
        &SVC_CONFIG
    }
    #[inline(always)]
    fn maglev() -> &'static Array<MaglevTable> {
        &MAGLEV
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey, AffinityValue> {
        &AFFINITY
    }
    #[inline(always)]
    fn stats() -> &'static PerCpuHashMap<u32, ServiceStats> {
        &LB_STATS
    }
}

/// Backend-set id → how that set is balanced.
#[map(name = "SVC_CONFIG")]
static SVC_CONFIG: HashMap<u32, ServiceConfig> = HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// The Maglev lookup tables, two per Maglev service; user space writes them through a memory
/// mapping.
#[map(name = "MAGLEV")]
static MAGLEV: Array<MaglevTable> = Array::pinned(
    MAGLEV_TABLES_PER_SERVICE * MAX_MAGLEV_SERVICES,
    BPF_F_MMAPABLE,
);

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

/// The configuration of a backend set; for a set written without one (by an older agent) the
/// default: random, no affinity, counter id 0 (`UNEXPOSED_STATS_ID`, which no service has).
///
/// Not an `Option`: an absent configuration's undefined payload, kept in a register across a
/// helper call, made the verifier reject the program ("R2 !read_ok").
#[inline(always)]
pub fn config<M: Maps>(service: &ServiceEntry) -> ServiceConfig {
    // SAFETY: read-only access; user space replaces values whole.
    unsafe { M::configs().get(service.id) }
        .copied()
        .unwrap_or_default()
}

/// Picks a backend of `service` (which has `count > 0`) for `client`, whose flow hashes to
/// `hash`, and counts the connection. `None` when the slot read is gone (user space is
/// replacing the set): the caller refuses.
#[inline(always)]
pub fn choose<M: Maps>(
    service: &ServiceEntry,
    cfg: ServiceConfig,
    client: Client,
    hash: u32,
) -> Option<Choice> {
    let affinity = cfg.flags & FLAG_AFFINITY != 0;
    let akey = AffinityKey {
        stats_id: cfg.stats_id,
        kind: client.kind,
        client: client.id,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if affinity && let Some((slot, backend)) = remembered::<M>(service, &akey, &cfg, now) {
        remember::<M>(&akey, slot, &backend, now);
        count::<M>(cfg.stats_id, |s| {
            s.connections += 1;
            s.affinity_hits += 1;
        });
        return Some(Choice { backend });
    }
    // A Maglev set written by an older agent has no table here: random until rewritten.
    let slot = if cfg.flags & FLAG_MAGLEV_TABLE != 0 {
        let table = M::maglev().get(cfg.maglev_table)?;
        *table.entries.get(maglev_index(hash) as usize)?
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
    let backend = *unsafe { M::backends().get(key) }?;
    if affinity {
        remember::<M>(&akey, slot, &backend, now);
    }
    count::<M>(cfg.stats_id, |s| s.connections += 1);
    Some(Choice { backend })
}

/// The client's previous backend, if it is recent and still in the current set.
#[inline(always)]
fn remembered<M: Maps>(
    service: &ServiceEntry,
    key: &AffinityKey,
    cfg: &ServiceConfig,
    now: u64,
) -> Option<(u32, Backend)> {
    // SAFETY: read-only access to a map value.
    let prev = *unsafe { M::affinity().get(key) }?;
    let timeout = u64::from(cfg.affinity_timeout_secs) * 1_000_000_000;
    if now.wrapping_sub(prev.last_used_ns) > timeout || prev.slot >= service.count {
        return None;
    }
    let key = BackendKey {
        service_id: service.id,
        slot: prev.slot,
    };
    // SAFETY: as above.
    let backend = *unsafe { M::backends().get(key) }?;
    (backend.addr == prev.addr && backend.port == prev.port).then_some((prev.slot, backend))
}

#[inline(always)]
fn remember<M: Maps>(key: &AffinityKey, slot: u32, backend: &Backend, now: u64) {
    let value = AffinityValue {
        last_used_ns: now,
        slot,
        addr: backend.addr,
        port: backend.port,
        pad: [0; 6],
    };
    // On failure the next connect simply chooses afresh.
    let _ = M::affinity().insert(key, value, 0);
}

/// Counts a refused connect for the service with counter id `stats_id` (also a drop).
#[inline(always)]
pub fn count_refused<M: Maps>(stats_id: u32) {
    count::<M>(stats_id, |s| {
        s.refused += 1;
        s.drops += 1;
    });
}

/// Counts a dropped packet for the service with counter id `stats_id`.
#[inline(always)]
pub fn count_drop<M: Maps>(stats_id: u32) {
    count::<M>(stats_id, |s| s.drops += 1);
}

/// Counts a translated packet for the service with counter id `stats_id`.
#[inline(always)]
pub fn count_packet<M: Maps>(stats_id: u32) {
    count::<M>(stats_id, |s| s.packets += 1);
}

#[inline(always)]
fn count<M: Maps>(stats_id: u32, update: impl FnOnce(&mut ServiceStats)) {
    if let Some(stats) = M::stats().get_ptr_mut(stats_id) {
        // SAFETY: a per-CPU value of this CPU; programs do not migrate while running.
        update(unsafe { &mut *stats });
    }
}
