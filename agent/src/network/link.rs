//! Links and addresses through rtnetlink: the node's bridge, and per pod a veth pair whose
//! inner end becomes `eth0` in the pod's network namespace with the pod's address and a
//! default route via the bridge.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkInfo, LinkMessage};
use nix::sched::{CloneFlags, setns};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::{NetworkError, Result};

/// A pod's end of the network, as recorded on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodLink {
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The host-side veth's name.
    pub host_veth: String,
}

pub(super) fn nl(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let action = action.into();
    move |source| NetworkError::Netlink { action, source }
}

pub(super) fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetworkError::Io {
        action: "open netlink socket",
        path: "rtnetlink".into(),
        source,
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

pub(super) async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

pub(super) async fn add_address(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    prefix: u8,
    what: &str,
) -> Result<()> {
    match handle
        .address()
        .add(index, IpAddr::V4(ip), prefix)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(nl(format!("add {ip}/{prefix} to {what}"))(e)),
    }
}

/// Creates the bridge `name` if missing, gives it the gateway address of `cidr` and brings it
/// up. Runs in the calling thread's network namespace.
///
/// # Errors
/// Netlink errors.
pub async fn ensure_bridge(name: &str, gateway: Ipv4Addr, cidr: Ipv4Net) -> Result<()> {
    let handle = connect()?;
    if link_index(&handle, name).await?.is_none() {
        handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(nl(format!("create bridge {name}")))?;
    }
    let index = link_index(&handle, name)
        .await?
        .ok_or_else(|| NetworkError::Cidr(cidr.to_string(), format!("bridge {name} vanished")))?;
    add_address(&handle, index, gateway, cidr.prefix_len(), name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bring {name} up")))?;
    Ok(())
}

/// Runs `f` with a netlink handle opened inside the network namespace at `netns`, on a thread
/// of its own (the socket belongs to the namespace it was opened in). Its result comes back
/// through a channel: joining the thread would block the caller's async worker meanwhile,
/// and with many pods starting at once that stalled every task of the agent.
async fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let ns = File::open(netns).map_err(|source| NetworkError::Io {
        action: "open",
        path: netns.to_owned(),
        source,
    })?;
    let path = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> Result<T> {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Io {
                action: "enter",
                path: path.clone(),
                source: e.into(),
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| NetworkError::Io {
                    action: "start runtime for",
                    path: path.clone(),
                    source,
                })?;
            rt.block_on(async move { f(connect()?).await })
        };
        let _ = tx.send(run());
    });
    rx.await.map_err(|_| NetworkError::Io {
        action: "netlink thread panicked in",
        path: netns.to_owned(),
        source: std::io::Error::other("panic"),
    })?
}

/// The pod's end of its veth.
const POD_IFNAME: &str = "eth0";

/// A request for a veth pair `host` (here) / `peer` made right inside the network namespace
/// `netns_fd` (`ip link add HOST type veth peer name PEER netns NS`). Made here and then
/// moved, the peer's move waited for an RCU grace period under the RTNL lock, which
/// serialized the links of pods starting together (about 20 ms each).
fn veth_into(host: &str, peer: &str, netns_fd: RawFd) -> LinkMessage {
    let mut msg = LinkVeth::new(host, peer).build();
    let mut peer_msg = LinkMessage::default();
    peer_msg.attributes = vec![
        LinkAttribute::IfName(peer.to_owned()),
        LinkAttribute::NetNsFd(netns_fd),
    ];
    for attr in &mut msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for info in infos {
                if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = info {
                    *p = peer_msg.clone();
                }
            }
        }
    }
    msg
}

/// Connects the pod whose network namespace is `netns`: a veth pair `host_veth` (on `bridge`)
/// / `eth0` (in the pod) with `ip` in `cidr` and a default route via `gateway`. Idempotent:
/// an existing host-side veth is replaced.
///
/// # Errors
/// Netlink and namespace errors.
pub async fn setup_pod_link(
    bridge: &str,
    netns: &Path,
    host_veth: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    cidr: Ipv4Net,
) -> Result<()> {
    let handle = connect()?;
    if let Some(old) = link_index(&handle, host_veth).await? {
        let _ = handle.link().del(old).execute().await;
    }
    let bridge_index = link_index(&handle, bridge)
        .await?
        .ok_or_else(|| NetworkError::Cidr(cidr.to_string(), format!("no bridge {bridge}")))?;
    let ns = File::open(netns).map_err(|source| NetworkError::Io {
        action: "open",
        path: netns.to_owned(),
        source,
    })?;
    handle
        .link()
        .add(veth_into(host_veth, POD_IFNAME, ns.as_raw_fd()))
        .execute()
        .await
        .map_err(nl(format!("create veth {host_veth}")))?;
    let host_index = link_index(&handle, host_veth)
        .await?
        .ok_or_else(|| NetworkError::Cidr(cidr.to_string(), format!("{host_veth} vanished")))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(host_index)
                .controller(bridge_index)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("attach {host_veth} to {bridge}")))?;
    let prefix = cidr.prefix_len();
    in_netns(netns, move |h| async move {
        if let Some(lo) = link_index(&h, "lo").await? {
            h.link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("bring lo up"))?;
        }
        let index = link_index(&h, POD_IFNAME).await?.ok_or_else(|| {
            NetworkError::Cidr(cidr.to_string(), format!("no {POD_IFNAME} in the pod"))
        })?;
        add_address(&h, index, ip, prefix, "eth0").await?;
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl("bring eth0 up"))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(gateway)
            .output_interface(index)
            .build();
        match h.route().add(route).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(nl("add the default route")(e)),
        }
    })
    .await
}

/// Removes the pod's veth pair (deleting the host side removes both ends); a missing link is
/// not an error.
///
/// # Errors
/// Netlink errors.
pub async fn remove_pod_link(host_veth: &str) -> Result<()> {
    let handle = connect()?;
    if let Some(index) = link_index(&handle, host_veth).await? {
        handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl(format!("delete {host_veth}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_veth_peer_is_named_and_placed_in_the_pod_namespace() {
        let msg = veth_into("kv0123456789", POD_IFNAME, 42);
        assert!(
            msg.attributes
                .contains(&LinkAttribute::IfName("kv0123456789".into()))
        );
        let peers: Vec<&LinkMessage> = msg
            .attributes
            .iter()
            .filter_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => Some(infos),
                _ => None,
            })
            .flatten()
            .filter_map(|i| match i {
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(peers.len(), 1, "one veth peer");
        assert_eq!(
            peers[0].attributes,
            [
                LinkAttribute::IfName("eth0".into()),
                LinkAttribute::NetNsFd(42)
            ]
        );
    }
}
