//! The node's image store: content-addressed blobs (by sha256), layers unpacked once and
//! shared between images, and names pointing at manifests. Images come in from an OCI image
//! layout (directory or tar), a `docker save` archive or a registry pull ([`Puller`]); image
//! garbage collection ([`gc`]) removes the least recently used images no container uses.
//!
//! Layout under the store's root:
//! `blobs/sha256/<hex>` (manifests, configs, layer archives), `layers/<hex>/` (a layer blob
//! unpacked, whiteouts turned into overlayfs whiteouts), `refs.json` (name → manifest digest),
//! `tmp/` (imports and unpacks in progress, renamed into place when complete), `used/<hex>`
//! (an empty file per manifest whose mtime is when the image was last used), `gc.lock`
//! (shared while an image is added, exclusive while images are removed).

mod auth;
pub mod gc;
mod import;
mod policy;
mod pull;
mod store;
mod unpack;

pub use auth::credentials_for;
pub use oci_client::secrets::RegistryAuth;
pub use policy::{PullPolicy, image_tag};
pub use pull::{PullConfig, PullHandle, Pulled, Puller, parse_reference};
pub use store::{Image, ImageStore, RefEntry};

use std::path::PathBuf;

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An OCI document could not be read.
    #[error("{path}: {message}")]
    Document {
        /// The document.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A blob's content does not match its digest.
    #[error("blob {expected} has digest sha256:{actual}")]
    DigestMismatch {
        /// The digest it was named by.
        expected: String,
        /// What its content hashes to.
        actual: String,
    },
    /// An unsupported digest algorithm or malformed digest.
    #[error("unsupported digest {0}")]
    Digest(String),
    /// No image of that name is in the store.
    #[error("image {0} is not in the store")]
    NotFound(String),
    /// The archive or directory is not an image.
    #[error("{0}")]
    Format(String),
    /// The image reference cannot be parsed.
    #[error("couldn't parse image name {0:?}: invalid reference format")]
    InvalidReference(String),
    /// The registry refused or failed a request.
    #[error("{reference}: {message}")]
    Registry {
        /// The image being pulled.
        reference: String,
        /// What went wrong.
        message: String,
    },
}

impl ImageError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Results of the image store.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// The name an image reference is stored under: a tag of `latest` when none is given, and
/// Docker Hub's implicit `docker.io/library/` prefix removed so that `busybox` and
/// `docker.io/library/busybox:latest` are one image.
pub fn normalize_ref(reference: &str) -> String {
    let mut r = reference.trim().to_owned();
    for prefix in [
        "docker.io/library/",
        "index.docker.io/library/",
        "docker.io/",
    ] {
        if let Some(rest) = r.strip_prefix(prefix) {
            r = rest.to_owned();
            break;
        }
    }
    let last = r.rsplit('/').next().unwrap_or_default();
    if !last.contains(':') && !r.contains('@') {
        r.push_str(":latest");
    }
    r
}

#[cfg(test)]
mod tests {
    use super::normalize_ref;

    #[test]
    fn references_are_normalized() {
        assert_eq!(normalize_ref("busybox"), "busybox:latest");
        assert_eq!(normalize_ref("docker.io/library/busybox:1"), "busybox:1");
        assert_eq!(normalize_ref("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(normalize_ref("reg/x@sha256:ab"), "reg/x@sha256:ab");
    }
}
