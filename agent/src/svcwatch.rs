//! The cluster's Services and EndpointSlices as one watch stream, with what a consumer needs
//! to follow a (re)list — shared by the eBPF service proxy and the cluster DNS, which both
//! mirror the same two kinds.

use std::collections::HashSet;

use futures::{Stream, StreamExt as _, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};

use crate::proxy::desired::SERVICE_NAME_LABEL;

/// A Service's namespace and name.
pub(crate) type Key = (String, String);

/// One event of either kind. Boxed: a Service is twice the size of an EndpointSlice, and
/// events are moved around.
pub(crate) enum Change {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
}

/// Watches Services and EndpointSlices in every namespace (with kube-rs' default back-off on
/// errors), merged into one stream.
pub(crate) fn changes(client: Client) -> impl Stream<Item = Result<Change, watcher::Error>> {
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(|e| Change::Service(Box::new(e))));
    let slices = watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(|e| Change::Slice(Box::new(e))));
    stream::select(services, slices)
}

/// One kind's (re)list in progress: what it has seen so far.
#[derive(Default)]
pub(crate) struct Relist<T> {
    /// The keys seen since the (re)list began; None when no list is in progress.
    pub seen: Option<HashSet<T>>,
    /// Listed completely at least once.
    pub synced: bool,
}

/// The Service an EndpointSlice belongs to (by its `kubernetes.io/service-name` label) and the
/// slice's own name.
pub(crate) fn slice_key(slice: &EndpointSlice) -> Option<(Key, String)> {
    let service = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some((
        (slice.namespace().unwrap_or_default(), service.clone()),
        slice.name_any(),
    ))
}
