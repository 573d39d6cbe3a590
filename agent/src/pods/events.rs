//! Events about pods, as the kubelet reports them (`kubectl describe pod` shows them):
//! Pulled, Created, Started, Killing, BackOff, Unhealthy, Failed. Posted as core/v1 Events
//! in the pod's namespace in the background; a failed post is logged and dropped, never
//! holding up the pod.

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

/// Posts Events for the pods of one node.
#[derive(Clone)]
pub struct Recorder {
    client: kube::Client,
    node: String,
}

impl Recorder {
    /// A recorder reporting as the kubelet of `node`.
    pub fn new(client: kube::Client, node: String) -> Self {
        Recorder { client, node }
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
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::debug!(error = %e, "posting an event");
            }
        });
    }
}
