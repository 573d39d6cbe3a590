//! Importing images for air-gapped sites: an OCI image layout (a directory, or a tar of one)
//! or a `docker save` archive.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::Path;

use oci_spec::image::{Arch, ImageIndex, ImageManifest, MediaType, Os};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::store::sha256_hex;
use super::{ImageError, ImageStore, Result};

/// The annotation containerd and skopeo put the full image name in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation for the name (often just a tag).
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// One entry of a `docker save` archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn file_digest(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| ImageError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| ImageError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

impl ImageStore {
    /// Imports every image of an OCI layout directory, an OCI layout tar or a `docker save`
    /// archive, naming it `name` if given (else by the names the source carries). Returns the
    /// (name, manifest digest) pairs stored; layers are unpacked right away.
    ///
    /// # Errors
    /// [`ImageError::Format`] if `path` is none of these; blob and digest errors.
    pub fn import(&self, path: &Path, name: Option<&str>) -> Result<Vec<(String, String)>> {
        // Blobs stored before their name is set must not be swept meanwhile.
        let _gc = self.lock(false)?;
        let meta = fs::metadata(path).map_err(|e| ImageError::io("stat", path, e))?;
        let imported = if meta.is_dir() {
            self.import_dir(path, name)?
        } else {
            let tmp = self.tmp_dir()?;
            let file = File::open(path).map_err(|e| ImageError::io("open", path, e))?;
            let mut archive = tar::Archive::new(BufReader::new(file));
            archive
                .unpack(tmp.path())
                .map_err(|e| ImageError::io("unpack archive", path, e))?;
            self.import_dir(tmp.path(), name)?
        };
        for (_, digest) in &imported {
            for layer in self.manifest(digest)?.layers() {
                self.unpacked_layer(layer.digest().as_ref())?;
            }
        }
        Ok(imported)
    }

    fn import_dir(&self, dir: &Path, name: Option<&str>) -> Result<Vec<(String, String)>> {
        if dir.join("oci-layout").is_file() {
            self.import_layout(dir, name)
        } else if dir.join("manifest.json").is_file() {
            self.import_docker(dir, name)
        } else {
            Err(ImageError::Format(format!(
                "{} is neither an OCI image layout (no oci-layout file) nor a docker save \
                 archive (no manifest.json)",
                dir.display()
            )))
        }
    }

    fn import_layout(&self, dir: &Path, name: Option<&str>) -> Result<Vec<(String, String)>> {
        let index_path = dir.join("index.json");
        let index = ImageIndex::from_file(&index_path).map_err(|e| ImageError::Document {
            path: index_path.clone(),
            message: e.to_string(),
        })?;
        let blob = |digest: &str| -> Result<std::path::PathBuf> {
            Ok(dir.join("blobs/sha256").join(sha256_hex(digest)?))
        };
        let mut out = Vec::new();
        for desc in index.manifests() {
            let annotations = desc.annotations().clone().unwrap_or_default();
            let mut digest = desc.digest().to_string();
            if *desc.media_type() == MediaType::ImageIndex {
                digest = pick_platform(&blob(&digest)?)?;
            }
            let manifest_path = blob(&digest)?;
            let manifest =
                ImageManifest::from_file(&manifest_path).map_err(|e| ImageError::Document {
                    path: manifest_path.clone(),
                    message: e.to_string(),
                })?;
            let config = manifest.config().digest().to_string();
            self.put_blob_file(&config, &blob(&config)?)?;
            for layer in manifest.layers() {
                let d = layer.digest().to_string();
                self.put_blob_file(&d, &blob(&d)?)?;
            }
            self.put_blob_file(&digest, &manifest_path)?;
            let ref_name = name
                .map(str::to_owned)
                .or_else(|| annotations.get(CONTAINERD_NAME).cloned())
                .or_else(|| annotations.get(REF_NAME).cloned());
            let stored_as = ref_name.unwrap_or_else(|| digest.clone());
            if !stored_as.starts_with("sha256:") {
                self.set_ref(&stored_as, &digest)?;
            }
            out.push((stored_as, digest));
        }
        Ok(out)
    }

    fn import_docker(&self, dir: &Path, name: Option<&str>) -> Result<Vec<(String, String)>> {
        let path = dir.join("manifest.json");
        let text = fs::read(&path).map_err(|e| ImageError::io("read", &path, e))?;
        let entries: Vec<DockerManifest> =
            serde_json::from_slice(&text).map_err(|e| ImageError::Document {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let mut out = Vec::new();
        for entry in entries {
            let config_path = dir.join(&entry.config);
            let config = file_digest(&config_path)?;
            let config_size = fs::metadata(&config_path)
                .map_err(|e| ImageError::io("stat", &config_path, e))?
                .len();
            self.put_blob_file(&config, &config_path)?;
            let mut layers = Vec::new();
            for layer in &entry.layers {
                let layer_path = dir.join(layer);
                let digest = file_digest(&layer_path)?;
                let size = fs::metadata(&layer_path)
                    .map_err(|e| ImageError::io("stat", &layer_path, e))?
                    .len();
                self.put_blob_file(&digest, &layer_path)?;
                layers.push(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest, "size": size}));
            }
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config, "size": config_size},
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&manifest).map_err(|e| ImageError::Document {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let digest = self.put_blob_bytes(&bytes)?;
            let names: Vec<String> = match name {
                Some(n) => vec![n.to_owned()],
                None => entry.repo_tags.unwrap_or_default(),
            };
            for n in &names {
                self.set_ref(n, &digest)?;
            }
            out.push((
                names.first().cloned().unwrap_or_else(|| digest.clone()),
                digest,
            ));
        }
        Ok(out)
    }
}

/// The linux/amd64 (or, failing that, the first) manifest of a nested image index.
fn pick_platform(index_path: &Path) -> Result<String> {
    let index = ImageIndex::from_file(index_path).map_err(|e| ImageError::Document {
        path: index_path.to_owned(),
        message: e.to_string(),
    })?;
    platform_manifest(&index)
        .or_else(|| index.manifests().first().map(|m| m.digest().to_string()))
        .ok_or_else(|| ImageError::Format(format!("{} lists no manifest", index_path.display())))
}

/// The digest of the linux/amd64 manifest an image index lists, if any.
pub(crate) fn platform_manifest(index: &ImageIndex) -> Option<String> {
    index
        .manifests()
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
        })
        .map(|m| m.digest().to_string())
}
