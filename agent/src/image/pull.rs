//! Pulling images from an OCI registry (distribution API, through `oci-client`) into the
//! content-addressed store: the manifest (an image index resolved to its linux/amd64 entry),
//! the config and the layers, each checked against its digest, blobs already in the store
//! (from an import or another image) not fetched again; layers unpacked once the image is
//! complete, then its name set. Anonymous, basic and token authentication (the registry's
//! bearer-token challenge is answered by `oci-client`); plain HTTP only for the registries
//! listed as insecure. Concurrent pulls of one image with the same credentials share a single
//! download. Each pull uses a client of its own: `oci-client` remembers the first credentials
//! it sees for a registry, and one pod's must not serve another's pull.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest};
use tokio::sync::watch;

use super::import::platform_manifest;
use super::{ImageError, ImageStore, Result, normalize_ref};

const MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// How the agent reaches registries.
#[derive(Debug, Clone, Default)]
pub struct PullConfig {
    /// Registries (`host:port`) spoken to over plain HTTP instead of HTTPS.
    pub insecure_registries: Vec<String>,
}

/// An image pulled into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The manifest digest.
    pub digest: String,
    /// The config and layer blobs' total size in bytes.
    pub size: u64,
    /// Bytes actually downloaded (blobs the store lacked).
    pub fetched: u64,
    /// How long the pull took.
    pub elapsed: Duration,
}

type Outcome = Option<std::result::Result<Pulled, String>>;

/// A pull in progress, shared by everyone who asked for the same image meanwhile.
#[derive(Debug, Clone)]
pub struct PullHandle {
    rx: watch::Receiver<Outcome>,
}

impl PullHandle {
    /// The outcome, once the pull is over; the error as text.
    pub fn result(&self) -> Option<std::result::Result<Pulled, String>> {
        self.rx.borrow().clone()
    }

    /// Waits for the outcome.
    pub async fn wait(mut self) -> std::result::Result<Pulled, String> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_else(|| Err("pull ended".to_owned())),
            Err(_) => Err("the pull task ended without a result".to_owned()),
        }
    }
}

/// Pulls images into a store.
pub struct Puller {
    store: ImageStore,
    protocol: ClientProtocol,
    inflight: Mutex<HashMap<String, PullHandle>>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Parses an image reference as a registry pull would (`busybox` is
/// `docker.io/library/busybox:latest`).
///
/// # Errors
/// [`ImageError::InvalidReference`] when it is not a valid reference.
pub fn parse_reference(image: &str) -> Result<Reference> {
    let trimmed = image.trim();
    if trimmed.is_empty() || trimmed != image {
        return Err(ImageError::InvalidReference(image.to_owned()));
    }
    Reference::try_from(image).map_err(|_| ImageError::InvalidReference(image.to_owned()))
}

fn registry_err(reference: &Reference, e: impl std::fmt::Display) -> ImageError {
    ImageError::Registry {
        reference: reference.whole(),
        message: e.to_string(),
    }
}

fn join_err(e: tokio::task::JoinError) -> ImageError {
    ImageError::Format(format!("image task failed: {e}"))
}

impl Puller {
    /// A puller into `store`.
    pub fn new(store: ImageStore, cfg: &PullConfig) -> Self {
        // reqwest is built without a TLS provider of its own: use ring, as kube does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if cfg.insecure_registries.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(cfg.insecure_registries.clone())
        };
        Puller {
            store,
            protocol,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: self.protocol.clone(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("keelson-agent/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })
    }

    /// The store pulled into.
    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    /// Starts pulling `image` in the background, or joins the pull of it already running.
    pub fn start(self: &Arc<Self>, image: &str, auth: RegistryAuth) -> PullHandle {
        let key = format!("{}\0{}", normalize_ref(image), auth_key(&auth));
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = inflight.get(&key)
            && h.result().is_none()
        {
            return h.clone();
        }
        let (tx, rx) = watch::channel(None);
        let handle = PullHandle { rx };
        inflight.insert(key.clone(), handle.clone());
        drop(inflight);
        let this = Arc::clone(self);
        let image = image.to_owned();
        tokio::spawn(async move {
            let result = this.pull(&image, &auth).await.map_err(|e| e.to_string());
            match &result {
                Ok(p) => tracing::info!(image, digest = %p.digest, "pulled"),
                Err(e) => tracing::warn!(image, error = %e, "pull failed"),
            }
            let mut inflight = this.inflight.lock().unwrap_or_else(|e| e.into_inner());
            inflight.remove(&key);
            let _ = tx.send(Some(result));
        });
        handle
    }

    /// Pulls `image` into the store and names it by `image` (normalized).
    ///
    /// # Errors
    /// [`ImageError::InvalidReference`], [`ImageError::Registry`] for what the registry
    /// refused or a connection failure, digest and store errors.
    pub async fn pull(&self, image: &str, auth: &RegistryAuth) -> Result<Pulled> {
        let started = Instant::now();
        let reference = parse_reference(image)?;
        let client = self.client();
        let store = self.store.clone();
        let _gc = tokio::task::spawn_blocking(move || store.lock(false))
            .await
            .map_err(join_err)??;
        let (mut bytes, mut digest) = manifest(&client, &reference, auth).await?;
        let mut source = reference.clone();
        if is_index(&bytes) {
            let index = ImageIndex::from_reader(bytes.as_slice())
                .map_err(|e| registry_err(&reference, format!("bad image index: {e}")))?;
            let wanted = platform_manifest(&index).ok_or_else(|| {
                registry_err(&reference, "the image index has no linux/amd64 image")
            })?;
            source = Reference::with_digest(
                reference.registry().to_owned(),
                reference.repository().to_owned(),
                wanted,
            );
            (bytes, digest) = manifest(&client, &source, auth).await?;
        }
        let manifest = ImageManifest::from_reader(bytes.as_slice())
            .map_err(|e| registry_err(&reference, format!("bad image manifest: {e}")))?;
        let mut size = 0;
        let mut fetched = 0;
        for desc in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let blob = desc.digest().to_string();
            size += desc.size();
            if self.store.blob_path(&blob)?.exists() {
                continue;
            }
            self.fetch_blob(&client, &source, &blob).await?;
            fetched += desc.size();
        }
        let stored = self.store.put_blob_bytes(&bytes)?;
        if stored != digest {
            return Err(ImageError::DigestMismatch {
                expected: digest,
                actual: stored,
            });
        }
        let store = self.store.clone();
        let name = image.to_owned();
        let layers: Vec<String> = manifest
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .collect();
        let d = digest.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for layer in &layers {
                store.unpacked_layer(layer)?;
            }
            store.set_ref(&name, &d)
        })
        .await
        .map_err(join_err)??;
        Ok(Pulled {
            digest,
            size,
            fetched,
            elapsed: started.elapsed(),
        })
    }

    /// Downloads blob `digest` to a temporary file and moves it into the store once its
    /// content checks out.
    async fn fetch_blob(&self, client: &Client, source: &Reference, digest: &str) -> Result<()> {
        let tmp = self.store.temp_file()?;
        let file = tmp
            .reopen()
            .map_err(|e| ImageError::io("open", tmp.path(), e))?;
        client
            .pull_blob(source, digest, tokio::fs::File::from_std(file))
            .await
            .map_err(|e| registry_err(source, format!("blob {digest}: {e}")))?;
        let store = self.store.clone();
        let d = digest.to_owned();
        tokio::task::spawn_blocking(move || store.commit_blob(&d, tmp))
            .await
            .map_err(join_err)??;
        Ok(())
    }
}

/// The manifest `reference` names, raw, with its digest.
async fn manifest(
    client: &Client,
    reference: &Reference,
    auth: &RegistryAuth,
) -> Result<(Vec<u8>, String)> {
    let (bytes, digest) = client
        .pull_manifest_raw(reference, auth, &MANIFEST_TYPES)
        .await
        .map_err(|e| registry_err(reference, e))?;
    Ok((bytes.to_vec(), digest))
}

/// Tells credentials apart without keeping them in the clear.
fn auth_key(auth: &RegistryAuth) -> String {
    use sha2::Digest as _;
    let text = match auth {
        RegistryAuth::Anonymous => return String::new(),
        RegistryAuth::Basic(u, p) => format!("basic\0{u}\0{p}"),
        RegistryAuth::Bearer(t) => format!("bearer\0{t}"),
    };
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Whether a manifest document is an image index (or Docker manifest list).
fn is_index(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| {
        v.get("manifests").is_some()
            || v.get("mediaType")
                .and_then(|m| m.as_str())
                .is_some_and(|m| {
                    m == OCI_IMAGE_INDEX_MEDIA_TYPE || m == IMAGE_MANIFEST_LIST_MEDIA_TYPE
                })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_or_are_invalid() {
        assert!(parse_reference("busybox").is_ok());
        assert!(parse_reference("127.0.0.1:5000/app/web:1").is_ok());
        for bad in ["", " busybox", "Busybox:1", "a b", "x:y:z:"] {
            assert!(
                matches!(parse_reference(bad), Err(ImageError::InvalidReference(_))),
                "{bad:?} should be invalid"
            );
        }
    }

    #[tokio::test]
    async fn concurrent_pulls_of_one_image_coalesce() {
        // A "registry" that accepts connections and never answers: the pull stays in flight.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(dir.path()).expect("store");
        let puller = Arc::new(Puller::new(
            store,
            &PullConfig {
                insecure_registries: vec![addr.to_string()],
            },
        ));
        let image = format!("{addr}/app:1");
        let a = puller.start(&image, RegistryAuth::Anonymous);
        let b = puller.start(&image, RegistryAuth::Anonymous);
        let other_creds = puller.start(&image, RegistryAuth::Basic("u".into(), "p".into()));
        assert!(a.rx.same_channel(&b.rx), "the second pull joined the first");
        assert!(
            !a.rx.same_channel(&other_creds.rx),
            "other credentials pull on their own"
        );
        assert!(a.result().is_none() && b.result().is_none());
        drop(listener);
    }

    #[test]
    fn platform_entries_are_picked_from_indexes() {
        let index: ImageIndex = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1,
                 "digest": format!("sha256:{}", "a".repeat(64)),
                 "platform": {"os": "linux", "architecture": "arm64"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1,
                 "digest": format!("sha256:{}", "b".repeat(64)),
                 "platform": {"os": "linux", "architecture": "amd64"}},
            ]
        }))
        .expect("index");
        assert_eq!(
            platform_manifest(&index),
            Some(format!("sha256:{}", "b".repeat(64)))
        );
    }

    #[test]
    fn indexes_are_told_from_manifests() {
        assert!(is_index(br#"{"schemaVersion":2,"manifests":[]}"#));
        assert!(is_index(
            br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json"}"#
        ));
        assert!(!is_index(br#"{"schemaVersion":2,"config":{},"layers":[]}"#));
    }
}
