//! Keelson's eBPF socket load balancer, loaded through the agent's own library: the programs
//! attached to the client's cgroup2 directory and pinned in a private bpffs, services written
//! with [`keelson_agent::lb`]'s service table exactly as `keelson-agent proxy` writes them.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use keelson_agent::lb::{self, Algorithm, Frontend, Pins, Protocol, ServiceOptions};

use super::{
    netns::{Bpffs, Cgroup2},
    topology::{SERVICE_PORT, backend, endpoints, service_vip},
};

/// One timed update: the wall time from the call to its return (the new state published and
/// the old one cleaned up), and what the thread did meanwhile, to tell an update that was slow
/// from one whose thread was not running (preempted on a loaded machine).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Wall-clock time of the call.
    pub wall: Duration,
    /// CPU time of the calling thread during the call (user and kernel).
    pub cpu: Duration,
    /// Involuntary context switches of the thread during the call (preemptions).
    pub preempted: u64,
}

/// The calling thread's CPU time and involuntary context switches so far.
fn thread_usage() -> (Duration, u64) {
    // SAFETY: both calls only write the structures passed, which live on this stack.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        (
            Duration::new(
                u64::try_from(ts.tv_sec).unwrap_or(0),
                u32::try_from(ts.tv_nsec).unwrap_or(0),
            ),
            u64::try_from(ru.ru_nivcsw).unwrap_or(0),
        )
    }
}

/// Runs `f`, timing it as a [`Sample`].
fn timed(f: impl FnOnce() -> lb::Result<()>) -> Result<Sample> {
    let (cpu0, sw0) = thread_usage();
    let start = Instant::now();
    f()?;
    let wall = start.elapsed();
    let (cpu1, sw1) = thread_usage();
    Ok(Sample {
        wall,
        cpu: cpu1.saturating_sub(cpu0),
        preempted: sw1.saturating_sub(sw0),
    })
}

/// Timed Maglev service operations.
pub struct MaglevTimes {
    /// Adding a Maglev service (its table written, then published).
    pub adds: Vec<Sample>,
    /// Replacing one endpoint of a Maglev service (a new table written and published with the
    /// new set, the old set removed).
    pub changes: Vec<Sample>,
}

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
    pub fn time_adds(&self, n: u32, count: u32, per_service: u32) -> Result<Vec<Sample>> {
        let mut table = lb::open(&self.pins)?;
        let mut times = Vec::with_capacity(count as usize);
        for k in n..n + count {
            let backends: Vec<SocketAddrV4> = endpoints(k, per_service);
            times.push(timed(|| table.upsert(frontend(k), &backends))?);
        }
        for k in n..n + count {
            table.remove(frontend(k))?;
        }
        Ok(times)
    }

    /// Adds Maglev services `n..n + count` one at a time, then replaces one endpoint of each,
    /// timing every call as `keelson-agent proxy` makes it; then removes them again.
    ///
    /// # Errors
    /// A map operation fails.
    pub fn time_maglev(&self, n: u32, count: u32, per_service: u32) -> Result<MaglevTimes> {
        let maglev = ServiceOptions {
            algorithm: Algorithm::Maglev,
            affinity_timeout_secs: None,
        };
        let mut table = lb::open(&self.pins)?;
        let mut adds = Vec::with_capacity(count as usize);
        for k in n..n + count {
            let backends = endpoints(k, per_service);
            adds.push(timed(|| table.upsert_with(frontend(k), &backends, maglev))?);
        }
        let mut changes = Vec::with_capacity(count as usize);
        for k in n..n + count {
            // The last endpoint replaced by the next backend address (a different one while
            // there are fewer endpoints than backend addresses).
            let mut backends = endpoints(k, per_service);
            backends.pop();
            backends.push(backend(k * per_service + per_service));
            changes.push(timed(|| table.upsert_with(frontend(k), &backends, maglev))?);
        }
        for k in n..n + count {
            table.remove(frontend(k))?;
        }
        Ok(MaglevTimes { adds, changes })
    }
}

impl Drop for EbpfLb {
    fn drop(&mut self) {
        if let Err(e) = lb::detach(&self.pins) {
            eprintln!("warning: detaching the eBPF load balancer: {e}");
        }
    }
}
