//! Image locality: nodes that already hold a pod's images start it sooner, so they score
//! higher, by the images' size and by how widely each image is spread (an image on every
//! node says little about any one of them), as kube-scheduler's ImageLocality does.

use std::collections::HashMap;

const MB: i64 = 1 << 20;
/// Below this total the score is 0 (small images are quick to pull anyway).
const MIN_THRESHOLD: i64 = 23 * MB;
/// At this size per container the score is 100.
const MAX_CONTAINER_THRESHOLD: i64 = 1000 * MB;

/// A canonical image reference, so that `nginx`, `nginx:latest` and
/// `docker.io/library/nginx:latest` compare equal.
pub fn normalize(image: &str) -> String {
    let (name, suffix) = match image.find('@') {
        Some(i) => (&image[..i], &image[i..]),
        None => {
            // A tag is a ':' after the last '/' (a ':' before it is a registry port).
            let slash = image.rfind('/').map_or(0, |i| i + 1);
            match image[slash..].rfind(':') {
                Some(i) => (&image[..slash + i], &image[slash + i..]),
                None => (image, ":latest"),
            }
        }
    };
    let first = name.split('/').next().unwrap_or_default();
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry {
        name.to_owned()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}{suffix}")
}

/// A node's images: canonical name to size in bytes (0 when the node did not say).
pub fn node_images(images: &[k8s_openapi::api::core::v1::ContainerImage]) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for img in images {
        let size = img.size_bytes.unwrap_or(0).max(0);
        for n in img.names.iter().flatten() {
            out.insert(normalize(n), size);
        }
    }
    out
}

/// The image locality score of a node, 0–100. `spread` gives how many of `total` nodes hold
/// an image. Images whose size the node does not report count as large ones, so presence
/// alone still ranks the node higher.
pub fn score(
    pod_images: &[String],
    node: &HashMap<String, i64>,
    spread: impl Fn(&str) -> usize,
    total: usize,
) -> i64 {
    if pod_images.is_empty() || node.is_empty() || total == 0 {
        return 0;
    }
    let mut sum = 0i64;
    for img in pod_images {
        if let Some(&size) = node.get(img) {
            let size = if size > 0 {
                size
            } else {
                MAX_CONTAINER_THRESHOLD
            };
            sum += (size as f64 * spread(img) as f64 / total as f64) as i64;
        }
    }
    let max = MAX_CONTAINER_THRESHOLD * pod_images.len() as i64;
    let sum = sum.clamp(MIN_THRESHOLD, max);
    100 * (sum - MIN_THRESHOLD) / (max - MIN_THRESHOLD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize() {
        assert_eq!(normalize("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(normalize("nginx:1.25"), "docker.io/library/nginx:1.25");
        assert_eq!(normalize("bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(
            normalize("registry.local:5000/app"),
            "registry.local:5000/app:latest"
        );
        assert_eq!(
            normalize("quay.io/x/y@sha256:abc"),
            "quay.io/x/y@sha256:abc"
        );
    }

    #[test]
    fn bigger_and_wider_spread_images_score_higher() {
        let pod = vec![normalize("big:1")];
        let mut node = HashMap::new();
        node.insert(normalize("big:1"), 500 * MB);
        let on_all = score(&pod, &node, |_| 10, 10);
        let on_one = score(&pod, &node, |_| 1, 10);
        assert_eq!(on_all, 48, "500 MB of 1000 MB, less the 23 MB threshold");
        assert_eq!(on_one, 2, "an image on 1 of 10 nodes counts a tenth");
        assert_eq!(score(&pod, &HashMap::new(), |_| 10, 10), 0);
        // Without sizes, presence alone gives the top score.
        node.insert(normalize("big:1"), 0);
        assert_eq!(score(&pod, &node, |_| 10, 10), 100);
    }
}
