//! Who is calling the CA: a bearer credential mapped to a node name.
//!
//! Two authenticators behind one trait: a credentials file (the lab's
//! per-node bootstrap tokens, stored as SHA-256 hashes) and Kubernetes
//! TokenReview (the agent's projected ServiceAccount token; the API server
//! says whose it is and, for pod-bound tokens, which node the pod runs on).
use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tonic::Status;

/// The extra field the API server sets on pod-bound ServiceAccount tokens.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

#[tonic::async_trait]
pub trait NodeAuthenticator: Send + Sync {
    /// The node a bearer token speaks for, or UNAUTHENTICATED /
    /// PERMISSION_DENIED / UNAVAILABLE with a reason.
    async fn node_of(&self, token: &str) -> Result<String, Status>;
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFileDoc {
    credentials: Vec<Credential>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Credential {
    node: String,
    /// Hex SHA-256 of the token: the file never holds the token itself.
    token_sha256: String,
    /// Unix seconds after which the credential is refused.
    expires_unix: Option<u64>,
}

/// `credentials: [{node, tokenSha256, expiresUnix}]`, re-read per request
/// (it is small), so rotating or revoking a credential needs no restart.
pub struct CredentialsFile {
    pub path: PathBuf,
}

#[tonic::async_trait]
impl NodeAuthenticator for CredentialsFile {
    async fn node_of(&self, token: &str) -> Result<String, Status> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            tracing::error!(file = %self.path.display(), error = %e, "cannot read node credentials");
            Status::unavailable("the CA cannot read its node credentials; see the CA log")
        })?;
        let doc: CredentialsFileDoc = serde_yaml::from_str(&text).map_err(|e| {
            tracing::error!(file = %self.path.display(), error = %e, "node credentials file is invalid");
            Status::unavailable("the CA's node credentials file is invalid; see the CA log")
        })?;
        let hash = super::authority::hex(&Sha256::digest(token.trim().as_bytes()));
        let cred = doc
            .credentials
            .iter()
            .find(|c| c.token_sha256.eq_ignore_ascii_case(&hash))
            .ok_or_else(|| Status::unauthenticated("unknown node credential"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if let Some(exp) = cred.expires_unix.filter(|exp| now >= *exp) {
            return Err(Status::unauthenticated(format!(
                "node credential for {} expired at unix time {exp}; issue the node a fresh one",
                cred.node
            )));
        }
        Ok(cred.node.clone())
    }
}

/// Kubernetes TokenReview: the token must belong to one of the agent's
/// ServiceAccounts and be bound to a pod, whose node it names.
pub struct TokenReviewer {
    pub client: kube::Client,
    /// e.g. `system:serviceaccount:mesh-system:mesh-agent`
    pub agent_users: Vec<String>,
    pub audiences: Vec<String>,
}

#[tonic::async_trait]
impl NodeAuthenticator for TokenReviewer {
    async fn node_of(&self, token: &str) -> Result<String, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.trim().to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let result = api.create(&PostParams::default(), &review).await.map_err(|e| {
            tracing::error!(error = %e, "TokenReview failed");
            Status::unavailable(format!(
                "TokenReview failed ({e}); check that the CA's ServiceAccount may create tokenreviews"
            ))
        })?;
        let status = result.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "the API server rejected the token: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if !self.agent_users.contains(&username) {
            return Err(Status::permission_denied(format!(
                "{username} is not a node agent (allowed: {})",
                self.agent_users.join(", ")
            )));
        }
        user.extra
            .and_then(|extra| extra.get(NODE_NAME_EXTRA).and_then(|v| v.first().cloned()))
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "the token of {username} is not bound to a pod on a node: mount a projected ServiceAccount token (Kubernetes >= 1.32)"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    //! TokenReview against kube's documented mock service (tower-test), as
    //! no API server can run here.
    use std::pin::pin;

    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    async fn review_with(answer: serde_json::Value) -> Result<String, Status> {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (req, send) = handle.next_request().await.expect("CA made no request");
            assert_eq!(req.method(), http::Method::POST);
            assert_eq!(req.uri().path(), "/apis/authentication.k8s.io/v1/tokenreviews");
            let body = req.into_body().collect_bytes().await.unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(sent["spec"]["token"], "the-token");
            assert_eq!(sent["spec"]["audiences"][0], "mesh-ca");
            let mut reply = sent.clone();
            reply["status"] = answer;
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        });
        let reviewer = TokenReviewer {
            client: kube::Client::new(svc, "default"),
            agent_users: vec!["system:serviceaccount:mesh-system:mesh-agent".into()],
            audiences: vec!["mesh-ca".into()],
        };
        let r = reviewer.node_of("the-token").await;
        server.await.unwrap();
        r
    }

    #[tokio::test]
    async fn a_pod_bound_agent_token_names_its_node() {
        let node = review_with(serde_json::json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:mesh-system:mesh-agent",
                     "extra": {NODE_NAME_EXTRA: ["node-7"]}}
        }))
        .await
        .unwrap();
        assert_eq!(node, "node-7");
    }

    #[tokio::test]
    async fn rejected_foreign_and_unbound_tokens_are_refused_with_reasons() {
        let s = review_with(serde_json::json!({"authenticated": false, "error": "token expired"}))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains("token expired"));
        let s = review_with(serde_json::json!({
            "authenticated": true, "user": {"username": "system:serviceaccount:default:web"}
        }))
        .await
        .unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert!(s.message().contains("default:web"));
        let s = review_with(serde_json::json!({
            "authenticated": true, "user": {"username": "system:serviceaccount:mesh-system:mesh-agent"}
        }))
        .await
        .unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains("projected"));
    }
}
