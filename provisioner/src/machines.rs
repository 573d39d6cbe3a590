//! API mode: the provisioner's machines are `Machine` objects (`provisioning.keelson.dev/v1`)
//! instead of `[[machines]]` in the TOML file (which still gives profiles, the unknown-MAC
//! policy and DHCP settings).
//!
//! [`run`] keeps the [`InventoryHandle`] in step with the Machines, and writes back what the
//! servers saw:
//! - a DHCP request or script fetch from an unknown MAC creates Machine `mac-<12 hex>` in
//!   state `Discovered` (with the default profile, or none under `unknown = "ignore"`);
//! - fetching the iPXE script or a NoCloud seed: `Provisioning`;
//! - the Node named like the machine's host name turns Ready: `Joined` (with `nodeName`);
//! - failing to serve it (e.g. no join token could be made): `Failed` with a message.
//!
//! [`ApiJoin`] issues the join credentials each user-data carries: a fresh bootstrap token
//! valid for a short time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use keelson_api_types::bootstrap_token::{BootstrapToken, NAMESPACE, TokenOptions};
use keelson_api_types::{Machine, MachineSpec, MachineState};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::inventory::{self, Inventory, UnknownPolicy};
use crate::live::{BoxFuture, InventoryHandle, JoinInfo, JoinIssuer, Sighting};
use crate::mac::Mac;
use crate::smbios;
use uuid::Uuid;

/// How long a machine's `lastSeen` may lag before a sighting refreshes it.
const SEEN_REFRESH: Duration = Duration::from_secs(30);

/// The inventory entries (one per MAC, or one for a machine known only by its SMBIOS UUID) of
/// the API's machines; machines without a profile, or without a valid MAC or UUID, boot
/// nothing.
pub fn entries(machines: &[Arc<Machine>]) -> Vec<inventory::Machine> {
    let mut out = Vec::new();
    for m in machines {
        let (Some(name), Some(profile)) = (m.metadata.name.as_ref(), m.spec.profile.as_ref())
        else {
            continue;
        };
        if m.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let uuid = m
            .spec
            .smbios_uuid
            .as_deref()
            .and_then(|u| match u.parse::<Uuid>() {
                Ok(u) => Some(u),
                Err(_) => {
                    warn!(machine = %name, uuid = %u, "not a UUID; ignored");
                    None
                }
            });
        let entry = |mac| inventory::Machine {
            name: name.clone(),
            mac,
            uuid,
            ip: m.spec.ip.as_deref().and_then(|ip| ip.parse().ok()),
            hostname: Some(m.spec.hostname.clone()).filter(|h| !h.is_empty()),
            profile: Some(profile.clone()),
        };
        let before = out.len();
        for mac in &m.spec.macs {
            match mac.parse::<Mac>() {
                Ok(mac) => out.push(entry(Some(mac))),
                Err(_) => warn!(machine = %name, %mac, "not a MAC address; ignored"),
            }
        }
        if out.len() == before && uuid.is_some() {
            out.push(entry(None));
        }
    }
    out
}

/// The Machine recorded for an unknown MAC (with the SMBIOS UUID it sent, if any).
pub fn discovered(
    mac: Mac,
    uuid: Option<Uuid>,
    policy: UnknownPolicy,
    default_profile: Option<&str>,
) -> Machine {
    let name = format!("mac-{}", mac.compact());
    Machine {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                [(
                    "provisioning.keelson.dev/discovered".to_owned(),
                    "true".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: MachineSpec {
            macs: vec![mac.to_string()],
            smbios_uuid: uuid.map(|u| u.to_string()),
            profile: match policy {
                UnknownPolicy::Default => default_profile.map(str::to_owned),
                UnknownPolicy::Ignore => None,
            },
            hostname: name,
            ip: None,
        },
        status: None,
    }
}

fn now() -> String {
    let t = jiff::Timestamp::now();
    t.round(jiff::Unit::Second).unwrap_or(t).to_string()
}

fn state_of(m: &Machine) -> Option<MachineState> {
    m.status.as_ref().and_then(|s| s.state)
}

fn seen_recently(m: &Machine) -> bool {
    m.status
        .as_ref()
        .and_then(|s| s.last_seen.as_ref())
        .is_some_and(|t| {
            jiff::Timestamp::now().duration_since(t.0)
                < jiff::SignedDuration::try_from(SEEN_REFRESH).unwrap_or_default()
        })
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Writes back what the servers see and keeps the inventory in step with the API.
struct MachineSync {
    machines: Api<Machine>,
    handle: InventoryHandle,
    base: Inventory,
    store: Store<Machine>,
    nodes: Store<Node>,
    /// MACs whose Machine is being created, so that a burst of DHCP packets makes one.
    creating: HashSet<Mac>,
    /// MACs being added to a Machine matched by UUID, so that a burst patches once.
    learning: HashSet<Mac>,
}

impl MachineSync {
    fn rebuild(&self) {
        let state = self.store.state();
        self.handle
            .replace(self.base.with_machines(entries(&state)));
    }

    fn by_mac(&self, mac: Mac) -> Option<Arc<Machine>> {
        let text = mac.to_string();
        self.store.state().into_iter().find(|m| {
            m.spec
                .macs
                .iter()
                .any(|x| x.eq_ignore_ascii_case(&text) || x.parse::<Mac>().ok() == Some(mac))
        })
    }

    fn by_name(&self, name: &str) -> Option<Arc<Machine>> {
        self.store
            .state()
            .into_iter()
            .find(|m| m.metadata.name.as_deref() == Some(name))
    }

    async fn set_status(&self, name: &str, status: serde_json::Value) {
        let patch = json!({ "status": status });
        match self
            .machines
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => debug!(machine = %name, %status, "status written"),
            Err(e) => warn!(machine = %name, error = %e, "writing the machine's status"),
        }
    }

    async fn provisioning(&self, m: &Machine) {
        let Some(name) = m.metadata.name.as_deref() else {
            return;
        };
        if state_of(m) == Some(MachineState::Provisioning) && seen_recently(m) {
            return;
        }
        info!(machine = %name, "provisioning");
        self.set_status(
            name,
            json!({"state": "Provisioning", "lastSeen": now(), "message": null}),
        )
        .await;
    }

    /// The Machine with this SMBIOS UUID (either byte order).
    fn by_uuid(&self, uuid: &Uuid) -> Option<Arc<Machine>> {
        self.store.state().into_iter().find(|m| {
            m.spec
                .smbios_uuid
                .as_deref()
                .and_then(|u| u.parse::<Uuid>().ok())
                .is_some_and(|u| smbios::same(&u, uuid))
        })
    }

    /// The Machine a client is: by MAC, else by UUID — then the MAC it booted from is added
    /// to the Machine's MACs, so that its address reservation, scripts and seeds follow the
    /// MAC from now on, as for any machine.
    async fn identify(&mut self, mac: Mac, uuid: Option<Uuid>) -> Option<Arc<Machine>> {
        if let Some(m) = self.by_mac(mac) {
            return Some(m);
        }
        let m = self.by_uuid(&uuid?)?;
        let name = m.metadata.name.as_deref()?;
        if self.learning.insert(mac) {
            let mut macs = m.spec.macs.clone();
            macs.push(mac.to_string());
            let patch = json!({ "spec": { "macs": macs } });
            match self
                .machines
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => info!(machine = %name, %mac, "matched by SMBIOS UUID; MAC recorded"),
                Err(e) => {
                    warn!(machine = %name, %mac, error = %e, "recording the MAC of a machine matched by UUID");
                    self.learning.remove(&mac);
                }
            }
        }
        Some(m)
    }

    async fn discover(&mut self, mac: Mac, uuid: Option<Uuid>) {
        if !self.creating.insert(mac) {
            return;
        }
        let m = discovered(
            mac,
            uuid,
            self.base.unknown_policy(),
            self.base.default_profile(),
        );
        let name = m.metadata.name.clone().unwrap_or_default();
        match self.machines.create(&PostParams::default(), &m).await {
            Ok(_) => {
                info!(machine = %name, %mac, "unknown MAC recorded as a Discovered machine");
                self.set_status(&name, json!({"state": "Discovered", "lastSeen": now()}))
                    .await;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                warn!(%mac, error = %e, "recording an unknown machine");
                self.creating.remove(&mac);
            }
        }
    }

    async fn sighting(&mut self, s: Sighting) {
        match s {
            Sighting::Dhcp(mac, uuid) => {
                if self.identify(mac, uuid).await.is_none() {
                    self.discover(mac, uuid).await;
                }
            }
            Sighting::Script(mac, uuid) => match self.identify(mac, uuid).await {
                Some(m) => self.provisioning(&m).await,
                None => self.discover(mac, uuid).await,
            },
            Sighting::Seed { id, doc } => {
                // meta-data comes first and user-data next: one write for the pair.
                if let Some(m) = self.by_name(&id)
                    && doc != "vendor-data"
                {
                    self.provisioning(&m).await;
                }
            }
            Sighting::Failed { id, message } => {
                if self.by_name(&id).is_some() {
                    warn!(machine = %id, %message, "provisioning failed");
                    self.set_status(
                        &id,
                        json!({"state": "Failed", "lastSeen": now(), "message": message}),
                    )
                    .await;
                }
            }
        }
    }

    /// Machines whose Node is Ready become Joined.
    async fn joined(&self) {
        let ready: HashMap<String, ()> = self
            .nodes
            .state()
            .iter()
            .filter(|n| node_ready(n))
            .filter_map(|n| n.metadata.name.clone().map(|n| (n, ())))
            .collect();
        for m in self.store.state() {
            let Some(name) = m.metadata.name.as_deref() else {
                continue;
            };
            let host = &m.spec.hostname;
            if state_of(&m) == Some(MachineState::Joined) || !ready.contains_key(host) {
                continue;
            }
            info!(machine = %name, node = %host, "joined");
            self.set_status(
                name,
                json!({"state": "Joined", "nodeName": host, "lastSeen": now(), "message": null}),
            )
            .await;
        }
    }
}

/// Runs API mode until `cancel`: `base` gives profiles and policies, `handle` is what the
/// DHCP and HTTP servers read, `sightings` what they report.
pub async fn run(
    client: kube::Client,
    base: Inventory,
    handle: InventoryHandle,
    mut sightings: mpsc::UnboundedReceiver<Sighting>,
    cancel: CancellationToken,
) {
    let machines: Api<Machine> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let machine_events = reflector::reflector(
        writer,
        watcher(machines.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let (nodes, node_writer) = reflector::store();
    let node_events = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let mut machine_events = std::pin::pin!(machine_events);
    let mut node_events = std::pin::pin!(node_events);
    let mut sync = MachineSync {
        machines,
        handle,
        base,
        store,
        nodes,
        creating: HashSet::new(),
        learning: HashSet::new(),
    };
    // Sightings wait until the machines are known, so that no known MAC is "discovered".
    let mut synced = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            ev = machine_events.next() => {
                match ev {
                    Some(Ok(_)) => {
                        synced = true;
                        sync.rebuild();
                        sync.joined().await;
                    }
                    Some(Err(e)) => debug!(error = %e, "watching machines"),
                    None => return,
                }
            }
            ev = node_events.next() => {
                match ev {
                    Some(Ok(_)) => sync.joined().await,
                    Some(Err(e)) => debug!(error = %e, "watching nodes"),
                    None => return,
                }
            }
            _ = sync.store.wait_until_ready(), if !synced => {
                // An empty list yields no object events: the store being ready says enough.
                synced = true;
                sync.rebuild();
            }
            s = sightings.recv(), if synced => {
                match s {
                    Some(s) => sync.sighting(s).await,
                    None => return,
                }
            }
        }
    }
}

/// Issues fresh bootstrap tokens through the API.
pub struct ApiJoin {
    client: kube::Client,
    server: String,
    ca_pem: String,
    ttl: Duration,
}

impl std::fmt::Debug for ApiJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiJoin")
            .field("server", &self.server)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ApiJoin {
    /// Tokens valid for `ttl`, in credentials naming `server` and its CA.
    pub fn new(client: kube::Client, server: String, ca_pem: String, ttl: Duration) -> Self {
        ApiJoin {
            client,
            server,
            ca_pem,
            ttl,
        }
    }
}

impl JoinIssuer for ApiJoin {
    fn issue<'a>(&'a self, hostname: &'a str) -> BoxFuture<'a, Result<JoinInfo, String>> {
        Box::pin(async move {
            let token = BootstrapToken::generate().map_err(|e| e.to_string())?;
            let expiration = jiff::SignedDuration::try_from(self.ttl)
                .ok()
                .and_then(|d| jiff::Timestamp::now().checked_add(d).ok());
            let opts = TokenOptions {
                expiration,
                description: Some(format!("keelson-provisioner: join token for {hostname}")),
                extra_groups: Vec::new(),
            };
            Api::<Secret>::namespaced(self.client.clone(), NAMESPACE)
                .create(&PostParams::default(), &token.to_secret(&opts))
                .await
                .map_err(|e| format!("creating a bootstrap token: {e}"))?;
            info!(%hostname, token = %token.id, "issued a join token");
            Ok(JoinInfo {
                server: self.server.clone(),
                ca_pem: self.ca_pem.clone(),
                token: token.to_string(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_become_one_entry_per_mac_and_unknown_macs_are_named_after_them() {
        let mac: Mac = "52:54:00:aa:bb:cc".parse().unwrap();
        let d = discovered(mac, None, UnknownPolicy::Default, Some("worker"));
        assert_eq!(d.metadata.name.as_deref(), Some("mac-525400aabbcc"));
        assert_eq!(d.spec.profile.as_deref(), Some("worker"));
        assert_eq!(
            discovered(mac, None, UnknownPolicy::Ignore, Some("worker"))
                .spec
                .profile,
            None
        );
        let mut two = discovered(mac, None, UnknownPolicy::Default, Some("worker"));
        two.metadata.name = Some("rack1-1".into());
        two.spec.hostname = "rack1-1".into();
        two.spec.macs.push("52:54:00:aa:bb:cd".into());
        two.spec.macs.push("garbage".into());
        let none = discovered(
            "52:54:00:00:00:01".parse().unwrap(),
            None,
            UnknownPolicy::Ignore,
            None,
        );
        let e = entries(&[Arc::new(two), Arc::new(none)]);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().all(|m| m.name == "rack1-1"));
        assert_eq!(e[0].hostname.as_deref(), Some("rack1-1"));
        let inv = Inventory::parse(crate::inventory::tests_sample(), std::path::Path::new("t"))
            .unwrap()
            .with_machines(e);
        let t = inv.target_by_id("rack1-1").expect("target by name");
        assert_eq!(t.hostname, "rack1-1");
        assert!(inv.machine(&"52:54:00:aa:bb:cd".parse().unwrap()).is_some());
    }

    #[test]
    fn a_machine_with_only_a_uuid_is_one_entry_matched_by_it() {
        let uuid: Uuid = "4c4c4544-0043-3010-8052-b4c04f4e4d32".parse().unwrap();
        let mac: Mac = "52:54:00:aa:bb:cc".parse().unwrap();
        let mut m = discovered(mac, Some(uuid), UnknownPolicy::Default, Some("worker"));
        assert_eq!(
            m.spec.smbios_uuid.as_deref(),
            Some(uuid.to_string().as_str())
        );
        m.metadata.name = Some("blade-7".into());
        m.spec.macs.clear();
        m.spec.ip = Some("192.0.2.40".into());
        let e = entries(&[Arc::new(m)]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].mac, e[0].uuid), (None, Some(uuid)));
        let inv = Inventory::parse(crate::inventory::tests_sample(), std::path::Path::new("t"))
            .unwrap()
            .with_machines(e);
        let t = inv.target_for(mac, Some(&uuid)).expect("matched by UUID");
        assert_eq!((t.id.as_str(), t.mac), ("blade-7", Some(mac)));
        assert!(inv.reservations().is_empty(), "reservations need a MAC");
    }
}
