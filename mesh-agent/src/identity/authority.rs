//! The signing core of the mesh CA: loads the CA certificate and key (bring
//! your own root or intermediate, from files or a mounted Kubernetes
//! Secret), checks CSRs, and issues short-lived SPIFFE leaves. Shared by the
//! gRPC CA server and the single-node local provider.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use super::SpiffeId;

/// File names inside the CA directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// Present when `ca.crt` is an intermediate: the root it chains to.
pub const ROOT_CERT: &str = "root.crt";

pub const MIN_TTL: Duration = Duration::from_secs(60);
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Leaves are valid from a little before issuance: node clocks drift.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("cannot read {path}: {err} (give the CA directory with --dir; create one with `mesh-agent ca init`)")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path} does not hold a usable PEM {what}: {err}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        err: String,
    },
    #[error("{0} already exists: refusing to overwrite a CA (remove it first if you mean it)")]
    Exists(PathBuf),
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("generating the CA failed: {0}")]
    Generate(rcgen::Error),
}

/// Why a CSR was refused; each maps to INVALID_ARGUMENT with this text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not a PKCS#10 request in DER ({0})")]
    Malformed(String),
    #[error("the CSR signature does not verify: its key does not match the request")]
    Signature,
    #[error("the CSR must carry exactly one SAN, the URI {expected}; it carries {found}")]
    San { expected: String, found: String },
    #[error("the CSR asks to be a CA")]
    WantsCa,
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A signed leaf, with what the requester needs to use and verify it.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub root: CertificateDer<'static>,
    pub not_after: SystemTime,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
}

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// `ca.crt` when it is an intermediate (sent with every leaf), else empty.
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
}

fn read(path: &Path) -> Result<String, AuthorityError> {
    std::fs::read_to_string(path).map_err(|err| AuthorityError::Read { path: path.into(), err })
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let text = read(path)?;
    let parse_err = |err: String| AuthorityError::Parse {
        path: path.into(),
        what: "certificate",
        err,
    };
    let blocks = pem::parse_many(text.as_bytes()).map_err(|e| parse_err(e.to_string()))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(parse_err("no CERTIFICATE block".into()));
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c).map_err(|e| parse_err(e.to_string()))?;
    }
    Ok(certs)
}

impl Authority {
    /// Loads `ca.crt` + `ca.key` (and `root.crt` when `ca.crt` is an
    /// intermediate) from `dir`.
    pub fn load(dir: &Path) -> Result<Self, AuthorityError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let certs = pem_certs(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| AuthorityError::Parse {
            path: key_path.clone(),
            what: "private key",
            err: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&certs[0], key).map_err(|e| AuthorityError::Parse {
            path: cert_path.clone(),
            what: "CA certificate",
            err: e.to_string(),
        })?;
        let root_path = dir.join(ROOT_CERT);
        let (intermediates, root) = if root_path.exists() {
            let root = pem_certs(&root_path)?.remove(0);
            (certs, root)
        } else {
            (Vec::new(), certs[0].clone())
        };
        Ok(Authority {
            issuer,
            intermediates,
            root,
        })
    }

    /// Creates a new self-signed root in `dir` (key mode 0600). Never
    /// overwrites an existing CA.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<PathBuf, AuthorityError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(AuthorityError::Exists(p.clone()));
            }
        }
        std::fs::create_dir_all(dir).map_err(|err| AuthorityError::Write { path: dir.into(), err })?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mesh");
        dn.push(DnType::CommonName, format!("mesh root CA ({trust_domain})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(AuthorityError::Generate)?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, cert.pem()).map_err(|err| AuthorityError::Write {
            path: cert_path.clone(),
            err,
        })?;
        Ok(cert_path)
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Signs a workload leaf for `identity` from a CSR that must carry
    /// exactly that one URI SAN and a valid self-signature.
    pub fn sign(&self, identity: &SpiffeId, csr_der: &[u8], ttl: Duration) -> Result<Issued, CsrError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der)).map_err(
            |e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => CsrError::Signature,
                other => CsrError::Malformed(other.to_string()),
            },
        )?;
        let expected = identity.uri();
        let sans: Vec<String> = csr.params.subject_alt_names.iter().map(describe_san).collect();
        let only_uri = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri.as_str() == expected,
            _ => false,
        };
        if !only_uri {
            return Err(CsrError::San {
                expected,
                found: if sans.is_empty() {
                    "none".into()
                } else {
                    sans.join(", ")
                },
            });
        }
        if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(CsrError::WantsCa);
        }
        // Our own parameters, not the CSR's: only the key and the SAN come from it.
        let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        let now = SystemTime::now();
        let not_after = now + ttl;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let serial = random_serial();
        let serial_hex = hex(serial.as_ref());
        params.serial_number = Some(serial);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(Issued {
            chain,
            root: self.root.clone(),
            not_after,
            serial: serial_hex,
        })
    }

    /// A TLS server certificate for the CA's own gRPC endpoint.
    pub fn server_certificate(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair), rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(30);
        params.serial_number = Some(random_serial());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok((chain, key))
    }
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI {}", u.as_str()),
        SanType::DnsName(d) => format!("DNS {}", d.as_str()),
        SanType::IpAddress(ip) => format!("IP {ip}"),
        SanType::Rfc822Name(e) => format!("email {}", e.as_str()),
        _ => "another name type".into(),
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive, as RFC 5280 requires
    bytes[0] |= 0x01; // and without a leading zero byte
    SerialNumber::from_slice(&bytes)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AuthorityError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| AuthorityError::Write { path: path.into(), err })?;
    f.write_all(bytes)
        .map_err(|err| AuthorityError::Write { path: path.into(), err })
}

/// A CSR for `identity` signed by `key`: exactly one URI SAN, nothing else.
pub fn csr_for(identity: &SpiffeId, key: &KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
    Ok(params.serialize_request(key)?.der().to_vec())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A fresh root in a temp dir, removed on drop.
    pub struct TempCa {
        pub dir: PathBuf,
        pub authority: Authority,
    }
    impl TempCa {
        pub fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("mesh-ca-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Authority::init(&dir, "cluster.local").unwrap();
            let authority = Authority::load(&dir).unwrap();
            TempCa { dir, authority }
        }
    }
    impl Drop for TempCa {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    pub fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "demo", sa).unwrap()
    }

    fn key() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn issues_a_leaf_with_exactly_the_requested_identity() {
        let ca = TempCa::new("issue");
        let issued = ca
            .authority
            .sign(
                &id("web"),
                &csr_for(&id("web"), &key()).unwrap(),
                Duration::from_secs(120),
            )
            .unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 1);
        assert!(format!("{:?}", san.general_names[0]).contains("spiffe://cluster.local/ns/demo/sa/web"));
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(life, 120 + 60, "ttl plus the backdating");
        assert!(!leaf.is_ca());
        assert_eq!(hex(leaf.raw_serial()), issued.serial);
    }

    #[test]
    fn refuses_mismatched_garbage_and_ca_requests() {
        let ca = TempCa::new("refuse");
        let k = key();
        // SAN for another identity.
        let err = ca
            .authority
            .sign(&id("web"), &csr_for(&id("db"), &k).unwrap(), MIN_TTL)
            .unwrap_err();
        assert!(matches!(err, CsrError::San { .. }), "{err}");
        assert!(err.to_string().contains("sa/db"));
        // Garbage bytes.
        assert!(matches!(
            ca.authority.sign(&id("web"), b"garbage", MIN_TTL),
            Err(CsrError::Malformed(_))
        ));
        // A CSR whose signature was made by another key (tampered body).
        let mut csr = csr_for(&id("web"), &k).unwrap();
        let n = csr.len();
        csr[n - 5] ^= 0x55;
        let err = ca.authority.sign(&id("web"), &csr, MIN_TTL).unwrap_err();
        assert!(matches!(err, CsrError::Signature | CsrError::Malformed(_)), "{err}");
        // Extra DNS SAN.
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(id("web").uri().try_into().unwrap()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ];
        let csr = params.serialize_request(&k).unwrap().der().to_vec();
        assert!(matches!(
            ca.authority.sign(&id("web"), &csr, MIN_TTL),
            Err(CsrError::San { .. })
        ));
    }

    #[test]
    fn init_never_overwrites_and_load_explains_missing_files() {
        let ca = TempCa::new("init");
        assert!(matches!(
            Authority::init(&ca.dir, "cluster.local"),
            Err(AuthorityError::Exists(_))
        ));
        let err = Authority::load(Path::new("/nonexistent-ca")).err().unwrap().to_string();
        assert!(err.contains("ca init"), "{err}");
        std::fs::write(ca.dir.join(CA_CERT), "not a certificate").unwrap();
        let err = Authority::load(&ca.dir).err().unwrap().to_string();
        assert!(err.contains("certificate"), "{err}");
    }
}
