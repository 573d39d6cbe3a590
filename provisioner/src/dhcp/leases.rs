//! Address allocation for the full DHCP server: a pool, reservations by MAC, short-lived
//! offers, and leases persisted to a small JSON file (written atomically on every change) so
//! that a restarted server does not hand out an address that is still leased.
//!
//! Time is passed in by the caller (seconds since the Unix epoch), so tests control it.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mac::Mac;

/// How long an offered address is held for the client that was offered it.
pub const OFFER_HOLD_SECS: u64 = 60;

/// Errors of the lease store.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease file could not be read or written.
    #[error("lease file {path}: {source}")]
    Io {
        /// The lease file (or its temporary sibling).
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The lease file is not valid; refusing to start rather than risk duplicate addresses.
    #[error("lease file {path} is corrupt (move it away to start fresh): {source}")]
    Corrupt {
        /// The lease file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// A lease (or a declined address, with `mac: None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// The holder; `None` for an address a client declined (in use by someone else).
    pub mac: Option<Mac>,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseFile {
    leases: Vec<Lease>,
}

/// The dynamic pool and reservations.
#[derive(Debug, Clone)]
pub struct Pool {
    /// First address.
    pub start: Ipv4Addr,
    /// Last address (inclusive).
    pub end: Ipv4Addr,
    /// Reserved addresses by MAC (may lie outside the pool).
    pub reservations: HashMap<Mac, Ipv4Addr>,
    /// Addresses never handed out (the server's own, the router's).
    pub excluded: Vec<Ipv4Addr>,
}

impl Pool {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(ip))
    }

    fn reserved_for_other(&self, ip: Ipv4Addr, mac: Mac) -> bool {
        self.reservations.iter().any(|(m, r)| *r == ip && *m != mac)
    }
}

/// Leases and offers, optionally backed by a file.
#[derive(Debug)]
pub struct LeaseStore {
    path: Option<PathBuf>,
    pool: Pool,
    leases: BTreeMap<Ipv4Addr, Lease>,
    offers: HashMap<Mac, (Ipv4Addr, u64)>,
}

impl LeaseStore {
    /// An in-memory store (nothing persisted).
    pub fn in_memory(pool: Pool) -> Self {
        LeaseStore {
            path: None,
            pool,
            leases: BTreeMap::new(),
            offers: HashMap::new(),
        }
    }

    /// Opens the store backed by `path`, loading existing leases (a missing file is empty).
    ///
    /// # Errors
    /// [`LeaseError::Io`] when the file cannot be read, [`LeaseError::Corrupt`] when it does
    /// not parse.
    pub fn open(path: &Path, pool: Pool) -> Result<Self, LeaseError> {
        let mut store = Self::in_memory(pool);
        store.path = Some(path.to_path_buf());
        match std::fs::read(path) {
            Ok(bytes) => {
                let file: LeaseFile =
                    serde_json::from_slice(&bytes).map_err(|source| LeaseError::Corrupt {
                        path: path.to_path_buf(),
                        source,
                    })?;
                for l in file.leases {
                    store.leases.insert(l.ip, l);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LeaseError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        Ok(store)
    }

    /// Replaces the reservations (the inventory changed). Leases already granted stay until
    /// they end; a reserved address is not offered to anyone else from now on.
    pub fn set_reservations(&mut self, reservations: HashMap<Mac, Ipv4Addr>) {
        self.pool.reservations = reservations;
    }

    /// All leases (including expired ones, which are kept to give clients their old address).
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Whether `ip` may be given to `mac` at `now`.
    fn available(&self, ip: Ipv4Addr, mac: Mac, now: u64) -> bool {
        if self.pool.reserved_for_other(ip, mac) || self.pool.excluded.contains(&ip) {
            return false;
        }
        if let Some(l) = self.leases.get(&ip)
            && l.mac != Some(mac)
            && l.expires > now
        {
            return false;
        }
        !self
            .offers
            .iter()
            .any(|(m, (o, exp))| *o == ip && *m != mac && *exp > now)
    }

    /// Picks an address for `mac` and holds it as an offer: its reservation, its current or
    /// previous lease, its requested address, or a free pool address (never used before
    /// first, then the longest expired).
    pub fn offer(&mut self, mac: Mac, requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
        let ip = self.choose(mac, requested, now)?;
        self.offers.insert(mac, (ip, now + OFFER_HOLD_SECS));
        Some(ip)
    }

    fn choose(&self, mac: Mac, requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
        if let Some(&ip) = self.pool.reservations.get(&mac) {
            return self.available(ip, mac, now).then_some(ip);
        }
        if let Some(l) = self.leases.values().find(|l| l.mac == Some(mac))
            && self.pool.contains(l.ip)
            && self.available(l.ip, mac, now)
        {
            return Some(l.ip);
        }
        if let Some(&(ip, exp)) = self.offers.get(&mac)
            && exp > now
        {
            return Some(ip);
        }
        if let Some(ip) = requested
            && self.pool.contains(ip)
            && self.available(ip, mac, now)
        {
            return Some(ip);
        }
        let free = |ip: &Ipv4Addr| self.available(*ip, mac, now);
        let range = u32::from(self.pool.start)..=u32::from(self.pool.end);
        let never_used = range
            .clone()
            .map(Ipv4Addr::from)
            .find(|ip| !self.leases.contains_key(ip) && free(ip));
        never_used.or_else(|| {
            range
                .map(Ipv4Addr::from)
                .filter(free)
                .min_by_key(|ip| self.leases.get(ip).map_or(0, |l| l.expires))
        })
    }

    /// Whether `mac` may have `ip` now (for DHCPREQUEST): its reservation, or a pool address
    /// not held by anyone else. A MAC with a reservation may only have that address.
    pub fn may_have(&self, mac: Mac, ip: Ipv4Addr, now: u64) -> bool {
        match self.pool.reservations.get(&mac) {
            Some(&r) => r == ip && self.available(ip, mac, now),
            None => self.pool.contains(ip) && self.available(ip, mac, now),
        }
    }

    /// The address currently leased to `mac`, if any (unexpired).
    pub fn active_lease(&self, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        self.leases
            .values()
            .find(|l| l.mac == Some(mac) && l.expires > now)
            .map(|l| l.ip)
    }

    /// The address offered to `mac`, if the offer still holds.
    pub fn offered(&self, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        self.offers
            .get(&mac)
            .filter(|(_, exp)| *exp > now)
            .map(|(ip, _)| *ip)
    }

    /// Binds `ip` to `mac` until `now + secs` and persists it; other leases of `mac` are
    /// dropped (one address per client).
    ///
    /// # Errors
    /// [`LeaseError::Io`] when the file cannot be written (the lease is kept in memory).
    pub fn commit(
        &mut self,
        mac: Mac,
        ip: Ipv4Addr,
        now: u64,
        secs: u32,
    ) -> Result<(), LeaseError> {
        self.offers.remove(&mac);
        self.leases.retain(|_, l| l.mac != Some(mac) || l.ip == ip);
        self.leases.insert(
            ip,
            Lease {
                ip,
                mac: Some(mac),
                expires: now + u64::from(secs),
            },
        );
        self.save()
    }

    /// Ends `mac`'s lease of `ip` (DHCPRELEASE); the association is kept, expired, so the
    /// client gets the same address next time if it is still free.
    ///
    /// # Errors
    /// [`LeaseError::Io`] when the file cannot be written.
    pub fn release(&mut self, mac: Mac, ip: Ipv4Addr, now: u64) -> Result<(), LeaseError> {
        self.offers.remove(&mac);
        match self.leases.get_mut(&ip) {
            Some(l) if l.mac == Some(mac) => {
                l.expires = l.expires.min(now);
                self.save()
            }
            _ => Ok(()),
        }
    }

    /// Marks `ip` as in use by an unknown host (DHCPDECLINE) for `secs`. Only the client the
    /// address was offered or leased to can decline it (no evicting someone else's lease).
    ///
    /// # Errors
    /// [`LeaseError::Io`] when the file cannot be written.
    pub fn decline(
        &mut self,
        mac: Mac,
        ip: Ipv4Addr,
        now: u64,
        secs: u32,
    ) -> Result<(), LeaseError> {
        let offered = self.offered(mac, now) == Some(ip);
        let leased = self.leases.get(&ip).is_some_and(|l| l.mac == Some(mac));
        if !(offered || leased) || !self.pool.contains(ip) {
            return Ok(());
        }
        self.offers.remove(&mac);
        self.leases.insert(
            ip,
            Lease {
                ip,
                mac: None,
                expires: now + u64::from(secs),
            },
        );
        self.save()
    }

    fn save(&self) -> Result<(), LeaseError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = LeaseFile {
            leases: self.leases.values().copied().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| LeaseError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| LeaseError::Io { path: p, source }
        };
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, last)
    }

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }

    fn pool() -> Pool {
        Pool {
            start: ip(100),
            end: ip(102),
            reservations: HashMap::from([(mac(9), ip(10))]),
            excluded: Vec::new(),
        }
    }

    #[test]
    fn reservation_pool_and_exhaustion() {
        let mut s = LeaseStore::in_memory(pool());
        assert_eq!(s.offer(mac(9), None, 0), Some(ip(10)));
        assert_eq!(s.offer(mac(1), None, 0), Some(ip(100)));
        // The same client asking again gets the same offer.
        assert_eq!(s.offer(mac(1), None, 1), Some(ip(100)));
        assert_eq!(s.offer(mac(2), Some(ip(102)), 1), Some(ip(102)));
        // A requested address held for someone else is not given.
        assert_eq!(s.offer(mac(3), Some(ip(100)), 1), Some(ip(101)));
        assert_eq!(s.offer(mac(4), None, 1), None, "pool exhausted by offers");
        // Offers lapse.
        assert_eq!(
            s.offer(mac(4), None, 1 + OFFER_HOLD_SECS + 1),
            Some(ip(100))
        );
        // A reservation is not offered to others, even when requested.
        assert!(!s.may_have(mac(1), ip(10), 0));
        assert!(!s.may_have(mac(9), ip(100), 0));
    }

    #[test]
    fn leases_survive_restart_and_are_not_handed_out_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        {
            let mut s = LeaseStore::open(&path, pool()).unwrap();
            let a = s.offer(mac(1), None, 100).unwrap();
            s.commit(mac(1), a, 100, 3600).unwrap();
            assert_eq!(a, ip(100));
        }
        let mut s = LeaseStore::open(&path, pool()).unwrap();
        assert_eq!(s.active_lease(mac(1), 200), Some(ip(100)));
        // Another client does not get the leased address, even when asking for it.
        assert_eq!(s.offer(mac(2), Some(ip(100)), 200), Some(ip(101)));
        assert!(!s.may_have(mac(2), ip(100), 200));
        // The holder renews it.
        assert!(s.may_have(mac(1), ip(100), 200));
        // After release it is reusable, but never-used addresses go first.
        s.release(mac(1), ip(100), 300).unwrap();
        let mut s = LeaseStore::open(&path, pool()).unwrap();
        assert_eq!(s.active_lease(mac(1), 301), None);
        assert_eq!(s.offer(mac(3), None, 301), Some(ip(101)));
        // The old holder comes back to its previous address.
        assert_eq!(s.offer(mac(1), None, 302), Some(ip(100)));
    }

    #[test]
    fn excluded_addresses_are_never_offered() {
        let mut p = pool();
        p.excluded = vec![ip(100), ip(101)];
        let mut s = LeaseStore::in_memory(p);
        assert_eq!(s.offer(mac(1), Some(ip(100)), 0), Some(ip(102)));
        assert_eq!(s.offer(mac(2), None, 0), None);
        assert!(!s.may_have(mac(3), ip(101), 0));
    }

    #[test]
    fn declined_address_is_skipped_and_corrupt_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let mut s = LeaseStore::open(&path, pool()).unwrap();
        assert_eq!(s.offer(mac(1), None, 0), Some(ip(100)));
        s.decline(mac(1), ip(100), 0, 600).unwrap();
        assert_eq!(s.offer(mac(1), None, 1), Some(ip(101)));
        // Nobody can decline an address that is not theirs.
        s.commit(mac(1), ip(101), 1, 3600).unwrap();
        s.decline(mac(2), ip(101), 2, 600).unwrap();
        assert_eq!(s.active_lease(mac(1), 3), Some(ip(101)));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            LeaseStore::open(&path, pool()),
            Err(LeaseError::Corrupt { .. })
        ));
    }
}
