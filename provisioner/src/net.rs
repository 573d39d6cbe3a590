//! Socket setup shared by the servers: UDP sockets bound to an address and, optionally, to one
//! interface (`SO_BINDTODEVICE`), with broadcast enabled for DHCP.
//!
//! The functions return `std` sockets so that callers may create them in one network
//! namespace (a thread that entered it) and serve them from a tokio runtime elsewhere.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Errors creating sockets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket call failed.
    #[error("{what} for {addr}{}: {source}", iface.as_ref().map(|i| format!(" on {i}")).unwrap_or_default())]
    Socket {
        /// The step that failed (`socket`, `SO_BINDTODEVICE`, `bind`, …).
        what: &'static str,
        /// The address being bound.
        addr: SocketAddr,
        /// The interface, if any.
        iface: Option<String>,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn setup(
    ty: Type,
    proto: Protocol,
    addr: SocketAddr,
    iface: Option<&str>,
    broadcast: bool,
) -> Result<Socket> {
    let err = |what: &'static str| {
        let iface = iface.map(str::to_string);
        move |source| Error::Socket {
            what,
            addr,
            iface,
            source,
        }
    };
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto)).map_err(err("socket"))?;
    s.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    if broadcast {
        s.set_broadcast(true).map_err(err("SO_BROADCAST"))?;
    }
    if let Some(i) = iface {
        s.bind_device(Some(i.as_bytes()))
            .map_err(err("SO_BINDTODEVICE"))?;
    }
    s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    s.bind(&addr.into()).map_err(err("bind"))?;
    Ok(s)
}

/// A non-blocking UDP socket bound to `addr` (and to `iface` when given).
///
/// # Errors
/// [`Error::Socket`] naming the failed step (binding to a device and to ports below 1024 needs
/// `CAP_NET_RAW`/`CAP_NET_BIND_SERVICE`).
pub fn udp(addr: SocketAddr, iface: Option<&str>, broadcast: bool) -> Result<std::net::UdpSocket> {
    Ok(setup(Type::DGRAM, Protocol::UDP, addr, iface, broadcast)?.into())
}

/// A non-blocking TCP listener bound to `addr` (and to `iface` when given).
///
/// # Errors
/// [`Error::Socket`] naming the failed step.
pub fn tcp_listener(addr: SocketAddr, iface: Option<&str>) -> Result<std::net::TcpListener> {
    let s = setup(Type::STREAM, Protocol::TCP, addr, iface, false)?;
    s.listen(128).map_err(|source| Error::Socket {
        what: "listen",
        addr,
        iface: iface.map(str::to_string),
        source,
    })?;
    Ok(s.into())
}
