//! Routes to the other nodes, kept in step with the Node objects: a watch on Nodes feeds a
//! cache, and on every change (and every resync period) one idempotent reconcile installs a
//! route per peer — host-gateway or VXLAN as [`Mode`] decides — and removes the routes, VXLAN
//! neighbour and FDB entries of peers that left or changed address.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Api, ResourceExt as _};
use rtnetlink::Handle;

use super::routes::{self, Backend, Mode, PeerRoute};
use super::vxlan::{self, Vtep, VxlanConfig};
use super::{NetworkError, Result};

/// Another node, as far as routing to its pods goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The Node's name.
    pub name: String,
    /// Its spec.podCIDR.
    pub pod_cidr: Ipv4Net,
    /// Its InternalIP.
    pub node_ip: Ipv4Addr,
}

/// The peer a Node describes, if it has a pod CIDR and an IPv4 InternalIP.
pub fn peer_of(node: &Node) -> Option<Peer> {
    let pod_cidr = node.spec.as_ref()?.pod_cidr.as_deref()?.parse().ok()?;
    let node_ip = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse()
        .ok()?;
    Some(Peer {
        name: node.name_any(),
        pod_cidr,
        node_ip,
    })
}

/// How this node routes to its peers.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// This node's name (its own Node is not a peer).
    pub node_name: String,
    /// This node's address: the VXLAN device's local address.
    pub node_ip: Ipv4Addr,
    /// This node's pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// Host-gateway, VXLAN, or per peer.
    pub mode: Mode,
    /// The overlay's settings.
    pub vxlan: VxlanConfig,
    /// How often routes are reconciled without a change (repairs routes removed by hand).
    pub resync: Duration,
}

/// Installs and prunes the routes to the peers.
pub struct PeerRouter {
    cfg: PeerConfig,
    handle: Handle,
}

impl PeerRouter {
    /// A router working in the calling process's network namespace.
    ///
    /// # Errors
    /// The netlink socket cannot be opened.
    pub fn new(cfg: PeerConfig) -> Result<Self> {
        Ok(PeerRouter {
            handle: super::link::connect()?,
            cfg,
        })
    }

    async fn vxlan_device(&self) -> Result<u32> {
        let underlay = routes::link_of_address(&self.handle, self.cfg.node_ip)
            .await?
            .ok_or_else(|| {
                NetworkError::Cidr(
                    self.cfg.pod_cidr.to_string(),
                    format!(
                        "no interface holds the node address {} for VXLAN",
                        self.cfg.node_ip
                    ),
                )
            })?;
        vxlan::ensure(
            &self.handle,
            &self.cfg.vxlan,
            self.cfg.node_ip,
            underlay,
            self.cfg.pod_cidr,
        )
        .await
    }

    /// Makes the routes match `peers` (this node and peers without a usable address are
    /// skipped). A peer that cannot be routed is logged and left out; the others still are.
    ///
    /// # Errors
    /// Listing or pruning routes fails.
    pub async fn reconcile(&self, peers: &[Peer]) -> Result<()> {
        let mut keep = Vec::new();
        let mut vteps = Vec::new();
        let mut vxlan_index = None;
        for peer in peers {
            if peer.name == self.cfg.node_name
                || peer.pod_cidr == self.cfg.pod_cidr
                || peer.node_ip == self.cfg.node_ip
            {
                continue;
            }
            match self.route_peer(peer, &mut vxlan_index).await {
                Ok(Some(vtep)) => {
                    keep.push(peer.pod_cidr);
                    vteps.push(vtep);
                }
                Ok(None) => keep.push(peer.pod_cidr),
                Err(e) => {
                    tracing::warn!(peer = %peer.name, error = %e, "cannot route to the peer's pods");
                }
            }
        }
        routes::prune(&self.handle, &keep).await?;
        let index = match vxlan_index {
            Some(i) => Some(i),
            None => super::link::link_index(&self.handle, &self.cfg.vxlan.name).await?,
        };
        if let Some(index) = index {
            vxlan::prune(&self.handle, index, &vteps).await?;
        }
        Ok(())
    }

    /// Routes one peer; the VXLAN endpoint it was given, if it goes over the overlay.
    async fn route_peer(&self, peer: &Peer, vxlan_index: &mut Option<u32>) -> Result<Option<Vtep>> {
        let direct = routes::directly_connected(&self.handle, peer.node_ip).await?;
        match (self.cfg.mode.backend(direct.is_some()), direct) {
            (Backend::HostGw, Some(oif)) => {
                let route = PeerRoute {
                    dst: peer.pod_cidr,
                    gateway: peer.node_ip,
                    oif,
                    onlink: false,
                };
                routes::replace(&self.handle, &route).await?;
                Ok(None)
            }
            (Backend::HostGw, None) => Err(NetworkError::Cidr(
                peer.pod_cidr.to_string(),
                format!(
                    "host-gw: the peer's address {} is not on a directly connected subnet \
                     (use --pod-network-mode auto or vxlan)",
                    peer.node_ip
                ),
            )),
            (Backend::Vxlan, _) => {
                let index = match *vxlan_index {
                    Some(i) => i,
                    None => {
                        let i = self.vxlan_device().await?;
                        *vxlan_index = Some(i);
                        i
                    }
                };
                let vtep = Vtep {
                    pod_cidr: peer.pod_cidr,
                    node_ip: peer.node_ip,
                };
                vxlan::set_peer(&self.handle, index, vtep).await?;
                let route = PeerRoute {
                    dst: peer.pod_cidr,
                    gateway: vxlan::vtep_ip(peer.pod_cidr),
                    oif: index,
                    onlink: true,
                };
                routes::replace(&self.handle, &route).await?;
                Ok(Some(vtep))
            }
        }
    }
}

/// Watches the Nodes and keeps the routes to the peers in step until `stop` completes.
///
/// # Errors
/// The netlink socket cannot be opened.
pub async fn run(
    client: kube::Client,
    cfg: PeerConfig,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let resync = cfg.resync;
    let router = PeerRouter::new(cfg)?;
    let (reader, writer) = reflector::store::<Node>();
    let nodes: Api<Node> = Api::all(client);
    let mut events = reflector(writer, watcher(nodes, watcher::Config::default()))
        .default_backoff()
        .boxed();
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready = false;
    tokio::pin!(stop);
    loop {
        let changed = tokio::select! {
            () = &mut stop => break,
            event = events.next() => match event {
                Some(Ok(watcher::Event::InitDone)) => { ready = true; true }
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => false,
                Some(Ok(_)) => true,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching Nodes");
                    false
                }
                None => break,
            },
            _ = tick.tick() => true,
        };
        if !(changed && ready) {
            continue;
        }
        let peers: Vec<Peer> = reader.state().iter().filter_map(|n| peer_of(n)).collect();
        if let Err(e) = router.reconcile(&peers).await {
            tracing::warn!(error = %e, "reconciling routes to the peers");
        }
    }
    Ok(())
}

/// Removes everything [`run`] installed: Keelson's routes and the VXLAN device.
///
/// # Errors
/// Netlink errors.
pub async fn cleanup(vxlan_name: &str) -> Result<()> {
    let handle = super::link::connect()?;
    routes::prune(&handle, &[]).await?;
    vxlan::remove(&handle, vxlan_name).await
}

/// The node's pod CIDR from its Node object, waiting up to `timeout` for the control plane's
/// node IPAM to set spec.podCIDR.
///
/// # Errors
/// The API fails, or no pod CIDR within `timeout`.
pub async fn wait_for_pod_cidr(
    client: &kube::Client,
    name: &str,
    timeout: Duration,
) -> std::result::Result<Option<Ipv4Net>, kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let cidr = nodes
            .get_opt(name)
            .await?
            .and_then(|n| n.spec?.pod_cidr)
            .and_then(|c| c.parse().ok());
        if cidr.is_some() || tokio::time::Instant::now() >= deadline {
            return Ok(cidr);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Turns on IPv4 forwarding in this network namespace (pods' traffic to other nodes and out
/// of the cluster is routed by the node).
///
/// # Errors
/// The sysctl cannot be written.
pub fn enable_forwarding() -> Result<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    std::fs::write(path, "1").map_err(|source| NetworkError::Io {
        action: "write",
        path: path.into(),
        source,
    })
}

/// The IPv4 address of `ip`, if it is one.
pub fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};

    #[test]
    fn peers_come_from_pod_cidr_and_internal_ip() {
        let mut node = Node::default();
        node.metadata.name = Some("n1".into());
        assert_eq!(peer_of(&node), None);
        node.spec = Some(NodeSpec {
            pod_cidr: Some("10.244.1.0/24".into()),
            ..NodeSpec::default()
        });
        node.status = Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "Hostname".into(),
                    address: "n1".into(),
                },
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: "172.29.0.11".into(),
                },
            ]),
            ..NodeStatus::default()
        });
        assert_eq!(
            peer_of(&node),
            Some(Peer {
                name: "n1".into(),
                pod_cidr: "10.244.1.0/24".parse().expect("cidr"),
                node_ip: Ipv4Addr::new(172, 29, 0, 11),
            })
        );
    }
}
