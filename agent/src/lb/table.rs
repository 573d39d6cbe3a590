//! The service table: services and their backends, written to the load balancer's maps.
//!
//! Changing one service touches only that service's entries. A new backend set is written
//! under a fresh service id first and then published by replacing the one service entry, so a
//! concurrent `connect` sees either the old set or the new one, never a mix or a hole. The
//! set's selection configuration and Maglev table are written under the same fresh id, so they
//! switch with it.
//!
//! Backends that stay keep their slot across a change (a removed backend's slot is refilled
//! by a new one or by the last slot), so session affinity, which remembers slots, survives
//! changes to other backends.

use std::{collections::HashSet, net::SocketAddrV4};

use keelson_ebpf_common::{
    BACKENDS_MAP, Backend, BackendKey, FLAG_MAGLEV, MAGLEV_MAP, MAGLEV_SIZE,
    MAX_BACKENDS_PER_SERVICE, SERVICES_MAP, STATS_MAP, SVC_CONFIG_MAP, ServiceConfig, ServiceEntry,
    ServiceKey, ServiceStats, UNEXPOSED_STATS_ID, VIPS_MAP,
};

use super::{
    error::{Error, Result},
    maglev,
    maps::KvMap,
    selection::{SelectionStore, ServiceOptions},
    service::{Frontend, backend_addr, backend_value},
};

/// One service frontend as programmed, for inspection (`lb dump`, metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The frontend.
    pub frontend: Frontend,
    /// Its backends, sorted.
    pub backends: Vec<SocketAddrV4>,
    /// How backends are chosen; the defaults for entries written by an older agent.
    pub options: ServiceOptions,
    /// Its counters, summed over CPUs, if it has any.
    pub stats: Option<ServiceStats>,
}

/// Every service in the table with its backends, sorted by frontend.
pub type Services = Vec<(Frontend, Vec<SocketAddrV4>)>;

/// Services and backends over the load balancer's maps (kernel maps in production, fakes in
/// tests): services, backend slots, and the count of service ports per virtual IP.
pub struct ServiceTable<S, B, V> {
    services: S,
    backends: B,
    vips: V,
    selection: Box<dyn SelectionStore>,
    used_ids: HashSet<u32>,
    next_id: u32,
    used_stats: HashSet<u32>,
    next_stats: u32,
}

impl<S, B, V> ServiceTable<S, B, V>
where
    S: KvMap<ServiceKey, ServiceEntry>,
    B: KvMap<BackendKey, Backend>,
    V: KvMap<u32, u32>,
{
    /// Wraps the maps, learning which service and counter ids are taken from what is already
    /// there. Writes nothing.
    ///
    /// # Errors
    /// When the services or configuration map cannot be read.
    pub fn new(
        services: S,
        backends: B,
        vips: V,
        selection: Box<dyn SelectionStore>,
    ) -> Result<Self> {
        let entries = services
            .entries()
            .map_err(map_err("iterate", SERVICES_MAP))?;
        let used_ids: HashSet<u32> = entries.iter().map(|(_, entry)| entry.id).collect();
        let next_id = used_ids.iter().max().map_or(1, |id| id.wrapping_add(1));
        // Counter ids of live services only: configurations of sets being replaced share them.
        let mut used_stats = HashSet::from([UNEXPOSED_STATS_ID]);
        for (_, entry) in &entries {
            if let Some(cfg) = selection
                .config(entry.id)
                .map_err(map_err("lookup", SVC_CONFIG_MAP))?
            {
                used_stats.insert(cfg.stats_id);
            }
        }
        let next_stats = used_stats.iter().max().map_or(1, |id| id.wrapping_add(1));
        Ok(ServiceTable {
            services,
            backends,
            vips,
            selection,
            used_ids,
            next_id,
            used_stats,
            next_stats,
        })
    }

    /// Makes sure the counter of connects refused for unexposed ports exists.
    ///
    /// # Errors
    /// The counters map cannot be read or written.
    pub fn ensure_unexposed_counter(&mut self) -> Result<()> {
        if self
            .selection
            .stats(UNEXPOSED_STATS_ID)
            .map_err(map_err("lookup", STATS_MAP))?
            .is_none()
        {
            self.selection
                .reset_stats(UNEXPOSED_STATS_ID)
                .map_err(map_err("insert", STATS_MAP))?;
        }
        Ok(())
    }

    /// Creates or replaces a service with exactly these backends, chosen at random. With no
    /// backends the service exists and refuses connections.
    ///
    /// # Errors
    /// Too many backends, or a map operation failed; the previous backends then stay in effect.
    pub fn upsert(&mut self, frontend: Frontend, backends: &[SocketAddrV4]) -> Result<()> {
        self.upsert_with(frontend, backends, ServiceOptions::default())
    }

    /// Creates or replaces a service with exactly these backends, chosen as `options` say.
    /// Its counters and its clients' affinity survive the change.
    ///
    /// # Errors
    /// Too many backends, or a map operation failed; the previous backends then stay in effect.
    pub fn upsert_with(
        &mut self,
        frontend: Frontend,
        backends: &[SocketAddrV4],
        options: ServiceOptions,
    ) -> Result<()> {
        self.upsert_counted(frontend, backends, options, true)
    }

    /// Like [`ServiceTable::upsert_with`] for a frontend on an address that is not a virtual
    /// IP (a node address with a nodePort, an externalIP): its other ports are left alone
    /// rather than refused, so it is not counted among the virtual IPs. Remove it with
    /// [`ServiceTable::remove_external`].
    ///
    /// # Errors
    /// As [`ServiceTable::upsert`].
    pub fn upsert_external(
        &mut self,
        frontend: Frontend,
        backends: &[SocketAddrV4],
        options: ServiceOptions,
    ) -> Result<()> {
        self.upsert_counted(frontend, backends, options, false)
    }

    fn upsert_counted(
        &mut self,
        frontend: Frontend,
        backends: &[SocketAddrV4],
        options: ServiceOptions,
        vip: bool,
    ) -> Result<()> {
        if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err(Error::TooManyBackends {
                frontend,
                count: backends.len(),
                max: MAX_BACKENDS_PER_SERVICE,
            });
        }
        let key = frontend.key();
        let old = self
            .services
            .get(&key)
            .map_err(map_err("lookup", SERVICES_MAP))?;
        let old_cfg = match old {
            Some(old) => self.config_of(&old)?,
            None => None,
        };
        let old_backends = match old {
            Some(old) => self.backends_of(&old)?,
            None => Vec::new(),
        };
        let wanted: HashSet<&SocketAddrV4> = backends.iter().collect();
        if old.is_some()
            && old_backends.len() == wanted.len()
            && old_backends.iter().all(|b| wanted.contains(b))
            && old_cfg.map(|c| ServiceOptions::from_config(&c)) == Some(options)
        {
            return Ok(());
        }
        let arranged = arrange(&old_backends, backends);
        // At most MAX_BACKENDS_PER_SERVICE, checked above.
        let count = arranged.len() as u32;

        let (stats_id, new_stats) = match old_cfg {
            Some(cfg) => (cfg.stats_id, false),
            None => (self.allocate_stats()?, true),
        };
        let id = self.allocate_id()?;
        let cfg = options.config(stats_id);
        let written = self.write_set(id, &arranged, cfg).and_then(|()| {
            self.services
                .insert(key, ServiceEntry { id, count })
                .map_err(map_err("insert", SERVICES_MAP))
        });
        if let Err(e) = written {
            // Best effort: the new set is unreachable, so a failed cleanup only wastes room.
            let _ = self.remove_set(id, count, Some(cfg));
            self.used_ids.remove(&id);
            if new_stats {
                let _ = self.selection.remove_stats(stats_id);
                self.used_stats.remove(&stats_id);
            }
            return Err(e);
        }
        match old {
            Some(old) => self.release(old, old_cfg)?,
            None if vip => self.count_vip(key.addr, 1)?,
            None => {}
        }
        Ok(())
    }

    fn write_set(&mut self, id: u32, backends: &[SocketAddrV4], cfg: ServiceConfig) -> Result<()> {
        self.write_slots(id, backends)?;
        if cfg.flags & FLAG_MAGLEV != 0 && !backends.is_empty() {
            let slots: Vec<(u32, SocketAddrV4)> = (0u32..).zip(backends.iter().copied()).collect();
            // The whole table in one batch: it is unreachable until the service entry names id.
            self.selection
                .set_maglev_table(id, &maglev::table(&slots))
                .map_err(map_err("insert", MAGLEV_MAP))?;
        }
        self.selection
            .set_config(id, cfg)
            .map_err(map_err("insert", SVC_CONFIG_MAP))
    }

    fn remove_set(&mut self, id: u32, count: u32, cfg: Option<ServiceConfig>) -> Result<()> {
        self.remove_slots(id, count)?;
        // An empty set has no table (see `write_set`).
        if count > 0 && cfg.is_some_and(|c| c.flags & FLAG_MAGLEV != 0) {
            self.selection
                .remove_maglev_table(id, MAGLEV_SIZE)
                .map_err(map_err("delete", MAGLEV_MAP))?;
        }
        self.selection
            .remove_config(id)
            .map_err(map_err("delete", SVC_CONFIG_MAP))
    }

    fn config_of(&self, entry: &ServiceEntry) -> Result<Option<ServiceConfig>> {
        self.selection
            .config(entry.id)
            .map_err(map_err("lookup", SVC_CONFIG_MAP))
    }

    /// Removes a service; returns whether it existed.
    ///
    /// # Errors
    /// A map operation failed.
    pub fn remove(&mut self, frontend: Frontend) -> Result<bool> {
        self.remove_counted(frontend, true)
    }

    /// Removes a frontend made by [`ServiceTable::upsert_external`]; returns whether it
    /// existed.
    ///
    /// # Errors
    /// A map operation failed.
    pub fn remove_external(&mut self, frontend: Frontend) -> Result<bool> {
        self.remove_counted(frontend, false)
    }

    fn remove_counted(&mut self, frontend: Frontend, vip: bool) -> Result<bool> {
        let key = frontend.key();
        let Some(old) = self
            .services
            .get(&key)
            .map_err(map_err("lookup", SERVICES_MAP))?
        else {
            return Ok(false);
        };
        self.services
            .remove(&key)
            .map_err(map_err("delete", SERVICES_MAP))?;
        let cfg = self.config_of(&old)?;
        self.release(old, cfg)?;
        if let Some(cfg) = cfg {
            self.selection
                .remove_stats(cfg.stats_id)
                .map_err(map_err("delete", STATS_MAP))?;
            self.used_stats.remove(&cfg.stats_id);
        }
        if vip {
            self.count_vip(key.addr, -1)?;
        }
        Ok(true)
    }

    /// Adjusts the number of service ports on a virtual IP, dropping the entry at zero.
    fn count_vip(&mut self, addr: u32, delta: i32) -> Result<()> {
        let current = self
            .vips
            .get(&addr)
            .map_err(map_err("lookup", VIPS_MAP))?
            .unwrap_or(0);
        match current.saturating_add_signed(delta) {
            0 => self.vips.remove(&addr).map_err(map_err("delete", VIPS_MAP)),
            n => self
                .vips
                .insert(addr, n)
                .map_err(map_err("insert", VIPS_MAP)),
        }
    }

    /// Every service and its backends, sorted by frontend.
    ///
    /// # Errors
    /// A map could not be read.
    pub fn list(&self) -> Result<Services> {
        let mut out = Vec::new();
        for (key, entry) in self
            .services
            .entries()
            .map_err(map_err("iterate", SERVICES_MAP))?
        {
            if let Some(frontend) = Frontend::from_key(&key) {
                let mut backends = self.backends_of(&entry)?;
                backends.sort();
                out.push((frontend, backends));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every service with its backends, options and counters, sorted by frontend.
    ///
    /// # Errors
    /// A map could not be read.
    pub fn details(&self) -> Result<Vec<ServiceInfo>> {
        let mut out = Vec::new();
        for (key, entry) in self
            .services
            .entries()
            .map_err(map_err("iterate", SERVICES_MAP))?
        {
            let Some(frontend) = Frontend::from_key(&key) else {
                continue;
            };
            let mut backends = self.backends_of(&entry)?;
            backends.sort();
            let cfg = self.config_of(&entry)?;
            let stats = match cfg {
                Some(cfg) => self
                    .selection
                    .stats(cfg.stats_id)
                    .map_err(map_err("lookup", STATS_MAP))?,
                None => None,
            };
            out.push(ServiceInfo {
                frontend,
                backends,
                options: cfg
                    .map(|c| ServiceOptions::from_config(&c))
                    .unwrap_or_default(),
                stats,
            });
        }
        out.sort_by_key(|i| i.frontend);
        Ok(out)
    }

    /// Connects refused because no service has the port on a known virtual IP.
    ///
    /// # Errors
    /// The counters map could not be read.
    pub fn unexposed_refused(&self) -> Result<u64> {
        Ok(self
            .selection
            .stats(UNEXPOSED_STATS_ID)
            .map_err(map_err("lookup", STATS_MAP))?
            .map_or(0, |s| s.refused))
    }

    fn backends_of(&self, entry: &ServiceEntry) -> Result<Vec<SocketAddrV4>> {
        (0..entry.count)
            .map(|slot| {
                let key = BackendKey {
                    service_id: entry.id,
                    slot,
                };
                let b = self
                    .backends
                    .get(&key)
                    .map_err(map_err("lookup", BACKENDS_MAP))?;
                Ok(b.map(|b| backend_addr(&b)))
            })
            .filter_map(Result::transpose)
            .collect()
    }

    fn write_slots(&mut self, id: u32, backends: &[SocketAddrV4]) -> Result<()> {
        for (slot, addr) in (0u32..).zip(backends) {
            let key = BackendKey {
                service_id: id,
                slot,
            };
            self.backends
                .insert(key, backend_value(*addr))
                .map_err(map_err("insert", BACKENDS_MAP))?;
        }
        Ok(())
    }

    fn remove_slots(&mut self, id: u32, count: u32) -> Result<()> {
        for slot in 0..count {
            let key = BackendKey {
                service_id: id,
                slot,
            };
            self.backends
                .remove(&key)
                .map_err(map_err("delete", BACKENDS_MAP))?;
        }
        Ok(())
    }

    fn release(&mut self, entry: ServiceEntry, cfg: Option<ServiceConfig>) -> Result<()> {
        self.remove_set(entry.id, entry.count, cfg)?;
        self.used_ids.remove(&entry.id);
        Ok(())
    }

    /// A counter id no live service uses, with zeroed counters; never 0.
    fn allocate_stats(&mut self) -> Result<u32> {
        for _ in 0..=self.used_stats.len() {
            let id = self.next_stats;
            self.next_stats = self.next_stats.checked_add(1).unwrap_or(1);
            if id != UNEXPOSED_STATS_ID && self.used_stats.insert(id) {
                if let Err(source) = self.selection.reset_stats(id) {
                    self.used_stats.remove(&id);
                    return Err(map_err("insert", STATS_MAP)(source));
                }
                return Ok(id);
            }
        }
        Err(Error::IdsExhausted)
    }

    /// A service id that no service uses; never 0, so a zeroed entry is never valid.
    fn allocate_id(&mut self) -> Result<u32> {
        // Expected O(1): ids are handed out in increasing order and freed ones are skipped.
        for _ in 0..=self.used_ids.len() {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if id != 0 && self.used_ids.insert(id) {
                return Ok(id);
            }
        }
        Err(Error::IdsExhausted)
    }

    /// The raw maps, for inspection in tests.
    #[cfg(test)]
    fn maps(&self) -> (&S, &B, &V) {
        (&self.services, &self.backends, &self.vips)
    }
}

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { op, map, source }
}

/// Slot order for a new backend set: backends in `old` that stay keep their slot, new ones
/// fill the slots of removed ones, and the set is compacted from its end, so slots stay
/// `0..n`.
fn arrange(old: &[SocketAddrV4], new: &[SocketAddrV4]) -> Vec<SocketAddrV4> {
    let wanted: HashSet<&SocketAddrV4> = new.iter().collect();
    let kept: HashSet<&SocketAddrV4> = old.iter().filter(|a| wanted.contains(a)).collect();
    let mut arrivals: Vec<SocketAddrV4> =
        new.iter().filter(|a| !kept.contains(a)).copied().collect();
    arrivals.sort();
    arrivals.dedup();
    let mut arrivals = arrivals.into_iter();
    let mut slots: Vec<Option<SocketAddrV4>> =
        old.iter().map(|a| kept.contains(a).then_some(*a)).collect();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = arrivals.next();
    }
    slots.extend(arrivals.map(Some));
    while let Some(hole) = slots.iter().position(Option::is_none) {
        if let Some(last) = slots.pop().flatten()
            && hole < slots.len()
        {
            slots[hole] = Some(last);
        }
    }
    slots.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use keelson_ebpf_common::MaglevKey;

    use super::*;
    use crate::lb::selection::{Algorithm, SelectionMaps};

    type Fake = ServiceTable<
        HashMap<ServiceKey, ServiceEntry>,
        HashMap<BackendKey, Backend>,
        HashMap<u32, u32>,
    >;

    type FakeSelection = SelectionMaps<
        HashMap<u32, ServiceConfig>,
        HashMap<MaglevKey, u32>,
        HashMap<u32, ServiceStats>,
    >;

    fn selection() -> Box<FakeSelection> {
        Box::new(SelectionMaps {
            config: HashMap::new(),
            maglev: HashMap::new(),
            stats: HashMap::new(),
        })
    }

    /// The selection maps of a table over in-memory maps.
    fn selection_maps(t: &Fake) -> &FakeSelection {
        let any: &dyn std::any::Any = t.selection.as_any();
        any.downcast_ref().expect("in-memory selection maps")
    }

    fn table() -> Fake {
        ServiceTable::new(HashMap::new(), HashMap::new(), HashMap::new(), selection()).unwrap()
    }

    /// The backend-set configuration of a frontend.
    fn config(t: &Fake, f: Frontend) -> ServiceConfig {
        let id = t.maps().0[&f.key()].id;
        t.selection.config(id).unwrap().unwrap()
    }

    /// Slot → backend of a frontend's current set.
    fn slots(t: &Fake, f: Frontend) -> Vec<SocketAddrV4> {
        let entry = t.maps().0[&f.key()];
        t.backends_of(&entry).unwrap()
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddrV4> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn upsert_replace_and_remove_leave_no_stale_slots() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        let dns: Frontend = "10.96.0.53:53/udp".parse().unwrap();

        t.upsert(web, &addrs(&["10.244.0.2:8080", "10.244.0.3:8080"]))
            .unwrap();
        t.upsert(dns, &addrs(&["10.244.0.9:53"])).unwrap();
        assert_eq!(t.maps().1.len(), 3);

        // Shrinking a service leaves exactly the new slots behind.
        t.upsert(web, &addrs(&["10.244.0.4:8080"])).unwrap();
        assert_eq!(
            t.list().unwrap(),
            vec![
                (web, addrs(&["10.244.0.4:8080"])),
                (dns, addrs(&["10.244.0.9:53"])),
            ]
        );
        assert_eq!(t.maps().1.len(), 2);

        assert!(t.remove(web).unwrap());
        assert!(!t.remove(web).unwrap());
        assert_eq!(t.maps().0.len(), 1);
        assert_eq!(t.maps().1.len(), 1);
    }

    #[test]
    fn replacing_backends_publishes_a_fresh_id() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        t.upsert(web, &addrs(&["10.244.0.2:8080"])).unwrap();
        let first = t.maps().0[&web.key()];
        // The same set again changes nothing.
        t.upsert(web, &addrs(&["10.244.0.2:8080"])).unwrap();
        assert_eq!(t.maps().0[&web.key()], first);
        t.upsert(web, &addrs(&["10.244.0.3:8080"])).unwrap();
        let second = t.maps().0[&web.key()];
        assert_ne!(first.id, second.id);
        assert_ne!(second.id, 0);
    }

    #[test]
    fn service_without_backends_has_zero_count() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        t.upsert(web, &[]).unwrap();
        assert_eq!(t.maps().0[&web.key()].count, 0);
        assert_eq!(t.list().unwrap(), vec![(web, vec![])]);
    }

    #[test]
    fn too_many_backends_is_refused_without_touching_maps() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        let many = vec!["10.244.0.2:80".parse().unwrap(); MAX_BACKENDS_PER_SERVICE as usize + 1];
        assert!(matches!(
            t.upsert(web, &many),
            Err(Error::TooManyBackends { .. })
        ));
        assert!(t.maps().0.is_empty() && t.maps().1.is_empty() && t.maps().2.is_empty());
    }

    #[test]
    fn virtual_ips_are_counted_per_service_port() {
        let mut t = table();
        let http: Frontend = "10.96.0.10:80".parse().unwrap();
        let https: Frontend = "10.96.0.10:443".parse().unwrap();
        let vip = http.key().addr;
        t.upsert(http, &addrs(&["10.244.0.2:8080"])).unwrap();
        t.upsert(https, &[]).unwrap();
        // Replacing backends does not count the port twice.
        t.upsert(http, &addrs(&["10.244.0.3:8080"])).unwrap();
        assert_eq!(t.maps().2[&vip], 2);
        t.remove(http).unwrap();
        assert_eq!(t.maps().2[&vip], 1);
        t.remove(https).unwrap();
        assert!(t.maps().2.is_empty());
    }

    #[test]
    fn external_frontends_are_not_virtual_ips() {
        let mut t = table();
        let node_port: Frontend = "172.29.0.10:30080".parse().unwrap();
        t.upsert_external(
            node_port,
            &addrs(&["10.244.0.2:8080"]),
            ServiceOptions::default(),
        )
        .unwrap();
        t.upsert_external(
            node_port,
            &addrs(&["10.244.0.3:8080"]),
            ServiceOptions::default(),
        )
        .unwrap();
        assert!(t.maps().2.is_empty());
        assert_eq!(
            t.list().unwrap(),
            vec![(node_port, addrs(&["10.244.0.3:8080"]))]
        );
        assert!(t.remove_external(node_port).unwrap());
        assert!(t.maps().0.is_empty() && t.maps().1.is_empty() && t.maps().2.is_empty());
    }

    #[test]
    fn reopening_avoids_ids_in_use() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        t.upsert(web, &addrs(&["10.244.0.2:8080"])).unwrap();
        let (services, backends, vips) = (t.services, t.backends, t.vips);
        let used = services[&web.key()].id;
        let mut t = ServiceTable::new(services, backends, vips, selection()).unwrap();
        let other: Frontend = "10.96.0.11:80".parse().unwrap();
        t.upsert(other, &addrs(&["10.244.0.3:8080"])).unwrap();
        assert_ne!(t.maps().0[&other.key()].id, used);
    }

    #[test]
    fn surviving_backends_keep_their_slots() {
        let a = addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]);
        // b (slot 1) leaves, e arrives: e takes slot 1.
        let next = arrange(
            &a,
            &addrs(&["10.0.0.4:80", "10.0.0.1:80", "10.0.0.3:80", "10.0.0.5:80"]),
        );
        assert_eq!(
            next,
            addrs(&["10.0.0.1:80", "10.0.0.5:80", "10.0.0.3:80", "10.0.0.4:80"])
        );
        // b leaves alone: the last slot moves into its place.
        let next = arrange(&a, &addrs(&["10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80"]));
        assert_eq!(next, addrs(&["10.0.0.1:80", "10.0.0.4:80", "10.0.0.3:80"]));
        // The last one leaves: nothing else moves.
        let next = arrange(&a, &addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]));
        assert_eq!(next, addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]));
        // Everything replaced, and growth: new ones in address order.
        let next = arrange(&a[..1], &addrs(&["10.0.0.9:80", "10.0.0.8:80"]));
        assert_eq!(next, addrs(&["10.0.0.8:80", "10.0.0.9:80"]));
    }

    #[test]
    fn counters_and_options_survive_backend_changes_and_go_with_the_service() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        let affinity = ServiceOptions {
            algorithm: Algorithm::Random,
            affinity_timeout_secs: Some(60),
        };
        t.upsert_with(web, &addrs(&["10.244.0.2:8080"]), affinity)
            .unwrap();
        let first = config(&t, web);
        assert_eq!(ServiceOptions::from_config(&first), affinity);
        assert_ne!(first.stats_id, UNEXPOSED_STATS_ID);
        assert_eq!(
            t.selection.stats(first.stats_id).unwrap(),
            Some(ServiceStats::default())
        );

        t.upsert_with(
            web,
            &addrs(&["10.244.0.2:8080", "10.244.0.3:8080"]),
            affinity,
        )
        .unwrap();
        let second = config(&t, web);
        assert_eq!(second.stats_id, first.stats_id);
        // Only the live set has a configuration.
        assert_eq!(t.selection.configs().unwrap().len(), 1);

        // Changing only the options publishes a new set too.
        let id = t.maps().0[&web.key()].id;
        t.upsert_with(
            web,
            &addrs(&["10.244.0.3:8080", "10.244.0.2:8080"]),
            ServiceOptions::default(),
        )
        .unwrap();
        assert_ne!(t.maps().0[&web.key()].id, id);
        assert_eq!(config(&t, web).flags, 0);
        assert_eq!(t.details().unwrap()[0].options, ServiceOptions::default());

        assert!(t.remove(web).unwrap());
        assert!(t.selection.configs().unwrap().is_empty());
        assert_eq!(t.selection.stats(first.stats_id).unwrap(), None);
    }

    #[test]
    fn maglev_tables_are_written_with_the_set_and_removed_with_it() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        let maglev = ServiceOptions {
            algorithm: Algorithm::Maglev,
            affinity_timeout_secs: None,
        };
        let backends = addrs(&["10.244.0.2:8080", "10.244.0.3:8080", "10.244.0.4:8080"]);
        t.upsert_with(web, &backends, maglev).unwrap();
        let id = t.maps().0[&web.key()].id;
        let sel = selection_maps(&t);
        assert_eq!(sel.maglev.len(), MAGLEV_SIZE as usize);
        assert!(
            sel.maglev
                .iter()
                .all(|(k, slot)| k.service_id == id && *slot < 3)
        );

        // A new set replaces the table; the old one is gone.
        t.upsert_with(web, &backends[..2], maglev).unwrap();
        let id2 = t.maps().0[&web.key()].id;
        let sel = selection_maps(&t);
        assert_eq!(sel.maglev.len(), MAGLEV_SIZE as usize);
        assert!(sel.maglev.keys().all(|k| k.service_id == id2));
        assert_eq!(slots(&t, web), backends[..2].to_vec());

        t.upsert(web, &backends).unwrap();
        assert!(selection_maps(&t).maglev.is_empty());

        // An empty set (a Service before its endpoints) has no table to write or remove.
        t.upsert_with(web, &[], maglev).unwrap();
        assert!(selection_maps(&t).maglev.is_empty());
        t.upsert_with(web, &backends, maglev).unwrap();
        assert_eq!(selection_maps(&t).maglev.len(), MAGLEV_SIZE as usize);
        t.upsert_with(web, &[], maglev).unwrap();
        assert!(selection_maps(&t).maglev.is_empty());
    }
}
