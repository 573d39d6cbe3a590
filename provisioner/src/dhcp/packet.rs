//! DHCPv4/BOOTP message codec (RFC 2131, RFC 2132 options, RFC 3396 long options, option
//! overload). Decoding never panics: every malformed input is a [`PacketError`].
//!
//! Options are kept as raw bytes by code; typed accessors interpret the few the provisioner
//! needs. Our own codec rather than `dhcproto`: its 0.15 decoder `debug_assert!`s option
//! lengths (e.g. option 94), which panics on crafted packets in debug builds.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::mac::Mac;

/// Errors decoding a DHCP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than the fixed BOOTP header plus the magic cookie.
    #[error("packet of {0} bytes is shorter than the 240-byte DHCP header")]
    TooShort(usize),
    /// The magic cookie is not 99.130.83.99.
    #[error("bad magic cookie {0:02x?}")]
    BadMagic([u8; 4]),
    /// An option's length runs past the end of its area.
    #[error("option {code} at offset {offset} is truncated")]
    TruncatedOption {
        /// The option code.
        code: u8,
        /// Offset of the option in its area.
        offset: usize,
    },
    /// `op` is neither BOOTREQUEST (1) nor BOOTREPLY (2).
    #[error("bad op {0}")]
    BadOp(u8),
}

/// BOOTP `op` values.
pub const BOOTREQUEST: u8 = 1;
/// BOOTP `op` value of replies.
pub const BOOTREPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const HEADER_LEN: usize = 236;
/// Minimum length of a BOOTP message on the wire (RFC 951); replies are padded to it.
const MIN_LEN: usize = 300;

/// Option codes used by the provisioner.
pub mod opt {
    /// Subnet mask.
    pub const SUBNET_MASK: u8 = 1;
    /// Routers.
    pub const ROUTER: u8 = 3;
    /// DNS servers.
    pub const DNS: u8 = 6;
    /// Host name.
    pub const HOSTNAME: u8 = 12;
    /// Domain name.
    pub const DOMAIN_NAME: u8 = 15;
    /// Vendor-specific information (PXE sub-options).
    pub const VENDOR_SPECIFIC: u8 = 43;
    /// Requested IP address.
    pub const REQUESTED_IP: u8 = 50;
    /// Lease time.
    pub const LEASE_TIME: u8 = 51;
    /// Option overload.
    pub const OVERLOAD: u8 = 52;
    /// DHCP message type.
    pub const MESSAGE_TYPE: u8 = 53;
    /// Server identifier.
    pub const SERVER_ID: u8 = 54;
    /// Parameter request list.
    pub const PARAMETER_REQUEST_LIST: u8 = 55;
    /// Renewal (T1) time.
    pub const RENEWAL_TIME: u8 = 58;
    /// Rebinding (T2) time.
    pub const REBINDING_TIME: u8 = 59;
    /// Vendor class identifier (`PXEClient…`, `HTTPClient…`).
    pub const VENDOR_CLASS: u8 = 60;
    /// Client identifier.
    pub const CLIENT_ID: u8 = 61;
    /// TFTP server name.
    pub const TFTP_SERVER_NAME: u8 = 66;
    /// Boot file name.
    pub const BOOTFILE_NAME: u8 = 67;
    /// User class (`iPXE`).
    pub const USER_CLASS: u8 = 77;
    /// iPXE encapsulated options (sub-option 176: `no-pxedhcp`).
    pub const IPXE_ENCAP: u8 = 175;
    /// Client system architecture (RFC 4578).
    pub const CLIENT_ARCH: u8 = 93;
    /// Client machine identifier (UUID/GUID, RFC 4578).
    pub const CLIENT_MACHINE_ID: u8 = 97;
    /// End of options.
    pub const END: u8 = 255;
    /// Padding.
    pub const PAD: u8 = 0;
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// DHCPDISCOVER.
    Discover,
    /// DHCPOFFER.
    Offer,
    /// DHCPREQUEST.
    Request,
    /// DHCPDECLINE.
    Decline,
    /// DHCPACK.
    Ack,
    /// DHCPNAK.
    Nak,
    /// DHCPRELEASE.
    Release,
    /// DHCPINFORM.
    Inform,
}

impl MessageType {
    /// Decodes the option-53 value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }

    /// The option-53 value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
        }
    }
}

/// A DHCP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// BOOTREQUEST or BOOTREPLY.
    pub op: u8,
    /// Hardware type (1 = Ethernet).
    pub htype: u8,
    /// Hardware address length.
    pub hlen: u8,
    /// Relay hops.
    pub hops: u8,
    /// Transaction id.
    pub xid: u32,
    /// Seconds since the client began.
    pub secs: u16,
    /// Flags (bit 15: broadcast).
    pub flags: u16,
    /// Client address (when bound/renewing).
    pub ciaddr: Ipv4Addr,
    /// "Your" address.
    pub yiaddr: Ipv4Addr,
    /// Next server (TFTP).
    pub siaddr: Ipv4Addr,
    /// Relay agent address.
    pub giaddr: Ipv4Addr,
    /// Client hardware address.
    pub chaddr: [u8; 16],
    /// Server host name field (NUL-terminated), 64 bytes on the wire.
    pub sname: Vec<u8>,
    /// Boot file field (NUL-terminated), 128 bytes on the wire.
    pub file: Vec<u8>,
    /// Options by code; repeated codes are concatenated (RFC 3396).
    pub options: BTreeMap<u8, Vec<u8>>,
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    match b.get(at..at + 4) {
        Some(&[a, b, c, d]) => Ipv4Addr::new(a, b, c, d),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

fn nul_trimmed(b: &[u8]) -> Vec<u8> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b.get(..end).unwrap_or_default().to_vec()
}

/// Parses an option area into `out`, concatenating repeated codes.
fn parse_options(area: &[u8], out: &mut BTreeMap<u8, Vec<u8>>) -> Result<(), PacketError> {
    let mut i = 0;
    while let Some(&code) = area.get(i) {
        match code {
            opt::PAD => i += 1,
            opt::END => break,
            _ => {
                let len = usize::from(
                    *area
                        .get(i + 1)
                        .ok_or(PacketError::TruncatedOption { code, offset: i })?,
                );
                let data = area
                    .get(i + 2..i + 2 + len)
                    .ok_or(PacketError::TruncatedOption { code, offset: i })?;
                out.entry(code).or_default().extend_from_slice(data);
                i += 2 + len;
            }
        }
    }
    Ok(())
}

impl Packet {
    /// Decodes a message from a datagram.
    ///
    /// # Errors
    /// [`PacketError`] for anything malformed; never panics.
    pub fn decode(buf: &[u8]) -> Result<Self, PacketError> {
        let header = buf
            .get(..HEADER_LEN)
            .ok_or(PacketError::TooShort(buf.len()))?;
        let magic: [u8; 4] = match buf.get(HEADER_LEN..HEADER_LEN + 4) {
            Some(&[a, b, c, d]) => [a, b, c, d],
            _ => return Err(PacketError::TooShort(buf.len())),
        };
        if magic != MAGIC {
            return Err(PacketError::BadMagic(magic));
        }
        let byte = |i: usize| header.get(i).copied().unwrap_or(0);
        let op = byte(0);
        if op != BOOTREQUEST && op != BOOTREPLY {
            return Err(PacketError::BadOp(op));
        }
        let mut chaddr = [0u8; 16];
        if let Some(src) = header.get(28..44) {
            chaddr.copy_from_slice(src);
        }
        let sname_raw = header.get(44..108).unwrap_or_default();
        let file_raw = header.get(108..236).unwrap_or_default();
        let mut options = BTreeMap::new();
        parse_options(buf.get(HEADER_LEN + 4..).unwrap_or_default(), &mut options)?;
        let overload = options
            .get(&opt::OVERLOAD)
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        if overload & 1 != 0 {
            parse_options(file_raw, &mut options)?;
        }
        if overload & 2 != 0 {
            parse_options(sname_raw, &mut options)?;
        }
        Ok(Packet {
            op,
            htype: byte(1),
            hlen: byte(2),
            hops: byte(3),
            xid: u32::from_be_bytes([byte(4), byte(5), byte(6), byte(7)]),
            secs: u16::from_be_bytes([byte(8), byte(9)]),
            flags: u16::from_be_bytes([byte(10), byte(11)]),
            ciaddr: ip_at(header, 12),
            yiaddr: ip_at(header, 16),
            siaddr: ip_at(header, 20),
            giaddr: ip_at(header, 24),
            chaddr,
            sname: if overload & 2 != 0 {
                Vec::new()
            } else {
                nul_trimmed(sname_raw)
            },
            file: if overload & 1 != 0 {
                Vec::new()
            } else {
                nul_trimmed(file_raw)
            },
            options,
        })
    }

    /// Encodes the message. `sname`/`file` longer than their fields are truncated (put long
    /// boot file names in option 67 too); options longer than 255 bytes are split (RFC 3396).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(576);
        out.extend_from_slice(&[self.op, self.htype, self.hlen, self.hops]);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for ip in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&ip.octets());
        }
        out.extend_from_slice(&self.chaddr);
        for (field, len) in [(&self.sname, 64usize), (&self.file, 128usize)] {
            let mut f = vec![0u8; len];
            let n = field.len().min(len - 1);
            if let (Some(dst), Some(src)) = (f.get_mut(..n), field.get(..n)) {
                dst.copy_from_slice(src);
            }
            out.extend_from_slice(&f);
        }
        out.extend_from_slice(&MAGIC);
        // Message type first, as some clients expect.
        let ordered = self
            .options
            .get_key_value(&opt::MESSAGE_TYPE)
            .into_iter()
            .chain(
                self.options
                    .iter()
                    .filter(|(c, _)| **c != opt::MESSAGE_TYPE),
            );
        for (&code, value) in ordered {
            if value.is_empty() {
                out.extend_from_slice(&[code, 0]);
            }
            for chunk in value.chunks(255) {
                out.push(code);
                out.push(chunk.len() as u8);
                out.extend_from_slice(chunk);
            }
        }
        out.push(opt::END);
        if out.len() < MIN_LEN {
            out.resize(MIN_LEN, 0);
        }
        out
    }

    /// The message type (option 53), if present and known.
    pub fn message_type(&self) -> Option<MessageType> {
        self.options
            .get(&opt::MESSAGE_TYPE)?
            .first()
            .and_then(|&v| MessageType::from_u8(v))
    }

    /// The client's MAC address, when `htype`/`hlen` say Ethernet.
    pub fn mac(&self) -> Option<Mac> {
        if self.htype != 1 || self.hlen != 6 {
            return None;
        }
        let mut m = [0u8; 6];
        m.copy_from_slice(self.chaddr.get(..6)?);
        Some(Mac(m))
    }

    /// An option holding one IPv4 address (e.g. 50, 54), if well-formed.
    pub fn ip_option(&self, code: u8) -> Option<Ipv4Addr> {
        match self.options.get(&code)?.as_slice() {
            &[a, b, c, d] => Some(Ipv4Addr::new(a, b, c, d)),
            _ => None,
        }
    }

    /// The first client architecture of option 93 (RFC 4578), if well-formed.
    pub fn client_arch(&self) -> Option<u16> {
        match self.options.get(&opt::CLIENT_ARCH)?.as_slice() {
            [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }

    /// The SMBIOS UUID in the client machine identifier (option 97), if well-formed.
    pub fn client_uuid(&self) -> Option<uuid::Uuid> {
        crate::smbios::from_client_id(self.options.get(&opt::CLIENT_MACHINE_ID)?)
    }

    /// The vendor class identifier (option 60).
    pub fn vendor_class(&self) -> Option<&[u8]> {
        self.options.get(&opt::VENDOR_CLASS).map(Vec::as_slice)
    }

    /// Whether option 77 says `iPXE`, either as iPXE sends it (the bare string) or in the
    /// RFC 3004 length-prefixed form.
    pub fn user_class_is_ipxe(&self) -> bool {
        let Some(uc) = self.options.get(&opt::USER_CLASS) else {
            return false;
        };
        if uc.as_slice() == b"iPXE" {
            return true;
        }
        let mut rest = uc.as_slice();
        while let Some((&len, tail)) = rest.split_first() {
            let len = usize::from(len);
            match (tail.get(..len), tail.get(len..)) {
                (Some(b"iPXE"), _) => return true,
                (Some(_), Some(next)) => rest = next,
                _ => return false,
            }
        }
        false
    }

    /// Sets an option (replacing any previous value).
    pub fn set(&mut self, code: u8, value: impl Into<Vec<u8>>) {
        self.options.insert(code, value.into());
    }

    /// Whether the broadcast flag is set.
    pub fn broadcast_flag(&self) -> bool {
        self.flags & 0x8000 != 0
    }

    /// A reply skeleton for this request: same xid, flags, giaddr and chaddr; `op` BOOTREPLY.
    pub fn reply(&self, kind: MessageType) -> Packet {
        let mut p = Packet {
            op: BOOTREPLY,
            htype: self.htype,
            hlen: self.hlen,
            hops: 0,
            xid: self.xid,
            secs: 0,
            flags: self.flags,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: self.giaddr,
            chaddr: self.chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: BTreeMap::new(),
        };
        p.set(opt::MESSAGE_TYPE, [kind.as_u8()]);
        p
    }

    /// A new client request (used by tests and tools): Ethernet, random-ish xid supplied.
    pub fn request(kind: MessageType, mac: Mac, xid: u32) -> Packet {
        let mut chaddr = [0u8; 16];
        if let Some(dst) = chaddr.get_mut(..6) {
            dst.copy_from_slice(&mac.0);
        }
        let mut p = Packet {
            op: BOOTREQUEST,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid,
            secs: 0,
            flags: 0x8000,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: BTreeMap::new(),
        };
        p.set(opt::MESSAGE_TYPE, [kind.as_u8()]);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn discover() -> Packet {
        let mut p = Packet::request(
            MessageType::Discover,
            "52:54:00:12:34:56".parse().unwrap(),
            0x1234_5678,
        );
        p.set(
            opt::VENDOR_CLASS,
            b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
        );
        p.set(opt::CLIENT_ARCH, [0, 7]);
        p.set(opt::USER_CLASS, b"iPXE".to_vec());
        p
    }

    #[test]
    fn round_trips() {
        let p = discover();
        let wire = p.encode();
        assert!(wire.len() >= MIN_LEN);
        let q = Packet::decode(&wire).unwrap();
        assert_eq!(p, q);
        assert_eq!(q.message_type(), Some(MessageType::Discover));
        assert_eq!(q.client_arch(), Some(7));
        assert!(q.user_class_is_ipxe());
        assert_eq!(q.mac().unwrap().to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn long_options_split_and_concatenate() {
        let mut p = discover();
        let long: Vec<u8> = (0..600u32).map(|i| (i % 251) as u8).collect();
        p.set(opt::BOOTFILE_NAME, long.clone());
        let q = Packet::decode(&p.encode()).unwrap();
        assert_eq!(q.options.get(&opt::BOOTFILE_NAME), Some(&long));
    }

    #[test]
    fn overloaded_file_field_holds_options() {
        let mut wire = discover().encode();
        // Put option 52 = 1 in the main area and option 12 in the file field.
        let file_at = 108;
        wire[file_at..file_at + 6].copy_from_slice(&[opt::HOSTNAME, 3, b'a', b'b', b'c', opt::END]);
        let end = wire.iter().rposition(|&b| b == opt::END).unwrap();
        wire.splice(end..end, [opt::OVERLOAD, 1, 1]);
        let q = Packet::decode(&wire).unwrap();
        assert_eq!(
            q.options.get(&opt::HOSTNAME).map(Vec::as_slice),
            Some(&b"abc"[..])
        );
        assert!(q.file.is_empty());
    }

    #[test]
    fn rfc3004_user_class() {
        let mut p = discover();
        p.set(opt::USER_CLASS, b"\x03foo\x04iPXE".to_vec());
        assert!(p.user_class_is_ipxe());
        p.set(opt::USER_CLASS, b"\x09foo".to_vec());
        assert!(!p.user_class_is_ipxe());
        p.set(opt::USER_CLASS, b"gPXE".to_vec());
        assert!(!p.user_class_is_ipxe());
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert_eq!(Packet::decode(&[]), Err(PacketError::TooShort(0)));
        assert_eq!(Packet::decode(&[1; 239]), Err(PacketError::TooShort(239)));
        let good = discover().encode();
        let mut bad_magic = good.clone();
        bad_magic[236] = 0;
        assert!(matches!(
            Packet::decode(&bad_magic),
            Err(PacketError::BadMagic(_))
        ));
        let mut bad_op = good.clone();
        bad_op[0] = 7;
        assert_eq!(Packet::decode(&bad_op), Err(PacketError::BadOp(7)));
        // An option whose length runs past the end.
        let mut truncated = good[..240].to_vec();
        truncated.extend_from_slice(&[opt::HOSTNAME, 10, b'a']);
        assert!(matches!(
            Packet::decode(&truncated),
            Err(PacketError::TruncatedOption { code: 12, .. })
        ));
        // Length byte missing.
        let mut no_len = good[..240].to_vec();
        no_len.push(opt::HOSTNAME);
        assert!(matches!(
            Packet::decode(&no_len),
            Err(PacketError::TruncatedOption { .. })
        ));
        // Wrong-sized typed options decode but the accessors refuse them.
        let mut odd = discover();
        odd.set(opt::CLIENT_ARCH, [1]);
        odd.set(opt::REQUESTED_IP, [1, 2, 3]);
        odd.set(opt::MESSAGE_TYPE, [99]);
        odd.set(94, [1]);
        let q = Packet::decode(&odd.encode()).unwrap();
        assert_eq!(q.client_arch(), None);
        assert_eq!(q.ip_option(opt::REQUESTED_IP), None);
        assert_eq!(q.message_type(), None);
        // Non-Ethernet hardware has no MAC.
        let mut tr = discover();
        tr.hlen = 20;
        assert_eq!(tr.mac(), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = Packet::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_after_valid_header(
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            overload in 0u8..4,
        ) {
            let mut wire = discover().encode();
            wire.truncate(240);
            wire.extend_from_slice(&[opt::OVERLOAD, 1, overload]);
            wire.extend_from_slice(&tail);
            if let Ok(p) = Packet::decode(&wire) {
                let _ = (p.message_type(), p.client_arch(), p.user_class_is_ipxe(), p.mac());
                // Whatever decodes re-encodes and decodes again to the same options.
                let again = Packet::decode(&p.encode());
                prop_assert!(again.is_ok());
            }
        }
    }
}
