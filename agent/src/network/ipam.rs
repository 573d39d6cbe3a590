//! Addresses from the node's pod CIDR, persisted in a JSON file under a lock: an address is
//! never handed to two pods, allocations survive agent restarts, and freed addresses are
//! reused only after the rest of the range (allocation goes round from the last one).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{NetworkError, Result};

/// The node's IPAM.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    cidr: Ipv4Net,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    cidr: String,
    /// The last address handed out.
    last: Option<Ipv4Addr>,
    /// Address → pod UID.
    allocated: BTreeMap<Ipv4Addr, String>,
}

impl Ipam {
    /// IPAM for `cidr` with its records in `dir`.
    ///
    /// # Errors
    /// [`NetworkError::Cidr`] for a CIDR too small for a gateway and a pod.
    pub fn new(dir: &Path, cidr: Ipv4Net) -> Result<Self> {
        if cidr.prefix_len() > 30 {
            return Err(NetworkError::Cidr(cidr.to_string(), "too small".into()));
        }
        fs::create_dir_all(dir).map_err(|source| NetworkError::Io {
            action: "create",
            path: dir.to_owned(),
            source,
        })?;
        Ok(Ipam {
            dir: dir.to_owned(),
            cidr: cidr.trunc(),
        })
    }

    /// The CIDR.
    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The gateway: the first host address, held by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("allocations.json")
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| NetworkError::Io {
                action,
                path,
                source,
            }
        };
        let lock_path = self.dir.join("lock");
        let lock = File::create(&lock_path).map_err(io("create", &lock_path))?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io("lock", &lock_path)(e.into()))?;
        let path = self.path();
        let mut state: State = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io("parse", &path)(std::io::Error::other(e)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io("read", &path)(e)),
        };
        if state.cidr != self.cidr.to_string() {
            // A new CIDR: addresses of the old one are not ours to hand out any more, but
            // pods holding them keep them until they go.
            state.allocated.retain(|ip, _| self.cidr.contains(ip));
            state.cidr = self.cidr.to_string();
            state.last = None;
        }
        let out = f(&mut state)?;
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(&state)
            .map_err(|e| io("encode", &path)(std::io::Error::other(e)))?;
        fs::write(&tmp, text).map_err(io("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        Ok(out)
    }

    /// The address of pod `uid`, allocating one if it has none.
    ///
    /// # Errors
    /// [`NetworkError::Exhausted`] when the range is full; I/O errors.
    pub fn allocate(&self, uid: &str) -> Result<Ipv4Addr> {
        let first = u32::from(self.cidr.network()) + 2;
        let last = u32::from(self.cidr.broadcast()) - 1;
        self.with_state(|s| {
            if let Some((ip, _)) = s.allocated.iter().find(|(_, u)| *u == uid) {
                return Ok(*ip);
            }
            let size = last - first + 1;
            let start = s
                .last
                .map(u32::from)
                .filter(|l| (first..=last).contains(l))
                .map_or(first, |l| if l == last { first } else { l + 1 });
            for i in 0..size {
                let candidate = Ipv4Addr::from(first + (start - first + i) % size);
                if let std::collections::btree_map::Entry::Vacant(e) = s.allocated.entry(candidate)
                {
                    e.insert(uid.to_owned());
                    s.last = Some(candidate);
                    return Ok(candidate);
                }
            }
            Err(NetworkError::Exhausted(self.cidr.to_string()))
        })
    }

    /// Frees the address of pod `uid`, if it has one.
    ///
    /// # Errors
    /// I/O errors.
    pub fn release(&self, uid: &str) -> Result<()> {
        self.with_state(|s| {
            s.allocated.retain(|_, u| u != uid);
            Ok(())
        })
    }

    /// The address pod `uid` holds, if any.
    ///
    /// # Errors
    /// I/O errors.
    pub fn lookup(&self, uid: &str) -> Result<Option<Ipv4Addr>> {
        self.with_state(|s| {
            Ok(s.allocated
                .iter()
                .find(|(_, u)| *u == uid)
                .map(|(ip, _)| *ip))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cidr: Ipv4Net = "10.244.1.0/29".parse().expect("cidr");
        let ipam = Ipam::new(dir.path(), cidr).expect("ipam");
        assert_eq!(ipam.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        let a = ipam.allocate("a").expect("a");
        assert_eq!(a, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(ipam.allocate("a").expect("again"), a);
        let b = ipam.allocate("b").expect("b");
        assert_ne!(a, b);
        ipam.release("a").expect("release");
        // Reopened: b keeps its address; the freed one is not reused before the others.
        let ipam = Ipam::new(dir.path(), cidr).expect("reopen");
        assert_eq!(ipam.lookup("b").expect("lookup"), Some(b));
        let c = ipam.allocate("c").expect("c");
        assert_ne!(c, a);
        assert_ne!(c, b);
        for uid in ["d", "e", "f"] {
            let _ = ipam.allocate(uid);
        }
        assert!(matches!(
            ipam.allocate("g"),
            Err(NetworkError::Exhausted(_))
        ));
    }
}
