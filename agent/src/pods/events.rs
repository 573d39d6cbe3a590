//! Events about pods, as the kubelet reports them (`kubectl describe pod` shows them):
//! Pulled, Created, Started, Killing, BackOff, Unhealthy, Failed. Posted as core/v1 Events
//! in the pod's namespace in the background; a failed post is logged and dropped, never
//! holding up the pod. Only a few posts are in flight at once: a wave of starting pods makes
//! three Events each, and a burst of them in front of the API server delayed the status
//! patches that report the pods Running.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::{Api, api::PostParams};
use serde_json::json;

/// `Normal` or `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Something expected happened.
    Normal,
    /// Something went wrong.
    Warning,
}

/// Event posts in flight at once, per recorder.
const IN_FLIGHT: usize = 2;

/// Posts Events for the pods of one node.
#[derive(Clone)]
pub struct Recorder {
    client: kube::Client,
    node: String,
    /// Bounds the posts in flight (first come, first posted).
    posts: Arc<tokio::sync::Semaphore>,
}

impl Recorder {
    /// A recorder reporting as the kubelet of `node`.
    pub fn new(client: kube::Client, node: String) -> Self {
        Recorder {
            client,
            node,
            posts: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        }
    }

    /// Reports `reason: message` about `pod` (and its `container`, if given).
    pub fn emit(
        &self,
        pod: &Pod,
        container: Option<&str>,
        kind: Kind,
        reason: &str,
        message: String,
    ) {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let now = jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap_or_else(|_| jiff::Timestamp::now());
        let stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": format!("{name}."),
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": name,
                "namespace": namespace,
                "uid": pod.metadata.uid,
                "fieldPath": container.map(|c| format!("spec.containers{{{c}}}")),
            },
            "type": match kind { Kind::Normal => "Normal", Kind::Warning => "Warning" },
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": self.node},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        });
        let event: Event = match serde_json::from_value(event) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "building an event");
                return;
            }
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let posts = Arc::clone(&self.posts);
        tokio::spawn(async move {
            let Ok(_permit) = posts.acquire().await else {
                return;
            };
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::debug!(error = %e, "posting an event");
            }
        });
    }
}
