//! Recording `v1` Events about the objects the controllers act on, in the background so that
//! a slow or failing Event write never holds up a reconcile.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use kube::{Client, Resource, api::PostParams};

/// Writes Events on behalf of one component.
#[derive(Clone)]
pub(crate) struct Recorder {
    client: Client,
    component: &'static str,
}

/// `Normal` or `Warning`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Type {
    /// Something expected happened.
    Normal,
    /// Something needs attention.
    Warning,
}

impl Recorder {
    /// A recorder for `component` (e.g. `default-scheduler`).
    pub fn new(client: Client, component: &'static str) -> Self {
        Recorder { client, component }
    }

    /// The client Events are written with.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Records an Event about `obj`.
    pub fn record<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        kind: Type,
        reason: &str,
        message: String,
    ) {
        let m = obj.meta();
        let involved = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            resource_version: m.resource_version.clone(),
            ..ObjectReference::default()
        };
        let ns = m.namespace.clone().unwrap_or_else(|| "default".into());
        let now = crate::util::now();
        let event = Event {
            metadata: kube::api::ObjectMeta {
                generate_name: Some(format!("{}.", m.name.as_deref().unwrap_or("object"))),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: involved,
            reason: Some(reason.to_owned()),
            message: Some(message),
            type_: Some(
                match kind {
                    Type::Normal => "Normal",
                    Type::Warning => "Warning",
                }
                .to_owned(),
            ),
            source: Some(EventSource {
                component: Some(self.component.to_owned()),
                host: None,
            }),
            reporting_component: Some(self.component.to_owned()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = create(&client, &ns, &event).await {
                tracing::debug!(error = %e, "recording an event failed");
            }
        });
    }
}

/// Creates `event` in `ns`. The answer (the stored Event) is not needed: it is not decoded,
/// which saves a typed parse per Event (the scheduler records one per binding).
async fn create(client: &Client, ns: &str, event: &Event) -> kube::Result<()> {
    let body = serde_json::to_vec(event).map_err(kube::Error::SerdeError)?;
    let request = kube::core::Request::new(Event::url_path(&(), Some(ns)))
        .create(&PostParams::default(), body)
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(request).await.map(drop)
}
