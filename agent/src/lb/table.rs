//! The service table: services and their backends, written to the load balancer's maps.
//!
//! Changing one service touches only that service's entries. A new backend set is written
//! under a fresh service id first and then published by replacing the one service entry, so a
//! concurrent `connect` sees either the old set or the new one, never a mix or a hole.

use std::{collections::HashSet, net::SocketAddrV4};

use keelson_ebpf_common::{
    BACKENDS_MAP, Backend, BackendKey, MAX_BACKENDS_PER_SERVICE, SERVICES_MAP, ServiceEntry,
    ServiceKey, VIPS_MAP,
};

use super::{
    error::{Error, Result},
    maps::KvMap,
    service::{Frontend, backend_addr, backend_value},
};

/// Every service in the table with its backends, sorted by frontend.
pub type Services = Vec<(Frontend, Vec<SocketAddrV4>)>;

/// Services and backends over the load balancer's maps (kernel maps in production, fakes in
/// tests): services, backend slots, and the count of service ports per virtual IP.
pub struct ServiceTable<S, B, V> {
    services: S,
    backends: B,
    vips: V,
    used_ids: HashSet<u32>,
    next_id: u32,
}

impl<S, B, V> ServiceTable<S, B, V>
where
    S: KvMap<ServiceKey, ServiceEntry>,
    B: KvMap<BackendKey, Backend>,
    V: KvMap<u32, u32>,
{
    /// Wraps the maps, learning which service ids are taken from what is already there.
    ///
    /// # Errors
    /// When the services map cannot be read.
    pub fn new(services: S, backends: B, vips: V) -> Result<Self> {
        let used_ids: HashSet<u32> = services
            .entries()
            .map_err(map_err("iterate", SERVICES_MAP))?
            .into_iter()
            .map(|(_, entry)| entry.id)
            .collect();
        let next_id = used_ids.iter().max().map_or(1, |id| id.wrapping_add(1));
        Ok(ServiceTable {
            services,
            backends,
            vips,
            used_ids,
            next_id,
        })
    }

    /// Creates or replaces a service with exactly these backends. With no backends the service
    /// exists and refuses connections.
    ///
    /// # Errors
    /// Too many backends, or a map operation failed; the previous backends then stay in effect.
    pub fn upsert(&mut self, frontend: Frontend, backends: &[SocketAddrV4]) -> Result<()> {
        self.upsert_counted(frontend, backends, true)
    }

    /// Like [`ServiceTable::upsert`] for a frontend on an address that is not a virtual IP
    /// (a node address with a nodePort, an externalIP): its other ports are left alone rather
    /// than refused, so it is not counted among the virtual IPs. Remove it with
    /// [`ServiceTable::remove_external`].
    ///
    /// # Errors
    /// As [`ServiceTable::upsert`].
    pub fn upsert_external(&mut self, frontend: Frontend, backends: &[SocketAddrV4]) -> Result<()> {
        self.upsert_counted(frontend, backends, false)
    }

    fn upsert_counted(
        &mut self,
        frontend: Frontend,
        backends: &[SocketAddrV4],
        vip: bool,
    ) -> Result<()> {
        let count = u32::try_from(backends.len())
            .ok()
            .filter(|n| *n <= MAX_BACKENDS_PER_SERVICE)
            .ok_or(Error::TooManyBackends {
                frontend,
                count: backends.len(),
                max: MAX_BACKENDS_PER_SERVICE,
            })?;
        let key = frontend.key();
        let old = self
            .services
            .get(&key)
            .map_err(map_err("lookup", SERVICES_MAP))?;
        if let Some(old) = old
            && self.backends_of(&old)? == backends
        {
            return Ok(());
        }

        let id = self.allocate_id()?;
        let written = self.write_slots(id, backends).and_then(|()| {
            self.services
                .insert(key, ServiceEntry { id, count })
                .map_err(map_err("insert", SERVICES_MAP))
        });
        if let Err(e) = written {
            // Best effort: the new slots are unreachable, so a failed cleanup only wastes room.
            let _ = self.remove_slots(id, count);
            self.used_ids.remove(&id);
            return Err(e);
        }
        match old {
            Some(old) => self.release(old)?,
            None if vip => self.count_vip(key.addr, 1)?,
            None => {}
        }
        Ok(())
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
        self.release(old)?;
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
                out.push((frontend, self.backends_of(&entry)?));
            }
        }
        out.sort();
        Ok(out)
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
        self.remove_slots(entry.id, entry.count)?;
        self.used_ids.remove(&entry.id);
        Ok(())
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    type Fake = ServiceTable<
        HashMap<ServiceKey, ServiceEntry>,
        HashMap<BackendKey, Backend>,
        HashMap<u32, u32>,
    >;

    fn table() -> Fake {
        ServiceTable::new(HashMap::new(), HashMap::new(), HashMap::new()).unwrap()
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
        t.upsert_external(node_port, &addrs(&["10.244.0.2:8080"]))
            .unwrap();
        t.upsert_external(node_port, &addrs(&["10.244.0.3:8080"]))
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
        let mut t = ServiceTable::new(services, backends, vips).unwrap();
        let other: Frontend = "10.96.0.11:80".parse().unwrap();
        t.upsert(other, &addrs(&["10.244.0.3:8080"])).unwrap();
        assert_ne!(t.maps().0[&other.key()].id, used);
    }
}
