//! Helpers shared by the store's integration tests: an in-process cluster on 127.0.0.1 and
//! wait-for-condition loops with a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keelson_server::store::{Consistency, Outcome, Revision, Store, StoreConfig, WriteResult};
use tokio::net::TcpListener;
use tokio::time::Instant;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Poll `check` until it returns Some or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Cluster {
    root: tempfile::TempDir,
    addrs: BTreeMap<u64, SocketAddr>,
    /// The running members.
    pub members: BTreeMap<u64, Arc<Store>>,
    configure: fn(StoreConfig) -> StoreConfig,
}

pub fn fast(config: StoreConfig) -> StoreConfig {
    config.with_timing(
        Duration::from_millis(50),
        (Duration::from_millis(250), Duration::from_millis(500)),
    )
}

impl Cluster {
    pub fn new(configure: fn(StoreConfig) -> StoreConfig) -> Self {
        init_tracing();
        Cluster {
            root: tempfile::tempdir().expect("tempdir"),
            addrs: BTreeMap::new(),
            members: BTreeMap::new(),
            configure,
        }
    }

    /// Start member `id`, on its previous address if it ran before.
    pub async fn start(&mut self, id: u64) -> Arc<Store> {
        let addr = self
            .addrs
            .get(&id)
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(addr).await.expect("bind 127.0.0.1");
        let config = (self.configure)(fast(StoreConfig::new(
            id,
            self.root.path().join(format!("m{id}")),
        )));
        let store = Arc::new(Store::start(config, listener).await.expect("start member"));
        self.addrs.insert(id, store.addr());
        self.members.insert(id, store.clone());
        store
    }

    /// Start members `ids` and bootstrap them as one cluster.
    pub async fn bootstrap(configure: fn(StoreConfig) -> StoreConfig, ids: &[u64]) -> Self {
        let mut cluster = Cluster::new(configure);
        for id in ids {
            cluster.start(*id).await;
        }
        let members: BTreeMap<u64, String> = cluster
            .addrs
            .iter()
            .map(|(id, addr)| (*id, addr.to_string()))
            .collect();
        cluster.members[&ids[0]]
            .initialize(members)
            .await
            .expect("initialize");
        cluster.leader().await;
        cluster
    }

    pub fn member(&self, id: u64) -> Arc<Store> {
        self.members[&id].clone()
    }

    /// The leader all running members agree on.
    pub async fn leader(&self) -> u64 {
        wait_for("an agreed leader", || async {
            let mut leaders = BTreeSet::new();
            for store in self.members.values() {
                leaders.insert(store.leader().await?);
            }
            let leader = *leaders.first()?;
            (leaders.len() == 1 && self.members.contains_key(&leader)).then_some(leader)
        })
        .await
    }

    pub async fn kill(&mut self, id: u64) {
        let store = self.members.remove(&id).expect("running member");
        store.shutdown().await;
    }

    pub async fn stop_all(&mut self) {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }
}

pub fn applied_revision(result: &WriteResult) -> Revision {
    match &result.outcome {
        Outcome::Applied { kv, .. } => kv.mod_revision,
        other => panic!("write not applied: {other:?}"),
    }
}

pub async fn value(store: &Store, key: &str, consistency: Consistency) -> Option<Vec<u8>> {
    store
        .get(key, None, consistency)
        .await
        .expect("get")
        .map(|kv| kv.value)
}
