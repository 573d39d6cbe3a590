//! The `kube` crate (kube-rs) as a client of the API server: typed create/get/list/patch,
//! label selectors, and a `kube_runtime` watcher seeing changes.

use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::ConfigMap};
mod common;
use common::start;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};

fn configmap(name: &str, app: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "data": {"k": "v"},
    }))
    .unwrap()
}

#[tokio::test]
async fn kube_rs_lists_watches_and_patches() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (client, _stop) = start(dir.path()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    // A watcher started first sees what follows, in order.
    let mut events = watcher(cms.clone(), watcher::Config::default().labels("app=web"))
        .applied_objects()
        .boxed();

    let created = cms
        .create(&PostParams::default(), &configmap("a", "web"))
        .await?;
    assert!(created.metadata.resource_version.is_some() && created.metadata.uid.is_some());
    cms.create(&PostParams::default(), &configmap("b", "api"))
        .await?;
    cms.create(&PostParams::default(), &configmap("c", "web"))
        .await?;

    let web = cms.list(&ListParams::default().labels("app=web")).await?;
    let names: Vec<_> = web
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a", "c"]);
    let page = cms.list(&ListParams::default().limit(1)).await?;
    assert_eq!(page.items.len(), 1);
    assert!(page.metadata.continue_.is_some(), "a limited list pages on");

    let seen: Vec<String> = tokio::time::timeout(
        Duration::from_secs(10),
        (&mut events)
            .take(2)
            .map_ok(|c| c.metadata.name.unwrap_or_default())
            .try_collect::<Vec<_>>(),
    )
    .await??;
    assert_eq!(seen, ["a", "c"]);

    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"k": "w"}})),
    )
    .await?;
    let changed = tokio::time::timeout(Duration::from_secs(10), events.try_next()).await??;
    assert_eq!(
        changed
            .and_then(|c| c.data)
            .and_then(|d| d.get("k").cloned()),
        Some("w".to_owned())
    );

    // Typed apps/v1 objects round-trip with the server's defaults filled in.
    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "busybox"}]}}},
    }))?;
    let d = deploys.create(&PostParams::default(), &d).await?;
    let spec = d.spec.expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.and_then(|s| s.type_).as_deref(),
        Some("RollingUpdate")
    );
    let err = deploys.get("missing").await.expect_err("not found");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err}"
    );
    Ok(())
}
