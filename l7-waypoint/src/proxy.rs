//! One request through the waypoint: route, filters, retries and timeouts, endpoint choice,
//! forwarding, telemetry.

use std::{
    borrow::Cow,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Body as _;
use hyper::{Request, Response, body::Incoming};
use sinew_hbone::random_u64;
use sinew_identity::SpiffeId;
use sinew_l7::{
    balance::hash_key,
    outlier::Health,
    ratelimit::Admit,
    retry::{Outcome, RetryPolicy},
    route::{CompiledRule, RequestView, modify_headers, redirect_location, rewrite_path},
};
use sinew_mesh::{HttpRequest, ServiceInfo};
use sinew_model::{HeaderModifier, HttpFilter};

use hyper_util::rt::TokioIo;

use crate::{
    idle::StreamActivity,
    replay::{self, BoxError},
    state::{Snapshot, Waypoint},
    telemetry::{DestinationLabels, Recorder, RequestEntry, RequestLabels, SourceLabels},
    upstream::{UpBody, UpstreamError, endpoint_uri},
};

/// The body of every response the waypoint sends.
pub type Body = BoxBody<Bytes, BoxError>;

/// A client's request body, its bytes counted as they are read (`istio_request_bytes`).
type ReqBody = Counted<Incoming>;

/// A body whose data bytes are counted into its stream's `request_bytes` as they pass, each
/// frame marking the stream active.
struct Counted<B> {
    body: B,
    stream: Arc<StreamActivity>,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.stream.request_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            self.stream.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Largest request body kept so tries can repeat it and mirrors can send it; beyond it a
/// request streams on, not retried and not mirrored. 1 MiB as Envoy's default buffer limit:
/// every request on a route with retries (Istio's default) keeps its copy until the answer.
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// The connection a request arrived on.
pub struct Downstream {
    /// The service addressed (the CONNECT authority's VIP).
    pub service: Arc<ServiceInfo>,
    /// The service port.
    pub port: u16,
    /// The client's identity, from its certificate.
    pub source: Arc<SpiffeId>,
    /// `source` as a string (labels, logs), made once per connection.
    pub principal: String,
    /// The waypoint's tag for `source` (its upstream connections), looked up once.
    pub source_tag: u32,
    /// The original client address (`forwarded`), else the tunnel's peer.
    pub client: SocketAddr,
    /// Metric series this connection's requests ended in, so a request reuses them instead
    /// of building and hashing a dozen label strings.
    recorders: Mutex<Recorders>,
}

/// Cached metric series of one connection, valid for one configuration snapshot (held, so
/// the workloads compared by pointer stay alive).
#[derive(Default)]
struct Recorders {
    snapshot: Option<Arc<Snapshot>>,
    entries: Vec<(RecorderKey, Recorder)>,
}

/// What the labels of a request depend on beyond its connection and snapshot.
struct RecorderKey {
    status: StatusCode,
    flags: &'static str,
    grpc: bool,
    grpc_status: Option<u16>,
    endpoint: Option<Arc<sinew_mesh::WorkloadInfo>>,
}

/// More distinct outcomes than this on one connection start the cache over.
const MAX_RECORDERS: usize = 16;

impl RecorderKey {
    fn matches(&self, done: &Done, grpc: bool, grpc_status: Option<u16>) -> bool {
        self.status == done.status
            && self.flags == done.flags
            && self.grpc == grpc
            && self.grpc_status == grpc_status
            && match (&self.endpoint, &done.endpoint) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Downstream {
    /// The connection's view for `wp`, with the per-connection strings made once.
    pub fn new(
        wp: &Waypoint,
        service: Arc<ServiceInfo>,
        port: u16,
        source: Arc<SpiffeId>,
        client: SocketAddr,
    ) -> Self {
        let principal = source.to_string();
        let source_tag = wp.source_tag(&principal);
        let recorders = Mutex::default();
        Self { service, port, source, principal, source_tag, client, recorders }
    }

    /// The metric series a request that ended as `done` counts in.
    fn recorder(
        &self,
        wp: &Waypoint,
        snapshot: &Arc<Snapshot>,
        done: &Done,
        grpc: bool,
        grpc_status: Option<u16>,
    ) -> Recorder {
        let mut cache = self.recorders.lock().unwrap_or_else(|e| e.into_inner());
        if !cache.snapshot.as_ref().is_some_and(|s| Arc::ptr_eq(s, snapshot)) {
            cache.snapshot = Some(snapshot.clone());
            cache.entries.clear();
        }
        if let Some((_, r)) = cache.entries.iter().find(|(k, _)| k.matches(done, grpc, grpc_status))
        {
            return r.clone();
        }
        if cache.entries.len() >= MAX_RECORDERS {
            cache.entries.clear();
        }
        let recorder = wp.metrics.recorder(&self.labels(wp, snapshot, done, grpc, grpc_status));
        let key = RecorderKey {
            status: done.status,
            flags: done.flags,
            grpc,
            grpc_status,
            endpoint: done.endpoint.clone(),
        };
        cache.entries.push((key, recorder.clone()));
        recorder
    }

    /// Istio's labels for a request of this connection that ended as `done`.
    fn labels(
        &self,
        wp: &Waypoint,
        snapshot: &Snapshot,
        done: &Done,
        grpc: bool,
        grpc_status: Option<u16>,
    ) -> RequestLabels {
        let svc = &self.service;
        let endpoint = done.endpoint.as_deref();
        RequestLabels {
            reporter: "waypoint",
            source: SourceLabels::new(
                snapshot.mesh.workload_by_ip(self.client.ip()).map(|w| &**w),
                Some(&self.source.namespace),
                Some(self.principal.clone()),
            ),
            destination: DestinationLabels::new(
                endpoint,
                Some(endpoint.map_or(svc.namespace.as_str(), |w| w.namespace.as_str())),
                endpoint.and_then(|w| w.identity(&wp.trust_domain).ok()).map(|i| i.to_string()),
                Some(svc),
            ),
            request_protocol: if grpc { "grpc" } else { "http" },
            response_code: done.status.as_u16(),
            grpc_response_status: grpc_status.map(|c| c.to_string()).unwrap_or_default(),
            response_flags: done.flags,
            connection_security_policy: "mutual_tls",
        }
    }
}

/// What a request ended as, for metrics and the log.
struct Done {
    status: StatusCode,
    flags: &'static str,
    endpoint: Option<Arc<sinew_mesh::WorkloadInfo>>,
    attempts: u32,
}

/// Marks an answer the waypoint made itself (not a backend's).
#[derive(Debug, Clone)]
struct LocalReply(Bytes);

/// A 503 for a circuit-breaking limit, marked as Envoy marks them.
fn overloaded(text: &'static str) -> Response<Body> {
    let mut r = full(StatusCode::SERVICE_UNAVAILABLE, text);
    r.headers_mut().insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r.headers_mut().insert("x-sinew-overloaded", HeaderValue::from_static("true"));
    r
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let body = body.into();
    let mut r = Response::new(Full::new(body.clone()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.extensions_mut().insert(LocalReply(body));
    r
}

/// A local answer to a gRPC request as gRPC clients read one: HTTP 200, trailers only, with
/// `grpc-status` mapped from the HTTP status as Envoy's `httpToGrpcStatus` maps it, except
/// that the route's own timeout (`timed_out`) is DEADLINE_EXCEEDED, as Envoy's router
/// answers it (an injected 504 stays UNAVAILABLE), and the reason in `grpc-message`. Its
/// HTTP status stays in the metrics.
fn as_grpc(resp: &mut Response<Body>, text: &[u8], timed_out: bool) {
    let code = match resp.status().as_u16() {
        _ if timed_out => 4,
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    let mut message = String::new();
    for &b in text.trim_ascii() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            message.push(b as char);
        } else {
            message.push_str(&format!("%{b:02X}"));
        }
    }
    *resp.status_mut() = StatusCode::OK;
    *resp.body_mut() = Full::new(Bytes::new()).map_err(|never| match never {}).boxed();
    let h = resp.headers_mut();
    h.remove(header::CONTENT_LENGTH);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&message) {
        h.insert("grpc-message", v);
    }
}

/// Serves one request; never fails (errors become 4xx/5xx answers).
pub async fn handle(
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    // What only the access log and span export need is made only when they are on.
    let observed = wp.access.enabled() || wp.otlp.is_some();
    let started_at = observed.then(std::time::SystemTime::now);
    let trace = TraceContext::continue_or_start(req.headers().get("traceparent"));
    let parent_span = trace.parent.filter(|_| observed).map(|p| format!("{p:016x}"));
    let traceparent = trace.to_string();
    let snapshot = wp.snapshot.borrow().clone();
    let method = req.method().clone();
    let path_and_query = observed.then(|| {
        req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into())
    });
    let grpc = is_grpc(req.headers());
    let stream = Arc::new(StreamActivity::new());
    let mut req = req.map(|body| Counted { body, stream: stream.clone() });
    if !trace.continued() {
        // A tracestate belongs to the trace it came with, which was not continued.
        req.headers_mut().remove("tracestate");
    }
    let notes = Notes::default();
    let forwarded = route_and_forward(&wp, &snapshot, &down, req, &traceparent, &notes);
    let (mut response, mut done, route) = match wp.stream_idle {
        // Nothing moved either way for the limit before the response started (Envoy's
        // `stream_idle_timeout`; dropping the forwarding cancels the upstream request).
        Some(limit) => tokio::select! {
            biased;
            r = forwarded => r,
            () = stream.idle_for(limit) => {
                let status = StatusCode::REQUEST_TIMEOUT;
                let mut d = done(status, "SI");
                d.endpoint = notes.endpoint.lock().unwrap_or_else(|e| e.into_inner()).take();
                let route = notes.route.lock().unwrap_or_else(|e| e.into_inner()).take();
                (full(status, "stream timeout\n"), d, route)
            }
        },
        None => forwarded.await,
    };
    // The response's headers are activity too: its body gets a whole idle time from them.
    stream.touch();
    if notes.delayed.load(Ordering::Relaxed) {
        done.flags = match done.flags {
            "-" => "DI",
            "SI" => "DI,SI",
            other => other,
        };
    }
    let audit = notes.audited.into_inner().unwrap_or_else(|e| e.into_inner());
    let observed = match (path_and_query, started_at) {
        (Some(path_and_query), Some(started_at)) => Some(Box::new(Observed {
            started_at,
            method,
            path_and_query,
            route,
            traceparent: traceparent.clone(),
            parent_span,
            sampled: trace.sampled(),
            audit,
        })),
        _ => None,
    };
    if grpc && let Some(LocalReply(text)) = response.extensions_mut().remove::<LocalReply>() {
        as_grpc(&mut response, &text, done.flags == "UT");
    }
    if let Ok(v) = HeaderValue::from_str(&traceparent) {
        response.headers_mut().insert("traceparent", v);
    }
    // Counted when the response has ended, as Istio does: the duration covers the body,
    // and a gRPC call's status comes from its trailers.
    let grpc_status = grpc.then(|| grpc_status_of(response.headers())).flatten();
    let finish = Finish {
        wp,
        down,
        snapshot,
        done,
        grpc,
        grpc_status,
        start,
        observed,
        stream,
        response_bytes: 0,
    };
    Ok(response.map(|body| Recorded { body, finish: Some(finish), idle: None }.boxed()))
}

/// A response's `grpc-status`; a code outside gRPC's 0-16 reads as UNKNOWN (2), as gRPC
/// clients read it: the value becomes a metric label, and a backend must not be able to
/// make one series per number.
fn grpc_status_of(headers: &HeaderMap) -> Option<u16> {
    let code: u16 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(if code <= 16 { code } else { 2 })
}

/// How much of a path a span carries (Envoy's `max_path_tag_length`): URIs of 60 KiB in a
/// queue of thousands of spans would hold hundreds of megabytes.
const SPAN_PATH_MAX: usize = 256;

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What the routing of a request noticed on the way, for its metrics and log.
#[derive(Default)]
struct Notes {
    /// An injected delay held it (Envoy's `DI`).
    delayed: AtomicBool,
    /// The AUDIT policies its L7 authorization matched (`ns/name`, comma-separated).
    audited: Mutex<Option<String>>,
    /// The route rule chosen and the endpoint of the latest try, for a request that ends
    /// before its answer (the stream idle timeout).
    route: Mutex<Option<String>>,
    endpoint: Mutex<Option<Arc<sinew_mesh::WorkloadInfo>>>,
}

/// What a request's access-log line and span need once its response has ended (only when
/// either is on).
struct Observed {
    started_at: std::time::SystemTime,
    method: http::Method,
    path_and_query: String,
    route: Option<String>,
    traceparent: String,
    parent_span: Option<String>,
    sampled: bool,
    audit: Option<String>,
}

/// What a request's metrics, access-log line and span need once its response has ended.
struct Finish {
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    snapshot: Arc<Snapshot>,
    done: Done,
    grpc: bool,
    grpc_status: Option<u16>,
    start: Instant,
    observed: Option<Box<Observed>>,
    /// The stream: the request body's bytes read so far, its last activity.
    stream: Arc<StreamActivity>,
    /// The response body's bytes, sent so far.
    response_bytes: u64,
}

impl Finish {
    /// Records the request; `ended`: its response body reached its end (else the client
    /// went away first: Envoy's `DC`).
    fn record(mut self, ended: bool) {
        if !ended && self.done.flags == "-" {
            self.done.flags = "DC";
        }
        let millis = self.start.elapsed().as_secs_f64() * 1000.0;
        let grpc_status = self.grpc_status.filter(|_| self.grpc);
        let request_bytes = self.stream.request_bytes.load(Ordering::Relaxed);
        self.down.recorder(&self.wp, &self.snapshot, &self.done, self.grpc, grpc_status).record(
            millis,
            request_bytes,
            self.response_bytes,
        );
        let Some(o) = self.observed else { return };
        let (wp, down, done) = (&self.wp, &self.down, &self.done);
        let svc = &down.service;
        if wp.access.enabled() {
            wp.access.write(&RequestEntry {
                ts: sinew_telemetry::unix_seconds(),
                method: o.method.to_string(),
                path: o.path_and_query.clone(),
                service: format!("{}.{}:{}", svc.name, svc.namespace, down.port),
                route: o.route,
                status: done.status.as_u16(),
                grpc_status,
                flags: done.flags,
                upstream: done.endpoint.as_ref().map(|w| w.key()),
                attempts: done.attempts,
                source: down.principal.clone(),
                duration_ms: millis,
                traceparent: Some(o.traceparent.clone()),
                audit: o.audit,
            });
        }
        // An unsampled trace (flags without bit 0) is propagated but not recorded.
        if let Some(otlp) = wp.otlp.as_ref().filter(|_| o.sampled) {
            let mut ids = o.traceparent.split('-').skip(1);
            if let (Some(trace_id), Some(span_id)) = (ids.next(), ids.next()) {
                let path = o.path_and_query.split('?').next().unwrap_or("/");
                otlp.export(crate::otlp::Span {
                    trace_id: trace_id.to_owned(),
                    span_id: span_id.to_owned(),
                    parent_span_id: o.parent_span,
                    name: format!("{} {}", o.method, truncated(path, SPAN_PATH_MAX)),
                    start: o.started_at,
                    end: std::time::SystemTime::now(),
                    method: o.method.to_string(),
                    path: truncated(path, SPAN_PATH_MAX).to_owned(),
                    status: done.status.as_u16(),
                    grpc_status,
                    service: format!("{}.{}", svc.name, svc.namespace),
                    source: down.principal.clone(),
                });
            }
        }
    }
}

/// A response body that records its request's metrics when it ends: its last frame, an
/// error, or the client going away first (dropped).
///
/// With the waypoint's stream idle timeout, a body that moves nothing either way for that
/// long (no frame of its own, none of its request's) fails with [`StreamIdle`], as Envoy
/// resets an idle stream whose response has started.
struct Recorded {
    body: Body,
    finish: Option<Finish>,
    /// Armed at the first wait for a frame.
    idle: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// The stream moved nothing for the waypoint's stream idle timeout while its response body
/// was streaming.
#[derive(Debug, thiserror::Error)]
#[error("the stream moved nothing for the stream idle timeout")]
pub struct StreamIdle;

impl Recorded {
    /// Whether the stream has been idle for the limit; if not, the timer is set to wake
    /// this task when it would be.
    fn idle_expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let Some(f) = self.finish.as_ref() else { return false };
        let Some(limit) = f.wp.stream_idle else { return false };
        loop {
            let at = f.stream.idle_at(limit);
            if at <= tokio::time::Instant::now() {
                return true;
            }
            let sleep = self.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(f) = self.finish.as_mut() {
                    f.stream.touch();
                    if let Some(data) = frame.data_ref() {
                        f.response_bytes += data.len() as u64;
                    }
                    if let Some(t) = frame.trailers_ref() {
                        f.grpc_status = grpc_status_of(t).or(f.grpc_status);
                    }
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(f) = self.finish.take() {
                    f.record(true);
                }
            }
            std::task::Poll::Ready(Some(Err(e))) => {
                if let Some(mut f) = self.finish.take() {
                    // The body broke after the headers went: the route's timeout (UT) or
                    // the upstream's reset (UR), as Envoy flags them.
                    if f.done.flags == "-" {
                        f.done.flags = if e.downcast_ref::<ResponseTimedOut>().is_some() {
                            "UT"
                        } else {
                            "UR"
                        };
                    }
                    f.record(true);
                }
            }
            std::task::Poll::Pending => {
                if self.idle_expired(cx) {
                    if let Some(mut f) = self.finish.take() {
                        f.done.flags = match f.done.flags {
                            "-" => "SI",
                            "DI" => "DI,SI",
                            other => other,
                        };
                        f.record(true);
                    }
                    return std::task::Poll::Ready(Some(Err(StreamIdle.into())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            // A body with nothing to send (HEAD, 204, 101, trailers-only) is not polled.
            let ended = self.body.is_end_stream();
            f.record(ended);
        }
    }
}

/// gRPC's content types as Envoy reads them (`application/grpc`, `+proto` and the like, or
/// with parameters); `application/grpc-web` is not gRPC (an HTTP/1.1 protocol of browsers).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

/// This request's W3C trace context: the caller's trace with a new span id, or a new
/// sampled trace when the caller sent no valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TraceContext {
    trace: u128,
    span: u64,
    /// The caller's span, when the trace was continued.
    parent: Option<u64>,
    flags: u8,
}

impl TraceContext {
    fn continue_or_start(header: Option<&HeaderValue>) -> Self {
        let span = random_u64() | 1;
        match header.and_then(|v| parse_traceparent(v.as_bytes())) {
            Some((trace, parent, flags)) => Self { trace, span, parent: Some(parent), flags },
            None => Self {
                trace: (u128::from(random_u64()) << 64) | u128::from(random_u64() | 1),
                span,
                parent: None,
                flags: 1,
            },
        }
    }

    fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Whether the caller's trace was continued (its `tracestate` belongs with it).
    fn continued(&self) -> bool {
        self.parent.is_some()
    }
}

impl std::fmt::Display for TraceContext {
    /// Version 00, the one this implements, whatever version the caller sent.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace, self.span, self.flags)
    }
}

/// A `traceparent` as W3C Trace Context (level 1, section 3.2) defines it: lowercase hex
/// fields, version `ff` invalid, trace and parent ids not all zeros; a later version may
/// carry more fields after the fourth, version 00 none. `None` when invalid: the header is
/// then ignored and a new trace starts.
fn parse_traceparent(v: &[u8]) -> Option<(u128, u64, u8)> {
    fn hex(b: &[u8]) -> Option<u128> {
        let s = std::str::from_utf8(b).ok()?;
        if !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            return None;
        }
        u128::from_str_radix(s, 16).ok()
    }
    if v.len() < 55 || [2, 35, 52].iter().any(|&i| v[i] != b'-') {
        return None;
    }
    let version = hex(&v[..2])?;
    let extra_ok = if version == 0 { v.len() == 55 } else { v.len() == 55 || v[55] == b'-' };
    let (trace, parent, flags) = (hex(&v[3..35])?, hex(&v[36..52])?, hex(&v[53..55])?);
    (version != 0xff && extra_ok && trace != 0 && parent != 0).then_some((
        trace,
        parent as u64,
        flags as u8,
    ))
}

/// The token bucket of a rule's `filter_index`th filter: kind, route, rule and filter.
fn bucket_key(rule: &CompiledRule, filter_index: usize) -> String {
    format!("{}/{}#{}/{filter_index}", rule.kind, rule.route, rule.index)
}

fn done(status: StatusCode, flags: &'static str) -> Done {
    Done { status, flags, endpoint: None, attempts: 0 }
}

async fn route_and_forward(
    wp: &Arc<Waypoint>,
    snapshot: &Snapshot,
    down: &Downstream,
    req: Request<ReqBody>,
    traceparent: &str,
    notes: &Notes,
) -> (Response<Body>, Done, Option<String>) {
    let svc = &down.service;
    let mut req = req;
    let is_upgrade = parts_is_upgrade(req.headers()) && req.version() == Version::HTTP_11;
    let mut downstream_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // One place for the authority from here on, whichever version the client spoke: HTTP/2's
    // `:authority` becomes `Host`, which filters (redirects, hostname rewrites) read and set,
    // and which an HTTP/2 backend gets back as `:authority` (`upstream::Upstreams::send`).
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    join_cookie_crumbs(&mut parts.headers);
    // Policies, routes and the backend all see the normalized path (`sinew_l7::path`).
    match sinew_l7::path::normalize(parts.uri.path()) {
        Ok(Cow::Borrowed(_)) => {}
        Ok(Cow::Owned(normal)) => {
            let pq = match parts.uri.query() {
                Some(q) => format!("{normal}?{q}"),
                None => normal,
            };
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = pq.parse().ok();
            parts.uri = Uri::from_parts(uri).unwrap_or_default();
        }
        Err(e) => {
            let status = StatusCode::BAD_REQUEST;
            return (full(status, format!("{e}\n")), done(status, "-"), None);
        }
    }
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let view = RequestView {
        method: parts.method.as_str(),
        path: &path,
        query: query.as_deref(),
        headers: &parts.headers,
    };
    // L7 authorization: policies attached to the service or to this waypoint (targetRefs).
    // The authority as sent (bytes: a Host that is not text is still matched, never taken
    // for none): HTTP/1.1's Host header, else HTTP/2's :authority.
    let host = match parts.headers.get(header::HOST) {
        Some(h) => h.as_bytes(),
        None => parts.uri.authority().map_or(&b""[..], |a| a.as_str().as_bytes()),
    };
    let request = HttpRequest {
        method: parts.method.as_str(),
        path: &path,
        host,
        headers: Some(&parts.headers),
    };
    let source = (&*down.source, down.principal.as_str());
    let client = down.client.ip();
    if let Some(decision) = wp.authorize(snapshot, svc, down.port, source, client, Some(&request)) {
        if !decision.audited.is_empty() {
            *notes.audited.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(decision.audited.join(","));
        }
        if !decision.allowed() {
            // The client learns only that it was denied, as from Envoy; which policies
            // decided is for the operator (debug log, `sinew explain`).
            tracing::debug!(service = %svc.name, namespace = %svc.namespace, source = %down.source, path = %path, reason = %decision.reason, "L7 deny");
            let body = "RBAC: access denied\n";
            return (full(StatusCode::FORBIDDEN, body), done(StatusCode::FORBIDDEN, "RBAC"), None);
        }
    }
    let client_ns = &down.source.namespace;
    let selected = snapshot.routes.select(&svc.namespace, &svc.name, down.port, client_ns, &view);
    // Routes that apply to this port replace the implicit routing: nothing matched, 404.
    if selected.is_none()
        && snapshot.routes.attached(&svc.namespace, &svc.name, down.port, client_ns)
    {
        let status = StatusCode::NOT_FOUND;
        return (full(status, "route not found\n"), done(status, "NR"), None);
    }
    let route_name = selected.as_ref().map(|s| format!("{}#{}", s.rule.route, s.rule.index));
    notes.route.lock().unwrap_or_else(|e| e.into_inner()).clone_from(&route_name);
    let rule: Option<&CompiledRule> = selected.as_ref().map(|s| s.rule);
    let matched_prefix = selected.as_ref().and_then(|s| s.matched_prefix);

    // Rule filters, in order.
    let mut response_headers: Vec<&HeaderModifier> = Vec::new();
    let mut mirrors: Vec<&sinew_model::RequestMirror> = Vec::new();
    for (filter_index, f) in
        rule.map(|r| r.filters.as_slice()).unwrap_or_default().iter().enumerate()
    {
        match f {
            HttpFilter::RequestRedirect { request_redirect: r } => {
                let host = parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(|h| split_host(h).0.to_owned())
                    .unwrap_or_default();
                let location = redirect_location(
                    r,
                    "http",
                    &host,
                    Some(down.port),
                    &path,
                    matched_prefix,
                    query.as_deref(),
                );
                let status = StatusCode::from_u16(r.status_code).unwrap_or(StatusCode::FOUND);
                let mut resp = full(status, Bytes::new());
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                return (resp, done(status, "-"), route_name);
            }
            HttpFilter::LocalRateLimit { local_rate_limit: l } => {
                // One bucket per filter: an HTTPRoute and a GRPCRoute may share a name, and
                // a rule may hold two limits (sharing a key, each replaced the other's
                // bucket with a full one on every request, and nothing was limited).
                let key = rule.map_or_else(String::new, |r| bucket_key(r, filter_index));
                let bucket = wp.bucket(&key, l);
                match bucket.try_take(Instant::now()) {
                    Admit::Allowed { remaining } => {
                        let reset = whole_seconds(bucket.next_fill_in(Instant::now()));
                        parts.extensions.insert(RateLimitHeaders(bucket.limit(), remaining, reset));
                    }
                    Admit::Limited { retry_after } => {
                        let mut resp =
                            full(StatusCode::TOO_MANY_REQUESTS, "local rate limit exceeded\n");
                        let h = resp.headers_mut();
                        h.insert("x-ratelimit-limit", bucket.limit().into());
                        h.insert("x-ratelimit-remaining", 0u32.into());
                        let secs = whole_seconds(retry_after);
                        h.insert("x-ratelimit-reset", secs.into());
                        h.insert(header::RETRY_AFTER, secs.into());
                        return (resp, done(StatusCode::TOO_MANY_REQUESTS, "RL"), route_name);
                    }
                }
            }
            HttpFilter::FaultInjection { fault_injection: fi } => {
                if let Some(d) = &fi.delay
                    && (random_u64() % 100) < u64::from(d.percentage)
                {
                    tokio::time::sleep(d.fixed_delay.0).await;
                    notes.delayed.store(true, Ordering::Relaxed);
                }
                if let Some(a) = &fi.abort
                    && (random_u64() % 100) < u64::from(a.percentage)
                {
                    let status = StatusCode::from_u16(a.http_status)
                        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    return (full(status, "fault filter abort\n"), done(status, "FI"), route_name);
                }
            }
            HttpFilter::RequestHeaderModifier { .. }
            | HttpFilter::ResponseHeaderModifier { .. }
            | HttpFilter::RequestMirror { .. } => {
                per_backend_filter(f, &mut parts.headers, &mut response_headers, &mut mirrors);
            }
            HttpFilter::UrlRewrite { url_rewrite: u } => {
                if let Some(p) = &u.path {
                    let new = rewrite_path(&path, matched_prefix, p);
                    let pq = match &query {
                        Some(q) => format!("{new}?{q}"),
                        None => new,
                    };
                    if let Ok(uri) = Uri::builder().path_and_query(pq).build() {
                        parts.uri = uri;
                    }
                }
                if let Some(h) = &u.hostname
                    && let Ok(v) = HeaderValue::from_str(h)
                {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
    }

    // The backend service: the rule's weighted choice, else the service itself.
    let (backend_ns, backend_name, backend_port) = match rule {
        Some(r) => match r.pick_backend(random_u64()) {
            Some(b) => {
                // The chosen backend's own filters (control admits only these kinds there).
                for f in &b.filters {
                    per_backend_filter(f, &mut parts.headers, &mut response_headers, &mut mirrors);
                }
                (b.namespace.clone(), b.name.clone(), b.port)
            }
            None => {
                return (
                    full(StatusCode::INTERNAL_SERVER_ERROR, "no backend with weight\n"),
                    done(StatusCode::INTERNAL_SERVER_ERROR, "NR"),
                    route_name,
                );
            }
        },
        None => (svc.namespace.clone(), svc.name.clone(), down.port),
    };
    // A backendRef to a Service that does not exist is invalid: 500, as Gateway API asks
    // (for that backend's share of the requests only, since the pick is weighted).
    let Some(backend_svc) = snapshot.mesh.service(&backend_ns, &backend_name).cloned() else {
        return (
            full(StatusCode::INTERNAL_SERVER_ERROR, "backend service unknown\n"),
            done(StatusCode::INTERNAL_SERVER_ERROR, "NC"),
            route_name,
        );
    };
    // A backendRef port the Service does not have is invalid (500), not a pod port.
    let Some(target_port) = backend_svc.target_port(backend_port) else {
        let text = format!("backend service has no port {backend_port}\n");
        return (
            full(StatusCode::INTERNAL_SERVER_ERROR, text),
            done(StatusCode::INTERNAL_SERVER_ERROR, "NC"),
            route_name,
        );
    };
    let Some(backend) = wp.backend(snapshot, &backend_ns, &backend_name) else {
        return (
            full(StatusCode::INTERNAL_SERVER_ERROR, "backend service unknown\n"),
            done(StatusCode::INTERNAL_SERVER_ERROR, "NC"),
            route_name,
        );
    };

    let policy = RetryPolicy::from_model(rule.and_then(|r| r.retry.as_ref()));
    // Without retries or mirrors the body streams (gRPC streams, uploads, upgrades). With
    // retries or mirrors it streams too, while a copy is kept so a try can be repeated and a
    // mirror can send it once it has all arrived.
    let mut body = if (policy.attempts == 0 && mirrors.is_empty()) || is_upgrade {
        Some(Payload::Stream(body))
    } else if body.is_end_stream() {
        Some(Payload::Buffered(Bytes::new()))
    } else {
        Some(Payload::Replay(replay::Recorder::new(body, MAX_REQUEST_BODY)))
    };
    if is_upgrade {
        prepare_upgrade_headers(&mut parts.headers);
    } else {
        strip_hop_by_hop(&mut parts.headers);
    }
    if let Ok(v) = HeaderValue::from_str(traceparent) {
        parts.headers.insert("traceparent", v);
    }
    // As Envoy does: a request id for the backend's logs when the client sent none, and the
    // scheme the client used (plain HTTP inside the tunnel).
    if !parts.headers.contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(&request_id())
    {
        parts.headers.insert("x-request-id", v);
    }
    if !parts.headers.contains_key("x-forwarded-proto") {
        parts.headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    // A WebSocket upgrade is HTTP/1.1's: over HTTP/2 hyper would drop its upgrade headers
    // and the backend would see a plain GET.
    let http2 = !is_upgrade && upstream_http2(&backend_svc, backend_port, &parts.headers);
    let timeouts = rule.map(|r| r.timeouts.clone()).unwrap_or_default();
    // 0s turns a timeout off, as Gateway API and Istio read it.
    let per_try = timeouts.backend_request.map(|d| d.0).filter(|d| !d.is_zero());
    let request_timeout = timeouts.request.map(|d| d.0).filter(|d| !d.is_zero());
    // A gRPC client's own deadline bounds the call too (Istio honours `grpc-timeout` with no
    // cap); past it the client gets DEADLINE_EXCEEDED.
    let grpc_deadline = is_grpc(&parts.headers)
        .then(|| parts.headers.get("grpc-timeout").and_then(|v| grpc_timeout(v.as_bytes())))
        .flatten();
    let request_timeout = match (request_timeout, grpc_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let hash_config = snapshot
        .destinations
        .get(&format!("{backend_ns}/{backend_name}"))
        .and_then(|p| p.load_balancer.as_ref())
        .and_then(|lb| lb.consistent_hash.as_ref());
    let generated = hash_config.and_then(|h| generated_cookie(h, &parts.headers));
    let hash = match &generated {
        Some((hash, _)) => Some(*hash),
        None => hash_config.and_then(|h| consistent_hash_key(h, &parts.headers, down.client)),
    };
    // Mirrors get the body once the tries have read all of it (past the limit, no mirror);
    // the request itself streams on without waiting for them, as Envoy's shadows do.
    for m in &mirrors {
        match &body {
            Some(Payload::Buffered(b)) => {
                let body = || std::future::ready(Some(replay::WholeBody::unbudgeted(b.clone())));
                mirror(wp, snapshot, svc, &parts, down.client.is_ipv4(), body, m)
            }
            Some(Payload::Replay(r)) => {
                mirror(wp, snapshot, svc, &parts, down.client.is_ipv4(), || r.whole(), m)
            }
            _ => {}
        }
    }
    let _request = backend.budget.request_started();
    // Upstream connections are kept per original client identity, which each tunnel names.
    let source_tag = down.source_tag;
    // The request timeout covers the whole exchange, retries and the response body included.
    let request_deadline = request_timeout.map(|t| tokio::time::Instant::now() + t);

    let tries = async {
        let mut attempt = 0u32;
        let mut last_endpoint = None;
        let mut last_index = None;
        let mut retry_guard = None;
        loop {
            attempt += 1;
            let Some(permit) = backend.limits.try_request() else {
                let r = overloaded("upstream overloaded\n");
                return (
                    r,
                    Done {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        flags: "UO",
                        endpoint: last_endpoint,
                        attempts: attempt,
                    },
                );
            };
            let now = Instant::now();
            let ejected = |i| backend.outlier.is_ejected(i, now);
            // A retry goes to another endpoint when there is one (Envoy's previous_hosts, on
            // by default in Istio); a consistent hash keeps its endpoint.
            let Some(i) = backend.balancer.pick_try(random_u64(), hash, last_index, ejected) else {
                return (
                    full(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint\n"),
                    Done {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        flags: "UH",
                        endpoint: last_endpoint,
                        attempts: attempt,
                    },
                );
            };
            let endpoint = backend.endpoints[i].clone();
            last_endpoint = Some(endpoint.clone());
            *notes.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(endpoint.clone());
            last_index = Some(i);
            let payload = match &mut body {
                Some(Payload::Buffered(b)) => {
                    Full::new(b.clone()).map_err(|never| match never {}).boxed()
                }
                Some(Payload::Replay(r)) => r.next_try().boxed(),
                Some(Payload::Stream(_)) => match body.take() {
                    Some(Payload::Stream(b)) => b.map_err(BoxError::from).boxed(),
                    _ => Full::new(Bytes::new()).map_err(|never| match never {}).boxed(),
                },
                // A streamed body was spent on an earlier try.
                None => break_no_retry(),
            };
            let Some(ip) = endpoint
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == down.client.is_ipv4())
                .or(endpoint.ips.first())
                .copied()
            else {
                return (
                    full(StatusCode::SERVICE_UNAVAILABLE, "endpoint has no address\n"),
                    Done {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        flags: "UH",
                        endpoint: last_endpoint,
                        attempts: attempt,
                    },
                );
            };
            let mut req = build_request(&parts, payload, ip, target_port);
            // Which try this is, as Istio has Envoy tell every upstream request.
            req.headers_mut().insert("x-envoy-attempt-count", HeaderValue::from(attempt));
            let started = Instant::now();
            let try_deadline = per_try.map(|t| tokio::time::Instant::now() + t);
            let inflight = backend.balancer.start(i);
            let endpoint_key = endpoint.key();
            let pool = crate::upstream::Backend {
                key: backend.key.clone(),
                generation: backend.limits_generation,
            };
            let sent = wp.upstreams.send(req, http2, &endpoint_key, Some(source_tag), Some(&pool));
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, sent)
                    .await
                    .unwrap_or_else(|_| {
                        Err(UpstreamError::Reset {
                            endpoint: endpoint.key(),
                            reason: "per-try timeout".into(),
                        })
                    })
                    .map_err(|e| (e, per_try_timed_out(started, per_try))),
                None => sent.await.map_err(|e| (e, false)),
            };
            if let Err((UpstreamError::Overflow { .. }, _)) = &result {
                // The backend's maxConnections: an overflow, not the endpoint's failure.
                return (
                    overloaded("upstream connection limit reached\n"),
                    Done {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        flags: "UO",
                        endpoint: last_endpoint,
                        attempts: attempt,
                    },
                );
            }
            let outcome = match &result {
                Ok(resp) => grpc_outcome(resp).unwrap_or(Outcome::Status(resp.status().as_u16())),
                Err((_, true)) => Outcome::Timeout,
                Err((UpstreamError::Connect { .. } | UpstreamError::Overflow { .. }, _)) => {
                    Outcome::ConnectFailure
                }
                Err((UpstreamError::Reset { .. }, _)) => Outcome::Reset,
            };
            let health = match outcome {
                Outcome::Status(s) => Health::of_status(s),
                Outcome::Grpc(c) => Health::of_grpc(c),
                _ => Health::GatewayError,
            };
            if health == Health::Ok {
                backend.balancer.observe(i, started.elapsed());
            } else {
                backend.balancer.observe_failure(i, started.elapsed());
            }
            backend.outlier.record_health(i, health, Instant::now());
            // The policy decides what is retried (gRPC CANCELLED, or a 429 a route lists, are
            // not failures of the endpoint, yet retried).
            if body.as_ref().is_some_and(Payload::repeatable)
                && policy.should_retry_request(outcome, attempt, parts.method.as_str())
                && let Some(g) = backend.budget.try_retry()
            {
                retry_guard = Some(g);
                tokio::time::sleep(policy.backoff(attempt, random_u64())).await;
                continue;
            }
            return match result {
                Ok(mut resp) => {
                    let status = resp.status();
                    // A long answer (a gRPC stream, a download) counts toward the request limit
                    // and least-request balancing until its body ends, not just its headers.
                    // The retry it took is over once its answer is (Envoy resets its retry
                    // state at the response headers): held to the body's end, a few long
                    // streams that were retried once would use up the budget's minimum.
                    drop(retry_guard.take());
                    let mut held = Some((permit, inflight));
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        // An upgraded connection is a request in flight for as long as it
                        // lives, as in Envoy.
                        let up = hyper::upgrade::on(&mut resp);
                        splice_upgrade(downstream_upgrade.take(), up, held.take());
                    } else {
                        strip_hop_by_hop(resp.headers_mut());
                    }
                    let deadline = match (request_deadline, try_deadline) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
                    let resp = resp.map(|body| HeldBody { body, held, deadline });
                    let resp = resp.map(BodyExt::boxed);
                    (resp, Done { status, flags: "-", endpoint: last_endpoint, attempts: attempt })
                }
                Err((_, true)) => (
                    full(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                    Done {
                        status: StatusCode::GATEWAY_TIMEOUT,
                        flags: "UT",
                        endpoint: last_endpoint,
                        attempts: attempt,
                    },
                ),
                Err((e, false)) => (
                    full(StatusCode::SERVICE_UNAVAILABLE, format!("upstream failure: {e}\n")),
                    Done {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        flags: "UF",
                        endpoint: last_endpoint,
                        attempts: attempt,
                    },
                ),
            };
        }
    };
    let (mut resp, d) = match request_timeout {
        Some(t) => match tokio::time::timeout(t, tries).await {
            Ok(r) => r,
            Err(_) => (
                full(StatusCode::GATEWAY_TIMEOUT, "request timeout\n"),
                done(StatusCode::GATEWAY_TIMEOUT, "UT"),
            ),
        },
        None => tries.await,
    };
    for m in response_headers {
        modify_headers(resp.headers_mut(), m);
    }
    if let Some((_, set_cookie)) = generated {
        resp.headers_mut().append(header::SET_COOKIE, set_cookie);
    }
    if let Some(l) = parts.extensions.get::<RateLimitHeaders>() {
        resp.headers_mut().insert("x-ratelimit-limit", l.0.into());
        resp.headers_mut().insert("x-ratelimit-remaining", l.1.into());
        resp.headers_mut().insert("x-ratelimit-reset", l.2.into());
    }
    (resp, d, route_name)
}

/// A `grpc-timeout` value: at most 8 digits and a unit, H, M, S, m, u or n (the gRPC over
/// HTTP/2 spec); `None` when malformed, which leaves the call without a deadline.
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

fn per_try_timed_out(started: Instant, per_try: Option<Duration>) -> bool {
    per_try.is_some_and(|t| started.elapsed() >= t)
}

/// (limit, remaining, seconds to the next fill) to report on an admitted response.
#[derive(Clone, Copy)]
struct RateLimitHeaders(u32, u32, u64);

/// A duration in whole seconds, rounded up (rate-limit headers); `u64::MAX` never.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// gRPC answers errors as 200 with `grpc-status` in the headers (trailers-only responses).
fn grpc_outcome(resp: &Response<Incoming>) -> Option<Outcome> {
    let code: u32 = resp.headers().get("grpc-status")?.to_str().ok()?.parse().ok()?;
    (code != 0).then_some(Outcome::Grpc(code))
}

/// The value of cookie `name` in the request.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// For a hashing cookie with a `ttl` the request lacks, as Envoy does: a new cookie value
/// the request is hashed on, and the `Set-Cookie` that makes the client's next requests
/// carry it (so they reach the same endpoint). `None` when the request has the cookie or
/// the policy generates none.
fn generated_cookie(
    h: &sinew_model::ConsistentHash,
    headers: &HeaderMap,
) -> Option<(u64, HeaderValue)> {
    let c = h.http_cookie.as_ref()?;
    let ttl = c.ttl?;
    if cookie(headers, &c.name).is_some() {
        return None;
    }
    let value = format!("{:016x}", sinew_hbone::random_u64());
    let mut set = format!("{}={value}; Path={}", c.name, c.path.as_deref().unwrap_or("/"));
    if !ttl.0.is_zero() {
        set.push_str(&format!("; Max-Age={}", ttl.0.as_secs().max(1)));
    }
    set.push_str("; HttpOnly");
    Some((hash_key(value.as_bytes()), HeaderValue::from_str(&set).ok()?))
}

/// The consistent-hashing key the DestinationPolicy names: a header, a cookie or the client
/// address. `None` (no such header or cookie): the balancer falls back to P2C.
fn consistent_hash_key(
    h: &sinew_model::ConsistentHash,
    headers: &HeaderMap,
    client: SocketAddr,
) -> Option<u64> {
    if let Some(name) = &h.http_header_name {
        return headers.get(name.as_str()).map(|v| hash_key(v.as_bytes()));
    }
    if let Some(c) = &h.http_cookie {
        return cookie(headers, &c.name).map(|v| hash_key(v.as_bytes()));
    }
    h.use_source_ip.then(|| hash_key(client.ip().to_string().as_bytes()))
}

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1): the fixed ones and whichever the
/// `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && *t != "te")
        .collect();
    for name in &listed {
        h.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    ] {
        h.remove(name);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// A WebSocket upgrade's request headers: hop-by-hop headers go as for any request (those
/// the client's `Connection` lists, `Keep-Alive`, `Proxy-Connection`, a `TE` other than
/// trailers), keeping only the upgrade itself, as Envoy does.
fn prepare_upgrade_headers(h: &mut HeaderMap) {
    let upgrade = h.get(header::UPGRADE).cloned();
    strip_hop_by_hop(h);
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u);
    }
}

fn build_request(
    parts: &http::request::Parts,
    body: UpBody,
    ip: std::net::IpAddr,
    port: u16,
) -> Request<UpBody> {
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = endpoint_uri(ip, port, pq);
    // The client's Host (see `route_and_forward`); the pooled clients choose the upstream
    // version, and HTTP/2 ones turn Host into `:authority`.
    *req.headers_mut() = parts.headers.clone();
    req
}

/// Applies a filter of the kinds a backendRef may carry as well as a rule (request and
/// response header modifiers, mirrors); other kinds are left to the caller.
fn per_backend_filter<'a>(
    f: &'a HttpFilter,
    headers: &mut HeaderMap,
    response_headers: &mut Vec<&'a HeaderModifier>,
    mirrors: &mut Vec<&'a sinew_model::RequestMirror>,
) {
    match f {
        HttpFilter::RequestHeaderModifier { request_header_modifier: m } => {
            modify_headers(headers, m);
        }
        HttpFilter::ResponseHeaderModifier { response_header_modifier: m } => {
            response_headers.push(m);
        }
        HttpFilter::RequestMirror { request_mirror: m }
            if random_u64() % 100 < u64::from(m.percent) =>
        {
            mirrors.push(m);
        }
        _ => {}
    }
}

/// A response body that keeps `held` (request permits, in-flight counts) until it ends, fails
/// or is dropped.
///
/// With a `deadline` (the route's request or per-try timeout, which cover the whole response
/// as in Envoy and Gateway API), a body still streaming when it passes fails with
/// [`ResponseTimedOut`]: hyper then resets the client's stream (HTTP/2) or closes its
/// connection (HTTP/1.1), and dropping the backend's body resets the try.
struct HeldBody<B, H> {
    body: B,
    held: Option<H>,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// The route's timeout passed while the response body was still streaming.
#[derive(Debug, thiserror::Error)]
#[error("the route's timeout passed while the response body was streaming")]
pub struct ResponseTimedOut;

impl<B, H: Unpin> hyper::body::Body for HeldBody<B, H>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        // Checked before every frame: a body whose data is always ready (a download to a slow
        // reader) is cut at the deadline too.
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.held = None;
            return Poll::Ready(Some(Err(ResponseTimedOut.into())));
        }
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.held = None;
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// What a request body is while tries are made.
enum Payload {
    /// Kept in memory: every try sends a copy.
    Buffered(Bytes),
    /// Streamed while a copy is kept: a try repeats it while the copy is whole.
    Replay(replay::Recorder<ReqBody>),
    /// Streamed: the first try consumes it.
    Stream(ReqBody),
}

impl Payload {
    /// Whether another try can send the whole body.
    fn repeatable(&self) -> bool {
        match self {
            Self::Buffered(_) => true,
            Self::Replay(r) => r.replayable(),
            Self::Stream(_) => false,
        }
    }
}

/// Never reached: a streamed body means no retry (`should_retry` is not asked).
fn break_no_retry() -> UpBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

/// A WebSocket upgrade (`Connection: upgrade`, `Upgrade: websocket`). Other protocols (h2c,
/// say) are not tunnelled, as in Istio: after a 101 the requests on the connection would pass
/// no policy or route; their upgrade headers are dropped and the request goes on as it is.
fn parts_is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
        && h.get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// After a 101, joins the client's upgraded connection to the endpoint's, both ways.
/// `held` (the request's permit and in-flight count) lives as long as the spliced
/// connection; a connection that moves no byte either way for [`UPGRADE_IDLE_TIMEOUT`] is
/// closed.
fn splice_upgrade<H: Send + 'static>(
    down: Option<hyper::upgrade::OnUpgrade>,
    up: hyper::upgrade::OnUpgrade,
    held: H,
) {
    let Some(down) = down else { return };
    tokio::spawn(async move {
        let _held = held;
        let (Ok(down), Ok(up)) = (down.await, up.await) else { return };
        let (down, activity) = crate::idle::Watched::new(TokioIo::new(down));
        let (mut down, mut up) = (down, TokioIo::new(up));
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
            _ = activity.expired(UPGRADE_IDLE_TIMEOUT, UPGRADE_IDLE_TIMEOUT) => {}
        }
    });
}

/// How long a spliced (WebSocket) connection may move no byte either way.
const UPGRADE_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Sends a copy of the request to the mirror's backend and forgets the answer. The copy's
/// Host gets Envoy's `-shadow` suffix so the backend can tell copies apart.
/// HTTP/2 upstream for services that declare it on `port` (gRPC included) and for gRPC
/// requests; HTTP/1.1 otherwise, whatever the client spoke.
fn upstream_http2(svc: &ServiceInfo, port: u16, headers: &HeaderMap) -> bool {
    svc.ports
        .iter()
        .find(|p| p.port.0 == port)
        .and_then(|p| p.app_protocol.as_deref())
        .is_some_and(|a| matches!(a, "http2" | "grpc" | "h2c" | "kubernetes.io/h2c"))
        || is_grpc(headers)
}

/// A random UUID (version 4), as Envoy makes `x-request-id`.
fn request_id() -> String {
    let (a, b) = (random_u64(), random_u64());
    let a = (a & !0xf000) | 0x4000;
    let b = (b & !(0xc << 60)) | (0x8 << 60);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// A Host header's host and port: `[fd00::10]:8080` is (`[fd00::10]`, 8080), brackets kept;
/// `[fd00::10]` has no port.
fn split_host(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => {
                let (h, rest) = host.split_at(end + 1);
                (h, rest.strip_prefix(':'))
            }
            None => (host, None),
        };
    }
    match host.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host, None),
    }
}

/// HTTP/2 splits cookies into one field per crumb (RFC 9113 section 8.2.3); they are joined
/// back with "; " before the request goes on, as Envoy's HTTP/2 codec does: an HTTP/1.1
/// backend may read two `Cookie` lines as one joined by ",", and header matches on `cookie`
/// see the one value a client meant.
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes()).collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// How long a mirrored request may take; its answer is dropped anyway.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

fn mirror<F>(
    wp: &Arc<Waypoint>,
    snapshot: &Snapshot,
    svc: &ServiceInfo,
    parts: &http::request::Parts,
    v4: bool,
    body: impl FnOnce() -> F,
    m: &sinew_model::RequestMirror,
) where
    F: std::future::Future<Output = Option<replay::WholeBody>> + Send + 'static,
{
    let ns = m.backend_ref.namespace.as_deref().unwrap_or(&svc.namespace);
    let Some(backend) = wp.backend(snapshot, ns, &m.backend_ref.name) else { return };
    let Some(target) = snapshot.mesh.service(ns, &m.backend_ref.name) else { return };
    // A port the Service lacks is an invalid backend: no mirror.
    let Some(port) = target.target_port(m.backend_ref.port.0) else { return };
    let now = Instant::now();
    let Some(i) = backend.balancer.pick(random_u64(), None, |i| backend.outlier.is_ejected(i, now))
    else {
        return;
    };
    let endpoint = backend.endpoints[i].clone();
    let ips = &endpoint.ips;
    let Some(ip) = ips.iter().find(|ip| ip.is_ipv4() == v4).or(ips.first()).copied() else {
        return;
    };
    // The mirror backend's circuit breakers hold for shadow traffic too (as Envoy sends it
    // through the shadow cluster): over its request limit the mirror is dropped, not queued.
    let Some(permit) = backend.limits.try_request() else { return };
    let mut req =
        build_request(parts, Empty::new().map_err(|never| match never {}).boxed(), ip, port);
    if let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) {
        let (h, p) = split_host(host);
        let shadow = match p {
            Some(p) => format!("{h}-shadow:{p}"),
            None => format!("{h}-shadow"),
        };
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let http2 = upstream_http2(target, m.backend_ref.port.0, &parts.headers);
    let wp = wp.clone();
    let pool = crate::upstream::Backend {
        key: backend.key.clone(),
        generation: backend.limits_generation,
    };
    // Asked for only now that a mirror will go: a copy kept for none would be wasted.
    let body = body();
    tokio::spawn(async move {
        let _permit = permit;
        let key = endpoint.key();
        let _ = tokio::time::timeout(MIRROR_TIMEOUT, async move {
            let Some(body) = body.await else { return };
            // The body itself holds its place in the replay budget, until hyper lets it go.
            let req = req.map(|_| body.map_err(|never| match never {}).boxed());
            let _ = wp.upstreams.send(req, http2, &key, None, Some(&pool)).await;
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn backend_input_cannot_grow_labels_or_spans_without_bound() {
        // grpc-status outside 0-16 is UNKNOWN: one label value, not one per number.
        for (v, want) in [("0", Some(0)), ("16", Some(16)), ("17", Some(2)), ("65535", Some(2))] {
            assert_eq!(grpc_status_of(&headers(&[("grpc-status", v)])), want, "{v}");
        }
        assert_eq!(grpc_status_of(&headers(&[("grpc-status", "x")])), None);
        // Span paths are cut at 256 bytes, on a character boundary.
        let long = "/é".repeat(200);
        let cut = truncated(&long, SPAN_PATH_MAX);
        assert!(cut.len() <= SPAN_PATH_MAX && long.starts_with(cut) && cut.len() > 250);
        assert_eq!(truncated("/short", SPAN_PATH_MAX), "/short");
    }

    #[test]
    fn a_hashing_cookie_with_a_ttl_is_generated_when_missing_and_then_sticks() {
        let policy = |ttl: u64| sinew_model::ConsistentHash {
            http_cookie: Some(sinew_model::HttpCookie {
                name: "sticky".into(),
                path: Some("/shop".into()),
                ttl: Some(sinew_model::Duration(Duration::from_secs(ttl))),
            }),
            ..Default::default()
        };
        let client = "198.18.1.10:4000".parse().unwrap();
        let (hash, set) = generated_cookie(&policy(3600), &HeaderMap::new()).expect("generated");
        let set = set.to_str().unwrap().to_owned();
        assert!(
            set.starts_with("sticky=") && set.ends_with("; Path=/shop; Max-Age=3600; HttpOnly"),
            "{set}"
        );
        // The client sends it back: the same hash, nothing generated again.
        let value = set.trim_start_matches("sticky=").split(';').next().unwrap();
        let back = headers(&[]);
        let mut back = back;
        back.insert("cookie", HeaderValue::from_str(&format!("sticky={value}")).unwrap());
        assert!(generated_cookie(&policy(3600), &back).is_none());
        assert_eq!(consistent_hash_key(&policy(3600), &back, client), Some(hash));
        // ttl 0s: a session cookie.
        let (_, session) = generated_cookie(&policy(0), &HeaderMap::new()).unwrap();
        assert!(!session.to_str().unwrap().contains("Max-Age"), "{session:?}");
    }

    #[test]
    fn an_upgrade_keeps_only_the_upgrade_of_its_hop_by_hop_headers() {
        let mut h = headers(&[
            ("connection", "Upgrade, X-Internal"),
            ("upgrade", "websocket"),
            ("x-internal", "1"),
            ("keep-alive", "5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        prepare_upgrade_headers(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in [&b""[..], b"m", b"100", b"100x", b"123456789S", b"-1S", b"1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn hosts_split_from_their_port_with_ipv6_brackets_kept() {
        assert_eq!(split_host("[fd00::10]:8080"), ("[fd00::10]", Some("8080")));
        assert_eq!(split_host("[fd00::10]"), ("[fd00::10]", None));
        assert_eq!(split_host("shop.example:80"), ("shop.example", Some("80")));
        assert_eq!(split_host("shop.example"), ("shop.example", None));
        assert_eq!(split_host("198.18.0.1:80"), ("198.18.0.1", Some("80")));
    }

    #[test]
    fn http2_cookie_crumbs_are_joined_into_one_field() {
        let mut h = headers(&[("cookie", "a=1"), ("cookie", "session=xyz"), ("x-other", "1")]);
        join_cookie_crumbs(&mut h);
        let all: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(all, ["a=1; session=xyz"]);
        let mut one = headers(&[("cookie", "a=1")]);
        join_cookie_crumbs(&mut one);
        assert_eq!(one.get_all("cookie").iter().count(), 1);
    }

    #[test]
    fn consistent_hash_keys_come_from_the_configured_source() {
        let client: SocketAddr = "198.18.1.10:4000".parse().unwrap();
        let by_header = sinew_model::ConsistentHash {
            http_header_name: Some("x-user".into()),
            ..Default::default()
        };
        let h = headers(&[("x-user", "alice")]);
        assert_eq!(consistent_hash_key(&by_header, &h, client), Some(hash_key(b"alice")));
        assert_eq!(consistent_hash_key(&by_header, &HeaderMap::new(), client), None);
        let by_cookie = sinew_model::ConsistentHash {
            http_cookie: Some("session".into()),
            ..Default::default()
        };
        let h = headers(&[("cookie", "a=1; session=xyz"), ("cookie", "b=2")]);
        assert_eq!(consistent_hash_key(&by_cookie, &h, client), Some(hash_key(b"xyz")));
        assert!(generated_cookie(&by_cookie, &HeaderMap::new()).is_none(), "no ttl: none made");
        let by_ip = sinew_model::ConsistentHash { use_source_ip: true, ..Default::default() };
        assert_eq!(
            consistent_hash_key(&by_ip, &HeaderMap::new(), client),
            Some(hash_key(b"198.18.1.10"))
        );
    }

    #[test]
    fn trace_context_is_continued_or_started() {
        let ctx =
            |v: &str| TraceContext::continue_or_start(Some(&HeaderValue::from_str(v).unwrap()));
        let child = ctx("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let s = child.to_string();
        assert!(s.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{s}");
        assert!(!s.contains("b7ad6b7169203331"), "a new span id: {s}");
        assert!(s.ends_with("-01") && child.sampled() && child.continued());
        assert_eq!(child.parent, Some(0xb7ad_6b71_6920_3331));
        // Unsampled: propagated as such.
        let unsampled = ctx("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
        assert!(!unsampled.sampled() && unsampled.to_string().ends_with("-00"));
        // A later version is read by its first four fields and answered as version 00.
        let later = ctx("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-next");
        assert!(later.continued() && later.to_string().starts_with("00-0af76519"), "{later:?}");
        // Invalid (W3C Trace Context 3.2): ignored, a new sampled trace starts.
        for bad in [
            "garbage",
            "",
            "00-xyz-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-zzzzzzzzzzzzzzzz-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-zz",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let fresh = ctx(bad);
            let s = fresh.to_string();
            assert!(
                !fresh.continued() && fresh.sampled() && !s.contains("0af7651916cd43dd"),
                "{bad}: {s}"
            );
            let parts: Vec<&str> = s.split('-').collect();
            assert_eq!(parts.len(), 4, "{s}");
            assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16), "{s}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_but_te_trailers_kept() {
        let mut h = headers(&[
            ("connection", "keep-alive"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("x-app", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert!(h.get("connection").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-app").unwrap(), "1");
        // Headers the Connection header names go too; a bad name there is ignored.
        let mut h = headers(&[
            ("connection", "X-Foo, close"),
            ("connection", "bad name, te"),
            ("x-foo", "1"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ("x-app", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["te", "x-app"]);
    }

    #[test]
    fn rate_limit_buckets_are_per_route_kind_rule_and_filter() {
        let rule = |kind| CompiledRule {
            route: "shop/api".into(),
            kind,
            index: 1,
            backends: Vec::new(),
            filters: Vec::new(),
            timeouts: Default::default(),
            retry: None,
        };
        let (http, grpc) = (rule("HTTPRoute"), rule("GRPCRoute"));
        let keys = [bucket_key(&http, 0), bucket_key(&http, 1), bucket_key(&grpc, 0)];
        assert!(keys[0] != keys[1] && keys[0] != keys[2] && keys[1] != keys[2], "{keys:?}");
        assert_eq!(bucket_key(&http, 0), keys[0], "stable across requests");
    }

    #[test]
    fn grpc_is_told_by_its_content_types_not_grpc_web() {
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/grpcx", false),
            ("application/json", false),
        ] {
            let h = headers(&[("content-type", ct)]);
            assert_eq!(is_grpc(&h), grpc, "{ct}");
        }
    }

    #[test]
    fn local_answers_to_grpc_requests_are_grpc_statuses() {
        for (status, timed_out, code) in [
            (403, false, "7"),
            (429, false, "14"),
            (503, false, "14"),
            (504, false, "14"),
            (504, true, "4"),
            (418, false, "2"),
        ] {
            let mut r = full(StatusCode::from_u16(status).unwrap(), "RBAC: access denied (x%)\n");
            let text = r.extensions_mut().remove::<LocalReply>().expect("marked local").0;
            as_grpc(&mut r, &text, timed_out);
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-type"], "application/grpc");
            assert_eq!(r.headers()["grpc-status"], code, "{status}");
            assert_eq!(r.headers()["grpc-message"], "RBAC: access denied (x%25)");
            assert!(r.body().is_end_stream(), "trailers only");
        }
    }

    #[test]
    fn held_guards_live_until_the_body_ends() {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let guard = Arc::new(());
        let body = HeldBody {
            body: Full::new(Bytes::from_static(b"answer")),
            held: Some(guard.clone()),
            deadline: None,
        };
        let mut body = std::pin::pin!(body);
        let first = rt.block_on(body.as_mut().frame()).expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "answer");
        assert_eq!(Arc::strong_count(&guard), 2, "held while the body may still send");
        assert!(rt.block_on(body.as_mut().frame()).is_none());
        assert_eq!(Arc::strong_count(&guard), 1, "released at the end");
    }

    /// Sends one frame, then never another.
    struct Stalls(bool);

    impl hyper::body::Body for Stalls {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            if std::mem::replace(&mut self.0, true) {
                return std::task::Poll::Pending;
            }
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"half")))))
        }
    }

    #[test]
    fn a_body_still_streaming_at_the_deadline_fails_and_lets_go() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("rt");
        let guard = Arc::new(());
        let started = std::time::Instant::now();
        let err = rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
            let body = HeldBody {
                body: Stalls(false),
                held: Some(guard.clone()),
                deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            };
            let mut body = std::pin::pin!(body);
            let first = body.as_mut().frame().await.expect("a frame").expect("data");
            assert_eq!(first.into_data().expect("data"), "half");
            body.as_mut().frame().await.expect("an end").expect_err("a timeout")
        });
        assert!(err.is::<ResponseTimedOut>(), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(Arc::strong_count(&guard), 1, "released when the deadline passed");
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = request_id();
        let parts: Vec<&str> = id.split('-').collect();
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert_eq!(lens, [8, 4, 4, 4, 12], "{id}");
        assert!(parts[2].starts_with('4'), "{id}");
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'), "{id}");
        assert_ne!(request_id(), id);
    }

    #[test]
    fn only_websocket_upgrades_are_tunnelled() {
        let ws = headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "WebSocket")]);
        assert!(parts_is_upgrade(&ws));
        let h2c = headers(&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")]);
        assert!(!parts_is_upgrade(&h2c));
        assert!(!parts_is_upgrade(&headers(&[("upgrade", "websocket")])));
    }
}
