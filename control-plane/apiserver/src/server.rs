//! Running the API server as a process: the cluster PKI under a data directory, the admin
//! kubeconfig, and HTTPS serving until shutdown. `keelson-server` calls [`run`] with its store.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    Api, Config,
    auth::StaticTokens,
    pki::{self, ClusterCa},
    storage::Storage,
    tls,
};

/// How to run the API server.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the cluster PKI (`ca.crt`, `ca.key`, …), created at first start.
    pub pki_dir: PathBuf,
    /// Extra names and addresses the serving certificate is valid for.
    pub extra_sans: Vec<String>,
    /// Where to write the admin kubeconfig.
    pub admin_kubeconfig: PathBuf,
    /// A static token file (`token,user,uid,"groups"`), if any.
    pub token_file: Option<PathBuf>,
    /// API settings.
    pub config: Config,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Certificates.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// TLS settings.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The store.
    #[error("store: {0}")]
    Store(#[from] crate::storage::StorageError),
    /// The token file.
    #[error("token file {}: {message}", path.display())]
    Tokens {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Listening or serving.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn sans(listen: SocketAddr, extra: &[String], service_ip: IpAddr) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec![
        "localhost".to_owned(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ];
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1]), service_ip];
    if !listen.ip().is_unspecified() {
        ips.push(listen.ip());
    }
    for s in extra {
        match s.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(s.clone()),
        }
    }
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        dns.push(host.trim().to_owned());
    }
    ips.dedup();
    (dns, ips)
}

/// Creates the PKI if needed, writes the admin kubeconfig, bootstraps the store and serves
/// until `shutdown` completes.
///
/// # Errors
/// Certificates, the store, the token file or the listener fail.
pub async fn run(
    store: Arc<dyn Storage>,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    start(store, opts).await?.serve(shutdown).await
}

/// An API server ready to serve: its PKI made, the admin kubeconfig written, the store
/// bootstrapped and the address bound.
pub struct Started {
    api: Arc<Api>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
}

impl Started {
    /// The API, e.g. for [`Api::local_client`].
    pub fn api(&self) -> &Arc<Api> {
        &self.api
    }

    /// Serves HTTPS until `shutdown` completes.
    ///
    /// # Errors
    /// Accepting connections fails.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        self.api
            .serve_tls(self.listener, self.tls, shutdown)
            .await
            .map_err(|source| ServeError::Io {
                what: "serving".into(),
                source,
            })
    }
}

/// Everything [`run`] does before serving.
///
/// # Errors
/// Certificates, the store, the token file or the listener fail.
pub async fn start(store: Arc<dyn Storage>, opts: ServeOptions) -> Result<Started, ServeError> {
    let ca = ClusterCa::load_or_create(&opts.pki_dir)?;
    let (dns, ips) = sans(
        opts.listen,
        &opts.extra_sans,
        IpAddr::V4(opts.config.service_ranges.first()),
    );
    let serving = ca.issue_server(&dns, &ips)?;
    let tls = tls::server_config(ca.cert_pem(), &serving)?;

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Io {
            what: format!("listening on {}", opts.listen),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Io {
        what: "reading the listen address".into(),
        source,
    })?;
    let host = if addr.ip().is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    let server_url = format!("https://{}", SocketAddr::new(host, addr.port()));
    write_admin_kubeconfig(&ca, &server_url, &opts.admin_kubeconfig)?;

    let mut config = opts.config;
    if let Some(path) = &opts.token_file {
        let text = std::fs::read_to_string(path).map_err(|e| ServeError::Tokens {
            path: path.clone(),
            message: e.to_string(),
        })?;
        config.tokens = StaticTokens::parse(&text).map_err(|message| ServeError::Tokens {
            path: path.clone(),
            message,
        })?;
    }
    let api = Api::new(store, config);
    // A freshly started store may need a moment to elect its leader.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match api.bootstrap().await {
            Ok(()) => break,
            Err(crate::storage::StorageError::Unavailable(reason))
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(%reason, "waiting for the store");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(%server_url, kubeconfig = %opts.admin_kubeconfig.display(), "serving the Kubernetes API");
    Ok(Started { api, listener, tls })
}

/// Writes a kubeconfig for the cluster admin (`system:masters`), readable by its owner only.
///
/// # Errors
/// Signing or writing fails.
pub fn write_admin_kubeconfig(
    ca: &ClusterCa,
    server_url: &str,
    path: &Path,
) -> Result<(), pki::PkiError> {
    let admin = ca.issue_client("kubernetes-admin", &["system:masters"])?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| pki::PkiError::Io {
            op: "creating",
            path: dir.into(),
            source,
        })?;
    }
    pki::write(
        path,
        &pki::kubeconfig(server_url, ca.cert_pem(), &admin, "admin"),
        0o600,
    )
}
