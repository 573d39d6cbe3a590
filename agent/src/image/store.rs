//! Blobs, unpacked layers and names on disk.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{ImageConfiguration, ImageManifest};
use sha2::{Digest as _, Sha256};

use super::{ImageError, Result, normalize_ref, unpack};

/// A content-addressed image store rooted at a directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// An image ready to run: its config and the unpacked layer directories, lowest first.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest digest (`sha256:…`), the image's identity.
    pub digest: String,
    /// The image configuration (entrypoint, cmd, env, working dir, user).
    pub config: ImageConfiguration,
    /// Unpacked layers, lowest first.
    pub layers: Vec<PathBuf>,
}

/// One name in the store, as `image ls` shows it.
#[derive(Debug, Clone)]
pub struct RefEntry {
    /// The normalized name.
    pub name: String,
    /// The manifest digest.
    pub digest: String,
    /// Total size of the layer blobs in bytes.
    pub size: u64,
}

/// The hex part of a `sha256:<hex>` digest, checked.
pub(crate) fn sha256_hex(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::Digest(digest.to_owned()))?;
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(ImageError::Digest(digest.to_owned()))
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`.
    ///
    /// # Errors
    /// [`ImageError::Io`] if the directories cannot be made.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in ["blobs/sha256", "layers", "tmp", "used"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| ImageError::io("create", dir, e))?;
        }
        Ok(ImageStore { root })
    }

    /// The store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn tmp_dir(&self) -> Result<tempfile::TempDir> {
        let dir = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(&dir)
            .map_err(|e| ImageError::io("create temp dir in", dir, e))
    }

    /// Path of the blob `digest` (whether present or not).
    ///
    /// # Errors
    /// [`ImageError::Digest`] for a malformed digest.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    /// Copies `src` into the store as blob `digest`, checking its content. A blob already
    /// present is kept.
    ///
    /// # Errors
    /// [`ImageError::DigestMismatch`] if the content does not hash to `digest`.
    pub fn put_blob_file(&self, digest: &str, src: &Path) -> Result<PathBuf> {
        let dest = self.blob_path(digest)?;
        if dest.exists() {
            return Ok(dest);
        }
        let mut input = File::open(src).map_err(|e| ImageError::io("open", src, e))?;
        self.write_blob(digest, &mut input)
    }

    /// Adds `bytes` as a blob and returns its digest.
    ///
    /// # Errors
    /// [`ImageError::Io`] if it cannot be written.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<String> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        if !self.blob_path(&digest)?.exists() {
            self.write_blob(&digest, &mut io::Cursor::new(bytes))?;
        }
        Ok(digest)
    }

    fn write_blob(&self, digest: &str, input: &mut dyn Read) -> Result<PathBuf> {
        let dest = self.blob_path(digest)?;
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(|e| ImageError::io("create temp file in", &tmp_dir, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = input
                .read(&mut buf)
                .map_err(|e| ImageError::io("read blob", &dest, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(|e| ImageError::io("write", tmp.path().to_owned(), e))?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256_hex(digest)? {
            return Err(ImageError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        tmp.persist(&dest)
            .map_err(|e| ImageError::io("persist", &dest, e.error))?;
        Ok(dest)
    }

    /// Moves the downloaded file `tmp` into the store as blob `digest` after checking that its
    /// content hashes to it.
    ///
    /// # Errors
    /// [`ImageError::DigestMismatch`] for other content; I/O errors.
    pub fn commit_blob(&self, digest: &str, tmp: tempfile::NamedTempFile) -> Result<PathBuf> {
        let dest = self.blob_path(digest)?;
        let mut file = File::open(tmp.path()).map_err(|e| ImageError::io("open", tmp.path(), e))?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher).map_err(|e| ImageError::io("read", tmp.path(), e))?;
        let actual = hex::encode(hasher.finalize());
        if actual != sha256_hex(digest)? {
            return Err(ImageError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        tmp.persist(&dest)
            .map_err(|e| ImageError::io("persist", &dest, e.error))?;
        Ok(dest)
    }

    /// A temporary file in the store's file system, for a download.
    ///
    /// # Errors
    /// [`ImageError::Io`] if it cannot be created.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile> {
        let dir = self.root.join("tmp");
        tempfile::NamedTempFile::new_in(&dir)
            .map_err(|e| ImageError::io("create temp file in", dir, e))
    }

    /// Reads blob `digest` whole (manifests and configs).
    ///
    /// # Errors
    /// [`ImageError::Io`] if it is missing.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        fs::read(&path).map_err(|e| ImageError::io("read", path, e))
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    /// Name → manifest digest.
    ///
    /// # Errors
    /// [`ImageError::Document`] if `refs.json` is corrupt.
    pub fn refs(&self) -> Result<BTreeMap<String, String>> {
        let path = self.refs_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ImageError::Document {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(ImageError::io("read", path, e)),
        }
    }

    /// Points `name` at manifest `digest`, under a lock so that concurrent imports do not lose
    /// each other's names.
    ///
    /// # Errors
    /// [`ImageError::Io`] if the file cannot be written.
    pub fn set_ref(&self, name: &str, digest: &str) -> Result<()> {
        let lock_path = self.root.join("refs.lock");
        let lock = File::create(&lock_path).map_err(|e| ImageError::io("create", &lock_path, e))?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::io("lock", &lock_path, e.into()))?;
        let mut refs = self.refs()?;
        refs.insert(normalize_ref(name), digest.to_owned());
        self.write_refs(&refs)?;
        self.touch_used(digest);
        Ok(())
    }

    /// The manifest digest `reference` (a name, normalized) points at, if the store has it.
    ///
    /// # Errors
    /// As [`ImageStore::refs`].
    pub fn lookup(&self, reference: &str) -> Result<Option<String>> {
        Ok(self.refs()?.get(&normalize_ref(reference)).cloned())
    }

    /// Removes every name pointing at manifest `digest`; returns the names removed. The
    /// blobs stay until [`ImageStore::sweep`].
    ///
    /// # Errors
    /// [`ImageError::Io`] if `refs.json` cannot be rewritten.
    pub fn remove_refs_to(&self, digest: &str) -> Result<Vec<String>> {
        let lock_path = self.root.join("refs.lock");
        let lock = File::create(&lock_path).map_err(|e| ImageError::io("create", &lock_path, e))?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::io("lock", &lock_path, e.into()))?;
        let mut refs = self.refs()?;
        let removed: Vec<String> = refs
            .iter()
            .filter(|(_, d)| d.as_str() == digest)
            .map(|(n, _)| n.clone())
            .collect();
        refs.retain(|_, d| d.as_str() != digest);
        self.write_refs(&refs)?;
        if let Ok(hex) = sha256_hex(digest) {
            let _ = fs::remove_file(self.root.join("used").join(hex));
        }
        Ok(removed)
    }

    fn write_refs(&self, refs: &BTreeMap<String, String>) -> Result<()> {
        let path = self.refs_path();
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(refs).map_err(|e| ImageError::Document {
            path: path.clone(),
            message: e.to_string(),
        })?;
        fs::write(&tmp, text).map_err(|e| ImageError::io("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| ImageError::io("rename", &path, e))
    }

    /// Records that manifest `digest` was used now (image GC removes the least recently
    /// used first).
    pub fn touch_used(&self, digest: &str) {
        if let Ok(hex) = sha256_hex(digest) {
            let path = self.root.join("used").join(hex);
            if let Err(e) = fs::write(&path, b"") {
                tracing::debug!(path = %path.display(), error = %e, "recording image use");
            }
        }
    }

    /// When manifest `digest` was last used (pulled, imported or run), if known.
    pub fn last_used(&self, digest: &str) -> Option<std::time::SystemTime> {
        let hex = sha256_hex(digest).ok()?;
        let used = self.root.join("used").join(hex);
        fs::metadata(&used)
            .or_else(|_| fs::metadata(self.root.join("blobs/sha256").join(hex)))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Takes the store's GC lock: shared while adding an image (so that its blobs are not
    /// swept before its name points at them), exclusive while removing.
    ///
    /// # Errors
    /// [`ImageError::Io`] if the lock file cannot be opened or locked.
    pub fn lock(&self, exclusive: bool) -> Result<nix::fcntl::Flock<File>> {
        let path = self.root.join("gc.lock");
        let file = File::create(&path).map_err(|e| ImageError::io("create", &path, e))?;
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        nix::fcntl::Flock::lock(file, arg).map_err(|(_, e)| ImageError::io("lock", &path, e.into()))
    }

    /// The manifest of an image by digest.
    ///
    /// # Errors
    /// [`ImageError::Document`] if it is not a manifest.
    pub fn manifest(&self, digest: &str) -> Result<ImageManifest> {
        let bytes = self.read_blob(digest)?;
        ImageManifest::from_reader(bytes.as_slice()).map_err(|e| ImageError::Document {
            path: self.blob_path(digest).unwrap_or_default(),
            message: e.to_string(),
        })
    }

    /// The names in the store with their sizes.
    ///
    /// # Errors
    /// As [`ImageStore::refs`] and [`ImageStore::manifest`].
    pub fn list(&self) -> Result<Vec<RefEntry>> {
        let mut out = Vec::new();
        for (name, digest) in self.refs()? {
            let size = self
                .manifest(&digest)
                .map(|m| m.layers().iter().map(|l| l.size()).sum())
                .unwrap_or(0);
            out.push(RefEntry { name, digest, size });
        }
        Ok(out)
    }

    /// Finds `reference` (a name, normalized, or a manifest digest) and makes sure its layers
    /// are unpacked.
    ///
    /// # Errors
    /// [`ImageError::NotFound`] if the store has no such image; unpack errors.
    pub fn resolve(&self, reference: &str) -> Result<Image> {
        let refs = self.refs()?;
        let digest = match refs.get(&normalize_ref(reference)) {
            Some(d) => d.clone(),
            None if reference.starts_with("sha256:") && self.blob_path(reference)?.exists() => {
                reference.to_owned()
            }
            None => return Err(ImageError::NotFound(reference.to_owned())),
        };
        let manifest = self.manifest(&digest)?;
        let config_digest = manifest.config().digest().to_string();
        let config_bytes = self.read_blob(&config_digest)?;
        let config = ImageConfiguration::from_reader(config_bytes.as_slice()).map_err(|e| {
            ImageError::Document {
                path: self.blob_path(&config_digest).unwrap_or_default(),
                message: e.to_string(),
            }
        })?;
        let mut layers = Vec::new();
        for layer in manifest.layers() {
            layers.push(self.unpacked_layer(layer.digest().as_ref())?);
        }
        self.touch_used(&digest);
        Ok(Image {
            digest,
            config,
            layers,
        })
    }

    /// The directory of layer blob `digest` unpacked, unpacking it first if needed; shared by
    /// every image with this layer.
    ///
    /// # Errors
    /// [`ImageError::Io`] if the blob is missing or cannot be unpacked.
    pub fn unpacked_layer(&self, digest: &str) -> Result<PathBuf> {
        let dir = self.root.join("layers").join(sha256_hex(digest)?);
        if dir.is_dir() {
            return Ok(dir);
        }
        let blob = self.blob_path(digest)?;
        let tmp = self.tmp_dir()?;
        let target = tmp.path().join("layer");
        unpack::unpack_layer(&blob, &target)?;
        match fs::rename(&target, &dir) {
            Ok(()) => {}
            // Another unpack of the same layer won the race: use it.
            Err(_) if dir.is_dir() => {}
            Err(e) => return Err(ImageError::io("rename", dir, e)),
        }
        Ok(dir)
    }
}
