//! The agent's identity manager: one ECDSA P-256 key and leaf per workload
//! identity on this node, held in memory only (never written to disk),
//! refreshed at half-life with jitter, with exponential backoff while the
//! provider is unreachable. A certificate keeps serving until it expires,
//! whatever the CA is doing.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rcgen::KeyPair;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{sync::watch, task::JoinHandle};

use super::{SpiffeId, authority::csr_for, provider::CertificateProvider};

/// A workload's current certificate and key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: SpiffeId,
    pub certified_key: Arc<CertifiedKey>,
    pub root: CertificateDer<'static>,
    pub not_after: SystemTime,
    pub serial: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Default)]
pub struct IdentityMetrics {
    pub expiry_seconds: Family<IdentityLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub issued: Family<IdentityLabels, Counter>,
    pub failures: Family<IdentityLabels, Counter>,
}

impl IdentityMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_certificate_expiry_seconds",
            "Seconds until the workload certificate expires (negative: expired)",
            self.expiry_seconds.clone(),
        );
        registry.register(
            "mesh_certificates_issued",
            "Workload certificates obtained",
            self.issued.clone(),
        );
        registry.register(
            "mesh_certificate_issue_failures",
            "Failed attempts to obtain a workload certificate",
            self.failures.clone(),
        );
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ttl: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Timing {
    pub fn for_ttl(ttl: Duration) -> Self {
        // Retries stay well inside the certificate's second half-life.
        Timing {
            ttl,
            backoff_min: Duration::from_millis(500),
            backoff_max: (ttl / 10).clamp(Duration::from_secs(2), Duration::from_secs(30)),
        }
    }
}

pub struct IdentityManager {
    provider: Arc<dyn CertificateProvider>,
    timing: Timing,
    certs: RwLock<BTreeMap<SpiffeId, Arc<WorkloadCert>>>,
    pub metrics: IdentityMetrics,
    /// The node's audit trail: each issuance and failure is one record.
    audit: std::sync::OnceLock<Arc<crate::audit::Audit>>,
}

impl IdentityManager {
    pub fn new(provider: Arc<dyn CertificateProvider>, timing: Timing) -> Arc<Self> {
        Arc::new(IdentityManager {
            provider,
            timing,
            certs: RwLock::default(),
            metrics: IdentityMetrics::default(),
            audit: std::sync::OnceLock::new(),
        })
    }

    /// Records every issuance and failure in `audit` (set before `run`).
    pub fn set_audit(&self, audit: Arc<crate::audit::Audit>) {
        let _ = self.audit.set(audit);
    }

    fn audit(&self, id: &SpiffeId, verdict: &str, reason: String) {
        if let Some(audit) = self.audit.get() {
            audit.record(crate::audit::AuditRecord {
                kind: "certificate".into(),
                enforced_at: "ca".into(),
                verdict: verdict.into(),
                source_identity: id.uri(),
                rule: self.provider.describe(),
                reason,
                ..Default::default()
            });
        }
    }

    /// The current certificate of `id`, if it has one that has not expired.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let cert = self.certs.read().expect("certs lock").get(id).cloned()?;
        (cert.not_after > SystemTime::now()).then_some(cert)
    }

    /// Like `current`, but waits up to `limit` for a first certificate: a
    /// flow that arrives while the agent is starting waits, it is not refused.
    pub async fn wait_current(&self, id: &SpiffeId, limit: Duration) -> Option<Arc<WorkloadCert>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(c) = self.current(id) {
                return Some(c);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn identities(&self) -> Vec<Arc<WorkloadCert>> {
        self.certs.read().expect("certs lock").values().cloned().collect()
    }

    /// Keeps a certificate for every identity in `wanted`, until the
    /// channel closes. Identities that leave the set are dropped.
    pub async fn run(self: Arc<Self>, mut wanted: watch::Receiver<BTreeSet<SpiffeId>>) {
        let mut tasks: BTreeMap<SpiffeId, JoinHandle<()>> = BTreeMap::new();
        let gauges = tokio::spawn(self.clone().update_expiry_gauges());
        loop {
            let want = wanted.borrow_and_update().clone();
            tasks.retain(|id, task| {
                let keep = want.contains(id);
                if !keep {
                    task.abort();
                    self.certs.write().expect("certs lock").remove(id);
                    self.metrics
                        .expiry_seconds
                        .remove(&IdentityLabels { identity: id.uri() });
                    tracing::info!(identity = %id, "identity no longer on this node; certificate dropped");
                }
                keep
            });
            for id in want {
                tasks
                    .entry(id.clone())
                    .or_insert_with(|| tokio::spawn(self.clone().keep_fresh(id)));
            }
            if wanted.changed().await.is_err() {
                break;
            }
        }
        for (_, t) in tasks {
            t.abort();
        }
        gauges.abort();
    }

    async fn keep_fresh(self: Arc<Self>, id: SpiffeId) {
        let labels = IdentityLabels { identity: id.uri() };
        let mut backoff = self.timing.backoff_min;
        loop {
            match self.fetch(&id).await {
                Ok(cert) => {
                    backoff = self.timing.backoff_min;
                    let now = SystemTime::now();
                    let life = cert.not_after.duration_since(now).unwrap_or_default();
                    // Half-life, minus up to 10% jitter so a node's identities
                    // (and the nodes of a cluster) do not renew in lockstep.
                    let jitter = life.mul_f64(rand::random::<f64>() * 0.1);
                    let refresh_in = (life / 2).saturating_sub(jitter);
                    tracing::info!(identity = %id, serial = %cert.serial, expires_in_s = life.as_secs(), refresh_in_s = refresh_in.as_secs(), provider = %self.provider.describe(), "certificate issued");
                    self.metrics.issued.get_or_create(&labels).inc();
                    self.audit(
                        &id,
                        "allow",
                        format!(
                            "certificate issued, serial {}, expires in {} s",
                            cert.serial,
                            life.as_secs()
                        ),
                    );
                    self.certs
                        .write()
                        .expect("certs lock")
                        .insert(id.clone(), Arc::new(cert));
                    tokio::time::sleep(refresh_in).await;
                }
                Err(err) => {
                    self.metrics.failures.get_or_create(&labels).inc();
                    self.audit(&id, "failed", format!("certificate request failed: {err}"));
                    let still_valid = self.current(&id).is_some();
                    tracing::warn!(identity = %id, error = %err, retry_in_ms = backoff.as_millis() as u64, serving_existing = still_valid, "certificate refresh failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.timing.backoff_max);
                }
            }
        }
    }

    async fn fetch(&self, id: &SpiffeId) -> Result<WorkloadCert, String> {
        // A fresh key per certificate: a leaked key dies with its leaf.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let csr = csr_for(id, &key).map_err(|e| e.to_string())?;
        let issued = self
            .provider
            .issue(id, csr, self.timing.ttl)
            .await
            .map_err(|e| e.to_string())?;
        let found = super::verify::spiffe_id_of(&issued.chain[0], &id.trust_domain).map_err(|e| e.to_string())?;
        if &found != id {
            return Err(format!("provider returned a certificate for {found}, not {id}"));
        }
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| e.to_string())?;
        Ok(WorkloadCert {
            identity: id.clone(),
            certified_key: Arc::new(CertifiedKey::new(issued.chain, signing_key)),
            root: issued.root,
            not_after: issued.not_after,
            serial: issued.serial,
        })
    }

    async fn update_expiry_gauges(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = SystemTime::now();
            for cert in self.identities() {
                let secs = match cert.not_after.duration_since(now) {
                    Ok(d) => d.as_secs_f64(),
                    Err(e) => -e.duration().as_secs_f64(),
                };
                self.metrics
                    .expiry_seconds
                    .get_or_create(&IdentityLabels {
                        identity: cert.identity.uri(),
                    })
                    .set(secs);
            }
        }
    }
}

/// Serves whichever certificate is current for one identity: a rotation
/// applies to new handshakes, established connections are untouched.
#[derive(Debug)]
pub struct CurrentCert {
    pub manager: Arc<IdentityManagerHandle>,
    pub identity: SpiffeId,
}

/// `Debug` wrapper, since rustls resolvers must be `Debug`.
pub struct IdentityManagerHandle(pub Arc<IdentityManager>);
impl std::fmt::Debug for IdentityManagerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityManager")
    }
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.manager.0.current(&self.identity).map(|c| c.certified_key.clone())
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.manager.0.current(&self.identity).map(|c| c.certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        self.manager.0.current(&self.identity).is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::identity::{
        authority::tests::{TempCa, id},
        provider::{LocalCa, ProviderError},
        verify::{SpiffeServerVerifier, TrustBundle},
    };

    /// A provider that can be switched off, like a CA that goes away.
    struct Flaky {
        inner: LocalCa,
        up: std::sync::atomic::AtomicBool,
    }

    #[tonic::async_trait]
    impl CertificateProvider for Flaky {
        async fn issue(
            &self,
            i: &SpiffeId,
            csr: Vec<u8>,
            ttl: Duration,
        ) -> Result<super::super::authority::Issued, ProviderError> {
            if !self.up.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(ProviderError::Unavailable {
                    addr: "test".into(),
                    detail: "down".into(),
                });
            }
            self.inner.issue(i, csr, ttl).await
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Issue test 2: with a 60 s TTL the serial changes before expiry, and a
    /// TLS connection opened before the rotation keeps working after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_at_half_life_keeps_established_tls_connections() {
        let ca = TempCa::new("rotate");
        let root = ca.authority.root().clone();
        let authority = Arc::new(super::super::authority::Authority::load(&ca.dir).unwrap());
        let mgr = IdentityManager::new(
            Arc::new(LocalCa::new(authority)),
            Timing::for_ttl(Duration::from_secs(60)),
        );
        let (tx, rx) = watch::channel(BTreeSet::from([id("web")]));
        tokio::spawn(mgr.clone().run(rx));
        wait_until("first certificate", Duration::from_secs(10), || {
            mgr.current(&id("web")).is_some()
        })
        .await;
        let first = mgr.current(&id("web")).unwrap();

        // A TLS 1.3 echo server presenting whatever certificate is current.
        let resolver = Arc::new(CurrentCert {
            manager: Arc::new(IdentityManagerHandle(mgr.clone())),
            identity: id("web"),
        });
        let server_cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(resolver),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
                tokio::spawn(async move {
                    let mut tls = acceptor.accept(tcp).await.unwrap();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let bundle = Arc::new(TrustBundle::new(&[root], "cluster.local").unwrap());
        let mut client_cfg =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundle, id("web"))))
                .with_no_client_auth();
        // Full handshakes only, so each connection shows the certificate it got.
        client_cfg.resumption = rustls::client::Resumption::disabled();
        let client_cfg = Arc::new(client_cfg);
        let connect = || async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("web").unwrap();
            tokio_rustls::TlsConnector::from(client_cfg.clone())
                .connect(name, tcp)
                .await
                .unwrap()
        };
        let presented_serial = |c: &tokio_rustls::client::TlsStream<TcpStream>| {
            let leaf = &c.get_ref().1.peer_certificates().unwrap()[0];
            crate::identity::authority::hex(x509_parser::parse_x509_certificate(leaf).unwrap().1.raw_serial())
        };
        let mut old = connect().await;
        assert_eq!(presented_serial(&old), first.serial);
        echo(&mut old, b"before rotation").await;

        // Half-life of 60 s is 30 s, minus up to 10% jitter.
        wait_until("rotation", Duration::from_secs(40), || {
            mgr.current(&id("web")).unwrap().serial != first.serial
        })
        .await;
        let second = mgr.current(&id("web")).unwrap();
        assert!(SystemTime::now() < first.not_after, "rotated only after expiry");
        echo(&mut old, b"after rotation, same connection").await;
        let new = connect().await;
        assert_eq!(
            presented_serial(&new),
            second.serial,
            "new handshakes use the new certificate"
        );
        drop(tx);
    }

    async fn echo(c: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
        c.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }

    /// Issue test 3, in process: the provider goes away, the manager keeps
    /// its certificate, counts failures, and recovers when it returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_ca_is_survived_counted_and_recovered_from() {
        let ca = TempCa::new("flaky");
        let authority = Arc::new(super::super::authority::Authority::load(&ca.dir).unwrap());
        let flaky = Arc::new(Flaky {
            inner: LocalCa::new(authority),
            up: true.into(),
        });
        let mut timing = Timing::for_ttl(Duration::from_secs(60));
        timing.backoff_max = Duration::from_millis(500);
        let mgr = IdentityManager::new(flaky.clone(), timing);
        let (_tx, rx) = watch::channel(BTreeSet::from([id("db")]));
        flaky.up.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(mgr.clone().run(rx));
        let labels = IdentityLabels {
            identity: id("db").uri(),
        };
        wait_until("failures counted", Duration::from_secs(5), || {
            mgr.metrics.failures.get_or_create(&labels).get() >= 2
        })
        .await;
        assert!(mgr.current(&id("db")).is_none());
        flaky.up.store(true, std::sync::atomic::Ordering::SeqCst);
        wait_until("recovery", Duration::from_secs(5), || mgr.current(&id("db")).is_some()).await;
        assert_eq!(mgr.metrics.issued.get_or_create(&labels).get(), 1);
    }
}
