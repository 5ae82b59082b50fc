//! `mesh-agent audit`: the node's audit trail, from the admin API's gRPC stream.
use anyhow::Context as _;

/// Prints the node's audit records as JSON lines.
pub async fn run(
    follow: bool,
    verdict: Option<String>,
    workload: Option<String>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    use crate::audit::proto::{StreamRequest, audit_trail_client::AuditTrailClient};
    let mut client = AuditTrailClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| {
            format!(
                "connecting to the agent's admin API at {addr} (is the agent running on this node? see --admin-addr)"
            )
        })?;
    let req = StreamRequest {
        follow,
        verdict: verdict.unwrap_or_default(),
        workload: workload.unwrap_or_default(),
    };
    let mut stream = client
        .stream(req)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    while let Some(rec) = stream.message().await? {
        writeln!(out, "{}", rec.json)?;
        out.flush()?;
    }
    Ok(())
}
