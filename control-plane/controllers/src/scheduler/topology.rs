//! Plugins that look at other pods by topology domain (the value of a node label such as
//! `kubernetes.io/hostname` or `topology.kubernetes.io/zone`): required inter-pod affinity
//! and anti-affinity (including existing pods' anti-affinity against the incoming pod),
//! preferred inter-pod affinity and anti-affinity (a score, in both directions, as
//! kube-scheduler's InterPodAffinity) and topology spread constraints. What they need from the whole cluster is gathered once per
//! pod into a [`PreState`] (kube-scheduler's PreFilter), so checking a node stays a few
//! lookups; pods without such rules skip all of it.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::{
    api::core::v1::{PodAffinityTerm, PodSpec, TopologySpreadConstraint, WeightedPodAffinityTerm},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};

use super::{
    cache::{Cache, NodeInfo, PodReq},
    plugins::{self, Reason},
};
use crate::util::{selector_is_empty, selector_matches};

/// A required pod (anti-)affinity term.
#[derive(Clone, Debug)]
pub struct Term {
    /// None selects no pod (as a missing selector does in Kubernetes).
    selector: Option<LabelSelector>,
    /// None: every namespace.
    namespaces: Option<Vec<String>>,
    pub topology_key: String,
}

impl Term {
    fn of(t: &PodAffinityTerm, own_ns: &str) -> Term {
        let listed = t.namespaces.clone().unwrap_or_default();
        let namespaces = match &t.namespace_selector {
            // `{}` selects every namespace.
            Some(sel) if selector_is_empty(sel) => None,
            None if listed.is_empty() => Some(vec![own_ns.to_owned()]),
            // Namespace labels are not cached: a non-empty namespaceSelector adds nothing to
            // the listed namespaces.
            _ => Some(listed),
        };
        Term {
            selector: t.label_selector.clone(),
            namespaces,
            topology_key: t.topology_key.clone(),
        }
    }

    /// Whether a pod in `ns` with `labels` is one the term is about.
    pub fn matches(&self, ns: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|n| n.iter().any(|x| x == ns))
            && self
                .selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, Some(labels)))
    }
}

/// A topology spread constraint.
#[derive(Clone, Debug)]
pub struct Spread {
    pub max_skew: i64,
    pub key: String,
    /// `DoNotSchedule` (a filter) rather than `ScheduleAnyway` (a score).
    pub hard: bool,
    selector: Option<LabelSelector>,
    min_domains: usize,
    honor_affinity: bool,
    honor_taints: bool,
}

impl Spread {
    fn of(c: &TopologySpreadConstraint, labels: &BTreeMap<String, String>) -> Spread {
        let mut selector = c.label_selector.clone();
        // matchLabelKeys narrow the selector to pods sharing the pod's values of those keys
        // (typically pod-template-hash: one revision of a Deployment at a time).
        if let Some(sel) = selector.as_mut() {
            for k in c.match_label_keys.iter().flatten() {
                if let Some(v) = labels.get(k) {
                    sel.match_expressions.get_or_insert_with(Vec::new).push(
                        LabelSelectorRequirement {
                            key: k.clone(),
                            operator: "In".into(),
                            values: Some(vec![v.clone()]),
                        },
                    );
                }
            }
        }
        Spread {
            max_skew: i64::from(c.max_skew.max(1)),
            key: c.topology_key.clone(),
            hard: c.when_unsatisfiable != "ScheduleAnyway",
            selector,
            min_domains: c.min_domains.unwrap_or(1).max(1) as usize,
            honor_affinity: c.node_affinity_policy.as_deref() != Some("Ignore"),
            honor_taints: c.node_taints_policy.as_deref() == Some("Honor"),
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| selector_matches(s, Some(labels)))
    }
}

/// A pod's required pod affinity and anti-affinity terms and its spread constraints.
pub fn rules(spec: &PodSpec, ns: &str, labels: &BTreeMap<String, String>) -> Rules {
    let aff = spec.affinity.as_ref();
    let terms = |t: Option<&Vec<PodAffinityTerm>>| -> Vec<Term> {
        t.into_iter().flatten().map(|t| Term::of(t, ns)).collect()
    };
    let weighted = |t: Option<&Vec<WeightedPodAffinityTerm>>, sign: i64| -> Vec<(i64, Term)> {
        t.into_iter()
            .flatten()
            .map(|w| {
                (
                    sign * i64::from(w.weight),
                    Term::of(&w.pod_affinity_term, ns),
                )
            })
            .collect()
    };
    let mut preferred = weighted(
        aff.and_then(|a| a.pod_affinity.as_ref()).and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        }),
        1,
    );
    preferred.extend(weighted(
        aff.and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
        -1,
    ));
    Rules {
        preferred,
        affinity: terms(aff.and_then(|a| a.pod_affinity.as_ref()).and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })),
        anti_affinity: terms(
            aff.and_then(|a| a.pod_anti_affinity.as_ref())
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                }),
        ),
        spread: spec
            .topology_spread_constraints
            .iter()
            .flatten()
            .map(|c| Spread::of(c, labels))
            .collect(),
    }
}

/// See [`rules`].
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Preferred terms with their weight: positive for affinity, negative for anti-affinity.
    pub preferred: Vec<(i64, Term)>,
    pub affinity: Vec<Term>,
    pub anti_affinity: Vec<Term>,
    pub spread: Vec<Spread>,
}

/// Matching pods per domain of one spread constraint, over the nodes it counts.
#[derive(Debug, Default)]
struct Domains {
    counts: HashMap<String, i64>,
    /// The smallest count (0 when there are fewer domains than minDomains).
    min: i64,
    /// 1 when the incoming pod matches its own selector.
    own: i64,
    /// Score weight: constraints over more domains weigh more.
    weight: f64,
}

/// What the filters and scores of one pod need from the whole cluster.
#[derive(Debug, Default)]
pub struct PreState {
    /// Per required affinity term: the domains holding a pod that matches every term.
    affinity: Vec<HashSet<String>>,
    /// No pod matches the affinity terms but the pod matches them itself: as the first of
    /// its group it may go to any node with the topology keys.
    affinity_first: bool,
    /// Per required anti-affinity term: the domains holding a pod that matches it.
    anti: Vec<HashSet<String>>,
    /// (key, value) domains where an existing pod's anti-affinity forbids the pod.
    existing_anti: Vec<(String, String)>,
    /// Per spread constraint, in the pod's order.
    spread: Vec<Domains>,
    /// Preferred inter-pod affinity: the summed weight of each (key, value) domain.
    preferred: HashMap<(String, String), i64>,
}

impl PreState {
    /// Gathers the state for `pod`; cheap when neither it nor any placed pod has rules.
    pub fn compute(cache: &Cache, pod: &PodReq) -> PreState {
        let mut st = PreState::default();
        for (node, other) in cache.anti_affinity_pods() {
            for t in &other.rules.anti_affinity {
                if let Some(v) = node.labels.get(&t.topology_key)
                    && t.matches(&pod.namespace, &pod.labels)
                {
                    st.existing_anti.push((t.topology_key.clone(), v.clone()));
                }
            }
        }
        // Symmetry: placed pods' preferences (and, with weight 1, their required affinity)
        // about the incoming pod count in their domains.
        for (node, other) in cache.preferring_pods() {
            let required = other.rules.affinity.iter().map(|t| (1, t));
            let preferred = other.rules.preferred.iter().map(|(w, t)| (*w, t));
            for (w, t) in preferred.chain(required) {
                if let Some(v) = node.labels.get(&t.topology_key)
                    && t.matches(&pod.namespace, &pod.labels)
                {
                    *st.preferred
                        .entry((t.topology_key.clone(), v.clone()))
                        .or_insert(0) += w;
                }
            }
        }
        let r = &pod.rules;
        if r.affinity.is_empty()
            && r.anti_affinity.is_empty()
            && r.spread.is_empty()
            && r.preferred.is_empty()
        {
            return st;
        }
        st.affinity = vec![HashSet::new(); r.affinity.len()];
        st.anti = vec![HashSet::new(); r.anti_affinity.len()];
        // Which nodes each spread constraint counts.
        let eligible: Vec<Vec<bool>> = r
            .spread
            .iter()
            .map(|c| {
                cache
                    .nodes
                    .iter()
                    .map(|n| {
                        n.present
                            && n.labels.contains_key(&c.key)
                            && (!c.honor_affinity || plugins::node_affinity_ok(n, pod))
                            && (!c.honor_taints || plugins::untolerated(n, pod).is_none())
                    })
                    .collect()
            })
            .collect();
        st.spread = r
            .spread
            .iter()
            .zip(&eligible)
            .map(|(c, elig)| {
                let mut counts = HashMap::new();
                for (n, _) in cache.nodes.iter().zip(elig).filter(|(_, e)| **e) {
                    counts.insert(n.labels[&c.key].clone(), 0);
                }
                Domains {
                    counts,
                    own: i64::from(c.matches(&pod.labels)),
                    ..Domains::default()
                }
            })
            .collect();
        for (idx, other) in cache.placed() {
            let node = &cache.nodes[idx];
            for (w, t) in &r.preferred {
                if let Some(v) = node.labels.get(&t.topology_key)
                    && t.matches(&other.namespace, &other.labels)
                {
                    *st.preferred
                        .entry((t.topology_key.clone(), v.clone()))
                        .or_insert(0) += w;
                }
            }
            if !r.affinity.is_empty()
                && r.affinity
                    .iter()
                    .all(|t| t.matches(&other.namespace, &other.labels))
            {
                for (t, set) in r.affinity.iter().zip(&mut st.affinity) {
                    if let Some(v) = node.labels.get(&t.topology_key) {
                        set.insert(v.clone());
                    }
                }
            }
            for (t, set) in r.anti_affinity.iter().zip(&mut st.anti) {
                if let Some(v) = node.labels.get(&t.topology_key)
                    && t.matches(&other.namespace, &other.labels)
                {
                    set.insert(v.clone());
                }
            }
            for ((c, d), elig) in r.spread.iter().zip(&mut st.spread).zip(&eligible) {
                if elig[idx] && other.namespace == pod.namespace && c.matches(&other.labels) {
                    *d.counts.entry(node.labels[&c.key].clone()).or_insert(0) += 1;
                }
            }
        }
        st.affinity_first = st.affinity.iter().all(HashSet::is_empty)
            && r.affinity
                .iter()
                .all(|t| t.matches(&pod.namespace, &pod.labels));
        for (c, d) in r.spread.iter().zip(&mut st.spread) {
            d.min = if d.counts.len() < c.min_domains {
                0
            } else {
                d.counts.values().copied().min().unwrap_or(0)
            };
            d.weight = ((d.counts.len() + 2) as f64).ln();
        }
        st
    }

    /// Why the node cannot take the pod under these plugins, if it cannot.
    pub fn filter(&self, node: &NodeInfo, pod: &PodReq) -> Option<Reason> {
        let r = &pod.rules;
        for (c, d) in r.spread.iter().zip(&self.spread).filter(|(c, _)| c.hard) {
            let Some(v) = node.labels.get(&c.key) else {
                return Some(Reason::SpreadMissingLabel);
            };
            let count = d.counts.get(v).copied().unwrap_or(0);
            if count + d.own - d.min > c.max_skew {
                return Some(Reason::Spread);
            }
        }
        if !r.affinity.is_empty() {
            let mut all_present = true;
            for (t, set) in r.affinity.iter().zip(&self.affinity) {
                match node.labels.get(&t.topology_key) {
                    Some(v) => all_present &= set.contains(v),
                    None => return Some(Reason::PodAffinity),
                }
            }
            if !all_present && !self.affinity_first {
                return Some(Reason::PodAffinity);
            }
        }
        for (t, set) in r.anti_affinity.iter().zip(&self.anti) {
            if node
                .labels
                .get(&t.topology_key)
                .is_some_and(|v| set.contains(v))
            {
                return Some(Reason::PodAntiAffinity);
            }
        }
        if self
            .existing_anti
            .iter()
            .any(|(k, v)| node.labels.get(k) == Some(v))
        {
            return Some(Reason::ExistingAntiAffinity);
        }
        None
    }

    /// Preferred inter-pod affinity's raw score of a node: the weights of its domains
    /// (normalized over the feasible nodes afterwards).
    pub fn preferred_raw(&self, node: &NodeInfo) -> i64 {
        self.preferred
            .iter()
            .filter(|((k, v), _)| node.labels.get(k) == Some(v))
            .map(|(_, w)| w)
            .sum()
    }

    /// The soft spread constraints' raw score (matching pods in the node's domains, weighted;
    /// lower is better), or None when the pod has none or the node lacks their keys.
    pub fn spread_raw(&self, node: &NodeInfo, pod: &PodReq) -> Option<f64> {
        let mut raw = None;
        for (c, d) in pod.rules.spread.iter().zip(&self.spread) {
            if c.hard {
                continue;
            }
            let v = node.labels.get(&c.key)?;
            let count = d.counts.get(v).copied().unwrap_or(0) as f64;
            *raw.get_or_insert(0.0) += count * d.weight;
        }
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Key;
    use k8s_openapi::api::core::v1::{Node, Pod};
    use serde_json::json;

    fn node(name: &str, zone: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "zone": zone}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}},
        }))
        .expect("node")
    }

    fn pod(name: &str, labels: serde_json::Value, spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "c", "image": "x"}]);
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": spec,
        }))
        .expect("pod")
    }

    /// Three nodes: a and b in zone z1, c in z2.
    fn cache() -> Cache {
        let mut c = Cache::default();
        c.upsert_node(&node("a", "z1"));
        c.upsert_node(&node("b", "z1"));
        c.upsert_node(&node("c", "z2"));
        c
    }

    fn place(c: &mut Cache, name: &str, on: &str, p: &Pod) {
        c.add_pod(Key::new("default", name), on, PodReq::of(p));
    }

    /// The filter verdict per node, in node order a, b, c.
    fn verdicts(c: &Cache, p: &Pod) -> Vec<Option<Reason>> {
        let req = PodReq::of(p);
        let st = PreState::compute(c, &req);
        ["a", "b", "c"]
            .iter()
            .map(|n| {
                let node = c.nodes.iter().find(|x| x.name == *n).expect("node");
                st.filter(node, &req)
            })
            .collect()
    }

    fn anti(key: &str) -> serde_json::Value {
        json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": key}]}}})
    }

    #[test]
    fn anti_affinity_by_host_and_by_zone() {
        let mut c = cache();
        let web = pod("w0", json!({"app": "web"}), anti("kubernetes.io/hostname"));
        place(&mut c, "w0", "a", &web);
        let next = pod("w1", json!({"app": "web"}), anti("kubernetes.io/hostname"));
        assert_eq!(
            verdicts(&c, &next),
            [Some(Reason::PodAntiAffinity), None, None]
        );
        let zonal = pod("w2", json!({"app": "web"}), anti("zone"));
        assert_eq!(
            verdicts(&c, &zonal),
            [
                Some(Reason::PodAntiAffinity),
                Some(Reason::PodAntiAffinity),
                None
            ]
        );
        // Pods in another namespace are not matched by default.
        let elsewhere: Pod = serde_json::from_value(json!({
            "metadata": {"name": "o", "namespace": "other", "labels": {"app": "web"}},
            "spec": {"containers": [], "affinity": anti("zone")["affinity"]},
        }))
        .expect("pod");
        let st = PreState::compute(&c, &PodReq::of(&elsewhere));
        assert!(st.anti.iter().all(HashSet::is_empty));
    }

    #[test]
    fn existing_pods_anti_affinity_is_symmetric() {
        let mut c = cache();
        // A pod on c refuses any app=web pod in its zone.
        let guard = pod("g", json!({"app": "guard"}), anti("zone"));
        place(&mut c, "g", "c", &guard);
        let plain = pod("w", json!({"app": "web"}), json!({}));
        assert_eq!(
            verdicts(&c, &plain),
            [None, None, Some(Reason::ExistingAntiAffinity)]
        );
        let unrelated = pod("u", json!({"app": "db"}), json!({}));
        assert_eq!(verdicts(&c, &unrelated), [None, None, None]);
        c.remove_pod(&Key::new("default", "g"));
        assert_eq!(verdicts(&c, &plain), [None, None, None]);
    }

    #[test]
    fn pod_affinity_follows_matching_pods_and_lets_the_first_in() {
        let mut c = cache();
        let aff = json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "zone"}]}}});
        // Nothing matches yet and the pod does not match itself: nowhere.
        let web = pod("w", json!({"app": "web"}), aff.clone());
        assert_eq!(verdicts(&c, &web), vec![Some(Reason::PodAffinity); 3]);
        // The first of a self-affine group may go anywhere.
        let first = pod("c0", json!({"app": "cache"}), aff.clone());
        assert_eq!(verdicts(&c, &first), [None, None, None]);
        place(&mut c, "c0", "c", &first);
        assert_eq!(
            verdicts(&c, &web),
            [Some(Reason::PodAffinity), Some(Reason::PodAffinity), None]
        );
    }

    fn spread(when: &str) -> serde_json::Value {
        json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone",
            "whenUnsatisfiable": when, "labelSelector": {"matchLabels": {"app": "web"}}}]})
    }

    #[test]
    fn hard_spread_keeps_skew_within_bounds() {
        let mut c = cache();
        let p = |n: &str| pod(n, json!({"app": "web"}), spread("DoNotSchedule"));
        place(&mut c, "w0", "a", &p("w0"));
        // z1 has 1, z2 has 0: another in z1 would make the skew 2.
        assert_eq!(
            verdicts(&c, &p("w1")),
            [Some(Reason::Spread), Some(Reason::Spread), None]
        );
        place(&mut c, "w1", "c", &p("w1"));
        assert_eq!(verdicts(&c, &p("w2")), [None, None, None]);
        // A node without the key cannot be placed on while the constraint holds.
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "d"}})).expect("node");
        c.upsert_node(&bare);
        let req = PodReq::of(&p("w2"));
        let st = PreState::compute(&c, &req);
        let d = c.nodes.iter().find(|n| n.name == "d").expect("d");
        assert_eq!(st.filter(d, &req), Some(Reason::SpreadMissingLabel));
        // Nodes the pod's nodeSelector excludes do not count as domains.
        let mut sel = spread("DoNotSchedule");
        sel["nodeSelector"] = json!({"zone": "z1"});
        let c2 = {
            let mut c2 = cache();
            place(&mut c2, "w0", "a", &p("w0"));
            c2
        };
        let only_z1 = pod("w3", json!({"app": "web"}), sel);
        assert_eq!(verdicts(&c2, &only_z1), [None, None, None]);
    }

    #[test]
    fn soft_spread_prefers_emptier_domains() {
        let mut c = cache();
        let p = |n: &str| pod(n, json!({"app": "web"}), spread("ScheduleAnyway"));
        place(&mut c, "w0", "a", &p("w0"));
        let req = PodReq::of(&p("w1"));
        let st = PreState::compute(&c, &req);
        let raw: Vec<Option<f64>> = c.nodes.iter().map(|n| st.spread_raw(n, &req)).collect();
        assert!(c.nodes.iter().all(|n| st.filter(n, &req).is_none()));
        let by = |name: &str| raw[c.nodes.iter().position(|n| n.name == name).expect("n")];
        assert!(by("c") < by("a") && by("a") == by("b"), "{raw:?}");
    }
}
