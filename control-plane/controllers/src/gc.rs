//! Garbage collection by owner references: a dependent whose owners are all gone is deleted
//! (background propagation: its own dependents follow in later sweeps); one that lost only
//! some owners has the dangling references removed. Owners being deleted with the `orphan`
//! finalizer have their dependents' references removed before the finalizer; with
//! `foregroundDeletion` their dependents are deleted first.
//!
//! The caches may lag, so before acting on a missing owner the collector asks the API server
//! whether it is really gone.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet},
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, Resource,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
        Preconditions,
    },
    runtime::reflector::Store,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    Options, Result,
    error::ApiContext as _,
    informer::{Change, Informer},
    util,
};

/// The garbage collector.
pub(crate) struct GarbageCollector {
    client: Client,
    pods: Store<Pod>,
    sets: Store<ReplicaSet>,
    deploys: Store<Deployment>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    trigger: Arc<Notify>,
    period: Duration,
}

fn cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Node" | "Namespace" | "PersistentVolume" | "ClusterRole" | "StorageClass"
    )
}

fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower == "endpoints" {
        lower
    } else if lower.ends_with('s') {
        format!("{lower}es")
    } else if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else {
        format!("{lower}s")
    }
}

fn watch_deletes<K>(inf: &mut Informer<K>, trigger: &Arc<Notify>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let trigger = Arc::clone(trigger);
    inf.on(move |c| {
        let owner_going = match c {
            Change::Deleted(_) | Change::Relisted => true,
            Change::Applied(o) => {
                util::terminating(o) && o.meta().finalizers.as_ref().is_some_and(|f| !f.is_empty())
            }
        };
        if owner_going {
            trigger.notify_one();
        }
    });
}

impl GarbageCollector {
    /// Registers the collector's handlers.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        client: Client,
        opts: &Options,
        pods: &mut Informer<Pod>,
        sets: &mut Informer<ReplicaSet>,
        deploys: &mut Informer<Deployment>,
        services: &mut Informer<Service>,
        slices: &Informer<EndpointSlice>,
        nodes: &mut Informer<Node>,
    ) -> Self {
        let trigger = Arc::new(Notify::new());
        watch_deletes(pods, &trigger);
        watch_deletes(sets, &trigger);
        watch_deletes(deploys, &trigger);
        watch_deletes(services, &trigger);
        watch_deletes(nodes, &trigger);
        GarbageCollector {
            client,
            pods: pods.store(),
            sets: sets.store(),
            deploys: deploys.store(),
            services: services.store(),
            slices: slices.store(),
            nodes: nodes.store(),
            trigger,
            period: opts.gc_period,
        }
    }

    /// Sweeps on owner deletions and every period until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        for ready in [
            crate::informer::ready(&self.pods, &cancel).await,
            crate::informer::ready(&self.sets, &cancel).await,
            crate::informer::ready(&self.deploys, &cancel).await,
            crate::informer::ready(&self.services, &cancel).await,
            crate::informer::ready(&self.slices, &cancel).await,
            crate::informer::ready(&self.nodes, &cancel).await,
        ] {
            if !ready {
                return;
            }
        }
        loop {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "garbage collection");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.trigger.notified() => {
                    // Let a burst of deletions settle into one sweep.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                () = tokio::time::sleep(self.period) => {}
            }
        }
    }

    fn live_uids(&self) -> HashSet<String> {
        let mut uids = HashSet::new();
        uids.extend(
            self.pods
                .state()
                .iter()
                .filter_map(|o| o.metadata.uid.clone()),
        );
        uids.extend(
            self.sets
                .state()
                .iter()
                .filter_map(|o| o.metadata.uid.clone()),
        );
        uids.extend(
            self.deploys
                .state()
                .iter()
                .filter_map(|o| o.metadata.uid.clone()),
        );
        uids.extend(
            self.services
                .state()
                .iter()
                .filter_map(|o| o.metadata.uid.clone()),
        );
        uids.extend(
            self.nodes
                .state()
                .iter()
                .filter_map(|o| o.metadata.uid.clone()),
        );
        uids
    }

    /// Whether the API server no longer has `owner` (by uid).
    async fn absent(
        &self,
        ns: &str,
        owner: &OwnerReference,
        cache: &mut HashMap<String, bool>,
    ) -> Result<bool> {
        if let Some(v) = cache.get(&owner.uid) {
            return Ok(*v);
        }
        let (group, version) = match owner.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", owner.api_version.as_str()),
        };
        let gvk = GroupVersionKind::gvk(group, version, &owner.kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, &plural(&owner.kind));
        let api: Api<DynamicObject> = if cluster_scoped(&owner.kind) {
            Api::all_with(self.client.clone(), &ar)
        } else {
            Api::namespaced_with(self.client.clone(), ns, &ar)
        };
        let gone = match api.get_opt(&owner.name).await {
            Ok(None) => true,
            Ok(Some(o)) => o.metadata.uid.as_deref() != Some(owner.uid.as_str()),
            // A kind this server does not serve cannot own anything here.
            Err(kube::Error::Api(s)) if s.code == 404 => true,
            Err(e) => {
                return Err(e)
                    .ctx(|| format!("looking up owner {} {}/{}", owner.kind, ns, owner.name));
            }
        };
        cache.insert(owner.uid.clone(), gone);
        Ok(gone)
    }

    async fn sweep(&self) -> Result<()> {
        let live = self.live_uids();
        let mut cache = HashMap::new();
        let pods = self.pods.state();
        let sets = self.sets.state();
        let slices = self.slices.state();
        self.collect(&pods, &live, &mut cache).await?;
        self.collect(&sets, &live, &mut cache).await?;
        self.collect(&slices, &live, &mut cache).await?;
        // Owners being deleted with a propagation finalizer.
        let owners: Vec<(String, &'static str, String, String, Vec<String>)> = self
            .deploys
            .state()
            .iter()
            .map(|o| meta_of(o.as_ref(), "deployments"))
            .chain(sets.iter().map(|o| meta_of(o.as_ref(), "replicasets")))
            .chain(
                self.services
                    .state()
                    .iter()
                    .map(|o| meta_of(o.as_ref(), "services")),
            )
            .filter(|(_, _, _, _, f)| f.iter().any(|f| f == "orphan" || f == "foregroundDeletion"))
            .collect();
        for (uid, plural, ns, name, finalizers) in owners {
            let dependents = self.dependents_of(&uid, &pods, &sets, &slices);
            if finalizers.iter().any(|f| f == "orphan") {
                for d in &dependents {
                    d.strip_owner(&self.client, &uid).await?;
                }
                self.drop_finalizer(plural, &ns, &name, &finalizers, "orphan")
                    .await?;
            } else if dependents.is_empty() {
                self.drop_finalizer(plural, &ns, &name, &finalizers, "foregroundDeletion")
                    .await?;
            } else {
                for d in &dependents {
                    d.delete(&self.client).await?;
                }
            }
        }
        Ok(())
    }

    fn dependents_of(
        &self,
        uid: &str,
        pods: &[Arc<Pod>],
        sets: &[Arc<ReplicaSet>],
        slices: &[Arc<EndpointSlice>],
    ) -> Vec<Dependent> {
        let owned =
            |m: &kube::api::ObjectMeta| m.owner_references.iter().flatten().any(|r| r.uid == uid);
        let mut out = Vec::new();
        out.extend(
            pods.iter()
                .filter(|o| owned(&o.metadata))
                .map(|o| Dependent::of(o.as_ref(), "pods")),
        );
        out.extend(
            sets.iter()
                .filter(|o| owned(&o.metadata))
                .map(|o| Dependent::of(o.as_ref(), "replicasets")),
        );
        out.extend(
            slices
                .iter()
                .filter(|o| owned(&o.metadata))
                .map(|o| Dependent::of(o.as_ref(), "endpointslices")),
        );
        out
    }

    async fn drop_finalizer(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        finalizers: &[String],
        which: &str,
    ) -> Result<()> {
        let rest: Vec<&String> = finalizers.iter().filter(|f| *f != which).collect();
        let api = dynamic(&self.client, plural, ns);
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
        )
        .await
        .ctx(|| format!("removing finalizer {which} of {plural} {ns}/{name}"))?;
        Ok(())
    }

    async fn collect<K>(
        &self,
        objs: &[Arc<K>],
        live: &HashSet<String>,
        cache: &mut HashMap<String, bool>,
    ) -> Result<()>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        for o in objs {
            let refs = o.meta().owner_references.as_deref().unwrap_or_default();
            if refs.is_empty() || util::terminating(o.as_ref()) {
                continue;
            }
            let ns = o.meta().namespace.clone().unwrap_or_default();
            let mut missing = Vec::new();
            for r in refs.iter().filter(|r| !live.contains(&r.uid)) {
                if self.absent(&ns, r, cache).await? {
                    missing.push(r.uid.clone());
                }
            }
            if missing.is_empty() {
                continue;
            }
            let name = o.meta().name.clone().unwrap_or_default();
            let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
            if missing.len() == refs.len() {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: o.meta().uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::background()
                };
                match api.delete(&name, &dp).await {
                    Ok(_) => {
                        tracing::debug!(kind = %K::kind(&()), %ns, %name, "collected: owner gone")
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                    Err(e) => {
                        return Err(e).ctx(|| format!("deleting {} {ns}/{name}", K::kind(&())));
                    }
                }
            } else {
                let mut kept = (**o).clone();
                if let Some(r) = kept.meta_mut().owner_references.as_mut() {
                    r.retain(|r| !missing.contains(&r.uid));
                }
                match api.replace(&name, &PostParams::default(), &kept).await {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => {
                        return Err(e).ctx(|| format!("dropping dangling owners of {ns}/{name}"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn meta_of<K: Resource>(
    o: &K,
    plural: &'static str,
) -> (String, &'static str, String, String, Vec<String>) {
    let m = o.meta();
    let finalizers = if m.deletion_timestamp.is_some() {
        m.finalizers.clone().unwrap_or_default()
    } else {
        Vec::new()
    };
    (
        m.uid.clone().unwrap_or_default(),
        plural,
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
        finalizers,
    )
}

fn dynamic(client: &Client, plural: &str, ns: &str) -> Api<DynamicObject> {
    let (group, kind) = match plural {
        "deployments" => ("apps", "Deployment"),
        "replicasets" => ("apps", "ReplicaSet"),
        "endpointslices" => ("discovery.k8s.io", "EndpointSlice"),
        "services" => ("", "Service"),
        _ => ("", "Pod"),
    };
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural);
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// A dependent found in the caches.
struct Dependent {
    plural: &'static str,
    ns: String,
    name: String,
    refs: Vec<OwnerReference>,
    resource_version: Option<String>,
}

impl Dependent {
    fn of<K: Resource>(o: &K, plural: &'static str) -> Self {
        let m = o.meta();
        Dependent {
            plural,
            ns: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
            refs: m.owner_references.clone().unwrap_or_default(),
            resource_version: m.resource_version.clone(),
        }
    }

    async fn strip_owner(&self, client: &Client, uid: &str) -> Result<()> {
        let refs: Vec<&OwnerReference> = self.refs.iter().filter(|r| r.uid != uid).collect();
        let patch = json!({"metadata": {"ownerReferences": refs, "resourceVersion": self.resource_version}});
        match dynamic(client, self.plural, &self.ns)
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e).ctx(|| format!("orphaning {} {}/{}", self.plural, self.ns, self.name)),
        }
    }

    async fn delete(&self, client: &Client) -> Result<()> {
        match dynamic(client, self.plural, &self.ns)
            .delete(&self.name, &DeleteParams::foreground())
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e).ctx(|| format!("deleting {} {}/{}", self.plural, self.ns, self.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_of_served_kinds() {
        assert_eq!(plural("ReplicaSet"), "replicasets");
        assert_eq!(plural("Endpoints"), "endpoints");
        assert_eq!(plural("Ingress"), "ingresses");
        assert_eq!(plural("NetworkPolicy"), "networkpolicies");
    }
}
