//! One watch per resource type, shared by every controller: a kube-runtime reflector keeps
//! the cache, and handlers registered before the start hear of each change after the cache
//! holds it (so a handler that queues a key lets its reconciler read the new state).

use std::{fmt::Debug, sync::Arc};

use futures::StreamExt as _;
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store, store::Writer},
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{util::Key, workqueue::WorkQueue};

/// What changed.
pub(crate) enum Change<'a, K> {
    /// Added or modified.
    Applied(&'a K),
    /// Deleted.
    Deleted(&'a K),
    /// The watch restarted and the cache was replaced by a fresh list (deletions during the
    /// gap are not reported one by one).
    Relisted,
}

type Handler<K> = Box<dyn Fn(Change<'_, K>) + Send + Sync>;

/// A cache of one resource type and the handlers told of its changes.
pub(crate) struct Informer<K: Resource<DynamicType = ()> + Clone + 'static> {
    api: Api<K>,
    config: watcher::Config,
    reader: Store<K>,
    writer: Writer<K>,
    handlers: Vec<Handler<K>>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    /// An informer over `api`; nothing is watched until [`Informer::spawn`].
    pub fn new(api: Api<K>, config: watcher::Config) -> Self {
        let writer = Writer::default();
        Informer {
            api,
            config,
            reader: writer.as_reader(),
            writer,
            handlers: Vec::new(),
        }
    }

    /// The cache (empty until the first list completes; see `Store::wait_until_ready`).
    pub fn store(&self) -> Store<K> {
        self.reader.clone()
    }

    /// Registers a handler.
    pub fn on(&mut self, f: impl Fn(Change<'_, K>) + Send + Sync + 'static) {
        self.handlers.push(Box::new(f));
    }

    /// Queues the key of every changed object on `queue`, and every cached key after a
    /// relist: what a controller of this resource type needs to hear of its own objects.
    pub fn queue_keys(&mut self, queue: &WorkQueue<Key>) {
        let (queue, store) = (queue.clone(), self.store());
        self.on(move |c| match c {
            Change::Applied(o) | Change::Deleted(o) => queue.add(Key::of(o)),
            Change::Relisted => store
                .state()
                .iter()
                .for_each(|o| queue.add(Key::of(o.as_ref()))),
        });
    }

    /// On a change of one of this informer's objects, queues every object of `owners` in the
    /// same namespace (all of them after a relist): for controllers whose objects are computed
    /// from this kind, e.g. Services whose endpoints depend on pods' labels and readiness.
    pub fn queue_namespace_of<O>(&mut self, owners: Store<O>, queue: &WorkQueue<Key>)
    where
        O: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    {
        let queue = queue.clone();
        self.on(move |c| {
            let ns = match c {
                Change::Applied(o) | Change::Deleted(o) => o.meta().namespace.clone(),
                Change::Relisted => None,
            };
            for owner in owners.state() {
                if ns.is_none() || owner.meta().namespace == ns {
                    queue.add(Key::of(owner.as_ref()));
                }
            }
        });
    }

    /// Starts watching until `cancel`.
    pub fn spawn(self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let handlers: Arc<[Handler<K>]> = self.handlers.into();
        let kind = K::kind(&()).into_owned();
        tokio::spawn(async move {
            let stream = reflector::reflector(
                self.writer,
                watcher::watcher(self.api, self.config).default_backoff(),
            );
            let mut stream = std::pin::pin!(stream);
            loop {
                let event = tokio::select! {
                    () = cancel.cancelled() => return,
                    e = stream.next() => e,
                };
                match event {
                    None => return,
                    Some(Err(e)) => tracing::warn!(%kind, error = %e, "watch failed, retrying"),
                    Some(Ok(Event::Apply(o))) => {
                        handlers.iter().for_each(|h| h(Change::Applied(&o)))
                    }
                    Some(Ok(Event::Delete(o))) => {
                        handlers.iter().for_each(|h| h(Change::Deleted(&o)))
                    }
                    Some(Ok(Event::InitDone)) => handlers.iter().for_each(|h| h(Change::Relisted)),
                    Some(Ok(Event::Init | Event::InitApply(_))) => {}
                }
            }
        })
    }
}

/// Waits until the cache holds its first complete list.
pub(crate) async fn ready<K>(store: &Store<K>, cancel: &CancellationToken) -> bool
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    tokio::select! {
        () = cancel.cancelled() => false,
        r = store.wait_until_ready() => r.is_ok(),
    }
}
