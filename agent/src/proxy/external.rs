//! External frontends of Services (nodePorts on this node's addresses, externalIPs) in the
//! load balancer, beside the cluster IPs:
//! - for the node's and its pods' sockets, entries in the main service table that are not
//!   virtual IPs (other ports on a node address keep working);
//! - for packets arriving from outside (the tc path), entries in the tc path's own table with
//!   the backends its traffic policy allows, and the set of endpoint addresses on this node
//!   (a flow to any other backend is SNATed so that its replies return through this node).
//!
//! Like the cluster IPs, one Service's change writes only that Service's entries.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use keelson_ebpf_common::{Backend, BackendKey, NP_LOCAL_MAP, ServiceEntry, ServiceKey};

use super::desired::{External, NodeAddrs};
use crate::{
    lb::{self, Frontend, ServiceTable, maps::KvMap},
    svcwatch::Key,
};

/// The tc path's maps: its service table and the map of this node's endpoint addresses.
pub struct PacketMaps<S, B, V> {
    /// External frontends and their backends for packets from outside.
    pub table: ServiceTable<S, B, V>,
    /// This node's endpoint addresses (`NP_LOCAL`).
    pub local: V,
}

/// The external frontends the proxy keeps, for the node it runs on.
pub struct ExternalFrontends<S, B, V> {
    node: NodeAddrs,
    packet: Option<PacketPath<S, B, V>>,
    socket: HashMap<Key, Vec<Frontend>>,
}

struct PacketPath<S, B, V> {
    maps: PacketMaps<S, B, V>,
    programmed: HashMap<Key, Vec<Frontend>>,
    local_of: HashMap<Key, Vec<Ipv4Addr>>,
    /// How many Services use each local endpoint address.
    local_uses: HashMap<Ipv4Addr, u32>,
}

impl<S, B, V> ExternalFrontends<S, B, V>
where
    S: KvMap<ServiceKey, ServiceEntry>,
    B: KvMap<BackendKey, Backend>,
    V: KvMap<u32, u32>,
{
    /// External frontends for `node`; without `packet` maps (no NodePort interface) only the
    /// socket entries are kept.
    pub fn new(node: NodeAddrs, packet: Option<PacketMaps<S, B, V>>) -> Self {
        ExternalFrontends {
            node,
            packet: packet.map(|maps| PacketPath {
                maps,
                programmed: HashMap::new(),
                local_of: HashMap::new(),
                local_uses: HashMap::new(),
            }),
            socket: HashMap::new(),
        }
    }

    /// The node this runs for.
    pub fn node(&self) -> &NodeAddrs {
        &self.node
    }

    /// Takes every Node's addresses; returns whether they changed (then every Service's
    /// external frontends need writing again: rare, and only on Node address changes).
    pub(crate) fn set_cluster_ips(&mut self, ips: BTreeSet<Ipv4Addr>) -> bool {
        if self.node.cluster_ips == ips {
            return false;
        }
        self.node.cluster_ips = ips;
        true
    }

    /// Writes one Service's external frontends (`None`: the Service is gone).
    pub(crate) fn reconcile(
        &mut self,
        main: &mut ServiceTable<S, B, V>,
        key: &Key,
        desired: Option<External>,
        options: lb::ServiceOptions,
    ) -> Result<(), lb::Error> {
        let desired = desired.unwrap_or_default();
        let old = self.socket.remove(key).unwrap_or_default();
        apply(main, &old, &desired.socket, options)?;
        if !desired.socket.is_empty() {
            self.socket.insert(
                key.clone(),
                desired.socket.iter().map(|(f, _)| *f).collect(),
            );
        }
        if let Some(packet) = &mut self.packet {
            packet.reconcile(key, &desired, options)?;
        }
        Ok(())
    }

    /// The external frontends of one Service, on either path (for naming them in metrics).
    pub(crate) fn frontends_of(&self, key: &Key) -> BTreeSet<Frontend> {
        let packet = self.packet.iter().flat_map(|p| p.programmed.get(key));
        self.socket
            .get(key)
            .into_iter()
            .chain(packet)
            .flatten()
            .copied()
            .collect()
    }

    /// The socket entries kept here (for pruning the main table after a relist).
    pub(crate) fn socket_frontends(&self) -> HashSet<Frontend> {
        self.socket.values().flatten().copied().collect()
    }

    /// The Services with external frontends.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &Key> {
        self.socket
            .keys()
            .chain(self.packet.iter().flat_map(|p| p.programmed.keys()))
    }

    /// After a full reconcile: removes the tc path's entries of Services that no longer
    /// exist (deleted while no proxy ran).
    pub(crate) fn prune(&mut self) -> Result<(), lb::Error> {
        let Some(packet) = &mut self.packet else {
            return Ok(());
        };
        let wanted: HashSet<Frontend> = packet.programmed.values().flatten().copied().collect();
        for (frontend, _) in packet.maps.table.list()? {
            if !wanted.contains(&frontend) {
                packet.maps.table.remove(frontend)?;
            }
        }
        let stale: Vec<u32> = packet
            .maps
            .local
            .entries()
            .map_err(map_err("iterate"))?
            .into_iter()
            .map(|(addr, _)| addr)
            .filter(|addr| {
                !packet
                    .local_uses
                    .contains_key(&Ipv4Addr::from(u32::from_be(*addr)))
            })
            .collect();
        for addr in stale {
            packet.maps.local.remove(&addr).map_err(map_err("delete"))?;
        }
        Ok(())
    }
}

impl<S, B, V> PacketPath<S, B, V>
where
    S: KvMap<ServiceKey, ServiceEntry>,
    B: KvMap<BackendKey, Backend>,
    V: KvMap<u32, u32>,
{
    fn reconcile(
        &mut self,
        key: &Key,
        desired: &External,
        options: lb::ServiceOptions,
    ) -> Result<(), lb::Error> {
        // Local addresses first, so a new backend's flows are never SNATed by mistake.
        let old_local = self.local_of.remove(key).unwrap_or_default();
        for addr in desired.local.iter().filter(|a| !old_local.contains(a)) {
            let uses = self.local_uses.entry(*addr).or_insert(0);
            *uses += 1;
            if *uses == 1 {
                self.maps
                    .local
                    .insert(u32::from(*addr).to_be(), 1)
                    .map_err(map_err("insert"))?;
            }
        }
        let old = self.programmed.remove(key).unwrap_or_default();
        // The tc path counts its addresses (`NP_ADDRS`): a packet to an address without
        // external frontends skips every other lookup. It chooses backends as the Service
        // says (Maglev, affinity by client address), like the socket path.
        for (frontend, backends) in &desired.packet {
            self.maps.table.upsert_with(*frontend, backends, options)?;
        }
        for gone in old
            .iter()
            .filter(|f| !desired.packet.iter().any(|(d, _)| d == *f))
        {
            self.maps.table.remove(*gone)?;
        }
        if !desired.packet.is_empty() {
            self.programmed.insert(
                key.clone(),
                desired.packet.iter().map(|(f, _)| *f).collect(),
            );
        }
        for addr in old_local.iter().filter(|a| !desired.local.contains(a)) {
            if let Some(uses) = self.local_uses.get_mut(addr) {
                *uses -= 1;
                if *uses == 0 {
                    self.local_uses.remove(addr);
                    self.maps
                        .local
                        .remove(&u32::from(*addr).to_be())
                        .map_err(map_err("delete"))?;
                }
            }
        }
        if !desired.local.is_empty() {
            self.local_of.insert(key.clone(), desired.local.clone());
        }
        Ok(())
    }
}

/// Moves the main table's external entries of one Service from `old` to `desired`.
fn apply<S, B, V>(
    main: &mut ServiceTable<S, B, V>,
    old: &[Frontend],
    desired: &[(Frontend, Vec<std::net::SocketAddrV4>)],
    options: lb::ServiceOptions,
) -> Result<(), lb::Error>
where
    S: KvMap<ServiceKey, ServiceEntry>,
    B: KvMap<BackendKey, Backend>,
    V: KvMap<u32, u32>,
{
    for (frontend, backends) in desired {
        main.upsert_external(*frontend, backends, options)?;
    }
    for gone in old.iter().filter(|f| !desired.iter().any(|(d, _)| d == *f)) {
        main.remove_external(*gone)?;
    }
    Ok(())
}

fn map_err(op: &'static str) -> impl FnOnce(aya::maps::MapError) -> lb::Error {
    move |source| lb::Error::Map {
        op,
        map: NP_LOCAL_MAP,
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    type Services = HashMap<ServiceKey, ServiceEntry>;
    type Backends = HashMap<BackendKey, Backend>;
    type Addrs = HashMap<u32, u32>;
    type Fake = ExternalFrontends<Services, Backends, Addrs>;

    fn table() -> ServiceTable<Services, Backends, Addrs> {
        ServiceTable::new(
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
            lb::in_memory_selection(),
        )
        .unwrap()
    }

    fn desired(front: &str, backends: &[&str], local: &[&str]) -> External {
        let f: Frontend = front.parse().unwrap();
        let b: Vec<_> = backends.iter().map(|s| s.parse().unwrap()).collect();
        External {
            socket: vec![(f, b.clone())],
            packet: vec![(f, b)],
            local: local.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    /// External frontends with the tc path's (fake) maps.
    fn with_packet_path() -> Fake {
        ExternalFrontends::new(
            NodeAddrs::default(),
            Some(PacketMaps {
                table: table(),
                local: HashMap::new(),
            }),
        )
    }

    #[test]
    fn local_addresses_are_shared_between_services_and_pruned() {
        let mut main = table();
        let mut ext = with_packet_path();
        let a: Key = ("default".into(), "a".into());
        let b: Key = ("default".into(), "b".into());
        let pod = u32::from("10.244.0.2".parse::<Ipv4Addr>().unwrap()).to_be();
        ext.reconcile(
            &mut main,
            &a,
            Some(desired(
                "172.29.0.10:30080",
                &["10.244.0.2:80"],
                &["10.244.0.2"],
            )),
            Default::default(),
        )
        .unwrap();
        ext.reconcile(
            &mut main,
            &b,
            Some(desired(
                "172.29.0.10:30081",
                &["10.244.0.2:81"],
                &["10.244.0.2"],
            )),
            Default::default(),
        )
        .unwrap();
        let packet = ext.packet.as_ref().unwrap();
        assert_eq!(packet.maps.local.get(&pod), Some(&1));
        assert_eq!(packet.maps.table.list().unwrap().len(), 2);
        // Node addresses are not virtual IPs in the main table.
        assert_eq!(main.list().unwrap().len(), 2);
        assert!(
            ext.socket_frontends()
                .contains(&"172.29.0.10:30080".parse().unwrap())
        );

        ext.reconcile(&mut main, &a, None, Default::default())
            .unwrap();
        assert_eq!(
            ext.packet.as_ref().unwrap().maps.local.get(&pod),
            Some(&1),
            "still used by b"
        );
        ext.reconcile(&mut main, &b, None, Default::default())
            .unwrap();
        let packet = ext.packet.as_ref().unwrap();
        assert!(packet.maps.local.is_empty());
        assert!(packet.maps.table.list().unwrap().is_empty());
        assert!(main.list().unwrap().is_empty());
    }

    #[test]
    fn the_packet_path_takes_the_services_selection_options() {
        let mut main = table();
        let mut ext = with_packet_path();
        let key: Key = ("default".into(), "sticky".into());
        let options = lb::ServiceOptions {
            algorithm: lb::Algorithm::Maglev,
            affinity_timeout_secs: Some(600),
        };
        let want = desired("172.29.0.10:30940", &["10.244.0.2:80"], &[]);
        ext.reconcile(&mut main, &key, Some(want), options).unwrap();
        let packet = ext.packet.as_ref().unwrap().maps.table.details().unwrap();
        assert_eq!(packet.len(), 1);
        assert_eq!(packet[0].options, options);
        assert!(packet[0].stats.is_some(), "the frontend has counters");
        assert_eq!(main.details().unwrap()[0].options, options);
        assert_eq!(
            ext.frontends_of(&key),
            BTreeSet::from(["172.29.0.10:30940".parse().unwrap()])
        );
    }

    #[test]
    fn prune_drops_leftovers_of_a_previous_run() {
        let mut leftover = table();
        leftover
            .upsert(
                "172.29.0.10:30099".parse().unwrap(),
                &["10.244.0.9:80".parse().unwrap()],
            )
            .unwrap();
        let mut local = HashMap::new();
        local.insert(u32::from(Ipv4Addr::new(10, 244, 0, 9)).to_be(), 1);
        let mut ext: Fake = ExternalFrontends::new(
            NodeAddrs::default(),
            Some(PacketMaps {
                table: leftover,
                local,
            }),
        );
        ext.prune().unwrap();
        let packet = ext.packet.as_ref().unwrap();
        assert!(packet.maps.table.list().unwrap().is_empty());
        assert!(packet.maps.local.is_empty());
    }
}
