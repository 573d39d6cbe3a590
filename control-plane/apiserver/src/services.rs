//! Service address allocation: cluster IPs from the service CIDR and node ports from the
//! node-port range, done by the API server as in Kubernetes.
//!
//! Each allocation is a key in the store created only if absent, so two API servers (or two
//! requests) can never hand out the same address; an update that drops a node port, and
//! deleting the Service, delete its keys. A LoadBalancer Service with `externalTrafficPolicy:
//! Local` also gets a `healthCheckNodePort`, on which every node's proxy says whether it has
//! local endpoints.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde_json::{Value, json};

use crate::{
    Api,
    resources::Resource,
    status::{ApiError, ApiResult, Cause},
    storage::{Storage, StorageError},
};

const IP_KEYS: &str = "/registry/ranges/serviceips/";
const PORT_KEYS: &str = "/registry/ranges/servicenodeports/";

/// The service CIDR and node-port range.
#[derive(Clone, Debug)]
pub struct ServiceRanges {
    base: u32,
    size: u32,
    node_ports: std::ops::RangeInclusive<u16>,
}

impl ServiceRanges {
    /// Parses `a.b.c.d/len` (a prefix of at most /28) and a node-port range.
    ///
    /// # Errors
    /// When the CIDR is malformed or too small.
    pub fn new(cidr: &str, node_ports: std::ops::RangeInclusive<u16>) -> Result<Self, String> {
        let (addr, len) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?} is not a CIDR"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{cidr:?}: {e}"))?;
        let len: u32 = len.parse().map_err(|e| format!("{cidr:?}: {e}"))?;
        if !(8..=28).contains(&len) {
            return Err(format!("service CIDR {cidr} must be between /8 and /28"));
        }
        let size = 1u32 << (32 - len);
        Ok(ServiceRanges {
            base: u32::from(addr) & !(size - 1),
            size,
            node_ports,
        })
    }

    /// The first usable address: the `kubernetes` Service's.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip > self.base && ip < self.base + self.size - 1
    }
}

impl Default for ServiceRanges {
    fn default() -> Self {
        ServiceRanges {
            base: u32::from(Ipv4Addr::new(10, 96, 0, 0)),
            size: 1 << 20,
            node_ports: 30000..=32767,
        }
    }
}

fn random_u32() -> u32 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn invalid(r: &Resource, name: &str, field: &str, message: String) -> ApiError {
    refused(r, name, "FieldValueInvalid", field, message)
}

/// 422 with one cause of `reason` on `field`.
fn refused(
    r: &Resource,
    name: &str,
    reason: &'static str,
    field: &str,
    message: String,
) -> ApiError {
    ApiError::invalid(
        r,
        name,
        vec![Cause {
            reason,
            message,
            field: field.into(),
        }],
    )
}

/// Refuses what an IPv4 single-stack cluster cannot give a Service, as Kubernetes does on one:
/// an unknown or IPv6 family, `RequireDualStack`, an IPv6 cluster IP. (The service CIDR and
/// the load balancer are IPv4; without this, a request for IPv6 was silently answered with
/// an IPv4 address.)
fn check_ip_families(r: &Resource, name: &str, spec: &Value) -> ApiResult<()> {
    const POLICIES: [&str; 3] = ["PreferDualStack", "RequireDualStack", "SingleStack"];
    let unsupported = |field: &str, value: &Value, supported: &[&str]| {
        let value = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned);
        let list: Vec<String> = supported.iter().map(|s| format!("\"{s}\"")).collect();
        let message = format!(
            "Unsupported value: \"{value}\": supported values: {}",
            list.join(", ")
        );
        refused(r, name, "FieldValueNotSupported", field, message)
    };
    match spec.get("ipFamilyPolicy") {
        None | Some(Value::Null) => {}
        Some(Value::String(p)) if p == "RequireDualStack" => {
            return Err(invalid(
                r,
                name,
                "spec.ipFamilyPolicy",
                format!(
                    "Invalid value: \"{p}\": this cluster is not configured for dual-stack services"
                ),
            ));
        }
        Some(Value::String(p)) if POLICIES.contains(&p.as_str()) => {}
        Some(other) => return Err(unsupported("spec.ipFamilyPolicy", other, &POLICIES)),
    }
    let families = spec.get("ipFamilies").and_then(Value::as_array);
    for (i, family) in families.into_iter().flatten().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        match family.as_str() {
            Some("IPv4") if i == 0 => {}
            Some("IPv4") => {
                let message = "Duplicate value: \"IPv4\"".into();
                return Err(refused(r, name, "FieldValueDuplicate", &field, message));
            }
            Some("IPv6") => {
                let message = "Invalid value: \"IPv6\": not configured on this cluster".into();
                return Err(invalid(r, name, &field, message));
            }
            _ => return Err(unsupported(&field, family, &["IPv4", "IPv6"])),
        }
    }
    let listed = spec.get("clusterIPs").and_then(Value::as_array);
    let ips = listed
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip))
        .chain(
            spec.get("clusterIP")
                .map(|ip| ("spec.clusterIP".to_owned(), ip)),
        );
    for (field, ip) in ips {
        if let Some(ip) = ip
            .as_str()
            .filter(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        {
            let message = format!(
                "Invalid value: \"{ip}\": IPv6 is not configured on this cluster (IPv4 single-stack)"
            );
            return Err(invalid(r, name, &field, message));
        }
    }
    Ok(())
}

/// The `ipFamilyPolicy` a Service with a cluster IP is stored with: `PreferDualStack` stays
/// (Kubernetes keeps it on a single-stack cluster, with one family), anything else is
/// `SingleStack`.
fn stored_policy(spec: &Value) -> &'static str {
    match spec.get("ipFamilyPolicy").and_then(Value::as_str) {
        Some("PreferDualStack") => "PreferDualStack",
        _ => "SingleStack",
    }
}

async fn claim(api: &Api, key: String) -> ApiResult<bool> {
    match api.store.create(&key, Vec::new()).await {
        Ok(_) => Ok(true),
        Err(StorageError::AlreadyExists(_)) => Ok(false),
        Err(e) => Err(ApiError::internal(format!("allocating {key}: {e}"))),
    }
}

/// What a new Service got, to give back if its creation fails.
#[derive(Default)]
pub struct Allocated {
    keys: Vec<String>,
}

impl Allocated {
    /// Releases everything.
    pub async fn release(self, api: &Api) {
        for key in self.keys {
            let _ = api.store.delete(&key, None).await;
        }
    }
}

fn wants_cluster_ip(spec: &Value) -> bool {
    spec.get("type").and_then(Value::as_str) != Some("ExternalName")
}

fn wants_node_ports(spec: &Value) -> bool {
    matches!(
        spec.get("type").and_then(Value::as_str),
        Some("NodePort" | "LoadBalancer")
    )
}

/// Allocates the cluster IP and node ports a Service asks for (or needs), writing them into
/// the object. Nothing is allocated for a dry run.
///
/// # Errors
/// 422 when a requested address is outside the range or taken; 500 when the range is full.
pub async fn allocate(
    api: &Api,
    r: &Resource,
    obj: &mut Value,
    dry_run: bool,
) -> ApiResult<Allocated> {
    let mut got = Allocated::default();
    let result = allocate_into(api, r, obj, dry_run, &mut got).await;
    match result {
        Ok(()) => Ok(got),
        Err(e) => {
            got.release(api).await;
            Err(e)
        }
    }
}

async fn allocate_into(
    api: &Api,
    r: &Resource,
    obj: &mut Value,
    dry_run: bool,
    got: &mut Allocated,
) -> ApiResult<()> {
    let ranges = &api.config.service_ranges;
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) else {
        return Ok(());
    };
    check_ip_families(r, &name, spec)?;
    if wants_cluster_ip(spec) {
        let requested = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let ip = match requested.as_str() {
            "None" => None,
            "" => Some(if dry_run {
                ranges.first()
            } else {
                allocate_ip(api, ranges, got).await?
            }),
            text => {
                let ip: Ipv4Addr = text.parse().map_err(|_| {
                    invalid(
                        r,
                        &name,
                        "spec.clusterIPs",
                        format!("Invalid value: \"{text}\": must be a valid IP address"),
                    )
                })?;
                if !ranges.contains(ip) {
                    return Err(invalid(
                        r,
                        &name,
                        "spec.clusterIPs",
                        format!(
                            "Invalid value: []string{{\"{ip}\"}}: failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range"
                        ),
                    ));
                }
                if !dry_run {
                    let key = format!("{IP_KEYS}{ip}");
                    if !claim(api, key.clone()).await? {
                        return Err(invalid(
                            r,
                            &name,
                            "spec.clusterIPs",
                            format!(
                                "Invalid value: []string{{\"{ip}\"}}: failed to allocate IP {ip}: provided IP is already allocated"
                            ),
                        ));
                    }
                    got.keys.push(key);
                }
                Some(ip)
            }
        };
        let ip_text = ip.map_or_else(|| "None".to_owned(), |ip| ip.to_string());
        spec["clusterIP"] = json!(ip_text);
        spec["clusterIPs"] = json!([ip_text]);
        if ip.is_some() {
            spec["ipFamilyPolicy"] = json!(stored_policy(spec));
            spec["ipFamilies"] = json!(["IPv4"]);
        }
        if let Some(o) = spec.as_object_mut() {
            o.entry("internalTrafficPolicy").or_insert(json!("Cluster"));
        }
    }
    allocate_node_ports(api, r, &name, spec, None, dry_run, got).await
}

/// The node ports a Service's spec holds: its ports' `nodePort`s and its
/// `healthCheckNodePort`.
fn held_ports(spec: Option<&Value>) -> BTreeSet<u16> {
    let Some(spec) = spec else {
        return BTreeSet::new();
    };
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort"));
    ports
        .chain(spec.get("healthCheckNodePort"))
        .filter_map(Value::as_i64)
        .filter_map(|n| u16::try_from(n).ok())
        .collect()
}

/// Whether a Service needs a node port for health checks: a LoadBalancer that keeps traffic
/// on nodes with local endpoints, so the load balancer must learn which nodes those are.
fn wants_health_check(spec: &Value) -> bool {
    spec.get("type").and_then(Value::as_str) == Some("LoadBalancer")
        && spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local")
}

/// Claims node ports for one Service write: the ports the Service already holds (`held`)
/// stay its own, ports it names are claimed if free, missing ones allocated at random.
struct PortClaims<'a> {
    api: &'a Api,
    r: &'a Resource,
    name: &'a str,
    held: BTreeSet<u16>,
    dry_run: bool,
}

impl PortClaims<'_> {
    async fn requested(&self, field: &str, n: i64, got: &mut Allocated) -> ApiResult<u16> {
        let range = &self.api.config.service_ranges.node_ports;
        let n = u16::try_from(n).ok().filter(|n| range.contains(n)).ok_or_else(|| {
            invalid(self.r, self.name, field, format!(
                "Invalid value: {n}: provided port is not in the valid range. The range of valid ports is {}-{}",
                range.start(), range.end()
            ))
        })?;
        let key = format!("{PORT_KEYS}{n}");
        // Ports the Service holds (or claimed earlier in this write, e.g. the same number
        // for TCP and UDP) are its own already.
        if self.dry_run || self.held.contains(&n) || got.keys.contains(&key) {
            return Ok(n);
        }
        if !claim(self.api, key.clone()).await? {
            return Err(invalid(
                self.r,
                self.name,
                field,
                format!("Invalid value: {n}: provided port is already allocated"),
            ));
        }
        got.keys.push(key);
        Ok(n)
    }

    async fn any(&self, got: &mut Allocated) -> ApiResult<u16> {
        let range = &self.api.config.service_ranges.node_ports;
        if self.dry_run {
            return Ok(*range.start());
        }
        let span = u32::from(range.end() - range.start()) + 1;
        let start = random_u32() % span;
        for step in 0..span {
            let n = *range.start() + u16::try_from((start + step) % span).unwrap_or(0);
            let key = format!("{PORT_KEYS}{n}");
            if claim(self.api, key.clone()).await? {
                got.keys.push(key);
                return Ok(n);
            }
        }
        Err(ApiError::internal("no node ports left to allocate"))
    }
}

/// The node port `old` gave the port with the same number and protocol, which an update
/// that leaves it out keeps (as Kubernetes does).
fn previous_node_port(old: Option<&Value>, port: &Value) -> Option<i64> {
    let key = |p: &Value| {
        (
            p.get("port").and_then(Value::as_i64),
            p.get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("TCP")
                .to_owned(),
        )
    };
    old?.get("ports")?
        .as_array()?
        .iter()
        .find(|p| key(p) == key(port))?
        .get("nodePort")?
        .as_i64()
}

/// Gives a Service the node ports its type needs and takes away those it no longer needs
/// (ports carried over from `old` are dropped; ports asked for anew are refused).
async fn allocate_node_ports(
    api: &Api,
    r: &Resource,
    name: &str,
    spec: &mut Value,
    old: Option<&Value>,
    dry_run: bool,
    got: &mut Allocated,
) -> ApiResult<()> {
    let claims = PortClaims {
        api,
        r,
        name,
        held: held_ports(old),
        dry_run,
    };
    let node_ports = wants_node_ports(spec);
    if node_ports && let Some(o) = spec.as_object_mut() {
        o.entry("externalTrafficPolicy").or_insert(json!("Cluster"));
    }
    let kind = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_owned();
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for (i, p) in ports.iter_mut().enumerate() {
            let field = format!("spec.ports[{i}].nodePort");
            let requested = p.get("nodePort").and_then(Value::as_i64);
            if !node_ports {
                match requested {
                    Some(n) if u16::try_from(n).is_ok_and(|n| claims.held.contains(&n)) => {
                        if let Some(o) = p.as_object_mut() {
                            o.remove("nodePort");
                        }
                    }
                    Some(_) => {
                        return Err(invalid(
                            r,
                            name,
                            &field,
                            format!("Forbidden: may not be used when `type` is '{kind}'"),
                        ));
                    }
                    None => {}
                }
                continue;
            }
            let port = match requested.or_else(|| previous_node_port(old, p)) {
                Some(n) => claims.requested(&field, n, got).await?,
                None => claims.any(got).await?,
            };
            p["nodePort"] = json!(port);
        }
    }
    let field = "spec.healthCheckNodePort";
    let requested = spec.get("healthCheckNodePort").and_then(Value::as_i64);
    if wants_health_check(spec) {
        let previous = old
            .filter(|o| wants_health_check(o))
            .and_then(|o| o.get("healthCheckNodePort"))
            .and_then(Value::as_i64);
        let port = match requested.or(previous) {
            Some(n) => claims.requested(field, n, got).await?,
            None => claims.any(got).await?,
        };
        spec["healthCheckNodePort"] = json!(port);
    } else if let Some(n) = requested {
        if !u16::try_from(n).is_ok_and(|n| claims.held.contains(&n)) {
            return Err(invalid(
                r,
                name,
                field,
                "Invalid value: may only be set when `type` is 'LoadBalancer' and \
                 `externalTrafficPolicy` is 'Local'"
                    .into(),
            ));
        }
        if let Some(o) = spec.as_object_mut() {
            o.remove("healthCheckNodePort");
        }
    }
    Ok(())
}

async fn allocate_ip(
    api: &Api,
    ranges: &ServiceRanges,
    got: &mut Allocated,
) -> ApiResult<Ipv4Addr> {
    // Skip the network address, the first address (kept for the `kubernetes` Service) and
    // the broadcast address.
    let usable = ranges.size.saturating_sub(3).max(1);
    let start = random_u32() % usable;
    for step in 0..usable {
        let ip = Ipv4Addr::from(ranges.base + 2 + (start + step) % usable);
        let key = format!("{IP_KEYS}{ip}");
        if claim(api, key.clone()).await? {
            got.keys.push(key);
            return Ok(ip);
        }
    }
    Err(ApiError::internal(
        "no cluster IPs left to allocate in the service CIDR",
    ))
}

/// Keeps an updated Service's cluster IP and node ports, allocates the node ports it newly
/// needs and notes those it no longer holds, to be given back once the update is written
/// ([`Update::settle`]).
///
/// # Errors
/// As [`allocate`]; 422 when the cluster IP is changed.
pub async fn on_update(
    api: &Api,
    r: &Resource,
    old: &Value,
    new: &mut Value,
    dry_run: bool,
) -> ApiResult<Update> {
    let name = new
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let old_ip = old
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let new_ip = new
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    match old_ip {
        // An update that leaves the cluster IP out keeps it.
        Some(o) if new_ip.is_empty() => {
            if let Some(spec) = new.get_mut("spec").filter(|s| s.is_object()) {
                spec["clusterIPs"] = old
                    .pointer("/spec/clusterIPs")
                    .cloned()
                    .unwrap_or_else(|| json!([o]));
                spec["clusterIP"] = json!(o);
            }
        }
        Some(o) if o != new_ip => {
            return Err(invalid(
                r,
                &name,
                "spec.clusterIPs[0]",
                format!("Invalid value: \"{new_ip}\": may not change once set"),
            ));
        }
        _ => {}
    }
    for field in ["ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy"] {
        if let (Some(v), Some(spec)) = (
            old.pointer(&format!("/spec/{field}")),
            new.get_mut("spec").and_then(Value::as_object_mut),
        ) {
            spec.entry(field).or_insert(v.clone());
        }
    }
    if let Some(spec) = new.get("spec").filter(|s| s.is_object()) {
        check_ip_families(r, &name, spec)?;
    }
    let mut got = Allocated::default();
    let old_spec = old.get("spec");
    if let Some(spec) = new.get_mut("spec").filter(|s| s.is_object())
        && let Err(e) = allocate_node_ports(api, r, &name, spec, old_spec, dry_run, &mut got).await
    {
        got.release(api).await;
        return Err(e);
    }
    let kept = held_ports(new.get("spec"));
    let freed = if dry_run {
        Vec::new()
    } else {
        held_ports(old_spec)
            .difference(&kept)
            .map(|n| format!("{PORT_KEYS}{n}"))
            .collect()
    };
    Ok(Update {
        allocated: got,
        freed,
    })
}

/// What an update of a Service claimed and gave up, settled once the write is done.
#[must_use = "the claims must be settled after the write"]
pub struct Update {
    allocated: Allocated,
    freed: Vec<String>,
}

impl Update {
    /// Releases the node ports the Service no longer holds if the update was `written`, or
    /// those it claimed for the update if not.
    pub async fn settle(self, api: &Api, written: bool) {
        if written {
            for key in self.freed {
                let _ = api.store.delete(&key, None).await;
            }
        } else {
            self.allocated.release(api).await;
        }
    }
}

/// Releases what a deleted Service held.
pub async fn release(store: &dyn Storage, obj: &Value) {
    if let Some(ip) = obj
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|ip| *ip != "None" && !ip.is_empty())
    {
        let _ = store.delete(&format!("{IP_KEYS}{ip}"), None).await;
    }
    for n in held_ports(obj.get("spec")) {
        let _ = store.delete(&format!("{PORT_KEYS}{n}"), None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_bound() {
        let r = ServiceRanges::new("10.96.0.0/12", 30000..=32767).unwrap();
        assert_eq!(r.first(), Ipv4Addr::new(10, 96, 0, 1));
        assert!(r.contains(Ipv4Addr::new(10, 111, 255, 254)));
        assert!(!r.contains(Ipv4Addr::new(10, 112, 0, 1)));
        assert!(!r.contains(Ipv4Addr::new(10, 96, 0, 0)));
        assert!(ServiceRanges::new("10.96.0.0", 1..=2).is_err());
        assert!(ServiceRanges::new("10.96.0.0/30", 1..=2).is_err());
    }
}
