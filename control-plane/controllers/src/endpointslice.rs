//! The EndpointSlice controller: for each Service with a selector, slices listing the pods it
//! selects that have an IP, with `ready`/`serving`/`terminating` from the pod's `Ready`
//! condition and deletion, and the Service's ports resolved per pod (a named `targetPort`
//! through the pod's container ports). Pods whose ports resolve alike share slices; slices
//! are named after the Service and that port set, so reconciling is create-or-update.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Result,
    error::ApiContext as _,
    informer::{Change, Informer},
    util::{self, Key},
    workqueue::WorkQueue,
};

/// The label naming a slice's Service.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label naming a slice's manager.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Our value of [`MANAGED_BY`]; slices managed by anything else are left alone.
pub const MANAGER: &str = "endpointslice-controller.keelson.io";
/// Endpoints per slice.
const MAX_ENDPOINTS: usize = 100;

/// The EndpointSlice controller.
pub(crate) struct EndpointSlices {
    client: Client,
    services: Store<Service>,
    pods: Store<Pod>,
    slices: Store<EndpointSlice>,
    queue: WorkQueue<Key>,
}

impl EndpointSlices {
    /// Registers the controller's handlers.
    pub fn register(
        client: Client,
        services: &mut Informer<Service>,
        pods: &mut Informer<Pod>,
        slices: &mut Informer<EndpointSlice>,
    ) -> Arc<Self> {
        let queue = WorkQueue::new();
        let svc_store = services.store();
        services.queue_keys(&queue);
        // Label changes can move a pod out of a Service, so every Service in the pod's
        // namespace looks again.
        pods.queue_namespace_of(svc_store.clone(), &queue);
        {
            let queue = queue.clone();
            slices.on(move |c| {
                if let Change::Applied(s) | Change::Deleted(s) = c
                    && let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME))
                {
                    queue.add(Key::new(
                        s.metadata.namespace.as_deref().unwrap_or_default(),
                        svc,
                    ));
                }
            });
        }
        Arc::new(EndpointSlices {
            client,
            services: svc_store,
            pods: pods.store(),
            slices: slices.store(),
            queue,
        })
    }

    /// Reconciles until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        for ready in [
            crate::informer::ready(&self.services, &cancel).await,
            crate::informer::ready(&self.pods, &cancel).await,
            crate::informer::ready(&self.slices, &cancel).await,
        ] {
            if !ready {
                return;
            }
        }
        let this = Arc::clone(&self);
        self.queue
            .clone()
            .run(cancel, "endpointslice", move |key| {
                let this = Arc::clone(&this);
                async move { this.reconcile(key).await }
            })
            .await;
    }

    async fn reconcile(&self, key: Key) -> Result<Option<Duration>> {
        let ours: Vec<Arc<EndpointSlice>> = self.slices.state_filter(|s| {
            s.metadata.namespace.as_deref() == Some(key.ns.as_str())
                && s.metadata.labels.as_ref().is_some_and(|l| {
                    l.get(SERVICE_NAME) == Some(&key.name)
                        && l.get(MANAGED_BY).map(String::as_str) == Some(MANAGER)
                })
        });
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.ns);
        let svc = self
            .services
            .get(&ObjectRef::new(&key.name).within(&key.ns));
        let selector = svc
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.selector.clone())
            .filter(|s| !s.is_empty());
        let desired = match (&svc, selector) {
            (Some(svc), Some(sel)) => {
                let pods = self.pods.state_filter(|p| {
                    p.metadata.namespace.as_deref() == Some(key.ns.as_str())
                        && util::map_selector_matches(&sel, p.metadata.labels.as_ref())
                });
                desired_slices(svc, &pods)
            }
            _ => BTreeMap::new(),
        };
        for (name, slice) in &desired {
            match ours
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name.as_str()))
            {
                Some(existing) if same(existing, slice) => {}
                Some(existing) => {
                    let mut update = slice.clone();
                    update.metadata.resource_version = existing.metadata.resource_version.clone();
                    api.replace(name, &PostParams::default(), &update)
                        .await
                        .ctx(|| format!("updating endpointslice {}/{name}", key.ns))?;
                }
                None => match api.create(&PostParams::default(), slice).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        // Created earlier and not in the cache yet: look again shortly.
                        return Ok(Some(Duration::from_millis(200)));
                    }
                    Err(e) => {
                        return Err(e).ctx(|| format!("creating endpointslice {}/{name}", key.ns));
                    }
                },
            }
        }
        for s in &ours {
            let name = s.metadata.name.clone().unwrap_or_default();
            if !desired.contains_key(&name) {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => {
                        return Err(e).ctx(|| format!("deleting endpointslice {}/{name}", key.ns));
                    }
                }
            }
        }
        // A Service deleted while the cache was catching up may leave slices the cache does
        // not show: sweep by label.
        if svc.is_none() && ours.is_empty() {
            let lp = ListParams::default().labels(&format!(
                "{SERVICE_NAME}={},{MANAGED_BY}={MANAGER}",
                key.name
            ));
            if let Ok(list) = api.list(&lp).await {
                for s in list.items {
                    let _ = api
                        .delete(
                            s.metadata.name.as_deref().unwrap_or_default(),
                            &DeleteParams::default(),
                        )
                        .await;
                }
            }
        }
        Ok(None)
    }
}

fn same(a: &EndpointSlice, b: &EndpointSlice) -> bool {
    a.endpoints == b.endpoints
        && a.ports == b.ports
        && a.address_type == b.address_type
        && a.metadata.labels == b.metadata.labels
}

/// The port a Service port reaches on one pod, if it resolves.
pub(crate) fn resolve(target: Option<&IntOrString>, port: i32, pod: &Pod) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => match name.parse::<i32>() {
            Ok(p) => Some(p),
            Err(_) => pod
                .spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port),
        },
    }
}

/// Short stable suffix for a port set.
fn short_hash(s: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")[..5].to_owned()
}

/// The slices a Service should have, by name.
pub fn desired_slices(svc: &Service, pods: &[Arc<Pod>]) -> BTreeMap<String, EndpointSlice> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let svc_ports = spec.ports.unwrap_or_default();
    // (address type, resolved ports) → endpoints.
    let mut groups: BTreeMap<(String, String), (Vec<EndpointPort>, Vec<Endpoint>)> =
        BTreeMap::new();
    for pod in pods {
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty())
        else {
            continue;
        };
        if util::pod_finished(pod) {
            continue;
        }
        let mut ports = Vec::new();
        for p in &svc_ports {
            if let Some(port) = resolve(p.target_port.as_ref(), p.port, pod) {
                ports.push(EndpointPort {
                    name: p.name.clone(),
                    port: Some(port),
                    protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                    app_protocol: p.app_protocol.clone(),
                });
            }
        }
        let terminating = util::terminating(pod.as_ref());
        let ready = util::pod_ready(pod);
        let endpoint = Endpoint {
            addresses: vec![ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some((ready || publish_not_ready) && !terminating),
                serving: Some(ready || publish_not_ready),
                terminating: Some(terminating),
            }),
            node_name: util::pod_node(pod).map(str::to_owned),
            // A pod names itself in the Service's DNS when its subdomain is the Service.
            hostname: pod
                .spec
                .as_ref()
                .filter(|s| s.subdomain.as_deref() == Some(svc_name.as_str()))
                .and_then(|s| s.hostname.clone())
                .filter(|h| !h.is_empty()),
            target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                namespace: pod.metadata.namespace.clone(),
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Endpoint::default()
        };
        let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
        let tag = serde_json::to_string(&ports).unwrap_or_default();
        groups
            .entry((family.into(), tag))
            .or_insert_with(|| (ports, Vec::new()))
            .1
            .push(endpoint);
    }
    let mut out = BTreeMap::new();
    let prefix: String = svc_name.chars().take(40).collect();
    for ((family, ports_text), (ports, mut endpoints)) in groups {
        endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
        let tag = short_hash(&format!("{family}{ports_text}"));
        for (i, chunk) in endpoints.chunks(MAX_ENDPOINTS).enumerate() {
            let name = if i == 0 {
                format!("{prefix}-{tag}")
            } else {
                format!("{prefix}-{tag}-{i}")
            };
            let slice = EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(BTreeMap::from([
                        (SERVICE_NAME.to_owned(), svc_name.clone()),
                        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
                    ])),
                    owner_references: Some(vec![util::controller_ref(svc)]),
                    ..ObjectMeta::default()
                },
                address_type: family.clone(),
                endpoints: chunk.to_vec(),
                ports: Some(ports.clone()),
            };
            out.insert(name, slice);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    #[test]
    fn named_ports_resolve_per_pod_and_readiness_maps_to_conditions() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}]},
        }))
        .expect("service");
        let pod = |name: &str, ip: &str, port: i32, ready: bool, deleting: bool| {
            let mut v = json!({
                "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "ports": [{"name": "web", "containerPort": port}]}]},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            });
            if deleting {
                v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            Arc::new(serde_json::from_value::<Pod>(v).expect("pod"))
        };
        let pods = vec![
            pod("a", "10.244.0.2", 8080, true, false),
            pod("b", "10.244.0.3", 8080, false, false),
            pod("c", "10.244.0.4", 9090, true, true),
        ];
        let slices = desired_slices(&svc, &pods);
        assert_eq!(slices.len(), 2, "two port sets: 8080 and 9090");
        let by_port: HashMap<i32, &EndpointSlice> = slices
            .values()
            .map(|s| (s.ports.as_ref().and_then(|p| p[0].port).unwrap_or(0), s))
            .collect();
        let a = &by_port[&8080].endpoints;
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].conditions.as_ref().and_then(|c| c.ready), Some(true));
        assert_eq!(a[1].conditions.as_ref().and_then(|c| c.ready), Some(false));
        let c = &by_port[&9090].endpoints[0];
        let cond = c.conditions.as_ref().expect("conditions");
        assert_eq!(
            (cond.ready, cond.serving, cond.terminating),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(
            by_port[&8080]
                .ports
                .as_ref()
                .and_then(|p| p[0].name.clone())
                .as_deref(),
            Some("http")
        );
    }

    #[test]
    fn pods_in_the_services_subdomain_publish_their_hostname() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "default", "uid": "u1"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}},
        }))
        .expect("service");
        let pod = |name: &str, ip: &str, subdomain: &str| {
            Arc::new(
                serde_json::from_value::<Pod>(json!({
                    "metadata": {"name": name, "namespace": "default", "labels": {"app": "db"}},
                    "spec": {"hostname": name, "subdomain": subdomain,
                        "containers": [{"name": "c"}]},
                    "status": {"podIP": ip},
                }))
                .expect("pod"),
            )
        };
        let slices = desired_slices(
            &svc,
            &[
                pod("db-0", "10.244.0.2", "db"),
                pod("x", "10.244.0.3", "other"),
            ],
        );
        let hostnames: Vec<Option<String>> = slices
            .values()
            .flat_map(|s| s.endpoints.iter().map(|e| e.hostname.clone()))
            .collect();
        assert_eq!(hostnames, [Some("db-0".to_owned()), None]);
    }
}
