//! The legacy `v1` Endpoints controller, beside the EndpointSlice one: for each Service with
//! a selector, an Endpoints object of the same name listing the selected pods that have an
//! IP — ready pods under `addresses`, the others under `notReadyAddresses` (all ready with
//! `publishNotReadyAddresses`), pods being deleted left out unless that flag is set — with
//! named target ports resolved per pod and pods whose ports resolve alike in one subset.
//! Services without a selector are left alone: their users manage the Endpoints.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Result,
    endpointslice::resolve,
    error::ApiContext as _,
    informer::{Change, Informer},
    util::{self, Key},
    workqueue::WorkQueue,
};

/// Addresses per Endpoints object at most, as in Kubernetes; beyond it the list is cut and
/// annotated.
const MAX_ADDRESSES: usize = 1000;
/// The annotation on cut lists.
const OVER_CAPACITY: &str = "endpoints.kubernetes.io/over-capacity";
/// The label Kubernetes puts on the Endpoints of headless Services.
const HEADLESS: &str = "service.kubernetes.io/headless";

/// The Endpoints controller.
pub(crate) struct EndpointsController {
    client: Client,
    services: Store<Service>,
    pods: Store<Pod>,
    endpoints: Store<Endpoints>,
    queue: WorkQueue<Key>,
}

impl EndpointsController {
    /// Registers the controller's handlers.
    pub fn register(
        client: Client,
        services: &mut Informer<Service>,
        pods: &mut Informer<Pod>,
        endpoints: &mut Informer<Endpoints>,
    ) -> Arc<Self> {
        let queue = WorkQueue::new();
        let svc_store = services.store();
        services.queue_keys(&queue);
        // Label changes can move a pod out of a Service, so every Service in the pod's
        // namespace looks again.
        pods.queue_namespace_of(svc_store.clone(), &queue);
        {
            // Someone else changing our Endpoints: put them back.
            let queue = queue.clone();
            endpoints.on(move |c| {
                if let Change::Applied(e) | Change::Deleted(e) = c {
                    queue.add(Key::of(e));
                }
            });
        }
        Arc::new(EndpointsController {
            client,
            services: svc_store,
            pods: pods.store(),
            endpoints: endpoints.store(),
            queue,
        })
    }

    /// Reconciles until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        for ready in [
            crate::informer::ready(&self.services, &cancel).await,
            crate::informer::ready(&self.pods, &cancel).await,
            crate::informer::ready(&self.endpoints, &cancel).await,
        ] {
            if !ready {
                return;
            }
        }
        let this = Arc::clone(&self);
        self.queue
            .clone()
            .run(cancel, "endpoints", move |key| {
                let this = Arc::clone(&this);
                async move { this.reconcile(key).await }
            })
            .await;
    }

    async fn reconcile(&self, key: Key) -> Result<Option<Duration>> {
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), &key.ns);
        let existing = self
            .endpoints
            .get(&ObjectRef::new(&key.name).within(&key.ns));
        let Some(svc) = self
            .services
            .get(&ObjectRef::new(&key.name).within(&key.ns))
        else {
            // The Service is gone, and so go its Endpoints — once the API server confirms
            // it: the Service cache may lag behind the Endpoints cache.
            let services: Api<Service> = Api::namespaced(self.client.clone(), &key.ns);
            let gone = services
                .get_opt(&key.name)
                .await
                .ctx(|| format!("looking up service {key}"))?
                .is_none();
            if !gone {
                return Ok(Some(Duration::from_millis(200)));
            }
            if existing.is_some() {
                match api.delete(&key.name, &DeleteParams::default()).await {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => return Err(e).ctx(|| format!("deleting endpoints {key}")),
                }
            }
            return Ok(None);
        };
        let Some(selector) = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .filter(|s| !s.is_empty())
        else {
            return Ok(None);
        };
        let pods = self.pods.state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(key.ns.as_str())
                && util::map_selector_matches(&selector, p.metadata.labels.as_ref())
        });
        let desired = desired_endpoints(&svc, &pods);
        match existing {
            Some(e) if same(&e, &desired) => {}
            Some(e) => {
                let mut update = desired;
                update.metadata.resource_version = e.metadata.resource_version.clone();
                api.replace(&key.name, &PostParams::default(), &update)
                    .await
                    .ctx(|| format!("updating endpoints {key}"))?;
            }
            None => match api.create(&PostParams::default(), &desired).await {
                Ok(_) => {}
                // Made by someone else, or earlier and not in the cache yet: look again.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    return Ok(Some(Duration::from_millis(200)));
                }
                Err(e) => return Err(e).ctx(|| format!("creating endpoints {key}")),
            },
        }
        Ok(None)
    }
}

fn same(a: &Endpoints, b: &Endpoints) -> bool {
    let labels = |e: &Endpoints| e.metadata.labels.clone().unwrap_or_default();
    let cut = |e: &Endpoints| {
        e.metadata
            .annotations
            .as_ref()
            .and_then(|x| x.get(OVER_CAPACITY).cloned())
    };
    a.subsets.as_deref().unwrap_or_default() == b.subsets.as_deref().unwrap_or_default()
        && labels(a) == labels(b)
        && cut(a) == cut(b)
}

/// The Endpoints a Service with a selector should have, given the pods it selects.
pub fn desired_endpoints(svc: &Service, pods: &[Arc<Pod>]) -> Endpoints {
    let spec = svc.spec.clone().unwrap_or_default();
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let svc_ports = spec.ports.unwrap_or_default();
    // Resolved ports (as text, for grouping) → (ports, ready, not ready).
    type Group = (
        Vec<EndpointPort>,
        Vec<EndpointAddress>,
        Vec<EndpointAddress>,
    );
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for pod in pods {
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty())
        else {
            continue;
        };
        if util::pod_finished(pod) || (util::terminating(pod.as_ref()) && !publish_not_ready) {
            continue;
        }
        let mut ports: Vec<EndpointPort> = svc_ports
            .iter()
            .filter_map(|p| {
                Some(EndpointPort {
                    name: p.name.clone(),
                    port: resolve(p.target_port.as_ref(), p.port, pod)?,
                    protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                    app_protocol: p.app_protocol.clone(),
                })
            })
            .collect();
        // A pod none of whose ports resolve serves nothing (unless the Service has none).
        if ports.is_empty() && !(svc_ports.is_empty() && headless) {
            continue;
        }
        ports.sort_by(|a, b| a.name.cmp(&b.name));
        let pod_spec = pod.spec.as_ref();
        let hostname = pod_spec.and_then(|s| s.hostname.clone()).filter(|h| {
            !h.is_empty() && pod_spec.and_then(|s| s.subdomain.as_deref()) == Some(&svc_name)
        });
        let address = EndpointAddress {
            ip,
            hostname,
            node_name: util::pod_node(pod).map(str::to_owned),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                namespace: pod.metadata.namespace.clone(),
                uid: pod.metadata.uid.clone(),
                ..ObjectReference::default()
            }),
        };
        let tag = serde_json::to_string(&ports).unwrap_or_default();
        let group = groups
            .entry(tag)
            .or_insert_with(|| (ports, Vec::new(), Vec::new()));
        if publish_not_ready || util::pod_ready(pod) {
            group.1.push(address);
        } else {
            group.2.push(address);
        }
    }
    let mut left = MAX_ADDRESSES;
    let mut truncated = false;
    let subsets: Vec<EndpointSubset> = groups
        .into_values()
        .map(|(ports, mut ready, mut not_ready)| {
            ready.sort_by(|a, b| a.ip.cmp(&b.ip));
            not_ready.sort_by(|a, b| a.ip.cmp(&b.ip));
            for list in [&mut ready, &mut not_ready] {
                if list.len() > left {
                    list.truncate(left);
                    truncated = true;
                }
                left -= list.len();
            }
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: (!ports.is_empty()).then_some(ports),
            }
        })
        .filter(|s| s.addresses.is_some() || s.not_ready_addresses.is_some())
        .collect();
    let mut labels = svc.metadata.labels.clone().unwrap_or_default();
    if headless {
        labels.insert(HEADLESS.into(), String::new());
    }
    Endpoints {
        metadata: ObjectMeta {
            name: Some(svc_name),
            namespace: svc.metadata.namespace.clone(),
            labels: (!labels.is_empty()).then_some(labels),
            annotations: truncated
                .then(|| BTreeMap::from([(OVER_CAPACITY.to_owned(), "truncated".to_owned())])),
            ..ObjectMeta::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str, port: i32, ready: bool, deleting: bool) -> Arc<Pod> {
        let mut v = json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c",
                "ports": [{"name": "web", "containerPort": port}]}]},
            "status": {"podIP": ip, "conditions": [
                {"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        });
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Arc::new(serde_json::from_value(v).expect("pod"))
    }

    #[test]
    fn ready_and_not_ready_addresses_grouped_by_resolved_ports() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "labels": {"team": "a"}},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "web"}]},
        }))
        .expect("service");
        let pods = vec![
            pod("b", "10.0.0.3", 8080, false, false),
            pod("a", "10.0.0.2", 8080, true, false),
            pod("c", "10.0.0.4", 9090, true, false),
            pod("gone", "10.0.0.5", 8080, true, true),
        ];
        let ep = desired_endpoints(&svc, &pods);
        assert_eq!(
            ep.metadata.labels.as_ref().and_then(|l| l.get("team")),
            Some(&"a".to_owned())
        );
        let subsets = ep.subsets.expect("subsets");
        assert_eq!(subsets.len(), 2);
        let at = |port: i32| {
            subsets
                .iter()
                .find(|s| s.ports.as_ref().is_some_and(|p| p[0].port == port))
                .expect("subset")
        };
        let s8080 = at(8080);
        let ips = |a: &Option<Vec<EndpointAddress>>| -> Vec<String> {
            a.iter().flatten().map(|a| a.ip.clone()).collect()
        };
        assert_eq!(ips(&s8080.addresses), ["10.0.0.2"]);
        assert_eq!(ips(&s8080.not_ready_addresses), ["10.0.0.3"]);
        assert_eq!(
            s8080.ports.as_ref().and_then(|p| p[0].name.as_deref()),
            Some("http")
        );
        assert_eq!(ips(&at(9090).addresses), ["10.0.0.4"]);
        // publishNotReadyAddresses: everything ready, the terminating pod included.
        let mut publish = svc.clone();
        if let Some(s) = publish.spec.as_mut() {
            s.publish_not_ready_addresses = Some(true);
        }
        let all = desired_endpoints(&publish, &pods).subsets.expect("subsets");
        let ready: usize = all
            .iter()
            .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
            .sum();
        assert_eq!(ready, 4);
    }
}
