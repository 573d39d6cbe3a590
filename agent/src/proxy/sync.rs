//! The watch loop: Services and EndpointSlices from the API, into the service table.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Client, ResourceExt as _, runtime::watcher};

use super::{
    desired::{external, frontends, options},
    external::ExternalFrontends,
    health::HealthChecks,
    metrics::ServiceNames,
    nodes,
};
use crate::lb::{self, Algorithm, Frontend, ServiceTable, maps::KvMap};
use crate::svcwatch::{self, Change, Key, Relist, slice_key};
use keelson_ebpf_common::{Backend, BackendKey, ServiceEntry, ServiceKey};

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A watch ended for good.
    #[error("watching {what} ended")]
    WatchEnded {
        /// Services or EndpointSlices.
        what: &'static str,
    },
    /// Writing the load balancer's maps failed.
    #[error(transparent)]
    Lb(#[from] lb::Error),
}

/// How the proxy programs Services beyond what the API says.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Algorithm of Services without a `keelson.dev/lb-algorithm` annotation.
    pub default_algorithm: Algorithm,
    /// Filled with the Service of every programmed frontend, for the metrics endpoint.
    pub names: ServiceNames,
    /// Serve the health-check node ports of `externalTrafficPolicy: Local` LoadBalancers on
    /// this address (kube-proxy: `0.0.0.0`); `None`: not served.
    pub health_bind: Option<std::net::IpAddr>,
}

/// A Service, by namespace and name.
struct State<S, B, V> {
    table: ServiceTable<S, B, V>,
    settings: Settings,
    services: HashMap<Key, Service>,
    slices: HashMap<Key, HashMap<String, EndpointSlice>>,
    programmed: HashMap<Key, Vec<Frontend>>,
    external: ExternalFrontends<S, B, V>,
    health: Option<HealthChecks>,
    service_list: Relist<Key>,
    slice_list: Relist<(Key, String)>,
}

impl<S, B, V> State<S, B, V>
where
    S: KvMap<ServiceKey, ServiceEntry>,
    B: KvMap<BackendKey, Backend>,
    V: KvMap<u32, u32>,
{
    /// Both kinds listed at least once and neither relisting: changes may go to the maps.
    fn live(&self) -> bool {
        self.service_list.synced
            && self.slice_list.synced
            && self.service_list.seen.is_none()
            && self.slice_list.seen.is_none()
    }

    /// Writes one Service's frontends; only its own entries change.
    fn reconcile(&mut self, key: &Key) -> Result<(), lb::Error> {
        let (desired, desired_external, opts) = match self.services.get(key) {
            Some(svc) => {
                let slices: Vec<&EndpointSlice> = self
                    .slices
                    .get(key)
                    .map(|m| m.values().collect())
                    .unwrap_or_default();
                if let Some(health) = &mut self.health {
                    let node = self.external.node().name.as_deref();
                    health.reconcile(key, Some(svc), &slices, node);
                }
                (
                    frontends(svc, &slices),
                    Some(external(svc, &slices, self.external.node())),
                    options(svc, self.settings.default_algorithm),
                )
            }
            None => {
                if let Some(health) = &mut self.health {
                    health.reconcile(key, None, &[], None);
                }
                (Vec::new(), None, lb::ServiceOptions::default())
            }
        };
        let old_external = self.external.frontends_of(key);
        self.external
            .reconcile(&mut self.table, key, desired_external, opts)?;
        let new_external = self.external.frontends_of(key);
        for gone in old_external.difference(&new_external) {
            self.settings.names.remove(gone);
        }
        for frontend in &new_external {
            self.settings.names.set(*frontend, &key.0, &key.1);
        }
        let old = self.programmed.remove(key).unwrap_or_default();
        for (frontend, backends) in &desired {
            self.table.upsert_with(*frontend, backends, opts)?;
            self.settings.names.set(*frontend, &key.0, &key.1);
        }
        for gone in old.iter().filter(|f| !desired.iter().any(|(d, _)| d == *f)) {
            self.table.remove(*gone)?;
            self.settings.names.remove(gone);
        }
        if !desired.is_empty() {
            self.programmed
                .insert(key.clone(), desired.into_iter().map(|(f, _)| f).collect());
        }
        Ok(())
    }

    /// After a full list: every Service reconciled, and entries of Services that no longer
    /// exist (deleted while no agent ran) removed.
    fn reconcile_all(&mut self) -> Result<(), lb::Error> {
        let keys: HashSet<Key> = self
            .services
            .keys()
            .chain(self.programmed.keys())
            .chain(self.external.keys())
            .cloned()
            .collect();
        for key in &keys {
            self.reconcile(key)?;
        }
        let mut wanted: HashSet<Frontend> = self.programmed.values().flatten().copied().collect();
        wanted.extend(self.external.socket_frontends());
        for (frontend, _) in self.table.list()? {
            if !wanted.contains(&frontend) {
                self.table.remove(frontend)?;
                self.settings.names.remove(&frontend);
            }
        }
        self.external.prune()?;
        tracing::info!(
            services = self.programmed.len(),
            "load balancer in sync with the API"
        );
        Ok(())
    }

    /// Every Node's addresses changed: nodePorts on them are written again.
    fn on_node_ips(&mut self, ips: BTreeSet<Ipv4Addr>) -> Result<(), lb::Error> {
        if self.external.set_cluster_ips(ips) && self.live() {
            let keys: Vec<Key> = self.services.keys().cloned().collect();
            for key in &keys {
                self.reconcile(key)?;
            }
        }
        Ok(())
    }

    fn on_service(&mut self, event: watcher::Event<Service>) -> Result<(), lb::Error> {
        let key_of = |s: &Service| (s.namespace().unwrap_or_default(), s.name_any());
        match event {
            watcher::Event::Init => self.service_list.seen = Some(HashSet::new()),
            watcher::Event::InitApply(svc) => {
                let key = key_of(&svc);
                if let Some(seen) = &mut self.service_list.seen {
                    seen.insert(key.clone());
                }
                self.services.insert(key, svc);
            }
            watcher::Event::InitDone => {
                let seen = self.service_list.seen.take().unwrap_or_default();
                self.services.retain(|k, _| seen.contains(k));
                self.service_list.synced = true;
                if self.live() {
                    self.reconcile_all()?;
                }
            }
            watcher::Event::Apply(svc) => {
                let key = key_of(&svc);
                self.services.insert(key.clone(), svc);
                if self.live() {
                    self.reconcile(&key)?;
                }
            }
            watcher::Event::Delete(svc) => {
                let key = key_of(&svc);
                self.services.remove(&key);
                if self.live() {
                    self.reconcile(&key)?;
                }
            }
        }
        Ok(())
    }

    fn on_slice(&mut self, event: watcher::Event<EndpointSlice>) -> Result<(), lb::Error> {
        match event {
            watcher::Event::Init => self.slice_list.seen = Some(HashSet::new()),
            watcher::Event::InitApply(slice) => {
                if let Some((key, name)) = slice_key(&slice) {
                    if let Some(seen) = &mut self.slice_list.seen {
                        seen.insert((key.clone(), name.clone()));
                    }
                    self.slices.entry(key).or_default().insert(name, slice);
                }
            }
            watcher::Event::InitDone => {
                let seen = self.slice_list.seen.take().unwrap_or_default();
                for (key, by_name) in &mut self.slices {
                    by_name.retain(|name, _| seen.contains(&(key.clone(), name.clone())));
                }
                self.slices.retain(|_, by_name| !by_name.is_empty());
                self.slice_list.synced = true;
                if self.live() {
                    self.reconcile_all()?;
                }
            }
            watcher::Event::Apply(slice) => {
                if let Some((key, name)) = slice_key(&slice) {
                    self.slices
                        .entry(key.clone())
                        .or_default()
                        .insert(name, slice);
                    if self.live() {
                        self.reconcile(&key)?;
                    }
                }
            }
            watcher::Event::Delete(slice) => {
                if let Some((key, name)) = slice_key(&slice) {
                    if let Some(by_name) = self.slices.get_mut(&key) {
                        by_name.remove(&name);
                    }
                    if self.live() {
                        self.reconcile(&key)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Keeps `table` (and the `external` frontends: nodePorts, externalIPs) in step with the
/// cluster's Services and EndpointSlices until `shutdown`, with the default [`Settings`].
///
/// # Errors
/// A map write fails, or a watch ends for good.
pub async fn run<S, B, V>(
    client: Client,
    table: ServiceTable<S, B, V>,
    external: ExternalFrontends<S, B, V>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SyncError>
where
    S: KvMap<ServiceKey, ServiceEntry>,
    B: KvMap<BackendKey, Backend>,
    V: KvMap<u32, u32>,
{
    run_with(client, table, external, Settings::default(), shutdown).await
}

/// Keeps `table` (and the `external` frontends: nodePorts, externalIPs) in step with the
/// cluster's Services and EndpointSlices until `shutdown`.
/// Nothing is written until both have been listed, so a restarted agent never briefly
/// empties a Service whose endpoints it has not read yet.
///
/// # Errors
/// A map write fails, or a watch ends for good.
pub async fn run_with<S, B, V>(
    client: Client,
    table: ServiceTable<S, B, V>,
    external: ExternalFrontends<S, B, V>,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SyncError>
where
    S: KvMap<ServiceKey, ServiceEntry>,
    B: KvMap<BackendKey, Backend>,
    V: KvMap<u32, u32>,
{
    let mut changes = std::pin::pin!(svcwatch::changes(client.clone()));
    let mut node_ips = std::pin::pin!(nodes::addresses(client));
    let health = settings.health_bind.map(HealthChecks::new);
    let mut state = State {
        table,
        settings,
        health,
        services: HashMap::new(),
        slices: HashMap::new(),
        programmed: HashMap::new(),
        external,
        service_list: Relist::default(),
        slice_list: Relist::default(),
    };
    tokio::pin!(shutdown);
    loop {
        let change = tokio::select! {
            () = &mut shutdown => return Ok(()),
            change = changes.next() => change,
            Some(ips) = node_ips.next() => {
                state.on_node_ips(ips)?;
                continue;
            }
        };
        match change {
            None => {
                return Err(SyncError::WatchEnded {
                    what: "Services and EndpointSlices",
                });
            }
            // The watcher backs off and relists by itself; errors are only worth a log line.
            Some(Err(e)) => tracing::warn!(error = %e, "watch error; retrying"),
            Some(Ok(Change::Service(e))) => state.on_service(*e)?,
            Some(Ok(Change::Slice(e))) => state.on_slice(*e)?,
        }
    }
}
