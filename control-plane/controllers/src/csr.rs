//! Node credentials by TLS bootstrap: approves the CertificateSigningRequests that joining
//! nodes make with a bootstrap token, and signs approved kubelet client CSRs with the cluster
//! CA.
//!
//! Approved automatically: signer `kubernetes.io/kube-apiserver-client-kubelet`, requested
//! by a member of `system:bootstrappers` (the API server records the requester in
//! `spec.username`/`spec.groups`), for exactly CN `system:node:<name>`, O `system:nodes`,
//! client-auth usages only. Anything else stays pending until an admin runs
//! `kubectl certificate approve|deny`. Approved CSRs of the kubelet-client and
//! kube-apiserver-client signers get `status.certificate`, valid for a year or
//! `spec.expirationSeconds` (at least ten minutes).

use std::path::Path;

use futures::StreamExt as _;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The signer of node client certificates.
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// The signer of other API client certificates (admin-approved only).
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";

const MIN_VALIDITY_SECS: i64 = 600;
const DEFAULT_VALIDITY_SECS: i64 = 365 * 24 * 3600;

/// Why a CSR cannot be approved or signed.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The CA files cannot be read or used.
    #[error("cluster CA in {dir}: {message}")]
    Ca {
        /// The PKI directory.
        dir: String,
        /// What failed.
        message: String,
    },
    /// The request is not a valid PEM CERTIFICATE REQUEST.
    #[error("the request is not a valid PKCS#10 certificate request: {0}")]
    Request(String),
    /// The requested subject or usages do not fit the signer.
    #[error("{0}")]
    NotAllowed(String),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(String),
}

/// The subject of a PEM certificate request: common name and organizations.
///
/// # Errors
/// The request is not PEM/DER PKCS#10.
pub fn request_subject(pem: &[u8]) -> Result<(String, Vec<String>), CsrError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| CsrError::Request(format!("PEM: {e}")))?;
    if pem.label != "CERTIFICATE REQUEST" {
        return Err(CsrError::Request(format!("PEM block {:?}", pem.label)));
    }
    use x509_parser::prelude::FromDer as _;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| CsrError::Request(e.to_string()))?;
    let subject = &csr.certification_request_info.subject;
    let cn = subject
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .collect::<Vec<_>>();
    let [cn] = cn.as_slice() else {
        return Err(CsrError::NotAllowed(
            "the subject must have exactly one common name".into(),
        ));
    };
    let orgs = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok().map(str::to_owned))
        .collect();
    Ok(((*cn).to_owned(), orgs))
}

/// Whether a CSR is a joining node's, to approve without a human: see the module docs.
///
/// # Errors
/// Why not, for the log.
pub fn auto_approvable(csr: &CertificateSigningRequest) -> Result<String, CsrError> {
    let spec = &csr.spec;
    if spec.signer_name != KUBELET_CLIENT_SIGNER {
        return Err(CsrError::NotAllowed(format!(
            "signer {} is not auto-approved",
            spec.signer_name
        )));
    }
    let bootstrapper = spec
        .groups
        .as_ref()
        .is_some_and(|g| g.iter().any(|g| g == "system:bootstrappers"));
    if !bootstrapper {
        return Err(CsrError::NotAllowed(
            "not requested by a bootstrap token".into(),
        ));
    }
    let allowed_usages = ["digital signature", "key encipherment", "client auth"];
    if let Some(u) = spec
        .usages
        .iter()
        .flatten()
        .find(|u| !allowed_usages.contains(&u.as_str()))
    {
        return Err(CsrError::NotAllowed(format!("usage {u:?} is not allowed")));
    }
    node_subject(&spec.request.0)
}

/// The node name of a request for CN `system:node:<name>`, O `system:nodes` (only).
fn node_subject(request: &[u8]) -> Result<String, CsrError> {
    let (cn, orgs) = request_subject(request)?;
    let name = cn
        .strip_prefix("system:node:")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| CsrError::NotAllowed(format!("CN {cn:?} is not system:node:<name>")))?;
    if orgs != ["system:nodes"] {
        return Err(CsrError::NotAllowed(format!(
            "organizations {orgs:?} are not exactly [system:nodes]"
        )));
    }
    Ok(name.to_owned())
}

/// The cluster CA, as the signer uses it.
pub struct Signer {
    cert_pem: String,
    key: rcgen::KeyPair,
}

impl Signer {
    /// Loads `dir/ca.crt` and `dir/ca.key`.
    ///
    /// # Errors
    /// A file is missing or not a usable CA.
    pub fn load(dir: &Path) -> Result<Self, CsrError> {
        let fail = |message: String| CsrError::Ca {
            dir: dir.display().to_string(),
            message,
        };
        let cert_pem = std::fs::read_to_string(dir.join("ca.crt"))
            .map_err(|e| fail(format!("ca.crt: {e}")))?;
        let key_pem = std::fs::read_to_string(dir.join("ca.key"))
            .map_err(|e| fail(format!("ca.key: {e}")))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| fail(format!("ca.key: {e}")))?;
        rcgen::Issuer::from_ca_cert_pem(&cert_pem, &key)
            .map_err(|e| fail(format!("ca.crt: {e}")))?;
        Ok(Signer { cert_pem, key })
    }

    /// Signs an approved CSR: a client certificate for the requested subject and key, PEM.
    ///
    /// # Errors
    /// The request is invalid for its signer, or signing fails.
    pub fn sign(&self, csr: &CertificateSigningRequest) -> Result<String, CsrError> {
        let spec = &csr.spec;
        let pem = std::str::from_utf8(&spec.request.0)
            .map_err(|_| CsrError::Request("not PEM text".into()))?;
        let (cn, orgs) = match spec.signer_name.as_str() {
            KUBELET_CLIENT_SIGNER => {
                let name = node_subject(&spec.request.0)?;
                (
                    format!("system:node:{name}"),
                    vec!["system:nodes".to_owned()],
                )
            }
            CLIENT_SIGNER => request_subject(&spec.request.0)?,
            other => {
                return Err(CsrError::NotAllowed(format!("signer {other} is not ours")));
            }
        };
        // The request proves possession of the key (its signature is checked here); the
        // certificate carries only what we allow: subject, client auth, validity.
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(pem)
            .map_err(|e| CsrError::Request(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        for o in orgs {
            dn.push(rcgen::DnType::OrganizationName, o);
        }
        params.distinguished_name = dn;
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let secs = spec
            .expiration_seconds
            .map_or(DEFAULT_VALIDITY_SECS, |s| {
                i64::from(s).max(MIN_VALIDITY_SECS)
            })
            .min(DEFAULT_VALIDITY_SECS);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(secs);
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        let request = rcgen::CertificateSigningRequestParams {
            params,
            public_key: parsed.public_key,
        };
        let cert = request
            .signed_by(&issuer)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        Ok(cert.pem())
    }
}

fn condition(csr: &CertificateSigningRequest, ty: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == ty && c.status == "True"))
}

/// The approver and signer.
pub(crate) struct Csrs {
    api: Api<CertificateSigningRequest>,
    signer: Signer,
}

impl Csrs {
    pub(crate) fn new(client: Client, signer: Signer) -> Self {
        Csrs {
            api: Api::all(client),
            signer,
        }
    }

    /// Approves and signs until `cancel`.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let stream = watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(csr)) => self.handle(csr).await,
                Some(Err(e)) => tracing::debug!(error = %e, "watching CSRs"),
                None => return,
            }
        }
    }

    async fn handle(&self, mut csr: CertificateSigningRequest) {
        let name = csr.metadata.name.clone().unwrap_or_default();
        let issued = csr
            .status
            .as_ref()
            .and_then(|s| s.certificate.as_ref())
            .is_some_and(|c| !c.0.is_empty());
        if issued || condition(&csr, "Denied") || condition(&csr, "Failed") {
            return;
        }
        if !condition(&csr, "Approved") {
            match auto_approvable(&csr) {
                Ok(node) => {
                    let patch = json!({"status": {"conditions": [{
                        "type": "Approved", "status": "True", "reason": "AutoApproved",
                        "message": format!("Auto approving the client certificate of node {node} (TLS bootstrap)"),
                        "lastUpdateTime": jiff::Timestamp::now().round(jiff::Unit::Second).unwrap_or_else(|_| jiff::Timestamp::now()).to_string(),
                    }]}});
                    match self
                        .api
                        .patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(c) => {
                            tracing::info!(csr = %name, %node, "approved");
                            csr = c;
                        }
                        Err(e) => {
                            tracing::warn!(csr = %name, error = %e, "approving");
                            return;
                        }
                    }
                }
                Err(why) => {
                    tracing::debug!(csr = %name, %why, "left pending");
                    return;
                }
            }
        }
        if !matches!(
            csr.spec.signer_name.as_str(),
            KUBELET_CLIENT_SIGNER | CLIENT_SIGNER
        ) {
            return;
        }
        let status = match self.signer.sign(&csr) {
            Ok(pem) => {
                use base64::Engine as _;
                json!({"status": {"certificate": base64::engine::general_purpose::STANDARD.encode(pem)}})
            }
            Err(e) => {
                tracing::warn!(csr = %name, error = %e, "signing failed");
                let mut conditions = csr
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default();
                conditions.push(
                    k8s_openapi::api::certificates::v1::CertificateSigningRequestCondition {
                        type_: "Failed".into(),
                        status: "True".into(),
                        reason: Some("SignerValidationFailure".into()),
                        message: Some(e.to_string()),
                        ..Default::default()
                    },
                );
                json!({"status": {"conditions": conditions}})
            }
        };
        if let Err(e) = self
            .api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            tracing::warn!(csr = %name, error = %e, "writing the certificate");
        } else {
            tracing::info!(csr = %name, "signed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{ByteString, api::certificates::v1::CertificateSigningRequestSpec};

    fn request(cn: &str, orgs: &[&str]) -> (String, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        for o in orgs {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, *o);
        }
        let pem = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        (pem, key)
    }

    fn csr(pem: &str, groups: &[&str]) -> CertificateSigningRequest {
        CertificateSigningRequest {
            spec: CertificateSigningRequestSpec {
                request: ByteString(pem.as_bytes().to_vec()),
                signer_name: KUBELET_CLIENT_SIGNER.into(),
                groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
                usages: Some(vec!["digital signature".into(), "client auth".into()]),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_node_requests_from_bootstrap_tokens_are_approved() {
        let (pem, _) = request("system:node:n1", &["system:nodes"]);
        let ok = csr(&pem, &["system:bootstrappers", "system:authenticated"]);
        assert_eq!(auto_approvable(&ok).expect("approvable"), "n1");
        let admin = csr(&pem, &["system:masters"]);
        assert!(auto_approvable(&admin).is_err());
        let (pem, _) = request("system:node:n1", &["system:masters"]);
        assert!(auto_approvable(&csr(&pem, &["system:bootstrappers"])).is_err());
        let (pem, _) = request("kubernetes-admin", &["system:nodes"]);
        assert!(auto_approvable(&csr(&pem, &["system:bootstrappers"])).is_err());
        let mut other = ok.clone();
        other.spec.signer_name = CLIENT_SIGNER.into();
        assert!(auto_approvable(&other).is_err());
        let mut server = ok;
        server.spec.usages = Some(vec!["server auth".into()]);
        assert!(auto_approvable(&server).is_err());
    }

    #[test]
    fn signed_certificates_carry_the_node_identity_and_the_requesters_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test-ca");
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).expect("write");
        std::fs::write(dir.path().join("ca.key"), ca_key.serialize_pem()).expect("write");
        let signer = Signer::load(dir.path()).expect("load");

        let (pem, key) = request("system:node:n1", &["system:nodes"]);
        let cert_pem = signer
            .sign(&csr(&pem, &["system:bootstrappers"]))
            .expect("signed");
        let (_, block) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("pem");
        let cert = block.parse_x509().expect("x509");
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .collect();
        assert_eq!(cn, ["system:node:n1"]);
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert!(
            cert.verify_signature(None).is_err(),
            "signed by the CA, not self-signed"
        );
    }
}
