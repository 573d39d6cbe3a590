//! Getting a container's image before it starts, as its `imagePullPolicy` says: pulls run in
//! the background (one per image however many containers wait for it) while the container
//! waits in `ContainerCreating`; a failed pull shows `ErrImagePull`, then `ImagePullBackOff`
//! until the back-off (the restart back-off's base and maximum) has passed;
//! `ErrImageNeverPull` and `InvalidImageName` need no pull at all. The pod is synced again
//! when its pull ends or its back-off has passed. Credentials come from the
//! pod's `imagePullSecrets` (dockerconfigjson Secrets read through the API).

use std::time::Instant;

use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use kube::Api;

use super::{PodManager, PodRecord};
use crate::image::{
    PullPolicy, Pulled, RegistryAuth, credentials_for, normalize_ref, parse_reference,
};
use crate::pods::events::Kind;

/// Whether a container's image is there to start it.
pub(super) enum ImageReady {
    /// In the store, no pull needed.
    Present,
    /// Just pulled.
    Pulled(Pulled),
    /// A pull is running.
    Pending,
    /// The waiting reason and message.
    Failed(String, String),
}

impl PodManager {
    /// Checks, pulls or reports the image of `c` by its pull policy.
    pub(super) async fn ensure_image(
        &mut self,
        pod: &Pod,
        record: &PodRecord,
        c: &Container,
    ) -> ImageReady {
        let image = c.image.clone().unwrap_or_default();
        let name = Some(c.name.as_str());
        let reference = match parse_reference(&image) {
            Ok(r) => r,
            Err(e) => {
                let message = format!("Failed to apply default image tag {image:?}: {e}");
                self.report_once(pod, record, c, "InspectFailed", &message);
                return ImageReady::Failed("InvalidImageName".to_owned(), message);
            }
        };
        let policy = PullPolicy::for_container(c.image_pull_policy.as_deref(), &image);
        let present = self.images.lookup(&image).ok().flatten().is_some();
        let pulling = self
            .pods
            .get(&record.uid)
            .and_then(|m| m.containers.get(&c.name))
            .is_some_and(|m| m.pull.is_some());
        match policy {
            // A pull started earlier: its outcome decides, below.
            _ if pulling => {}
            PullPolicy::Never if !present => {
                let message =
                    format!("Container image {image:?} is not present with pull policy of Never");
                self.report_once(pod, record, c, "ErrImageNeverPull", &message);
                return ImageReady::Failed("ErrImageNeverPull".to_owned(), message);
            }
            PullPolicy::Never => return ImageReady::Present,
            PullPolicy::IfNotPresent if present => return ImageReady::Present,
            _ => {}
        }
        let (base, max) = (self.cfg.backoff_base, self.cfg.backoff_max);
        let events = self.events.clone();
        let mem = self
            .mem(record)
            .containers
            .entry(c.name.clone())
            .or_default();
        if let Some(handle) = &mem.pull {
            let Some(result) = handle.result() else {
                return ImageReady::Pending;
            };
            mem.pull = None;
            return match result {
                Ok(pulled) => {
                    mem.pull_failures = 0;
                    mem.pull_retry_at = None;
                    ImageReady::Pulled(pulled)
                }
                Err(e) => {
                    mem.pull_failures += 1;
                    let factor = 1u32
                        .checked_shl(mem.pull_failures.saturating_sub(1).min(16))
                        .unwrap_or(u32::MAX);
                    let delay = base.saturating_mul(factor).min(max);
                    mem.pull_retry_at = Some(Instant::now() + delay);
                    mem.pull_error = e.clone();
                    mem.pull_backoff_reported = false;
                    events.emit(
                        pod,
                        name,
                        Kind::Warning,
                        "Failed",
                        format!("Failed to pull image {image:?}: {e}"),
                    );
                    events.emit(
                        pod,
                        name,
                        Kind::Warning,
                        "Failed",
                        "Error: ErrImagePull".into(),
                    );
                    ImageReady::Failed("ErrImagePull".to_owned(), e)
                }
            };
        }
        if let Some(at) = mem.pull_retry_at
            && Instant::now() < at
        {
            if !mem.pull_backoff_reported {
                mem.pull_backoff_reported = true;
                events.emit(
                    pod,
                    name,
                    Kind::Normal,
                    "BackOff",
                    format!("Back-off pulling image {image:?}"),
                );
                events.emit(
                    pod,
                    name,
                    Kind::Warning,
                    "Failed",
                    "Error: ImagePullBackOff".into(),
                );
            }
            let message = format!("Back-off pulling image {image:?}: {}", mem.pull_error);
            self.requeue(&record.uid, at);
            return ImageReady::Failed("ImagePullBackOff".to_owned(), message);
        }
        let auth = self.pull_auth(pod, reference.registry()).await;
        let handle = self.puller.start(&image, auth);
        // The pod is synced again when the pull is over.
        let (waiting, waker, uid) = (handle.clone(), self.waker.clone(), record.uid.clone());
        tokio::spawn(async move {
            let _ = waiting.wait().await;
            waker.pod(&uid);
        });
        events.emit(
            pod,
            name,
            Kind::Normal,
            "Pulling",
            format!("Pulling image {image:?}"),
        );
        tracing::info!(pod = %record.name, container = %c.name, image = %normalize_ref(&image), "pulling");
        let mem = self
            .mem(record)
            .containers
            .entry(c.name.clone())
            .or_default();
        mem.pull = Some(handle);
        ImageReady::Pending
    }

    /// A Warning event `reason: message` for `c`, unless it was the last one reported.
    fn report_once(
        &mut self,
        pod: &Pod,
        record: &PodRecord,
        c: &Container,
        reason: &str,
        message: &str,
    ) {
        let events = self.events.clone();
        let mem = self
            .mem(record)
            .containers
            .entry(c.name.clone())
            .or_default();
        if mem.failure_reported.as_deref() != Some(message) {
            mem.failure_reported = Some(message.to_owned());
            events.emit(
                pod,
                Some(&c.name),
                Kind::Warning,
                reason,
                message.to_owned(),
            );
        }
    }

    /// The credentials the pod's `imagePullSecrets` hold for `registry`; anonymous when
    /// none match (a Secret that cannot be read is logged and skipped).
    async fn pull_auth(&self, pod: &Pod, registry: &str) -> RegistryAuth {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let names = pod
            .spec
            .iter()
            .flat_map(|s| s.image_pull_secrets.iter().flatten())
            .map(|r| r.name.clone());
        for name in names {
            let secret = match api.get(&name).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "reading an image pull secret");
                    continue;
                }
            };
            let data = secret.data.unwrap_or_default();
            for key in [".dockerconfigjson", ".dockercfg"] {
                if let Some(auth) = data.get(key).and_then(|b| credentials_for(&b.0, registry)) {
                    return auth;
                }
            }
        }
        RegistryAuth::Anonymous
    }
}
