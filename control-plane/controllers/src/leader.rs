//! Leader election through a `coordination.k8s.io/v1` Lease, so that of several
//! `keelson-server` members only one runs the controllers. A candidate takes the Lease when
//! it is free or when its holder has not renewed it for `leaseDurationSeconds` (timed on the
//! candidate's own clock from the last change it saw, so clocks need not agree); the leader
//! renews every retry period and steps down when renewal keeps failing past the deadline.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Options, Result, error::ApiContext as _, manager};

const NAMESPACE: &str = "kube-system";
const NAME: &str = "keelson-controller-manager";

struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    /// The Lease's resourceVersion when last seen, and when it was seen.
    observed: Option<(String, Instant)>,
}

fn micro_now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl Elector {
    /// Takes or renews the Lease; whether this member holds it now.
    async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let secs = i32::try_from(self.duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1);
        let current = self
            .api
            .get_opt(NAME)
            .await
            .ctx(|| "reading the leader Lease".into())?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(NAME.into()),
                    namespace: Some(NAMESPACE.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(micro_now()),
                    renew_time: Some(micro_now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e).ctx(|| "creating the leader Lease".into()),
            };
        };
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let now = Instant::now();
        let seen_at = match &self.observed {
            Some((old, at)) if *old == rv => *at,
            _ => {
                self.observed = Some((rv, now));
                now
            }
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours {
            let their = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(secs)).unwrap_or(0),
            );
            if !holder.is_empty() && now < seen_at + their {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(micro_now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(previous = %holder, identity = %self.identity, "taking the controller-manager Lease");
        }
        spec.renew_time = Some(micro_now());
        spec.lease_duration_seconds = Some(secs);
        match self.api.replace(NAME, &PostParams::default(), &lease).await {
            Ok(updated) => {
                self.observed = updated
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e).ctx(|| "renewing the leader Lease".into()),
        }
    }

    /// Gives the Lease up so that another member takes over at once.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(NAME).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(micro_now());
        if let Err(e) = self.api.replace(NAME, &PostParams::default(), &lease).await {
            tracing::debug!(error = %e, "releasing the leader Lease failed");
        }
    }
}

/// Runs the controllers whenever this member leads, until `stop`.
pub(crate) async fn run_elected(client: Client, opts: Options, stop: CancellationToken) {
    let mut elector = Elector {
        api: Api::namespaced(client.clone(), NAMESPACE),
        identity: opts.identity.clone(),
        duration: opts.lease_duration,
        observed: None,
    };
    loop {
        // Candidate: try until the Lease is ours.
        loop {
            match elector.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(opts.retry_period) => {}
            }
        }
        tracing::info!(identity = %opts.identity, "leading: starting the controllers");
        let term = stop.child_token();
        let controllers = manager::run_all(client.clone(), &opts, term.clone());
        let mut controllers = std::pin::pin!(controllers);
        let mut last_renew = Instant::now();
        let mut finished = false;
        loop {
            tokio::select! {
                () = &mut controllers => {
                    finished = true;
                    break;
                }
                () = tokio::time::sleep(opts.retry_period) => {}
            }
            match elector.try_acquire_or_renew().await {
                Ok(true) => last_renew = Instant::now(),
                Ok(false) => {
                    tracing::warn!(
                        "another member holds the controller-manager Lease: stepping down"
                    );
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the controller-manager Lease"),
            }
            if last_renew.elapsed() > opts.renew_deadline {
                tracing::warn!(
                    "could not renew the controller-manager Lease in time: stepping down"
                );
                break;
            }
        }
        term.cancel();
        if !finished {
            controllers.await;
        }
        if stop.is_cancelled() {
            elector.release().await;
            return;
        }
    }
}
