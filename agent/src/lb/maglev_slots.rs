//! Which Maglev table pairs are taken. Each Maglev service (with backends) holds one pair of
//! tables in the Maglev map — slot `s` owns tables `2s` and `2s + 1` — and alternates between
//! them: a change writes the table not in use and publishes it with the new backend set.
//!
//! Slots are handed out first-in first-out, so a slot just given back is the last to be
//! reused: a program still reading the table of a set published moments before is never
//! overwritten by another service at once.

use std::collections::VecDeque;

use keelson_ebpf_common::MAGLEV_TABLES_PER_SERVICE;

// `other_table` flips the lowest bit: a slot has exactly two tables.
const _: () = assert!(MAGLEV_TABLES_PER_SERVICE == 2);

/// The first table of slot `slot`.
pub(crate) fn first_table(slot: u32) -> u32 {
    slot * MAGLEV_TABLES_PER_SERVICE
}

/// The slot a table belongs to.
pub(crate) fn slot_of(table: u32) -> u32 {
    table / MAGLEV_TABLES_PER_SERVICE
}

/// The other table of `table`'s slot: where the next change of its service is written.
pub(crate) fn other_table(table: u32) -> u32 {
    table ^ 1
}

/// Free and taken slots of one Maglev map.
#[derive(Debug)]
pub(crate) struct MaglevSlots {
    free: VecDeque<u32>,
    taken: Vec<bool>,
}

impl MaglevSlots {
    /// `slots` slots, of which `taken` (as found in the pinned maps after a restart) are in
    /// use; out-of-range or repeated entries are ignored.
    pub(crate) fn new(slots: u32, taken: impl IntoIterator<Item = u32>) -> Self {
        let mut flags = vec![false; slots as usize];
        for slot in taken {
            if let Some(f) = flags.get_mut(slot as usize) {
                *f = true;
            }
        }
        let free = (0..slots).filter(|s| !flags[*s as usize]).collect();
        MaglevSlots { free, taken: flags }
    }

    /// Number of slots.
    pub(crate) fn capacity(&self) -> u32 {
        u32::try_from(self.taken.len()).unwrap_or(u32::MAX)
    }

    /// A free slot, now taken; `None` when all are in use.
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let slot = self.free.pop_front()?;
        self.taken[slot as usize] = true;
        Some(slot)
    }

    /// Gives `slot` back; giving back a free or unknown slot does nothing.
    pub(crate) fn release(&mut self, slot: u32) {
        if let Some(t) = self.taken.get_mut(slot as usize)
            && *t
        {
            *t = false;
            self.free.push_back(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_last_and_never_twice() {
        let mut s = MaglevSlots::new(3, [1, 1, 7]);
        assert_eq!(s.capacity(), 3);
        assert_eq!(s.allocate(), Some(0));
        assert_eq!(s.allocate(), Some(2));
        assert_eq!(s.allocate(), None);
        s.release(0);
        s.release(0);
        s.release(9);
        s.release(1);
        // First in, first out: 0 went back before 1.
        assert_eq!(s.allocate(), Some(0));
        assert_eq!(s.allocate(), Some(1));
        assert_eq!(s.allocate(), None);
    }

    #[test]
    fn a_slot_owns_two_tables_and_alternates_between_them() {
        assert_eq!(first_table(5), 10);
        assert_eq!(other_table(10), 11);
        assert_eq!(other_table(11), 10);
        assert_eq!(slot_of(10), 5);
        assert_eq!(slot_of(11), 5);
    }
}
