//! rustls verifiers for mesh peers: the chain must verify against the mesh
//! root (webpki), and the leaf must carry exactly one URI SAN, a SPIFFE ID in
//! our trust domain. The client side also demands the exact identity it
//! expects: "signed by the CA" alone is never enough.
use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use super::SpiffeId;

/// The roots a node trusts and the trust domain it accepts.
#[derive(Debug)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

#[derive(thiserror::Error)]
pub enum PeerError {
    #[error("peer presented {found} but {expected} was expected")]
    WrongIdentity { found: SpiffeId, expected: SpiffeId },
    #[error("peer certificate has no usable SPIFFE ID: {0}")]
    NoIdentity(String),
}

// rustls prints wrapped errors with Debug; make that the operator-readable text.
impl std::fmt::Debug for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl TrustBundle {
    pub fn new(roots: &[CertificateDer<'_>], trust_domain: &str) -> Result<Self, webpki::Error> {
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle {
            anchors,
            trust_domain: trust_domain.into(),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    /// Verifies the chain for `usage` and returns the leaf's SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        spiffe_id_of(end_entity, &self.trust_domain)
            .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let ce = match e {
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// The leaf's single URI SAN as a SPIFFE ID in `trust_domain`.
#[allow(clippy::result_large_err)] // once per handshake; boxing buys nothing
pub fn spiffe_id_of(cert: &CertificateDer<'_>, trust_domain: &str) -> Result<SpiffeId, PeerError> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|e| PeerError::NoIdentity(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| PeerError::NoIdentity(e.to_string()))?
        .ok_or_else(|| PeerError::NoIdentity("no subjectAltName".into()))?;
    match san.value.general_names.as_slice() {
        [GeneralName::URI(uri)] => {
            SpiffeId::parse_in(uri, trust_domain).map_err(|e| PeerError::NoIdentity(e.to_string()))
        }
        other => Err(PeerError::NoIdentity(format!(
            "expected exactly one URI SAN, found {}",
            other.len()
        ))),
    }
}

/// The signature methods both verifier traits share: TLS 1.3 only, checked
/// with the bundle's algorithms.
macro_rules! tls13_only_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.bundle.tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.bundle.algorithms.supported_schemes()
        }
    };
}

/// For the dialling side: the server must present exactly `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: Arc<TrustBundle>, expected: SpiffeId) -> Self {
        SpiffeServerVerifier { bundle, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = self
            .bundle
            .verify(end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        if found != self.expected {
            let e = PeerError::WrongIdentity {
                found,
                expected: self.expected.clone(),
            };
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(e),
            ))));
        }
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// For the accepting side: any SPIFFE ID of our trust domain signed by our
/// root; which one may do what is the policy's call, with `spiffe_id_of`.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: Arc<TrustBundle>) -> Self {
        SpiffeClientVerifier { bundle }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .verify(end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_only_signatures!();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::authority::{
        csr_for,
        tests::{TempCa, id},
    };

    fn leaf(ca: &TempCa, sa: &str) -> Vec<CertificateDer<'static>> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        ca.authority
            .sign(&id(sa), &csr_for(&id(sa), &key).unwrap(), Duration::from_secs(600))
            .unwrap()
            .chain
    }

    fn verifier(ca: &TempCa, expected: &str) -> SpiffeServerVerifier {
        let bundle = Arc::new(TrustBundle::new(&[ca.authority.root().clone()], "cluster.local").unwrap());
        SpiffeServerVerifier::new(bundle, id(expected))
    }

    fn check(v: &SpiffeServerVerifier, chain: &[CertificateDer<'static>]) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("mesh").unwrap();
        v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn leaves_verify_against_their_root_with_the_exact_identity() {
        let ca = TempCa::new("verify-ok");
        let chain = leaf(&ca, "web");
        check(&verifier(&ca, "web"), &chain).unwrap();
        assert_eq!(spiffe_id_of(&chain[0], "cluster.local").unwrap(), id("web"));
    }

    #[test]
    fn a_valid_leaf_for_another_identity_is_refused_by_name() {
        let ca = TempCa::new("verify-wrong");
        let err = check(&verifier(&ca, "db"), &leaf(&ca, "web")).unwrap_err().to_string();
        assert!(err.contains("sa/web") && err.contains("sa/db"), "{err}");
    }

    #[test]
    fn a_leaf_from_a_foreign_root_is_refused() {
        let ours = TempCa::new("verify-ours");
        let foreign = TempCa::new("verify-foreign");
        let err = check(&verifier(&ours, "web"), &leaf(&foreign, "web")).unwrap_err();
        // Same issuer name, other key: webpki reports a bad signature; a
        // differently named root would be an unknown issuer. Both refuse.
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)
            ),
            "{err:?}"
        );
    }

    #[test]
    fn another_trust_domain_is_refused() {
        let ca = TempCa::new("verify-td");
        let bundle = Arc::new(TrustBundle::new(&[ca.authority.root().clone()], "other.org").unwrap());
        let v = SpiffeServerVerifier::new(bundle, SpiffeId::new("other.org", "demo", "web").unwrap());
        let err = check(&v, &leaf(&ca, "web")).unwrap_err().to_string();
        assert!(err.contains("trust domain"), "{err}");
    }
}
