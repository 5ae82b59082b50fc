//! `mesh-agent ca serve`: the mesh CA's gRPC API on 15012, TLS 1.3 only.
//!
//! Every request is authenticated as a node (a bearer credential: in
//! Kubernetes a ServiceAccount token for TokenReview, in the lab a per-node
//! bootstrap token listed in the credentials file) and authorized against
//! the workloads scheduled on that node. Every decision is one audit line.
use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use super::{
    SpiffeId,
    authority::Authority,
    node_auth::NodeAuthenticator,
    proto::{
        CreateCertificateRequest, CreateCertificateResponse,
        certificate_authority_server::{CertificateAuthority, CertificateAuthorityServer},
    },
    provider::CA_SERVER_NAME,
};
use crate::state::SnapshotRx;

pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct CaService {
    authority: Arc<Authority>,
    nodes: Arc<dyn NodeAuthenticator>,
    snapshots: SnapshotRx,
    trust_domain: String,
}

impl CaService {
    pub fn new(
        authority: Arc<Authority>,
        nodes: Arc<dyn NodeAuthenticator>,
        snapshots: SnapshotRx,
        trust_domain: String,
    ) -> Self {
        CaService {
            authority,
            nodes,
            snapshots,
            trust_domain,
        }
    }

    fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<String, Status> {
        metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(String::from)
            .ok_or_else(|| Status::unauthenticated("missing node credential: send `authorization: Bearer <token>`"))
    }

    /// Nodes that run a workload with this identity.
    fn nodes_running(&self, id: &SpiffeId) -> BTreeSet<String> {
        let snap = self.snapshots.borrow().clone();
        snap.pods
            .values()
            .filter(|p| p.identity() == id.identity())
            .map(|p| p.node.clone())
            .collect()
    }

    async fn decide(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<(String, SpiffeId, CreateCertificateResponse, String), (Option<String>, Status)> {
        let token = Self::bearer(request.metadata()).map_err(|s| (None, s))?;
        let node = self.nodes.node_of(&token).await.map_err(|s| (None, s))?;
        let req = request.into_inner();
        let deny = |s: Status| (Some(node.clone()), s);
        let id = SpiffeId::parse_in(&req.identity, &self.trust_domain)
            .map_err(|e| deny(Status::invalid_argument(e.to_string())))?;
        let nodes = self.nodes_running(&id);
        if !nodes.contains(&node) {
            let where_ = if nodes.is_empty() {
                "no node".to_string()
            } else {
                nodes.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            return Err(deny(Status::permission_denied(format!(
                "node {node} may only obtain identities of workloads scheduled on it; {id} runs on {where_}"
            ))));
        }
        let ttl = if req.ttl_seconds == 0 {
            DEFAULT_TTL
        } else {
            Duration::from_secs(req.ttl_seconds)
        };
        let issued = self
            .authority
            .sign(&id, &req.csr_der, ttl)
            .map_err(|e| deny(Status::invalid_argument(e.to_string())))?;
        let serial = issued.serial.clone();
        let resp = CreateCertificateResponse {
            cert_chain_der: issued.chain.into_iter().map(|c| c.to_vec()).collect(),
            root_der: issued.root.to_vec(),
        };
        Ok((node, id, resp, serial))
    }
}

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let identity = request.get_ref().identity.clone();
        match self.decide(request).await {
            Ok((node, id, resp, serial)) => {
                tracing::info!(target: "audit", kind = "ca_issue", verdict = "allow", node = %node, identity = %id, serial = %serial, peer = %peer, "certificate issued");
                Ok(Response::new(resp))
            }
            Err((node, status)) => {
                tracing::warn!(target: "audit", kind = "ca_issue", verdict = "deny", node = node.as_deref().unwrap_or(""), identity = %identity, code = ?status.code(), reason = %status.message(), peer = %peer, "certificate refused");
                Err(status)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {err} (is the port free and the address on this host?)")]
    Bind { addr: SocketAddr, err: std::io::Error },
    #[error("cannot make the CA's serving certificate: {0}")]
    Cert(String),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves the CA until the future is dropped.
pub async fn serve(service: CaService, listen: SocketAddr) -> Result<(), ServeError> {
    let (chain, key) = service
        .authority
        .server_certificate(&[CA_SERVER_NAME.to_string()], &[listen.ip()])
        .map_err(|e| ServeError::Cert(e.to_string()))?;
    let key =
        rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| ServeError::Cert(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServeError::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| ServeError::Cert(e.to_string()))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|err| ServeError::Bind { addr: listen, err })?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Handshakes run in their own tasks with a deadline: a client that sends
    // garbage or stalls mid-handshake never holds up anyone else.
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(peer = %peer, error = %e, "CA: TLS handshake failed"),
                    Err(_) => tracing::warn!(peer = %peer, "CA: TLS handshake timed out"),
                }
            });
        }
    });
    tracing::info!(listen = %listen, "mesh CA serving");
    tonic::transport::Server::builder()
        .add_service(CertificateAuthorityServer::new(service))
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    Ok(())
}
