//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4): every node computes the same table from the same
//! backend set, and a change of one backend among N moves about 1/N of the entries.
//!
//! Each backend gets a permutation of the table's [`MAGLEV_SIZE`] (prime) entries from two
//! hashes of its address, `offset` and `skip`; backends then take turns claiming the next
//! free entry of their permutation until the table is full.

use std::net::SocketAddrV4;

use keelson_ebpf_common::{MAGLEV_SIZE, mix64};

/// Seeds of the two permutation hashes; fixed so that every node agrees.
const OFFSET_SEED: u64 = 0x6b65_656c_736f_6e31;
const SKIP_SEED: u64 = 0x6b65_656c_736f_6e32;

fn addr_word(addr: &SocketAddrV4) -> u64 {
    (u64::from(u32::from(*addr.ip())) << 16) | u64::from(addr.port())
}

/// The lookup table of size [`MAGLEV_SIZE`] for `backends`, given as (slot, address): each
/// entry is the slot of the backend it maps to. The result depends only on the set of
/// addresses and which slot holds each, not on the order they are given in. Empty when there
/// are no backends.
pub fn table(backends: &[(u32, SocketAddrV4)]) -> Vec<u32> {
    table_of_size(backends, MAGLEV_SIZE)
}

fn table_of_size(backends: &[(u32, SocketAddrV4)], size: u32) -> Vec<u32> {
    if backends.is_empty() {
        return Vec::new();
    }
    let mut sorted: Vec<(u32, SocketAddrV4)> = backends.to_vec();
    sorted.sort_by_key(|(_, addr)| *addr);
    let m = u64::from(size);
    // (next position in the permutation, offset, skip) per backend.
    let mut perm: Vec<(u64, u64, u64)> = sorted
        .iter()
        .map(|(_, addr)| {
            let w = addr_word(addr);
            let offset = mix64(w ^ OFFSET_SEED) % m;
            let skip = mix64(w ^ SKIP_SEED) % (m - 1) + 1;
            (0, offset, skip)
        })
        .collect();
    let mut entries: Vec<Option<u32>> = vec![None; size as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (i, (next, offset, skip)) in perm.iter_mut().enumerate() {
            // Walk this backend's permutation to its next free entry; as `size` is prime and
            // `skip` is in 1..size, the walk visits every entry, so one is always found.
            let mut c = (*offset + *next * *skip) % m;
            while entries[c as usize].is_some() {
                *next += 1;
                c = (*offset + *next * *skip) % m;
            }
            entries[c as usize] = Some(sorted[i].0);
            *next += 1;
            filled += 1;
            if filled == entries.len() {
                break 'fill;
            }
        }
    }
    entries.into_iter().map(|e| e.unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<(u32, SocketAddrV4)> {
        (0..n)
            .map(|i| {
                let ip = std::net::Ipv4Addr::new(10, 244, (i / 200) as u8, (i % 200 + 1) as u8);
                (i, SocketAddrV4::new(ip, 8080))
            })
            .collect()
    }

    /// The backend address each entry maps to.
    fn addrs(table: &[u32], backends: &[(u32, SocketAddrV4)]) -> Vec<SocketAddrV4> {
        table
            .iter()
            .map(|slot| backends.iter().find(|(s, _)| s == slot).unwrap().1)
            .collect()
    }

    #[test]
    fn every_entry_is_filled_and_shares_are_even() {
        let b = backends(7);
        let t = table(&b);
        assert_eq!(t.len(), MAGLEV_SIZE as usize);
        let mut counts = [0usize; 7];
        for slot in &t {
            counts[*slot as usize] += 1;
        }
        // Maglev's guarantee: shares differ by at most a few entries.
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 2 * 7, "uneven shares {counts:?}");
        assert!(table(&[]).is_empty());
        assert!(table(&b[..1]).iter().all(|s| *s == 0));
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let b = backends(5);
        let mut reversed = b.clone();
        reversed.reverse();
        assert_eq!(table(&b), table(&reversed));
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        for n in [5u32, 10, 20] {
            let all = backends(n);
            let before = addrs(&table(&all), &all);
            let removed = all[2].1;
            // Slots of the survivors may differ on another node: compare addresses.
            let rest: Vec<(u32, SocketAddrV4)> = all
                .iter()
                .filter(|(_, a)| *a != removed)
                .enumerate()
                .map(|(i, (_, a))| (i as u32 + 100, *a))
                .collect();
            let after = addrs(&table(&rest), &rest);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b != a && **b != removed)
                .count();
            let lost = before.iter().filter(|b| **b == removed).count();
            // Entries of the removed backend must move; of the others only a few do.
            let ideal = MAGLEV_SIZE as usize / n as usize;
            assert!(lost <= ideal * 2, "n={n}: removed backend had {lost}");
            assert!(
                moved <= MAGLEV_SIZE as usize / 20,
                "n={n}: {moved} entries of surviving backends moved"
            );
            let changed = lost + moved;
            assert!(
                changed <= ideal * 3 / 2 + MAGLEV_SIZE as usize / 20,
                "n={n}: {changed} of {MAGLEV_SIZE} changed, ideal {ideal}"
            );
        }
    }
}
