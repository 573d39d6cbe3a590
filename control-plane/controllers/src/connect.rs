//! Connecting to the API server from a kubeconfig, for running the controllers beside an API
//! server that is still starting (its kubeconfig may not be written, or it may not answer).

use std::{future::Future, path::Path, time::Duration};

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{Error, Options, Result};

async fn connect(path: &Path) -> Result<Client> {
    let fail = |e: String| Error::Connect(format!("{}: {e}", path.display()));
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let client = Client::try_from(config).map_err(|e| fail(e.to_string()))?;
    client
        .apiserver_version()
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(client)
}

/// Waits until the kubeconfig at `path` is readable and its API server answers, then
/// [`run`](crate::run)s the controllers until `shutdown`.
///
/// # Errors
/// An option is invalid.
pub async fn run_with_kubeconfig(
    path: impl AsRef<Path>,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let client = loop {
        match connect(path.as_ref()).await {
            Ok(c) => break c,
            Err(e) => tracing::debug!(error = %e, "waiting for the API server"),
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    };
    crate::run(client, opts, shutdown).await
}
