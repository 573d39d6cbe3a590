//! Image garbage collection. An image is in use while a container attempt on the node
//! records it (the attempt directory's `image` file: reference, then manifest digest) or a pod
//! bound to the node names it. Unused images go least recently used first: all of them for
//! `image prune`, or, when the image file system is fuller than the high threshold, until it
//! is down to the low one (the kubelet's `--image-gc-high-threshold`/`--image-gc-low-threshold`).
//! Removing an image drops its names; a sweep then deletes the blobs and unpacked layers that
//! no remaining image references, so layers shared with another image stay.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::store::sha256_hex;
use super::{ImageStore, Result};

/// When threshold GC runs and how far it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    /// Usage (percent of the image file system) at or above which GC starts.
    pub high_percent: u8,
    /// Usage GC brings the file system down to.
    pub low_percent: u8,
    /// Images used more recently than this are kept.
    pub min_age: Duration,
}

impl Default for GcPolicy {
    /// The kubelet's defaults: 85 %, 80 %, two minutes.
    fn default() -> Self {
        GcPolicy {
            high_percent: 85,
            low_percent: 80,
            min_age: Duration::from_secs(120),
        }
    }
}

/// Size and free space of a file system, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Total size.
    pub capacity: u64,
    /// Available to unprivileged users.
    pub available: u64,
}

impl FsUsage {
    /// The file system holding `path`.
    pub fn of(path: &Path) -> Option<Self> {
        let s = nix::sys::statvfs::statvfs(path).ok()?;
        let frag = s.fragment_size();
        Some(FsUsage {
            capacity: s.blocks() * frag,
            available: s.blocks_available() * frag,
        })
    }

    /// Used space in percent, rounded down.
    pub fn used_percent(&self) -> u64 {
        if self.capacity == 0 {
            return 0;
        }
        self.capacity.saturating_sub(self.available) * 100 / self.capacity
    }
}

impl GcPolicy {
    /// Bytes to free so that usage drops to the low threshold, if usage has reached the high
    /// one.
    pub fn bytes_to_free(&self, usage: FsUsage) -> Option<u64> {
        if usage.capacity == 0 || usage.used_percent() < u64::from(self.high_percent) {
            return None;
        }
        let used = usage.capacity.saturating_sub(usage.available);
        let target = usage.capacity / 100 * u64::from(self.low_percent);
        Some(used.saturating_sub(target))
    }
}

/// An image as GC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Manifest digest.
    pub digest: String,
    /// Last use.
    pub last_used: SystemTime,
}

/// The images GC may remove, in the order it removes them: unused ones, least recently used
/// first, skipping any used after `newest` (if given).
pub fn removal_order(
    candidates: &[Candidate],
    in_use: &HashSet<String>,
    newest: Option<SystemTime>,
) -> Vec<String> {
    let mut v: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !in_use.contains(&c.digest))
        .filter(|c| newest.is_none_or(|n| c.last_used <= n))
        .collect();
    v.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.digest.cmp(&b.digest)));
    v.into_iter().map(|c| c.digest.clone()).collect()
}

/// The manifest digests recorded by container attempts under `pods_dir`
/// (`<uid>/containers/<name>/<attempt>/image`).
pub fn digests_in_use(pods_dir: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    let dirs = |p: &Path| {
        fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    for pod in dirs(pods_dir) {
        for container in dirs(&pod.join("containers")) {
            for attempt in dirs(&container) {
                if let Ok(text) = fs::read_to_string(attempt.join("image"))
                    && let Some(d) = text.lines().nth(1)
                {
                    out.insert(d.trim().to_owned());
                }
            }
        }
    }
    out
}

/// What a GC run removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// (names, manifest digest) of each image removed.
    pub removed: Vec<(Vec<String>, String)>,
    /// Bytes of blobs and unpacked layers deleted.
    pub freed_bytes: u64,
}

fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| tree_size(&e.path()))
        .sum::<u64>()
        + meta.len()
}

impl ImageStore {
    /// The images of the store with their last use.
    ///
    /// # Errors
    /// As [`ImageStore::refs`].
    pub fn candidates(&self) -> Result<Vec<Candidate>> {
        let digests: HashSet<String> = self.refs()?.into_values().collect();
        Ok(digests
            .into_iter()
            .map(|digest| Candidate {
                last_used: self.last_used(&digest).unwrap_or(SystemTime::UNIX_EPOCH),
                digest,
            })
            .collect())
    }

    /// The digests `names` (image references) point at.
    ///
    /// # Errors
    /// As [`ImageStore::refs`].
    pub fn digests_of<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashSet<String>> {
        let refs = self.refs()?;
        Ok(names
            .into_iter()
            .filter_map(|n| refs.get(&super::normalize_ref(n)).cloned())
            .collect())
    }

    /// Removes every image not in `in_use` (manifest digests), then unreferenced blobs and
    /// layers.
    ///
    /// # Errors
    /// Store I/O errors.
    pub fn prune(&self, in_use: &HashSet<String>) -> Result<GcReport> {
        let _gc = self.lock(true)?;
        let order = removal_order(&self.candidates()?, in_use, None);
        let mut report = GcReport::default();
        for digest in order {
            let names = self.remove_refs_to(&digest)?;
            report.removed.push((names, digest));
        }
        report.freed_bytes = self.sweep_locked()?;
        Ok(report)
    }

    /// Threshold GC: when the store's file system is at least `policy.high_percent` full,
    /// removes unused images (least recently used first, none used within
    /// `policy.min_age`) until it is down to `policy.low_percent` or nothing is left to
    /// remove. `None` when under the threshold.
    ///
    /// # Errors
    /// Store I/O errors.
    pub fn collect_garbage(
        &self,
        policy: &GcPolicy,
        in_use: &HashSet<String>,
    ) -> Result<Option<GcReport>> {
        let measure = || FsUsage::of(self.root());
        let Some(need) = measure().and_then(|u| policy.bytes_to_free(u)) else {
            return Ok(None);
        };
        tracing::info!(
            bytes = need,
            high = policy.high_percent,
            low = policy.low_percent,
            "image file system over the GC threshold"
        );
        let _gc = self.lock(true)?;
        let newest = SystemTime::now().checked_sub(policy.min_age);
        let order = removal_order(&self.candidates()?, in_use, newest);
        let mut report = GcReport::default();
        for digest in order {
            let names = self.remove_refs_to(&digest)?;
            tracing::info!(%digest, ?names, "image GC: removing");
            report.removed.push((names, digest));
            report.freed_bytes += self.sweep_locked()?;
            if measure().and_then(|u| policy.bytes_to_free(u)).is_none() {
                break;
            }
        }
        Ok(Some(report))
    }

    /// Deletes blobs, unpacked layers and use marks no named image references. The caller
    /// holds the exclusive GC lock.
    fn sweep_locked(&self) -> Result<u64> {
        let mut keep: HashSet<String> = HashSet::new();
        for digest in self.refs()?.into_values() {
            let Ok(hex) = sha256_hex(&digest) else {
                continue;
            };
            keep.insert(hex.to_owned());
            // A manifest that cannot be read keeps only itself; its image is broken anyway.
            if let Ok(m) = self.manifest(&digest) {
                for d in std::iter::once(m.config()).chain(m.layers()) {
                    if let Ok(h) = sha256_hex(d.digest().as_ref()) {
                        keep.insert(h.to_owned());
                    }
                }
            }
        }
        let mut freed = 0;
        for sub in ["blobs/sha256", "layers", "used"] {
            let dir = self.root().join(sub);
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                let path = entry.path();
                let size = tree_size(&path);
                let removed = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                match removed {
                    Ok(()) => freed += size,
                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "image GC"),
                }
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn unused_images_go_least_recently_used_first() {
        let c = |d: &str, t| Candidate {
            digest: d.into(),
            last_used: at(t),
        };
        let cands = [c("a", 30), c("b", 10), c("c", 20), c("d", 5)];
        let in_use = HashSet::from(["d".to_owned()]);
        assert_eq!(removal_order(&cands, &in_use, None), ["b", "c", "a"]);
        assert_eq!(removal_order(&cands, &in_use, Some(at(25))), ["b", "c"]);
    }

    #[test]
    fn thresholds_decide_how_much_to_free() {
        let p = GcPolicy::default();
        let usage = |avail| FsUsage {
            capacity: 1000,
            available: avail,
        };
        assert_eq!(p.bytes_to_free(usage(200)), None, "80 % used");
        assert_eq!(p.bytes_to_free(usage(151)), None, "84.9 % used");
        assert_eq!(p.bytes_to_free(usage(150)), Some(50), "85 % used");
        assert_eq!(p.bytes_to_free(usage(0)), Some(200));
        let zero = FsUsage {
            capacity: 0,
            available: 0,
        };
        assert_eq!(p.bytes_to_free(zero), None);
    }

    #[test]
    fn prune_keeps_used_images_and_shared_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(dir.path()).expect("store");
        let layer_shared = store.put_blob_bytes(b"shared layer").expect("blob");
        let layer_own = store.put_blob_bytes(b"own layer").expect("blob");
        let config = store.put_blob_bytes(b"{}").expect("blob");
        let manifest = |layers: &[&str]| {
            let layers: Vec<_> = layers
                .iter()
                .map(|d| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 1}))
                .collect();
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
                "layers": layers,
            }))
            .expect("json")
        };
        let kept = store
            .put_blob_bytes(&manifest(&[&layer_shared]))
            .expect("manifest");
        let gone = store
            .put_blob_bytes(&manifest(&[&layer_shared, &layer_own]))
            .expect("manifest");
        store.set_ref("reg/kept:1", &kept).expect("ref");
        store.set_ref("reg/gone:1", &gone).expect("ref");
        store.set_ref("reg/gone:alias", &gone).expect("ref");
        let report = store.prune(&HashSet::from([kept.clone()])).expect("prune");
        assert_eq!(report.removed.len(), 1);
        assert_eq!(report.removed[0].1, gone);
        assert_eq!(report.removed[0].0.len(), 2, "both names of the image go");
        assert!(report.freed_bytes > 0);
        for (digest, present) in [
            (&kept, true),
            (&layer_shared, true),
            (&config, true),
            (&gone, false),
            (&layer_own, false),
        ] {
            assert_eq!(
                store.blob_path(digest).expect("path").exists(),
                present,
                "{digest}"
            );
        }
        assert_eq!(store.lookup("reg/kept:1").expect("refs"), Some(kept));
        assert_eq!(store.lookup("reg/gone:1").expect("refs"), None);
    }
}
