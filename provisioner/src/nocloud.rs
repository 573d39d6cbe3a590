//! cloud-init NoCloud seed documents for a boot target: `meta-data` (instance-id and
//! local-hostname), `user-data` and `vendor-data` (`#cloud-config` from the profile) and
//! `network-config` (the profile's, or DHCP on the NIC with the machine's MAC).

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::inventory::Target;

/// Errors rendering a seed document.
#[derive(Debug, thiserror::Error)]
#[error("rendering {doc} for {target} as YAML: {message}")]
pub struct RenderError {
    /// The document (`user-data`, …).
    pub doc: &'static str,
    /// The target id.
    pub target: String,
    /// The serializer's message.
    pub message: String,
}

fn yaml<T: Serialize>(
    doc: &'static str,
    target: &Target<'_>,
    value: &T,
) -> Result<String, RenderError> {
    serde_saphyr::to_string(value).map_err(|e| RenderError {
        doc,
        target: target.id.clone(),
        message: e.to_string(),
    })
}

/// The `meta-data` document.
///
/// # Errors
/// [`RenderError`] if YAML serialization fails.
pub fn meta_data(target: &Target<'_>) -> Result<String, RenderError> {
    #[derive(Serialize)]
    struct Meta<'a> {
        #[serde(rename = "instance-id")]
        instance_id: &'a str,
        #[serde(rename = "local-hostname")]
        local_hostname: &'a str,
    }
    yaml(
        "meta-data",
        target,
        &Meta {
            instance_id: &target.id,
            local_hostname: &target.hostname,
        },
    )
}

fn cloud_config(
    doc: &'static str,
    target: &Target<'_>,
    data: Option<&Map<String, Value>>,
) -> Result<String, RenderError> {
    let body = match data {
        Some(d) if !d.is_empty() => yaml(doc, target, d)?,
        _ => "{}\n".to_string(),
    };
    Ok(format!("#cloud-config\n{body}"))
}

/// The `user-data` document: `#cloud-config` and the profile's `user_data`.
///
/// # Errors
/// [`RenderError`] if YAML serialization fails.
pub fn user_data(target: &Target<'_>) -> Result<String, RenderError> {
    cloud_config("user-data", target, target.profile.user_data.as_ref())
}

/// The `vendor-data` document: the profile's `vendor_data` as `#cloud-config`, or empty.
///
/// # Errors
/// [`RenderError`] if YAML serialization fails.
pub fn vendor_data(target: &Target<'_>) -> Result<String, RenderError> {
    match &target.profile.vendor_data {
        Some(d) => cloud_config("vendor-data", target, Some(d)),
        None => Ok(String::new()),
    }
}

/// The `network-config` document: the profile's, or version 2 with DHCPv4 on the interface
/// matching the machine's MAC.
///
/// # Errors
/// [`RenderError`] if YAML serialization fails.
pub fn network_config(target: &Target<'_>) -> Result<String, RenderError> {
    match &target.profile.network_config {
        Some(n) => yaml("network-config", target, n),
        None => {
            let v = json!({
                "version": 2,
                "ethernets": {
                    "boot0": {
                        "match": { "macaddress": target.mac.to_string() },
                        "dhcp4": true,
                    }
                }
            });
            yaml("network-config", target, &v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;

    #[test]
    fn documents() {
        let inv =
            Inventory::parse(crate::inventory::tests_sample(), std::path::Path::new("t")).unwrap();
        let t = inv.target("52:54:00:12:34:56".parse().unwrap()).unwrap();
        assert_eq!(
            meta_data(&t).unwrap(),
            "instance-id: node-1\nlocal-hostname: node-1\n"
        );
        let ud = user_data(&t).unwrap();
        assert!(ud.starts_with("#cloud-config\n"), "{ud}");
        assert!(ud.contains("packages:\n") && ud.contains("curl"), "{ud}");
        assert_eq!(vendor_data(&t).unwrap(), "");
        let nc = network_config(&t).unwrap();
        assert!(nc.contains("version: 2"), "{nc}");
        assert!(
            nc.contains("macaddress: 52:54:00:12:34:56")
                || nc.contains("macaddress: \"52:54:00:12:34:56\""),
            "{nc}"
        );
        assert!(nc.contains("dhcp4: true"), "{nc}");
    }
}
