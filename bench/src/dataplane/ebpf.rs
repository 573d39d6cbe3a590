//! Keelson's eBPF socket load balancer, loaded through the agent's own library: the programs
//! attached to the client's cgroup2 directory and pinned in a private bpffs, services written
//! with [`keelson_agent::lb`]'s service table exactly as `keelson-agent proxy` writes them.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use keelson_agent::lb::{self, Frontend, Pins, Protocol};

use super::{
    netns::{Bpffs, Cgroup2},
    topology::{SERVICE_PORT, endpoints, service_vip},
};

/// The load balancer attached to one cgroup; detached and its pins removed on drop.
pub struct EbpfLb {
    pins: Pins,
    // Unmounted after the pins are removed in `drop`.
    _bpffs: Bpffs,
}

fn frontend(k: u32) -> Frontend {
    Frontend {
        addr: service_vip(k),
        port: SERVICE_PORT,
        protocol: Protocol::Tcp,
    }
}

impl EbpfLb {
    /// Attaches to `cgroup` and writes services `0..n`; returns it and how long the writes
    /// took.
    ///
    /// # Errors
    /// bpffs, the attach or a map write fails.
    pub fn install(cgroup: &Cgroup2, n: u32, per_service: u32) -> Result<(Self, Duration)> {
        let bpffs = Bpffs::mount()?;
        let pins = Pins::new(bpffs.path().join("keelson"));
        let lb = EbpfLb {
            pins,
            _bpffs: bpffs,
        };
        lb::attach(cgroup.path(), &lb.pins).context("attaching the eBPF load balancer")?;
        let mut table = lb::open(&lb.pins)?;
        let start = Instant::now();
        for k in 0..n {
            table.upsert(frontend(k), &endpoints(k, per_service))?;
        }
        Ok((lb, start.elapsed()))
    }

    /// Adds services `n..n + count` one at a time, timing each add, then removes them again.
    ///
    /// # Errors
    /// A map operation fails.
    pub fn time_adds(&self, n: u32, count: u32, per_service: u32) -> Result<Vec<Duration>> {
        let mut table = lb::open(&self.pins)?;
        let mut times = Vec::with_capacity(count as usize);
        for k in n..n + count {
            let backends: Vec<SocketAddrV4> = endpoints(k, per_service);
            let start = Instant::now();
            table.upsert(frontend(k), &backends)?;
            times.push(start.elapsed());
        }
        for k in n..n + count {
            table.remove(frontend(k))?;
        }
        Ok(times)
    }
}

impl Drop for EbpfLb {
    fn drop(&mut self) {
        if let Err(e) = lb::detach(&self.pins) {
            eprintln!("warning: detaching the eBPF load balancer: {e}");
        }
    }
}
