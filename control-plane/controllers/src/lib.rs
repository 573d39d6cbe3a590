//! Keelson's scheduler and controller manager.
//!
//! Everything here is a client of the API server through kube-rs, with the same semantics as
//! any other client: one watch per resource type feeding shared caches
//! ([`informer`](crate::informer)), reconcilers that write with the `resourceVersion` they
//! read and retry on 409 Conflict, and status written through the `status` subresource. So
//! the controllers run inside `keelson-server` or as a separate process alike.
//!
//! [`run`] takes the controller-manager Lease (`kube-system/keelson-controller-manager`) and,
//! while it holds it, runs:
//! - the scheduler (queue, filters, scores, binding),
//! - the ReplicaSet, Deployment, DaemonSet and Job controllers (Jobs deleted after their
//!   `ttlSecondsAfterFinished`),
//! - the EndpointSlice controller and the legacy Endpoints controller,
//! - node lifecycle (Lease heartbeats, `Ready=Unknown`, the `unreachable` taint, eviction) and
//!   node IPAM (`spec.podCIDR`),
//! - garbage collection by owner references (background, orphan and foreground
//!   propagation) over every resource type these controllers own or create,
//! - pod garbage collection (terminated pods over a threshold, pods of deleted nodes) and
//!   the expiry of Events after their TTL.
//! - TLS bootstrap of nodes: approval and signing of their CertificateSigningRequests
//!   ([`csr`], with the cluster CA of [`Options::csr_signing_ca`]), and deletion of expired
//!   bootstrap tokens.
#![deny(missing_docs)]

mod connect;
pub mod csr;
mod daemonset;
mod deployment;
mod endpoints;
mod endpointslice;
mod error;
mod events;
mod eventttl;
mod expectations;
mod gc;
mod informer;
mod ipam;
mod job;
mod leader;
mod manager;
mod nodelifecycle;
mod podgc;
mod podwrites;
pub mod quantity;
mod replicaset;
mod scheduler;
mod tokencleaner;
pub mod util;
mod workqueue;

use std::{net::Ipv4Addr, time::Duration};

pub use connect::run_with_kubeconfig;
pub use error::{Error, Result};

/// Settings of the controller manager. `Options::default()` gives the Kubernetes defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// This member's identity in the leader Lease (default: hostname and process id).
    pub identity: String,
    /// Take the `kube-system/keelson-controller-manager` Lease before running (default true;
    /// without it the controllers run at once, for a single member).
    pub leader_election: bool,
    /// How long a leader's Lease lasts without renewal (15 s).
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it steps down (10 s).
    pub renew_deadline: Duration,
    /// How often candidates retry and leaders renew (2 s).
    pub retry_period: Duration,
    /// Run the scheduler (true).
    pub scheduler: bool,
    /// The `spec.schedulerName` this scheduler serves (`default-scheduler`).
    pub scheduler_name: String,
    /// First back-off for a pod that fits nowhere (1 s), doubled per attempt…
    pub scheduler_backoff_initial: Duration,
    /// …up to this (10 s).
    pub scheduler_backoff_max: Duration,
    /// Retry an unschedulable pod after this even if nothing changed (60 s).
    pub scheduler_retry_unschedulable: Duration,
    /// Bindings written concurrently (64).
    pub bind_concurrency: usize,
    /// Run the workload controllers: ReplicaSet, Deployment (true).
    pub workloads: bool,
    /// Run the DaemonSet controller (true).
    pub daemon_sets: bool,
    /// Run the Job controller, with deletion after `ttlSecondsAfterFinished` (true).
    pub jobs: bool,
    /// First delay before a Job replaces a failed pod (10 s), doubled per failure…
    pub job_backoff_initial: Duration,
    /// …up to this (6 min).
    pub job_backoff_max: Duration,
    /// Run the EndpointSlice controller (true).
    pub endpoint_slices: bool,
    /// Run the legacy `v1` Endpoints controller (true).
    pub endpoints: bool,
    /// Run node lifecycle (true).
    pub node_lifecycle: bool,
    /// A node whose Lease is not renewed for this long becomes `Ready=Unknown` and tainted
    /// `node.kubernetes.io/unreachable` (40 s).
    pub node_monitor_grace: Duration,
    /// How often node health is checked (5 s).
    pub node_monitor_period: Duration,
    /// How long pods without a toleration for `unreachable`/`not-ready` stay on such a node
    /// before eviction (300 s, Kubernetes' DefaultTolerationSeconds).
    pub default_toleration: Duration,
    /// Assign pod CIDRs to nodes (true).
    pub node_ipam: bool,
    /// The cluster's pod network (10.244.0.0/16).
    pub cluster_cidr: (Ipv4Addr, u8),
    /// Prefix length of each node's pod CIDR (24).
    pub node_cidr_prefix: u8,
    /// Run garbage collection (true).
    pub garbage_collector: bool,
    /// How often the garbage collector sweeps everything (20 s); owner deletions trigger a
    /// sweep sooner.
    pub gc_period: Duration,
    /// Run pod garbage collection (true).
    pub pod_gc: bool,
    /// Terminated pods kept before the oldest are deleted (12500; 0 keeps all).
    pub terminated_pod_gc_threshold: usize,
    /// How often pod garbage collection sweeps (20 s).
    pub pod_gc_period: Duration,
    /// How long a pod's node must be missing before the pod is removed (40 s).
    pub pod_gc_quarantine: Duration,
    /// Delete Events last seen longer ago than this (1 h; zero keeps them).
    pub event_ttl: Duration,
    /// How often expired Events are swept (1 min).
    pub event_ttl_period: Duration,
    /// Directory holding the cluster CA (`ca.crt`, `ca.key`) with which approved node CSRs
    /// are signed; none: CSRs are neither approved nor signed (default none).
    pub csr_signing_ca: Option<std::path::PathBuf>,
    /// Delete expired bootstrap tokens (true).
    pub token_cleaner: bool,
    /// How often expired bootstrap tokens are looked for (30 s).
    pub token_cleaner_period: Duration,
}

impl Default for Options {
    fn default() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "keelson".into());
        Options {
            identity: format!("{host}_{}", std::process::id()),
            leader_election: true,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            scheduler: true,
            scheduler_name: "default-scheduler".into(),
            scheduler_backoff_initial: Duration::from_secs(1),
            scheduler_backoff_max: Duration::from_secs(10),
            scheduler_retry_unschedulable: Duration::from_secs(60),
            bind_concurrency: 64,
            workloads: true,
            daemon_sets: true,
            jobs: true,
            job_backoff_initial: Duration::from_secs(10),
            job_backoff_max: Duration::from_secs(360),
            endpoint_slices: true,
            endpoints: true,
            node_lifecycle: true,
            node_monitor_grace: Duration::from_secs(40),
            node_monitor_period: Duration::from_secs(5),
            default_toleration: Duration::from_secs(300),
            node_ipam: true,
            cluster_cidr: (Ipv4Addr::new(10, 244, 0, 0), 16),
            node_cidr_prefix: 24,
            garbage_collector: true,
            gc_period: Duration::from_secs(20),
            pod_gc: true,
            terminated_pod_gc_threshold: 12_500,
            pod_gc_period: Duration::from_secs(20),
            pod_gc_quarantine: Duration::from_secs(40),
            event_ttl: Duration::from_secs(3600),
            event_ttl_period: Duration::from_secs(60),
            csr_signing_ca: None,
            token_cleaner: true,
            token_cleaner_period: Duration::from_secs(30),
        }
    }
}

impl Options {
    /// Parses a CIDR such as `10.244.0.0/16` into [`Options::cluster_cidr`].
    ///
    /// # Errors
    /// The text is not an IPv4 CIDR.
    pub fn with_cluster_cidr(mut self, cidr: &str) -> Result<Self> {
        let bad = || Error::Option(format!("{cidr:?} is not an IPv4 CIDR"));
        let (ip, len) = cidr.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        self.cluster_cidr = (ip, len);
        Ok(self)
    }
}

/// Runs the controller manager until `shutdown` completes: with leader election, only while
/// this member holds the Lease (taking over when the holder's Lease expires, stepping down
/// when renewal fails).
///
/// # Errors
/// An option is invalid.
pub async fn run(
    client: kube::Client,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if opts.node_cidr_prefix < opts.cluster_cidr.1 || opts.node_cidr_prefix > 30 {
        return Err(Error::Option(format!(
            "node CIDR prefix /{} does not fit the cluster CIDR /{}",
            opts.node_cidr_prefix, opts.cluster_cidr.1
        )));
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let work = async {
        if opts.leader_election {
            leader::run_elected(client, opts, stop.clone()).await;
        } else {
            manager::run_all(client, &opts, stop.clone()).await;
        }
    };
    let mut work = std::pin::pin!(work);
    tokio::select! {
        () = &mut work => {}
        () = shutdown => {
            stop.cancel();
            work.await;
        }
    }
    Ok(())
}
