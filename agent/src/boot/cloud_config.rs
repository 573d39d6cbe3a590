//! The part of cloud-init's data a node image honours: the host name (`hostname` in
//! `#cloud-config`, else `local-hostname` in `meta-data`) and `write_files`. Other keys
//! (`runcmd`, `packages`, users, …) are ignored: they are for installed servers running
//! cloud-init itself.

use base64::Engine as _;
use serde::Deserialize;

use super::{Error, Result};

/// `meta-data` fields the node image reads.
#[derive(Debug, Default, Deserialize)]
pub struct MetaData {
    /// The instance id (the machine's name in the provisioner's inventory).
    #[serde(rename = "instance-id", default)]
    pub instance_id: Option<String>,
    /// The host name the data source suggests.
    #[serde(rename = "local-hostname", default)]
    pub local_hostname: Option<String>,
}

/// `#cloud-config` keys the node image reads.
#[derive(Debug, Default, Deserialize)]
pub struct CloudConfig {
    /// The host name to set.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Files to write.
    #[serde(default)]
    pub write_files: Vec<WriteFile>,
}

/// One `write_files` entry. `owner` is accepted and ignored (the node image has only root);
/// `defer` is ignored (there is nothing to wait for).
#[derive(Debug, Deserialize)]
pub struct WriteFile {
    /// Absolute path of the file.
    pub path: String,
    /// The content, encoded as `encoding` says.
    #[serde(default)]
    pub content: String,
    /// `b64`/`base64` or plain text (absent, `text/plain`).
    #[serde(default)]
    pub encoding: Option<String>,
    /// Octal mode such as `'0600'` (default `0644`).
    #[serde(default)]
    pub permissions: Option<Permissions>,
    /// Append instead of replacing.
    #[serde(default)]
    pub append: bool,
}

/// `permissions`: an octal mode, quoted (`'0600'`, cloud-init's documented form) or not
/// (`0600`, `600`), read from the scalar's text so that YAML's number rules do not matter.
#[derive(Debug, Clone)]
pub struct Permissions(String);

impl<'de> Deserialize<'de> for Permissions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Permissions;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an octal file mode such as '0644'")
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Permissions, E> {
                Ok(Permissions(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Permissions, E> {
                Ok(Permissions(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Permissions, E> {
                Ok(Permissions(v.to_string()))
            }
        }
        d.deserialize_str(Text)
    }
}

impl WriteFile {
    /// The decoded content.
    ///
    /// # Errors
    /// [`Error::BadFile`] for bad base64 or an encoding the node image does not support.
    pub fn bytes(&self) -> Result<Vec<u8>> {
        match self
            .encoding
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text/plain") => Ok(self.content.clone().into_bytes()),
            Some("b64" | "base64") => {
                // cloud-init tolerates line breaks in base64 blocks.
                let compact: String = self.content.split_whitespace().collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .map_err(|e| self.bad(format!("content is not base64: {e}")))
            }
            Some(other) => Err(self.bad(format!(
                "encoding {other:?} is not supported by the node image (use b64 or plain text)"
            ))),
        }
    }

    /// The file mode.
    ///
    /// # Errors
    /// [`Error::BadFile`] when `permissions` is not an octal mode.
    pub fn mode(&self) -> Result<u32> {
        let Some(Permissions(text)) = &self.permissions else {
            return Ok(0o644);
        };
        let digits = text.trim();
        let octal = digits.strip_prefix("0o").unwrap_or(digits);
        u32::from_str_radix(octal, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| self.bad(format!("permissions {digits:?} is not an octal mode")))
    }

    fn bad(&self, reason: String) -> Error {
        Error::BadFile {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Parses `meta-data`; an empty document is empty metadata.
///
/// # Errors
/// [`Error::Parse`] when it is not a YAML mapping.
pub fn parse_meta_data(text: &str) -> Result<MetaData> {
    if text.trim().is_empty() {
        return Ok(MetaData::default());
    }
    serde_saphyr::from_str(text).map_err(|e| Error::Parse {
        doc: "meta-data",
        reason: e.to_string(),
    })
}

/// Parses `user-data`, which must be `#cloud-config` (or empty).
///
/// # Errors
/// [`Error::Parse`] for another kind of user-data (a script, MIME multi-part) or bad YAML.
pub fn parse_user_data(text: &str) -> Result<CloudConfig> {
    if text.trim().is_empty() {
        return Ok(CloudConfig::default());
    }
    let first = text.lines().next().unwrap_or_default().trim_end();
    if first != "#cloud-config" {
        return Err(Error::Parse {
            doc: "user-data",
            reason: format!(
                "the node image reads only #cloud-config user-data, this starts with {first:?}"
            ),
        });
    }
    let body = &text[first.len()..];
    if body.trim().is_empty() {
        return Ok(CloudConfig::default());
    }
    serde_saphyr::from_str(body).map_err(|e| Error::Parse {
        doc: "user-data",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the provisioner serves for a machine joining with a bootstrap kubeconfig.
    const USER_DATA: &str = r#"#cloud-config
hostname: n1
runcmd:
- [systemctl, enable, --now, keelson-agent]
packages: [curl]
write_files:
- path: /etc/keelson/bootstrap-kubeconfig
  permissions: '0600'
  owner: root:root
  content: |
    apiVersion: v1
    kind: Config
- path: /etc/keelson/agent-args
  content: "--node-name n1 --kubeconfig /var/lib/keelson/kubeconfig\n"
- path: /etc/keelson/blob
  encoding: b64
  permissions: 0640
  content: aGVs
    bG8=
"#;

    #[test]
    fn reads_hostname_and_write_files_and_ignores_the_rest() {
        let cc = parse_user_data(USER_DATA).unwrap();
        assert_eq!(cc.hostname.as_deref(), Some("n1"));
        assert_eq!(cc.write_files.len(), 3);
        let kc = &cc.write_files[0];
        assert_eq!(kc.path, "/etc/keelson/bootstrap-kubeconfig");
        assert_eq!(kc.mode().unwrap(), 0o600);
        assert_eq!(kc.bytes().unwrap(), b"apiVersion: v1\nkind: Config\n");
        let args = &cc.write_files[1];
        assert_eq!(args.mode().unwrap(), 0o644);
        assert_eq!(
            args.bytes().unwrap(),
            b"--node-name n1 --kubeconfig /var/lib/keelson/kubeconfig\n"
        );
        let blob = &cc.write_files[2];
        assert_eq!(blob.bytes().unwrap(), b"hello");
        assert_eq!(blob.mode().unwrap(), 0o640, "{:?}", blob.permissions);
    }

    #[test]
    fn empty_and_other_user_data() {
        assert!(parse_user_data("").unwrap().hostname.is_none());
        assert!(
            parse_user_data("#cloud-config\n{}\n")
                .unwrap()
                .write_files
                .is_empty()
        );
        assert!(
            parse_user_data("#cloud-config\n")
                .unwrap()
                .write_files
                .is_empty()
        );
        let err = parse_user_data("#!/bin/sh\necho hi\n").unwrap_err();
        assert!(err.to_string().contains("#cloud-config"), "{err}");
        assert!(matches!(
            parse_user_data("#cloud-config\nwrite_files: 3\n"),
            Err(Error::Parse { .. })
        ));
    }

    #[test]
    fn bad_entries_are_refused_with_their_path() {
        let cc = parse_user_data(
            "#cloud-config\nwrite_files:\n- path: /a\n  encoding: gz+b64\n  content: x\n\
             - path: /b\n  permissions: 'rw'\n- path: /c\n  encoding: b64\n  content: '!!'\n",
        )
        .unwrap();
        let err = cc.write_files[0].bytes().unwrap_err();
        assert!(
            err.to_string().contains("\"/a\"") && err.to_string().contains("gz+b64"),
            "{err}"
        );
        assert!(cc.write_files[1].mode().is_err());
        assert!(cc.write_files[2].bytes().is_err());
    }

    #[test]
    fn meta_data_hostname() {
        let md = parse_meta_data("instance-id: node-1\nlocal-hostname: node-1\n").unwrap();
        assert_eq!(md.instance_id.as_deref(), Some("node-1"));
        assert_eq!(md.local_hostname.as_deref(), Some("node-1"));
        assert!(parse_meta_data("").unwrap().local_hostname.is_none());
    }
}
