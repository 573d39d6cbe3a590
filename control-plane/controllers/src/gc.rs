//! Garbage collection by owner references, over every resource type it is given a cache of
//! ([`GarbageCollector::track`]): each is both a possible owner and a possible dependent.
//!
//! - Background: a dependent whose owners are all gone is deleted (its own dependents follow
//!   in later sweeps); one that lost only some owners has the dangling references removed.
//! - Orphan: an owner being deleted with the `orphan` finalizer has its dependents'
//!   references to it removed, then the finalizer.
//! - Foreground: an owner being deleted with `foregroundDeletion` has its dependents deleted
//!   (in the foreground too when they can own things themselves), and loses the finalizer
//!   once none that blocks it (`blockOwnerDeletion`) is left; the others are collected in
//!   the background afterwards.
//!
//! The caches may lag, so before acting on a missing owner the collector asks the API server
//! whether it is really gone.

use std::{
    collections::{HashMap, HashSet},
    fmt::Debug,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client, Resource,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
        Preconditions,
    },
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    Options, Result,
    error::ApiContext as _,
    informer::{Change, Informer},
    util,
};

/// The finalizer of owners deleted with `propagationPolicy: Orphan`.
pub const ORPHAN: &str = "orphan";
/// The finalizer of owners deleted with `propagationPolicy: Foreground`.
pub const FOREGROUND: &str = "foregroundDeletion";

/// Whether a k8s-openapi scope is namespaced.
pub(crate) trait Scope {
    /// True for namespaced resources.
    const NAMESPACED: bool;
}

impl Scope for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}

impl Scope for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

type Visit = Box<dyn Fn(&mut dyn FnMut(&ObjectMeta)) + Send + Sync>;
type Ready =
    Box<dyn Fn(CancellationToken) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// One resource type the collector follows through a shared cache.
struct Tracked {
    ar: ApiResource,
    namespaced: bool,
    visit: Visit,
    ready: Ready,
}

/// An object of a tracked type, as much of it as collection needs.
struct Obj {
    kind: usize,
    ns: String,
    name: String,
    uid: String,
    refs: Vec<OwnerReference>,
    resource_version: Option<String>,
    terminating: bool,
    finalizers: Vec<String>,
}

/// The garbage collector.
pub(crate) struct GarbageCollector {
    client: Client,
    kinds: Vec<Tracked>,
    trigger: Arc<Notify>,
    period: Duration,
}

/// Guesses the plural of a kind this collector does not track.
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

/// Whether a kind this collector does not track is cluster-scoped.
fn cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Node" | "Namespace" | "PersistentVolume" | "ClusterRole" | "StorageClass"
    )
}

impl GarbageCollector {
    /// A collector tracking nothing yet.
    pub fn new(client: Client, opts: &Options) -> Self {
        GarbageCollector {
            client,
            kinds: Vec::new(),
            trigger: Arc::new(Notify::new()),
            period: opts.gc_period,
        }
    }

    /// Follows the resource type of `inf`, as owners and as dependents; an owner deleted
    /// (or starting a deletion held by finalizers) triggers a sweep.
    pub fn track<K>(&mut self, inf: &mut Informer<K>)
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
        K::Scope: Scope,
    {
        let trigger = Arc::clone(&self.trigger);
        inf.on(move |c| {
            let owner_going = match c {
                Change::Deleted(_) | Change::Relisted => true,
                Change::Applied(o) => {
                    util::terminating(o)
                        && o.meta()
                            .finalizers
                            .iter()
                            .flatten()
                            .any(|f| f == ORPHAN || f == FOREGROUND)
                }
            };
            if owner_going {
                trigger.notify_one();
            }
        });
        let gvk = GroupVersionKind::gvk(&K::group(&()), &K::version(&()), &K::kind(&()));
        let (visit_store, ready_store) = (inf.store(), inf.store());
        self.kinds.push(Tracked {
            ar: ApiResource::from_gvk_with_plural(&gvk, &K::plural(&())),
            namespaced: K::Scope::NAMESPACED,
            visit: Box::new(move |f| {
                for o in visit_store.state() {
                    f(o.meta());
                }
            }),
            ready: Box::new(move |cancel| {
                let store = ready_store.clone();
                Box::pin(async move { crate::informer::ready(&store, &cancel).await })
            }),
        });
    }

    /// The kinds followed, for logs and reports.
    pub fn kinds(&self) -> Vec<String> {
        self.kinds.iter().map(|k| k.ar.kind.clone()).collect()
    }

    /// Sweeps on owner deletions and every period until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        for k in &self.kinds {
            if !(k.ready)(cancel.clone()).await {
                return;
            }
        }
        tracing::debug!(kinds = ?self.kinds(), "garbage collector running");
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

    /// Every live uid, and the objects that matter: dependents and owners being deleted
    /// with a propagation finalizer.
    fn snapshot(&self) -> (HashSet<String>, Vec<Obj>) {
        let mut live = HashSet::new();
        let mut objs = Vec::new();
        for (kind, k) in self.kinds.iter().enumerate() {
            (k.visit)(&mut |m: &ObjectMeta| {
                let Some(uid) = m.uid.clone() else {
                    return;
                };
                live.insert(uid.clone());
                let refs = m.owner_references.clone().unwrap_or_default();
                let terminating = m.deletion_timestamp.is_some();
                let finalizers: Vec<String> = m
                    .finalizers
                    .iter()
                    .flatten()
                    .filter(|f| *f == ORPHAN || *f == FOREGROUND)
                    .cloned()
                    .collect();
                let propagating = terminating && !finalizers.is_empty();
                if refs.is_empty() && !propagating {
                    return;
                }
                objs.push(Obj {
                    kind,
                    ns: m.namespace.clone().unwrap_or_default(),
                    name: m.name.clone().unwrap_or_default(),
                    uid,
                    refs,
                    resource_version: m.resource_version.clone(),
                    terminating,
                    finalizers: m.finalizers.clone().unwrap_or_default(),
                });
            });
        }
        (live, objs)
    }

    fn api(&self, kind: usize, ns: &str) -> Api<DynamicObject> {
        let k = &self.kinds[kind];
        if k.namespaced {
            Api::namespaced_with(self.client.clone(), ns, &k.ar)
        } else {
            Api::all_with(self.client.clone(), &k.ar)
        }
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
        let tracked = self
            .kinds
            .iter()
            .find(|k| k.ar.kind == owner.kind && k.ar.api_version == owner.api_version);
        let api: Api<DynamicObject> = match tracked {
            Some(k) if !k.namespaced => Api::all_with(self.client.clone(), &k.ar),
            Some(k) => Api::namespaced_with(self.client.clone(), ns, &k.ar),
            None => {
                let (group, version) = match owner.api_version.split_once('/') {
                    Some((g, v)) => (g, v),
                    None => ("", owner.api_version.as_str()),
                };
                let gvk = GroupVersionKind::gvk(group, version, &owner.kind);
                let ar = ApiResource::from_gvk_with_plural(&gvk, &plural(&owner.kind));
                if cluster_scoped(&owner.kind) {
                    Api::all_with(self.client.clone(), &ar)
                } else {
                    Api::namespaced_with(self.client.clone(), ns, &ar)
                }
            }
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
        let (live, objs) = self.snapshot();
        let mut cache = HashMap::new();
        for o in objs.iter().filter(|o| !o.refs.is_empty() && !o.terminating) {
            let mut missing = Vec::new();
            for r in o.refs.iter().filter(|r| !live.contains(&r.uid)) {
                if self.absent(&o.ns, r, &mut cache).await? {
                    missing.push(r.uid.as_str());
                }
            }
            if missing.len() == o.refs.len() {
                self.delete(o, false).await?;
            } else if !missing.is_empty() {
                let _ = self.drop_refs(o, &missing).await?;
            }
        }
        // Owners being deleted with a propagation finalizer.
        let mut by_owner: HashMap<&str, Vec<&Obj>> = HashMap::new();
        for o in &objs {
            for r in &o.refs {
                by_owner.entry(r.uid.as_str()).or_default().push(o);
            }
        }
        for owner in objs.iter().filter(|o| o.terminating) {
            let namespaced = self.kinds[owner.kind].namespaced;
            // References across namespaces are invalid, except to cluster-scoped owners.
            let dependents: Vec<&Obj> = by_owner
                .get(owner.uid.as_str())
                .into_iter()
                .flatten()
                .filter(|d| !namespaced || d.ns == owner.ns)
                .copied()
                .collect();
            tracing::debug!(ns = %owner.ns, name = %owner.name, finalizers = ?owner.finalizers,
                dependents = dependents.len(), "owner being deleted");
            if owner.finalizers.iter().any(|f| f == ORPHAN) {
                // The finalizer goes only once no dependent refers to the owner any more,
                // or the dependents would be collected with it.
                let mut all = true;
                for d in &dependents {
                    all &= self.drop_refs(d, &[owner.uid.as_str()]).await?;
                }
                if all {
                    self.drop_finalizer(owner, ORPHAN).await?;
                } else {
                    self.trigger.notify_one();
                }
            } else if owner.finalizers.iter().any(|f| f == FOREGROUND) {
                // Every dependent is deleted, but only those that block their owner's
                // deletion (blockOwnerDeletion) are waited for, as in Kubernetes.
                let blocking = dependents.iter().any(|d| {
                    d.refs
                        .iter()
                        .any(|r| r.uid == owner.uid && r.block_owner_deletion == Some(true))
                });
                if !blocking {
                    self.drop_finalizer(owner, FOREGROUND).await?;
                }
                for d in dependents.iter().filter(|d| !d.terminating) {
                    // What can own things goes in the foreground too, so the owner waits
                    // for the whole tree; a pod owns nothing and just stops.
                    let foreground = self.kinds[d.kind].ar.kind != "Pod";
                    self.delete(d, foreground).await?;
                }
            }
        }
        Ok(())
    }

    async fn delete(&self, o: &Obj, foreground: bool) -> Result<()> {
        let kind = &self.kinds[o.kind].ar.kind;
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(o.uid.clone()),
                resource_version: None,
            }),
            ..if foreground {
                DeleteParams::foreground()
            } else {
                DeleteParams::background()
            }
        };
        match self.api(o.kind, &o.ns).delete(&o.name, &dp).await {
            Ok(_) => {
                tracing::debug!(%kind, ns = %o.ns, name = %o.name, foreground, "collected");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e).ctx(|| format!("deleting {kind} {}/{}", o.ns, o.name)),
        }
    }

    /// Removes the references to `uids` from a dependent (guarded by its resourceVersion);
    /// false if that lost a race and must be tried again.
    async fn drop_refs(&self, o: &Obj, uids: &[&str]) -> Result<bool> {
        let kept: Vec<&OwnerReference> = o
            .refs
            .iter()
            .filter(|r| !uids.contains(&r.uid.as_str()))
            .collect();
        let patch = json!({"metadata": {
            "ownerReferences": kept, "resourceVersion": o.resource_version}});
        match self
            .api(o.kind, &o.ns)
            .patch(&o.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) => {
                tracing::debug!(ns = %o.ns, name = %o.name, error = %s, "dropping owners");
                Ok(s.code == 404)
            }
            Err(e) => Err(e).ctx(|| format!("dropping owners of {}/{}", o.ns, o.name)),
        }
    }

    async fn drop_finalizer(&self, o: &Obj, which: &str) -> Result<()> {
        let rest: Vec<&String> = o.finalizers.iter().filter(|f| *f != which).collect();
        let patch = json!({"metadata": {
            "finalizers": rest, "resourceVersion": o.resource_version}});
        match self
            .api(o.kind, &o.ns)
            .patch(&o.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => Ok(()),
            // A conflict or a vanished object: the next sweep sees the news.
            Err(kube::Error::Api(s)) => {
                tracing::debug!(ns = %o.ns, name = %o.name, error = %s, "removing {which}");
                Ok(())
            }
            Err(e) => Err(e).ctx(|| format!("removing finalizer {which} of {}/{}", o.ns, o.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_of_untracked_kinds() {
        assert_eq!(plural("ReplicaSet"), "replicasets");
        assert_eq!(plural("Endpoints"), "endpoints");
        assert_eq!(plural("Ingress"), "ingresses");
        assert_eq!(plural("NetworkPolicy"), "networkpolicies");
    }
}
