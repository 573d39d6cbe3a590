//! Feeds the zone from the API: Services and EndpointSlices through kube-rs watchers. Each
//! change recomputes only its Service's records; a (re)list prunes Services that are gone.

use std::collections::{HashMap, HashSet};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Client, ResourceExt as _, runtime::watcher};

use super::records::{self, ServiceKey, SharedZone};
use super::{DnsError, Result};
use crate::svcwatch::{self, Change, Relist, slice_key};

/// The Services and EndpointSlices read so far, and the zone they feed.
pub struct Feed {
    zone: SharedZone,
    services: HashMap<ServiceKey, Service>,
    slices: HashMap<ServiceKey, HashMap<String, EndpointSlice>>,
    service_list: Relist<ServiceKey>,
    slice_list: Relist<(ServiceKey, String)>,
}

fn service_key(svc: &Service) -> ServiceKey {
    (svc.namespace().unwrap_or_default(), svc.name_any())
}

impl Feed {
    /// A feed into `zone`.
    pub fn new(zone: SharedZone) -> Self {
        Feed {
            zone,
            services: HashMap::new(),
            slices: HashMap::new(),
            service_list: Relist::default(),
            slice_list: Relist::default(),
        }
    }

    /// Recomputes one Service's records.
    fn refresh(&self, key: &ServiceKey) {
        let mut zone = records::write(&self.zone);
        match self.services.get(key) {
            Some(svc) => {
                let slices: Vec<&EndpointSlice> = self
                    .slices
                    .get(key)
                    .map(|m| m.values().collect())
                    .unwrap_or_default();
                zone.set_service(svc, &slices);
            }
            None => zone.remove_service(key),
        }
    }

    /// After a list: Services gone while unwatched are removed, the rest refreshed.
    fn refresh_all(&self) {
        let keys: HashSet<ServiceKey> = self
            .services
            .keys()
            .cloned()
            .chain(records::read(&self.zone).service_keys())
            .collect();
        for key in &keys {
            self.refresh(key);
        }
        if self.service_list.synced && self.slice_list.synced {
            let mut zone = records::write(&self.zone);
            if !zone.is_synced() {
                tracing::info!(services = self.services.len(), "cluster DNS in sync");
            }
            zone.set_synced();
        }
    }

    /// Applies a Service event.
    pub fn on_service(&mut self, event: watcher::Event<Service>) {
        match event {
            watcher::Event::Init => self.service_list.seen = Some(HashSet::new()),
            watcher::Event::InitApply(svc) | watcher::Event::Apply(svc) => {
                let key = service_key(&svc);
                if let Some(seen) = &mut self.service_list.seen {
                    seen.insert(key.clone());
                }
                self.services.insert(key.clone(), svc);
                self.refresh(&key);
            }
            watcher::Event::InitDone => {
                let seen = self.service_list.seen.take().unwrap_or_default();
                self.services.retain(|k, _| seen.contains(k));
                self.service_list.synced = true;
                self.refresh_all();
            }
            watcher::Event::Delete(svc) => {
                let key = service_key(&svc);
                self.services.remove(&key);
                self.refresh(&key);
            }
        }
    }

    /// Applies an EndpointSlice event.
    pub fn on_slice(&mut self, event: watcher::Event<EndpointSlice>) {
        match event {
            watcher::Event::Init => self.slice_list.seen = Some(HashSet::new()),
            watcher::Event::InitApply(slice) | watcher::Event::Apply(slice) => {
                let Some((key, name)) = slice_key(&slice) else {
                    return;
                };
                if let Some(seen) = &mut self.slice_list.seen {
                    seen.insert((key.clone(), name.clone()));
                }
                self.slices
                    .entry(key.clone())
                    .or_default()
                    .insert(name, slice);
                self.refresh(&key);
            }
            watcher::Event::InitDone => {
                let seen = self.slice_list.seen.take().unwrap_or_default();
                for (key, by_name) in &mut self.slices {
                    by_name.retain(|name, _| seen.contains(&(key.clone(), name.clone())));
                }
                self.slices.retain(|_, by_name| !by_name.is_empty());
                self.slice_list.synced = true;
                self.refresh_all();
            }
            watcher::Event::Delete(slice) => {
                let Some((key, name)) = slice_key(&slice) else {
                    return;
                };
                if let Some(by_name) = self.slices.get_mut(&key) {
                    by_name.remove(&name);
                }
                self.refresh(&key);
            }
        }
    }
}

/// Keeps `zone` in step with the cluster's Services and EndpointSlices until `shutdown`.
///
/// # Errors
/// [`DnsError::WatchEnded`] when the watch stream ends for good.
pub async fn run(
    client: Client,
    zone: SharedZone,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mut changes = std::pin::pin!(svcwatch::changes(client));
    let mut feed = Feed::new(zone);
    tokio::pin!(shutdown);
    loop {
        let change = tokio::select! {
            () = &mut shutdown => return Ok(()),
            change = changes.next() => change,
        };
        match change {
            None => return Err(DnsError::WatchEnded),
            // The watcher backs off and relists by itself.
            Some(Err(e)) => tracing::warn!(error = %e, "DNS watch error; retrying"),
            Some(Ok(Change::Service(e))) => feed.on_service(*e),
            Some(Ok(Change::Slice(e))) => feed.on_slice(*e),
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::{Name, RecordType};
    use serde_json::json;

    use super::*;
    use crate::dns::records::{Lookup, Zone};
    use crate::proxy::desired::SERVICE_NAME_LABEL;

    fn svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}
        }))
        .expect("service")
    }

    fn slice(name: &str, svc: &str, ip: &str, ready: bool) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {SERVICE_NAME_LABEL: svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}],
        }))
        .expect("slice")
    }

    fn lookup(zone: &SharedZone, name: &str) -> Lookup {
        records::read(zone).lookup(&Name::from_ascii(name).expect("name"), RecordType::A)
    }

    #[test]
    fn follows_services_and_slices_and_prunes_on_relist() {
        let zone = Zone::shared("cluster.local").expect("zone");
        let mut feed = Feed::new(zone.clone());
        feed.on_service(watcher::Event::Init);
        feed.on_service(watcher::Event::InitApply(svc("web", "10.96.0.1")));
        feed.on_service(watcher::Event::InitApply(svc("db", "None")));
        feed.on_service(watcher::Event::InitDone);
        assert!(!records::read(&zone).is_synced(), "slices not listed yet");
        feed.on_slice(watcher::Event::Init);
        feed.on_slice(watcher::Event::InitApply(slice(
            "db-a",
            "db",
            "10.244.0.2",
            true,
        )));
        feed.on_slice(watcher::Event::InitDone);
        assert!(records::read(&zone).is_synced());
        assert!(matches!(
            lookup(&zone, "db.ns.svc.cluster.local."),
            Lookup::Found { .. }
        ));
        // Readiness goes, the answer goes.
        feed.on_slice(watcher::Event::Apply(slice(
            "db-a",
            "db",
            "10.244.0.2",
            false,
        )));
        assert_eq!(lookup(&zone, "db.ns.svc.cluster.local."), Lookup::NoData);
        feed.on_slice(watcher::Event::Apply(slice(
            "db-b",
            "db",
            "10.244.0.3",
            true,
        )));
        assert!(matches!(
            lookup(&zone, "10-244-0-3.db.ns.svc.cluster.local."),
            Lookup::Found { .. }
        ));
        // A relist without `web` (deleted while the watch was down) removes it.
        feed.on_service(watcher::Event::Init);
        feed.on_service(watcher::Event::InitApply(svc("db", "None")));
        feed.on_service(watcher::Event::InitDone);
        assert_eq!(lookup(&zone, "web.ns.svc.cluster.local."), Lookup::NxDomain);
        feed.on_service(watcher::Event::Delete(svc("db", "None")));
        assert_eq!(lookup(&zone, "db.ns.svc.cluster.local."), Lookup::NxDomain);
    }
}
