//! The cluster zone: the records of every Service, computed from the Service and its
//! EndpointSlices, and the answer to one question. Pure logic, no I/O.
//!
//! Names, for cluster domain `cluster.local` (the Kubernetes DNS specification):
//! - `<svc>.<ns>.svc.cluster.local`: A/AAAA of the cluster IP; for a headless Service (cluster
//!   IP `None`) the addresses of its ready endpoints; a CNAME for an ExternalName Service;
//! - `_<port>._<proto>.<svc>.<ns>.svc.cluster.local`: SRV per named port, targeting the
//!   Service name, or each ready endpoint's own name for a headless Service;
//! - `<endpoint>.<svc>.<ns>.svc.cluster.local` (headless): the endpoint's `hostname`, else its
//!   address with dashes (`10-244-0-5`);
//! - `<a-b-c-d>.<ns>.pod.cluster.local`: that address (CoreDNS' "pods insecure" mode).
//!
//! Other names in the domain do not exist (NXDOMAIN); names that exist without a record of
//! the asked type get an empty answer (NODATA).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, PoisonError, RwLock};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{DnsError, Result};

/// TTL of records that change only with the Service (cluster IP, SRV of a ClusterIP port).
pub const SERVICE_TTL: u32 = 30;
/// TTL of records that follow endpoint readiness (headless answers, pod records).
pub const ENDPOINT_TTL: u32 = 5;
/// How long resolvers may cache "does not exist" (the SOA minimum).
pub const NEGATIVE_TTL: u32 = 5;

/// A Service, by namespace and name.
pub type ServiceKey = (String, String);

/// The zone shared by the watcher (one writer) and the server (many readers).
pub type SharedZone = Arc<RwLock<Zone>>;

/// The answer to one question.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The name is outside the cluster domain: forward it.
    NotInZone,
    /// Records of the name (and, for SRV, the addresses of the targets).
    Found {
        /// The answer section.
        answers: Vec<Record>,
        /// The additional section.
        additionals: Vec<Record>,
    },
    /// The name exists but has no record of the asked type.
    NoData,
    /// The name does not exist.
    NxDomain,
}

/// Every Service's records under one cluster domain.
#[derive(Debug)]
pub struct Zone {
    origin: Name,
    services: HashMap<ServiceKey, Vec<Record>>,
    namespaces: HashMap<String, usize>,
    serial: u32,
    synced: bool,
}

fn name(text: &str) -> Result<Name, hickory_proto::ProtoError> {
    let mut n = Name::from_ascii(text)?;
    n.set_fqdn(true);
    Ok(n)
}

fn address_record(owner: Name, ip: IpAddr, ttl: u32) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner, ttl, data)
}

/// `10.244.0.5` → `10-244-0-5`, the name of an endpoint without a hostname.
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

fn protocol_label(p: Option<&str>) -> String {
    format!("_{}", p.unwrap_or("TCP").to_ascii_lowercase())
}

/// The records of one Service under `origin` (e.g. `cluster.local.`). Endpoints whose
/// `ready` condition is false are left out; names that are not valid DNS labels are skipped.
pub fn service_records(svc: &Service, slices: &[&EndpointSlice], origin: &Name) -> Vec<Record> {
    let (Some(svc_name), Some(ns)) = (
        svc.metadata.name.as_deref(),
        svc.metadata.namespace.as_deref(),
    ) else {
        return Vec::new();
    };
    let Ok(base) = name(&format!("{svc_name}.{ns}.svc")).and_then(|b| b.append_domain(origin))
    else {
        return Vec::new();
    };
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if spec.type_.as_deref() == Some("ExternalName") {
        if let Some(target) = spec.external_name.as_deref().and_then(|t| name(t).ok()) {
            out.push(Record::from_rdata(
                base,
                SERVICE_TTL,
                RData::CNAME(CNAME(target)),
            ));
        }
        return out;
    }
    let srv_owner = |port: &str, proto: Option<&str>| {
        name(&format!("_{port}.{}", protocol_label(proto)))
            .and_then(|n| n.append_domain(&base))
            .ok()
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        headless_records(&base, slices, srv_owner, &mut out);
        return out;
    }
    let ips: BTreeSet<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    for ip in ips {
        out.push(address_record(base.clone(), ip, SERVICE_TTL));
    }
    for port in spec.ports.iter().flatten() {
        let (Some(port_name), Ok(number)) = (port.name.as_deref(), u16::try_from(port.port)) else {
            continue;
        };
        if let Some(owner) = srv_owner(port_name, port.protocol.as_deref()) {
            out.push(Record::from_rdata(
                owner,
                SERVICE_TTL,
                RData::SRV(SRV::new(0, 100, number, base.clone())),
            ));
        }
    }
    out
}

/// A headless Service: its ready endpoints by address and by name, and SRV records of its
/// named ports pointing at each endpoint.
fn headless_records(
    base: &Name,
    slices: &[&EndpointSlice],
    srv_owner: impl Fn(&str, Option<&str>) -> Option<Name>,
    out: &mut Vec<Record>,
) {
    // (endpoint name, address) of every ready endpoint, and (SRV owner, port, endpoint name).
    let mut endpoints: BTreeSet<(Name, IpAddr)> = BTreeSet::new();
    let mut srvs: BTreeSet<(Name, u16, Name)> = BTreeSet::new();
    for slice in slices {
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let label = ep
                    .hostname
                    .clone()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| dashed(ip));
                let Ok(ep_name) = name(&label).and_then(|n| n.append_domain(base)) else {
                    continue;
                };
                for port in slice.ports.iter().flatten() {
                    let (Some(port_name), Some(number)) = (
                        port.name.as_deref().filter(|n| !n.is_empty()),
                        port.port.and_then(|p| u16::try_from(p).ok()),
                    ) else {
                        continue;
                    };
                    if let Some(owner) = srv_owner(port_name, port.protocol.as_deref()) {
                        srvs.insert((owner, number, ep_name.clone()));
                    }
                }
                endpoints.insert((ep_name, ip));
            }
        }
    }
    let addresses: BTreeSet<IpAddr> = endpoints.iter().map(|(_, ip)| *ip).collect();
    for ip in addresses {
        out.push(address_record(base.clone(), ip, ENDPOINT_TTL));
    }
    for (ep_name, ip) in endpoints {
        out.push(address_record(ep_name, ip, ENDPOINT_TTL));
    }
    let per_owner = |owner: &Name| srvs.iter().filter(|(o, _, _)| o == owner).count();
    for (owner, port, target) in &srvs {
        // Equal shares: clients pick among the endpoints at random.
        let weight = u16::try_from(100 / per_owner(owner).max(1))
            .unwrap_or(1)
            .max(1);
        out.push(Record::from_rdata(
            owner.clone(),
            ENDPOINT_TTL,
            RData::SRV(SRV::new(0, weight, *port, target.clone())),
        ));
    }
}

/// The labels of `qname` below `origin`, lowercased, innermost first.
fn relative_labels(qname: &Name, origin: &Name) -> Vec<String> {
    let n = usize::from(qname.num_labels()) - usize::from(origin.num_labels());
    qname
        .iter()
        .take(n)
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect()
}

/// `a-b-c-d` → the address.
fn undashed(label: &str) -> Option<Ipv4Addr> {
    label.replace('-', ".").parse().ok()
}

impl Zone {
    /// An empty zone for `domain` (e.g. `cluster.local`), not yet synced.
    ///
    /// # Errors
    /// [`DnsError::Domain`] when `domain` is not a DNS name.
    pub fn new(domain: &str) -> Result<Self> {
        let origin = name(domain.trim_end_matches('.'))
            .map_err(|source| DnsError::Domain {
                domain: domain.to_owned(),
                source,
            })?
            .to_lowercase();
        Ok(Zone {
            origin,
            services: HashMap::new(),
            namespaces: HashMap::new(),
            serial: 1,
            synced: false,
        })
    }

    /// A zone shared between the watcher and the server.
    ///
    /// # Errors
    /// As [`Zone::new`].
    pub fn shared(domain: &str) -> Result<SharedZone> {
        Ok(Arc::new(RwLock::new(Zone::new(domain)?)))
    }

    /// The cluster domain, fully qualified.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// Whether Services and EndpointSlices have been listed: before that the zone cannot
    /// tell a missing name from one it has not read yet.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Marks the zone as holding the cluster's Services.
    pub fn set_synced(&mut self) {
        self.synced = true;
    }

    /// Sets one Service's records from the Service and its EndpointSlices.
    pub fn set_service(&mut self, svc: &Service, slices: &[&EndpointSlice]) {
        let key = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        let records = service_records(svc, slices, &self.origin);
        if self.services.get(&key) == Some(&records) {
            return;
        }
        if self.services.insert(key.clone(), records).is_none() {
            *self.namespaces.entry(key.0).or_default() += 1;
        }
        self.serial = self.serial.wrapping_add(1);
    }

    /// Removes a Service and its records.
    pub fn remove_service(&mut self, key: &ServiceKey) {
        if self.services.remove(key).is_none() {
            return;
        }
        if let Some(n) = self.namespaces.get_mut(&key.0) {
            *n -= 1;
            if *n == 0 {
                self.namespaces.remove(&key.0);
            }
        }
        self.serial = self.serial.wrapping_add(1);
    }

    /// The Services the zone holds.
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        self.services.keys().cloned().collect()
    }

    /// The zone's SOA record (also the authority of negative answers).
    pub fn soa(&self) -> Record {
        let host = |label: &str| {
            Name::from_ascii(label)
                .and_then(|n| n.append_domain(&self.origin))
                .unwrap_or_else(|_| self.origin.clone())
        };
        Record::from_rdata(
            self.origin.clone(),
            NEGATIVE_TTL,
            RData::SOA(SOA::new(
                host("ns.dns"),
                host("hostmaster"),
                self.serial,
                7200,
                1800,
                86400,
                NEGATIVE_TTL,
            )),
        )
    }

    /// Answers `qtype` for `qname`.
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Lookup {
        let mut qname = qname.to_lowercase();
        qname.set_fqdn(true);
        if !self.origin.zone_of(&qname) {
            return Lookup::NotInZone;
        }
        let labels = relative_labels(&qname, &self.origin);
        let found = |answers: Vec<Record>| {
            if answers.is_empty() {
                Lookup::NoData
            } else {
                Lookup::Found {
                    answers,
                    additionals: Vec::new(),
                }
            }
        };
        let label = |i: usize| labels.get(labels.len().wrapping_sub(i)).map(String::as_str);
        match labels.len() {
            0 => {
                let ns = Name::from_ascii("ns.dns")
                    .and_then(|n| n.append_domain(&self.origin))
                    .unwrap_or_else(|_| self.origin.clone());
                match qtype {
                    RecordType::SOA => found(vec![self.soa()]),
                    RecordType::NS => found(vec![Record::from_rdata(
                        qname,
                        SERVICE_TTL,
                        RData::NS(NS(ns)),
                    )]),
                    _ => Lookup::NoData,
                }
            }
            1 if matches!(label(1), Some("svc" | "pod")) => Lookup::NoData,
            2 if label(1) == Some("svc") => match label(2) {
                Some(ns) if self.namespaces.contains_key(ns) => Lookup::NoData,
                _ => Lookup::NxDomain,
            },
            3 if label(1) == Some("pod") => match label(3).and_then(undashed) {
                Some(ip) if qtype == RecordType::A => {
                    found(vec![address_record(qname, IpAddr::V4(ip), ENDPOINT_TTL)])
                }
                Some(_) => Lookup::NoData,
                None => Lookup::NxDomain,
            },
            n if n >= 3 && label(1) == Some("svc") => {
                let (Some(ns), Some(svc)) = (label(2), label(3)) else {
                    return Lookup::NxDomain;
                };
                match self.services.get(&(ns.to_owned(), svc.to_owned())) {
                    Some(records) => self.lookup_service(records, &qname, qtype, n == 3),
                    None => Lookup::NxDomain,
                }
            }
            _ => Lookup::NxDomain,
        }
    }

    /// The answer from one Service's records; `is_service` when `qname` is the Service's
    /// own name (which exists even without records).
    fn lookup_service(
        &self,
        records: &[Record],
        qname: &Name,
        qtype: RecordType,
        is_service: bool,
    ) -> Lookup {
        let owned: Vec<&Record> = records.iter().filter(|r| r.name() == qname).collect();
        if owned.is_empty() {
            // An empty non-terminal (`_tcp.<svc>…`) exists; anything else does not.
            let below = records.iter().any(|r| qname.zone_of(r.name()));
            return if is_service || below {
                Lookup::NoData
            } else {
                Lookup::NxDomain
            };
        }
        let cname = owned.iter().find(|r| r.record_type() == RecordType::CNAME);
        let answers: Vec<Record> = match cname {
            Some(c) if qtype != RecordType::CNAME => vec![(*c).clone()],
            _ => owned
                .into_iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .cloned()
                .collect(),
        };
        if answers.is_empty() {
            return Lookup::NoData;
        }
        let mut additionals = Vec::new();
        for srv in answers.iter().filter_map(|r| r.data().as_srv()) {
            additionals.extend(
                records
                    .iter()
                    .filter(|r| {
                        r.name() == srv.target()
                            && matches!(r.record_type(), RecordType::A | RecordType::AAAA)
                    })
                    .cloned(),
            );
        }
        additionals.dedup();
        Lookup::Found {
            answers,
            additionals,
        }
    }
}

/// Reads the zone, also after a writer panicked (the zone is only ever replaced whole per
/// Service, so it stays consistent).
pub fn read(zone: &SharedZone) -> std::sync::RwLockReadGuard<'_, Zone> {
    zone.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes the zone (see [`read`]).
pub fn write(zone: &SharedZone) -> std::sync::RwLockWriteGuard<'_, Zone> {
    zone.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(value: serde_json::Value) -> Service {
        serde_json::from_value(value).expect("service")
    }

    fn web() -> Service {
        svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"port": 9000}]}
        }))
    }

    fn headless() -> Service {
        svc(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
        }))
    }

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "db-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .expect("slice")
    }

    fn n(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    fn zone() -> Zone {
        let mut z = Zone::new("cluster.local").expect("zone");
        z.set_service(&web(), &[]);
        z.set_synced();
        z
    }

    fn addresses(l: &Lookup) -> Vec<String> {
        let Lookup::Found { answers, .. } = l else {
            panic!("no answer: {l:?}");
        };
        let mut v: Vec<String> = answers.iter().map(|r| r.data().to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn cluster_ip_service_has_an_a_record_and_srv_per_named_port() {
        let z = zone();
        let a = z.lookup(&n("web.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(addresses(&a), ["10.96.0.20"]);
        let Lookup::Found { answers, .. } = &a else {
            unreachable!()
        };
        assert_eq!(answers[0].ttl(), SERVICE_TTL);
        // Case does not matter.
        assert_eq!(
            addresses(&z.lookup(&n("WEB.Shop.svc.Cluster.Local."), RecordType::A)),
            ["10.96.0.20"]
        );
        let srv = z.lookup(
            &n("_http._tcp.web.shop.svc.cluster.local."),
            RecordType::SRV,
        );
        let Lookup::Found {
            answers,
            additionals,
        } = &srv
        else {
            panic!("no SRV: {srv:?}");
        };
        let data = answers[0].data().as_srv().expect("srv");
        assert_eq!(data.port(), 80);
        assert_eq!(data.target(), &n("web.shop.svc.cluster.local."));
        assert_eq!(additionals.len(), 1, "the target's address comes along");
        assert_eq!(
            addresses(&z.lookup(&n("_dns._udp.web.shop.svc.cluster.local."), RecordType::SRV))
                .len(),
            1
        );
        // The unnamed port has no SRV; the wrong protocol does not exist.
        assert_eq!(
            z.lookup(&n("_dns._tcp.web.shop.svc.cluster.local."), RecordType::SRV),
            Lookup::NxDomain
        );
        // Existing names without the asked type.
        assert_eq!(
            z.lookup(&n("web.shop.svc.cluster.local."), RecordType::AAAA),
            Lookup::NoData
        );
        assert_eq!(
            z.lookup(&n("_tcp.web.shop.svc.cluster.local."), RecordType::A),
            Lookup::NoData
        );
        assert_eq!(
            z.lookup(&n("shop.svc.cluster.local."), RecordType::A),
            Lookup::NoData
        );
    }

    #[test]
    fn missing_names_in_the_domain_do_not_exist_and_others_are_not_ours() {
        let z = zone();
        for missing in [
            "nope.shop.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "other.svc.cluster.local.",
            "x.web.shop.svc.cluster.local.",
            "foo.cluster.local.",
            "web.shop.cluster.local.",
        ] {
            assert_eq!(
                z.lookup(&n(missing), RecordType::A),
                Lookup::NxDomain,
                "{missing}"
            );
        }
        assert_eq!(
            z.lookup(&n("example.com."), RecordType::A),
            Lookup::NotInZone
        );
        assert_eq!(
            z.lookup(&n("cluster.local.example.com."), RecordType::A),
            Lookup::NotInZone
        );
        assert!(matches!(
            z.lookup(&n("cluster.local."), RecordType::SOA),
            Lookup::Found { .. }
        ));
    }

    #[test]
    fn headless_service_answers_with_ready_endpoints() {
        let mut z = zone();
        let s = slice(json!([
            {"addresses": ["10.244.0.5"], "conditions": {"ready": true}},
            {"addresses": ["10.244.0.6"], "conditions": {"ready": false}},
            {"addresses": ["10.244.0.7"], "hostname": "db-0"},
        ]));
        z.set_service(&headless(), &[&s]);
        let a = z.lookup(&n("db.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(addresses(&a), ["10.244.0.5", "10.244.0.7"]);
        let Lookup::Found { answers, .. } = &a else {
            unreachable!()
        };
        assert!(answers.iter().all(|r| r.ttl() == ENDPOINT_TTL));
        // Each endpoint by name: its hostname, else its dashed address.
        assert_eq!(
            addresses(&z.lookup(&n("db-0.db.shop.svc.cluster.local."), RecordType::A)),
            ["10.244.0.7"]
        );
        assert_eq!(
            addresses(&z.lookup(&n("10-244-0-5.db.shop.svc.cluster.local."), RecordType::A)),
            ["10.244.0.5"]
        );
        assert_eq!(
            z.lookup(&n("10-244-0-6.db.shop.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
        let srv = z.lookup(&n("_pg._tcp.db.shop.svc.cluster.local."), RecordType::SRV);
        let Lookup::Found {
            answers,
            additionals,
        } = &srv
        else {
            panic!("no SRV: {srv:?}");
        };
        let mut targets: Vec<String> = answers
            .iter()
            .filter_map(|r| r.data().as_srv())
            .map(|s| format!("{}:{}", s.target(), s.port()))
            .collect();
        targets.sort();
        assert_eq!(
            targets,
            [
                "10-244-0-5.db.shop.svc.cluster.local.:5432",
                "db-0.db.shop.svc.cluster.local.:5432"
            ]
        );
        assert_eq!(additionals.len(), 2);

        // Readiness changes the answer; no endpoints leaves the name with no data.
        let s = slice(json!([{"addresses": ["10.244.0.5"], "conditions": {"ready": false}}]));
        z.set_service(&headless(), &[&s]);
        assert_eq!(
            z.lookup(&n("db.shop.svc.cluster.local."), RecordType::A),
            Lookup::NoData
        );
        z.remove_service(&("shop".into(), "db".into()));
        assert_eq!(
            z.lookup(&n("db.shop.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
    }

    #[test]
    fn external_name_is_a_cname_and_pods_answer_by_address() {
        let mut z = zone();
        z.set_service(
            &svc(json!({
                "metadata": {"name": "ext", "namespace": "shop"},
                "spec": {"type": "ExternalName", "externalName": "db.example.com"}
            })),
            &[],
        );
        let l = z.lookup(&n("ext.shop.svc.cluster.local."), RecordType::A);
        let Lookup::Found { answers, .. } = &l else {
            panic!("{l:?}")
        };
        assert_eq!(answers[0].record_type(), RecordType::CNAME);
        assert_eq!(
            addresses(&z.lookup(&n("10-244-1-9.shop.pod.cluster.local."), RecordType::A)),
            ["10.244.1.9"]
        );
        assert_eq!(
            z.lookup(&n("bad.shop.pod.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
    }

    #[test]
    fn removing_the_last_service_of_a_namespace_removes_the_namespace() {
        let mut z = zone();
        z.set_service(&web(), &[]);
        z.remove_service(&("shop".into(), "web".into()));
        assert_eq!(
            z.lookup(&n("shop.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
        assert!(z.service_keys().is_empty());
    }
}
