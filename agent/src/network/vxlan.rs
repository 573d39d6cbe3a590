//! The VXLAN overlay, as flannel's vxlan backend builds it: one VXLAN device per node (no
//! learning, no multicast group) whose address is the network address of the node's pod CIDR;
//! per peer, a permanent neighbour entry (peer VTEP address → peer VTEP MAC) and an FDB entry
//! (peer VTEP MAC → peer node address), so that `podCIDR via <VTEP> dev <vxlan> onlink`
//! reaches the peer without any flooding.
//!
//! A node's VTEP MAC is derived from its pod CIDR ([`vtep_mac`]), so peers know it from the
//! Node object alone and nothing has to be published beside the podCIDR.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};

use super::link::{add_address, link_index, nl};
use super::{NetworkError, Result};

/// VXLAN's encapsulation overhead on IPv4 (outer IP + UDP + VXLAN + inner Ethernet).
const OVERHEAD: u32 = 50;

/// The overlay's settings (`--vxlan-*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// The device's name.
    pub name: String,
    /// The VXLAN network identifier, the same on every node.
    pub vni: u32,
    /// The UDP port, the same on every node (Linux's and flannel's default is 8472).
    pub port: u16,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            name: "keelson.vxlan".into(),
            vni: 1,
            port: 8472,
        }
    }
}

/// A node's VTEP address: the network address of its pod CIDR.
pub fn vtep_ip(pod_cidr: Ipv4Net) -> Ipv4Addr {
    pod_cidr.network()
}

/// A node's VTEP MAC: locally administered, unicast, the pod CIDR's network address in the
/// last four bytes (pod CIDRs do not overlap, so neither do the MACs).
pub fn vtep_mac(pod_cidr: Ipv4Net) -> [u8; 6] {
    let [a, b, c, d] = pod_cidr.network().octets();
    [0x0a, 0x6b, a, b, c, d]
}

fn vxlan_info(link: &LinkMessage) -> Vec<InfoVxlan> {
    link.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })
        .flatten()
        .find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

async fn link_message(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(found) => Ok(found),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

fn mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// Creates (or re-creates, when its VNI, port, local address or MAC differ) the VXLAN device
/// over the interface `underlay` that holds `local`, gives it the VTEP address of `pod_cidr`
/// and brings it up. Returns its index.
///
/// # Errors
/// Netlink errors.
pub async fn ensure(
    handle: &Handle,
    cfg: &VxlanConfig,
    local: Ipv4Addr,
    underlay: u32,
    pod_cidr: Ipv4Net,
) -> Result<u32> {
    let mac = vtep_mac(pod_cidr);
    if let Some(existing) = link_message(handle, &cfg.name).await? {
        let info = vxlan_info(&existing);
        let same_mac = existing
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Address(m) if m[..] == mac[..]));
        let fits = info.contains(&InfoVxlan::Id(cfg.vni))
            && info.contains(&InfoVxlan::Port(cfg.port))
            && info.contains(&InfoVxlan::Local(local))
            && same_mac;
        if !fits {
            tracing::info!(device = %cfg.name, "re-creating the VXLAN device with new settings");
            handle
                .link()
                .del(existing.header.index)
                .execute()
                .await
                .map_err(nl(format!("delete {}", cfg.name)))?;
        }
    }
    if link_index(handle, &cfg.name).await?.is_none() {
        let under_mtu = handle
            .link()
            .get()
            .match_index(underlay)
            .execute()
            .try_next()
            .await
            .map_err(nl("get the underlay link"))?
            .as_ref()
            .and_then(mtu)
            .unwrap_or(1500);
        let msg = LinkVxlan::new(&cfg.name, cfg.vni)
            .dev(underlay)
            .local(local)
            .port(cfg.port)
            .learning(false)
            .address(mac.to_vec())
            .mtu(under_mtu.saturating_sub(OVERHEAD))
            .build();
        handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!("create VXLAN device {}", cfg.name)))?;
        tracing::info!(device = %cfg.name, vni = cfg.vni, port = cfg.port, %local, "VXLAN device created");
    }
    let index = link_index(handle, &cfg.name).await?.ok_or_else(|| {
        NetworkError::Cidr(pod_cidr.to_string(), format!("{} vanished", cfg.name))
    })?;
    add_address(handle, index, vtep_ip(pod_cidr), 32, &cfg.name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bring {} up", cfg.name)))?;
    Ok(index)
}

/// Removes the VXLAN device `name` if it exists (its neighbour, FDB entries and routes go
/// with it).
///
/// # Errors
/// Netlink errors.
pub async fn remove(handle: &Handle, name: &str) -> Result<()> {
    if let Some(index) = link_index(handle, name).await? {
        handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl(format!("delete {name}")))?;
    }
    Ok(())
}

/// A peer as the overlay sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vtep {
    /// The peer's pod CIDR (gives its VTEP address and MAC).
    pub pod_cidr: Ipv4Net,
    /// The peer node's address (the outer destination).
    pub node_ip: Ipv4Addr,
}

/// Points the device `index` at `peer`: neighbour VTEP address → MAC, FDB MAC → node.
///
/// # Errors
/// Netlink errors.
pub async fn set_peer(handle: &Handle, index: u32, peer: Vtep) -> Result<()> {
    let mac = vtep_mac(peer.pod_cidr);
    let vtep = vtep_ip(peer.pod_cidr);
    handle
        .neighbours()
        .add(index, IpAddr::V4(vtep))
        .link_layer_address(&mac)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("neighbour {vtep}")))?;
    handle
        .neighbours()
        .add_bridge(index, &mac)
        .destination(IpAddr::V4(peer.node_ip))
        .flags(NeighbourFlags::Own)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("FDB entry for {} via {}", vtep, peer.node_ip)))?;
    Ok(())
}

fn lladdr(msg: &NeighbourMessage) -> Option<Vec<u8>> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) => Some(m.clone()),
        _ => None,
    })
}

fn dst(msg: &NeighbourMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // FDB (AF_BRIDGE) entries carry the remote's address as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

/// Removes the neighbour and FDB entries of the device `index` that belong to no peer in
/// `keep` (peers that left, or moved to another address).
///
/// # Errors
/// Netlink errors.
pub async fn prune(handle: &Handle, index: u32, keep: &[Vtep]) -> Result<()> {
    let mut entries: Vec<NeighbourMessage> = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Bridge] {
        let found: Vec<NeighbourMessage> = handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list neighbours"))?;
        entries.extend(found);
    }
    for msg in entries {
        if msg.header.ifindex != index {
            continue;
        }
        let wanted = match msg.header.family {
            AddressFamily::Inet => dst(&msg).is_some_and(|ip| {
                keep.iter().any(|p| {
                    vtep_ip(p.pod_cidr) == ip
                        && lladdr(&msg).as_deref() == Some(&vtep_mac(p.pod_cidr)[..])
                })
            }),
            AddressFamily::Bridge => lladdr(&msg).is_some_and(|mac| {
                keep.iter()
                    .any(|p| mac[..] == vtep_mac(p.pod_cidr)[..] && dst(&msg) == Some(p.node_ip))
            }),
            _ => true,
        };
        if wanted {
            continue;
        }
        match handle.neighbours().del(msg).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => {}
            Err(e) => return Err(nl("delete a stale VXLAN entry")(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_addresses_come_from_the_pod_cidr() {
        let cidr: Ipv4Net = "10.244.3.0/24".parse().expect("cidr");
        assert_eq!(vtep_ip(cidr), Ipv4Addr::new(10, 244, 3, 0));
        let mac = vtep_mac(cidr);
        assert_eq!(mac, [0x0a, 0x6b, 10, 244, 3, 0]);
        // Locally administered, unicast.
        assert_eq!(mac[0] & 0b11, 0b10);
        assert_ne!(vtep_mac("10.244.4.0/24".parse().expect("cidr")), mac);
    }
}
