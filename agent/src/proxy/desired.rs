//! What the load balancer should hold for one Service: its frontends (cluster IP, port,
//! protocol) and, for each, the ready endpoints of its EndpointSlices.

use std::net::{Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::lb::{Frontend, Protocol};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
        let mut backends: Vec<SocketAddrV4> = slices
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
                    // An endpoint with no `ready` condition counts as ready, as in Kubernetes.
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                    .flat_map(|e| e.addresses.iter())
                    .filter_map(move |a| Some(SocketAddrV4::new(a.parse().ok()?, target?)))
            })
            .collect();
        backends.sort();
        backends.dedup();
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
