//! Health-check node ports: a LoadBalancer Service with `externalTrafficPolicy: Local`
//! carries a `healthCheckNodePort`, on which every node answers whether it has endpoints of
//! the Service (200) or not (503), so that an external load balancer sends traffic only to
//! nodes that will not drop it — as kube-proxy does, with the same JSON body and
//! `X-Load-Balancing-Endpoint-Weight` header.
//!
//! One small HTTP server per port, answering any path; a Service's count of local endpoints
//! is updated in place without restarting its server.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tokio::task::JoinHandle;

use super::desired;
use crate::svcwatch::Key;

/// What one health-check port reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Health {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

struct Server {
    health: Arc<Mutex<Health>>,
    task: JoinHandle<()>,
}

/// The health-check servers of this node, one per Service that asks for one.
pub struct HealthChecks {
    bind: IpAddr,
    servers: HashMap<u16, Server>,
    ports: HashMap<Key, u16>,
}

/// The health-check node port a Service asks this proxy to serve, if any.
pub fn wanted_port(svc: &Service) -> Option<u16> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    u16::try_from(spec.health_check_node_port?)
        .ok()
        .filter(|p| *p != 0)
}

impl HealthChecks {
    /// Health-check servers listening on `bind` (kube-proxy: every address, `0.0.0.0`).
    pub fn new(bind: IpAddr) -> Self {
        HealthChecks {
            bind,
            servers: HashMap::new(),
            ports: HashMap::new(),
        }
    }

    /// Brings the Service `key`'s health check in line with `svc` (gone: `None`) and its
    /// slices; `node` is this node's name.
    pub fn reconcile(
        &mut self,
        key: &Key,
        svc: Option<&Service>,
        slices: &[&EndpointSlice],
        node: Option<&str>,
    ) {
        let port = svc.and_then(wanted_port);
        if let Some(old) = self.ports.get(key).copied()
            && Some(old) != port
        {
            self.ports.remove(key);
            self.stop(old);
        }
        let Some(port) = port else { return };
        let health = Health {
            namespace: key.0.clone(),
            name: key.1.clone(),
            local_endpoints: node.map_or(0, |n| desired::local_endpoints(slices, n)),
        };
        if let Some(server) = self.servers.get(&port) {
            *server.health.lock().unwrap_or_else(|e| e.into_inner()) = health;
            self.ports.insert(key.clone(), port);
            return;
        }
        match self.start(port, health) {
            Ok(server) => {
                self.servers.insert(port, server);
                self.ports.insert(key.clone(), port);
            }
            // Tried again on the Service's next change.
            Err(e) => tracing::warn!(
                service = %format!("{}/{}", key.0, key.1),
                port,
                error = %e,
                "cannot serve the health-check node port"
            ),
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.servers.keys().copied().collect();
        ports.sort_unstable();
        ports
    }

    fn start(&self, port: u16, health: Health) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(SocketAddr::new(self.bind, port))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let health = Arc::new(Mutex::new(health));
        let app = Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&health));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(port, error = %e, "health-check server stopped");
            }
        });
        tracing::info!(port, "serving a health-check node port");
        Ok(Server { health, task })
    }

    fn stop(&mut self, port: u16) {
        if let Some(server) = self.servers.remove(&port) {
            server.task.abort();
            tracing::info!(port, "health-check node port closed");
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

async fn answer(State(health): State<Arc<Mutex<Health>>>) -> Response {
    let h = health.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let body = serde_json::json!({
        "service": {"namespace": h.namespace, "name": h.name},
        "localEndpoints": h.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let code = if h.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (code, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(h.local_endpoints),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn service(policy: &str, port: u16) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                "healthCheckNodePort": port, "ports": [{"port": 80}]},
        }))
        .expect("service")
    }

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .expect("slice")
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    async fn get(port: u16) -> String {
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("response");
        text
    }

    #[tokio::test]
    async fn answers_by_the_count_of_local_ready_endpoints() {
        let port = free_port();
        let key: Key = ("default".into(), "web".into());
        let svc = service("Local", port);
        let mut checks = HealthChecks::new(IpAddr::V4(Ipv4Addr::LOCALHOST));

        let elsewhere = slice(json!([
            {"addresses": ["10.0.1.5"], "nodeName": "node-b", "conditions": {"ready": true}},
            {"addresses": ["10.0.0.6"], "nodeName": "node-a", "conditions": {"ready": false}},
        ]));
        checks.reconcile(&key, Some(&svc), &[&elsewhere], Some("node-a"));
        assert_eq!(checks.ports(), [port]);
        let text = get(port).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains(r#""localEndpoints":0"#), "{text}");
        assert!(
            text.contains(r#""name":"web","namespace":"default""#),
            "{text}"
        );

        let local = slice(json!([
            {"addresses": ["10.0.0.5"], "nodeName": "node-a", "conditions": {"ready": true}},
            {"addresses": ["10.0.0.7"], "nodeName": "node-a"},
            {"addresses": ["10.0.1.5"], "nodeName": "node-b", "conditions": {"ready": true}},
        ]));
        checks.reconcile(&key, Some(&svc), &[&local], Some("node-a"));
        let text = get(port).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains(r#""localEndpoints":2"#), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("x-load-balancing-endpoint-weight: 2"),
            "{text}"
        );

        // Policy back to Cluster: the port closes.
        checks.reconcile(
            &key,
            Some(&service("Cluster", port)),
            &[&local],
            Some("node-a"),
        );
        assert!(checks.ports().is_empty());
        let mut refused = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_err()
            {
                refused = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(refused, "the health-check port still accepts connections");
    }

    #[test]
    fn only_local_load_balancers_want_a_port() {
        assert_eq!(wanted_port(&service("Local", 31000)), Some(31000));
        assert_eq!(wanted_port(&service("Cluster", 31000)), None);
        let mut node_port = service("Local", 31000);
        node_port.spec.as_mut().expect("spec").type_ = Some("NodePort".into());
        assert_eq!(wanted_port(&node_port), None);
    }
}
