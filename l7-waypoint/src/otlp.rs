//! OpenTelemetry span export: one SERVER span per request, batched and POSTed as OTLP/HTTP
//! JSON to `<endpoint>/v1/traces`. Export never slows requests: spans go through a bounded
//! queue and are dropped (and counted) when the collector cannot keep up.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::debug;

/// Spans per POST at most.
const BATCH: usize = 256;
/// How long a span may wait for its batch.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// One finished request.
#[derive(Debug, Clone)]
pub struct Span {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits: this span.
    pub span_id: String,
    /// The caller's span, if the request carried a trace context.
    pub parent_span_id: Option<String>,
    /// `GET /path`.
    pub name: String,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Status answered.
    pub status: u16,
    /// `<name>.<namespace>`.
    pub service: String,
    /// Source principal.
    pub source: String,
}

/// The exporter's handle.
pub struct Exporter {
    queue: mpsc::Sender<Span>,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl Exporter {
    /// Starts exporting to `endpoint` (`http://host:4318`).
    pub fn start(endpoint: String) -> Self {
        let (queue, rx) = mpsc::channel(4096);
        tokio::spawn(run(endpoint, rx));
        Self { queue, dropped: AtomicU64::new(0) }
    }

    /// Queues a span (dropped when the queue is full).
    pub fn export(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run(endpoint: String, mut rx: mpsc::Receiver<Span>) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => {
                        batch.push(s);
                        if batch.len() >= BATCH { break; }
                    }
                    None => return,
                },
                () = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let body = serde_json::to_vec(&payload(&batch)).unwrap_or_default();
        batch.clear();
        let req = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        match req {
            Ok(req) => match client.request(req).await {
                Ok(resp) if resp.status().is_success() => {}
                Ok(resp) => debug!(status = %resp.status(), "OTLP collector refused spans"),
                Err(e) => debug!(error = %e, "OTLP export failed"),
            },
            Err(e) => debug!(error = %e, %url, "bad OTLP endpoint"),
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_string()
}

fn attr(key: &str, value: Value) -> Value {
    json!({ "key": key, "value": value })
}

/// The OTLP/HTTP JSON body for `spans`.
pub fn payload(spans: &[Span]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut v = json!({
                "traceId": s.trace_id,
                "spanId": s.span_id,
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": [
                    attr("http.request.method", json!({ "stringValue": s.method })),
                    attr("url.path", json!({ "stringValue": s.path })),
                    attr("http.response.status_code", json!({ "intValue": s.status.to_string() })),
                    attr("sinew.destination_service", json!({ "stringValue": s.service })),
                    attr("sinew.source_principal", json!({ "stringValue": s.source })),
                ],
                "status": { "code": if s.status >= 500 { 2 } else { 0 } },
            });
            if let Some(p) = &s.parent_span_id {
                v["parentSpanId"] = json!(p);
            }
            v
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [attr("service.name", json!({ "stringValue": "sinew-waypoint" }))] },
            "scopeSpans": [{ "scope": { "name": "sinew-waypoint" }, "spans": spans }],
        }]
    })
}
