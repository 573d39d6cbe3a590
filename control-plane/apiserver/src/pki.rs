//! The cluster's certificates: a CA made at init, the API server's serving certificate and
//! client certificates (the admin's, nodes'), and kubeconfig files that carry them.
//!
//! Client certificates name the user in the subject's CN and the groups in its O fields, as
//! Kubernetes reads them.

use std::{
    fs,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A PKI failure, with the file or step that failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Generating, parsing or signing failed.
    #[error("{what}: {source}")]
    Cert {
        /// What was being made.
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
}

type Result<T, E = PkiError> = std::result::Result<T, E>;

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Cert { what, source }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct CertAndKey {
    /// The certificate.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

/// The cluster CA, able to issue certificates.
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
}

impl ClusterCa {
    /// Loads the CA from `dir/ca.crt` and `dir/ca.key`, creating both if absent.
    ///
    /// # Errors
    /// A file cannot be read or written, or holds something that is not a CA.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if cert_path.exists() && key_path.exists() {
            let cert_pem = read(&cert_path)?;
            let key = KeyPair::from_pem(&read(&key_path)?)
                .map_err(cert_err(format!("parsing {}", key_path.display())))?;
            // Parsing proves the file is a certificate rcgen can issue from.
            Issuer::from_ca_cert_pem(&cert_pem, &key)
                .map_err(cert_err(format!("parsing {}", cert_path.display())))?;
            return Ok(ClusterCa { cert_pem, key });
        }
        let key = KeyPair::generate().map_err(cert_err("generating the CA key"))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA parameters"))?;
        params.distinguished_name = name("keelson-ca", &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, 10);
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("self-signing the CA"))?;
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            op: "creating",
            path: dir.into(),
            source,
        })?;
        write(&cert_path, &cert.pem(), 0o644)?;
        write(&key_path, &key.serialize_pem(), 0o600)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(&self, params: CertificateParams, what: &str) -> Result<CertAndKey> {
        let key = KeyPair::generate().map_err(cert_err(format!("generating the {what} key")))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(cert_err("loading the CA"))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(cert_err(format!("signing the {what} certificate")))?;
        Ok(CertAndKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A serving certificate for the API server, valid for these DNS names and addresses.
    ///
    /// # Errors
    /// Signing fails.
    pub fn issue_server(&self, dns: &[String], ips: &[IpAddr]) -> Result<CertAndKey> {
        let mut params = CertificateParams::new(dns.to_vec())
            .map_err(cert_err("server certificate parameters"))?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name = name("kube-apiserver", &[]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, 1);
        self.issue(params, "serving")
    }

    /// A client certificate for user `user` in `groups`.
    ///
    /// # Errors
    /// Signing fails.
    pub fn issue_client(&self, user: &str, groups: &[&str]) -> Result<CertAndKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(cert_err("client certificate parameters"))?;
        params.distinguished_name = name(user, groups);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, 1);
        self.issue(params, &format!("client ({user})"))
    }
}

/// Valid from an hour ago (clock skew between machines) for `years`.
fn set_validity(params: &mut CertificateParams, years: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365 * years);
}

fn name(cn: &str, orgs: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    dn
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        op: "reading",
        path: path.into(),
        source,
    })
}

/// Writes a file with the given mode, replacing it.
///
/// # Errors
/// The file cannot be written.
pub fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write as _;
    let err = |source| PkiError::Io {
        op: "writing",
        path: path.into(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// A kubeconfig for `server` authenticating with a client certificate.
pub fn kubeconfig(server: &str, ca_pem: &str, client: &CertAndKey, user: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: keelson\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\ncontexts:\n- name: {user}@keelson\n  context:\n    cluster: keelson\n    \
         user: {user}\ncurrent-context: {user}@keelson\nusers:\n- name: {user}\n  user:\n    \
         client-certificate-data: {}\n    client-key-data: {}\n",
        b64(ca_pem),
        b64(&client.cert_pem),
        b64(&client.key_pem)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_and_issues_named_clients() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        let again = ClusterCa::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        let admin = ca
            .issue_client("kubernetes-admin", &["system:masters"])
            .unwrap();
        use rustls::pki_types::pem::PemObject as _;
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(admin.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .collect();
        let o: Vec<_> = cert
            .subject()
            .iter_organization()
            .filter_map(|a| a.as_str().ok())
            .collect();
        assert_eq!((cn, o), (vec!["kubernetes-admin"], vec!["system:masters"]));
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
