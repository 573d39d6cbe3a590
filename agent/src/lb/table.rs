//! The service table: services and their backends, written to the load balancer's maps.
//!
//! Changing one service touches only that service's entries. A new backend set is written
//! under a fresh service id first and then published by replacing the one service entry, so a
//! concurrent `connect` sees either the old set or the new one, never a mix or a hole. The
//! set's selection configuration is written under the same fresh id, so it switches with it.
//!
//! A Maglev service holds a pair of tables in the Maglev map ([`maglev_slots`]); its
//! configuration names the one in use. A change writes the other table (no program reads it)
//! and names it in the new set's configuration, so publishing the set flips the table with it.
//!
//! [`maglev_slots`]: super::maglev_slots
//!
//! Backends that stay keep their slot across a change (a removed backend's slot is refilled
//! by a new one or by the last slot), so session affinity, which remembers slots, survives
//! changes to other backends.

use std::{collections::HashSet, net::SocketAddrV4};

use keelson_ebpf_common::{
    BACKENDS_MAP, Backend, BackendKey, MAGLEV_MAP, MAGLEV_TABLES_PER_SERVICE,
    MAX_BACKENDS_PER_SERVICE, SERVICES_MAP, STATS_MAP, SVC_CONFIG_MAP, ServiceConfig, ServiceEntry,
    ServiceKey, ServiceStats, UNEXPOSED_STATS_ID, VIPS_MAP,
};

use super::{
    error::{Error, Result},
    maglev,
    maglev_slots::{MaglevSlots, first_table, other_table, slot_of},
    maps::KvMap,
    selection::{Algorithm, SelectionStore, ServiceOptions},
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
    maglev_slots: MaglevSlots,
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
        // Counter ids and Maglev tables of live services only: configurations of sets being
        // replaced share them.
        let mut used_stats = HashSet::from([UNEXPOSED_STATS_ID]);
        let mut used_tables = Vec::new();
        for (_, entry) in &entries {
            if let Some(cfg) = selection
                .config(entry.id)
                .map_err(map_err("lookup", SVC_CONFIG_MAP))?
            {
                used_stats.insert(cfg.stats_id);
                used_tables.extend(ServiceOptions::table_of(&cfg).map(slot_of));
            }
        }
        let next_stats = used_stats.iter().max().map_or(1, |id| id.wrapping_add(1));
        let maglev_slots = MaglevSlots::new(
            selection.maglev_tables() / MAGLEV_TABLES_PER_SERVICE,
            used_tables,
        );
        Ok(ServiceTable {
            services,
            backends,
            vips,
            selection,
            used_ids,
            next_id,
            used_stats,
            next_stats,
            maglev_slots,
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
        let wants_table = options.algorithm == Algorithm::Maglev && !backends.is_empty();
        let old_table = old_cfg.as_ref().and_then(ServiceOptions::table_of);
        // A Maglev set of an older agent has no table here yet: rewritten, not kept.
        if old.is_some()
            && old_backends.len() == wanted.len()
            && old_backends.iter().all(|b| wanted.contains(b))
            && old_cfg.map(|c| ServiceOptions::from_config(&c)) == Some(options)
            && old_table.is_some() == wants_table
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
        // The service's other table (not in use), or the first of a fresh pair.
        let (table, new_slot) = match (wants_table, old_table) {
            (false, _) => (None, None),
            (true, Some(t)) => (Some(other_table(t)), None),
            (true, None) => match self.maglev_slots.allocate() {
                Some(slot) => (Some(first_table(slot)), Some(slot)),
                None => {
                    if new_stats {
                        let _ = self.selection.remove_stats(stats_id);
                        self.used_stats.remove(&stats_id);
                    }
                    return Err(Error::MaglevTablesExhausted {
                        frontend,
                        max: self.maglev_slots.capacity(),
                    });
                }
            },
        };
        let id = self.allocate_id()?;
        let cfg = match table {
            Some(t) => ServiceOptions::with_table(options.config(stats_id), t),
            None => options.config(stats_id),
        };
        let written = self.write_set(id, &arranged, cfg).and_then(|()| {
            self.services
                .insert(key, ServiceEntry { id, count })
                .map_err(map_err("insert", SERVICES_MAP))
        });
        if let Err(e) = written {
            // Best effort: the new set is unreachable, so a failed cleanup only wastes room.
            let _ = self.remove_set(id, count);
            self.used_ids.remove(&id);
            if let Some(slot) = new_slot {
                self.maglev_slots.release(slot);
            }
            if new_stats {
                let _ = self.selection.remove_stats(stats_id);
                self.used_stats.remove(&stats_id);
            }
            return Err(e);
        }
        // Published: a table pair the service no longer uses is free again.
        if let (Some(t), None) = (old_table, table) {
            self.maglev_slots.release(slot_of(t));
        }
        match old {
            Some(old) => self.release(old)?,
            None if vip => self.count_vip(key.addr, 1)?,
            None => {}
        }
        Ok(())
    }

    fn write_set(&mut self, id: u32, backends: &[SocketAddrV4], cfg: ServiceConfig) -> Result<()> {
        self.write_slots(id, backends)?;
        if let Some(table) = ServiceOptions::table_of(&cfg) {
            let slots: Vec<(u32, SocketAddrV4)> = (0u32..).zip(backends.iter().copied()).collect();
            // Through the map's memory mapping: the table is unreachable until the service
            // entry names `id`, whose configuration names it.
            self.selection
                .write_maglev_table(table, &maglev::table(&slots))
                .map_err(map_err("write", MAGLEV_MAP))?;
        }
        self.selection
            .set_config(id, cfg)
            .map_err(map_err("insert", SVC_CONFIG_MAP))
    }

    /// Removes a backend set's slots and configuration; its Maglev table (if any) stays, to
    /// be overwritten by the next change of its service or the next owner of its pair.
    fn remove_set(&mut self, id: u32, count: u32) -> Result<()> {
        self.remove_slots(id, count)?;
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
        self.release(old)?;
        if let Some(cfg) = cfg {
            if let Some(t) = ServiceOptions::table_of(&cfg) {
                self.maglev_slots.release(slot_of(t));
            }
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

    fn release(&mut self, entry: ServiceEntry) -> Result<()> {
        self.remove_set(entry.id, entry.count)?;
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

    use keelson_ebpf_common::{FLAG_MAGLEV_TABLE, MAGLEV_SIZE};

    use super::*;
    use crate::lb::{maglev_tables::InMemoryTables, selection::SelectionMaps};

    type Fake = ServiceTable<
        HashMap<ServiceKey, ServiceEntry>,
        HashMap<BackendKey, Backend>,
        HashMap<u32, u32>,
    >;

    type FakeSelection =
        SelectionMaps<HashMap<u32, ServiceConfig>, InMemoryTables, HashMap<u32, ServiceStats>>;

    /// Room for this many Maglev services in the fake tables.
    const FAKE_MAGLEV_SERVICES: u32 = 3;

    fn selection() -> Box<FakeSelection> {
        Box::new(SelectionMaps {
            config: HashMap::new(),
            maglev: InMemoryTables::new(FAKE_MAGLEV_SERVICES * MAGLEV_TABLES_PER_SERVICE),
            stats: HashMap::new(),
        })
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

    const MAGLEV: ServiceOptions = ServiceOptions {
        algorithm: Algorithm::Maglev,
        affinity_timeout_secs: None,
    };

    /// The Maglev table a frontend's live set uses, and its content as backend addresses.
    fn live_table(t: &Fake, f: Frontend) -> (u32, Vec<SocketAddrV4>) {
        let cfg = config(t, f);
        let table = ServiceOptions::table_of(&cfg).expect("a Maglev table");
        let backends = slots(t, f);
        let content = t.selection.maglev_table(table).unwrap();
        let addrs = content.iter().map(|s| backends[*s as usize]).collect();
        (table, addrs)
    }

    /// The expected table for a set given in slot order, as addresses.
    fn expected(backends: &[SocketAddrV4]) -> Vec<SocketAddrV4> {
        let slots: Vec<(u32, SocketAddrV4)> = (0u32..).zip(backends.iter().copied()).collect();
        maglev::table(&slots)
            .iter()
            .map(|s| backends[*s as usize])
            .collect()
    }

    #[test]
    fn a_maglev_change_writes_the_other_table_and_flips_to_it_with_the_set() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        let backends = addrs(&["10.244.0.2:8080", "10.244.0.3:8080", "10.244.0.4:8080"]);
        t.upsert_with(web, &backends, MAGLEV).unwrap();
        let (first, content) = live_table(&t, web);
        assert_eq!(content.len(), MAGLEV_SIZE as usize);
        assert_eq!(content, expected(&slots(&t, web)));
        let before = t.selection.maglev_table(first).unwrap();

        // One backend replaced: the new set names the pair's other table, written whole,
        // while the table the old set used is left as it was (a reader may still be on it).
        let changed = addrs(&["10.244.0.2:8080", "10.244.0.9:8080", "10.244.0.4:8080"]);
        t.upsert_with(web, &changed, MAGLEV).unwrap();
        let (second, content) = live_table(&t, web);
        assert_eq!(second, other_table(first));
        assert_eq!(content, expected(&slots(&t, web)));
        assert_eq!(t.selection.maglev_table(first).unwrap(), before);

        // And back again: the pair alternates.
        t.upsert_with(web, &backends, MAGLEV).unwrap();
        assert_eq!(live_table(&t, web).0, first);
        // Only the live set has a configuration.
        assert_eq!(t.selection.configs().unwrap().len(), 1);
    }

    #[test]
    fn maglev_table_pairs_are_bounded_freed_and_recovered_after_a_restart() {
        let mut t = table();
        let one = addrs(&["10.244.0.2:8080"]);
        let fronts: Vec<Frontend> = (1..=FAKE_MAGLEV_SERVICES + 1)
            .map(|i| format!("10.96.0.{i}:80").parse().unwrap())
            .collect();
        for f in &fronts[..FAKE_MAGLEV_SERVICES as usize] {
            t.upsert_with(*f, &one, MAGLEV).unwrap();
        }
        let last = fronts[FAKE_MAGLEV_SERVICES as usize];
        let err = t.upsert_with(last, &one, MAGLEV).unwrap_err();
        assert!(
            matches!(err, Error::MaglevTablesExhausted { max: 3, .. }),
            "{err}"
        );
        // The refused service left nothing behind, not even counters.
        assert_eq!(t.list().unwrap().len(), FAKE_MAGLEV_SERVICES as usize);
        assert_eq!(selection_stats(&t), FAKE_MAGLEV_SERVICES as usize);
        // Random services need no table.
        t.upsert(last, &one).unwrap();

        // Removing a Maglev service, or turning it random or empty, frees its pair.
        t.remove(fronts[0]).unwrap();
        t.upsert_with(last, &one, MAGLEV).unwrap();
        t.upsert(fronts[1], &one).unwrap();
        assert_eq!(config(&t, fronts[1]).flags & FLAG_MAGLEV_TABLE, 0);
        t.upsert_with(fronts[0], &one, MAGLEV).unwrap();
        t.upsert_with(fronts[2], &[], MAGLEV).unwrap();
        assert_eq!(config(&t, fronts[2]).flags & FLAG_MAGLEV_TABLE, 0);

        // A restarted agent learns the pairs in use from the pinned configurations.
        let in_use: HashSet<u32> = [last, fronts[0]]
            .iter()
            .map(|f| slot_of(live_table(&t, *f).0))
            .collect();
        assert_eq!(in_use.len(), 2);
        let Fake {
            services,
            backends,
            vips,
            selection,
            ..
        } = t;
        let mut t = ServiceTable::new(services, backends, vips, selection).unwrap();
        t.upsert_with(fronts[1], &one, MAGLEV).unwrap();
        let fresh = slot_of(live_table(&t, fronts[1]).0);
        assert!(!in_use.contains(&fresh), "pair {fresh} handed out twice");
        assert!(matches!(
            t.upsert_with(fronts[2], &one, MAGLEV),
            Err(Error::MaglevTablesExhausted { .. })
        ));
    }

    #[test]
    fn maglev_sets_of_an_older_agent_are_rewritten_with_a_table() {
        let mut t = table();
        let web: Frontend = "10.96.0.10:80".parse().unwrap();
        let backends = addrs(&["10.244.0.2:8080", "10.244.0.3:8080"]);
        t.upsert_with(web, &backends, MAGLEV).unwrap();
        // What an older agent wrote: the Maglev flag, no table.
        let id = t.services[&web.key()].id;
        let mut cfg = t.selection.config(id).unwrap().unwrap();
        cfg.flags &= !FLAG_MAGLEV_TABLE;
        cfg.maglev_table = 0;
        t.selection.set_config(id, cfg).unwrap();
        let Fake {
            services,
            backends: b,
            vips,
            selection,
            ..
        } = t;
        let mut t = ServiceTable::new(services, b, vips, selection).unwrap();
        // The same backends and options: still rewritten, now with a table.
        t.upsert_with(web, &backends, MAGLEV).unwrap();
        assert_ne!(t.services[&web.key()].id, id);
        let (_, content) = live_table(&t, web);
        assert_eq!(content, expected(&slots(&t, web)));
        // Unchanged from here on.
        let id = t.services[&web.key()].id;
        t.upsert_with(web, &backends, MAGLEV).unwrap();
        assert_eq!(t.services[&web.key()].id, id);
    }

    /// Number of counter entries.
    fn selection_stats(t: &Fake) -> usize {
        let any: &dyn std::any::Any = t.selection.as_any();
        let maps: &FakeSelection = any.downcast_ref().expect("in-memory selection maps");
        maps.stats.len()
    }
}
