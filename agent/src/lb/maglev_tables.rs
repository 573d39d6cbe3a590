//! Where Maglev lookup tables live: numbered, fixed-size tables of [`MAGLEV_SIZE`] backend
//! slots. In the kernel that is a `BPF_F_MMAPABLE` array map of [`MaglevTable`] values, which
//! user space maps into memory and writes directly: a table costs a 4 KiB copy and no system
//! call, where the hash map it replaces took a batched insert of 1021 entries (about 1 ms).
//!
//! A table must not be in use while it is written; the service table guarantees that by
//! writing only a service's other table and publishing it with a new backend set.

use std::{
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::{MapData, MapError};
use keelson_ebpf_common::{BPF_F_MMAPABLE, MAGLEV_SIZE, MaglevTable};

/// Numbered Maglev tables as the service table uses them.
pub trait MaglevTables: Send {
    /// Number of tables, `0..count`.
    fn count(&self) -> u32;
    /// Writes table `index`: entry `i` → `slots[i]` (entries past `slots` become 0).
    ///
    /// # Errors
    /// `index` is out of range or `slots` longer than a table.
    fn write(&mut self, index: u32, slots: &[u32]) -> Result<(), MapError>;
    /// Table `index`.
    ///
    /// # Errors
    /// `index` is out of range.
    fn read(&self, index: u32) -> Result<Vec<u32>, MapError>;
}

fn check(index: u32, count: u32, len: usize) -> Result<(), MapError> {
    if index >= count {
        return Err(MapError::OutOfBounds {
            index,
            max_entries: count,
        });
    }
    if len > MAGLEV_SIZE as usize {
        return Err(MapError::InvalidValueSize {
            size: len * size_of::<u32>(),
            expected: size_of::<MaglevTable>(),
        });
    }
    Ok(())
}

/// Tables in memory, for tests and for tables no program reads; a table never written reads
/// as zeroes.
#[derive(Debug, Clone)]
pub struct InMemoryTables {
    count: u32,
    tables: std::collections::HashMap<u32, Vec<u32>>,
}

impl InMemoryTables {
    /// `count` tables of zeroes.
    pub fn new(count: u32) -> Self {
        InMemoryTables {
            count,
            tables: std::collections::HashMap::new(),
        }
    }
}

impl MaglevTables for InMemoryTables {
    fn count(&self) -> u32 {
        self.count
    }

    fn write(&mut self, index: u32, slots: &[u32]) -> Result<(), MapError> {
        check(index, self.count, slots.len())?;
        let mut table = slots.to_vec();
        table.resize(MAGLEV_SIZE as usize, 0);
        self.tables.insert(index, table);
        Ok(())
    }

    fn read(&self, index: u32) -> Result<Vec<u32>, MapError> {
        check(index, self.count, 0)?;
        Ok(self
            .tables
            .get(&index)
            .cloned()
            .unwrap_or_else(|| vec![0; MAGLEV_SIZE as usize]))
    }
}

/// The kernel's Maglev array map, mapped into this process (shared with the kernel: what is
/// written here is what the programs read).
pub struct MmapTables {
    base: NonNull<u8>,
    len: usize,
    count: u32,
    // The mapping holds its own reference to the map; the descriptor is kept for clarity of
    // ownership only.
    _map: MapData,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&self` (reads)
// and `&mut self` (writes), so moving it to another thread is sound.
unsafe impl Send for MmapTables {}

/// Bytes between two values of an array map: the kernel rounds each up to 8.
const STRIDE: usize = size_of::<MaglevTable>().next_multiple_of(8);

fn syscall_err(call: &'static str) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError {
        call,
        io_error: std::io::Error::last_os_error(),
    })
}

impl MmapTables {
    /// Maps the Maglev array map `map` into memory.
    ///
    /// Requires Linux 5.5 or later (`BPF_F_MMAPABLE`).
    ///
    /// # Errors
    /// The map is not an mmapable array of [`MaglevTable`] values, or `mmap` fails.
    pub fn new(map: MapData) -> Result<Self, MapError> {
        let info = map.info()?;
        if info.value_size() as usize != size_of::<MaglevTable>() {
            return Err(MapError::InvalidValueSize {
                size: info.value_size() as usize,
                expected: size_of::<MaglevTable>(),
            });
        }
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error: std::io::Error::other(
                    "the Maglev map was created without BPF_F_MMAPABLE",
                ),
            }));
        }
        let count = info.max_entries();
        let len = (count as usize * STRIDE).max(1);
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's value area (offset 0, `len` bytes: the
        // kernel accepts any length up to the page-rounded array); nothing else refers to the
        // returned range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(syscall_err("mmap"));
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| syscall_err("mmap"))?;
        Ok(MmapTables {
            base,
            len,
            count,
            _map: map,
        })
    }

    fn table_ptr(&self, index: u32) -> *mut u32 {
        // In bounds: callers check `index < count`, and the mapping spans `count * STRIDE`.
        // Values are 8-byte aligned in a page-aligned mapping, so `u32` access is aligned.
        self.base
            .as_ptr()
            .wrapping_add(index as usize * STRIDE)
            .cast()
    }
}

impl MaglevTables for MmapTables {
    fn count(&self) -> u32 {
        self.count
    }

    fn write(&mut self, index: u32, slots: &[u32]) -> Result<(), MapError> {
        check(index, self.count, slots.len())?;
        let dst = self.table_ptr(index);
        // SAFETY: `dst` points to a whole table inside the mapping (checked above); programs
        // only read it, and not while it is being written (see the module docs). Volatile
        // writes, because the memory is shared with the kernel.
        unsafe {
            for i in 0..MAGLEV_SIZE as usize {
                dst.add(i)
                    .write_volatile(slots.get(i).copied().unwrap_or(0));
            }
        }
        // The table is published by a later map update (a system call); keep these stores
        // before it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn read(&self, index: u32) -> Result<Vec<u32>, MapError> {
        check(index, self.count, 0)?;
        let src = self.table_ptr(index);
        // SAFETY: as in `write`, a whole table inside the mapping.
        Ok((0..MAGLEV_SIZE as usize)
            .map(|i| unsafe { src.add(i).read_volatile() })
            .collect())
    }
}

impl Drop for MmapTables {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no reference into it outlives
        // `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_tables_are_written_whole_and_bounded() {
        let mut t = InMemoryTables::new(2);
        t.write(1, &[3; MAGLEV_SIZE as usize]).unwrap();
        t.write(1, &[7, 8]).unwrap();
        let read = t.read(1).unwrap();
        assert_eq!(&read[..3], &[7, 8, 0], "a shorter write clears the rest");
        assert_eq!(t.read(0).unwrap(), vec![0; MAGLEV_SIZE as usize]);
        assert!(matches!(
            t.write(2, &[1]),
            Err(MapError::OutOfBounds { index: 2, .. })
        ));
        assert!(t.write(0, &[0; MAGLEV_SIZE as usize + 1]).is_err());
    }

    #[test]
    fn tables_are_laid_out_as_the_kernel_lays_out_array_values() {
        assert_eq!(STRIDE % 8, 0);
        assert!(STRIDE >= size_of::<MaglevTable>() && STRIDE - size_of::<MaglevTable>() < 8);
    }
}
