//! Encryption at rest: a [`Storage`] wrapper that encrypts the values of chosen resources
//! (Secrets, typically) before they reach the store and decrypts them on the way out,
//! configured with Kubernetes' own `EncryptionConfiguration` file format.
//!
//! Providers: `aesgcm` (AES-GCM with 128- or 256-bit keys, a random 96-bit nonce per write,
//! the storage key as associated data so values cannot be moved between keys) and
//! `identity` (plain). The first provider of a resource encrypts new writes; every listed
//! provider can read, so keys can be rotated and plain data migrated by rewriting. Values
//! are stored as `k8s:enc:aesgcm:v1:<key name>:<nonce><ciphertext+tag>`, as Kubernetes
//! does. AES-GCM comes from `ring` (already used for TLS) rather than a second crypto stack.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use base64::Engine as _;
use ring::{
    aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom as _, SystemRandom},
};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{Continue, Event, RangePage, Revision, Storage, StorageError, Versioned};
use crate::resources;

/// Errors reading an encryption configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error("parsing the encryption configuration: {0}")]
    Parse(String),
    /// A listed resource is not served.
    #[error("resource {0:?} is not served by this API server")]
    UnknownResource(String),
    /// A key is unusable.
    #[error("key {name:?}: {reason}")]
    BadKey {
        /// The key's name.
        name: String,
        /// Why it is unusable.
        reason: String,
    },
    /// A provider other than aesgcm or identity.
    #[error(
        "provider {0:?} is not supported (supported: aesgcm, identity); \
         resource {1:?} cannot be configured"
    )]
    UnsupportedProvider(String, String),
    /// A resource without providers.
    #[error("resource {0:?} lists no providers")]
    NoProviders(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileConfig {
    kind: Option<String>,
    resources: Vec<ResourceConfig>,
}

#[derive(Deserialize)]
struct ResourceConfig {
    resources: Vec<String>,
    providers: Vec<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct AesGcmConfig {
    keys: Vec<KeyConfig>,
}

#[derive(Deserialize)]
struct KeyConfig {
    name: String,
    secret: String,
}

/// One named AES-GCM key.
struct AesKey {
    name: String,
    key: LessSafeKey,
}

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AesKey").field("name", &self.name).finish()
    }
}

/// How one provider transforms values.
#[derive(Debug)]
enum Provider {
    /// AES-GCM with these keys; the first encrypts.
    AesGcm(Vec<AesKey>),
    /// Stored as is.
    Identity,
}

const AESGCM_PREFIX: &str = "k8s:enc:aesgcm:v1:";

/// Providers for the keys under one storage prefix.
#[derive(Debug)]
struct Rule {
    prefix: String,
    providers: Vec<Provider>,
}

/// A parsed encryption configuration.
#[derive(Debug, Default)]
pub struct EncryptionConfig {
    rules: Vec<Rule>,
}

impl EncryptionConfig {
    /// Reads a Kubernetes `EncryptionConfiguration` (YAML or JSON) from `path`.
    ///
    /// # Errors
    /// Unreadable or invalid files, unknown resources, unsupported providers, bad keys.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses the text of an `EncryptionConfiguration`.
    ///
    /// # Errors
    /// As [`EncryptionConfig::load`].
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig =
            serde_norway::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        if let Some(kind) = file.kind.as_deref()
            && kind != "EncryptionConfiguration"
        {
            return Err(ConfigError::Parse(format!(
                "kind is {kind:?}, expected \"EncryptionConfiguration\""
            )));
        }
        let mut rules = Vec::new();
        for rc in file.resources {
            for name in &rc.resources {
                let (plural, group) = name.split_once('.').unwrap_or((name.as_str(), ""));
                let r = resources::RESOURCES
                    .iter()
                    .find(|r| r.plural == plural && r.group == group)
                    .ok_or_else(|| ConfigError::UnknownResource(name.clone()))?;
                let providers = rc
                    .providers
                    .iter()
                    .map(|p| provider(name, p))
                    .collect::<Result<Vec<_>, _>>()?;
                if providers.is_empty() {
                    return Err(ConfigError::NoProviders(name.clone()));
                }
                rules.push(Rule {
                    prefix: r.key_prefix(None),
                    providers,
                });
            }
        }
        Ok(EncryptionConfig { rules })
    }

    fn rule(&self, key: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| key.starts_with(&r.prefix))
    }

    /// The value to store for `key`.
    fn seal(&self, key: &str, plain: Vec<u8>) -> Result<Vec<u8>, StorageError> {
        let Some(rule) = self.rule(key) else {
            return Ok(plain);
        };
        match rule.providers.first() {
            Some(Provider::AesGcm(keys)) => match keys.first() {
                Some(k) => seal_aesgcm(k, key, plain),
                None => Ok(plain),
            },
            Some(Provider::Identity) | None => Ok(plain),
        }
    }

    /// The plain value of a stored one.
    fn open(&self, key: &str, stored: Vec<u8>) -> Result<Vec<u8>, StorageError> {
        let Some(rest) = stored.strip_prefix(AESGCM_PREFIX.as_bytes()) else {
            return Ok(stored);
        };
        let fail = |why: &str| StorageError::Transform(format!("decrypting {key}: {why}"));
        let colon = rest
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| fail("malformed value"))?;
        let name = std::str::from_utf8(&rest[..colon]).map_err(|_| fail("malformed key name"))?;
        let sealed = &rest[colon + 1..];
        let aes = self
            .rules
            .iter()
            .flat_map(|r| &r.providers)
            .filter_map(|p| match p {
                Provider::AesGcm(keys) => Some(keys),
                Provider::Identity => None,
            })
            .flatten()
            .find(|k| k.name == name)
            .ok_or_else(|| fail(&format!("no aesgcm key named {name:?} is configured")))?;
        if sealed.len() < NONCE_LEN {
            return Err(fail("value too short"));
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail("bad nonce"))?;
        let mut buf = ciphertext.to_vec();
        let plain = aes
            .key
            .open_in_place(nonce, Aad::from(key.as_bytes()), &mut buf)
            .map_err(|_| fail("authentication failed (wrong key or tampered value)"))?;
        Ok(plain.to_vec())
    }

    fn open_versioned(&self, key: &str, mut v: Versioned) -> Result<Versioned, StorageError> {
        v.value = self.open(key, std::mem::take(&mut v.value))?;
        Ok(v)
    }
}

fn provider(
    resource: &str,
    p: &serde_json::Map<String, serde_json::Value>,
) -> Result<Provider, ConfigError> {
    let (kind, body) = p
        .iter()
        .next()
        .ok_or_else(|| ConfigError::Parse(format!("an empty provider for {resource:?}")))?;
    match kind.as_str() {
        "identity" => Ok(Provider::Identity),
        "aesgcm" => {
            let cfg: AesGcmConfig = serde_json::from_value(body.clone())
                .map_err(|e| ConfigError::Parse(format!("aesgcm for {resource:?}: {e}")))?;
            let keys = cfg
                .keys
                .into_iter()
                .map(|k| {
                    let bad = |reason: &str| ConfigError::BadKey {
                        name: k.name.clone(),
                        reason: reason.to_owned(),
                    };
                    if k.name.is_empty() || k.name.contains(':') {
                        return Err(bad("a key name must be non-empty and contain no ':'"));
                    }
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(k.secret.trim())
                        .map_err(|_| bad("the secret is not valid base64"))?;
                    let alg = match raw.len() {
                        16 => &AES_128_GCM,
                        32 => &AES_256_GCM,
                        n => {
                            return Err(bad(&format!(
                                "the secret is {n} bytes; aesgcm needs 16 or 32"
                            )));
                        }
                    };
                    let key = UnboundKey::new(alg, &raw).map_err(|_| bad("unusable key"))?;
                    Ok(AesKey {
                        name: k.name,
                        key: LessSafeKey::new(key),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if keys.is_empty() {
                return Err(ConfigError::Parse(format!(
                    "aesgcm for {resource:?} lists no keys"
                )));
            }
            Ok(Provider::AesGcm(keys))
        }
        other => Err(ConfigError::UnsupportedProvider(
            other.to_owned(),
            resource.to_owned(),
        )),
    }
}

fn seal_aesgcm(k: &AesKey, key: &str, mut plain: Vec<u8>) -> Result<Vec<u8>, StorageError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| StorageError::Transform("no randomness for a nonce".into()))?;
    k.key
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(key.as_bytes()),
            &mut plain,
        )
        .map_err(|_| StorageError::Transform(format!("encrypting {key}")))?;
    let mut out =
        Vec::with_capacity(AESGCM_PREFIX.len() + k.name.len() + 1 + NONCE_LEN + plain.len());
    out.extend_from_slice(AESGCM_PREFIX.as_bytes());
    out.extend_from_slice(k.name.as_bytes());
    out.push(b':');
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&plain);
    Ok(out)
}

/// A store whose configured resources are encrypted at rest.
pub struct EncryptedStore {
    inner: Arc<dyn Storage>,
    config: Arc<EncryptionConfig>,
}

impl EncryptedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>, config: EncryptionConfig) -> Self {
        EncryptedStore {
            inner,
            config: Arc::new(config),
        }
    }
}

#[async_trait]
impl Storage for EncryptedStore {
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Versioned, StorageError> {
        let stored = self
            .inner
            .create(key, self.config.seal(key, value)?)
            .await?;
        self.config.open_versioned(key, stored)
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<Revision>,
    ) -> Result<Versioned, StorageError> {
        let sealed = self.config.seal(key, value)?;
        let stored = self.inner.update(key, sealed, expected).await?;
        self.config.open_versioned(key, stored)
    }

    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<Versioned, StorageError> {
        let gone = self.inner.delete(key, expected).await?;
        self.config.open_versioned(key, gone)
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StorageError> {
        self.inner
            .get(key)
            .await?
            .map(|v| self.config.open_versioned(key, v))
            .transpose()
    }

    async fn get_local(&self, key: &str) -> Result<Option<Versioned>, StorageError> {
        self.inner
            .get_local(key)
            .await?
            .map(|v| self.config.open_versioned(key, v))
            .transpose()
    }

    async fn range(
        &self,
        prefix: &str,
        from: Option<&Continue>,
        limit: usize,
    ) -> Result<RangePage, StorageError> {
        let mut page = self.inner.range(prefix, from, limit).await?;
        for (key, v) in &mut page.items {
            let value = std::mem::take(&mut v.value);
            v.value = self.config.open(key, value)?;
        }
        Ok(page)
    }

    async fn revision(&self) -> Result<Revision, StorageError> {
        self.inner.revision().await
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<mpsc::Receiver<Event>, StorageError> {
        let mut events = self.inner.watch(prefix, after).await?;
        let (tx, rx) = mpsc::channel(256);
        let config = Arc::clone(&self.config);
        tokio::spawn(async move {
            while let Some(mut e) = events.recv().await {
                let opened = config
                    .open_versioned(&e.key, e.current.clone())
                    .and_then(|c| {
                        let p = e
                            .previous
                            .take()
                            .map(|p| config.open_versioned(&e.key, p))
                            .transpose()?;
                        Ok((c, p))
                    });
                match opened {
                    Ok((current, previous)) => {
                        e.current = current;
                        e.previous = previous;
                    }
                    Err(err) => {
                        // A value this server cannot read ends the watch; the client
                        // relists and sees the error on the affected object.
                        tracing::error!(error = %err, "ending a watch");
                        return;
                    }
                }
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStore;

    const CONFIG: &str = r"
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - aesgcm:
          keys:
            - name: key1
              secret: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=
      - identity: {}
";

    #[tokio::test]
    async fn secrets_are_sealed_and_others_are_not() {
        let raw = Arc::new(MemoryStore::default());
        let store = EncryptedStore::new(raw.clone(), EncryptionConfig::parse(CONFIG).unwrap());
        let key = "/registry/core/secrets/default/s1";
        let made = store.create(key, b"top secret".to_vec()).await.unwrap();
        assert_eq!(made.value, b"top secret");
        let at_rest = raw.get(key).await.unwrap().unwrap().value;
        assert!(at_rest.starts_with(b"k8s:enc:aesgcm:v1:key1:"));
        assert!(!at_rest.windows(10).any(|w| w == b"top secret"));
        assert_eq!(store.get(key).await.unwrap().unwrap().value, b"top secret");
        let page = store
            .range("/registry/core/secrets/", None, 10)
            .await
            .unwrap();
        assert_eq!(page.items[0].1.value, b"top secret");

        let cm = "/registry/core/configmaps/default/c1";
        store.create(cm, b"plain".to_vec()).await.unwrap();
        assert_eq!(raw.get(cm).await.unwrap().unwrap().value, b"plain");

        // Plain secrets written before encryption was configured still read.
        let old = "/registry/core/secrets/default/old";
        raw.create(old, b"legacy".to_vec()).await.unwrap();
        assert_eq!(store.get(old).await.unwrap().unwrap().value, b"legacy");

        // A value moved to another key fails authentication instead of being served.
        let moved = "/registry/core/secrets/default/moved";
        raw.create(moved, at_rest).await.unwrap();
        assert!(matches!(
            store.get(moved).await,
            Err(StorageError::Transform(_))
        ));
    }

    #[tokio::test]
    async fn watches_see_plain_values() {
        let raw = Arc::new(MemoryStore::default());
        let store = EncryptedStore::new(raw, EncryptionConfig::parse(CONFIG).unwrap());
        let now = store.revision().await.unwrap();
        let mut events = store.watch("/registry/core/secrets/", now).await.unwrap();
        let key = "/registry/core/secrets/default/s1";
        let v = store.create(key, b"one".to_vec()).await.unwrap();
        store
            .update(key, b"two".to_vec(), Some(v.mod_revision))
            .await
            .unwrap();
        let first = events.recv().await.unwrap();
        assert_eq!(first.current.value, b"one");
        let second = events.recv().await.unwrap();
        assert_eq!(second.current.value, b"two");
        assert_eq!(second.previous.unwrap().value, b"one");
    }

    #[test]
    fn bad_configurations_are_explained() {
        let err = |text: &str| EncryptionConfig::parse(text).unwrap_err().to_string();
        assert!(
            err("resources: [{resources: [widgets], providers: [{identity: {}}]}]")
                .contains("\"widgets\" is not served")
        );
        assert!(
            err("resources: [{resources: [secrets], providers: [{kms: {}}]}]")
                .contains("provider \"kms\" is not supported")
        );
        assert!(err(
            "resources: [{resources: [secrets], providers: [{aesgcm: {keys: [{name: k, secret: c2hvcnQ=}]}}]}]"
        )
        .contains("aesgcm needs 16 or 32"));
        assert!(err("resources: [{resources: [secrets], providers: []}]").contains("no providers"));
    }
}
