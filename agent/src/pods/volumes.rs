//! Pod volumes, made ready on the node before a container starts and bind-mounted into it:
//! `emptyDir` (a directory that lives as long as the pod), `hostPath` (with its `type`
//! checks), and `configMap` / `secret` (their keys written as files, read-only in the
//! container).
//!
//! ```text
//! <state>/pods/<uid>/volumes/<volume name>/   emptyDir, configMap and secret contents
//! ```
//!
//! configMap and secret contents are written once, when the pod's first container starts;
//! later changes to the object reach new pods only (Kubernetes refreshes them periodically).

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
};

use k8s_openapi::api::core::v1::{ConfigMap, KeyToPath, Pod, Secret, Volume};
use kube::Api;

/// A volume that could not be made ready (the container waits with
/// `CreateContainerConfigError` and this message).
#[derive(Debug, thiserror::Error)]
#[error("volume {volume:?}: {message}")]
pub struct VolumeError {
    volume: String,
    message: String,
}

impl VolumeError {
    fn new(volume: &str, message: impl Into<String>) -> Self {
        VolumeError {
            volume: volume.to_owned(),
            message: message.into(),
        }
    }
}

/// A volume ready on the node: where it is, and whether containers may only read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The directory (or, for a hostPath, the file) to bind.
    pub source: PathBuf,
    /// configMap and secret volumes are always read-only.
    pub read_only: bool,
}

/// Kubernetes' default file mode of configMap and secret files.
const DEFAULT_MODE: u32 = 0o644;

/// Makes every volume of `pod` ready under `dir` (the pod's `volumes/` directory).
///
/// # Errors
/// [`VolumeError`] for an unsupported volume type, a missing configMap/secret that is not
/// optional, a hostPath whose `type` check fails, or an I/O error.
pub async fn prepare(
    client: &kube::Client,
    pod: &Pod,
    dir: &Path,
) -> Result<HashMap<String, Ready>, VolumeError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut ready = HashMap::new();
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        let r = prepare_one(client, &namespace, &v, &dir.join(&v.name)).await?;
        ready.insert(v.name.clone(), r);
    }
    Ok(ready)
}

async fn prepare_one(
    client: &kube::Client,
    namespace: &str,
    v: &Volume,
    target: &Path,
) -> Result<Ready, VolumeError> {
    let io = |action: &str, e: std::io::Error| {
        VolumeError::new(&v.name, format!("{action} {}: {e}", target.display()))
    };
    if v.empty_dir.is_some() {
        fs::create_dir_all(target).map_err(|e| io("creating", e))?;
        // World-writable like Kubernetes' emptyDir, so non-root containers can use it.
        fs::set_permissions(target, fs::Permissions::from_mode(0o777))
            .map_err(|e| io("chmod", e))?;
        return Ok(Ready {
            source: target.to_owned(),
            read_only: false,
        });
    }
    if let Some(host) = &v.host_path {
        let path = PathBuf::from(&host.path);
        check_host_path(&v.name, &path, host.type_.as_deref().unwrap_or(""))?;
        return Ok(Ready {
            source: path,
            read_only: false,
        });
    }
    // configMap and secret: the object's keys as files, written once.
    let source = if let Some(cm) = &v.config_map {
        Some((cm.items.as_deref(), cm.default_mode, cm.optional))
    } else {
        v.secret
            .as_ref()
            .map(|sec| (sec.items.as_deref(), sec.default_mode, sec.optional))
    };
    if let Some((items, default_mode, optional)) = source {
        if !target.exists() {
            let optional = optional == Some(true);
            let files = match (&v.config_map, &v.secret) {
                (Some(cm), _) => fetch::<ConfigMap>(client, namespace, &v.name, &cm.name, optional)
                    .await?
                    .map(|obj| {
                        let mut files: BTreeMap<String, Vec<u8>> = obj
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes()))
                            .collect();
                        files.extend(
                            obj.binary_data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.0)),
                        );
                        files
                    }),
                (None, Some(sec)) => {
                    let name = sec.secret_name.clone().unwrap_or_default();
                    fetch::<Secret>(client, namespace, &v.name, &name, optional)
                        .await?
                        .map(|obj| {
                            obj.data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.0))
                                .collect()
                        })
                }
                (None, None) => None,
            };
            let mode = default_mode.map_or(DEFAULT_MODE, mode_bits);
            write_files(&v.name, target, &files.unwrap_or_default(), items, mode)?;
        }
        return Ok(Ready {
            source: target.to_owned(),
            read_only: true,
        });
    }
    Err(VolumeError::new(
        &v.name,
        "only emptyDir, hostPath, configMap and secret volumes are supported",
    ))
}

/// The configMap or secret `name` a volume projects; `None` if it is missing and optional.
async fn fetch<K>(
    client: &kube::Client,
    namespace: &str,
    volume: &str,
    name: &str,
    optional: bool,
) -> Result<Option<K>, VolumeError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&()).to_lowercase();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(obj)) => Ok(Some(obj)),
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(VolumeError::new(
            volume,
            format!("{kind} \"{name}\" not found"),
        )),
        Err(e) => Err(VolumeError::new(
            volume,
            format!("reading {kind} {name}: {e}"),
        )),
    }
}

fn mode_bits(mode: i32) -> u32 {
    u32::try_from(mode).unwrap_or(DEFAULT_MODE) & 0o777
}

/// A relative path inside the volume: no `..`, not absolute (keys and `items[].path` come
/// from the API and must not escape the volume).
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Writes `files` (or the chosen `items`) into a fresh directory, then renames it to
/// `target`, so a container never sees a half-written volume.
fn write_files(
    volume: &str,
    target: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: u32,
) -> Result<(), VolumeError> {
    let err = |m: String| VolumeError::new(volume, m);
    let chosen: Vec<(String, &Vec<u8>, u32)> = match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|i| {
                let data = files
                    .get(&i.key)
                    .ok_or_else(|| err(format!("key {:?} not found", i.key)))?;
                Ok((i.path.clone(), data, i.mode.map_or(default_mode, mode_bits)))
            })
            .collect::<Result<_, VolumeError>>()?,
        _ => files
            .iter()
            .map(|(k, v)| (k.clone(), v, default_mode))
            .collect(),
    };
    let tmp = target.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| err(format!("creating {}: {e}", tmp.display())))?;
    for (path, data, mode) in chosen {
        if !safe_relative(&path) {
            return Err(err(format!("invalid path {path:?}")));
        }
        let file = tmp.join(&path);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| err(format!("creating {}: {e}", parent.display())))?;
        }
        fs::write(&file, data).map_err(|e| err(format!("writing {}: {e}", file.display())))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(mode))
            .map_err(|e| err(format!("chmod {}: {e}", file.display())))?;
    }
    fs::rename(&tmp, target).map_err(|e| err(format!("renaming to {}: {e}", target.display())))
}

/// The checks of a hostPath's `type`.
fn check_host_path(volume: &str, path: &Path, typ: &str) -> Result<(), VolumeError> {
    let err = |m: &str| VolumeError::new(volume, format!("hostPath {}: {m}", path.display()));
    let meta = fs::metadata(path).ok();
    match typ {
        "" => Ok(()),
        "DirectoryOrCreate" => {
            if meta.is_none() {
                fs::create_dir_all(path).map_err(|e| err(&e.to_string()))?;
                fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                    .map_err(|e| err(&e.to_string()))?;
            }
            Ok(())
        }
        "Directory" if meta.as_ref().is_some_and(fs::Metadata::is_dir) => Ok(()),
        "Directory" => Err(err("is not a directory")),
        "FileOrCreate" => {
            if meta.is_none() {
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| err(&e.to_string()))?;
            }
            Ok(())
        }
        "File" if meta.as_ref().is_some_and(fs::Metadata::is_file) => Ok(()),
        "File" => Err(err("is not a file")),
        "Socket" | "CharDevice" | "BlockDevice" if meta.is_some() => Ok(()),
        "Socket" | "CharDevice" | "BlockDevice" => Err(err("does not exist")),
        other => Err(err(&format!("unknown hostPath type {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_items_become_files_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let files: BTreeMap<String, Vec<u8>> = [
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
        ]
        .into();
        let all = dir.path().join("all");
        write_files("v", &all, &files, None, 0o600).unwrap();
        assert_eq!(fs::read(all.join("a")).unwrap(), b"1");
        let mode = fs::metadata(all.join("b")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let some = dir.path().join("some");
        let items = [KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            mode: Some(0o400),
        }];
        write_files("v", &some, &files, Some(&items), 0o644).unwrap();
        assert_eq!(fs::read(some.join("sub/b.txt")).unwrap(), b"2");
        assert!(!some.join("a").exists());

        let bad = [KeyToPath {
            key: "a".into(),
            path: "../escape".into(),
            mode: None,
        }];
        let e = write_files("v", &dir.path().join("bad"), &files, Some(&bad), 0o644);
        assert!(e.unwrap_err().to_string().contains("invalid path"));
        assert!(!dir.path().join("escape").exists());
        let missing = [KeyToPath {
            key: "nope".into(),
            path: "x".into(),
            mode: None,
        }];
        let e = write_files("v", &dir.path().join("m"), &files, Some(&missing), 0o644);
        assert!(e.unwrap_err().to_string().contains("not found"));
    }

    #[test]
    fn host_path_types_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("made");
        check_host_path("v", &made, "DirectoryOrCreate").unwrap();
        assert!(made.is_dir());
        check_host_path("v", &made, "Directory").unwrap();
        assert!(check_host_path("v", &made, "File").is_err());
        let file = dir.path().join("f");
        check_host_path("v", &file, "FileOrCreate").unwrap();
        check_host_path("v", &file, "File").unwrap();
        assert!(check_host_path("v", &dir.path().join("nope"), "Directory").is_err());
        assert!(check_host_path("v", &file, "Weird").is_err());
    }
}
