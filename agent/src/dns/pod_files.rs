//! The `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` of a pod, as kubelet makes them:
//! resolv.conf per the pod's `dnsPolicy` and `dnsConfig`, hosts with localhost, the pod's own
//! name and address and its `hostAliases`, hostname with the pod's host name. Written once per pod directory and bind-mounted into each
//! of its containers.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use oci_spec::runtime::{Mount, MountBuilder, Spec};

use super::resolv::ResolvConf;

/// The node's DNS settings for pods.
#[derive(Debug, Clone)]
pub struct PodDns {
    /// The cluster DNS server(s) for `ClusterFirst` pods; empty: those pods fall back to
    /// `Default`, as kubelet does without `--cluster-dns`.
    pub cluster_dns: Vec<IpAddr>,
    /// The cluster domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// The node's resolv.conf (`Default` pods get its settings).
    pub node_resolv_conf: PathBuf,
    /// The node's hosts file (`hostNetwork` pods get it).
    pub node_hosts: PathBuf,
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// A pod's resolv.conf: its `dnsPolicy` (default `ClusterFirst`, which a `hostNetwork` pod
/// turns into `Default`) with its `dnsConfig` merged on top.
pub fn pod_resolv_conf(pod: &Pod, dns: &PodDns, node: &ResolvConf) -> ResolvConf {
    let spec = pod.spec.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    if (policy == "ClusterFirst" && host_network(pod))
        || (matches!(policy, "ClusterFirst" | "ClusterFirstWithHostNet")
            && dns.cluster_dns.is_empty())
    {
        policy = "Default";
    }
    let mut conf = match policy {
        "None" => ResolvConf::default(),
        "ClusterFirst" | "ClusterFirstWithHostNet" => {
            let domain = dns.cluster_domain.trim_end_matches('.');
            let mut searches = vec![
                format!("{ns}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_owned(),
            ];
            // kubelet keeps the node's own search domains after the cluster's.
            searches.extend(node.searches.iter().cloned());
            let mut conf = ResolvConf {
                nameservers: dns.cluster_dns.iter().map(IpAddr::to_string).collect(),
                searches: Vec::new(),
                options: vec!["ndots:5".to_owned()],
            };
            conf.merge(&[], &searches, &[]);
            conf
        }
        _ => node.clone(),
    };
    if let Some(cfg) = &spec.dns_config {
        let options: Vec<String> = cfg
            .options
            .iter()
            .flatten()
            .filter_map(|o| {
                let name = o.name.as_deref()?;
                Some(match o.value.as_deref() {
                    Some(v) => format!("{name}:{v}"),
                    None => name.to_owned(),
                })
            })
            .collect();
        conf.merge(
            cfg.nameservers.as_deref().unwrap_or_default(),
            cfg.searches.as_deref().unwrap_or_default(),
            &options,
        );
    }
    conf
}

/// The pod's host name, as kubelet sets it: `spec.hostname` or else the pod's name, cut to 63
/// characters without a trailing `-` or `.`; a `hostNetwork` pod has the node's.
pub fn pod_hostname(pod: &Pod) -> String {
    if host_network(pod) {
        return nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
    }
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    let cut: String = name.chars().take(63).collect();
    cut.trim_end_matches(['-', '.']).to_owned()
}

/// A pod's hosts file: localhost, the pod's name (with its subdomain's FQDN) on its
/// address, then its `hostAliases`. A `hostNetwork` pod gets `node_hosts` instead.
pub fn pod_hosts(pod: &Pod, ip: Option<IpAddr>, dns: &PodDns, node_hosts: &str) -> String {
    if host_network(pod) {
        return node_hosts.to_owned();
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    if let Some(ip) = ip {
        let hostname = pod_hostname(pod);
        match spec.subdomain.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                let domain = dns.cluster_domain.trim_end_matches('.');
                out.push_str(&format!(
                    "{ip}\t{hostname}.{sub}.{ns}.svc.{domain}\t{hostname}\n"
                ));
            }
            None => out.push_str(&format!("{ip}\t{hostname}\n")),
        }
    }
    let aliases: Vec<_> = spec.host_aliases.iter().flatten().collect();
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            let names = alias.hostnames.clone().unwrap_or_default().join("\t");
            out.push_str(&format!("{}\t{names}\n", alias.ip));
        }
    }
    out
}

/// The files of one pod, on the host.
#[derive(Debug, Clone)]
pub struct PodFiles {
    /// Mounted at `/etc/resolv.conf`.
    pub resolv_conf: PathBuf,
    /// Mounted at `/etc/hosts`.
    pub hosts: PathBuf,
    /// Mounted at `/etc/hostname`.
    pub hostname: PathBuf,
}

/// Writes (or refreshes) the pod's files in `dir`. Files are rewritten in place, so the
/// containers that already mount them see the change.
///
/// # Errors
/// When a file cannot be written.
pub fn write(dir: &Path, pod: &Pod, ip: Option<IpAddr>, dns: &PodDns) -> io::Result<PodFiles> {
    let node = ResolvConf::parse(&fs::read_to_string(&dns.node_resolv_conf).unwrap_or_default());
    let node_hosts = fs::read_to_string(&dns.node_hosts).unwrap_or_default();
    let files = PodFiles {
        resolv_conf: dir.join("resolv.conf"),
        hosts: dir.join("hosts"),
        hostname: dir.join("hostname"),
    };
    for (path, text) in [
        (
            &files.resolv_conf,
            pod_resolv_conf(pod, dns, &node).render(),
        ),
        (&files.hosts, pod_hosts(pod, ip, dns, &node_hosts)),
        (&files.hostname, format!("{}\n", pod_hostname(pod))),
    ] {
        if fs::read_to_string(path).ok().as_deref() != Some(text.as_str()) {
            fs::write(path, text)?;
        }
    }
    Ok(files)
}

/// Adds bind mounts of the pod's files to a container's spec, unless the container mounts a
/// volume at the same path.
///
/// # Errors
/// When the mount cannot be built.
pub fn add_mounts(
    spec: &mut Spec,
    container: &Container,
    files: &PodFiles,
) -> Result<(), oci_spec::OciSpecError> {
    let taken = |dest: &str| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path.trim_end_matches('/') == dest)
    };
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for (dest, source) in [
        ("/etc/resolv.conf", &files.resolv_conf),
        ("/etc/hosts", &files.hosts),
        ("/etc/hostname", &files.hostname),
    ] {
        if taken(dest) {
            continue;
        }
        mounts.push(
            MountBuilder::default()
                .destination(dest)
                .typ("bind")
                .source(source)
                .options(vec!["rbind".to_owned(), "rprivate".to_owned()])
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": spec,
        }))
        .expect("pod")
    }

    fn dns() -> PodDns {
        PodDns {
            cluster_dns: vec!["10.244.0.1".parse().expect("ip")],
            cluster_domain: "cluster.local".into(),
            node_resolv_conf: PathBuf::from("/nonexistent"),
            node_hosts: PathBuf::from("/nonexistent"),
        }
    }

    fn node() -> ResolvConf {
        ResolvConf::parse("nameserver 192.0.2.53\nsearch corp.example\noptions timeout:2\n")
    }

    #[test]
    fn cluster_first_is_the_default() {
        let conf = pod_resolv_conf(&pod(json!({"containers": []})), &dns(), &node());
        assert_eq!(
            conf.render(),
            "nameserver 10.244.0.1\n\
             search shop.svc.cluster.local svc.cluster.local cluster.local corp.example\n\
             options ndots:5\n"
        );
    }

    #[test]
    fn default_and_host_network_use_the_node() {
        let node_text = node().render();
        let p = pod(json!({"containers": [], "dnsPolicy": "Default"}));
        assert_eq!(pod_resolv_conf(&p, &dns(), &node()).render(), node_text);
        let p = pod(json!({"containers": [], "hostNetwork": true}));
        assert_eq!(pod_resolv_conf(&p, &dns(), &node()).render(), node_text);
        // Unless the pod asks for the cluster DNS with host networking.
        let p = pod(json!({"containers": [], "hostNetwork": true,
                           "dnsPolicy": "ClusterFirstWithHostNet"}));
        assert!(
            pod_resolv_conf(&p, &dns(), &node())
                .render()
                .starts_with("nameserver 10.244.0.1\n")
        );
        // No cluster DNS configured: ClusterFirst falls back to the node's.
        let mut none = dns();
        none.cluster_dns.clear();
        let p = pod(json!({"containers": []}));
        assert_eq!(pod_resolv_conf(&p, &none, &node()).render(), node_text);
    }

    #[test]
    fn none_takes_dns_config_and_others_merge_it() {
        let p = pod(json!({"containers": [], "dnsPolicy": "None", "dnsConfig": {
            "nameservers": ["192.0.2.1"], "searches": ["a.example"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}));
        assert_eq!(
            pod_resolv_conf(&p, &dns(), &node()).render(),
            "nameserver 192.0.2.1\nsearch a.example\noptions ndots:2 edns0\n"
        );
        let p = pod(json!({"containers": [], "dnsConfig": {
            "nameservers": ["192.0.2.1"], "searches": ["svc.cluster.local", "x.example"],
            "options": [{"name": "ndots", "value": "1"}]}}));
        assert_eq!(
            pod_resolv_conf(&p, &dns(), &node()).render(),
            "nameserver 10.244.0.1\nnameserver 192.0.2.1\n\
             search shop.svc.cluster.local svc.cluster.local cluster.local corp.example x.example\n\
             options ndots:1\n"
        );
    }

    #[test]
    fn hosts_name_the_pod_and_its_aliases() {
        let ip = Some("10.244.0.9".parse().expect("ip"));
        let p = pod(json!({"containers": [], "hostAliases": [
            {"ip": "192.0.2.7", "hostnames": ["foo.local", "bar.local"]}]}));
        let hosts = pod_hosts(&p, ip, &dns(), "node hosts");
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.contains("10.244.0.9\tp\n"), "{hosts}");
        assert!(
            hosts.ends_with("192.0.2.7\tfoo.local\tbar.local\n"),
            "{hosts}"
        );
        let p = pod(json!({"containers": [], "hostname": "db-0", "subdomain": "db"}));
        let hosts = pod_hosts(&p, ip, &dns(), "");
        assert!(
            hosts.contains("10.244.0.9\tdb-0.db.shop.svc.cluster.local\tdb-0\n"),
            "{hosts}"
        );
        let p = pod(json!({"containers": [], "hostNetwork": true}));
        assert_eq!(pod_hosts(&p, ip, &dns(), "node hosts"), "node hosts");
    }

    #[test]
    fn files_are_written_and_mounted_unless_a_volume_takes_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = pod(json!({"containers": []}));
        let files = write(dir.path(), &p, None, &dns()).expect("write");
        let text = fs::read_to_string(&files.resolv_conf).expect("read");
        assert!(text.starts_with("nameserver 10.244.0.1\n"), "{text}");
        let mut spec = Spec::default();
        let before = spec.mounts().as_ref().map_or(0, Vec::len);
        let c: Container = serde_json::from_value(json!({"name": "c", "volumeMounts": [
            {"name": "v", "mountPath": "/etc/hosts"}]}))
        .expect("container");
        add_mounts(&mut spec, &c, &files).expect("mounts");
        let mounts = spec.mounts().clone().unwrap_or_default();
        assert_eq!(mounts.len(), before + 2);
        let resolv = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/etc/resolv.conf"))
            .expect("resolv.conf mount");
        assert_eq!(
            resolv.source().as_deref(),
            Some(files.resolv_conf.as_path())
        );
        assert_eq!(
            fs::read_to_string(&files.hostname).expect("hostname"),
            "p\n"
        );
    }

    #[test]
    fn hostname_is_spec_hostname_or_name_cut_to_63() {
        let mut p = pod(json!({"containers": [], "hostname": "db-0"}));
        assert_eq!(pod_hostname(&p), "db-0");
        if let Some(s) = p.spec.as_mut() {
            s.hostname = None;
        }
        p.metadata.name = Some(format!("{}-x", "a".repeat(62)));
        // 63 characters end in the '-', which goes.
        assert_eq!(pod_hostname(&p), "a".repeat(62));
    }

    #[test]
    fn hostname_file_is_mounted_unless_a_volume_takes_it() {
        let files = PodFiles {
            resolv_conf: PathBuf::from("/p/resolv.conf"),
            hosts: PathBuf::from("/p/hosts"),
            hostname: PathBuf::from("/p/hostname"),
        };
        let dests = |c: &Container| {
            let mut spec = Spec::default();
            spec.set_mounts(Some(Vec::new()));
            add_mounts(&mut spec, c, &files).expect("mounts");
            spec.mounts()
                .iter()
                .flatten()
                .map(|m| m.destination().display().to_string())
                .collect::<Vec<_>>()
        };
        let plain = Container::default();
        assert!(dests(&plain).contains(&"/etc/hostname".to_owned()));
        let taken: Container = serde_json::from_value(json!({"name": "c",
            "volumeMounts": [{"name": "v", "mountPath": "/etc/hostname"}]}))
        .expect("container");
        assert!(!dests(&taken).contains(&"/etc/hostname".to_owned()));
    }
}
