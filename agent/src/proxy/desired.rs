//! What the load balancer should hold for one Service: its frontends (cluster IP, port,
//! protocol), for each the endpoints of its EndpointSlices that take new connections, and how
//! backends are chosen; and its external frontends (nodePorts on this node's addresses,
//! externalIPs) for the NodePort path.
//!
//! Endpoints that are ready and not terminating take new connections. When a port has none,
//! endpoints that are terminating but still serving do (as kube-proxy falls back to them), so
//! a Service whose pods are all shutting down keeps answering until they stop. Connections
//! already made are never moved: the socket load balancer chose their backend at connect time.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};
use kube::ResourceExt as _;

use crate::lb::{Algorithm, DEFAULT_AFFINITY_TIMEOUT_SECS, Frontend, Protocol, ServiceOptions};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Annotation choosing a Service's load-balancing algorithm: `random` or `maglev`.
pub const LB_ALGORITHM_ANNOTATION: &str = "keelson.dev/lb-algorithm";

/// How the backends of `svc` are chosen: its `keelson.dev/lb-algorithm` annotation, else
/// `default`; `sessionAffinity: ClientIP` with its timeout (Kubernetes' default 10800 s).
pub fn options(svc: &Service, default: Algorithm) -> ServiceOptions {
    let algorithm = match svc.annotations().get(LB_ALGORITHM_ANNOTATION) {
        None => default,
        Some(value) => value.parse().unwrap_or_else(|e| {
            tracing::warn!(service = %svc.name_any(), error = %e, "ignoring annotation");
            default
        }),
    };
    let spec = svc.spec.as_ref();
    let affinity = spec.and_then(|s| s.session_affinity.as_deref()) == Some("ClientIP");
    let timeout = spec
        .and_then(|s| s.session_affinity_config.as_ref())
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS);
    ServiceOptions {
        algorithm,
        affinity_timeout_secs: affinity.then_some(timeout),
    }
}

/// Ready and not terminating. An absent `ready` counts as ready, as in Kubernetes.
fn takes_new_connections(e: &Endpoint) -> bool {
    let c = e.conditions.as_ref();
    c.and_then(|c| c.ready) != Some(false) && c.and_then(|c| c.terminating) != Some(true)
}

/// How many distinct endpoints on `node` take new connections: what a health-check node
/// port reports.
pub fn local_endpoints(slices: &[&EndpointSlice], node: &str) -> usize {
    let mut addresses: Vec<&str> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.node_name.as_deref() == Some(node) && takes_new_connections(e))
        .flat_map(|e| e.addresses.iter().map(String::as_str))
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses.len()
}

/// Terminating but still serving: the fallback when nothing else is ready.
fn terminating_but_serving(e: &Endpoint) -> bool {
    let c = e.conditions.as_ref();
    c.and_then(|c| c.terminating) == Some(true) && c.and_then(|c| c.serving) == Some(true)
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// The frontends of `svc` with their ready backends, sorted. Headless Services, Services
/// without an IPv4 cluster IP and SCTP ports have none.
pub fn frontends(svc: &Service, slices: &[&EndpointSlice]) -> Vec<(Frontend, Vec<SocketAddrV4>)> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(proto) = protocol(port.protocol.as_deref()) else {
            continue;
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            continue;
        };
        let backends = ready_backends(port, proto, slices, None);
        out.push((
            Frontend {
                addr: ip,
                port: service_port,
                protocol: proto,
            },
            backends,
        ));
    }
    out.sort();
    out
}

/// The ready endpoints of `slices` for service port `port`, sorted; with `node`, only those
/// on that node (EndpointSlice `nodeName`).
fn ready_backends(
    port: &ServicePort,
    proto: Protocol,
    slices: &[&EndpointSlice],
    node: Option<&str>,
) -> Vec<SocketAddrV4> {
    let endpoints_of = |wanted: fn(&Endpoint) -> bool| -> Vec<SocketAddrV4> {
        slices
            .iter()
            .filter(|s| s.address_type == "IPv4")
            .flat_map(|slice| {
                // The slice's port for this service port: same name and protocol.
                let target = slice.ports.iter().flatten().find(|p| {
                    p.name == port.name && protocol(p.protocol.as_deref()) == Some(proto)
                });
                let target = target
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok());
                slice
                    .endpoints
                    .iter()
                    .filter(move |e| wanted(e))
                    .filter(move |e| node.is_none_or(|n| e.node_name.as_deref() == Some(n)))
                    .flat_map(|e| e.addresses.iter())
                    .filter_map(move |a| Some(SocketAddrV4::new(a.parse().ok()?, target?)))
            })
            .collect()
    };
    let mut backends = endpoints_of(takes_new_connections);
    if backends.is_empty() {
        backends = endpoints_of(terminating_but_serving);
    }
    backends.sort();
    backends.dedup();
    backends
}

/// The node a service proxy runs for: its name (to tell its own endpoints) and the
/// addresses on which it serves nodePorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddrs {
    /// The Node's name, as in EndpointSlice `nodeName`.
    pub name: Option<String>,
    /// Its addresses: nodePorts on them are served to traffic from outside too.
    pub ips: Vec<Ipv4Addr>,
    /// Every Node's addresses (from the API): nodePorts on them are balanced at the socket
    /// for this node and its pods.
    pub cluster_ips: BTreeSet<Ipv4Addr>,
}

/// A Service's frontends reachable from outside the cluster network: `<node IP>:<nodePort>`
/// and `<externalIP>:<port>` (and load-balancer ingress IPs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct External {
    /// For sockets of the node and its pods: every ready endpoint, whatever the traffic
    /// policy (as kube-proxy treats traffic from the node itself).
    pub socket: Vec<(Frontend, Vec<SocketAddrV4>)>,
    /// For packets arriving from outside: only this node's ready endpoints under
    /// `externalTrafficPolicy: Local`, every ready endpoint otherwise.
    pub packet: Vec<(Frontend, Vec<SocketAddrV4>)>,
    /// Ready endpoint addresses of the Service on this node.
    pub local: Vec<Ipv4Addr>,
}

/// The external frontends of `svc` on the node `node`.
pub fn external(svc: &Service, slices: &[&EndpointSlice], node: &NodeAddrs) -> External {
    let mut out = External::default();
    let Some(spec) = &svc.spec else {
        return out;
    };
    // A headless Service has no virtual address to expose either.
    if spec.cluster_ip.as_deref() == Some("None") {
        return out;
    }
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
    let mut extra: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let lb_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    extra.extend(
        lb_ips
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok()),
    );
    for port in spec.ports.iter().flatten() {
        let Some(proto) = protocol(port.protocol.as_deref()) else {
            continue;
        };
        let all = ready_backends(port, proto, slices, None);
        let local = match &node.name {
            Some(name) => ready_backends(port, proto, slices, Some(name)),
            None => Vec::new(),
        };
        let for_packets = if local_only { &local } else { &all };
        let mut add = |addr: Ipv4Addr, port: u16, from_outside: bool| {
            let frontend = Frontend {
                addr,
                port,
                protocol: proto,
            };
            out.socket.push((frontend, all.clone()));
            if from_outside {
                out.packet.push((frontend, for_packets.clone()));
            }
        };
        if let Some(node_port) = port
            .node_port
            .filter(|_| node_ports)
            .and_then(|p| u16::try_from(p).ok())
        {
            for ip in &node.ips {
                add(*ip, node_port, true);
            }
            for ip in node.cluster_ips.iter().filter(|ip| !node.ips.contains(ip)) {
                add(*ip, node_port, false);
            }
        }
        if let Ok(service_port) = u16::try_from(port.port) {
            for ip in &extra {
                add(*ip, service_port, true);
            }
        }
        out.local.extend(local.iter().map(|b| *b.ip()));
    }
    for list in [&mut out.socket, &mut out.packet] {
        list.sort();
        list.dedup_by(|a, b| a.0 == b.0);
    }
    out.local.sort();
    out.local.dedup();
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "sctp", "port": 9, "protocol": "SCTP"}]}
        }))
        .unwrap()
    }

    fn slice(name: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn ready_endpoints_become_backends_per_port() {
        let a = slice(
            "a",
            json!([
                {"addresses": ["10.244.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.244.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.244.0.4"]}
            ]),
        );
        let b = slice(
            "b",
            json!([{"addresses": ["10.244.1.2"], "conditions": {"ready": true}}]),
        );
        let got = frontends(&svc(), &[&a, &b]);
        let http: Frontend = "10.96.0.20:80/tcp".parse().unwrap();
        let dns: Frontend = "10.96.0.20:53/udp".parse().unwrap();
        let addrs = |l: &[&str]| {
            l.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<SocketAddrV4>>()
        };
        assert_eq!(
            got,
            vec![
                (
                    dns,
                    addrs(&["10.244.0.2:5353", "10.244.0.4:5353", "10.244.1.2:5353"])
                ),
                (
                    http,
                    addrs(&["10.244.0.2:8080", "10.244.0.4:8080", "10.244.1.2:8080"])
                ),
            ]
        );
    }

    fn node_port_svc(policy: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "type": "NodePort",
                     "externalTrafficPolicy": policy, "externalIPs": ["198.51.100.7"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
        }))
        .unwrap()
    }

    #[test]
    fn node_ports_and_external_ips_follow_the_traffic_policy() {
        let a = slice(
            "a",
            json!([
                {"addresses": ["10.244.0.2"], "nodeName": "n0"},
                {"addresses": ["10.244.0.3"], "nodeName": "n0", "conditions": {"ready": false}},
                {"addresses": ["10.244.1.2"], "nodeName": "n1"}
            ]),
        );
        let node = NodeAddrs {
            name: Some("n0".into()),
            ips: vec![
                "172.29.0.10".parse().unwrap(),
                "192.0.2.10".parse().unwrap(),
            ],
            cluster_ips: ["172.29.0.10".parse().unwrap()].into(),
        };
        let f = |s: &str| s.parse::<Frontend>().unwrap();
        let all: Vec<SocketAddrV4> = vec![
            "10.244.0.2:8080".parse().unwrap(),
            "10.244.1.2:8080".parse().unwrap(),
        ];
        let local: Vec<SocketAddrV4> = vec!["10.244.0.2:8080".parse().unwrap()];
        let fronts = [
            f("172.29.0.10:30080"),
            f("192.0.2.10:30080"),
            f("198.51.100.7:80"),
        ];

        let cluster = external(&node_port_svc("Cluster"), &[&a], &node);
        let expect_all: Vec<_> = fronts.iter().map(|f| (*f, all.clone())).collect();
        assert_eq!(cluster.socket, expect_all);
        assert_eq!(cluster.packet, expect_all);
        assert_eq!(
            cluster.local,
            vec!["10.244.0.2".parse::<Ipv4Addr>().unwrap()]
        );

        // Local: packets from outside go to this node's endpoints only; the node's own
        // sockets still reach every endpoint.
        let local_policy = external(&node_port_svc("Local"), &[&a], &node);
        assert_eq!(local_policy.socket, expect_all);
        let expect_local: Vec<_> = fronts.iter().map(|f| (*f, local.clone())).collect();
        assert_eq!(local_policy.packet, expect_local);

        // Another node's address: balanced at the socket only (its own tc path serves
        // traffic from outside).
        let mut with_other = node.clone();
        with_other
            .cluster_ips
            .insert("172.29.0.11".parse().unwrap());
        let got = external(&node_port_svc("Local"), &[&a], &with_other);
        assert!(got.socket.contains(&(f("172.29.0.11:30080"), all.clone())));
        assert_eq!(got.packet, expect_local);

        // A ClusterIP Service has no nodePort frontends, only its externalIPs.
        let mut plain = node_port_svc("Cluster");
        plain.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let got = external(&plain, &[&a], &node);
        assert_eq!(got.socket, vec![(f("198.51.100.7:80"), all.clone())]);
    }

    #[test]
    fn terminating_endpoints_get_no_new_connections_unless_nothing_else_serves() {
        let http: Frontend = "10.96.0.20:80/tcp".parse().unwrap();
        let backends = |endpoints| {
            let s = slice("a", endpoints);
            let got = frontends(&svc(), &[&s]);
            got.into_iter().find(|(f, _)| *f == http).unwrap().1
        };
        let terminating = json!({"addresses": ["10.244.0.3"],
            "conditions": {"ready": false, "serving": true, "terminating": true}});
        let stopped = json!({"addresses": ["10.244.0.4"],
            "conditions": {"ready": false, "serving": false, "terminating": true}});
        let ready = json!({"addresses": ["10.244.0.2"], "conditions": {"ready": true}});
        assert_eq!(
            backends(json!([ready, terminating, stopped])),
            vec!["10.244.0.2:8080".parse::<SocketAddrV4>().unwrap()]
        );
        // Only terminating endpoints left: the serving ones take connections.
        assert_eq!(
            backends(json!([terminating, stopped])),
            vec!["10.244.0.3:8080".parse::<SocketAddrV4>().unwrap()]
        );
        assert!(backends(json!([stopped])).is_empty());
    }

    #[test]
    fn options_come_from_affinity_and_the_annotation() {
        let mut s = svc();
        assert_eq!(options(&s, Algorithm::Random), ServiceOptions::default());
        assert_eq!(options(&s, Algorithm::Maglev).algorithm, Algorithm::Maglev);
        let spec = s.spec.as_mut().unwrap();
        spec.session_affinity = Some("ClientIP".into());
        assert_eq!(
            options(&s, Algorithm::Random).affinity_timeout_secs,
            Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
        );
        s = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default",
                         "annotations": {LB_ALGORITHM_ANNOTATION: "maglev"}},
            "spec": {"clusterIP": "10.96.0.20", "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}
        }))
        .unwrap();
        assert_eq!(
            options(&s, Algorithm::Random),
            ServiceOptions {
                algorithm: Algorithm::Maglev,
                affinity_timeout_secs: Some(60)
            }
        );
        // An unknown value falls back to the default.
        s.annotations_mut()
            .insert(LB_ALGORITHM_ANNOTATION.into(), "ring".into());
        assert_eq!(options(&s, Algorithm::Random).algorithm, Algorithm::Random);
    }

    #[test]
    fn headless_and_endpointless_services() {
        let mut headless = svc();
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert!(frontends(&headless, &[]).is_empty());
        // No slices: the frontends exist with no backends, so connects are refused.
        assert!(frontends(&svc(), &[]).iter().all(|(_, b)| b.is_empty()));
        assert_eq!(frontends(&svc(), &[]).len(), 2);
    }
}
