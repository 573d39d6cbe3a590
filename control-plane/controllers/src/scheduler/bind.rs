//! Writing the scheduler's decisions: the `binding` subresource for placed pods, and the
//! `PodScheduled=False` condition plus an Event for pods that fit nowhere.

use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod, PodCondition};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    Result,
    error::ApiContext as _,
    events::{Recorder, Type},
    util,
};

pub(super) struct Binder {
    pub client: Client,
    pub recorder: Recorder,
    /// Set once the API server answered that it has no `binding` subresource.
    pub no_binding_subresource: AtomicBool,
}

fn missing_route(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404 && s.message.contains("could not find the requested resource"))
}

impl Binder {
    /// Binds `pod` to `node`.
    pub async fn bind(&self, pod: &Pod, node: &str) -> Result<()> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        if !self.no_binding_subresource.load(Ordering::Relaxed) {
            let binding = Binding {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(ns.to_owned()),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                },
                target: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node.to_owned()),
                    ..ObjectReference::default()
                },
            };
            match api
                .create_subresource::<Binding, serde_json::Value>(
                    "binding",
                    name,
                    &PostParams::default(),
                    &binding,
                )
                .await
            {
                Ok(_) => {
                    self.scheduled(pod, node);
                    return Ok(());
                }
                Err(e) if missing_route(&e) => {
                    tracing::warn!(
                        "the API server has no pods/binding subresource; binding by setting spec.nodeName"
                    );
                    self.no_binding_subresource.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e).ctx(|| format!("binding pod {ns}/{name} to {node}")),
            }
        }
        // Fallback for servers without the subresource: set spec.nodeName, guarded by the
        // pod's uid and resourceVersion so that a pod bound meanwhile is not moved.
        let patch = json!({
            "metadata": {"uid": pod.metadata.uid, "resourceVersion": pod.metadata.resource_version},
            "spec": {"nodeName": node},
        });
        api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .ctx(|| format!("binding pod {ns}/{name} to {node}"))?;
        self.scheduled(pod, node);
        Ok(())
    }

    fn scheduled(&self, pod: &Pod, node: &str) {
        self.recorder.record(
            pod,
            Type::Normal,
            "Scheduled",
            format!(
                "Successfully assigned {}/{} to {node}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            ),
        );
    }

    /// Marks the pod unschedulable with `message`, unless it already says so.
    pub async fn unschedulable(&self, pod: &Pod, message: &str) {
        let mut conditions: Vec<PodCondition> = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        if conditions.iter().any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.message.as_deref() == Some(message)
        }) {
            return;
        }
        conditions.retain(|c| c.type_ != "PodScheduled");
        conditions.push(PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some(message.to_owned()),
            last_transition_time: Some(util::now()),
            ..PodCondition::default()
        });
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let patch = json!({"status": {"conditions": conditions}});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {
                self.recorder
                    .record(pod, Type::Warning, "FailedScheduling", message.to_owned())
            }
            Err(e) => tracing::debug!(pod = %name, error = %e, "recording unschedulable failed"),
        }
    }
}
