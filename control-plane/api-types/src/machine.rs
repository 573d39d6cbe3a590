//! `Machine` (`provisioning.keelson.dev/v1`, cluster-scoped): a server the provisioner boots,
//! known by its NICs' MAC addresses (or SMBIOS UUID), with the profile it boots and the
//! state of its way into the cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Serialize};

/// What the provisioner boots on a machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schemars",
    schemars(rename = "dev.keelson.provisioning.v1.MachineSpec")
)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    /// MAC addresses of the machine's network interfaces (`52:54:00:12:34:56`); the
    /// provisioner matches DHCP and HTTP clients by them.
    #[serde(default)]
    pub macs: Vec<String>,
    /// The SMBIOS system UUID, matched where a client sends one (DHCP option 97, which PXE
    /// firmware and iPXE send; either byte order). A machine matched by it gets the MAC it
    /// booted from added to `macs`.
    #[serde(
        default,
        rename = "smbiosUUID",
        skip_serializing_if = "Option::is_none"
    )]
    pub smbios_uuid: Option<String>,
    /// The provisioner profile to boot; none: the machine gets no boot information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Host name, and the name of the Node the machine joins as.
    #[serde(default)]
    pub hostname: String,
    /// A reserved IPv4 address (full DHCP mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// Where a machine is on its way into the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schemars",
    schemars(rename = "dev.keelson.provisioning.v1.MachineState")
)]
pub enum MachineState {
    /// Seen on the network (an unknown MAC asked for an address or a boot file).
    Discovered,
    /// Fetched its iPXE script or NoCloud seed: it is installing or booting.
    Provisioning,
    /// Its Node is Ready.
    Joined,
    /// Provisioning failed; `message` says why.
    Failed,
}

impl MachineState {
    /// The name as written in `status.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Discovered => "Discovered",
            MachineState::Provisioning => "Provisioning",
            MachineState::Joined => "Joined",
            MachineState::Failed => "Failed",
        }
    }
}

/// What the provisioner last observed of a machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schemars",
    schemars(rename = "dev.keelson.provisioning.v1.MachineStatus")
)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    /// Discovered, Provisioning, Joined or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<MachineState>,
    /// The Node the machine joined as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// When the provisioner last heard from the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// A human-readable note, e.g. why provisioning failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A server the provisioner knows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Machine {
    /// Standard object metadata; machines are cluster-scoped.
    pub metadata: ObjectMeta,
    /// What to boot.
    pub spec: MachineSpec,
    /// What was observed (the `status` subresource).
    pub status: Option<MachineStatus>,
}

impl k8s_openapi::Resource for Machine {
    const API_VERSION: &'static str = "provisioning.keelson.dev/v1";
    const GROUP: &'static str = crate::PROVISIONING_GROUP;
    const KIND: &'static str = "Machine";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "machines";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::ListableResource for Machine {
    const LIST_KIND: &'static str = "MachineList";
}

impl k8s_openapi::Metadata for Machine {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The wire form: the object plus its type fields.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: &'a ObjectMeta,
    spec: &'a MachineSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a MachineStatus>,
}

/// The wire form as read: type fields are accepted (and checked by the server), unknown
/// fields dropped, so that a round trip shows them.
#[derive(Deserialize)]
struct WireIn {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: MachineSpec,
    #[serde(default)]
    status: Option<MachineStatus>,
}

impl Serialize for Machine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use k8s_openapi::Resource as _;
        WireOut {
            api_version: Self::API_VERSION,
            kind: Self::KIND,
            metadata: &self.metadata,
            spec: &self.spec,
            status: self.status.as_ref(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Machine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = WireIn::deserialize(d)?;
        Ok(Machine {
            metadata: w.metadata,
            spec: w.spec,
            status: w.status,
        })
    }
}

#[cfg(feature = "schemars")]
impl schemars::JsonSchema for Machine {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "dev.keelson.provisioning.v1.Machine".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let described = |mut s: schemars::Schema, text: &str| {
            s.ensure_object().insert("description".into(), text.into());
            s
        };
        let metadata = described(
            generator.subschema_for::<ObjectMeta>(),
            "Standard object's metadata.",
        );
        let spec = described(
            generator.subschema_for::<MachineSpec>(),
            "What the provisioner boots on the machine.",
        );
        let status = described(
            generator.subschema_for::<MachineStatus>(),
            "What the provisioner last observed of the machine.",
        );
        schemars::json_schema!({
            "description": "Machine is a server the Keelson provisioner boots: its MAC addresses, profile and host name, and its state on the way into the cluster.",
            "type": "object",
            "properties": {
                "apiVersion": {"description": "APIVersion defines the versioned schema of this representation of an object.", "type": "string"},
                "kind": {"description": "Kind is a string value representing the REST resource this object represents.", "type": "string"},
                "metadata": metadata,
                "spec": spec,
                "status": status,
            },
            "required": ["metadata", "spec"],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_has_type_fields_and_camel_case() {
        let m = Machine {
            metadata: ObjectMeta {
                name: Some("rack1-3".into()),
                ..ObjectMeta::default()
            },
            spec: MachineSpec {
                macs: vec!["52:54:00:12:34:56".into()],
                smbios_uuid: Some("4c4c4544-0000".into()),
                profile: Some("worker".into()),
                hostname: "rack1-3".into(),
                ip: None,
            },
            status: Some(MachineStatus {
                state: Some(MachineState::Discovered),
                node_name: Some("rack1-3".into()),
                ..MachineStatus::default()
            }),
        };
        let v = serde_json::to_value(&m).expect("serializes");
        assert_eq!(v["apiVersion"], "provisioning.keelson.dev/v1");
        assert_eq!(v["kind"], "Machine");
        assert_eq!(v["spec"]["smbiosUUID"], "4c4c4544-0000");
        assert_eq!(v["status"]["state"], "Discovered");
        assert_eq!(v["status"]["nodeName"], "rack1-3");
        assert!(v["spec"].get("ip").is_none());
        let back: Machine = serde_json::from_value(v).expect("deserializes");
        assert_eq!(back, m);
    }

    #[test]
    fn unknown_fields_are_dropped_by_a_round_trip() {
        let v = serde_json::json!({"apiVersion": "provisioning.keelson.dev/v1", "kind": "Machine",
            "metadata": {"name": "m"}, "spec": {"hostname": "m", "bogus": 1}});
        let m: Machine = serde_json::from_value(v).expect("deserializes");
        let back = serde_json::to_value(&m).expect("serializes");
        assert!(back["spec"].get("bogus").is_none());
    }
}
