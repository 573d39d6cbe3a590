//! What a DaemonSet needs done, decided from a snapshot without I/O: which nodes get a new
//! pod and which pods go (failed, surplus, on nodes the DaemonSet no longer fits, or old
//! ones replaced within `maxUnavailable` during a rolling update), and the status counts.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;

use super::placement::Fit;
use crate::util;

/// The label holding the hash of the template a daemon pod was made from.
pub const HASH_LABEL: &str = "controller-revision-hash";

/// One node and the daemon pods on it (or pinned to it), terminating ones included.
pub(crate) struct NodePods<'a> {
    pub name: &'a str,
    pub fit: Fit,
    pub pods: Vec<&'a Pod>,
}

/// Pods to create (by node) and to delete (by name).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub create_on: Vec<String>,
    pub delete: BTreeSet<String>,
}

fn name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Whether a pod was made from the template with `hash`.
pub(crate) fn updated(p: &Pod, hash: &str) -> bool {
    p.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) == Some(&hash.to_owned())
}

fn oldest<'a>(pods: &[&'a Pod]) -> Option<&'a Pod> {
    pods.iter()
        .min_by_key(|p| (p.metadata.creation_timestamp.as_ref().map(|t| t.0), name(p)))
        .copied()
}

/// Keeps each node at one live pod where the DaemonSet fits and none where it must not run.
/// With `surge_hash` (a rolling update with `maxSurge`), a node may keep one old and one new
/// pod while the new one is not ready yet.
pub(crate) fn manage(nodes: &[NodePods<'_>], surge_hash: Option<&str>) -> Plan {
    let mut plan = Plan::default();
    for n in nodes {
        let running: Vec<&Pod> = n
            .pods
            .iter()
            .filter(|p| !util::terminating(**p))
            .copied()
            .collect();
        if n.fit.should_run && n.pods.is_empty() {
            plan.create_on.push(n.name.to_owned());
        } else if !n.fit.should_continue {
            plan.delete.extend(running.iter().map(|p| name(p)));
        } else {
            // A daemon pod that stopped is replaced (once it is gone).
            plan.delete.extend(
                running
                    .iter()
                    .filter(|p| util::pod_finished(p))
                    .map(|p| name(p)),
            );
            let live: Vec<&Pod> = running
                .into_iter()
                .filter(|p| !util::pod_finished(p))
                .collect();
            // A pod may stay where the DaemonSet no longer starts pods (a NoSchedule taint
            // came), but one not bound yet never will be: the scheduler keeps it off such a
            // node. It goes, rather than wait there as unschedulable (a taint that reached
            // this controller just after it made the pod).
            if !n.fit.should_run {
                plan.delete.extend(
                    live.iter()
                        .filter(|p| util::pod_node(p).is_none())
                        .map(|p| name(p)),
                );
            }
            if live.len() > 1 {
                plan.delete
                    .extend(surplus(&live, surge_hash).iter().map(|p| name(p)));
            }
        }
    }
    plan
}

/// The pods to remove from a node running more than one: all but the oldest, or with surge
/// all but the oldest new and the oldest old — and of those two the old one once the new one
/// is ready (or when it is not ready itself).
fn surplus<'a>(live: &[&'a Pod], surge_hash: Option<&str>) -> Vec<&'a Pod> {
    let mut sorted = live.to_vec();
    sorted.sort_by_key(|p| (p.metadata.creation_timestamp.as_ref().map(|t| t.0), name(p)));
    let Some(hash) = surge_hash else {
        return sorted.split_off(1);
    };
    let (mut new, mut old) = (None, None);
    let mut out = Vec::new();
    for p in sorted {
        let slot = if updated(p, hash) { &mut new } else { &mut old };
        match slot {
            None => *slot = Some(p),
            Some(_) => out.push(p),
        }
    }
    if let (Some(n), Some(o)) = (new, old)
        && (!util::pod_ready(o) || util::pod_ready(n))
    {
        out.push(o);
    }
    out
}

/// A rolling update with `maxSurge`: a new pod starts beside an old one (at once where the
/// old one is unavailable, otherwise on at most `max_surge` nodes at a time), and the old one
/// goes once the new one is available. Returns the pods to delete and the nodes to start a
/// new pod on.
pub(crate) fn surge(
    nodes: &[NodePods<'_>],
    hash: &str,
    max_surge: usize,
    min_ready: i64,
    now: jiff::Timestamp,
) -> (Vec<String>, Vec<String>) {
    let mut surging = 0;
    let (mut delete, mut allowed, mut candidates) = (Vec::new(), Vec::new(), Vec::new());
    for n in nodes.iter().filter(|n| !n.pods.is_empty()) {
        let live: Vec<&Pod> = n
            .pods
            .iter()
            .filter(|p| !util::terminating(**p))
            .copied()
            .collect();
        let (new, old): (Vec<&Pod>, Vec<&Pod>) = live.iter().partition(|p| updated(p, hash));
        if new.len() > 1 || old.len() > 1 {
            // `manage` trims this node first.
            surging += 1;
            continue;
        }
        match (new.first(), old.first()) {
            (_, None) => {}
            (None, Some(o)) if !util::pod_available(o, min_ready, now) => {
                if n.fit.should_run {
                    allowed.push(n.name.to_owned());
                } else {
                    delete.push(name(o));
                }
            }
            (None, Some(_)) => {
                if n.fit.should_run && surging < max_surge {
                    candidates.push(n.name.to_owned());
                }
            }
            (Some(p), Some(o)) => {
                if util::pod_available(p, min_ready, now) {
                    delete.push(name(o));
                } else {
                    surging += 1;
                }
            }
        }
    }
    candidates.truncate(max_surge.saturating_sub(surging));
    allowed.extend(candidates);
    (delete, allowed)
}

/// Old pods to delete now in a rolling update: unavailable old pods at once, available ones
/// only while fewer than `max_unavailable` nodes lack an available up-to-date pod (a node
/// that should run a pod and has none counts as lacking one).
pub(crate) fn roll(
    nodes: &[NodePods<'_>],
    hash: &str,
    max_unavailable: usize,
    min_ready: i64,
    now: jiff::Timestamp,
) -> Vec<String> {
    let mut unavailable = nodes
        .iter()
        .filter(|n| n.fit.should_run && n.pods.is_empty())
        .count();
    let mut replace_now = Vec::new();
    let mut candidates = Vec::new();
    for n in nodes.iter().filter(|n| !n.pods.is_empty()) {
        let live: Vec<&Pod> = n
            .pods
            .iter()
            .filter(|p| !util::terminating(**p))
            .copied()
            .collect();
        let (new, old): (Vec<&Pod>, Vec<&Pod>) = live.iter().partition(|p| updated(p, hash));
        if new.len() > 1 || old.len() > 1 {
            // `manage` trims this node first.
            unavailable += 1;
            continue;
        }
        match (new.first(), old.first()) {
            (None, None) | (Some(_), Some(_)) => unavailable += 1,
            (Some(p), None) => {
                if !util::pod_available(p, min_ready, now) {
                    unavailable += 1;
                }
            }
            (None, Some(p)) => {
                if !util::pod_available(p, min_ready, now) {
                    replace_now.push(name(p));
                } else if unavailable < max_unavailable {
                    candidates.push(name(p));
                }
            }
        }
    }
    let room = max_unavailable.saturating_sub(unavailable);
    candidates.truncate(room);
    replace_now.extend(candidates);
    replace_now
}

/// The counts of a DaemonSet's status.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub desired: i32,
    pub current: i32,
    pub misscheduled: i32,
    pub ready: i32,
    pub available: i32,
    pub updated: i32,
}

/// Status counts, looking at the oldest pod of each node, as Kubernetes does.
pub(crate) fn counts(
    nodes: &[NodePods<'_>],
    hash: &str,
    min_ready: i64,
    now: jiff::Timestamp,
) -> Counts {
    let mut c = Counts::default();
    for n in nodes {
        let pod = oldest(&n.pods);
        if !n.fit.should_run {
            if pod.is_some() {
                c.misscheduled += 1;
            }
            continue;
        }
        c.desired += 1;
        let Some(pod) = pod else {
            continue;
        };
        c.current += 1;
        if util::pod_ready(pod) {
            c.ready += 1;
            if util::pod_available(pod, min_ready, now) {
                c.available += 1;
            }
        }
        if updated(pod, hash) {
            c.updated += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RUN: Fit = Fit {
        should_run: true,
        should_continue: true,
    };

    fn pod(name: &str, hash: &str, ready: bool, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {HASH_LABEL: hash},
                "creationTimestamp": format!("2026-01-01T00:00:0{}Z", name.len() % 10)},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .expect("pod")
    }

    #[test]
    fn manage_creates_missing_and_removes_surplus_failed_and_unfit() {
        let (a, b, f, x) = (
            pod("a", "h", true, "Running"),
            pod("bb", "h", true, "Running"),
            pod("f", "h", false, "Failed"),
            pod("x", "h", true, "Running"),
        );
        let pending = pod("pending", "h", false, "Pending");
        let mut bound = pod("bound", "h", true, "Running");
        bound.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("tainted-bound".into()),
            ..Default::default()
        });
        let nodes = [
            NodePods {
                name: "empty",
                fit: RUN,
                pods: vec![],
            },
            NodePods {
                name: "two",
                fit: RUN,
                pods: vec![&b, &a],
            },
            NodePods {
                name: "failed",
                fit: RUN,
                pods: vec![&f],
            },
            NodePods {
                name: "evict",
                fit: Fit {
                    should_run: false,
                    should_continue: false,
                },
                pods: vec![&x],
            },
            NodePods {
                name: "tainted",
                fit: Fit {
                    should_run: false,
                    should_continue: true,
                },
                pods: vec![&pending],
            },
            NodePods {
                name: "tainted-bound",
                fit: Fit {
                    should_run: false,
                    should_continue: true,
                },
                pods: vec![&bound],
            },
        ];
        let plan = manage(&nodes, None);
        assert_eq!(plan.create_on, ["empty"]);
        // The unbound pod on the tainted node goes; the bound one stays.
        assert_eq!(
            plan.delete,
            ["bb", "f", "pending", "x"]
                .map(String::from)
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn rolling_update_respects_max_unavailable() {
        let now = jiff::Timestamp::now();
        let olds: Vec<Pod> = (0..4)
            .map(|i| pod(&format!("old{i}"), "v1", true, "Running"))
            .collect();
        let nodes: Vec<NodePods<'_>> = olds
            .iter()
            .map(|p| NodePods {
                name: "n",
                fit: RUN,
                pods: vec![p],
            })
            .collect();
        assert_eq!(roll(&nodes, "v2", 1, 0, now).len(), 1);
        assert_eq!(roll(&nodes, "v2", 2, 0, now).len(), 2);
        // One node is between pods (old one gone, new one not yet there): no more room.
        let mut busy = nodes;
        busy[0].pods.clear();
        let gone = pod("gone", "v1", true, "Running");
        let mut deleting = gone.clone();
        deleting.metadata.deletion_timestamp = Some(util::now());
        busy[0].pods.push(&deleting);
        assert!(roll(&busy, "v2", 1, 0, now).is_empty());
        // An old pod that is not available anyway is replaced at once.
        let sick = pod("sick", "v1", false, "Running");
        busy[1].pods = vec![&sick];
        assert_eq!(roll(&busy, "v2", 1, 0, now), ["sick"]);
        // A node waiting for its new pod counts as unavailable too.
        busy[0].pods.clear();
        busy[1].pods = vec![&olds[1]];
        assert!(roll(&busy, "v2", 1, 0, now).is_empty());
        assert_eq!(roll(&busy, "v2", 2, 0, now).len(), 1);
    }

    #[test]
    fn surge_starts_new_pods_beside_old_ones_then_retires_them() {
        let now = jiff::Timestamp::now();
        let olds: Vec<Pod> = (0..3)
            .map(|i| pod(&format!("old{i}"), "v1", true, "Running"))
            .collect();
        let mut nodes: Vec<NodePods<'_>> = ["a", "b", "c"]
            .iter()
            .zip(&olds)
            .map(|(n, p)| NodePods {
                name: n,
                fit: RUN,
                pods: vec![p],
            })
            .collect();
        assert_eq!(surge(&nodes, "v2", 1, 0, now), (vec![], vec!["a".into()]));
        // A new pod not yet ready beside the old one: no more surge room.
        let fresh = pod("new-a", "v2", false, "Running");
        nodes[0].pods.push(&fresh);
        assert_eq!(surge(&nodes, "v2", 1, 0, now), (vec![], vec![]));
        assert!(manage(&nodes, Some("v2")).delete.is_empty(), "both stay");
        // Ready: the old pod goes, and the next node may surge.
        let ready = pod("new-a", "v2", true, "Running");
        nodes[0].pods[1] = &ready;
        assert_eq!(
            surge(&nodes, "v2", 1, 0, now),
            (vec!["old0".into()], vec!["b".into()])
        );
        assert_eq!(
            manage(&nodes, Some("v2")).delete,
            ["old0".to_owned()].into_iter().collect()
        );
    }

    #[test]
    fn counts_follow_the_oldest_pod_per_node() {
        let now = jiff::Timestamp::now();
        let (a, b, c) = (
            pod("a", "v2", true, "Running"),
            pod("b", "v1", false, "Running"),
            pod("c", "v2", true, "Running"),
        );
        let nodes = [
            NodePods {
                name: "1",
                fit: RUN,
                pods: vec![&a],
            },
            NodePods {
                name: "2",
                fit: RUN,
                pods: vec![&b],
            },
            NodePods {
                name: "3",
                fit: RUN,
                pods: vec![],
            },
            NodePods {
                name: "4",
                fit: Fit {
                    should_run: false,
                    should_continue: true,
                },
                pods: vec![&c],
            },
        ];
        assert_eq!(
            counts(&nodes, "v2", 0, now),
            Counts {
                desired: 3,
                current: 2,
                misscheduled: 1,
                ready: 1,
                available: 1,
                updated: 1,
            }
        );
    }
}
