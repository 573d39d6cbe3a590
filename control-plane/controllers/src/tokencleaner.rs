//! Deletes expired bootstrap tokens (their Secrets in `kube-system`), like Kubernetes'
//! token cleaner. The authenticator already refuses an expired token; this keeps them from
//! piling up.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use keelson_api_types::bootstrap_token::{NAMESPACE, SECRET_TYPE, TokenInfo};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Preconditions},
};
use tokio_util::sync::CancellationToken;

/// Sweeps every `period` until `cancel`.
pub(crate) async fn run(client: Client, period: Duration, cancel: CancellationToken) {
    let api: Api<Secret> = Api::namespaced(client, NAMESPACE);
    loop {
        if let Err(e) = sweep(&api, jiff::Timestamp::now()).await {
            tracing::debug!(error = %e, "cleaning bootstrap tokens");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// Deletes the tokens expired at `now`; how many.
async fn sweep(api: &Api<Secret>, now: jiff::Timestamp) -> Result<usize, kube::Error> {
    let list = api
        .list(&ListParams::default().fields(&format!("type={SECRET_TYPE}")))
        .await?;
    let mut deleted = 0;
    for secret in &list.items {
        let Some(info) = TokenInfo::from_secret(secret) else {
            continue;
        };
        if !info.expired(now) {
            continue;
        }
        let Some(name) = secret.metadata.name.as_deref() else {
            continue;
        };
        // Only the Secret we looked at: a token re-created under the same id stays.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: secret.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => {
                tracing::info!(token = %info.id, "deleted expired bootstrap token");
                deleted += 1;
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
