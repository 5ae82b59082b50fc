//! Where certificates come from. Callers (the identity manager) only see
//! [`CertificateProvider`]; the mesh CA over gRPC and a local file CA are
//! the two here, and an external issuer (cert-manager, Vault) is one more
//! implementation of the same trait.
use std::{path::PathBuf, sync::Arc, time::Duration};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{
    SpiffeId,
    authority::{Authority, Issued},
    proto::{CreateCertificateRequest, certificate_authority_client::CertificateAuthorityClient},
};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("CA at {addr} unreachable: {detail} (is `mesh-agent ca serve` running and reachable from this node?)")]
    Unavailable { addr: String, detail: String },
    #[error("CA refused the request ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("cannot read the node credential {path}: {err} (check --node-token-file)")]
    Credential { path: PathBuf, err: std::io::Error },
    #[error("local CA: {0}")]
    Local(String),
}

#[tonic::async_trait]
pub trait CertificateProvider: Send + Sync {
    /// Signs `csr_der` (whose only SAN is `identity`) for about `ttl`.
    async fn issue(&self, identity: &SpiffeId, csr_der: Vec<u8>, ttl: Duration) -> Result<Issued, ProviderError>;
    /// For logs: which provider answered.
    fn describe(&self) -> String;
}

/// A CA in this process, from files: single-node installs without a CA service.
pub struct LocalCa {
    authority: Arc<Authority>,
}

impl LocalCa {
    pub fn new(authority: Arc<Authority>) -> Self {
        LocalCa { authority }
    }
}

#[tonic::async_trait]
impl CertificateProvider for LocalCa {
    async fn issue(&self, identity: &SpiffeId, csr_der: Vec<u8>, ttl: Duration) -> Result<Issued, ProviderError> {
        self.authority
            .sign(identity, &csr_der, ttl)
            .map_err(|e| ProviderError::Local(e.to_string()))
    }

    fn describe(&self) -> String {
        "local file CA".into()
    }
}

/// The mesh CA over gRPC/TLS, authenticated with this node's credential.
pub struct MeshCaClient {
    addr: String,
    channel: Channel,
    token_file: PathBuf,
}

/// The name the CA's serving certificate carries (and clients check).
pub const CA_SERVER_NAME: &str = "mesh-ca";

impl MeshCaClient {
    pub fn new(addr: &str, root_pem: &[u8], token_file: PathBuf) -> Result<Self, ProviderError> {
        let unavailable = |detail: String| ProviderError::Unavailable {
            addr: addr.into(),
            detail,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name(CA_SERVER_NAME);
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| unavailable(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| unavailable(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            // Connect on first use: an agent must start while the CA is down.
            .connect_lazy();
        Ok(MeshCaClient {
            addr: addr.into(),
            channel,
            token_file,
        })
    }
}

#[tonic::async_trait]
impl CertificateProvider for MeshCaClient {
    async fn issue(&self, identity: &SpiffeId, csr_der: Vec<u8>, ttl: Duration) -> Result<Issued, ProviderError> {
        // Re-read each time: the credential file may be rotated underneath us.
        let token = std::fs::read_to_string(&self.token_file).map_err(|err| ProviderError::Credential {
            path: self.token_file.clone(),
            err,
        })?;
        let mut req = tonic::Request::new(CreateCertificateRequest {
            identity: identity.uri(),
            csr_der,
            ttl_seconds: ttl.as_secs(),
        });
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ProviderError::Credential {
                path: self.token_file.clone(),
                err: std::io::Error::other("not ASCII"),
            })?;
        req.metadata_mut().insert("authorization", bearer);
        let resp = CertificateAuthorityClient::new(self.channel.clone())
            .create_certificate(req)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                    ProviderError::Unavailable {
                        addr: self.addr.clone(),
                        detail: s.message().to_string(),
                    }
                }
                code => ProviderError::Refused {
                    code,
                    message: s.message().to_string(),
                },
            })?;
        let resp = resp.into_inner();
        let chain: Vec<_> = resp
            .cert_chain_der
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect();
        let leaf = chain.first().ok_or_else(|| ProviderError::Refused {
            code: tonic::Code::Internal,
            message: "CA answered with an empty chain".into(),
        })?;
        let (_, x509) = x509_parser::parse_x509_certificate(leaf).map_err(|e| ProviderError::Refused {
            code: tonic::Code::Internal,
            message: format!("CA answered with an unparsable leaf: {e}"),
        })?;
        let not_after =
            std::time::UNIX_EPOCH + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64);
        let serial = super::authority::hex(x509.raw_serial());
        Ok(Issued {
            chain: chain.clone(),
            root: resp.root_der.into(),
            not_after,
            serial,
        })
    }

    fn describe(&self) -> String {
        format!("mesh CA at {}", self.addr)
    }
}
