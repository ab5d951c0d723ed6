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
    /// A gRPC call's status, if any: non-zero marks the span an error (OpenTelemetry's gRPC
    /// conventions), whatever the HTTP status.
    pub grpc_status: Option<u16>,
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
    /// Told to send what is batched and end ([`Exporter::stop`]).
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Exporter {
    /// Starts exporting to `endpoint` (`http://host:4318`).
    pub fn start(endpoint: String) -> Self {
        Self::start_with(endpoint, EXPORT_TIMEOUT)
    }

    /// As [`Exporter::start`], each export given `timeout` (tests).
    fn start_with(endpoint: String, timeout: Duration) -> Self {
        let (queue, rx) = mpsc::channel(4096);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(endpoint, rx, stopped, timeout));
        Self {
            queue,
            dropped: AtomicU64::new(0),
            stop: std::sync::Mutex::new(Some(stop)),
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Sends the spans batched so far and stops, waiting at most `within` (the waypoint is
    /// stopping; the handle lives on in tasks that never end, so the queue never closes).
    pub async fn stop(&self, within: Duration) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(within, task).await;
        }
    }

    /// Queues a span (dropped when the queue is full).
    pub fn export(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

async fn run(
    endpoint: String,
    mut rx: mpsc::Receiver<Span>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    timeout: Duration,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let mut batch = Vec::with_capacity(BATCH);
    let mut closed = false;
    while !closed {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => {
                        batch.push(s);
                        if batch.len() >= BATCH { break; }
                    }
                    // The waypoint is stopping: what is batched still goes.
                    None => { closed = true; break; }
                },
                _ = &mut stopped, if !closed => {
                    // Whatever is queued joins the last batch.
                    while let Ok(s) = rx.try_recv() {
                        batch.push(s);
                    }
                    closed = true;
                    break;
                }
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
            // A collector that never answers must not stall exporting for good.
            Ok(req) => match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {}
                Ok(Ok(resp)) => debug!(status = %resp.status(), "OTLP collector refused spans"),
                Ok(Err(e)) => debug!(error = %e, "OTLP export failed"),
                Err(_) => debug!(%url, "OTLP collector did not answer within {timeout:?}"),
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
                "status": { "code": if s.status >= 500 || s.grpc_status.is_some_and(|g| g != 0) { 2 } else { 0 } },
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{io::AsyncReadExt, net::TcpListener};

    use super::*;

    fn span() -> Span {
        Span {
            trace_id: format!("{:032x}", 7),
            span_id: format!("{:016x}", 9),
            parent_span_id: None,
            name: "GET /".into(),
            start: SystemTime::now(),
            end: SystemTime::now(),
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            grpc_status: None,
            service: "api.shop".into(),
            source: "spiffe://cluster.local/ns/shop/sa/client".into(),
        }
    }

    /// A collector that reads what it is sent and never answers: the connections it was
    /// opened and the bytes it got.
    async fn silent_collector() -> (String, Arc<AtomicU64>, Arc<std::sync::Mutex<Vec<u8>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let (conns, got) = (Arc::new(AtomicU64::new(0)), Arc::new(std::sync::Mutex::default()));
        let (c, g) = (conns.clone(), got.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                let g: Arc<std::sync::Mutex<Vec<u8>>> = g.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        g.lock().expect("lock").extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        (url, conns, got)
    }

    #[test]
    fn a_failed_grpc_call_is_an_error_span_whatever_its_http_status() {
        let code = |status, grpc_status| {
            let s = Span { status, grpc_status, ..span() };
            payload(&[s])["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["status"]["code"].clone()
        };
        assert_eq!(code(200, None), 0);
        assert_eq!(code(200, Some(0)), 0);
        assert_eq!(code(200, Some(14)), 2);
        assert_eq!(code(503, None), 2);
    }

    #[tokio::test]
    async fn a_collector_that_never_answers_does_not_stall_exporting() {
        let (url, conns, _) = silent_collector().await;
        let e = Exporter::start_with(url, Duration::from_millis(200));
        e.export(span());
        tokio::time::sleep(FLUSH_EVERY + Duration::from_millis(900)).await;
        e.export(span());
        tokio::time::sleep(FLUSH_EVERY + Duration::from_millis(500)).await;
        // The first POST was given up, so the second went on a connection of its own.
        assert_eq!(conns.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn spans_batched_when_the_waypoint_stops_still_go() {
        let (url, _, got) = silent_collector().await;
        let e = Exporter::start_with(url, Duration::from_millis(200));
        e.export(span());
        // The handle stays alive (tasks hold it); stopping sends the batch.
        e.stop(Duration::from_secs(2)).await;
        for _ in 0..40 {
            if String::from_utf8_lossy(&got.lock().expect("lock")).contains("resourceSpans") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the last batch was not sent");
    }
}
