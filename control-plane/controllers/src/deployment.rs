//! The Deployment controller: one ReplicaSet per pod template (named and labelled by the
//! template's hash), rolled from old to new with RollingUpdate (never more than
//! `replicas + maxSurge` pods, never fewer than `replicas - maxUnavailable` available) or
//! Recreate, revision annotations for `kubectl rollout history|undo`, history cleanup, and
//! the status and conditions `kubectl rollout status` waits on.
//!
//! Pod counts come from the pod cache as well as the ReplicaSets' `spec.replicas`, taking the
//! larger: a ReplicaSet scaled down still counts its pods until they are gone, so a new one
//! is not scaled up into the room too early.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, ReplicaSet, ReplicaSetSpec},
        core::v1::{Pod, PodTemplateSpec},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    Result,
    error::ApiContext as _,
    events::{Recorder, Type},
    informer::{Change, Informer},
    util::{self, Key},
    workqueue::WorkQueue,
};

/// The label (and name suffix) that ties a ReplicaSet to one pod template.
pub const HASH_LABEL: &str = "pod-template-hash";
/// The revision annotation on Deployments and their ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";

/// A short, stable hash of a pod template (without its hash label).
pub fn template_hash(t: &PodTemplateSpec) -> String {
    let mut t = t.clone();
    if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
    }
    let bytes = serde_json::to_vec(&t).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Letters and digits that cannot spell words, as Kubernetes uses.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut v = (h ^ (h >> 32)) as u32;
    let mut out = String::new();
    while out.len() < 10 {
        out.push(char::from(ALPHABET[(v % 27) as usize]));
        v /= 27;
        if v == 0 {
            break;
        }
    }
    out
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

/// Resolves an int-or-percent of `total`, rounding up or down.
pub(crate) fn scaled(
    v: Option<&IntOrString>,
    total: i32,
    default_percent: i32,
    round_up: bool,
) -> i32 {
    let percent = match v {
        Some(IntOrString::Int(i)) => return *i,
        Some(IntOrString::String(s)) => s
            .trim_end_matches('%')
            .parse::<i32>()
            .unwrap_or(default_percent),
        None => default_percent,
    };
    let x = i64::from(total) * i64::from(percent);
    let r = if round_up { (x + 99) / 100 } else { x / 100 };
    i32::try_from(r).unwrap_or(i32::MAX)
}

/// Pods of one ReplicaSet as seen in the cache.
#[derive(Clone, Copy, Default)]
struct Counts {
    active: i32,
    ready: i32,
    available: i32,
}

/// The Deployment controller.
pub(crate) struct Deployments {
    client: Client,
    deploys: Store<Deployment>,
    sets: Store<ReplicaSet>,
    pods: Store<Pod>,
    queue: WorkQueue<Key>,
    recorder: Recorder,
}

fn owner_deployment(rs: &ReplicaSet) -> Option<Key> {
    let r = util::controller_of(&rs.metadata).filter(|r| r.kind == "Deployment")?;
    Some(Key::new(
        rs.metadata.namespace.as_deref().unwrap_or_default(),
        &r.name,
    ))
}

impl Deployments {
    /// Registers the controller's handlers.
    pub fn register(
        client: Client,
        deploys: &mut Informer<Deployment>,
        sets: &mut Informer<ReplicaSet>,
        pods: &mut Informer<Pod>,
    ) -> Arc<Self> {
        let queue = WorkQueue::new();
        let (d_store, rs_store) = (deploys.store(), sets.store());
        deploys.queue_keys(&queue);
        {
            let (queue, store) = (queue.clone(), d_store.clone());
            sets.on(move |c| match c {
                Change::Applied(rs) | Change::Deleted(rs) => match owner_deployment(rs) {
                    Some(k) => queue.add(k),
                    None if util::controller_of(&rs.metadata).is_none() => {
                        let ns = rs.metadata.namespace.as_deref();
                        for d in store.state() {
                            if d.metadata.namespace.as_deref() == ns
                                && d.spec.as_ref().is_some_and(|s| {
                                    !util::selector_is_empty(&s.selector)
                                        && util::selector_matches(
                                            &s.selector,
                                            rs.metadata.labels.as_ref(),
                                        )
                                })
                            {
                                queue.add(Key::of(d.as_ref()));
                            }
                        }
                    }
                    None => {}
                },
                Change::Relisted => store
                    .state()
                    .iter()
                    .for_each(|d| queue.add(Key::of(d.as_ref()))),
            });
        }
        {
            let (queue, sets) = (queue.clone(), rs_store.clone());
            pods.on(move |c| {
                let (Change::Applied(p) | Change::Deleted(p)) = c else {
                    return;
                };
                let Some(r) = util::controller_of(&p.metadata).filter(|r| r.kind == "ReplicaSet")
                else {
                    return;
                };
                let ns = p.metadata.namespace.as_deref().unwrap_or_default();
                if let Some(rs) = sets.get(&ObjectRef::new(&r.name).within(ns))
                    && let Some(k) = owner_deployment(&rs)
                {
                    queue.add(k);
                }
            });
        }
        Arc::new(Deployments {
            recorder: Recorder::new(client.clone(), "deployment-controller"),
            client,
            deploys: d_store,
            sets: rs_store,
            pods: pods.store(),
            queue,
        })
    }

    /// Reconciles until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        for ready in [
            crate::informer::ready(&self.deploys, &cancel).await,
            crate::informer::ready(&self.sets, &cancel).await,
            crate::informer::ready(&self.pods, &cancel).await,
        ] {
            if !ready {
                return;
            }
        }
        let this = Arc::clone(&self);
        self.queue
            .clone()
            .run(cancel, "deployment", move |key| {
                let this = Arc::clone(&this);
                async move { this.reconcile(key).await }
            })
            .await;
    }

    async fn set_replicas(
        &self,
        rs: &ReplicaSet,
        replicas: i32,
        revision: Option<i64>,
    ) -> Result<()> {
        let mut rs = rs.clone();
        rs.spec.get_or_insert_with(ReplicaSetSpec::default).replicas = Some(replicas);
        if let Some(r) = revision {
            rs.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(REVISION.into(), r.to_string());
        }
        let ns = rs.metadata.namespace.clone().unwrap_or_default();
        let name = rs.metadata.name.clone().unwrap_or_default();
        let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &ns);
        api.replace(&name, &PostParams::default(), &rs)
            .await
            .ctx(|| format!("scaling replicaset {ns}/{name} to {replicas}"))?;
        Ok(())
    }

    async fn reconcile(&self, key: Key) -> Result<Option<Duration>> {
        let Some(d) = self.deploys.get(&ObjectRef::new(&key.name).within(&key.ns)) else {
            return Ok(None);
        };
        let Some(spec) = d.spec.as_ref() else {
            return Ok(None);
        };
        if util::terminating(d.as_ref()) || util::selector_is_empty(&spec.selector) {
            return Ok(None);
        }
        let uid = util::uid(d.as_ref()).to_owned();
        let rs_api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &key.ns);
        let mut owned: Vec<Arc<ReplicaSet>> = Vec::new();
        for rs in self
            .sets
            .state_filter(|rs| rs.metadata.namespace.as_deref() == Some(key.ns.as_str()))
        {
            match util::controller_of(&rs.metadata) {
                Some(r) if r.uid == uid => owned.push(rs),
                None if !util::terminating(rs.as_ref())
                    && util::selector_matches(&spec.selector, rs.metadata.labels.as_ref()) =>
                {
                    let mut adopted = (*rs).clone();
                    adopted
                        .metadata
                        .owner_references
                        .get_or_insert_with(Vec::new)
                        .push(util::controller_ref(d.as_ref()));
                    let name = rs.metadata.name.clone().unwrap_or_default();
                    rs_api
                        .replace(&name, &PostParams::default(), &adopted)
                        .await
                        .ctx(|| format!("adopting replicaset {}/{name}", key.ns))?;
                    // Continue once the cache shows the adoption.
                    return Ok(None);
                }
                _ => {}
            }
        }
        let mut counts: HashMap<String, Counts> = HashMap::new();
        let now = jiff::Timestamp::now();
        let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
        for p in self
            .pods
            .state_filter(|p| p.metadata.namespace.as_deref() == Some(key.ns.as_str()))
        {
            let Some(r) = util::controller_of(&p.metadata) else {
                continue;
            };
            if !util::pod_active(&p) {
                continue;
            }
            let c = counts.entry(r.uid.clone()).or_default();
            c.active += 1;
            c.ready += i32::from(util::pod_ready(&p));
            c.available += i32::from(util::pod_available(&p, min_ready, now));
        }
        let count = |rs: &ReplicaSet| counts.get(util::uid(rs)).copied().unwrap_or_default();
        let template = spec.template.clone();
        let hash = template_hash(&template);
        let (news, mut olds): (Vec<_>, Vec<_>) = owned.into_iter().partition(|rs| {
            rs.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) == Some(&hash)
        });
        olds.sort_by_key(|rs| {
            (
                revision_of(rs),
                rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
            )
        });
        let new = news.into_iter().next();
        let max_old_revision = olds.iter().map(|rs| revision_of(rs)).max().unwrap_or(0);
        let replicas = spec.replicas.unwrap_or(1);
        let rolling = spec
            .strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            .is_none_or(|t| t == "RollingUpdate");
        let ru = spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref());
        let (surge, unavailable) = if rolling {
            let surge = scaled(ru.and_then(|r| r.max_surge.as_ref()), replicas, 25, true).max(0);
            let mut unavailable = scaled(
                ru.and_then(|r| r.max_unavailable.as_ref()),
                replicas,
                25,
                false,
            )
            .clamp(0, replicas);
            if surge == 0 && unavailable == 0 {
                unavailable = 1;
            }
            (surge, unavailable)
        } else {
            (0, 0)
        };
        let paused = spec.paused.unwrap_or(false);
        let wanted_revision = if new
            .as_ref()
            .is_some_and(|n| revision_of(n) > max_old_revision)
        {
            new.as_ref().map(|n| revision_of(n)).unwrap_or(0)
        } else {
            max_old_revision + 1
        };

        let mut requeue = None;
        if !paused {
            let all: Vec<&Arc<ReplicaSet>> = olds.iter().chain(new.iter()).collect();
            let pods_of = |rs: &ReplicaSet| spec_replicas(rs).max(count(rs).active);
            match &new {
                None => {
                    let old_pods: i32 = olds.iter().map(|rs| count(rs).active).sum();
                    let old_spec: i32 = olds.iter().map(|rs| spec_replicas(rs)).sum();
                    let initial = if rolling {
                        let total: i32 = all.iter().map(|rs| pods_of(rs)).sum();
                        (replicas + surge - total).clamp(0, replicas)
                    } else {
                        0
                    };
                    if rolling || (old_pods == 0 && old_spec == 0) {
                        let initial = if rolling { initial } else { replicas };
                        self.create_new(&d, &template, &hash, initial, wanted_revision)
                            .await?;
                        return Ok(None);
                    }
                    for rs in olds.iter().filter(|rs| spec_replicas(rs) > 0) {
                        self.set_replicas(rs, 0, None).await?;
                    }
                }
                Some(new) => {
                    let revision = (revision_of(new) != wanted_revision).then_some(wanted_revision);
                    if rolling {
                        self.roll(new, &olds, replicas, surge, unavailable, revision, &count)
                            .await?;
                    } else {
                        let old_pods: i32 = olds.iter().map(|rs| count(rs).active).sum();
                        for rs in olds.iter().filter(|rs| spec_replicas(rs) > 0) {
                            self.set_replicas(rs, 0, None).await?;
                        }
                        if old_pods == 0 && (spec_replicas(new) != replicas || revision.is_some()) {
                            self.set_replicas(new, replicas, revision).await?;
                        }
                    }
                }
            }
            self.cleanup(&olds, spec.revision_history_limit.unwrap_or(10), &count)
                .await?;
        }
        if min_ready > 0 {
            requeue = Some(Duration::from_secs(1));
        }
        self.update_status(
            &d,
            new.as_deref(),
            &olds,
            replicas,
            unavailable,
            wanted_revision,
            &count,
        )
        .await?;
        Ok(requeue)
    }

    async fn create_new(
        &self,
        d: &Deployment,
        template: &PodTemplateSpec,
        hash: &str,
        replicas: i32,
        revision: i64,
    ) -> Result<()> {
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let name = format!("{}-{hash}", d.metadata.name.as_deref().unwrap_or_default());
        let mut template = template.clone();
        let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(HASH_LABEL.into(), hash.into());
        let labels = meta.labels.clone();
        let mut selector: LabelSelector = d
            .spec
            .as_ref()
            .map(|s| s.selector.clone())
            .unwrap_or_default();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(HASH_LABEL.into(), hash.into());
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels,
                annotations: Some(BTreeMap::from([(
                    REVISION.to_owned(),
                    revision.to_string(),
                )])),
                owner_references: Some(vec![util::controller_ref(d)]),
                ..ObjectMeta::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(replicas),
                min_ready_seconds: d.spec.as_ref().and_then(|s| s.min_ready_seconds),
                selector,
                template: Some(template),
            }),
            status: None,
        };
        let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &rs).await {
            Ok(_) => {
                self.recorder.record(
                    d,
                    Type::Normal,
                    "ScalingReplicaSet",
                    format!("Scaled up replica set {name} to {replicas}"),
                );
                Ok(())
            }
            // Created earlier; the cache has not caught up yet.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e).ctx(|| format!("creating replicaset {ns}/{name}")),
        }
    }

    /// One step of a rolling update: scale the new ReplicaSet up within the surge, then the
    /// old ones down within the availability budget.
    #[allow(clippy::too_many_arguments)]
    async fn roll(
        &self,
        new: &ReplicaSet,
        olds: &[Arc<ReplicaSet>],
        replicas: i32,
        surge: i32,
        max_unavailable: i32,
        revision: Option<i64>,
        count: &impl Fn(&ReplicaSet) -> Counts,
    ) -> Result<()> {
        let pods_of = |rs: &ReplicaSet| spec_replicas(rs).max(count(rs).active);
        let total: i32 = pods_of(new) + olds.iter().map(|rs| pods_of(rs)).sum::<i32>();
        let new_spec = spec_replicas(new);
        let target = if new_spec > replicas {
            replicas
        } else if total < replicas + surge {
            (new_spec + replicas + surge - total).min(replicas)
        } else {
            new_spec
        };
        if target != new_spec || revision.is_some() {
            self.set_replicas(new, target, revision).await?;
            if target != new_spec {
                self.recorder.record(
                    new,
                    Type::Normal,
                    "ScalingReplicaSet",
                    format!("Scaled replica set to {target}"),
                );
                return Ok(());
            }
        }
        if olds.iter().all(|rs| spec_replicas(rs) == 0) {
            return Ok(());
        }
        let min_available = replicas - max_unavailable;
        let new_unavailable = (new_spec - count(new).available).max(0);
        let mut budget = total - min_available - new_unavailable;
        if budget <= 0 {
            return Ok(());
        }
        let mut targets: Vec<(Arc<ReplicaSet>, i32)> = olds
            .iter()
            .map(|rs| (Arc::clone(rs), spec_replicas(rs)))
            .collect();
        // Unavailable old pods go first: removing them costs no availability.
        for (rs, t) in targets.iter_mut() {
            if budget <= 0 {
                break;
            }
            let unhealthy = (*t - count(rs).available).max(0);
            let cut = unhealthy.min(budget).min(*t);
            *t -= cut;
            budget -= cut;
        }
        // Then available ones, as far as the minimum availability allows.
        let available: i32 =
            count(new).available + olds.iter().map(|rs| count(rs).available).sum::<i32>();
        let mut allowed = (available - min_available).min(budget);
        for (rs, t) in targets.iter_mut() {
            if allowed <= 0 {
                break;
            }
            let cut = (*t).min(allowed).min(count(rs).available.max(0));
            *t -= cut;
            allowed -= cut;
        }
        for (rs, t) in targets {
            if t != spec_replicas(&rs) {
                self.set_replicas(&rs, t, None).await?;
            }
        }
        Ok(())
    }

    /// Deletes old, empty ReplicaSets beyond the history limit, oldest first.
    async fn cleanup(
        &self,
        olds: &[Arc<ReplicaSet>],
        limit: i32,
        count: &impl Fn(&ReplicaSet) -> Counts,
    ) -> Result<()> {
        let empty: Vec<&Arc<ReplicaSet>> = olds
            .iter()
            .filter(|rs| {
                spec_replicas(rs) == 0 && count(rs).active == 0 && !util::terminating(rs.as_ref())
            })
            .collect();
        let extra = empty
            .len()
            .saturating_sub(usize::try_from(limit.max(0)).unwrap_or(0));
        for rs in empty.into_iter().take(extra) {
            let ns = rs.metadata.namespace.clone().unwrap_or_default();
            let name = rs.metadata.name.clone().unwrap_or_default();
            let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &ns);
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e).ctx(|| format!("deleting old replicaset {ns}/{name}")),
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn update_status(
        &self,
        d: &Deployment,
        new: Option<&ReplicaSet>,
        olds: &[Arc<ReplicaSet>],
        replicas: i32,
        max_unavailable: i32,
        revision: i64,
        count: &impl Fn(&ReplicaSet) -> Counts,
    ) -> Result<()> {
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let name = d.metadata.name.clone().unwrap_or_default();
        let all = olds.iter().map(|rs| rs.as_ref()).chain(new);
        let (mut total, mut ready, mut available) = (0, 0, 0);
        for rs in all {
            let c = count(rs);
            total += c.active;
            ready += c.ready;
            available += c.available;
        }
        let updated = new.map_or(0, |n| count(n).active);
        let new_name = new
            .and_then(|n| n.metadata.name.clone())
            .unwrap_or_default();
        let complete = new.is_some_and(|n| spec_replicas(n) == replicas)
            && updated == replicas
            && available >= replicas
            && total == updated;
        let old_conditions = d
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let condition = |type_: &str, status: bool, reason: &str, message: String| {
            let status = if status { "True" } else { "False" };
            match old_conditions.iter().find(|c| c.type_ == type_) {
                Some(c)
                    if c.status == status
                        && c.reason.as_deref() == Some(reason)
                        && c.message.as_deref() == Some(message.as_str()) =>
                {
                    c.clone()
                }
                old => {
                    let now = util::now();
                    DeploymentCondition {
                        type_: type_.into(),
                        status: status.into(),
                        reason: Some(reason.into()),
                        message: Some(message),
                        last_update_time: Some(now.clone()),
                        last_transition_time: match old {
                            Some(c) if c.status == status => c.last_transition_time.clone(),
                            _ => Some(now),
                        },
                    }
                }
            }
        };
        let min_available = replicas - max_unavailable;
        let conditions = vec![
            if available >= min_available {
                condition(
                    "Available",
                    true,
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.".into(),
                )
            } else {
                condition(
                    "Available",
                    false,
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.".into(),
                )
            },
            if complete {
                condition(
                    "Progressing",
                    true,
                    "NewReplicaSetAvailable",
                    format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                )
            } else if new.is_some() {
                condition(
                    "Progressing",
                    true,
                    "ReplicaSetUpdated",
                    format!("ReplicaSet \"{new_name}\" is progressing."),
                )
            } else {
                condition(
                    "Progressing",
                    true,
                    "NewReplicaSetCreated",
                    "Creating a new replica set.".into(),
                )
            },
        ];
        let status = json!({
            "observedGeneration": d.metadata.generation,
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": available,
            "unavailableReplicas": (replicas - available).max(0),
            "conditions": conditions,
        });
        let current = serde_json::to_value(&d.status).unwrap_or_default();
        let same = [
            "observedGeneration",
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
            "conditions",
        ]
        .iter()
        .all(|f| current.get(f).unwrap_or(&json!(0)) == status.get(f).unwrap_or(&json!(0)));
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &ns);
        if !same {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .ctx(|| format!("updating the status of deployment {ns}/{name}"))?;
        }
        let shown = d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISION))
            .cloned();
        if new.is_some() && shown != Some(revision.to_string()) {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {REVISION: revision.to_string()}}}),
                ),
            )
            .await
            .ctx(|| format!("annotating deployment {ns}/{name}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_ignore_the_hash_label_and_percentages_round() {
        let t: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }))
        .expect("template");
        let mut labelled = t.clone();
        labelled
            .metadata
            .as_mut()
            .and_then(|m| m.labels.as_mut())
            .map(|l| l.insert(HASH_LABEL.into(), "x".into()));
        assert_eq!(template_hash(&t), template_hash(&labelled));
        assert!(!template_hash(&t).is_empty());
        let pct = IntOrString::String("25%".into());
        assert_eq!(scaled(Some(&pct), 10, 25, true), 3);
        assert_eq!(scaled(Some(&pct), 10, 25, false), 2);
        assert_eq!(scaled(Some(&IntOrString::Int(1)), 10, 25, false), 1);
    }
}
