//! The scheduler's view of the cluster: every node with the requests of the pods bound to
//! it already summed, so that checking a node is a few comparisons rather than a walk over
//! its pods. Pods the scheduler has just placed are "assumed" here at once, before their
//! binding is written, and forgotten again if the binding fails.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{
    Node, NodeSelector, Pod, PreferredSchedulingTerm, Taint, Toleration,
};

use super::{images, topology};
use crate::{quantity, util::Key};

/// A host port a pod needs: protocol, host IP (`0.0.0.0` for any) and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub protocol: String,
    pub ip: String,
    pub port: i32,
}

impl HostPort {
    /// Whether two host ports collide (same protocol and port, and either binds every
    /// address or both the same one).
    pub fn conflicts(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || self.ip == "0.0.0.0" || other.ip == "0.0.0.0")
    }
}

/// CPU (millicores) used when a pod requests none, for scoring only (as Kubernetes does).
const DEFAULT_CPU: i64 = 100;
/// Memory (bytes) used when a pod requests none, for scoring only.
const DEFAULT_MEMORY: i64 = 200 << 20;

/// What a pod asks of a node, computed once per scheduling attempt.
#[derive(Clone, Debug, Default)]
pub struct PodReq {
    pub cpu: i64,
    pub memory: i64,
    /// Requests with defaults for unset values, for scoring.
    pub score_cpu: i64,
    pub score_memory: i64,
    pub ports: Vec<HostPort>,
    pub node_name: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub required: Option<NodeSelector>,
    pub preferred: Vec<PreferredSchedulingTerm>,
    pub tolerations: Vec<Toleration>,
    /// Uid of the controlling owner, for spreading.
    pub owner: Option<String>,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Required pod (anti-)affinity and topology spread constraints.
    pub rules: topology::Rules,
    /// Canonical names of the containers' images.
    pub images: Vec<String>,
}

impl PodReq {
    /// Reads a pod's requirements.
    pub fn of(pod: &Pod) -> Self {
        let Some(spec) = pod.spec.as_ref() else {
            return PodReq::default();
        };
        let (mut cpu, mut memory, mut score_cpu, mut score_memory) = (0, 0, 0, 0);
        let mut ports = Vec::new();
        for c in &spec.containers {
            let req = c.resources.as_ref().and_then(|r| r.requests.as_ref());
            let c_cpu = req.and_then(|r| r.get("cpu")).and_then(quantity::millis);
            let c_mem = req.and_then(|r| r.get("memory")).and_then(quantity::units);
            cpu += c_cpu.unwrap_or(0);
            memory += c_mem.unwrap_or(0);
            score_cpu += c_cpu.unwrap_or(DEFAULT_CPU);
            score_memory += c_mem.unwrap_or(DEFAULT_MEMORY);
            for p in c.ports.iter().flatten() {
                if let Some(hp) = p.host_port.filter(|p| *p > 0) {
                    ports.push(HostPort {
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        ip: p
                            .host_ip
                            .clone()
                            .filter(|ip| !ip.is_empty())
                            .unwrap_or_else(|| "0.0.0.0".into()),
                        port: hp,
                    });
                }
            }
        }
        // Init containers run one at a time before the others: the pod needs the larger.
        for c in spec.init_containers.iter().flatten() {
            let req = c.resources.as_ref().and_then(|r| r.requests.as_ref());
            if let Some(v) = req.and_then(|r| r.get("cpu")).and_then(quantity::millis) {
                cpu = cpu.max(v);
                score_cpu = score_cpu.max(v);
            }
            if let Some(v) = req.and_then(|r| r.get("memory")).and_then(quantity::units) {
                memory = memory.max(v);
                score_memory = score_memory.max(v);
            }
        }
        for (name, q) in spec.overhead.iter().flatten() {
            match name.as_str() {
                "cpu" => cpu += quantity::millis(q).unwrap_or(0),
                "memory" => memory += quantity::units(q).unwrap_or(0),
                _ => {}
            }
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let rules = topology::rules(spec, &namespace, &labels);
        let images = spec
            .containers
            .iter()
            .filter_map(|c| c.image.as_deref())
            .map(images::normalize)
            .collect();
        let affinity = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref());
        PodReq {
            cpu,
            memory,
            score_cpu,
            score_memory,
            ports,
            node_name: spec.node_name.clone().filter(|n| !n.is_empty()),
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required: affinity.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .clone()
            }),
            preferred: affinity
                .and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .clone()
                })
                .unwrap_or_default(),
            tolerations: spec.tolerations.clone().unwrap_or_default(),
            owner: crate::util::controller_of(&pod.metadata).map(|r| r.uid.clone()),
            namespace,
            labels,
            rules,
            images,
        }
    }
}

/// A pod accounted to a node.
#[derive(Clone, Debug)]
struct Placed {
    node: String,
    req: PodReq,
    /// Placed by this scheduler, its binding not yet seen in a watch event.
    assumed: bool,
}

/// One node and the sums of what its pods request.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    /// Whether the Node object exists (pods may be seen before their node).
    pub present: bool,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    pub alloc_cpu: i64,
    pub alloc_memory: i64,
    pub alloc_pods: i64,
    pub cpu: i64,
    pub memory: i64,
    pub score_cpu: i64,
    pub score_memory: i64,
    pub pods: i64,
    pub ports: Vec<HostPort>,
    /// Pods per controlling owner uid.
    pub owners: HashMap<String, u32>,
    /// Images the node holds: canonical name to size in bytes.
    pub images: HashMap<String, i64>,
}

impl NodeInfo {
    fn add(&mut self, r: &PodReq, sign: i64) {
        self.cpu += sign * r.cpu;
        self.memory += sign * r.memory;
        self.score_cpu += sign * r.score_cpu;
        self.score_memory += sign * r.score_memory;
        self.pods += sign;
        if sign > 0 {
            self.ports.extend(r.ports.iter().cloned());
        } else {
            for p in &r.ports {
                if let Some(i) = self.ports.iter().position(|q| q == p) {
                    self.ports.swap_remove(i);
                }
            }
        }
        if let Some(o) = &r.owner {
            let n = self.owners.entry(o.clone()).or_insert(0);
            if sign > 0 {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.owners.remove(o);
                }
            }
        }
    }
}

/// Nodes and the pods accounted to them.
#[derive(Debug, Default)]
pub struct Cache {
    pub nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    pods: HashMap<Key, Placed>,
    present: usize,
    /// Accounted pods with required anti-affinity, checked against every incoming pod.
    anti: HashSet<Key>,
    /// Accounted pods whose preferences (or required affinity) score incoming pods.
    preferring: HashSet<Key>,
    /// How many nodes hold each image.
    image_nodes: HashMap<String, usize>,
}

impl Cache {
    fn slot(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        self.nodes.push(NodeInfo {
            name: name.to_owned(),
            ..NodeInfo::default()
        });
        self.index.insert(name.to_owned(), self.nodes.len() - 1);
        self.nodes.len() - 1
    }

    /// Adds or refreshes a node.
    pub fn upsert_node(&mut self, node: &Node) {
        let Some(name) = node.metadata.name.as_deref() else {
            return;
        };
        let i = self.slot(name);
        let n = &mut self.nodes[i];
        let alloc = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()));
        let get = |k: &str| alloc.and_then(|a| a.get(k));
        if !n.present {
            n.present = true;
            self.present += 1;
        }
        let n = &mut self.nodes[i];
        n.labels = node.metadata.labels.clone().unwrap_or_default();
        let spec = node.spec.as_ref();
        n.taints = spec.and_then(|s| s.taints.clone()).unwrap_or_default();
        n.unschedulable = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        n.alloc_cpu = get("cpu").and_then(quantity::millis).unwrap_or(0);
        n.alloc_memory = get("memory").and_then(quantity::units).unwrap_or(0);
        n.alloc_pods = get("pods").and_then(quantity::units).unwrap_or(110);
        let images = images::node_images(
            node.status
                .as_ref()
                .and_then(|s| s.images.as_deref())
                .unwrap_or_default(),
        );
        if images != n.images {
            let old = std::mem::replace(&mut n.images, images);
            self.count_images(&old, false);
            self.count_images(&self.nodes[i].images.clone(), true);
        }
    }

    fn count_images(&mut self, images: &HashMap<String, i64>, add: bool) {
        for name in images.keys() {
            if add {
                *self.image_nodes.entry(name.clone()).or_insert(0) += 1;
            } else if let Some(n) = self.image_nodes.get_mut(name) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.image_nodes.remove(name);
                }
            }
        }
    }

    /// How many nodes hold an image.
    pub fn image_spread(&self, image: &str) -> usize {
        self.image_nodes.get(image).copied().unwrap_or(0)
    }

    /// Whether any node reports images at all.
    pub fn has_images(&self) -> bool {
        !self.image_nodes.is_empty()
    }

    /// Every accounted pod with the index of its node.
    pub fn placed(&self) -> impl Iterator<Item = (usize, &PodReq)> {
        self.pods
            .values()
            .filter_map(|p| self.index.get(&p.node).map(|&i| (i, &p.req)))
    }

    /// Accounted pods with required anti-affinity, with their nodes.
    pub fn anti_affinity_pods(&self) -> impl Iterator<Item = (&NodeInfo, &PodReq)> {
        self.anti.iter().filter_map(|k| {
            let p = self.pods.get(k)?;
            let &i = self.index.get(&p.node)?;
            Some((&self.nodes[i], &p.req))
        })
    }

    /// Accounted pods with preferred pod (anti-)affinity or required pod affinity, with
    /// their nodes.
    pub fn preferring_pods(&self) -> impl Iterator<Item = (&NodeInfo, &PodReq)> {
        self.preferring.iter().filter_map(|k| {
            let p = self.pods.get(k)?;
            let &i = self.index.get(&p.node)?;
            Some((&self.nodes[i], &p.req))
        })
    }

    /// Removes a node (its pods stay accounted until they go).
    pub fn remove_node(&mut self, name: &str) {
        if let Some(&i) = self.index.get(name) {
            if self.nodes[i].present {
                self.present -= 1;
            }
            self.nodes[i].present = false;
            let old = std::mem::take(&mut self.nodes[i].images);
            self.count_images(&old, false);
            if self.nodes[i].pods == 0 {
                self.drop_slot(i);
            }
        }
    }

    fn drop_slot(&mut self, i: usize) {
        let gone = self.nodes.swap_remove(i);
        self.index.remove(&gone.name);
        if let Some(moved) = self.nodes.get(i) {
            self.index.insert(moved.name.clone(), i);
        }
    }

    /// Accounts a pod whose binding to `node` was seen (replacing an earlier account of the
    /// same pod); true if it was not accounted there yet.
    pub fn add_pod(&mut self, key: Key, node: &str, req: PodReq) -> bool {
        self.account(key, node, req, false)
    }

    /// Accounts a pod the scheduler has just placed on `node`, before its binding is
    /// written; true if it was not accounted there yet.
    pub fn assume_pod(&mut self, key: Key, node: &str, req: PodReq) -> bool {
        self.account(key, node, req, true)
    }

    fn account(&mut self, key: Key, node: &str, req: PodReq, assumed: bool) -> bool {
        if let Some(old) = self.pods.get_mut(&key)
            && old.node == node
        {
            old.assumed &= assumed;
            return false;
        }
        self.remove_pod(&key);
        let i = self.slot(node);
        self.nodes[i].add(&req, 1);
        if !req.rules.anti_affinity.is_empty() {
            self.anti.insert(key.clone());
        }
        if !(req.rules.preferred.is_empty() && req.rules.affinity.is_empty()) {
            self.preferring.insert(key.clone());
        }
        self.pods.insert(
            key,
            Placed {
                node: node.to_owned(),
                req,
                assumed,
            },
        );
        true
    }

    /// Stops accounting a pod; true if it was accounted.
    pub fn remove_pod(&mut self, key: &Key) -> bool {
        let Some(p) = self.pods.remove(key) else {
            return false;
        };
        self.anti.remove(key);
        self.preferring.remove(key);
        if let Some(&i) = self.index.get(&p.node) {
            self.nodes[i].add(&p.req, -1);
            if !self.nodes[i].present && self.nodes[i].pods <= 0 {
                self.drop_slot(i);
            }
        }
        true
    }

    /// Whether a pod is accounted.
    pub fn has_pod(&self, key: &Key) -> bool {
        self.pods.contains_key(key)
    }

    /// Forgets every pod except assumed ones that `still_pending` says are still waiting
    /// for their binding: a relisted watch shows those unbound (or not yet at all), and
    /// forgetting them would let the next decisions ignore pods that are about to land.
    pub fn clear_pods(&mut self, still_pending: impl Fn(&Key) -> bool) {
        let keys: Vec<Key> = self
            .pods
            .iter()
            .filter(|(k, p)| !(p.assumed && still_pending(k)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.remove_pod(&k);
        }
    }

    /// Number of nodes whose Node object exists.
    pub fn node_count(&self) -> usize {
        self.present
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn images_and_anti_affinity_pods_are_tracked() {
        let node = |name: &str, images: serde_json::Value| -> Node {
            serde_json::from_value(json!({"metadata": {"name": name},
                "status": {"images": images}}))
            .expect("node")
        };
        let mut c = Cache::default();
        c.upsert_node(&node("a", json!([{"names": ["nginx:1"], "sizeBytes": 10}])));
        c.upsert_node(&node(
            "b",
            json!([{"names": ["docker.io/library/nginx:1"]}]),
        ));
        assert_eq!(c.image_spread("docker.io/library/nginx:1"), 2);
        c.upsert_node(&node("b", json!([])));
        assert_eq!(c.image_spread("docker.io/library/nginx:1"), 1);
        c.remove_node("a");
        assert!(!c.has_images());

        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [], "affinity": {"podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {}, "topologyKey": "kubernetes.io/hostname"}]}}},
        }))
        .expect("pod");
        let key = Key::new("default", "p");
        c.add_pod(key.clone(), "b", PodReq::of(&pod));
        assert_eq!(c.anti_affinity_pods().count(), 1);
        assert_eq!(c.placed().count(), 1);
        c.remove_pod(&key);
        assert_eq!(c.anti_affinity_pods().count(), 0);
    }

    #[test]
    fn a_relist_keeps_pods_still_waiting_for_their_binding() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "rs", "uid": "rs-uid", "controller": true}]},
            "spec": {"containers": []},
        }))
        .expect("pod");
        let mut c = Cache::default();
        let (bound, binding, gone) = (
            Key::new("default", "bound"),
            Key::new("default", "binding"),
            Key::new("default", "gone"),
        );
        c.add_pod(bound.clone(), "a", PodReq::of(&pod));
        c.assume_pod(binding.clone(), "a", PodReq::of(&pod));
        c.assume_pod(gone.clone(), "a", PodReq::of(&pod));
        // The relisted store still shows `binding` unbound; `gone` is no longer there.
        c.clear_pods(|k| *k == binding);
        assert!(c.has_pod(&binding));
        assert!(!c.has_pod(&bound) && !c.has_pod(&gone));
        assert_eq!(c.nodes[0].owners.get("rs-uid"), Some(&1));
        // Once its binding is seen the pod is no longer assumed and a relist forgets it
        // (to be accounted again from the listed object).
        c.add_pod(binding.clone(), "a", PodReq::of(&pod));
        c.clear_pods(|_| true);
        assert!(!c.has_pod(&binding));
        assert_eq!(c.placed().count(), 0);
    }
}
