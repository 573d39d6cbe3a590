//! TLS bootstrap of the node's credentials, as the kubelet does it: with only a bootstrap
//! kubeconfig (a bootstrap token), the agent makes a key, asks the API for a client
//! certificate (`CertificateSigningRequest`, signer
//! `kubernetes.io/kube-apiserver-client-kubelet`, CN `system:node:<name>`, O
//! `system:nodes`), waits until the control plane approves and signs it, and writes a
//! kubeconfig with that certificate (mode 0600). A kubeconfig whose certificate is still
//! valid is used as it is.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The signer of node client certificates.
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// A certificate expiring sooner than this is renewed at start.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// How often the CSR is polled while waiting.
const POLL: Duration = Duration::from_millis(500);

/// Errors of the TLS bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Making the key or the request failed.
    #[error("making the certificate request: {0}")]
    Request(String),
    /// An API call failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The client's error.
        source: kube::Error,
    },
    /// The control plane refused the request.
    #[error("certificate request {name} was {reason}: {message}")]
    Refused {
        /// The CSR.
        name: String,
        /// `denied` or `failed`.
        reason: &'static str,
        /// The condition's message.
        message: String,
    },
    /// No certificate came in time.
    #[error(
        "certificate request {name} was not signed within {secs} s (is it approved? `kubectl get csr`)"
    )]
    Timeout {
        /// The CSR.
        name: String,
        /// The wait.
        secs: u64,
    },
    /// Writing the kubeconfig failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Local result alias.
pub type Result<T, E = BootstrapError> = std::result::Result<T, E>;

/// What the bootstrap needs.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    /// The kubeconfig with the bootstrap token.
    pub bootstrap_kubeconfig: PathBuf,
    /// Where the node's own kubeconfig is (to be) written.
    pub kubeconfig: PathBuf,
    /// The Node's name.
    pub node_name: String,
    /// How long to wait for the certificate.
    pub timeout: Duration,
}

/// Whether the kubeconfig at `path` holds a client certificate valid for a while longer.
pub fn has_valid_credentials(path: &Path) -> bool {
    let Ok(kc) = Kubeconfig::read_from(path) else {
        return false;
    };
    let Some(cert_b64) = current_user(&kc).and_then(|u| u.client_certificate_data.clone()) else {
        return false;
    };
    let Ok(pem) = base64::engine::general_purpose::STANDARD.decode(cert_b64.trim()) else {
        return false;
    };
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(&pem) else {
        return false;
    };
    let Ok(cert) = block.parse_x509() else {
        return false;
    };
    let deadline = jiff::Timestamp::now().as_second()
        + i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX);
    cert.validity().not_after.timestamp() > deadline
}

fn current_user(kc: &Kubeconfig) -> Option<&kube::config::AuthInfo> {
    let ctx_name = kc.current_context.as_deref()?;
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)?
        .context
        .as_ref()?;
    let user = ctx.user.as_deref()?;
    kc.auth_infos
        .iter()
        .find(|a| a.name == user)?
        .auth_info
        .as_ref()
}

/// The current context's server URL and CA (base64 PEM, as in `certificate-authority-data`).
fn server_and_ca(kc: &Kubeconfig, path: &Path) -> Result<(String, String)> {
    let fail = |message: &str| BootstrapError::Kubeconfig {
        path: path.into(),
        message: message.to_owned(),
    };
    let ctx_name = kc
        .current_context
        .as_deref()
        .ok_or_else(|| fail("no current-context"))?;
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.as_ref())
        .ok_or_else(|| fail("the current context is missing"))?;
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| fail("the context's cluster is missing"))?;
    let server = cluster
        .server
        .clone()
        .ok_or_else(|| fail("the cluster has no server"))?;
    let ca = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(d), _) => d.trim().to_owned(),
        (None, Some(file)) => {
            let pem = std::fs::read(file).map_err(|e| fail(&format!("reading {file}: {e}")))?;
            base64::engine::general_purpose::STANDARD.encode(pem)
        }
        (None, None) => return Err(fail("the cluster has no certificate authority")),
    };
    Ok((server, ca))
}

/// A new key and the PEM request for the node's client certificate.
///
/// # Errors
/// Key generation or encoding fails.
pub fn node_request(node: &str) -> Result<(rcgen::KeyPair, String)> {
    let fail = |e: rcgen::Error| BootstrapError::Request(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let pem = params
        .serialize_request(&key)
        .map_err(fail)?
        .pem()
        .map_err(fail)?;
    Ok((key, pem))
}

/// A kubeconfig for `server` with a client certificate.
pub fn node_kubeconfig(
    server: &str,
    ca_b64: &str,
    cert_pem: &str,
    key_pem: &str,
    node: &str,
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: keelson\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca_b64}\ncontexts:\n- name: system:node:{node}@keelson\n  context:\n    \
         cluster: keelson\n    user: system:node:{node}\ncurrent-context: system:node:{node}@keelson\nusers:\n\
         - name: system:node:{node}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(cert_pem),
        b64(key_pem)
    )
}

/// Makes sure `cfg.kubeconfig` holds valid node credentials, running the TLS bootstrap with
/// `cfg.bootstrap_kubeconfig` if not. Returns whether it bootstrapped.
///
/// # Errors
/// The bootstrap kubeconfig is unusable, the API refuses or denies the request, no
/// certificate comes within the timeout, or the kubeconfig cannot be written.
pub async fn ensure_credentials(cfg: &BootstrapConfig) -> Result<bool> {
    if has_valid_credentials(&cfg.kubeconfig) {
        return Ok(false);
    }
    let path = &cfg.bootstrap_kubeconfig;
    let bad = |message: String| BootstrapError::Kubeconfig {
        path: path.clone(),
        message,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let (server, ca) = server_and_ca(&kc, path)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    let client = kube::Client::try_from(config).map_err(|e| bad(e.to_string()))?;
    let (key, request) = node_request(&cfg.node_name)?;
    let csrs: Api<CertificateSigningRequest> = Api::all(client);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("node-csr-{}-", cfg.node_name)),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.into_bytes()),
            signer_name: KUBELET_CLIENT_SIGNER.to_owned(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    let created = csrs
        .create(&PostParams::default(), &csr)
        .await
        .map_err(|source| BootstrapError::Api {
            action: "creating the node's CertificateSigningRequest".into(),
            source,
        })?;
    let name = created.metadata.name.clone().unwrap_or_default();
    tracing::info!(csr = %name, node = %cfg.node_name, "waiting for the node certificate");
    let cert_pem = wait_for_certificate(&csrs, &name, cfg.timeout).await?;
    if let Some(dir) = cfg.kubeconfig.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BootstrapError::Write {
            path: dir.into(),
            source,
        })?;
    }
    let text = node_kubeconfig(
        &server,
        &ca,
        &cert_pem,
        &key.serialize_pem(),
        &cfg.node_name,
    );
    write_private(&cfg.kubeconfig, &text)?;
    tracing::info!(kubeconfig = %cfg.kubeconfig.display(), "node credentials written");
    Ok(true)
}

async fn wait_for_certificate(
    csrs: &Api<CertificateSigningRequest>,
    name: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match csrs.get(name).await {
            Ok(csr) => {
                let status = csr.status.unwrap_or_default();
                for c in status.conditions.iter().flatten() {
                    let reason = match c.type_.as_str() {
                        "Denied" => "denied",
                        "Failed" => "failed",
                        _ => continue,
                    };
                    return Err(BootstrapError::Refused {
                        name: name.to_owned(),
                        reason,
                        message: c.message.clone().unwrap_or_default(),
                    });
                }
                if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
                    return String::from_utf8(cert.0).map_err(|_| {
                        BootstrapError::Request("the issued certificate is not PEM".into())
                    });
                }
            }
            // The API may be briefly unavailable: keep trying until the deadline.
            Err(e) => tracing::debug!(csr = %name, error = %e, "reading the CSR"),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BootstrapError::Timeout {
                name: name.to_owned(),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Writes `text` to `path` (mode 0600) through a temporary file, so that a crash never
/// leaves half a kubeconfig.
fn write_private(path: &Path, text: &str) -> Result<()> {
    let err = |source| BootstrapError::Write {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_node() {
        let (_, pem) = node_request("n1").expect("request");
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        assert_eq!(block.label, "CERTIFICATE REQUEST");
        use x509_parser::prelude::FromDer as _;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
                .expect("der");
        let subject = &csr.certification_request_info.subject;
        let cn: Vec<_> = subject
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .collect();
        let o: Vec<_> = subject
            .iter_organization()
            .filter_map(|a| a.as_str().ok())
            .collect();
        assert_eq!(cn, ["system:node:n1"]);
        assert_eq!(o, ["system:nodes"]);
    }

    #[test]
    fn kubeconfigs_with_fresh_certificates_are_kept_and_others_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kubeconfig");
        assert!(!has_valid_credentials(&path), "missing file");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1);
        let fresh = params.self_signed(&key).expect("cert");
        let ca = base64::engine::general_purpose::STANDARD.encode("CA");
        let text = node_kubeconfig(
            "https://127.0.0.1:6443",
            &ca,
            &fresh.pem(),
            &key.serialize_pem(),
            "n1",
        );
        write_private(&path, &text).expect("write");
        assert!(has_valid_credentials(&path));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        params.not_after = now + time::Duration::seconds(60);
        let expiring = params.self_signed(&key).expect("cert");
        let text = node_kubeconfig(
            "https://127.0.0.1:6443",
            &ca,
            &expiring.pem(),
            &key.serialize_pem(),
            "n1",
        );
        write_private(&path, &text).expect("write");
        assert!(
            !has_valid_credentials(&path),
            "expires within the renewal margin"
        );
    }
}
