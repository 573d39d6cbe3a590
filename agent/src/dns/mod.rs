//! Cluster DNS: an authoritative server for the cluster domain (`cluster.local`) that answers
//! for Services and their endpoints as the Kubernetes DNS specification describes, forwards
//! every other name to the node's upstream resolvers, and the `/etc/resolv.conf` and
//! `/etc/hosts` each pod gets.
//!
//! - [`records`]: the zone — records computed from Services and EndpointSlices, no I/O;
//! - [`watch`]: feeds the zone from the API through kube-rs watchers;
//! - [`forward`]: relays other queries to upstream resolvers (UDP, TCP on truncation);
//! - [`server`]: the hickory-server request handler, served over UDP and TCP;
//! - [`resolv`] and [`pod_files`]: the pods' resolver configuration and hosts file, per their
//!   `dnsPolicy`.

pub mod forward;
pub mod pod_files;
pub mod records;
pub mod resolv;
pub mod server;
pub mod watch;

pub use forward::Forwarder;
pub use pod_files::PodDns;
pub use records::{SharedZone, Zone};
pub use server::Handler;

/// Errors of the cluster DNS.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The cluster domain is not a valid DNS name.
    #[error("cluster domain {domain:?}: {source}")]
    Domain {
        /// The domain given.
        domain: String,
        /// The cause.
        source: hickory_proto::ProtoError,
    },
    /// A socket could not be bound or used.
    #[error("{action} {addr}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A watch of Services or EndpointSlices ended for good.
    #[error("watching Services and EndpointSlices ended")]
    WatchEnded,
    /// The server stopped with an error.
    #[error("DNS server: {0}")]
    Server(#[from] hickory_proto::ProtoError),
}

/// Results of the cluster DNS.
pub type Result<T, E = DnsError> = std::result::Result<T, E>;

/// Runs the cluster DNS until `shutdown`: the zone fed from the API by [`watch::run`] and
/// served on `sockets` by [`server::serve`], other names forwarded by `forwarder`.
///
/// # Errors
/// When the watch ends for good or the server fails.
pub async fn run(
    client: kube::Client,
    zone: SharedZone,
    sockets: server::Sockets,
    forwarder: Option<Forwarder>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let handler = Handler::new(zone.clone(), forwarder);
    let serve = server::serve(sockets, handler, stopped(stop_rx.clone()));
    let feed = watch::run(client, zone, stopped(stop_rx));
    tokio::pin!(serve, feed, shutdown);
    tokio::select! {
        r = &mut serve => {
            let _ = stop_tx.send(true);
            let _ = feed.await;
            r
        }
        r = &mut feed => {
            let _ = stop_tx.send(true);
            let _ = serve.await;
            r
        }
        () = &mut shutdown => {
            let _ = stop_tx.send(true);
            let (served, fed) = tokio::join!(serve, feed);
            served.and(fed)
        }
    }
}
