//! Distributed traces of the L7 path (`--otlp-endpoint`): one span per
//! request on each node that handles it, a client span on the client's
//! node (`tunnel::split`) and a server span on the endpoint's node
//! (`tunnel::inbound`), exported with OTLP over gRPC by the opentelemetry
//! crates' batch processor. The W3C `traceparent` a request carries is the
//! span's parent; the request leaves with the span's own, so the next hop
//! (the destination agent, then the application) is its child.
use std::{sync::Arc, time::Duration};

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::{SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider},
};

pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

/// The traces of this agent, when it exports any.
pub type TracesHandle = Option<Arc<Traces>>;

impl Traces {
    /// Starts exporting to an OTLP/gRPC collector (`http://host:4317`).
    /// Must run inside the Tokio runtime (the gRPC client lives there).
    pub fn start(endpoint: &str, node: &str) -> Result<Traces, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e} (check --otlp-endpoint: http://host:port)"))?;
        // Spans leave within a second: short enough to follow a request live.
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_secs(1))
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name("mesh-agent")
                    .with_attribute(KeyValue::new("k8s.node.name", node.to_string()))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("mesh-agent");
        Ok(Traces {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// A span for one request whose headers are `headers`: the child of
    /// their `traceparent` (a new trace without one), which it replaces
    /// with its own.
    pub fn request_span(
        &self,
        headers: &mut http::HeaderMap,
        kind: SpanKind,
        name: String,
        attributes: Vec<KeyValue>,
    ) -> RequestSpan {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        let cx = parent.with_span(span);
        self.propagator.inject_context(&cx, &mut HeadersMut(headers));
        RequestSpan(cx)
    }

    /// Sends what is buffered (at a drain's end).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

/// One request's span; ended with its answer's status.
pub struct RequestSpan(Context);

impl RequestSpan {
    pub fn finish(self, status: u16, attributes: Vec<KeyValue>) {
        let span = self.0.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        for a in attributes {
            span.set_attribute(a);
        }
        if status >= 500 {
            span.set_status(Status::error(format!("status {status}")));
        }
        span.end();
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::try_from(key),
            http::header::HeaderValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_span_is_the_child_of_the_incoming_traceparent_and_replaces_it() {
        let t = Traces::start("http://127.0.0.1:9", "node-a").unwrap();
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let span = t.request_span(&mut h, SpanKind::Client, "GET".into(), vec![]);
        let out = h["traceparent"].to_str().unwrap().to_string();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "same trace: {out}"
        );
        assert!(!out.contains("00f067aa0ba902b7"), "its own span id: {out}");
        span.finish(200, vec![]);
        let mut fresh = http::HeaderMap::new();
        t.request_span(&mut fresh, SpanKind::Server, "GET".into(), vec![])
            .finish(503, vec![]);
        assert!(fresh.contains_key("traceparent"), "a new trace starts without one");
    }
}
