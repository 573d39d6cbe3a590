//! The API server over an in-memory store, for trying clients against it:
//! `cargo run -p keelson-apiserver --example memory-server -- 127.0.0.1:8080`.

use std::sync::Arc;

use keelson_apiserver::{Api, Config, storage::memory::MemoryStore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let api = Api::new(Arc::new(MemoryStore::default()), Config::default());
    api.bootstrap().await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "serving the Kubernetes API on http://{}",
        listener.local_addr()?
    );
    api.serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
