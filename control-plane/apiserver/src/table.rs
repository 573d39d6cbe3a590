//! `Table` responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), so that
//! `kubectl get` prints the columns users know.

use serde_json::{Value, json};

use crate::resources::Resource;

/// One column: header, type, and whether only `-o wide` shows it (priority 1).
struct Column {
    name: &'static str,
    ty: &'static str,
    wide: bool,
    cell: fn(&Value) -> Value,
}

const fn col(name: &'static str, cell: fn(&Value) -> Value) -> Column {
    Column {
        name,
        ty: "string",
        wide: false,
        cell,
    }
}

const fn wide(name: &'static str, cell: fn(&Value) -> Value) -> Column {
    Column {
        name,
        ty: "string",
        wide: true,
        cell,
    }
}

fn s(v: Option<&Value>) -> Value {
    match v {
        Some(Value::String(s)) => json!(s),
        Some(Value::Number(n)) => json!(n.to_string()),
        Some(Value::Bool(b)) => json!(b.to_string()),
        _ => json!("<none>"),
    }
}

fn count(v: Option<&Value>) -> i64 {
    v.and_then(Value::as_i64).unwrap_or(0)
}

fn len(v: Option<&Value>) -> usize {
    v.and_then(Value::as_object).map_or(0, |m| m.len())
}

fn pod_ready(o: &Value) -> Value {
    let total = o
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |cs| {
            cs.iter()
                .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                .count()
        });
    json!(format!("{ready}/{total}"))
}

fn pod_status(o: &Value) -> Value {
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        return json!("Terminating");
    }
    // A waiting or terminated container's reason is what kubectl shows (CrashLoopBackOff…).
    let reason = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter().find_map(|c| {
                c.pointer("/state/waiting/reason")
                    .or_else(|| c.pointer("/state/terminated/reason"))
                    .and_then(Value::as_str)
            })
        });
    json!(
        reason
            .or_else(|| o.pointer("/status/reason").and_then(Value::as_str))
            .or_else(|| o.pointer("/status/phase").and_then(Value::as_str))
            .unwrap_or("Unknown")
    )
}

fn pod_restarts(o: &Value) -> Value {
    let n: i64 = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |cs| {
            cs.iter().map(|c| count(c.get("restartCount"))).sum()
        });
    json!(n)
}

fn service_ports(o: &Value) -> Value {
    let ports = o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let port = count(p.get("port"));
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty());
    json!(ports.unwrap_or_else(|| "<none>".into()))
}

fn node_status(o: &Value) -> Value {
    let ready = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .and_then(|c| c.get("status").and_then(Value::as_str));
    let mut status = match ready {
        Some("True") => "Ready".to_owned(),
        Some(_) => "NotReady".to_owned(),
        None => "Unknown".to_owned(),
    };
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    json!(status)
}

fn columns(r: &Resource) -> Vec<Column> {
    match (r.group, r.kind) {
        ("", "Pod") => vec![
            col("Ready", pod_ready),
            col("Status", pod_status),
            Column {
                ty: "integer",
                ..col("Restarts", pod_restarts)
            },
            wide("IP", |o| s(o.pointer("/status/podIP"))),
            wide("Node", |o| s(o.pointer("/spec/nodeName"))),
        ],
        ("", "Service") => vec![
            col("Type", |o| s(o.pointer("/spec/type"))),
            col("Cluster-IP", |o| s(o.pointer("/spec/clusterIP"))),
            col("External-IP", |o| {
                s(o.pointer("/spec/externalIPs/0")
                    .or_else(|| o.pointer("/status/loadBalancer/ingress/0/ip")))
            }),
            col("Port(s)", service_ports),
        ],
        ("", "Node") => vec![
            col("Status", node_status),
            col("Version", |o| {
                s(o.pointer("/status/nodeInfo/kubeletVersion"))
            }),
        ],
        ("", "Namespace") => vec![col("Status", |o| s(o.pointer("/status/phase")))],
        ("", "ConfigMap") => vec![Column {
            ty: "integer",
            ..col("Data", |o| {
                json!(len(o.get("data")) + len(o.get("binaryData")))
            })
        }],
        ("", "Secret") => vec![
            col("Type", |o| s(o.get("type"))),
            Column {
                ty: "integer",
                ..col("Data", |o| json!(len(o.get("data"))))
            },
        ],
        ("apps", "Deployment") => vec![
            col("Ready", |o| {
                json!(format!(
                    "{}/{}",
                    count(o.pointer("/status/readyReplicas")),
                    count(o.pointer("/spec/replicas"))
                ))
            }),
            Column {
                ty: "integer",
                ..col("Up-to-date", |o| {
                    json!(count(o.pointer("/status/updatedReplicas")))
                })
            },
            Column {
                ty: "integer",
                ..col("Available", |o| {
                    json!(count(o.pointer("/status/availableReplicas")))
                })
            },
        ],
        ("apps", "ReplicaSet") => vec![
            Column {
                ty: "integer",
                ..col("Desired", |o| json!(count(o.pointer("/spec/replicas"))))
            },
            Column {
                ty: "integer",
                ..col("Current", |o| json!(count(o.pointer("/status/replicas"))))
            },
            Column {
                ty: "integer",
                ..col("Ready", |o| {
                    json!(count(o.pointer("/status/readyReplicas")))
                })
            },
        ],
        ("provisioning.keelson.dev", "Machine") => vec![
            col("MAC", |o| {
                s(o.pointer("/spec/macs")
                    .and_then(Value::as_array)
                    .map(|m| {
                        json!(
                            m.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                    })
                    .filter(|m| m != "")
                    .as_ref())
            }),
            col("Profile", |o| s(o.pointer("/spec/profile"))),
            col("State", |o| s(o.pointer("/status/state"))),
            col("Node", |o| s(o.pointer("/status/nodeName"))),
            wide("IP", |o| s(o.pointer("/spec/ip"))),
        ],
        ("certificates.k8s.io", "CertificateSigningRequest") => vec![
            col("SignerName", |o| s(o.pointer("/spec/signerName"))),
            col("Requestor", |o| s(o.pointer("/spec/username"))),
            col("Condition", csr_condition),
        ],
        _ => Vec::new(),
    }
}

/// `Approved,Issued`, `Denied` or `Pending`, as kubectl prints a CSR's state.
fn csr_condition(o: &Value) -> Value {
    let mut parts: Vec<String> = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter(|c| c.get("status").and_then(Value::as_str) != Some("False"))
                .filter_map(|c| c.get("type").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if parts.is_empty() {
        parts.push("Pending".into());
    }
    if o.pointer("/status/certificate")
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty())
    {
        parts.push("Issued".into());
    }
    json!(parts.join(","))
}

/// Kubernetes' short human duration: `45s`, `3m12s`, `25m`, `5h3m`, `3d4h`, `120d`, `3y`.
pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    match () {
        _ if secs < 120 => format!("{secs}s"),
        _ if m < 10 => match secs % 60 {
            0 => format!("{m}m"),
            s => format!("{m}m{s}s"),
        },
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => match m % 60 {
            0 => format!("{h}h"),
            mm => format!("{h}h{mm}m"),
        },
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => match h % 24 {
            0 => format!("{d}d"),
            hh => format!("{d}d{hh}h"),
        },
        _ if d < 365 * 2 => format!("{d}d"),
        _ => format!("{}y", d / 365),
    }
}

fn age(o: &Value) -> Value {
    let created = o
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok());
    match created {
        Some(t) => json!(human_duration(
            jiff::Timestamp::now().as_second() - t.as_second()
        )),
        None => json!("<unknown>"),
    }
}

/// What a row carries as its `object` (`includeObject` query parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IncludeObject {
    /// Nothing.
    None,
    /// `PartialObjectMetadata` (the default).
    #[default]
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses the query parameter; unknown values mean the default.
    pub fn parse(v: Option<&str>) -> Self {
        match v {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// A `Table` of `objects`, with the list's metadata (resourceVersion, continue).
pub fn table(r: &Resource, objects: &[Value], list_meta: Value, include: IncludeObject) -> Value {
    let cols = columns(r);
    let mut defs = vec![
        json!({"name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace."}),
    ];
    for c in &cols {
        defs.push(json!({"name": c.name, "type": c.ty, "format": "", "priority": i32::from(c.wide), "description": ""}));
    }
    defs.push(json!({"name": "Age", "type": "string", "format": "", "priority": 0,
        "description": "CreationTimestamp is a timestamp representing the server time when this object was created."}));
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![s(o.pointer("/metadata/name"))];
            cells.extend(cols.iter().map(|c| (c.cell)(o)));
            cells.push(age(o));
            let object = match include {
                IncludeObject::None => Value::Null,
                IncludeObject::Object => o.clone(),
                IncludeObject::Metadata => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({})),
                }),
            };
            json!({"cells": cells, "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

/// Whether the client asked for a Table.
pub fn wants_table(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',')
            .next()
            .is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(25 * 60), "25m");
        assert_eq!(human_duration(5 * 3600 + 180), "5h3m");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600), "3d4h");
        assert_eq!(human_duration(120 * 86_400), "120d");
        assert_eq!(human_duration(3 * 366 * 86_400), "3y");
    }

    #[test]
    fn pod_rows_have_the_familiar_columns() {
        let pods = find("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.244.0.5", "containerStatuses": [
                {"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1}]}});
        let t = table(pods, &[pod], json!({}), IncludeObject::Metadata);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["Name", "Ready", "Status", "Restarts", "IP", "Node", "Age"]
        );
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], 3);
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert!(wants_table(Some(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        )));
        assert!(!wants_table(Some("application/json")));
    }
}
