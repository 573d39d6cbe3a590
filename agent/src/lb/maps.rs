//! The few hash-map operations the service table needs, behind a trait so that the table's
//! logic is tested against an in-memory fake and runs against kernel maps in production.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, IterableMap as _, MapData, MapError},
    sys::SyscallError,
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
    /// Inserts or replaces `keys[i]` → `values[i]` for every `i` of the shorter slice; a
    /// kernel map does it in one system call.
    fn insert_many(&mut self, keys: &[K], values: &[V]) -> Result<(), MapError>
    where
        K: Clone,
        V: Clone,
    {
        for (k, v) in keys.iter().zip(values) {
            self.insert(k.clone(), v.clone())?;
        }
        Ok(())
    }
    /// Removes every key; absent keys are not an error. A kernel map does it in one system
    /// call when all of them are present.
    fn remove_many(&mut self, keys: &[K]) -> Result<(), MapError> {
        keys.iter().try_for_each(|k| self.remove(k))
    }
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

    fn insert_many(&mut self, keys: &[K], values: &[V]) -> Result<(), MapError>
    where
        K: Clone,
        V: Clone,
    {
        let n = keys.len().min(values.len());
        batch(
            self.map(),
            BPF_MAP_UPDATE_BATCH,
            &keys[..n],
            Some(&values[..n]),
        )
    }

    fn remove_many(&mut self, keys: &[K]) -> Result<(), MapError> {
        match batch::<K, V>(self.map(), BPF_MAP_DELETE_BATCH, keys, None) {
            Ok(()) => Ok(()),
            // The batch stops at the first absent key (ENOENT) having removed the keys before
            // it; the rest go one by one.
            Err(_) => keys.iter().try_for_each(|k| KvMap::remove(self, k)),
        }
    }
}

/// `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6), which aya 0.14 does not
/// wrap: writing a whole Maglev table one entry per system call made a Maglev service's update
/// take milliseconds.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs one batch command over `keys` (and `values`, as long as `keys`, for an update).
fn batch<K: Pod, V: Pod>(
    map: &MapData,
    cmd: libc::c_long,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<(), MapError> {
    if keys.is_empty() {
        return Ok(());
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let mut done = 0usize;
    while done < keys.len() {
        let rest = &keys[done..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            values: values.map_or(0, |v| v[done..].as_ptr() as u64),
            count: u32::try_from(rest.len()).unwrap_or(u32::MAX),
            map_fd: u32::try_from(fd).unwrap_or(u32::MAX),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; `keys` and `values`
        // point to `count` valid, initialised `Pod` elements that outlive the call, and the
        // kernel only reads them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &raw mut attr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(MapError::SyscallError(SyscallError {
                call: if cmd == BPF_MAP_UPDATE_BATCH {
                    "bpf_map_update_batch"
                } else {
                    "bpf_map_delete_batch"
                },
                io_error: std::io::Error::last_os_error(),
            }));
        }
        // The kernel reports how many it processed; a zero would never end.
        done += (attr.count as usize).max(1);
    }
    Ok(())
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
