//! rustls configurations for tunnels between agents, built from the
//! identity manager's in-memory certificates.
//!
//! The dialling agent presents the *source* workload's certificate and
//! demands the *destination* workload's identity from the peer; it names
//! that identity in SNI (hashed: SPIFFE IDs are not DNS names), and the
//! accepting agent serves the matching certificate. TLS 1.3 only; no
//! session resumption, so every connection proves both identities afresh.
//!
//! Crypto: aws-lc-rs (ztunnel's choice, and ahead of ring in rustls's own
//! benchmarks), with the post-quantum hybrid X25519MLKEM768 preferred by
//! default; X25519 stays offered, so agents with it off still agree.
use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use sha2::{Digest as _, Sha256};

use crate::identity::{
    SpiffeId,
    manager::{CurrentCert, IdentityManager, IdentityManagerHandle},
    verify::{SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle},
};

pub const ALPN_QUIC: &[u8] = b"mesh-tunnel/1";
pub const ALPN_H2: &[u8] = b"h2";

/// The SNI that asks the peer for `id`'s certificate.
pub fn sni_for(id: &SpiffeId) -> String {
    let digest = Sha256::digest(id.uri().as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.mesh.invalid")
}

/// The tunnels' crypto provider: key exchange groups in preference order.
pub fn provider(post_quantum: bool) -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, kx_group};
    let mut p = aws_lc_rs::default_provider();
    p.kx_groups = if post_quantum {
        vec![kx_group::X25519MLKEM768, kx_group::X25519, kx_group::SECP256R1]
    } else {
        vec![kx_group::X25519, kx_group::SECP256R1]
    };
    Arc::new(p)
}

#[derive(Clone)]
pub struct TunnelTls {
    pub manager: Arc<IdentityManager>,
    pub bundle: Arc<TrustBundle>,
    /// Prefer X25519MLKEM768 (`--post-quantum`).
    pub post_quantum: bool,
}

impl TunnelTls {
    pub fn client_config(&self, src: &SpiffeId, dst: &SpiffeId, alpn: &[u8]) -> ClientConfig {
        let mut cfg = ClientConfig::builder_with_provider(provider(self.post_quantum))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(self.bundle.clone(), dst.clone())))
            .with_client_cert_resolver(Arc::new(CurrentCert {
                manager: Arc::new(IdentityManagerHandle(self.manager.clone())),
                identity: src.clone(),
            }));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        cfg.enable_early_data = false;
        cfg
    }

    pub fn server_config(&self, alpn: &[u8]) -> ServerConfig {
        let mut cfg = ServerConfig::builder_with_provider(provider(self.post_quantum))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(self.bundle.clone())))
            .with_cert_resolver(Arc::new(SniResolver {
                manager: self.manager.clone(),
            }));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        cfg.send_tls13_tickets = 0;
        cfg
    }
}

/// Serves the certificate of the local identity the client asked for.
struct SniResolver {
    manager: Arc<IdentityManager>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        let found = self
            .manager
            .identities()
            .into_iter()
            .find(|c| sni_for(&c.identity) == sni);
        match found {
            Some(cert) if cert.not_after > std::time::SystemTime::now() => Some(cert.certified_key.clone()),
            _ => {
                tracing::warn!(sni, "tunnel: a peer asked for an identity this node does not hold");
                None
            }
        }
    }
}

/// The SPIFFE ID in a verified peer chain.
pub fn peer_identity(
    certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    trust_domain: &str,
) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    crate::identity::verify::spiffe_id_of(leaf, trust_domain).ok()
}
