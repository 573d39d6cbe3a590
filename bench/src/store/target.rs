//! The one client-side interface the load generator drives, with an implementation for each
//! system: Keelson through its [`StoreClient`], etcd through the `etcd-client` crate.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use keelson_server::store::StoreClient;

/// One connection's worth of client: issues writes and waits for their acknowledgement.
pub trait KvWriter: Clone + Send + Sync + 'static {
    /// Write `value` at `key`; done when the system acknowledged it as committed.
    fn put(&self, key: String, value: Vec<u8>) -> impl Future<Output = Result<()>> + Send;
}

/// A system under test: opens independent connections to it.
pub trait System {
    /// The client it hands out.
    type Writer: KvWriter;
    /// Name in tables and files.
    fn name(&self) -> &'static str;
    /// A new client with a connection of its own.
    fn connect(&self) -> impl Future<Output = Result<Self::Writer>>;
}

/// Per-request deadline for both systems.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Keelson's store, reached through the members' gRPC addresses.
pub struct Keelson {
    /// The members' addresses.
    pub addrs: Vec<String>,
}

/// A [`StoreClient`] (it follows leader hints, so writes go straight to the leader).
#[derive(Clone)]
pub struct KeelsonWriter(Arc<StoreClient>);

impl System for Keelson {
    type Writer = KeelsonWriter;

    fn name(&self) -> &'static str {
        "keelson"
    }

    async fn connect(&self) -> Result<KeelsonWriter> {
        Ok(KeelsonWriter(Arc::new(StoreClient::new(
            self.addrs.clone(),
            TIMEOUT,
        ))))
    }
}

impl KvWriter for KeelsonWriter {
    async fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        self.0.put(key, value).await?;
        Ok(())
    }
}

/// etcd, reached at its leader's client URL (followers would forward to it anyway).
pub struct Etcd {
    /// The leader's client URL.
    pub url: String,
}

/// etcd's KV client.
#[derive(Clone)]
pub struct EtcdWriter(etcd_client::KvClient);

impl System for Etcd {
    type Writer = EtcdWriter;

    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn connect(&self) -> Result<EtcdWriter> {
        let options = etcd_client::ConnectOptions::new().with_timeout(TIMEOUT);
        let client = etcd_client::Client::connect([&self.url], Some(options))
            .await
            .with_context(|| format!("connecting to etcd at {}", self.url))?;
        Ok(EtcdWriter(client.kv_client()))
    }
}

impl KvWriter for EtcdWriter {
    async fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        self.0.clone().put(key, value, None).await?;
        Ok(())
    }
}
