//! A DaemonSet's revision history as ControllerRevisions, which `kubectl rollout history` lists
//! and `kubectl rollout undo` patches back onto the DaemonSet.
//!
//! Each distinct pod template gets one revision named `<daemonset>-<template hash>` whose
//! `data` is the strategic merge patch that restores it (`spec.template` with
//! `$patch: replace`). Returning to an older template renumbers its revision to the newest, as
//! Kubernetes does, and revisions beyond `revisionHistoryLimit` that no pod still runs are
//! removed, oldest first.

use std::collections::HashSet;

use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, DaemonSet},
        core::v1::Pod,
    },
    apimachinery::pkg::runtime::RawExtension,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::reflector::Store,
};
use serde_json::json;

use super::plan::HASH_LABEL;
use crate::{
    Result,
    error::ApiContext as _,
    util::{self, Key},
};

/// Revisions kept besides the current one when the DaemonSet does not say.
const DEFAULT_HISTORY_LIMIT: i32 = 10;

/// What to change so the history matches the DaemonSet's current template.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct HistoryPlan {
    /// Create the current revision with this number.
    pub create: Option<i64>,
    /// Renumber the existing current revision (`name`, new number).
    pub renumber: Option<(String, i64)>,
    /// Old revisions to delete.
    pub delete: Vec<String>,
}

/// A revision as the planner sees it.
#[derive(Debug, Clone)]
pub(crate) struct Rev {
    pub name: String,
    pub revision: i64,
}

/// Plans the history for the revision named `current`, given the DaemonSet's revisions,
/// the hashes its live pods carry (their revisions are kept) and the history limit.
pub(crate) fn plan(revs: &[Rev], current: &str, live: &HashSet<String>, limit: i32) -> HistoryPlan {
    let max = revs.iter().map(|r| r.revision).max().unwrap_or(0);
    let mut out = HistoryPlan::default();
    match revs.iter().find(|r| r.name == current) {
        None => out.create = Some(max + 1),
        Some(r) if r.revision < max => out.renumber = Some((r.name.clone(), max + 1)),
        Some(_) => {}
    }
    let mut old: Vec<&Rev> = revs
        .iter()
        .filter(|r| r.name != current && !live.contains(&r.name))
        .collect();
    let keep = usize::try_from(limit.max(0)).unwrap_or(0);
    if old.len() > keep {
        old.sort_by_key(|r| r.revision);
        let excess = old.len() - keep;
        out.delete = old[..excess].iter().map(|r| r.name.clone()).collect();
    }
    out
}

/// The revision name of a template hash.
pub(crate) fn revision_name(ds: &str, hash: &str) -> String {
    format!("{ds}-{hash}")
}

/// Brings the DaemonSet's ControllerRevisions in line with its current template `hash`.
pub(crate) async fn sync(
    client: &Client,
    revisions: &Store<ControllerRevision>,
    key: &Key,
    ds: &DaemonSet,
    hash: &str,
    pods: &[&Pod],
) -> Result<()> {
    let uid = util::uid(ds);
    let owned: Vec<_> = revisions.state_filter(|r| {
        r.metadata.namespace.as_deref() == Some(key.ns.as_str())
            && util::controller_of(&r.metadata).is_some_and(|o| o.uid == uid)
    });
    let revs: Vec<Rev> = owned
        .iter()
        .map(|r| Rev {
            name: r.metadata.name.clone().unwrap_or_default(),
            revision: r.revision,
        })
        .collect();
    let live: HashSet<String> = pods
        .iter()
        .filter_map(|p| p.metadata.labels.as_ref()?.get(HASH_LABEL))
        .map(|h| revision_name(&key.name, h))
        .collect();
    let limit = ds
        .spec
        .as_ref()
        .and_then(|s| s.revision_history_limit)
        .unwrap_or(DEFAULT_HISTORY_LIMIT);
    let current = revision_name(&key.name, hash);
    let todo = plan(&revs, &current, &live, limit);
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &key.ns);
    if let Some(revision) = todo.create {
        let rev = new_revision(ds, &current, hash, revision);
        match api.create(&PostParams::default(), &rev).await {
            Ok(_) => {}
            // Made by an earlier pass our informer has not seen yet.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e).ctx(|| format!("creating controllerrevision {current}")),
        }
    }
    if let Some((name, revision)) = todo.renumber {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"revision": revision})),
        )
        .await
        .ctx(|| format!("renumbering controllerrevision {name}"))?;
    }
    for name in todo.delete {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e).ctx(|| format!("deleting controllerrevision {name}")),
        }
    }
    Ok(())
}

/// The revision object for the DaemonSet's current template.
fn new_revision(ds: &DaemonSet, name: &str, hash: &str, revision: i64) -> ControllerRevision {
    let template = ds
        .spec
        .as_ref()
        .map(|s| serde_json::to_value(&s.template).unwrap_or_default())
        .unwrap_or_default();
    let mut template = match template {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    template.insert("$patch".into(), json!("replace"));
    let mut labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(HASH_LABEL.into(), hash.into());
    ControllerRevision {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: ds.metadata.namespace.clone(),
            labels: Some(labels),
            // kubectl shows the change-cause annotation of each revision.
            annotations: ds.metadata.annotations.clone(),
            owner_references: Some(vec![util::controller_ref(ds)]),
            ..ObjectMeta::default()
        },
        data: Some(RawExtension(json!({"spec": {"template": template}}))),
        revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revs(list: &[(&str, i64)]) -> Vec<Rev> {
        list.iter()
            .map(|(n, r)| Rev {
                name: (*n).into(),
                revision: *r,
            })
            .collect()
    }

    #[test]
    fn first_template_gets_revision_one() {
        let p = plan(&[], "ds-a", &HashSet::new(), 10);
        assert_eq!(p.create, Some(1));
        assert!(p.renumber.is_none() && p.delete.is_empty());
    }

    #[test]
    fn new_template_gets_the_next_number() {
        let p = plan(
            &revs(&[("ds-a", 1), ("ds-b", 2)]),
            "ds-c",
            &HashSet::new(),
            10,
        );
        assert_eq!(p.create, Some(3));
    }

    #[test]
    fn rollback_renumbers_the_old_revision() {
        let p = plan(
            &revs(&[("ds-a", 1), ("ds-b", 2)]),
            "ds-a",
            &HashSet::new(),
            10,
        );
        assert_eq!(p.create, None);
        assert_eq!(p.renumber, Some(("ds-a".into(), 3)));
    }

    #[test]
    fn current_revision_is_left_alone() {
        let p = plan(
            &revs(&[("ds-a", 1), ("ds-b", 2)]),
            "ds-b",
            &HashSet::new(),
            10,
        );
        assert_eq!(p, HistoryPlan::default());
    }

    #[test]
    fn history_is_trimmed_oldest_first_sparing_live_revisions() {
        let r = revs(&[
            ("ds-a", 1),
            ("ds-b", 2),
            ("ds-c", 3),
            ("ds-d", 4),
            ("ds-e", 5),
        ]);
        let live: HashSet<String> = ["ds-a".to_owned()].into();
        let p = plan(&r, "ds-e", &live, 1);
        // Old and unused: b, c, d; keep the newest one of them.
        assert_eq!(p.delete, vec!["ds-b".to_owned(), "ds-c".to_owned()]);
    }
}
