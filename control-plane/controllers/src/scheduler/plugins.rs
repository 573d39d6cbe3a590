//! Filter and score plugins. Filters say why a node cannot take a pod; scores rank the nodes
//! that can (higher is better, each plugin 0–100 before its weight). The plugins that look at
//! other pods by topology live in [`super::topology`], image locality in [`super::images`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};

use super::{
    cache::{NodeInfo, PodReq},
    topology::PreState,
};

/// Why a node was filtered out; the text is what Kubernetes prints.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Unschedulable,
    NodeName,
    Affinity,
    Taint(String, String),
    Cpu,
    Memory,
    Pods,
    Ports,
    Spread,
    SpreadMissingLabel,
    PodAffinity,
    PodAntiAffinity,
    ExistingAntiAffinity,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Unschedulable => f.write_str("node(s) were unschedulable"),
            Reason::NodeName => f.write_str("node(s) didn't match the requested node name"),
            Reason::Affinity => f.write_str("node(s) didn't match Pod's node affinity/selector"),
            Reason::Taint(k, v) => write!(f, "node(s) had untolerated taint {{{k}: {v}}}"),
            Reason::Cpu => f.write_str("Insufficient cpu"),
            Reason::Memory => f.write_str("Insufficient memory"),
            Reason::Pods => f.write_str("Too many pods"),
            Reason::Ports => {
                f.write_str("node(s) didn't have free ports for the requested pod ports")
            }
            Reason::Spread => f.write_str("node(s) didn't match pod topology spread constraints"),
            Reason::SpreadMissingLabel => f.write_str(
                "node(s) didn't match pod topology spread constraints (missing required label)",
            ),
            Reason::PodAffinity => f.write_str("node(s) didn't match pod affinity rules"),
            Reason::PodAntiAffinity => f.write_str("node(s) didn't match pod anti-affinity rules"),
            Reason::ExistingAntiAffinity => {
                f.write_str("node(s) didn't satisfy existing pods anti-affinity rules")
            }
        }
    }
}

/// Whether a toleration tolerates a taint.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = t.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    let key = t.key.as_deref().unwrap_or_default();
    match t.operator.as_deref().unwrap_or("Equal") {
        // An empty key with Exists tolerates everything.
        "Exists" => key.is_empty() || key == taint.key,
        _ => {
            key == taint.key
                && t.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
    }
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        op @ ("Gt" | "Lt") => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if op == "Gt" { v > bound } else { v < bound }
        }
        _ => false,
    }
}

/// Whether a node selector term matches a node (its expressions and fields all hold; an
/// empty term matches nothing, as in Kubernetes).
pub fn term_matches(
    term: &NodeSelectorTerm,
    labels: &BTreeMap<String, String>,
    name: &str,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| requirement_matches(r, (r.key == "metadata.name").then_some(name)))
}

/// Whether the node satisfies the pod's nodeSelector and required node affinity.
pub fn node_affinity_ok(node: &NodeInfo, pod: &PodReq) -> bool {
    let selector_ok = pod
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    selector_ok
        && pod.required.as_ref().is_none_or(|sel| {
            sel.node_selector_terms
                .iter()
                .any(|t| term_matches(t, &node.labels, &node.name))
        })
}

/// The first NoSchedule/NoExecute taint of the node the pod does not tolerate.
pub fn untolerated<'a>(node: &'a NodeInfo, pod: &PodReq) -> Option<&'a Taint> {
    node.taints.iter().find(|t| {
        matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
            && !pod.tolerations.iter().any(|tol| tolerates(tol, t))
    })
}

/// Runs every filter; the reasons a node cannot take the pod (empty: it can).
pub fn filter(node: &NodeInfo, pod: &PodReq, pre: &PreState, out: &mut Vec<Reason>) {
    if node.unschedulable
        && !pod.tolerations.iter().any(|t| {
            tolerates(
                t,
                &Taint {
                    key: "node.kubernetes.io/unschedulable".into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                },
            )
        })
    {
        out.push(Reason::Unschedulable);
        return;
    }
    if pod.node_name.as_ref().is_some_and(|n| *n != node.name) {
        out.push(Reason::NodeName);
        return;
    }
    if !node_affinity_ok(node, pod) {
        out.push(Reason::Affinity);
        return;
    }
    if let Some(t) = untolerated(node, pod) {
        out.push(Reason::Taint(
            t.key.clone(),
            t.value.clone().unwrap_or_default(),
        ));
        return;
    }
    if node.pods + 1 > node.alloc_pods {
        out.push(Reason::Pods);
    }
    if pod.cpu > 0 && node.cpu + pod.cpu > node.alloc_cpu {
        out.push(Reason::Cpu);
    }
    if pod.memory > 0 && node.memory + pod.memory > node.alloc_memory {
        out.push(Reason::Memory);
    }
    if !out.is_empty() {
        return;
    }
    if pod
        .ports
        .iter()
        .any(|p| node.ports.iter().any(|q| p.conflicts(q)))
    {
        out.push(Reason::Ports);
        return;
    }
    if let Some(r) = pre.filter(node, pod) {
        out.push(r);
    }
}

/// "0/3 nodes are available: 1 node(s) …, 2 Insufficient memory."
pub fn explain(nodes: usize, reasons: &BTreeMap<Reason, usize>) -> String {
    let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{nodes} nodes are available.")
    } else {
        format!("0/{nodes} nodes are available: {}.", parts.join(", "))
    }
}

/// Per-node raw scores that are normalized over all feasible nodes afterwards.
pub struct Raw {
    pub affinity: i64,
    /// Preferred inter-pod affinity (may be negative).
    pub pod_affinity: i64,
    pub same_owner: i64,
    /// Soft topology spread (lower is better; None: not scored on this node).
    pub spread: Option<f64>,
    /// Image locality, already 0–100.
    pub image: i64,
}

/// Soft topology spread normalized to 0–100 over the feasible nodes' raw scores (`min` and
/// `max` of those that were scored): the emptiest domains score highest, as in Kubernetes.
pub fn spread_score(raw: Option<f64>, min: f64, max: f64) -> i64 {
    match raw {
        None => 0,
        Some(_) if max <= 0.0 => 100,
        Some(s) => (100.0 * (max + min - s) / max) as i64,
    }
}

/// Scores that need no normalization: least allocated and balanced allocation, 0–100 each.
pub fn resource_scores(node: &NodeInfo, pod: &PodReq) -> (i64, i64) {
    let frac = |used: i64, cap: i64| -> f64 {
        if cap <= 0 {
            1.0
        } else {
            (used as f64 / cap as f64).min(1.0)
        }
    };
    let cpu = frac(node.score_cpu + pod.score_cpu, node.alloc_cpu);
    let mem = frac(node.score_memory + pod.score_memory, node.alloc_memory);
    let least = ((1.0 - cpu) * 50.0 + (1.0 - mem) * 50.0) as i64;
    let balanced = ((1.0 - (cpu - mem).abs()) * 100.0) as i64;
    (least, balanced)
}

/// Preferred node affinity weight, same-owner pod count and soft spread; `image` is the
/// node's image locality score.
pub fn raw_scores(node: &NodeInfo, pod: &PodReq, pre: &PreState, image: i64) -> Raw {
    let affinity = pod
        .preferred
        .iter()
        .filter(|p| term_matches(&p.preference, &node.labels, &node.name))
        .map(|p| i64::from(p.weight))
        .sum();
    let same_owner = pod
        .owner
        .as_ref()
        .and_then(|o| node.owners.get(o))
        .map_or(0, |n| i64::from(*n));
    Raw {
        affinity,
        pod_affinity: pre.preferred_raw(node),
        same_owner,
        spread: pre.spread_raw(node, pod),
        image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            time_added: None,
        }
    }

    #[test]
    fn tolerations_match_like_kubernetes() {
        let t = taint("dedicated", "gpu", "NoSchedule");
        let equal = Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("gpu".into()),
            ..Toleration::default()
        };
        assert!(tolerates(&equal, &t));
        let other = Toleration {
            value: Some("cpu".into()),
            ..equal.clone()
        };
        assert!(!tolerates(&other, &t));
        let exists_all = Toleration {
            operator: Some("Exists".into()),
            ..Toleration::default()
        };
        assert!(tolerates(&exists_all, &t));
        let wrong_effect = Toleration {
            effect: Some("NoExecute".into()),
            ..equal
        };
        assert!(!tolerates(&wrong_effect, &t));
    }

    #[test]
    fn soft_spread_normalizes_like_kubernetes() {
        assert_eq!(spread_score(None, 0.0, 4.0), 0);
        assert_eq!(spread_score(Some(0.0), 0.0, 0.0), 100);
        assert_eq!(spread_score(Some(0.0), 0.0, 4.0), 100);
        assert_eq!(spread_score(Some(4.0), 0.0, 4.0), 0);
        assert_eq!(spread_score(Some(4.0), 2.0, 4.0), 50);
    }

    #[test]
    fn filters_explain_why() {
        let node = NodeInfo {
            name: "n1".into(),
            present: true,
            alloc_cpu: 1000,
            alloc_memory: 1 << 30,
            alloc_pods: 110,
            memory: 900 << 20,
            taints: vec![],
            ..NodeInfo::default()
        };
        let pod = PodReq {
            memory: 200 << 20,
            ..PodReq::default()
        };
        let mut out = vec![];
        filter(&node, &pod, &PreState::default(), &mut out);
        assert_eq!(out, [Reason::Memory]);
        let tainted = NodeInfo {
            taints: vec![taint("k", "v", "NoSchedule")],
            ..node
        };
        out.clear();
        filter(&tainted, &PodReq::default(), &PreState::default(), &mut out);
        assert_eq!(out, [Reason::Taint("k".into(), "v".into())]);
        let mut reasons = BTreeMap::new();
        reasons.insert(Reason::Memory, 2);
        reasons.insert(Reason::Taint("k".into(), "v".into()), 1);
        assert_eq!(
            explain(3, &reasons),
            "0/3 nodes are available: 1 node(s) had untolerated taint {k: v}, 2 Insufficient memory."
        );
    }
}
