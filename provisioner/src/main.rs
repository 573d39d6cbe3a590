//! `keelson-provisioner`: network boot for Keelson workers. `serve` runs the DHCP (or
//! proxyDHCP), TFTP and HTTP servers for one network segment, with machines from a TOML
//! inventory or (`--inventory api`) from the cluster's Machine objects; `check` validates an
//! inventory.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use keelson_provisioner::boot::BootFiles;
use keelson_provisioner::dhcp::{self, DhcpServer, Sockets};
use keelson_provisioner::http::{self, HttpConfig};
use keelson_provisioner::inventory::Inventory;
use keelson_provisioner::live::InventoryHandle;
use keelson_provisioner::machines;
use keelson_provisioner::net;
use keelson_provisioner::tftp::{TftpConfig, TftpServer};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    version,
    about = "Keelson provisioner: DHCP/proxyDHCP, TFTP, iPXE over HTTP, NoCloud seeds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve DHCP (or proxyDHCP), TFTP and HTTP on one interface.
    Serve(Box<ServeArgs>),
    /// Validate an inventory file and list its machines.
    Check {
        /// Inventory file (TOML).
        #[arg(long)]
        inventory: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Inventory file (TOML): machines, profiles, DHCP settings; or `api`: machines are
    /// the cluster's Machine objects (profiles and DHCP settings from `--profiles`).
    #[arg(long)]
    inventory: PathBuf,
    /// With `--inventory api`: the TOML file giving profiles, the unknown-MAC policy and
    /// DHCP settings (its `[[machines]]`, if any, are not used).
    #[arg(long)]
    profiles: Option<PathBuf>,
    /// With `--inventory api`: kubeconfig of the cluster (default: `$KUBECONFIG`, then
    /// `~/.kube/config`); it needs to manage Machines and bootstrap-token Secrets.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// With `--inventory api`: the API server URL written into joining machines'
    /// bootstrap kubeconfigs (default: the kubeconfig's server).
    #[arg(long)]
    api_server: Option<String>,
    /// With `--inventory api`: how long the join token in a machine's user-data is valid.
    #[arg(long, default_value = "1h", value_parser = parse_secs)]
    join_token_ttl: std::time::Duration,
    /// Interface to serve (DHCP needs it to receive broadcasts; all sockets bind to it).
    #[arg(long)]
    interface: Option<String>,
    /// This server's address on the segment (TFTP and HTTP listen on it).
    #[arg(long)]
    listen: Ipv4Addr,
    /// Run as proxyDHCP beside an existing DHCP server (PXE clients only, no addresses).
    #[arg(long)]
    proxy_dhcp: bool,
    /// Do not run DHCP at all (TFTP and HTTP only).
    #[arg(long, conflicts_with = "proxy_dhcp")]
    no_dhcp: bool,
    /// Lease file of the full DHCP server.
    #[arg(long, default_value = "/var/lib/keelson/provisioner/leases.json")]
    lease_file: PathBuf,
    /// Directory with undionly.kpxe and ipxe.efi (Debian package `ipxe`).
    #[arg(long, default_value = "/usr/lib/ipxe")]
    ipxe_dir: PathBuf,
    /// Extra directory served over TFTP (confined).
    #[arg(long)]
    tftp_root: Option<PathBuf>,
    /// Directory of boot assets (kernel, initrd) served under /assets/.
    #[arg(long)]
    assets: Option<PathBuf>,
    /// TFTP port.
    #[arg(long, default_value_t = 69)]
    tftp_port: u16,
    /// HTTP port.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// Base URL clients use to reach the HTTP server (default http://LISTEN:HTTP_PORT).
    #[arg(long)]
    http_base: Option<String>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(serve(*args))
        }
        Command::Check { inventory } => check(&inventory),
    }
}

fn check(path: &std::path::Path) -> Result<()> {
    let inv = Inventory::load(path)?;
    for m in inv.machines() {
        let target = inv
            .target_by_id(&m.name)
            .context("machine without profile")?;
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let ip = or_dash(m.ip.map(|i| i.to_string()));
        let mac = or_dash(m.mac.map(|i| i.to_string()));
        let uuid = or_dash(m.uuid.map(|i| i.to_string()));
        println!("{}\t{mac}\t{uuid}\t{ip}\t{}", m.name, target.profile_name);
    }
    println!("{}: {} machines, ok", path.display(), inv.machines().len());
    Ok(())
}

/// `30s`, `15m`, `1h` or plain seconds.
fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("bad unit in {s:?} (use s, m or h)")),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(mult)))
}

/// API mode: the inventory handle fed from Machine objects, and the task doing it.
async fn api_inventory(
    args: &ServeArgs,
    token: &CancellationToken,
    tasks: &mut JoinSet<Result<&'static str>>,
) -> Result<InventoryHandle> {
    let profiles = args
        .profiles
        .as_deref()
        .context("--inventory api needs --profiles FILE (profiles, DHCP settings)")?;
    let base = Inventory::load(profiles)?;
    let kubeconfig = match &args.kubeconfig {
        Some(p) => Kubeconfig::read_from(p).with_context(|| format!("reading {}", p.display()))?,
        None => {
            Kubeconfig::read().context("reading the kubeconfig ($KUBECONFIG or ~/.kube/config)")?
        }
    };
    let (server, ca_pem) = server_and_ca(&kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading the kubeconfig")?;
    let client = kube::Client::try_from(config).context("building the API client")?;
    let join = machines::ApiJoin::new(
        client.clone(),
        args.api_server.clone().unwrap_or(server),
        ca_pem,
        args.join_token_ttl,
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Until the first list arrives, nothing is known: no machine boots from the file.
    let handle = InventoryHandle::from(base.with_machines(Vec::new()))
        .with_sightings(tx)
        .with_join(Arc::new(join));
    let (h, t) = (handle.clone(), token.clone());
    tasks.spawn(async move {
        machines::run(client, base, h, rx, t).await;
        Ok("machines")
    });
    Ok(handle)
}

/// The current context's server URL and CA (PEM).
fn server_and_ca(kubeconfig: &Kubeconfig) -> Result<(String, String)> {
    use base64::Engine as _;
    let context_name = kubeconfig
        .current_context
        .as_deref()
        .context("the kubeconfig has no current-context")?;
    let context = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .with_context(|| format!("context {context_name:?} not found"))?;
    let cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.as_ref())
        .with_context(|| format!("cluster {:?} not found", context.cluster))?;
    let server = cluster
        .server
        .clone()
        .context("the cluster has no server")?;
    let ca = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .context("certificate-authority-data is not base64")?,
        )
        .context("certificate-authority-data is not PEM text")?,
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
        }
        (None, None) => bail!("the cluster has no certificate authority"),
    };
    Ok((server, ca))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let token = CancellationToken::new();
    let mut tasks: JoinSet<Result<&'static str>> = JoinSet::new();
    let inventory: InventoryHandle = if args.inventory.as_os_str() == "api" {
        api_inventory(&args, &token, &mut tasks).await?
    } else {
        Arc::new(Inventory::load(&args.inventory)?).into()
    };
    let iface = args.interface.as_deref();
    let http_base = args
        .http_base
        .clone()
        .unwrap_or_else(|| format!("http://{}:{}", args.listen, args.http_port));
    let boot = BootFiles::debian(http_base.clone());
    for name in [&boot.bios, &boot.uefi] {
        let p = args.ipxe_dir.join(name);
        if !p.exists() {
            bail!(
                "{} is missing: install Debian's `ipxe` package or pass --ipxe-dir",
                p.display()
            );
        }
    }
    if !args.no_dhcp {
        let Some(iface) = iface else {
            bail!("DHCP needs --interface (to receive broadcasts on it); or pass --no-dhcp");
        };
        let any = Ipv4Addr::UNSPECIFIED;
        let dhcp_sock = net::udp(
            SocketAddr::from((any, dhcp::SERVER_PORT)),
            Some(iface),
            true,
        )?;
        let (server, pxe) = if args.proxy_dhcp {
            let pxe = net::udp(SocketAddr::from((any, dhcp::PXE_PORT)), Some(iface), true)?;
            (
                DhcpServer::proxy(args.listen, boot.clone(), inventory.clone()),
                Some(pxe),
            )
        } else {
            if let Some(dir) = args.lease_file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let s = DhcpServer::full(
                args.listen,
                boot.clone(),
                inventory.clone(),
                Some(&args.lease_file),
            )?;
            (s, None)
        };
        let t = token.clone();
        tasks.spawn(async move {
            server
                .serve(
                    Sockets {
                        dhcp: dhcp_sock,
                        pxe,
                    },
                    t.cancelled_owned(),
                )
                .await
                .map(|()| "dhcp")
                .map_err(Into::into)
        });
    }

    let mut tftp_cfg = TftpConfig::ipxe(&args.ipxe_dir, args.tftp_root.clone());
    tftp_cfg.interface = args.interface.clone();
    let tftp_sock = net::udp(
        SocketAddr::from((args.listen, args.tftp_port)),
        iface,
        false,
    )?;
    let t = token.clone();
    tasks.spawn(async move {
        TftpServer::new(tftp_cfg)
            .serve(tftp_sock, t.cancelled_owned())
            .await
            .map(|()| "tftp")
            .map_err(Into::into)
    });

    let listener = net::tcp_listener(SocketAddr::from((args.listen, args.http_port)), iface)?;
    let http_cfg = HttpConfig {
        http_base,
        inventory,
        assets: args.assets.clone(),
        boot_files: [&boot.bios, &boot.uefi]
            .into_iter()
            .map(|n| (n.clone(), args.ipxe_dir.join(n)))
            .collect(),
        max_requests: 256,
    };
    let t = token.clone();
    tasks.spawn(async move {
        http::serve(listener, http_cfg, t.cancelled_owned())
            .await
            .map(|()| "http")
            .map_err(Into::into)
    });

    let signals = {
        let token = token.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            info!("shutting down");
            token.cancel();
            Ok::<(), std::io::Error>(())
        }
    };
    tokio::spawn(signals);

    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        // One server ending (error or not) stops the others.
        token.cancel();
        match joined {
            Ok(Ok(name)) => info!(server = name, "stopped"),
            Ok(Err(e)) => {
                error!(error = %e, "server failed");
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(e.into());
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
