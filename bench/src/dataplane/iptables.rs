//! kube-proxy's iptables mode, laid out as it lays it out in the `nat` table: `OUTPUT` →
//! `KUBE-SERVICES` (one rule per service port, matched in order) → `KUBE-SVC-*` (the
//! masquerade mark for traffic from outside the cluster CIDR, then one `statistic --mode
//! random` rule per endpoint) → `KUBE-SEP-*` (mark hairpin traffic, DNAT to the endpoint),
//! plus `KUBE-POSTROUTING`/`KUBE-MARK-MASQ` and the final `KUBE-NODEPORTS` rule; in the
//! `filter` table the jumps kube-proxy adds to `INPUT`, `FORWARD` and `OUTPUT` and its
//! `KUBE-FORWARD` rules. The rules go into the node's namespace: a pod's connection meets
//! them in `PREROUTING` (then `FORWARD`), a host-network client's in `OUTPUT`.
//!
//! A full sync restores every chain; a one-service change restores, as kube-proxy's partial
//! sync does, the whole `KUBE-SERVICES` chain and the changed service's own chains with
//! `iptables-restore --noflush`.

use std::{fmt::Write as _, io::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    netns::{Netns, NetnsExt as _},
    topology::{CLUSTER_CIDR, SERVICE_PORT, endpoints, service_vip},
};

/// The chain names and rules of one service, `k`.
struct Service {
    k: u32,
    svc_chain: String,
    seps: Vec<(String, std::net::SocketAddrV4)>,
}

impl Service {
    fn new(k: u32, per_service: u32) -> Self {
        let name = format!("bench/svc-{k}:http");
        let seps = endpoints(k, per_service)
            .into_iter()
            .map(|ep| (chain("KUBE-SEP", &format!("{name}{ep}")), ep))
            .collect();
        Service {
            k,
            svc_chain: chain("KUBE-SVC", &name),
            seps,
        }
    }

    fn declare(&self, out: &mut String) {
        let _ = writeln!(out, ":{} - [0:0]", self.svc_chain);
        for (sep, _) in &self.seps {
            let _ = writeln!(out, ":{sep} - [0:0]");
        }
    }

    fn services_rule(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{}:http cluster IP\" -m tcp --dport {SERVICE_PORT} -j {}",
            service_vip(self.k),
            self.k,
            self.svc_chain
        );
    }

    fn own_rules(&self, out: &mut String) {
        let (k, vip, svc) = (self.k, service_vip(self.k), &self.svc_chain);
        let _ = writeln!(
            out,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"bench/svc-{k}:http cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ"
        );
        let n = self.seps.len();
        for (i, (sep, ep)) in self.seps.iter().enumerate() {
            let stat = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"bench/svc-{k}:http -> {ep}\"{stat} -j {sep}"
            );
        }
        for (sep, ep) in &self.seps {
            let _ = writeln!(
                out,
                "-A {sep} -s {}/32 -m comment --comment \"bench/svc-{k}:http\" -j KUBE-MARK-MASQ",
                ep.ip()
            );
            let _ = writeln!(
                out,
                "-A {sep} -p tcp -m comment --comment \"bench/svc-{k}:http\" -m tcp -j DNAT --to-destination {ep}"
            );
        }
    }
}

/// kube-proxy-style chain name: a prefix and 16 characters of a hash of what it stands for.
fn chain(prefix: &str, what: &str) -> String {
    // FNV-1a, 64 bits.
    let hash = what.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{prefix}-{hash:016X}")
}

const NODEPORTS_RULE: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// The jumps from the built-in chains and the filter table's chains, made once (kube-proxy
/// ensures them outside its restores). With every service having endpoints the filter
/// chains hold only `KUBE-FORWARD`'s rules, but a packet still traverses the jumps.
fn base_rules() -> String {
    "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
     :KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
     -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
     -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
     -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
     -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A KUBE-FORWARD -m conntrack --ctstate INVALID -m comment --comment \"kubernetes forwarding rules\" -j DROP\n\
     -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
     -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
     COMMIT\n\
     *nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
     :KUBE-MARK-MASQ - [0:0]\n\
     -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
     COMMIT\n"
        .to_owned()
}

/// A full sync of services `0..n`.
pub fn full_sync(n: u32, per_service: u32) -> String {
    let services: Vec<Service> = (0..n).map(|k| Service::new(k, per_service)).collect();
    let mut out = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n",
    );
    for s in &services {
        s.declare(&mut out);
    }
    out += "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
            -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
            -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
            -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n";
    for s in &services {
        s.services_rule(&mut out);
    }
    out += NODEPORTS_RULE;
    for s in &services {
        s.own_rules(&mut out);
    }
    out += "COMMIT\n";
    out
}

/// A partial sync adding service `new` to services `0..new`: all of `KUBE-SERVICES` and the
/// new service's chains.
pub fn add_one(new: u32, per_service: u32) -> String {
    let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let added = Service::new(new, per_service);
    added.declare(&mut out);
    for k in 0..=new {
        Service::new(k, per_service).services_rule(&mut out);
    }
    out += NODEPORTS_RULE;
    added.own_rules(&mut out);
    out += "COMMIT\n";
    out
}

/// `iptables-restore` of one flavour, run inside a namespace.
pub struct Restore<'a> {
    /// The binary.
    pub binary: &'a Path,
    /// Where it runs.
    pub netns: &'a Netns,
}

impl Restore<'_> {
    /// Installs the jumps from the built-in chains.
    ///
    /// # Errors
    /// The restore fails.
    pub fn base(&self) -> Result<()> {
        self.restore(&base_rules()).map(drop)
    }

    /// `iptables-restore -w --noflush` of `rules`; how long the process took, start to exit.
    ///
    /// # Errors
    /// It cannot start or fails.
    pub fn restore(&self, rules: &str) -> Result<Duration> {
        let mut cmd = Command::new(self.binary);
        cmd.args(["-w", "--noflush"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let placed = self.netns.place(&mut cmd, None)?;
        let start = std::time::Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        drop(placed);
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(rules.as_bytes())
                .context("feeding iptables-restore")?;
        }
        let out = child.wait_with_output()?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                self.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    }

    /// The binary's version line (says whether it is the nf_tables or the legacy backend).
    pub fn version(&self) -> String {
        Command::new(self.binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_sync_has_kube_proxy_s_chains_and_rules() {
        let text = full_sync(3, 2);
        let services = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .count();
        assert_eq!(
            services,
            3 + 1,
            "one rule per service, then the nodeports rule"
        );
        assert!(
            text.lines()
                .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
                .is_some_and(|l| l.contains("KUBE-NODEPORTS"))
        );
        assert_eq!(
            text.matches("--mode random --probability 0.5000000000")
                .count(),
            3
        );
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 6);
        assert!(text.contains("-d 10.96.0.1/32 -p tcp"));
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn a_partial_sync_rewrites_kube_services_and_adds_one_service() {
        let text = add_one(5, 2);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES -d"))
                .count(),
            6
        );
        assert_eq!(text.matches(":KUBE-SVC-").count(), 1);
        assert_eq!(text.matches(":KUBE-SEP-").count(), 2);
        assert!(!text.contains("KUBE-POSTROUTING"));
    }

    #[test]
    fn chain_names_are_stable_unique_and_short() {
        let a = chain("KUBE-SVC", "bench/svc-1:http");
        assert_eq!(a, chain("KUBE-SVC", "bench/svc-1:http"));
        assert_ne!(a, chain("KUBE-SVC", "bench/svc-2:http"));
        assert!(
            a.len() <= 28,
            "iptables chain names are at most 28 characters"
        );
    }
}
