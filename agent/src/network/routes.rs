//! Routes to the other nodes' pod CIDRs. Every route the agent installs carries its own
//! routing protocol number ([`ROUTE_PROTOCOL`]), so a reconcile (also after a restart) can
//! tell its routes from everybody else's and remove the stale ones without touching others.

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::Result;
use super::link::nl;

/// The `rtm_protocol` of Keelson's routes (`ip route` shows it as `proto 75`).
pub const ROUTE_PROTOCOL: u8 = 75;

/// How the agent reaches other nodes' pods (`--pod-network-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Per peer: host-gateway when the peer is on a directly connected subnet, else VXLAN.
    #[default]
    Auto,
    /// Always a route via the peer's address (peers must share a subnet with this node).
    HostGw,
    /// Always the VXLAN overlay.
    Vxlan,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "host-gw" => Ok(Mode::HostGw),
            "vxlan" => Ok(Mode::Vxlan),
            _ => Err(format!("{s:?}: expected auto, host-gw or vxlan")),
        }
    }
}

/// How one peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `podCIDR via <peer InternalIP>`.
    HostGw,
    /// `podCIDR via <peer VTEP> dev <vxlan> onlink`, with neighbour and FDB entries.
    Vxlan,
}

impl Mode {
    /// The backend for a peer, given whether its address is on a directly connected subnet.
    pub fn backend(self, directly_connected: bool) -> Backend {
        match self {
            Mode::HostGw => Backend::HostGw,
            Mode::Vxlan => Backend::Vxlan,
            Mode::Auto if directly_connected => Backend::HostGw,
            Mode::Auto => Backend::Vxlan,
        }
    }
}

/// A route to one peer's pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer's pod CIDR.
    pub dst: Ipv4Net,
    /// The next hop.
    pub gateway: Ipv4Addr,
    /// The output interface.
    pub oif: u32,
    /// Whether the next hop is taken as on-link (VXLAN: the VTEP address has no subnet).
    pub onlink: bool,
}

/// The output interface for `ip` if it is on a directly connected subnet (the kernel's route
/// lookup has no gateway), else `None`.
///
/// # Errors
/// Netlink errors other than "no route".
pub async fn directly_connected(handle: &Handle, ip: Ipv4Addr) -> Result<Option<u32>> {
    let query = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .build();
    let mut answers = handle.route().get(query).execute();
    let found = match answers.try_next().await {
        Ok(found) => found,
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -libc::ENETUNREACH || e.raw_code() == -libc::EHOSTUNREACH =>
        {
            return Ok(None);
        }
        Err(e) => return Err(nl(format!("route lookup for {ip}"))(e)),
    };
    let Some(route) = found else { return Ok(None) };
    let has_gateway = route
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Gateway(_)));
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    Ok(if has_gateway { None } else { oif })
}

fn message(route: &PeerRoute) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix_len())
        .gateway(route.gateway)
        .output_interface(route.oif)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    if route.onlink {
        b = b.onlink();
    }
    b.build()
}

/// Installs `route`, replacing any route to the same destination.
///
/// # Errors
/// Netlink errors.
pub async fn replace(handle: &Handle, route: &PeerRoute) -> Result<()> {
    handle
        .route()
        .add(message(route))
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route {} via {}", route.dst, route.gateway)))
}

fn destination(msg: &RouteMessage) -> Option<Ipv4Net> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
            Ipv4Net::new(*ip, msg.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}

/// The IPv4 routes of the main table that Keelson installed: destination and message.
///
/// # Errors
/// Netlink errors.
pub async fn installed(handle: &Handle) -> Result<Vec<(Ipv4Net, RouteMessage)>> {
    let dump = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(dump)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list routes"))?;
    Ok(routes
        .into_iter()
        .filter(|r| {
            r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                && r.header.table == RouteHeader::RT_TABLE_MAIN
        })
        .filter_map(|r| destination(&r).map(|d| (d, r)))
        .collect())
}

/// Removes every Keelson route whose destination is not in `keep`.
///
/// # Errors
/// Netlink errors (a route already gone is not one).
pub async fn prune(handle: &Handle, keep: &[Ipv4Net]) -> Result<()> {
    for (dst, msg) in installed(handle).await? {
        if keep.contains(&dst) {
            continue;
        }
        match handle.route().del(msg).execute().await {
            Ok(()) => tracing::info!(%dst, "removed the route to a departed peer"),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
            Err(e) => return Err(nl(format!("delete route {dst}"))(e)),
        }
    }
    Ok(())
}

/// The interface holding the address `ip`, if any.
///
/// # Errors
/// Netlink errors.
pub async fn link_of_address(handle: &Handle, ip: Ipv4Addr) -> Result<Option<u32>> {
    let addrs: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list addresses"))?;
    Ok(addrs.into_iter().find_map(|a| {
        a.attributes
            .iter()
            .any(|attr| {
                matches!(attr,
                    netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(v))
                    | netlink_packet_route::address::AddressAttribute::Local(IpAddr::V4(v))
                    if *v == ip)
            })
            .then_some(a.header.index)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_choose_backends() {
        assert_eq!("auto".parse(), Ok(Mode::Auto));
        assert_eq!("host-gw".parse(), Ok(Mode::HostGw));
        assert_eq!("vxlan".parse(), Ok(Mode::Vxlan));
        assert!("udp".parse::<Mode>().is_err());
        assert_eq!(Mode::Auto.backend(true), Backend::HostGw);
        assert_eq!(Mode::Auto.backend(false), Backend::Vxlan);
        assert_eq!(Mode::HostGw.backend(false), Backend::HostGw);
        assert_eq!(Mode::Vxlan.backend(true), Backend::Vxlan);
    }

    #[test]
    fn route_messages_carry_keelsons_protocol() {
        let msg = message(&PeerRoute {
            dst: "10.244.3.0/24".parse().expect("cidr"),
            gateway: Ipv4Addr::new(10, 244, 3, 0),
            oif: 7,
            onlink: true,
        });
        assert_eq!(msg.header.protocol, RouteProtocol::Other(ROUTE_PROTOCOL));
        assert_eq!(
            destination(&msg),
            Some("10.244.3.0/24".parse().expect("cidr"))
        );
        assert!(msg.attributes.contains(&RouteAttribute::Oif(7)));
    }
}
