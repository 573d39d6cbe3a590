//! kube-proxy's IPVS mode, laid out as it lays it out: every cluster IP bound to the dummy
//! device `kube-ipvs0` (so local connects reach the IPVS hook), one virtual service per
//! service port with round-robin scheduling, one masquerading real server per endpoint.
//! Driven with `ipvsadm` (kube-proxy speaks netlink in-process, so the one-service figure here
//! includes the cost of starting `ipvsadm`, and says so).

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    netns::{Netns, NetnsExt as _},
    topology::{SERVICE_PORT, endpoints, service_vip},
};

/// `ipvsadm` inside a namespace.
pub struct Ipvs<'a> {
    /// The binary.
    pub binary: &'a Path,
    /// Where it runs.
    pub netns: &'a Netns,
}

impl Ipvs<'_> {
    /// Whether IPVS works in the namespace: `Err` carries the reason (a kernel without
    /// `CONFIG_IP_VS`, or `ipvsadm` not installed).
    pub fn probe(&self) -> Result<(), String> {
        let mut cmd = Command::new(self.binary);
        cmd.args(["-L", "-n"]);
        let out = self
            .netns
            .run(&mut cmd)
            .map_err(|e| format!("{e:#}").replace('\n', " "));
        out.map(drop)
    }

    /// Creates `kube-ipvs0` and services `0..n` with their endpoints; how long that took.
    ///
    /// # Errors
    /// A command fails.
    pub fn install(&self, n: u32, per_service: u32) -> Result<Duration> {
        let start = Instant::now();
        self.netns
            .ip(&["link", "add", "kube-ipvs0", "type", "dummy"])?;
        // kube-proxy turns this on so that masqueraded IPVS traffic is tracked.
        let _ = self.netns.sysctl("net.ipv4.vs.conntrack", "1");
        let mut addrs = String::new();
        let mut rules = String::new();
        for k in 0..n {
            addrs += &format!("addr add {}/32 dev kube-ipvs0\n", service_vip(k));
            rules += &service_rules(k, per_service).join("\n");
            rules.push('\n');
        }
        self.feed(Command::new("ip").args(["-batch", "-"]), &addrs)?;
        self.feed(Command::new(self.binary).arg("-R"), &rules)?;
        Ok(start.elapsed())
    }

    /// Adds service `k` as kube-proxy would: its address on `kube-ipvs0`, the virtual service,
    /// its real servers; how long that took.
    ///
    /// # Errors
    /// A command fails.
    pub fn add_one(&self, k: u32, per_service: u32) -> Result<Duration> {
        let start = Instant::now();
        self.netns.ip(&[
            "addr",
            "add",
            &format!("{}/32", service_vip(k)),
            "dev",
            "kube-ipvs0",
        ])?;
        for rule in service_rules(k, per_service) {
            let args: Vec<&str> = rule.split_whitespace().collect();
            self.netns.run(Command::new(self.binary).args(&args))?;
        }
        Ok(start.elapsed())
    }

    fn feed(&self, cmd: &mut Command, input: &str) -> Result<()> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let placed = self.netns.place(cmd, None)?;
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        drop(placed);
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// `ipvsadm` rule lines for service `k`.
fn service_rules(k: u32, per_service: u32) -> Vec<String> {
    let vs = format!("{}:{SERVICE_PORT}", service_vip(k));
    let mut rules = vec![format!("-A -t {vs} -s rr")];
    for ep in endpoints(k, per_service) {
        rules.push(format!("-a -t {vs} -r {ep} -m -w 1"));
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_virtual_service_and_a_real_server_per_endpoint() {
        assert_eq!(
            service_rules(0, 2),
            vec![
                "-A -t 10.96.0.1:80 -s rr",
                "-a -t 10.96.0.1:80 -r 10.244.1.1:8080 -m -w 1",
                "-a -t 10.96.0.1:80 -r 10.244.1.2:8080 -m -w 1",
            ]
        );
    }
}
