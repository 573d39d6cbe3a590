//! TFTP packet codec (RFC 1350, option extension of RFC 2347). Decoding never panics: every
//! malformed datagram is a [`PacketError`].

/// Errors decoding a TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer than the bytes the opcode needs.
    #[error("TFTP packet truncated ({0} bytes)")]
    Truncated(usize),
    /// Unknown opcode.
    #[error("unknown TFTP opcode {0}")]
    BadOpcode(u16),
    /// A string field lacks its NUL terminator or is not UTF-8.
    #[error("bad string field in TFTP {0}")]
    BadString(&'static str),
    /// An option name without a value.
    #[error("option {0:?} has no value")]
    DanglingOption(String),
}

/// TFTP error codes (RFC 1350, RFC 2347).
pub mod code {
    /// Not defined, see message.
    pub const UNDEFINED: u16 = 0;
    /// File not found.
    pub const NOT_FOUND: u16 = 1;
    /// Access violation.
    pub const ACCESS: u16 = 2;
    /// Illegal TFTP operation.
    pub const ILLEGAL: u16 = 4;
    /// Unknown transfer ID.
    pub const UNKNOWN_TID: u16 = 5;
    /// Option negotiation refused (RFC 2347).
    pub const OPTION_REFUSED: u16 = 8;
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The requested file name.
    pub filename: String,
    /// Transfer mode (`octet`, `netascii`, …), lower-cased.
    pub mode: String,
    /// Options in request order, names lower-cased.
    pub options: Vec<(String, String)>,
}

/// A TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Read request (1).
    Rrq(Request),
    /// Write request (2).
    Wrq(Request),
    /// Data (3).
    Data {
        /// Block number.
        block: u16,
        /// Payload.
        data: Vec<u8>,
    },
    /// Acknowledgement (4).
    Ack(u16),
    /// Error (5).
    Error {
        /// Error code.
        code: u16,
        /// Message.
        message: String,
    },
    /// Option acknowledgement (6).
    Oack(Vec<(String, String)>),
}

fn split_strings(mut b: &[u8], what: &'static str) -> Result<Vec<String>, PacketError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let end = b
            .iter()
            .position(|&c| c == 0)
            .ok_or(PacketError::BadString(what))?;
        let s = b.get(..end).ok_or(PacketError::BadString(what))?;
        out.push(String::from_utf8(s.to_vec()).map_err(|_| PacketError::BadString(what))?);
        b = b.get(end + 1..).unwrap_or_default();
    }
    Ok(out)
}

fn pairs(strings: Vec<String>) -> Result<Vec<(String, String)>, PacketError> {
    let mut it = strings.into_iter();
    let mut out = Vec::new();
    while let Some(name) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| PacketError::DanglingOption(name.clone()))?;
        out.push((name.to_ascii_lowercase(), value));
    }
    Ok(out)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, PacketError> {
    match b.get(at..at + 2) {
        Some(&[x, y]) => Ok(u16::from_be_bytes([x, y])),
        _ => Err(PacketError::Truncated(b.len())),
    }
}

impl Packet {
    /// Decodes a datagram.
    ///
    /// # Errors
    /// [`PacketError`] for anything malformed; never panics.
    pub fn decode(b: &[u8]) -> Result<Packet, PacketError> {
        let op = u16_at(b, 0)?;
        let body = b.get(2..).unwrap_or_default();
        match op {
            1 | 2 => {
                let what = if op == 1 { "RRQ" } else { "WRQ" };
                let mut strings = split_strings(body, what)?.into_iter();
                let filename = strings.next().ok_or(PacketError::BadString(what))?;
                let mode = strings
                    .next()
                    .ok_or(PacketError::BadString(what))?
                    .to_ascii_lowercase();
                let options = pairs(strings.collect())?;
                let req = Request {
                    filename,
                    mode,
                    options,
                };
                Ok(if op == 1 {
                    Packet::Rrq(req)
                } else {
                    Packet::Wrq(req)
                })
            }
            3 => Ok(Packet::Data {
                block: u16_at(b, 2)?,
                data: b.get(4..).unwrap_or_default().to_vec(),
            }),
            4 => Ok(Packet::Ack(u16_at(b, 2)?)),
            5 => {
                let code = u16_at(b, 2)?;
                let rest = b.get(4..).unwrap_or_default();
                let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
                let message =
                    String::from_utf8_lossy(rest.get(..end).unwrap_or_default()).into_owned();
                Ok(Packet::Error { code, message })
            }
            6 => Ok(Packet::Oack(pairs(split_strings(body, "OACK")?)?)),
            other => Err(PacketError::BadOpcode(other)),
        }
    }

    /// Encodes the packet.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                out.extend_from_slice(
                    &(if matches!(self, Packet::Rrq(_)) {
                        1u16
                    } else {
                        2
                    })
                    .to_be_bytes(),
                );
                put_str(&mut out, &r.filename);
                put_str(&mut out, &r.mode);
                for (k, v) in &r.options {
                    put_str(&mut out, k);
                    put_str(&mut out, v);
                }
            }
            Packet::Data { block, data } => {
                out.extend_from_slice(&3u16.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack(block) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&5u16.to_be_bytes());
                out.extend_from_slice(&code.to_be_bytes());
                put_str(&mut out, message);
            }
            Packet::Oack(opts) => {
                out.extend_from_slice(&6u16.to_be_bytes());
                for (k, v) in opts {
                    put_str(&mut out, k);
                    put_str(&mut out, v);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_rrq_with_options() {
        let wire = b"\x00\x01undionly.kpxe\x00OCTET\x00blksize\x001468\x00TSize\x000\x00";
        let p = Packet::decode(wire).unwrap();
        let Packet::Rrq(r) = &p else {
            panic!("not an RRQ: {p:?}")
        };
        assert_eq!(r.filename, "undionly.kpxe");
        assert_eq!(r.mode, "octet");
        assert_eq!(
            r.options,
            vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "0".into())
            ]
        );
        assert_eq!(
            Packet::decode(&p.encode()).unwrap(),
            Packet::Rrq(Request {
                mode: "octet".into(),
                ..r.clone()
            })
        );
    }

    #[test]
    fn round_trips_other_packets() {
        for p in [
            Packet::Data {
                block: 65535,
                data: vec![1, 2, 3],
            },
            Packet::Data {
                block: 1,
                data: vec![],
            },
            Packet::Ack(7),
            Packet::Error {
                code: 1,
                message: "File not found".into(),
            },
            Packet::Oack(vec![("blksize".into(), "1024".into())]),
        ] {
            assert_eq!(Packet::decode(&p.encode()).unwrap(), p);
        }
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert_eq!(Packet::decode(b""), Err(PacketError::Truncated(0)));
        assert_eq!(Packet::decode(b"\x00"), Err(PacketError::Truncated(1)));
        assert_eq!(Packet::decode(b"\x00\x09"), Err(PacketError::BadOpcode(9)));
        assert_eq!(
            Packet::decode(b"\x00\x04\x01"),
            Err(PacketError::Truncated(3))
        );
        assert_eq!(
            Packet::decode(b"\x00\x01file"),
            Err(PacketError::BadString("RRQ"))
        );
        assert_eq!(
            Packet::decode(b"\x00\x01file\x00"),
            Err(PacketError::BadString("RRQ"))
        );
        assert_eq!(
            Packet::decode(b"\x00\x01\xff\x00octet\x00"),
            Err(PacketError::BadString("RRQ"))
        );
        assert_eq!(
            Packet::decode(b"\x00\x01f\x00octet\x00blksize\x00"),
            Err(PacketError::DanglingOption("blksize".into()))
        );
        // An error packet without a terminator is tolerated.
        assert_eq!(
            Packet::decode(b"\x00\x05\x00\x01oops").unwrap(),
            Packet::Error {
                code: 1,
                message: "oops".into()
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Packet::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_requests(op in 0u8..8, body in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..200)) {
            let mut wire = vec![0, op];
            wire.extend_from_slice(&body);
            if let Ok(p) = Packet::decode(&wire) {
                // Whatever decodes re-encodes to something that decodes.
                prop_assert!(Packet::decode(&p.encode()).is_ok());
            }
        }
    }
}
