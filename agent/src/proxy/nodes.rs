//! The addresses of every Node in the cluster, from the API: a nodePort is served on each of
//! them, so the node's own sockets and its pods can have a connect to any node's address and
//! nodePort balanced at the socket, as to a cluster IP.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use futures::{Stream, StreamExt as _, future};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};

/// The IPv4 InternalIP and ExternalIP addresses a Node reports.
pub fn node_ips(node: &Node) -> Vec<Ipv4Addr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// Every Node's addresses, folded from watch events.
#[derive(Default)]
struct Addresses {
    by_node: HashMap<String, Vec<Ipv4Addr>>,
    /// Nodes seen by the (re)list in progress.
    listing: Option<HashMap<String, Vec<Ipv4Addr>>>,
    /// What was last emitted.
    last: Option<BTreeSet<Ipv4Addr>>,
}

impl Addresses {
    /// Applies one event; the full set when it changed and no (re)list is in progress.
    fn apply(&mut self, event: watcher::Event<Node>) -> Option<BTreeSet<Ipv4Addr>> {
        match event {
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(node) => {
                if let Some(listing) = &mut self.listing {
                    listing.insert(node.name_any(), node_ips(&node));
                }
            }
            watcher::Event::InitDone => self.by_node = self.listing.take().unwrap_or_default(),
            watcher::Event::Apply(node) => {
                self.by_node.insert(node.name_any(), node_ips(&node));
            }
            watcher::Event::Delete(node) => {
                self.by_node.remove(&node.name_any());
            }
        }
        if self.listing.is_some() {
            return None;
        }
        let all: BTreeSet<Ipv4Addr> = self.by_node.values().flatten().copied().collect();
        if self.last.as_ref() == Some(&all) {
            return None;
        }
        self.last = Some(all.clone());
        Some(all)
    }
}

/// The set of every Node's addresses, each time it changes (with kube-rs' default back-off
/// on watch errors, which are logged and retried).
pub(crate) fn addresses(client: Client) -> impl Stream<Item = BTreeSet<Ipv4Addr>> {
    let mut state = Addresses::default();
    watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| {
            future::ready(match event {
                Ok(event) => state.apply(event),
                Err(e) => {
                    tracing::warn!(error = %e, "watching Nodes; retrying");
                    None
                }
            })
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, addrs: &[(&str, &str)]) -> Node {
        let addresses: Vec<_> = addrs
            .iter()
            .map(|(t, a)| json!({"type": t, "address": a}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"addresses": addresses}
        }))
        .unwrap()
    }

    #[test]
    fn emits_the_set_after_a_list_and_on_changes_only() {
        let mut a = Addresses::default();
        let n0 = node("n0", &[("InternalIP", "172.29.0.10"), ("Hostname", "n0")]);
        let n1 = node(
            "n1",
            &[("InternalIP", "172.29.0.11"), ("InternalIP", "fd00::1")],
        );
        assert_eq!(a.apply(watcher::Event::Init), None);
        assert_eq!(a.apply(watcher::Event::InitApply(n0.clone())), None);
        assert_eq!(a.apply(watcher::Event::InitApply(n1.clone())), None);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            a.apply(watcher::Event::InitDone),
            Some([ip("172.29.0.10"), ip("172.29.0.11")].into())
        );
        // A status update that changes no address emits nothing.
        assert_eq!(a.apply(watcher::Event::Apply(n0)), None);
        assert_eq!(
            a.apply(watcher::Event::Delete(n1)),
            Some([ip("172.29.0.10")].into())
        );
    }
}
