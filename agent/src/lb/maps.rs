//! The few hash-map operations the service table needs, behind a trait so that the table's
//! logic is tested against an in-memory fake and runs against kernel maps in production.

use std::time::Duration;

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData, MapError},
};

/// A key-value map as the service table uses it.
pub trait KvMap<K, V> {
    /// The value under `key`, if any.
    fn get(&self, key: &K) -> Result<Option<V>, MapError>;
    /// Inserts or replaces the value under `key`.
    fn insert(&mut self, key: K, value: V) -> Result<(), MapError>;
    /// Removes `key`; removing an absent key is not an error.
    fn remove(&mut self, key: &K) -> Result<(), MapError>;
    /// Every entry, in no particular order.
    fn entries(&self) -> Result<Vec<(K, V)>, MapError>;
}

impl<K: Pod, V: Pod> KvMap<K, V> for BpfHashMap<MapData, K, V> {
    fn get(&self, key: &K) -> Result<Option<V>, MapError> {
        match BpfHashMap::get(self, key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn insert(&mut self, key: K, value: V) -> Result<(), MapError> {
        retrying_enomem(|| BpfHashMap::insert(self, key, value, 0))
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        match BpfHashMap::remove(self, key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) if is_missing_key(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        self.iter().collect()
    }
}

/// Whether a failed delete failed only because the key was not there: aya reports the
/// kernel's `ENOENT` from `bpf_map_delete_elem` as a syscall error, not as `KeyNotFound`.
pub(crate) fn is_missing_key(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.kind() == std::io::ErrorKind::NotFound)
}

/// Attempts of [`retrying_enomem`] after the first.
const ENOMEM_RETRIES: u32 = 10;

/// Runs `op`, again while the kernel answers `ENOMEM`, with a growing pause (0.2 ms doubling
/// up to 20 ms; about 100 ms in all). Maps without preallocation (configurations, per-CPU
/// counters) take elements from caches the kernel refills in the background — per-CPU memory
/// in a worker — so during a burst of thousands of inserts one can fail for a moment and
/// succeed a millisecond later. Seen with 10,000 services written while the maps of an
/// earlier load balancer were being freed.
pub(crate) fn retrying_enomem<T>(
    mut op: impl FnMut() -> Result<T, MapError>,
) -> Result<T, MapError> {
    let mut pause = Duration::from_micros(200);
    for _ in 0..ENOMEM_RETRIES {
        match op() {
            Err(e) if is_enomem(&e) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            done => return done,
        }
    }
    op()
}

fn is_enomem(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOMEM))
}

/// In memory: for tests, and for state no program reads.
impl<K: Clone + Eq + std::hash::Hash, V: Clone> KvMap<K, V> for std::collections::HashMap<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>, MapError> {
        Ok(std::collections::HashMap::get(self, key).cloned())
    }

    fn insert(&mut self, key: K, value: V) -> Result<(), MapError> {
        std::collections::HashMap::insert(self, key, value);
        Ok(())
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        std::collections::HashMap::remove(self, key);
        Ok(())
    }

    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        Ok(self.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enomem() -> MapError {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })
    }

    #[test]
    fn enomem_is_retried_and_other_errors_are_not() {
        let mut calls = 0;
        let r = retrying_enomem(|| {
            calls += 1;
            if calls < 3 { Err(enomem()) } else { Ok(calls) }
        });
        assert_eq!(r.ok(), Some(3), "succeeds once the kernel has memory again");

        let mut calls = 0;
        let r: Result<(), _> = retrying_enomem(|| {
            calls += 1;
            Err(MapError::KeyNotFound)
        });
        assert!(matches!(r, Err(MapError::KeyNotFound)));
        assert_eq!(calls, 1, "only ENOMEM is retried");

        let mut calls = 0;
        let r: Result<(), _> = retrying_enomem(|| {
            calls += 1;
            Err(enomem())
        });
        assert!(r.is_err_and(|e| is_enomem(&e)), "gives up in the end");
        assert_eq!(calls, ENOMEM_RETRIES + 1);
    }
}
