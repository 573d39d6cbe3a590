//! The few hash-map operations the service table needs, behind a trait so that the table's
//! logic is tested against an in-memory fake and runs against kernel maps in production.

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
        BpfHashMap::insert(self, key, value, 0)
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
