//! The machine inventory of the standalone mode: machines (by MAC or SMBIOS UUID) and boot
//! profiles, read
//! from a TOML file, plus the DHCP network settings of the segment the provisioner serves.
//!
//! ```toml
//! unknown = "default"          # or "ignore": what unknown MACs get
//! default_profile = "worker"
//!
//! [dhcp]
//! pool_start = "192.0.2.100"
//! pool_end = "192.0.2.199"
//! prefix_len = 24
//! router = "192.0.2.1"
//! dns = ["192.0.2.1"]
//! lease_secs = 3600
//!
//! [profiles.worker]
//! kernel = "vmlinuz"
//! initrd = ["initrd.img"]
//! cmdline = "console=ttyS0"
//! user_data = { packages = ["curl"] }
//!
//! [[machines]]
//! name = "node-1"
//! mac = "52:54:00:12:34:56"
//! ip = "192.0.2.10"
//!
//! [[machines]]
//! name = "node-2"                # known by its SMBIOS UUID: DHCP option 97 or iPXE ${uuid}
//! uuid = "4c4c4544-0043-3010-8052-b4c04f4e4d32"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use uuid::Uuid;

use crate::mac::Mac;
use crate::smbios;

/// Errors reading or validating an inventory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("reading inventory {path}: {source}")]
    Read {
        /// The inventory file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("parsing inventory {path}: {source}")]
    Parse {
        /// The inventory file.
        path: PathBuf,
        /// The TOML error (with line and column).
        source: Box<toml::de::Error>,
    },
    /// The content is well-formed but inconsistent.
    #[error("invalid inventory {path}: {reason}")]
    Invalid {
        /// The inventory file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What machines that are not in the inventory get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownPolicy {
    /// Boot them with the default profile.
    #[default]
    Default,
    /// No boot information at all (a full DHCP server still gives them an address).
    Ignore,
}

/// DHCP settings of the served segment (used by the full DHCP server only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSettings {
    /// First address of the dynamic pool.
    pub pool_start: Ipv4Addr,
    /// Last address of the dynamic pool (inclusive).
    pub pool_end: Ipv4Addr,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
    /// Default gateway handed out, if any.
    #[serde(default)]
    pub router: Option<Ipv4Addr>,
    /// DNS servers handed out.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Domain name handed out, if any.
    #[serde(default)]
    pub domain: Option<String>,
    /// Lease duration in seconds.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u32,
}

fn default_lease_secs() -> u32 {
    3600
}

impl DhcpSettings {
    /// The subnet mask from the prefix length.
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len.min(32)))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

/// A boot profile: what a machine boots and its cloud-init data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Kernel: a path under the HTTP assets directory, or an absolute `http(s)://` URL.
    pub kernel: String,
    /// Initrds, same forms as `kernel`.
    #[serde(default)]
    pub initrd: Vec<String>,
    /// Kernel command line (the NoCloud `ds=` argument is appended).
    #[serde(default)]
    pub cmdline: String,
    /// cloud-config for `user-data` (emitted as YAML under `#cloud-config`).
    #[serde(default)]
    pub user_data: Option<serde_json::Map<String, serde_json::Value>>,
    /// cloud-config for `vendor-data`; empty when absent.
    #[serde(default)]
    pub vendor_data: Option<serde_json::Map<String, serde_json::Value>>,
    /// Network config (v1 or v2); when absent, DHCP on the interface with the machine's MAC.
    #[serde(default)]
    pub network_config: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A known machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Unique name, used in URLs and as cloud-init instance-id.
    pub name: String,
    /// The boot NIC's MAC address.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// The SMBIOS system UUID; a machine needs a MAC, a UUID or both.
    #[serde(default)]
    pub uuid: Option<Uuid>,
    /// A reserved address (full DHCP mode). Reservations are by MAC: a machine known only
    /// by its UUID gets its address for the MAC it asks from.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Host name; defaults to `name`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Profile name; defaults to the inventory's default profile.
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    unknown: UnknownPolicy,
    #[serde(default)]
    default_profile: Option<String>,
    #[serde(default)]
    dhcp: Option<DhcpSettings>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
    #[serde(default)]
    machines: Vec<Machine>,
}

/// A validated inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    unknown: UnknownPolicy,
    default_profile: Option<String>,
    dhcp: Option<DhcpSettings>,
    profiles: BTreeMap<String, Profile>,
    machines: Vec<Machine>,
    by_mac: HashMap<Mac, usize>,
    by_uuid: HashMap<Uuid, usize>,
    by_name: HashMap<String, usize>,
}

/// The boot target resolved for a MAC: a known machine, or an unknown one on the default
/// profile.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// Identifier used in URLs and as instance-id: the machine's name, or `mac-<12 hex>`.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// The MAC address it boots from: the one asking, or the machine's (`None` for a machine
    /// known only by its UUID, resolved by name).
    pub mac: Option<Mac>,
    /// The inventory entry, if the machine is known.
    pub machine: Option<&'a Machine>,
    /// The profile name.
    pub profile_name: &'a str,
    /// The profile.
    pub profile: &'a Profile,
}

const UNKNOWN_PREFIX: &str = "mac-";

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.')
        && !s.starts_with(UNKNOWN_PREFIX)
}

impl Inventory {
    /// Reads and validates an inventory file.
    ///
    /// # Errors
    /// [`Error::Read`], [`Error::Parse`] or [`Error::Invalid`] (duplicate names or MACs,
    /// unknown profiles, names unsafe in URLs, an empty pool…).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates inventory text; `path` is only used in error messages.
    ///
    /// # Errors
    /// As [`Inventory::load`], without [`Error::Read`].
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let file: File = toml::from_str(text).map_err(|source| Error::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        for name in file.profiles.keys() {
            if !valid_name(name) {
                return Err(invalid(format!(
                    "profile name {name:?} must be [A-Za-z0-9._-]"
                )));
            }
        }
        if let Some(p) = &file.default_profile
            && !file.profiles.contains_key(p)
        {
            return Err(invalid(format!("default_profile {p:?} is not defined")));
        }
        if let Some(d) = &file.dhcp {
            if d.prefix_len == 0 || d.prefix_len > 30 {
                return Err(invalid(format!(
                    "dhcp.prefix_len {} out of 1..=30",
                    d.prefix_len
                )));
            }
            if u32::from(d.pool_start) > u32::from(d.pool_end) {
                return Err(invalid("dhcp.pool_start is after dhcp.pool_end".into()));
            }
        }
        let mut by_mac = HashMap::new();
        let mut by_uuid = HashMap::new();
        let mut by_name = HashMap::new();
        for (i, m) in file.machines.iter().enumerate() {
            if !valid_name(&m.name) {
                return Err(invalid(format!(
                    "machine name {:?} must be [A-Za-z0-9._-], not start with '.' or 'mac-'",
                    m.name
                )));
            }
            if by_name.insert(m.name.clone(), i).is_some() {
                return Err(invalid(format!("machine name {:?} appears twice", m.name)));
            }
            if let Some(mac) = m.mac
                && by_mac.insert(mac, i).is_some()
            {
                return Err(invalid(format!("MAC {mac} appears twice")));
            }
            if let Some(uuid) = m.uuid
                && by_uuid.keys().any(|u| smbios::same(u, &uuid))
            {
                return Err(invalid(format!("UUID {uuid} appears twice")));
            }
            if let Some(uuid) = m.uuid {
                by_uuid.insert(uuid, i);
            }
            if m.mac.is_none() && m.uuid.is_none() {
                return Err(invalid(format!(
                    "machine {:?} needs a mac or a uuid",
                    m.name
                )));
            }
            match m.profile.as_ref().or(file.default_profile.as_ref()) {
                Some(p) if !file.profiles.contains_key(p) => {
                    return Err(invalid(format!(
                        "machine {:?}: profile {p:?} is not defined",
                        m.name
                    )));
                }
                None => {
                    return Err(invalid(format!(
                        "machine {:?} has no profile and there is no default_profile",
                        m.name
                    )));
                }
                Some(_) => {}
            }
        }
        let mut ips = HashMap::new();
        for m in &file.machines {
            if let Some(ip) = m.ip
                && let Some(other) = ips.insert(ip, &m.name)
            {
                return Err(invalid(format!(
                    "address {ip} reserved for {other:?} and {:?}",
                    m.name
                )));
            }
        }
        Ok(Inventory {
            unknown: file.unknown,
            default_profile: file.default_profile,
            dhcp: file.dhcp,
            profiles: file.profiles,
            machines: file.machines,
            by_mac,
            by_uuid,
            by_name,
        })
    }

    /// This inventory's profiles and settings with `machines` instead of the file's (API
    /// mode). Entries repeating a MAC are dropped after the first; several entries may share
    /// a name (one machine with several NICs) and a UUID, the first one answering for both.
    pub fn with_machines(&self, machines: Vec<Machine>) -> Self {
        let mut by_mac = HashMap::new();
        let mut by_uuid: HashMap<Uuid, usize> = HashMap::new();
        let mut by_name = HashMap::new();
        let mut kept = Vec::with_capacity(machines.len());
        for m in machines {
            if let Some(mac) = m.mac
                && by_mac.contains_key(&mac)
            {
                tracing::warn!(%mac, machine = %m.name, "MAC listed by two machines; ignoring the second");
                continue;
            }
            let i = kept.len();
            if let Some(mac) = m.mac {
                by_mac.insert(mac, i);
            }
            if let Some(uuid) = m.uuid {
                match by_uuid.iter().find(|(u, _)| smbios::same(u, &uuid)) {
                    Some((_, &j)) if kept.get(j).is_some_and(|o: &Machine| o.name != m.name) => {
                        tracing::warn!(%uuid, machine = %m.name, "UUID listed by two machines; matching the first");
                    }
                    Some(_) => {}
                    None => {
                        by_uuid.insert(uuid, i);
                    }
                }
            }
            by_name.entry(m.name.clone()).or_insert(i);
            kept.push(m);
        }
        Inventory {
            unknown: self.unknown,
            default_profile: self.default_profile.clone(),
            dhcp: self.dhcp.clone(),
            profiles: self.profiles.clone(),
            machines: kept,
            by_mac,
            by_uuid,
            by_name,
        }
    }

    /// What unknown MACs get.
    pub fn unknown_policy(&self) -> UnknownPolicy {
        self.unknown
    }

    /// The default profile's name, if any.
    pub fn default_profile(&self) -> Option<&str> {
        self.default_profile.as_deref()
    }

    /// DHCP settings, if the file has a `[dhcp]` section.
    pub fn dhcp(&self) -> Option<&DhcpSettings> {
        self.dhcp.as_ref()
    }

    /// All known machines.
    pub fn machines(&self) -> &[Machine] {
        &self.machines
    }

    /// The machine with this MAC, if known.
    pub fn machine(&self, mac: &Mac) -> Option<&Machine> {
        self.by_mac.get(mac).and_then(|&i| self.machines.get(i))
    }

    /// The machine with this SMBIOS UUID (in either byte order), if known.
    pub fn machine_by_uuid(&self, uuid: &Uuid) -> Option<&Machine> {
        let i = self
            .by_uuid
            .get(uuid)
            .or_else(|| self.by_uuid.get(&smbios::swapped(uuid)))?;
        self.machines.get(*i)
    }

    /// The machine asking with this MAC and, if it sent one, this UUID: by MAC first.
    pub fn known(&self, mac: &Mac, uuid: Option<&Uuid>) -> Option<&Machine> {
        self.machine(mac)
            .or_else(|| uuid.and_then(|u| self.machine_by_uuid(u)))
    }

    /// Address reservations by MAC.
    pub fn reservations(&self) -> HashMap<Mac, Ipv4Addr> {
        self.machines
            .iter()
            .filter_map(|m| Some((m.mac?, m.ip?)))
            .collect()
    }

    fn machine_target<'a>(&'a self, m: &'a Machine, mac: Option<Mac>) -> Option<Target<'a>> {
        let profile_name = m.profile.as_deref().or(self.default_profile.as_deref())?;
        let profile = self.profiles.get(profile_name)?;
        Some(Target {
            id: m.name.clone(),
            hostname: m.hostname.clone().unwrap_or_else(|| m.name.clone()),
            mac,
            machine: Some(m),
            profile_name,
            profile,
        })
    }

    /// What a MAC boots: its machine's profile, the default profile for unknown MACs when the
    /// policy says so, or `None`.
    pub fn target(&self, mac: Mac) -> Option<Target<'_>> {
        self.target_for(mac, None)
    }

    /// What a client asking with `mac` and, if it sent one, its SMBIOS `uuid` boots: the
    /// machine with that MAC, else the one with that UUID, else what unknown machines get.
    pub fn target_for(&self, mac: Mac, uuid: Option<&Uuid>) -> Option<Target<'_>> {
        if let Some(m) = self.known(&mac, uuid) {
            return self.machine_target(m, Some(mac));
        }
        if self.unknown == UnknownPolicy::Ignore {
            return None;
        }
        let profile_name = self.default_profile.as_deref()?;
        let profile = self.profiles.get(profile_name)?;
        let id = format!("{UNKNOWN_PREFIX}{}", mac.compact());
        Some(Target {
            hostname: id.clone(),
            id,
            mac: Some(mac),
            machine: None,
            profile_name,
            profile,
        })
    }

    /// Resolves a target by its identifier (a machine name or `mac-<12 hex>`).
    pub fn target_by_id(&self, id: &str) -> Option<Target<'_>> {
        if let Some(&i) = self.by_name.get(id) {
            let m = self.machines.get(i)?;
            return self.machine_target(m, m.mac);
        }
        let hex = id.strip_prefix(UNKNOWN_PREFIX)?;
        if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let mac = Mac(mac);
        // A known machine is only reachable by its name.
        if self.machine(&mac).is_some() {
            return None;
        }
        self.target(mac)
    }
}

/// A small inventory used by unit tests across the crate.
#[cfg(test)]
pub(crate) fn tests_sample() -> &'static str {
    tests::SAMPLE
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"
unknown = "default"
default_profile = "worker"

[dhcp]
pool_start = "192.0.2.100"
pool_end = "192.0.2.110"
prefix_len = 24
router = "192.0.2.1"
dns = ["192.0.2.1"]

[profiles.worker]
kernel = "vmlinuz"
initrd = ["initrd.img"]
cmdline = "console=ttyS0"
user_data = { packages = ["curl"] }

[[machines]]
name = "node-1"
mac = "52:54:00:12:34:56"
ip = "192.0.2.10"
"#;

    fn inv(text: &str) -> Result<Inventory> {
        Inventory::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn resolves_known_and_unknown() {
        let inv = inv(SAMPLE).unwrap();
        let known = inv.target("52:54:00:12:34:56".parse().unwrap()).unwrap();
        assert_eq!(known.id, "node-1");
        assert_eq!(known.profile_name, "worker");
        let unknown = inv.target("52:54:00:00:00:01".parse().unwrap()).unwrap();
        assert_eq!(unknown.id, "mac-525400000001");
        assert_eq!(
            inv.target_by_id("mac-525400000001").unwrap().mac,
            unknown.mac
        );
        assert_eq!(inv.target_by_id("node-1").unwrap().id, "node-1");
        assert!(
            inv.target_by_id("mac-525400123456").is_none(),
            "known machine by mac id"
        );
        assert!(inv.target_by_id("nope").is_none());
        assert_eq!(
            inv.dhcp().unwrap().netmask(),
            Ipv4Addr::new(255, 255, 255, 0)
        );
    }

    #[test]
    fn machines_known_by_uuid() {
        let text = format!(
            "{SAMPLE}\n[[machines]]\nname = \"node-2\"\nuuid = \"4c4c4544-0043-3010-8052-b4c04f4e4d32\"\n"
        );
        let inv = inv(&text).unwrap();
        let uuid: Uuid = "4c4c4544-0043-3010-8052-b4c04f4e4d32".parse().unwrap();
        let mac: Mac = "52:54:00:00:00:05".parse().unwrap();
        let t = inv.target_for(mac, Some(&uuid)).unwrap();
        assert_eq!((t.id.as_str(), t.mac), ("node-2", Some(mac)));
        let t = inv.target_for(mac, Some(&smbios::swapped(&uuid))).unwrap();
        assert_eq!(t.id, "node-2", "either byte order");
        assert_eq!(inv.target(mac).unwrap().id, "mac-525400000005");
        // By MAC first: node-1's MAC with node-2's UUID is node-1.
        let t = inv
            .target_for("52:54:00:12:34:56".parse().unwrap(), Some(&uuid))
            .unwrap();
        assert_eq!(t.id, "node-1");
        let by_name = inv.target_by_id("node-2").unwrap();
        assert_eq!(by_name.mac, None);
        let no_key = format!("{SAMPLE}\n[[machines]]\nname = \"n9\"\n");
        assert!(matches!(inv_err(&no_key), Error::Invalid { .. }));
        let twice = format!(
            "{text}\n[[machines]]\nname = \"n9\"\nuuid = \"{}\"\n",
            smbios::swapped(&uuid)
        );
        assert!(matches!(inv_err(&twice), Error::Invalid { .. }));
    }

    fn inv_err(text: &str) -> Error {
        match inv(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn ignore_policy_gives_unknown_nothing() {
        let text = SAMPLE.replace("unknown = \"default\"", "unknown = \"ignore\"");
        let inv = inv(&text).unwrap();
        assert!(inv.target("52:54:00:00:00:01".parse().unwrap()).is_none());
        assert!(inv.target("52:54:00:12:34:56".parse().unwrap()).is_some());
    }

    #[test]
    fn rejects_inconsistent_files() {
        let dup =
            format!("{SAMPLE}\n[[machines]]\nname = \"node-1\"\nmac = \"52:54:00:00:00:09\"\n");
        assert!(matches!(inv(&dup), Err(Error::Invalid { .. })));
        let dup_mac =
            format!("{SAMPLE}\n[[machines]]\nname = \"node-2\"\nmac = \"52:54:00:12:34:56\"\n");
        assert!(matches!(inv(&dup_mac), Err(Error::Invalid { .. })));
        let bad_profile = format!(
            "{SAMPLE}\n[[machines]]\nname = \"n3\"\nmac = \"52:54:00:00:00:03\"\nprofile = \"x\"\n"
        );
        assert!(matches!(inv(&bad_profile), Err(Error::Invalid { .. })));
        let bad_name =
            format!("{SAMPLE}\n[[machines]]\nname = \"../x\"\nmac = \"52:54:00:00:00:04\"\n");
        assert!(matches!(inv(&bad_name), Err(Error::Invalid { .. })));
        assert!(matches!(inv("machines = 3"), Err(Error::Parse { .. })));
    }
}
