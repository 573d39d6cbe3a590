//! NAT for pods in an nftables table owned by Keelson (`ip keelson`): egress masquerade
//! (pod traffic leaving the cluster CIDR is SNATed to the node's address) and hostPorts
//! (DNAT of node address:hostPort to pod address:containerPort). Other tables are never
//! touched.
//!
//! The table is written whole, in one `nft -f -` transaction (create, delete, re-create), so
//! every change is atomic and idempotent, and an agent restart simply writes it again.
//!
//! Why the `nft` binary (Debian's `nftables` package) and not a crate: the netlink crate
//! `rustables` is GPL-3.0, which this Apache-2.0 workspace cannot take in, and the
//! maintained MIT/Apache crate `nftables` itself drives the `nft` binary (through its JSON
//! syntax); a text script piped to `nft` does the same with one dependency less.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;

use super::{NetworkError, Result};

/// The name of Keelson's table (family `ip`).
pub const TABLE: &str = "keelson";

/// A hostPort of a pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostPort {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The node address it is bound to (`hostIP`, else the node's address).
    pub host_ip: Ipv4Addr,
    /// The port on the node.
    pub host_port: u16,
    /// The pod's address.
    pub pod_ip: Ipv4Addr,
    /// The port in the pod.
    pub container_port: u16,
}

/// What the table holds.
#[derive(Debug, Clone, Default)]
struct Rules {
    /// Masquerade traffic from this CIDR to destinations outside it.
    masquerade: Option<Ipv4Net>,
    /// hostPorts by pod UID.
    host_ports: BTreeMap<String, Vec<HostPort>>,
    /// Whether the kernel holds these rules (false after a failed write, so the next
    /// change, or the same one again, writes the table).
    applied: bool,
}

/// The node's NAT rules. Clones share the rules.
#[derive(Debug, Clone)]
pub struct Nat {
    nft: PathBuf,
    rules: Arc<Mutex<Rules>>,
}

fn nft_error(message: String) -> NetworkError {
    NetworkError::Io {
        action: "run nft for",
        path: format!("table ip {TABLE}").into(),
        source: std::io::Error::other(message),
    }
}

impl Nat {
    /// NAT with masquerade of `cluster_cidr` (if `Some`) and no hostPorts yet; writes the
    /// table.
    ///
    /// # Errors
    /// `nft` is missing or refuses the table.
    pub fn new(masquerade: Option<Ipv4Net>) -> Result<Self> {
        let nat = Nat {
            nft: PathBuf::from("nft"),
            rules: Arc::new(Mutex::new(Rules {
                masquerade,
                host_ports: BTreeMap::new(),
                applied: false,
            })),
        };
        nat.write()?;
        Ok(nat)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rules> {
        // The rules stay consistent even if a holder panicked: every change is one insert.
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> Result<()> {
        let mut rules = self.lock();
        let result = run_nft(&self.nft, &render(&rules));
        rules.applied = result.is_ok();
        result
    }

    /// Sets the hostPorts of pod `uid` (none removes them); rewrites the table if they
    /// changed.
    ///
    /// # Errors
    /// `nft` fails (the previous table stays in force).
    pub fn set_host_ports(&self, uid: &str, mut ports: Vec<HostPort>) -> Result<()> {
        ports.sort();
        {
            let mut rules = self.lock();
            let old = rules.host_ports.get(uid);
            if rules.applied && old.map_or(ports.is_empty(), |o| *o == ports) {
                return Ok(());
            }
            if ports.is_empty() {
                rules.host_ports.remove(uid);
            } else {
                rules.host_ports.insert(uid.to_owned(), ports);
            }
        }
        self.write()
    }

    /// Removes Keelson's table, if it exists.
    ///
    /// # Errors
    /// `nft` fails.
    pub fn remove_table() -> Result<()> {
        run_nft(
            std::path::Path::new("nft"),
            &format!("table ip {TABLE}\ndelete table ip {TABLE}\n"),
        )
    }
}

fn run_nft(nft: &std::path::Path, script: &str) -> Result<()> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            nft_error(format!(
                "starting {}: {e} (install Debian's nftables package)",
                nft.display()
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| nft_error(format!("writing the script: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| nft_error(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(nft_error(format!(
            "{}: {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The `nft -f` script that replaces Keelson's table with `rules`.
fn render(rules: &Rules) -> String {
    let mut s = String::new();
    // Declaring the table first makes the delete succeed when it does not exist yet.
    s += &format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    s += "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n";
    for p in rules.host_ports.values().flatten() {
        s += &dnat(p);
    }
    s += "  }\n";
    // Processes on the node itself reach hostPorts at the node's address too.
    // nft 1.0 knows the name `dstnat` only for prerouting: -100 is its value.
    s += "  chain output {\n    type nat hook output priority -100; policy accept;\n";
    for p in rules.host_ports.values().flatten() {
        s += &dnat(p);
    }
    s += "  }\n";
    s += "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n";
    if let Some(cidr) = rules.masquerade {
        s += &format!("    ip saddr {cidr} ip daddr != {cidr} masquerade\n");
    }
    s += "  }\n}\n";
    s
}

fn dnat(p: &HostPort) -> String {
    format!(
        "    ip daddr {} {} dport {} dnat to {}:{}\n",
        p.host_ip, p.protocol, p.host_port, p.pod_ip, p.container_port
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_masquerade_and_host_ports() {
        let mut rules = Rules {
            masquerade: Some("10.244.0.0/16".parse().expect("cidr")),
            host_ports: BTreeMap::new(),
            applied: false,
        };
        rules.host_ports.insert(
            "uid-1".into(),
            vec![HostPort {
                protocol: "tcp".into(),
                host_ip: Ipv4Addr::new(172, 29, 0, 11),
                host_port: 8081,
                pod_ip: Ipv4Addr::new(10, 244, 1, 5),
                container_port: 80,
            }],
        );
        let s = render(&rules);
        assert!(s.starts_with("table ip keelson\ndelete table ip keelson\n"));
        assert!(s.contains("ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade"));
        assert_eq!(
            s.matches("ip daddr 172.29.0.11 tcp dport 8081 dnat to 10.244.1.5:80")
                .count(),
            2,
            "prerouting and output: {s}"
        );
        rules.masquerade = None;
        rules.host_ports.clear();
        let s = render(&rules);
        assert!(!s.contains("masquerade") && !s.contains("dnat"), "{s}");
    }
}
