//! `mesh-agent ca ...`: the mesh CA (init, serve, request).
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::SignalKind;

use crate::{
    config::CaCommand,
    identity::{
        SpiffeId,
        authority::Authority,
        node_auth::{CredentialsFile, NodeAuthenticator, TokenReviewer},
        provider::{CertificateProvider as _, MeshCaClient},
        server::{CaService, serve as serve_ca},
    },
    source, state,
};

pub async fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { dir, trust_domain } => {
            let cert = Authority::init(&dir, &trust_domain)?;
            println!(
                "created a root CA for trust domain {trust_domain}:\n  certificate {}\n  private key {} (mode 0600; keep it secret)\nserve it with: mesh-agent ca serve --dir {} --node-credentials FILE --source-dir DIR",
                cert.display(),
                dir.join(crate::identity::authority::CA_KEY).display(),
                dir.display()
            );
            Ok(())
        }
        CaCommand::Serve {
            dir,
            listen,
            node_credentials,
            token_review_user,
            token_audience,
            source_dir,
            trust_domain,
            ..
        } => {
            let nodes: Arc<dyn NodeAuthenticator> = match node_credentials {
                Some(path) => Arc::new(CredentialsFile { path }),
                None => Arc::new(TokenReviewer {
                    client: kube::Client::try_default()
                        .await
                        .context("connecting to the Kubernetes API for TokenReview (in-cluster or kubeconfig)")?,
                    agent_users: token_review_user,
                    audiences: vec![token_audience],
                }),
            };
            let authority = Arc::new(Authority::load(&dir)?);
            let (tx, rx) = state::channel();
            match source_dir {
                Some(source_dir) => {
                    match source::file::load(&source_dir) {
                        Ok(mut snap) => {
                            snap.generation = 1;
                            tx.publish(snap);
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "source: initial read failed; refusing every request until it reads")
                        }
                    }
                    tokio::spawn(source::file::watch(source_dir, tx));
                }
                None => {
                    let client = kube::Client::try_default().await.context(
                        "connecting to the Kubernetes API (--kubernetes): in-cluster config or a kubeconfig is needed",
                    )?;
                    let source: Box<dyn source::Source> = Box::new(source::KubeSource {
                        client,
                        // The CA reads pods; route status is the agents'.
                        judge_routes: None,
                    });
                    tokio::spawn(source.run(tx));
                }
            }
            let service = CaService::new(authority, nodes, rx, trust_domain);
            let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
            tokio::select! {
                r = serve_ca(service, listen) => r?,
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            Ok(())
        }
        CaCommand::Request {
            ca_addr,
            ca_root,
            node_token_file,
            identity,
            ttl,
        } => {
            let pem = std::fs::read(&ca_root).with_context(|| format!("reading {}", ca_root.display()))?;
            let client = MeshCaClient::new(&ca_addr, &pem, node_token_file)?;
            let id: SpiffeId = identity.parse()?;
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = crate::identity::authority::csr_for(&id, &key)?;
            let issued = client.issue(&id, csr, ttl).await?;
            let not_after = issued
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            println!(
                "{}",
                serde_json::json!({"identity": id.uri(), "serial": issued.serial, "not_after_unix": not_after})
            );
            Ok(())
        }
    }
}
