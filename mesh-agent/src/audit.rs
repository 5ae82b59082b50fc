//! The node's audit trail: every policy decision, kernel-side (events from
//! `connect()`) and agent-side (tunnel inbound, HTTP requests), as one
//! structured record. Kept in a bounded in-memory ring, appended as JSON
//! lines to a file with size-based rotation, and broadcast to live
//! followers. Writing never blocks the datapath: a full follower misses
//! records (counted), an unwritable file is reported once and retried.
use std::{collections::VecDeque, io::Write as _, path::PathBuf, sync::Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Serialize;
use tokio::sync::broadcast;

/// One decision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub node: String,
    /// `policy` (a flow or request), `admission` (an unattested inbound
    /// flow), `policy_resource` (a refused resource).
    pub kind: String,
    /// `source` (kernel, at connect()), `destination` (agent), `compiler`.
    pub enforced_at: String,
    /// `allow`, `deny`, `refused`.
    pub verdict: String,
    pub source_workload: String,
    pub source_identity: String,
    /// Admission records: the unattested peer, `ip:port`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_address: String,
    pub destination_workload: String,
    pub destination_identity: String,
    pub destination_address: String,
    pub port: u16,
    /// `tcp`, `udp`, `http`.
    pub protocol: String,
    /// The rule that decided (`TCPRoute/...`, `default-deny`, ...) when known.
    pub rule: String,
    pub traffic_target: String,
    pub generation: u64,
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhereLabels {
    pub enforced_at: String,
    pub verdict: String,
}

#[derive(Clone, Default)]
pub struct AuditMetrics {
    pub records: Family<WhereLabels, Counter>,
    pub write_errors: Counter,
}

pub struct Audit {
    pub node: String,
    ring: Mutex<VecDeque<AuditRecord>>,
    capacity: usize,
    file: Mutex<FileSink>,
    tx: broadcast::Sender<AuditRecord>,
    pub metrics: AuditMetrics,
}

struct FileSink {
    path: Option<PathBuf>,
    max_bytes: u64,
    file: Option<std::fs::File>,
    written: u64,
    failing: bool,
}

impl Audit {
    pub fn new(node: String, path: Option<PathBuf>, max_bytes: u64, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(1024);
        Audit {
            node,
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            file: Mutex::new(FileSink {
                path,
                max_bytes,
                file: None,
                written: 0,
                failing: false,
            }),
            tx,
            metrics: AuditMetrics::default(),
        }
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_audit_records",
            "Audit records by where the decision was made and verdict",
            self.metrics.records.clone(),
        );
        r.register(
            "mesh_audit_write_errors",
            "Audit records that could not be written to the audit file",
            self.metrics.write_errors.clone(),
        );
    }

    pub fn record(&self, mut r: AuditRecord) {
        if r.time.is_empty() {
            r.time = now_rfc3339();
        }
        r.node.clone_from(&self.node);
        self.metrics
            .records
            .get_or_create(&WhereLabels {
                enforced_at: r.enforced_at.clone(),
                verdict: r.verdict.clone(),
            })
            .inc();
        {
            let mut ring = self.ring.lock().expect("audit ring");
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(r.clone());
        }
        self.write(&r);
        // No follower, or a slow one: it misses records, the datapath does not wait.
        let _ = self.tx.send(r);
    }

    /// The most recent records, oldest first.
    pub fn recent(&self) -> Vec<AuditRecord> {
        self.ring.lock().expect("audit ring").iter().cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AuditRecord> {
        self.tx.subscribe()
    }

    fn write(&self, r: &AuditRecord) {
        let mut sink = self.file.lock().expect("audit file");
        let Some(path) = sink.path.clone() else { return };
        let mut line = serde_json::to_vec(r).expect("records serialize");
        line.push(b'\n');
        if sink.file.is_none() || sink.written + line.len() as u64 > sink.max_bytes {
            if sink.file.is_some() {
                // Keep one rotated file: path.1.
                let _ = std::fs::rename(&path, path.with_extension("jsonl.1"));
            }
            match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
                Ok(f) => {
                    sink.written = f.metadata().map(|m| m.len()).unwrap_or(0);
                    sink.file = Some(f);
                }
                Err(e) => {
                    self.metrics.write_errors.inc();
                    if !sink.failing {
                        tracing::error!(file = %path.display(), error = %e, "audit: cannot open the audit file (records stay in memory; check --audit-log)");
                        sink.failing = true;
                    }
                    return;
                }
            }
        }
        let f = sink.file.as_mut().expect("opened above");
        match f.write_all(&line) {
            Ok(()) => {
                sink.written += line.len() as u64;
                sink.failing = false;
            }
            Err(e) => {
                self.metrics.write_errors.inc();
                if !sink.failing {
                    tracing::error!(file = %path.display(), error = %e, "audit: writing the audit file failed");
                    sink.failing = true;
                }
                sink.file = None;
            }
        }
    }
}

/// The gRPC API of the audit trail (proto/audit.proto).
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("mesh.audit.v1");
}

impl AuditRecord {
    fn matches(&self, req: &proto::StreamRequest) -> bool {
        (req.verdict.is_empty() || self.verdict == req.verdict)
            && (req.workload.is_empty()
                || self.source_workload == req.workload
                || self.destination_workload == req.workload)
    }
}

/// Serves `Stream` for `mesh-agent audit`.
pub struct AuditService(pub std::sync::Arc<Audit>);

type RecordStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::Record, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl proto::audit_trail_server::AuditTrail for AuditService {
    type StreamStream = RecordStream;

    async fn stream(
        &self,
        request: tonic::Request<proto::StreamRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let req = request.into_inner();
        if !req.verdict.is_empty() && !["allow", "deny", "refused"].contains(&req.verdict.as_str()) {
            return Err(tonic::Status::invalid_argument(format!(
                "verdict {:?}: use allow, deny or refused",
                req.verdict
            )));
        }
        // Subscribe before reading the ring, so nothing falls in between.
        let live = self.0.subscribe();
        let recent: Vec<AuditRecord> = self.0.recent().into_iter().filter(|r| r.matches(&req)).collect();
        let to_msg = |r: &AuditRecord| {
            Ok(proto::Record {
                json: serde_json::to_string(r).expect("records serialize"),
            })
        };
        let head = futures::stream::iter(recent.iter().map(to_msg).collect::<Vec<_>>());
        if !req.follow {
            return Ok(tonic::Response::new(Box::pin(head)));
        }
        // A follower that falls behind skips records (and is told how many);
        // it never makes the datapath wait.
        let tail = tokio_stream::wrappers::BroadcastStream::new(live).filter_map(move |item| {
            let req = req.clone();
            async move {
                match item {
                    Ok(r) if r.matches(&req) => Some(to_msg(&r)),
                    Ok(_) => None,
                    Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                        Some(Ok(proto::Record {
                            json: serde_json::json!({"kind": "gap", "missed": n}).to_string(),
                        }))
                    }
                }
            }
        });
        use futures::StreamExt as _;
        Ok(tonic::Response::new(Box::pin(head.chain(tail))))
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_is_bounded_the_file_rotates_and_followers_get_every_record() {
        let dir = std::env::temp_dir().join(format!("mesh-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let audit = Audit::new("n1".into(), Some(path.clone()), 2000, 5);
        let mut follower = audit.subscribe();
        for i in 0..20 {
            audit.record(AuditRecord {
                verdict: "deny".into(),
                port: i,
                ..Default::default()
            });
        }
        let recent = audit.recent();
        assert_eq!(recent.len(), 5);
        assert_eq!(recent[0].port, 15);
        assert_eq!(follower.try_recv().unwrap().port, 0);
        assert!(path.with_extension("jsonl.1").exists(), "rotated");
        let lines = std::fs::read_to_string(&path).unwrap();
        let last: AuditRecord = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
        assert_eq!((last.port, last.node.as_str()), (19, "n1"));
        assert!(std::fs::metadata(&path).unwrap().len() <= 2000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_file_is_counted_and_records_stay_in_memory() {
        let audit = Audit::new("n1".into(), Some("/proc/no-such-dir/audit.jsonl".into()), 1 << 20, 10);
        audit.record(AuditRecord::default());
        audit.record(AuditRecord::default());
        assert_eq!(audit.metrics.write_errors.get(), 2);
        assert_eq!(audit.recent().len(), 2);
    }
}
