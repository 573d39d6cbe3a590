//! Which nodes a DaemonSet runs on, and how its pods are pinned there: the template's node
//! name, node selector and required node affinity must match, and its tolerations (plus the
//! ones Kubernetes adds to every daemon pod) must tolerate the node's taints — an untolerated
//! NoSchedule taint keeps new pods off but lets a running one stay, NoExecute evicts it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodSpec, Taint, Toleration,
};

use crate::scheduler::plugins::{term_matches, tolerates};

/// Whether a daemon pod belongs on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fit {
    /// A pod should be created there if none is.
    pub should_run: bool,
    /// A pod already there may stay.
    pub should_continue: bool,
}

fn toleration(key: &str, effect: &str) -> Toleration {
    Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Toleration::default()
    }
}

/// The tolerations Kubernetes adds to every daemon pod (so that node problems neither evict
/// it nor keep it off a cordoned node), where the template does not already have them.
pub(crate) fn add_default_tolerations(spec: &mut PodSpec) {
    let mut wanted = vec![
        toleration("node.kubernetes.io/not-ready", "NoExecute"),
        toleration("node.kubernetes.io/unreachable", "NoExecute"),
        toleration("node.kubernetes.io/disk-pressure", "NoSchedule"),
        toleration("node.kubernetes.io/memory-pressure", "NoSchedule"),
        toleration("node.kubernetes.io/pid-pressure", "NoSchedule"),
        toleration("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if spec.host_network == Some(true) {
        wanted.push(toleration(
            "node.kubernetes.io/network-unavailable",
            "NoSchedule",
        ));
    }
    let have = spec.tolerations.get_or_insert_with(Vec::new);
    for t in wanted {
        let same = |h: &Toleration| {
            h.key == t.key && h.effect == t.effect && h.operator.as_deref() == Some("Exists")
        };
        if !have.iter().any(same) {
            have.push(t);
        }
    }
}

/// Replaces the required node affinity with one term selecting exactly `node` by name, as
/// Kubernetes does, so the scheduler binds the pod there and nowhere else.
pub(crate) fn pin_to_node(spec: &mut PodSpec, node: &str) {
    let term = NodeSelectorTerm {
        match_fields: Some(vec![NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![node.into()]),
        }]),
        match_expressions: None,
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    node_affinity.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![term],
    });
}

/// The node a daemon pod is for: its bound node, or the one its affinity pins it to.
pub(crate) fn target_node(pod: &Pod) -> Option<&str> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        return Some(n);
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|r| r.key == "metadata.name" && r.operator == "In")
        .and_then(|r| r.values.as_ref()?.first())
        .map(String::as_str)
}

/// Whether a daemon pod with `spec` (the template with default tolerations) belongs on
/// `node`.
pub(crate) fn fit(spec: &PodSpec, node: &Node) -> Fit {
    let no = Fit {
        should_run: false,
        should_continue: false,
    };
    let name = node.metadata.name.as_deref().unwrap_or_default();
    if spec
        .node_name
        .as_deref()
        .is_some_and(|n| !n.is_empty() && n != name)
    {
        return no;
    }
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let affinity_ok = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_none_or(|sel| {
            sel.node_selector_terms
                .iter()
                .any(|t| term_matches(t, labels, name))
        });
    if !selector_ok || !affinity_ok {
        return no;
    }
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    let untolerated = |effects: &[&str]| {
        node.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .any(|t: &Taint| {
                effects.contains(&t.effect.as_str())
                    && !tolerations.iter().any(|tol| tolerates(tol, t))
            })
    };
    Fit {
        should_run: !untolerated(&["NoSchedule", "NoExecute"]),
        should_continue: !untolerated(&["NoExecute"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(labels: serde_json::Value, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": labels},
            "spec": {"taints": taints},
        }))
        .expect("node")
    }

    fn spec(v: serde_json::Value) -> PodSpec {
        let mut s: PodSpec = serde_json::from_value(v).expect("spec");
        add_default_tolerations(&mut s);
        s
    }

    #[test]
    fn selectors_affinity_and_taints_decide() {
        let plain = spec(json!({"containers": []}));
        let n = node(json!({"disk": "ssd"}), json!([]));
        assert!(fit(&plain, &n).should_run);
        let ssd = spec(json!({"containers": [], "nodeSelector": {"disk": "hdd"}}));
        assert_eq!(
            fit(&ssd, &n),
            Fit {
                should_run: false,
                should_continue: false
            }
        );
        let affinity = spec(json!({"containers": [], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}}}));
        assert!(fit(&affinity, &n).should_run);
        // NoSchedule keeps new pods off but lets a running one stay; NoExecute evicts.
        let no_schedule = node(
            json!({}),
            json!([{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]),
        );
        assert_eq!(
            fit(&plain, &no_schedule),
            Fit {
                should_run: false,
                should_continue: true
            }
        );
        let no_execute = node(
            json!({}),
            json!([{"key": "dedicated", "value": "x", "effect": "NoExecute"}]),
        );
        assert!(!fit(&plain, &no_execute).should_continue);
        let tolerant = spec(json!({"containers": [], "tolerations": [
            {"key": "dedicated", "operator": "Exists"}]}));
        assert!(fit(&tolerant, &no_execute).should_run);
    }

    #[test]
    fn default_tolerations_cover_node_problems_and_cordons() {
        let plain = spec(json!({"containers": []}));
        for (key, effect) in [
            ("node.kubernetes.io/unreachable", "NoExecute"),
            ("node.kubernetes.io/not-ready", "NoExecute"),
            ("node.kubernetes.io/unschedulable", "NoSchedule"),
            ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ] {
            let n = node(json!({}), json!([{"key": key, "effect": effect}]));
            assert!(fit(&plain, &n).should_run, "{key}:{effect}");
        }
        // Not tolerated by default: a not-ready node takes no new daemon pods.
        let n = node(
            json!({}),
            json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]),
        );
        assert_eq!(
            fit(&plain, &n),
            Fit {
                should_run: false,
                should_continue: true
            }
        );
        let mut twice = plain.clone();
        add_default_tolerations(&mut twice);
        assert_eq!(twice.tolerations, plain.tolerations, "added once");
    }

    #[test]
    fn pods_are_pinned_by_name_and_found_again() {
        let mut s = spec(json!({"containers": [], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}}}));
        pin_to_node(&mut s, "n7");
        let pod = Pod {
            spec: Some(s),
            ..Pod::default()
        };
        assert_eq!(target_node(&pod), Some("n7"));
        let terms = &pod
            .spec
            .as_ref()
            .and_then(|s| s.affinity.as_ref())
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("required")
            .node_selector_terms;
        assert_eq!(terms.len(), 1);
        assert!(terms[0].match_expressions.is_none());
    }
}
