//! Creating and deleting a workload's pods concurrently, with one Event per pod and the
//! expectations that keep the next reconcile from acting on a cache that lags behind.

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Resource,
    api::{DeleteParams, PostParams},
};

use crate::{
    Result,
    error::ApiContext as _,
    events::{Recorder, Type},
    expectations::Expectations,
    util::Key,
};

/// Concurrent writes per call.
const PARALLEL: usize = 16;

/// Who writes: the owner's key and object, its Event recorder and expectations.
pub(crate) struct Writer<'a, K> {
    pub key: &'a Key,
    pub owner: &'a K,
    pub recorder: &'a Recorder,
    pub expectations: &'a Expectations<Key>,
}

impl<K: Resource<DynamicType = ()>> Writer<'_, K> {
    /// Creates `pods` in the owner's namespace.
    ///
    /// # Errors
    /// A create failed (the others were still made and are expected).
    pub async fn create(&self, pods: Vec<Pod>) -> Result<()> {
        if pods.is_empty() {
            return Ok(());
        }
        let api: Api<Pod> = Api::namespaced(self.recorder.client(), &self.key.ns);
        let pp = PostParams::default();
        let results: Vec<_> = futures::stream::iter(pods)
            .map(|p| {
                let (api, pp) = (api.clone(), pp.clone());
                async move { api.create(&pp, &p).await }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut names = Vec::new();
        let mut error = None;
        for r in results {
            match r {
                Ok(p) => names.push(p.metadata.name.unwrap_or_default()),
                Err(e) => error = Some(e),
            }
        }
        for n in &names {
            let msg = format!("Created pod: {n}");
            self.recorder
                .record(self.owner, Type::Normal, "SuccessfulCreate", msg);
        }
        self.expectations.expect(self.key, names, Vec::new());
        match error {
            Some(e) => Err(e).ctx(|| format!("creating pods of {}", self.key)),
            None => Ok(()),
        }
    }

    /// Deletes the pods named `names`; one already gone is fine.
    ///
    /// # Errors
    /// A delete failed, e.g. on a conflict with a concurrent write (the rest were still
    /// deleted and are expected).
    pub async fn delete(&self, names: Vec<String>, dp: &DeleteParams) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let api: Api<Pod> = Api::namespaced(self.recorder.client(), &self.key.ns);
        let results: Vec<_> = futures::stream::iter(names)
            .map(|n| {
                let api = api.clone();
                async move { (api.delete(&n, dp).await, n) }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut deleted = Vec::new();
        let mut error = None;
        for (r, n) in results {
            match r {
                Ok(_) => {
                    let msg = format!("Deleted pod: {n}");
                    self.recorder
                        .record(self.owner, Type::Normal, "SuccessfulDelete", msg);
                    deleted.push(n);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => error = Some(e),
            }
        }
        self.expectations.expect(self.key, Vec::new(), deleted);
        match error {
            Some(e) => Err(e).ctx(|| format!("deleting pods of {}", self.key)),
            None => Ok(()),
        }
    }
}
