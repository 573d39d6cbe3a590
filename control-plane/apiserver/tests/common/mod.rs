//! An in-process API server over the in-memory store, and a kube-rs client for it.

use std::{sync::Arc, time::Duration};

use keelson_apiserver::{
    Config,
    server::{self, ServeOptions},
    storage::memory::MemoryStore,
};
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

/// Serves the API on a free loopback port with its PKI under `dir`; dropping the sender
/// stops it.
pub async fn start(dir: &std::path::Path) -> (Client, tokio::sync::oneshot::Sender<()>) {
    let opts = ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        pki_dir: dir.join("pki"),
        extra_sans: vec![],
        admin_kubeconfig: dir.join("kubeconfig"),
        token_file: None,
        config: Config::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        server::run(Arc::new(MemoryStore::default()), opts, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    let path = dir.join("kubeconfig");
    tokio::time::timeout(Duration::from_secs(30), async {
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the server did not start");
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("client config");
    (Client::try_from(config).expect("client"), stop)
}
