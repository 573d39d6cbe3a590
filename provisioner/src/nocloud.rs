//! cloud-init NoCloud seed documents for a boot target: `meta-data` (instance-id and
//! local-hostname), `user-data` and `vendor-data` (`#cloud-config` from the profile) and
//! `network-config` (the profile's, or DHCP on the NIC with the machine's MAC).

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::inventory::Target;
use crate::live::JoinInfo;

/// Where the node image finds the bootstrap kubeconfig.
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/keelson/bootstrap-kubeconfig";
/// Where the node image finds the agent's arguments.
pub const AGENT_ARGS: &str = "/etc/keelson/agent-args";
/// Where the agent writes the node's own kubeconfig.
pub const NODE_KUBECONFIG: &str = "/var/lib/keelson/kubeconfig";

/// Installed Debian/Ubuntu servers have systemd: run the agent as a unit with the written
/// arguments. The Keelson node image runs the agent from its own init and skips this.
const SYSTEMD_UNIT_SCRIPT: &str = r#"command -v systemctl >/dev/null 2>&1 || exit 0
cat > /etc/systemd/system/keelson-agent.service <<'UNIT'
[Unit]
Description=Keelson node agent
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/bin/sh -c 'exec /usr/local/bin/keelson-agent node $(cat /etc/keelson/agent-args)'
Restart=always
RestartSec=5
KillMode=process

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now keelson-agent.service
"#;

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

/// The `user-data` of a machine that joins the cluster: its host name, the bootstrap
/// kubeconfig (server, CA, a fresh bootstrap token) and the agent's arguments as files, a
/// systemd unit for installed servers, then the profile's own user-data merged in (its
/// `write_files` and `runcmd` after ours; our `hostname` wins).
///
/// # Errors
/// [`RenderError`] if YAML serialization fails or the token is malformed.
pub fn join_user_data(target: &Target<'_>, join: &JoinInfo) -> Result<String, RenderError> {
    #[derive(Serialize)]
    struct JoinConfig {
        hostname: String,
        write_files: Vec<Value>,
        runcmd: Vec<Value>,
        #[serde(flatten)]
        rest: Map<String, Value>,
    }
    let token: keelson_api_types::bootstrap_token::BootstrapToken =
        join.token
            .parse()
            .map_err(
                |e: keelson_api_types::bootstrap_token::TokenError| RenderError {
                    doc: "user-data",
                    target: target.id.clone(),
                    message: e.to_string(),
                },
            )?;
    let kubeconfig = keelson_api_types::bootstrap_token::bootstrap_kubeconfig(
        &join.server,
        &join.ca_pem,
        &token,
    );
    let mut rest = target.profile.user_data.clone().unwrap_or_default();
    rest.remove("hostname");
    let list = |rest: &mut Map<String, Value>, key: &str| match rest.remove(key) {
        Some(Value::Array(items)) => items,
        Some(other) => vec![other],
        None => Vec::new(),
    };
    let extra_files = list(&mut rest, "write_files");
    let extra_cmds = list(&mut rest, "runcmd");
    let mut write_files = vec![
        json!({"path": BOOTSTRAP_KUBECONFIG, "permissions": "0600", "content": kubeconfig}),
        json!({"path": AGENT_ARGS, "content": agent_args(&target.hostname)}),
    ];
    write_files.extend(extra_files);
    let mut runcmd = vec![json!(["sh", "-c", SYSTEMD_UNIT_SCRIPT])];
    runcmd.extend(extra_cmds);
    // Long one-line values (the agent's arguments) stay on one line rather than folded, so
    // that simple readers in a node image see them as written.
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = 4096;
    let config = JoinConfig {
        hostname: target.hostname.clone(),
        write_files,
        runcmd,
        rest,
    };
    let body = serde_saphyr::to_string_with_options(&config, options).map_err(|e| RenderError {
        doc: "user-data",
        target: target.id.clone(),
        message: e.to_string(),
    })?;
    Ok(format!("#cloud-config\n{body}"))
}

/// The agent's command-line arguments for a joining node.
pub fn agent_args(hostname: &str) -> String {
    format!(
        "--node-name {hostname} --bootstrap-kubeconfig {BOOTSTRAP_KUBECONFIG} --kubeconfig {NODE_KUBECONFIG}"
    )
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
/// matching the machine's MAC (on the Ethernet interfaces, for a machine known only by its
/// UUID).
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
                        "match": match target.mac {
                            Some(mac) => json!({ "macaddress": mac.to_string() }),
                            None => json!({ "name": "e*" }),
                        },
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
    fn join_user_data_follows_the_node_image_contract() {
        let inv =
            Inventory::parse(crate::inventory::tests_sample(), std::path::Path::new("t")).unwrap();
        let t = inv.target("52:54:00:12:34:56".parse().unwrap()).unwrap();
        let join = JoinInfo {
            server: "https://192.0.2.1:6443".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            token: "abcdef.0123456789abcdef".into(),
        };
        let ud = join_user_data(&t, &join).unwrap();
        assert!(ud.starts_with("#cloud-config\nhostname: node-1\n"), "{ud}");
        assert!(
            ud.contains(&agent_args("node-1")),
            "arguments on one line:\n{ud}"
        );
        let v: Value = serde_saphyr::from_str(ud.trim_start_matches("#cloud-config\n")).unwrap();
        assert_eq!(v["hostname"], "node-1");
        let files = v["write_files"].as_array().unwrap();
        assert_eq!(files[0]["path"], BOOTSTRAP_KUBECONFIG);
        assert_eq!(files[0]["permissions"], "0600");
        let kc = files[0]["content"].as_str().unwrap();
        assert!(kc.contains("server: https://192.0.2.1:6443"), "{kc}");
        assert!(kc.contains("token: abcdef.0123456789abcdef"), "{kc}");
        assert_eq!(files[1]["path"], AGENT_ARGS);
        assert_eq!(
            files[1]["content"],
            "--node-name node-1 --bootstrap-kubeconfig /etc/keelson/bootstrap-kubeconfig --kubeconfig /var/lib/keelson/kubeconfig"
        );
        assert!(
            v["runcmd"][0][2]
                .as_str()
                .unwrap()
                .contains("keelson-agent.service")
        );
        // The profile's own user-data is kept.
        assert_eq!(v["packages"][0], "curl");
        let bad = JoinInfo {
            token: "not-a-token".into(),
            ..join
        };
        assert!(join_user_data(&t, &bad).is_err());
    }

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
