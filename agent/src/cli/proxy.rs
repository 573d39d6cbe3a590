//! `keelson-agent proxy`: the service proxy — attach the eBPF load balancer and keep it in step
//! with the cluster's Services and EndpointSlices until stopped. The programs and maps stay
//! pinned when it exits, so traffic keeps flowing while it restarts.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::Context as _;
use keelson_agent::{
    lb::{self, Algorithm, Pins},
    proxy::{
        self, ExternalFrontends, PacketMaps, Settings, desired::NodeAddrs, metrics::ServiceNames,
    },
};
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::lb::PinArgs;

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// kubeconfig of the cluster (default: `$KUBECONFIG`, then `~/.kube/config`).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// cgroup2 directory whose processes get Service load balancing.
    #[arg(long)]
    cgroup: PathBuf,
    #[command(flatten)]
    pins: PinArgs,
    /// Backend choice for Services without a `keelson.dev/lb-algorithm` annotation:
    /// `random` or `maglev`.
    #[arg(long, default_value = "random")]
    lb_algorithm: Algorithm,
    /// Serve the load balancer's per-service counters at `http://ADDR:PORT/metrics`
    /// (Prometheus text format).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// This Node's name: its own endpoints (EndpointSlice `nodeName`) serve
    /// `externalTrafficPolicy: Local` and need no SNAT.
    #[arg(long)]
    node_name: Option<String>,
    /// An address of this node on which Services' nodePorts are served (repeatable).
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// An interface whose traffic from outside reaches nodePorts and externalIPs (tc
    /// programs on its ingress and egress; repeatable). Without one, only the node's own
    /// sockets and its pods' reach them.
    #[arg(long = "nodeport-interface")]
    nodeport_interfaces: Vec<String>,
    /// Address on which the health-check node ports of `externalTrafficPolicy: Local`
    /// LoadBalancer Services are served (200 with local endpoints, 503 without).
    #[arg(long, default_value = "0.0.0.0")]
    health_check_address: std::net::IpAddr,
    /// Do not serve health-check node ports.
    #[arg(long)]
    no_health_check_ports: bool,
}

pub(super) async fn client(path: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match path {
        Some(p) => {
            let kubeconfig = Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("loading the kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("finding a kubeconfig (give --kubeconfig)")?,
    };
    kube::Client::try_from(config).context("building the API client")
}

pub(super) async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

impl ProxyArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let pins = Pins::new(&self.pins.dir);
        lb::attach(&self.cgroup, &pins)
            .with_context(|| format!("attaching to {}", self.cgroup.display()))?;
        let table = lb::open(&pins)?;
        let packet = if self.nodeport_interfaces.is_empty() {
            None
        } else {
            lb::attach_tc(&pins, &self.nodeport_interfaces).with_context(|| {
                format!(
                    "attaching the NodePort programs to {}",
                    self.nodeport_interfaces.join(", ")
                )
            })?;
            let maps = lb::open_tc(&pins)?;
            Some(PacketMaps {
                table: maps.table,
                local: maps.local,
            })
        };
        let node = NodeAddrs {
            name: self.node_name.clone(),
            ips: self.node_ips.clone(),
            // Filled in from the Nodes in the API.
            cluster_ips: Default::default(),
        };
        let external = ExternalFrontends::new(node, packet);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(async {
            let client = client(self.kubeconfig.as_ref()).await?;
            let names = ServiceNames::default();
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
            let metrics = match self.metrics_listen {
                Some(addr) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
                    println!("service proxy: metrics on http://{addr}/metrics");
                    let mut stop = stop_rx.clone();
                    let shutdown = async move {
                        let _ = stop.changed().await;
                    };
                    Some(tokio::spawn(proxy::metrics::serve(
                        listener,
                        pins.clone(),
                        names.clone(),
                        shutdown,
                    )))
                }
                None => None,
            };
            println!(
                "service proxy: load balancer on {}, following Services and EndpointSlices",
                self.cgroup.display()
            );
            let settings = Settings {
                default_algorithm: self.lb_algorithm,
                names,
                health_bind: (!self.no_health_check_ports).then_some(self.health_check_address),
            };
            let result = proxy::run_with(client, table, external, settings, stop_signal()).await;
            drop(stop_tx);
            if let Some(server) = metrics {
                server
                    .await
                    .context("metrics endpoint task")?
                    .context("metrics endpoint")?;
            }
            result?;
            println!("service proxy stopped; the load balancer stays attached");
            Ok(())
        })
    }
}
