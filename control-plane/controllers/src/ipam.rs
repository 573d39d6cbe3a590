//! Node IPAM: gives each node without one a pod CIDR (`spec.podCIDR`, `spec.podCIDRs`) carved
//! from the cluster CIDR, and takes it back when the node is deleted.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::PostParams,
    runtime::reflector::{ObjectRef, Store},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Options, Result,
    error::{ApiContext as _, Error},
    informer::{Change, Informer},
    util::Key,
    workqueue::WorkQueue,
};

/// Which subnets of the cluster CIDR are taken.
#[derive(Debug)]
pub struct Allocator {
    base: u32,
    cluster_prefix: u8,
    node_prefix: u8,
    used: HashSet<u32>,
    next: u32,
}

impl Allocator {
    /// An allocator of `/node_prefix` subnets of `cluster`.
    pub fn new(cluster: (Ipv4Addr, u8), node_prefix: u8) -> Self {
        let mask = if cluster.1 == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(cluster.1))
        };
        Allocator {
            base: u32::from(cluster.0) & mask,
            cluster_prefix: cluster.1,
            node_prefix,
            used: HashSet::new(),
            next: 0,
        }
    }

    fn count(&self) -> u32 {
        1u32.checked_shl(u32::from(self.node_prefix - self.cluster_prefix))
            .unwrap_or(u32::MAX)
    }

    fn cidr(&self, i: u32) -> String {
        let size = 1u32 << (32 - u32::from(self.node_prefix));
        format!(
            "{}/{}",
            Ipv4Addr::from(self.base + i * size),
            self.node_prefix
        )
    }

    fn index(&self, cidr: &str) -> Option<u32> {
        let (ip, len) = cidr.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        if len.parse::<u8>().ok()? != self.node_prefix {
            return None;
        }
        let offset = u32::from(ip).checked_sub(self.base)?;
        let i = offset >> (32 - u32::from(self.node_prefix));
        (i < self.count()).then_some(i)
    }

    /// Marks a CIDR as taken (one outside the cluster CIDR is ignored).
    pub fn occupy(&mut self, cidr: &str) {
        if let Some(i) = self.index(cidr) {
            self.used.insert(i);
        }
    }

    /// Gives a CIDR back.
    pub fn release(&mut self, cidr: &str) {
        if let Some(i) = self.index(cidr) {
            self.used.remove(&i);
        }
    }

    /// Takes the next free CIDR.
    pub fn allocate(&mut self) -> Option<String> {
        let n = self.count();
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.used.insert(i) {
                self.next = (i + 1) % n;
                return Some(self.cidr(i));
            }
        }
        None
    }
}

struct State {
    alloc: Allocator,
    /// Node → CIDR, including allocations not yet seen in the cache.
    assigned: HashMap<String, String>,
}

/// The node IPAM controller.
pub(crate) struct Ipam {
    client: Client,
    nodes: Store<Node>,
    queue: WorkQueue<Key>,
    state: Arc<Mutex<State>>,
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .filter(|c| !c.is_empty())
}

impl Ipam {
    /// Registers the controller's handlers.
    pub fn register(client: Client, opts: &Options, nodes: &mut Informer<Node>) -> Arc<Self> {
        let queue = WorkQueue::new();
        let state = Arc::new(Mutex::new(State {
            alloc: Allocator::new(opts.cluster_cidr, opts.node_cidr_prefix),
            assigned: HashMap::new(),
        }));
        let store = nodes.store();
        {
            let (queue, state, store) = (queue.clone(), Arc::clone(&state), store.clone());
            nodes.on(move |c| {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                match c {
                    Change::Applied(n) => {
                        let name = n.metadata.name.clone().unwrap_or_default();
                        if let Some(cidr) = pod_cidr(n) {
                            if let Some(old) = s.assigned.insert(name, cidr.to_owned())
                                && old != cidr
                            {
                                s.alloc.release(&old);
                            }
                            s.alloc.occupy(cidr);
                        } else {
                            queue.add(Key::of(n));
                        }
                    }
                    Change::Deleted(n) => {
                        let name = n.metadata.name.clone().unwrap_or_default();
                        if let Some(cidr) = s.assigned.remove(&name) {
                            s.alloc.release(&cidr);
                        }
                    }
                    Change::Relisted => {
                        let nodes = store.state();
                        let live: HashSet<String> = nodes
                            .iter()
                            .filter_map(|n| n.metadata.name.clone())
                            .collect();
                        let gone: Vec<String> = s
                            .assigned
                            .keys()
                            .filter(|k| !live.contains(*k))
                            .cloned()
                            .collect();
                        for name in gone {
                            if let Some(cidr) = s.assigned.remove(&name) {
                                s.alloc.release(&cidr);
                            }
                        }
                        for n in nodes {
                            match pod_cidr(&n) {
                                Some(c) => {
                                    s.alloc.occupy(c);
                                    s.assigned.insert(
                                        n.metadata.name.clone().unwrap_or_default(),
                                        c.to_owned(),
                                    );
                                }
                                None => queue.add(Key::of(n.as_ref())),
                            }
                        }
                    }
                }
            });
        }
        Arc::new(Ipam {
            client,
            nodes: store,
            queue,
            state,
        })
    }

    /// Assigns CIDRs until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if !crate::informer::ready(&self.nodes, &cancel).await {
            return;
        }
        let this = Arc::clone(&self);
        self.queue
            .clone()
            .run(cancel, "node-ipam", move |key| {
                let this = Arc::clone(&this);
                async move { this.reconcile(key).await }
            })
            .await;
    }

    async fn reconcile(&self, key: Key) -> Result<Option<Duration>> {
        let Some(node) = self.nodes.get(&ObjectRef::new(&key.name)) else {
            return Ok(None);
        };
        if pod_cidr(&node).is_some() {
            return Ok(None);
        }
        let cidr = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match s.assigned.get(&key.name) {
                Some(c) => c.clone(),
                None => {
                    let Some(c) = s.alloc.allocate() else {
                        return Err(Error::Option(
                            "the cluster CIDR has no free node CIDR left".into(),
                        ));
                    };
                    s.assigned.insert(key.name.clone(), c.clone());
                    c
                }
            }
        };
        let mut updated = (*node).clone();
        let spec = updated.spec.get_or_insert_with(Default::default);
        spec.pod_cidr = Some(cidr.clone());
        spec.pod_cidrs = Some(vec![cidr.clone()]);
        let api: Api<Node> = Api::all(self.client.clone());
        api.replace(&key.name, &PostParams::default(), &updated)
            .await
            .ctx(|| format!("assigning pod CIDR {cidr} to node {}", key.name))?;
        tracing::info!(node = %key.name, %cidr, "pod CIDR assigned");
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_releases_and_skips_taken() {
        let mut a = Allocator::new((Ipv4Addr::new(10, 244, 0, 0), 16), 24);
        a.occupy("10.244.0.0/24");
        assert_eq!(a.allocate().as_deref(), Some("10.244.1.0/24"));
        assert_eq!(a.allocate().as_deref(), Some("10.244.2.0/24"));
        a.release("10.244.0.0/24");
        let rest: Vec<String> = std::iter::from_fn(|| a.allocate()).collect();
        assert_eq!(rest.len(), 254);
        assert!(rest.contains(&"10.244.0.0/24".to_owned()));
        assert_eq!(a.allocate(), None);
        a.occupy("192.168.0.0/24");
        a.release("10.244.7.0/24");
        assert_eq!(a.allocate().as_deref(), Some("10.244.7.0/24"));
    }
}
