//! `imagePullPolicy`: when the agent pulls a container's image, with Kubernetes' defaults.

/// When to pull a container's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull every time a container starts (the registry decides whether anything changed).
    Always,
    /// Pull only when the store does not have the image.
    IfNotPresent,
    /// Never pull: the image must have been imported or pulled before.
    Never,
}

impl PullPolicy {
    /// The policy of a container: `policy` as given, or Kubernetes' default — `Always` for an
    /// image without a tag or tagged `latest` (unless pinned by digest), `IfNotPresent`
    /// otherwise. An unknown value is treated as absent.
    pub fn for_container(policy: Option<&str>, image: &str) -> Self {
        match policy {
            Some("Always") => PullPolicy::Always,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            Some("Never") => PullPolicy::Never,
            _ => match image_tag(image) {
                _ if image.contains('@') => PullPolicy::IfNotPresent,
                None | Some("latest") => PullPolicy::Always,
                Some(_) => PullPolicy::IfNotPresent,
            },
        }
    }
}

/// The tag of an image reference, if it has one: the part after a `:` in the last path
/// component (a `:` before the first `/` is a registry port).
pub fn image_tag(image: &str) -> Option<&str> {
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    last.split_once(':').map(|(_, tag)| tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_kubernetes() {
        let p = PullPolicy::for_container;
        assert_eq!(p(None, "busybox"), PullPolicy::Always);
        assert_eq!(p(None, "busybox:latest"), PullPolicy::Always);
        assert_eq!(p(None, "localhost:5000/busybox"), PullPolicy::Always);
        assert_eq!(
            p(None, "localhost:5000/busybox:1"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(p(None, "reg/busybox@sha256:0123"), PullPolicy::IfNotPresent);
        assert_eq!(p(Some("Never"), "busybox"), PullPolicy::Never);
        assert_eq!(p(Some("Always"), "busybox:1"), PullPolicy::Always);
        assert_eq!(p(Some("IfNotPresent"), "busybox"), PullPolicy::IfNotPresent);
        assert_eq!(p(Some("bogus"), "busybox:1"), PullPolicy::IfNotPresent);
    }

    #[test]
    fn tags_ignore_registry_ports() {
        assert_eq!(image_tag("localhost:5000/x"), None);
        assert_eq!(image_tag("localhost:5000/x:2"), Some("2"));
        assert_eq!(image_tag("x:latest@sha256:ab"), Some("latest"));
    }
}
