//! The service proxy's metrics endpoint: the load balancer's per-service counters, read from
//! the kernel at each scrape and served in the Prometheus text format (version 0.0.4) at
//! `/metrics`.
//!
//! Series, one per frontend and path, each labelled `namespace`, `service`, `address`,
//! `port`, `protocol` and `path` (`socket`: the cgroup programs balancing the node's and its
//! pods' connects; `tc`: the NodePort/externalIP programs for traffic from outside):
//! `keelson_lb_connections_total` (balanced connects and unconnected UDP sends; new flows on
//! the tc path), `keelson_lb_refused_total` (connects refused for lack of a ready backend),
//! `keelson_lb_affinity_hits_total` (connections kept on a client's backend by session
//! affinity), `keelson_lb_packets_total` (packets translated on the tc path, both directions)
//! and `keelson_lb_drops_total` (refused connects on the socket path; on the tc path packets
//! dropped for lack of a local endpoint or any backend, a free SNAT port or a route); plus
//! `keelson_lb_refused_unexposed_port_total`, connects refused because no service exposes the
//! port on a known service IP.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, RwLock},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::lb::{self, Frontend, Pins, ServiceInfo};

/// Which Service (namespace, name) each programmed frontend belongs to; written by the sync
/// loop, read at each scrape.
#[derive(Clone, Debug, Default)]
pub struct ServiceNames(Arc<RwLock<HashMap<Frontend, (String, String)>>>);

impl ServiceNames {
    pub(crate) fn set(&self, frontend: Frontend, namespace: &str, name: &str) {
        if let Ok(mut m) = self.0.write() {
            m.insert(frontend, (namespace.to_owned(), name.to_owned()));
        }
    }

    pub(crate) fn remove(&self, frontend: &Frontend) {
        if let Ok(mut m) = self.0.write() {
            m.remove(frontend);
        }
    }

    fn get(&self, frontend: &Frontend) -> (String, String) {
        self.0
            .read()
            .ok()
            .and_then(|m| m.get(frontend).cloned())
            .unwrap_or_default()
    }
}

/// What a scrape reads: every frontend of each path, and the unexposed-port refusals.
#[derive(Clone, Debug, Default)]
struct Snapshot {
    socket: Vec<ServiceInfo>,
    tc: Vec<ServiceInfo>,
    unexposed: u64,
}

/// Where a scrape reads the counters.
type Source = Box<dyn Fn() -> lb::Result<Snapshot> + Send + Sync>;

/// Reads the counters (from the pinned maps, in production) whenever the registry is encoded.
struct LbCollector {
    source: Source,
    names: ServiceNames,
}

impl std::fmt::Debug for LbCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbCollector").finish_non_exhaustive()
    }
}

/// Reads the counters of the load balancer pinned at `pins`.
fn pinned_source(pins: Pins) -> Source {
    Box::new(move || {
        let table = lb::open(&pins)?;
        let tc = if lb::tc_maps_pinned(&pins) {
            lb::open_tc(&pins)?.table.details()?
        } else {
            Vec::new()
        };
        Ok(Snapshot {
            socket: table.details()?,
            tc,
            unexposed: table.unexposed_refused()?,
        })
    })
}

type Labels = Vec<(&'static str, String)>;

impl LbCollector {
    fn labels(&self, info: &ServiceInfo, path: &str) -> Labels {
        let (namespace, service) = self.names.get(&info.frontend);
        vec![
            ("namespace", namespace),
            ("service", service),
            ("address", info.frontend.addr.to_string()),
            ("port", info.frontend.port.to_string()),
            ("protocol", info.frontend.protocol.to_string()),
            ("path", path.to_owned()),
        ]
    }
}

impl Collector for LbCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = match (self.source)() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the load balancer's maps");
                return Ok(());
            }
        };
        type Pick = fn(&keelson_ebpf_common::ServiceStats) -> u64;
        let series: [(&str, &str, Pick); 5] = [
            (
                "keelson_lb_connections",
                "Connections balanced to a backend (connects, unconnected UDP sends, new flows \
                 from outside)",
                |s| s.connections,
            ),
            (
                "keelson_lb_refused",
                "Connects refused because the service had no ready backend",
                |s| s.refused,
            ),
            (
                "keelson_lb_affinity_hits",
                "Connections sent to the client's previous backend by session affinity",
                |s| s.affinity_hits,
            ),
            (
                "keelson_lb_packets",
                "Packets translated for the service on the tc path (both directions)",
                |s| s.packets,
            ),
            (
                "keelson_lb_drops",
                "Traffic dropped for the service: refused connects; tc path packets without a \
                 (local) backend, SNAT port or route",
                |s| s.drops,
            ),
        ];
        let paths = [("socket", &snapshot.socket), ("tc", &snapshot.tc)];
        for (name, help, pick) in series {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (path, details) in paths {
                for info in details {
                    let value = info.stats.as_ref().map_or(0, pick);
                    let labels = self.labels(info, path);
                    ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        let metric = encoder.encode_descriptor(
            "keelson_lb_refused_unexposed_port",
            "Connects refused because no service exposes that port on a known service IP",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(snapshot.unexposed).encode(metric)?;
        Ok(())
    }
}

/// Serves `/metrics` on `listener` until `shutdown`.
///
/// # Errors
/// The server fails to accept connections.
pub async fn serve(
    listener: TcpListener,
    pins: Pins,
    names: ServiceNames,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(LbCollector {
        source: pinned_source(pins),
        names,
    }));
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(registry));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
        tracing::warn!(error = %e, "metrics: encoding failed");
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

#[cfg(test)]
mod tests {
    use keelson_ebpf_common::ServiceStats;

    use super::*;

    #[test]
    fn counters_are_labelled_with_their_service() {
        let web: Frontend = "10.96.0.10:80/tcp".parse().unwrap();
        let dns: Frontend = "10.96.0.53:53/udp".parse().unwrap();
        let names = ServiceNames::default();
        names.set(web, "default", "web");
        let info = |frontend, stats| ServiceInfo {
            frontend,
            backends: Vec::new(),
            options: lb::ServiceOptions::default(),
            stats,
        };
        let node_port: Frontend = "172.29.0.10:30080/tcp".parse().unwrap();
        names.set(node_port, "default", "web");
        let snapshot = Snapshot {
            socket: vec![
                info(
                    web,
                    Some(ServiceStats {
                        connections: 7,
                        refused: 2,
                        affinity_hits: 3,
                        packets: 0,
                        drops: 2,
                    }),
                ),
                // Programmed by hand (`lb set`): no Service name; counters not created yet.
                info(dns, None),
            ],
            tc: vec![info(
                node_port,
                Some(ServiceStats {
                    connections: 5,
                    refused: 0,
                    affinity_hits: 1,
                    packets: 40,
                    drops: 6,
                }),
            )],
            unexposed: 4,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(LbCollector {
            source: Box::new(move || Ok(snapshot.clone())),
            names,
        }));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let web_labels = r#"{namespace="default",service="web",address="10.96.0.10",port="80",protocol="tcp",path="socket"}"#;
        let dns_labels = r#"{namespace="",service="",address="10.96.0.53",port="53",protocol="udp",path="socket"}"#;
        let np_labels = r#"{namespace="default",service="web",address="172.29.0.10",port="30080",protocol="tcp",path="tc"}"#;
        for line in [
            format!("keelson_lb_connections_total{web_labels} 7"),
            format!("keelson_lb_refused_total{web_labels} 2"),
            format!("keelson_lb_affinity_hits_total{web_labels} 3"),
            format!("keelson_lb_drops_total{web_labels} 2"),
            format!("keelson_lb_connections_total{dns_labels} 0"),
            format!("keelson_lb_connections_total{np_labels} 5"),
            format!("keelson_lb_packets_total{np_labels} 40"),
            format!("keelson_lb_drops_total{np_labels} 6"),
            format!("keelson_lb_affinity_hits_total{np_labels} 1"),
            "keelson_lb_refused_unexposed_port_total 4".to_owned(),
            "# TYPE keelson_lb_connections_total counter".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }
}
