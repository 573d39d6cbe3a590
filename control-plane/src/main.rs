//! `keelson-server`: runs one member of the control-plane store.
//!
//! ```text
//! keelson-server --id 1 --data-dir /var/lib/keelson/1 --listen 127.0.0.1:7001 --init
//! keelson-server --id 2 --data-dir /var/lib/keelson/2 --listen 127.0.0.1:7002 --join 127.0.0.1:7001
//! ```
//! A member restarted with its data directory resumes its place; `--init` and `--join` are then
//! no-ops. With `--api-listen` the member also serves the Kubernetes API over HTTPS, creating
//! the cluster CA under `<data-dir>/pki` at first start and writing an admin kubeconfig. It prints `listening on ADDR` once serving (useful with port 0), `member ID ready`
//! once initialized or joined, and stops cleanly on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use keelson_apiserver::{
    Config,
    auth::User,
    server::{self, ServeOptions},
    storage::{
        Storage,
        encrypted::{EncryptedStore, EncryptionConfig},
    },
};
use keelson_server::{
    api_storage::RaftStorage,
    store::{Store, StoreConfig},
};
use tokio::net::TcpListener;

/// mimalloc rather than glibc's allocator: the API server allocates and frees many small JSON
/// trees per request, and under load glibc's malloc/free (with consolidation of freed chunks)
/// took as much CPU as the server's own code (perf, scheduler benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run one member of Keelson's replicated control-plane store.
#[derive(Debug, Parser)]
#[command(name = "keelson-server", version)]
struct Args {
    /// This member's id (unique in the cluster, never reused).
    #[arg(long, env = "KEELSON_STORE_ID")]
    id: u64,
    /// Directory holding this member's database.
    #[arg(long, env = "KEELSON_STORE_DATA_DIR")]
    data_dir: PathBuf,
    /// Address to serve the store's gRPC on (`host:port`; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address other members reach this one at (default: the bound listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Bootstrap a new cluster with this member as its only voter.
    #[arg(long, conflicts_with = "join")]
    init: bool,
    /// Join the cluster of the member at this address (`host:port`).
    #[arg(long)]
    join: Option<String>,
    /// Past events kept for resuming watches (the same on every member).
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Deadline of one store request, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    request_timeout_ms: u64,
    /// Serve the Kubernetes API (HTTPS) on this address, e.g. `127.0.0.1:6443`.
    #[arg(long)]
    api_listen: Option<std::net::SocketAddr>,
    /// Where to write the admin kubeconfig (default: `<data-dir>/admin.kubeconfig`).
    #[arg(long)]
    admin_kubeconfig: Option<PathBuf>,
    /// Static bearer tokens for the API, one `token,user,uid,"group1,group2"` per line.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Extra DNS names or addresses for the API's serving certificate (repeatable).
    #[arg(long = "api-san")]
    api_sans: Vec<String>,
    /// With `--api-listen`, also run the scheduler and controllers (on the member holding
    /// the `kube-system/keelson-controller-manager` Lease); `--no-controllers` turns them off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    controllers: bool,
    /// Do not run the scheduler and controllers (same as `--controllers=false`).
    #[arg(long)]
    no_controllers: bool,
    /// Turn off one of the controllers (repeatable), e.g. `--disable-controller node-lifecycle`.
    #[arg(long = "disable-controller", value_enum)]
    disable_controllers: Vec<Controller>,
    /// Bindings the scheduler writes at once.
    #[arg(long, default_value_t = keelson_controllers::Options::default().bind_concurrency)]
    scheduler_bind_concurrency: usize,
    /// Terminated pods kept before the oldest are deleted (0 keeps them all).
    #[arg(long, default_value_t = 12_500)]
    terminated_pod_gc_threshold: usize,
    /// Events are deleted this long after their last update, e.g. `1h`, `30m`, `90s`
    /// (0 keeps them).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    event_ttl: Duration,
    /// Encrypt resources at rest as this Kubernetes `EncryptionConfiguration` file says
    /// (providers `aesgcm` and `identity`).
    #[arg(long)]
    encryption_provider_config: Option<PathBuf>,
}

/// The controllers `--disable-controller` turns off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Controller {
    Scheduler,
    /// ReplicaSets and Deployments.
    Workloads,
    Daemonsets,
    Jobs,
    Endpointslices,
    Endpoints,
    NodeLifecycle,
    NodeIpam,
    GarbageCollector,
    PodGc,
    TokenCleaner,
}

/// The default controller options with `off` turned off.
fn disabled_controllers(off: &[Controller]) -> keelson_controllers::Options {
    let mut opts = keelson_controllers::Options::default();
    for c in off {
        let flag = match c {
            Controller::Scheduler => &mut opts.scheduler,
            Controller::Workloads => &mut opts.workloads,
            Controller::Daemonsets => &mut opts.daemon_sets,
            Controller::Jobs => &mut opts.jobs,
            Controller::Endpointslices => &mut opts.endpoint_slices,
            Controller::Endpoints => &mut opts.endpoints,
            Controller::NodeLifecycle => &mut opts.node_lifecycle,
            Controller::NodeIpam => &mut opts.node_ipam,
            Controller::GarbageCollector => &mut opts.garbage_collector,
            Controller::PodGc => &mut opts.pod_gc,
            Controller::TokenCleaner => &mut opts.token_cleaner,
        };
        *flag = false;
    }
    opts
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let encryption = args
        .encryption_provider_config
        .as_deref()
        .map(|path| {
            EncryptionConfig::load(path)
                .with_context(|| format!("loading the encryption configuration {}", path.display()))
        })
        .transpose()?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let config = StoreConfig::new(args.id, &args.data_dir)
        .with_history_limit(args.history)
        .with_request_timeout(Duration::from_millis(args.request_timeout_ms));
    let store = Store::start(config, listener)
        .await
        .with_context(|| format!("starting member {} in {}", args.id, args.data_dir.display()))?;
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| store.addr().to_string());
    println!("listening on {}", store.addr());
    if args.init {
        store
            .initialize([(args.id, advertise.clone())].into())
            .await
            .context("initializing the cluster")?;
    }
    if let Some(via) = &args.join {
        store
            .join(via, &advertise)
            .await
            .with_context(|| format!("joining the cluster via {via}"))?;
    }
    println!("member {} ready", args.id);
    let store = Arc::new(store);
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api = match args.api_listen {
        Some(listen) => {
            let opts = ServeOptions {
                listen,
                pki_dir: args.data_dir.join("pki"),
                extra_sans: args.api_sans.clone(),
                admin_kubeconfig: args
                    .admin_kubeconfig
                    .clone()
                    .unwrap_or_else(|| args.data_dir.join("admin.kubeconfig")),
                token_file: args.token_file.clone(),
                config: Config::default(),
            };
            let mut storage: Arc<dyn Storage> = Arc::new(RaftStorage::new(Arc::clone(&store)));
            if let Some(config) = encryption {
                storage = Arc::new(EncryptedStore::new(storage, config));
            }
            Some(
                server::start(storage, opts)
                    .await
                    .context("starting the Kubernetes API")?,
            )
        }
        None => None,
    };
    let (stop_controllers, controllers_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(started) = &api
        && args.controllers
        && !args.no_controllers
    {
        let shutdown = async {
            let _ = controllers_stopped.await;
        };
        // Node CSRs are signed with the cluster CA the API server keeps under the data dir.
        let opts = keelson_controllers::Options {
            csr_signing_ca: Some(args.data_dir.join("pki")),
            terminated_pod_gc_threshold: args.terminated_pod_gc_threshold,
            event_ttl: args.event_ttl,
            bind_concurrency: args.scheduler_bind_concurrency,
            ..disabled_controllers(&args.disable_controllers)
        };
        // The controllers call this member's API in-process (same API semantics, no TLS or
        // HTTP to itself), as a cluster admin.
        let client = started.api().local_client(User {
            name: "system:keelson-controller-manager".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        });
        tokio::spawn(async move {
            if let Err(e) = keelson_controllers::run(client, opts, shutdown).await {
                tracing::error!(error = %e, "the controllers stopped");
            }
        });
    }
    let api = api.map(|started| {
        tokio::spawn(started.serve(async {
            let _ = api_stopped.await;
        }))
    });
    let api_failed = async {
        match api {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        signal = wait_for_signal() => signal?,
        result = api_failed => {
            store.shutdown().await;
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e).context("serving the Kubernetes API"),
                Err(e) => Err(e).context("the API server task failed"),
            };
        }
    }
    let _ = stop_controllers.send(());
    let _ = stop_api.send(());
    tracing::info!(member = args.id, "shutting down");
    store.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// `90s`, `30m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m or 1h"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?}: use the units s, m or h")),
    };
    Ok(Duration::from_secs(n.saturating_mul(scale)))
}
