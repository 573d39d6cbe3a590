//! SMBIOS system UUIDs, the other key a machine can be known by besides its MACs: firmware
//! and iPXE send it in DHCP option 97 (client machine identifier, RFC 4578) and iPXE can put
//! it in a URL (`${uuid}`).
//!
//! The first three fields of the UUID are stored little-endian in SMBIOS 2.6+ tables and
//! firmware disagrees about swapping them before sending (PXE ROMs that follow the SMBIOS
//! byte order vs. those that send RFC 4122 order), so two UUIDs are taken to name the same
//! machine when they are equal in either order.

use uuid::Uuid;

/// The UUID in a DHCP client machine identifier (option 97): type 0, then 16 bytes.
pub fn from_client_id(option: &[u8]) -> Option<Uuid> {
    match option {
        [0, rest @ ..] => Uuid::from_slice(rest).ok().filter(|u| !u.is_nil()),
        _ => None,
    }
}

/// The same UUID with its first three fields byte-swapped (the other firmware byte order).
pub fn swapped(u: &Uuid) -> Uuid {
    Uuid::from_bytes(u.to_bytes_le())
}

/// Whether `a` and `b` name the same machine, in either byte order.
pub fn same(a: &Uuid, b: &Uuid) -> bool {
    a == b || *a == swapped(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "4c4c4544-0043-3010-8052-b4c04f4e4d32";

    #[test]
    fn option_97_needs_type_zero_and_sixteen_bytes() {
        let u: Uuid = U.parse().unwrap();
        let mut opt = vec![0];
        opt.extend(u.as_bytes());
        assert_eq!(from_client_id(&opt), Some(u));
        assert_eq!(from_client_id(&opt[..10]), None, "short");
        opt[0] = 1;
        assert_eq!(from_client_id(&opt), None, "other type");
        assert_eq!(from_client_id(&[0; 17]), None, "nil");
        assert_eq!(from_client_id(&[]), None);
    }

    #[test]
    fn either_byte_order_matches() {
        let u: Uuid = U.parse().unwrap();
        let s = swapped(&u);
        assert_eq!(s.to_string(), "44454c4c-4300-1030-8052-b4c04f4e4d32");
        assert!(same(&u, &s) && same(&s, &u) && same(&u, &u));
        assert!(!same(&u, &Uuid::nil()));
    }
}
