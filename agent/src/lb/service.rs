//! Service frontends: the virtual address, port and protocol that clients connect to.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use keelson_ebpf_common::{Backend, IPPROTO_TCP, IPPROTO_UDP, ServiceKey};

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A service frontend such as `10.96.0.10:80/tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// The virtual (cluster) IP.
    pub addr: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl Frontend {
    /// The map key the kernel program looks up.
    pub(crate) fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: u32::from(self.addr).to_be(),
            port: self.port.to_be(),
            proto: self.protocol.number(),
            pad: 0,
        }
    }

    /// The frontend a map key stands for, or `None` for a protocol we never write.
    pub(crate) fn from_key(key: &ServiceKey) -> Option<Self> {
        Some(Frontend {
            addr: Ipv4Addr::from(u32::from_be(key.addr)),
            port: u16::from_be(key.port),
            protocol: Protocol::from_number(key.proto)?,
        })
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

/// Why a frontend string could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not `IPv4:PORT`.
    #[error("{0:?} is not IPV4:PORT[/tcp|/udp]")]
    Address(String),
    /// Unknown protocol suffix.
    #[error("unknown protocol {0:?}: expected tcp or udp")]
    Protocol(String),
}

impl FromStr for Frontend {
    type Err = ParseError;

    /// Parses `IPV4:PORT` or `IPV4:PORT/PROTO`; the protocol defaults to TCP.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, protocol) = match s.split_once('/') {
            None => (s, Protocol::Tcp),
            Some((addr, "tcp" | "TCP")) => (addr, Protocol::Tcp),
            Some((addr, "udp" | "UDP")) => (addr, Protocol::Udp),
            Some((_, other)) => return Err(ParseError::Protocol(other.to_owned())),
        };
        let addr: SocketAddrV4 = addr
            .parse()
            .map_err(|_| ParseError::Address(s.to_owned()))?;
        Ok(Frontend {
            addr: *addr.ip(),
            port: addr.port(),
            protocol,
        })
    }
}

/// The map value for a backend endpoint.
pub(crate) fn backend_value(addr: SocketAddrV4) -> Backend {
    Backend {
        addr: u32::from(*addr.ip()).to_be(),
        port: addr.port().to_be(),
        pad: 0,
    }
}

/// The endpoint a backend map value stands for.
pub(crate) fn backend_addr(b: &Backend) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(b.addr)), u16::from_be(b.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frontends() {
        let f: Frontend = "10.96.0.10:80".parse().unwrap();
        assert_eq!(f.to_string(), "10.96.0.10:80/tcp");
        let f: Frontend = "10.96.0.10:53/udp".parse().unwrap();
        assert_eq!(f.protocol, Protocol::Udp);
        assert_eq!(
            "10.96.0.10:80/sctp".parse::<Frontend>(),
            Err(ParseError::Protocol("sctp".into()))
        );
        assert!(matches!(
            "10.96.0.10".parse::<Frontend>(),
            Err(ParseError::Address(_))
        ));
        assert!(matches!(
            "[::1]:80".parse::<Frontend>(),
            Err(ParseError::Address(_))
        ));
    }

    #[test]
    fn keys_are_network_byte_order_and_round_trip() {
        let f: Frontend = "10.96.0.10:80/tcp".parse().unwrap();
        let key = f.key();
        // The kernel compares raw `user_ip4`/`user_port`, which are big-endian in memory.
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.proto, 6);
        assert_eq!(Frontend::from_key(&key), Some(f));

        let b: SocketAddrV4 = "10.244.1.7:8080".parse().unwrap();
        assert_eq!(backend_addr(&backend_value(b)), b);
    }
}
