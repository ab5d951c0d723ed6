//! Istio's request metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! same names and labels; `istio_tcp_*` on plain TCP ports) and one JSON access-log line per
//! request (per connection on plain TCP ports).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use serde::Serialize;
pub use sinew_telemetry::{
    labels::{DestinationLabels, SourceLabels},
    tcp::{ByteCounters, TcpLabels, TcpMetrics},
};

/// The labels of the request metrics: Istio's names and values, as a waypoint reports them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// `source_workload`, `source_principal`, `source_canonical_service`, ...
    #[prometheus(flatten)]
    pub source: SourceLabels,
    /// `destination_workload`, `destination_service`, ...
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// The status answered.
    pub response_code: u16,
    /// A gRPC call's `grpc-status` (from its trailers, or a trailers-only answer); empty
    /// for other requests, and for a call that ended without one.
    pub grpc_response_status: String,
    /// `-`, or Envoy's flags: `UF` upstream failure, `UT` timeout, `RL` rate limited,
    /// `FI` injected fault, `DI` injected delay, `UO` overflow, `NR` no route, `UH` no
    /// healthy endpoint, `NC` no such backend Service, `RBAC` denied.
    pub response_flags: &'static str,
    /// Always `mutual_tls`.
    pub connection_security_policy: &'static str,
}

/// The labels of `sinew_authorization_decisions_total` at the waypoint (as the agent's, per
/// service instead of per workload).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `deny`, or `audit` (admitted, an AUDIT policy matched).
    pub decision: &'static str,
    /// The policy (`<namespace>/<name>`).
    pub policy: String,
    /// The service's name.
    pub destination_service_name: String,
    /// The service's namespace.
    pub destination_service_namespace: String,
    /// Source principal.
    pub source_principal: String,
}

/// The waypoint's metrics.
pub struct Metrics {
    registry: Registry,
    /// `sinew_authorization_decisions_total`: denials and audits of requests and of plain TCP
    /// connections, per policy.
    pub decisions: Family<DecisionLabels, Counter>,
    /// `istio_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: Family<RequestLabels, Histogram>,
    /// `istio_request_bytes`: request body sizes.
    pub request_bytes: Family<RequestLabels, Histogram>,
    /// `istio_response_bytes`: response body sizes.
    pub response_bytes: Family<RequestLabels, Histogram>,
    /// The `istio_tcp_*` families, for plain TCP ports (reporter `waypoint`).
    pub tcp: TcpMetrics,
}

/// Istio's size buckets, in bytes.
const BYTE_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];

/// Istio's duration buckets, in milliseconds.
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(BUCKETS)) as fn() -> Histogram,
        );
        registry.register("istio_requests", "Requests served", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            duration.clone(),
        );
        let sizes = || {
            Family::<RequestLabels, Histogram>::new_with_constructor(
                (|| Histogram::new(BYTE_BUCKETS)) as fn() -> Histogram,
            )
        };
        let (request_bytes, response_bytes) = (sizes(), sizes());
        registry.register("istio_request_bytes", "Request body sizes", request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes", response_bytes.clone());
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "sinew_authorization_decisions",
            "Authorization decisions that denied a request or TCP connection, or matched an AUDIT policy",
            decisions.clone(),
        );
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        Self { registry, decisions, requests, duration, request_bytes, response_bytes, tcp }
    }
}

/// The series of one label set, to record into without building and hashing the labels
/// again (see `Downstream`'s cache).
#[derive(Clone)]
pub struct Recorder {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Recorder {
    /// Counts one request that took `millis`, with its body sizes.
    pub fn record(&self, millis: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(millis);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

impl Metrics {
    /// The series of `labels`, created if new.
    pub fn recorder(&self, labels: &RequestLabels) -> Recorder {
        Recorder {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// Counts an L7 authorization `decision` (`deny` or `audit`) by `policy` on `svc`.
    pub fn decision(
        &self,
        decision: &'static str,
        policy: &str,
        svc: &sinew_mesh::ServiceInfo,
        source_principal: &str,
    ) {
        self.decisions
            .get_or_create(&DecisionLabels {
                decision,
                policy: policy.to_owned(),
                destination_service_name: svc.name.clone(),
                destination_service_namespace: svc.namespace.clone(),
                source_principal: source_principal.to_owned(),
            })
            .inc();
    }

    /// Adds `sinew_access_log_lines_dropped_total` for `access`.
    pub fn count_dropped_lines(&mut self, access: &sinew_telemetry::AccessLog) {
        self.registry.register_collector(Box::new(access.dropped_lines()));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One access-log line.
#[derive(Debug, Clone, Serialize)]
pub struct RequestEntry {
    /// Seconds since the epoch, when the answer was sent.
    pub ts: f64,
    /// Method.
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// Service addressed (`<name>.<namespace>:<port>`).
    pub service: String,
    /// The rule that routed it (`<route>#<rule>`), if any.
    pub route: Option<String>,
    /// Status answered.
    pub status: u16,
    /// A gRPC call's `grpc-status` (trailers or trailers-only answer), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
    /// Response flags, as in the metrics.
    pub flags: &'static str,
    /// The endpoint of the last try.
    pub upstream: Option<String>,
    /// Tries made.
    pub attempts: u32,
    /// Source identity.
    pub source: String,
    /// Time to the answer's headers.
    pub duration_ms: f64,
    /// W3C trace context sent upstream.
    pub traceparent: Option<String>,
    /// The AUDIT policies its L7 authorization matched, if any (`ns/name`, comma-separated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<String>,
}

/// One access-log line of a connection to a plain TCP port (Envoy's TCP proxy logs one per
/// connection too). Its fields share names with [`RequestEntry`]'s where they mean the same.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionEntry {
    /// Seconds since the epoch, when the connection ended.
    pub ts: f64,
    /// Always `tcp`, telling these lines from request lines.
    pub protocol: &'static str,
    /// Service addressed (`<name>.<namespace>:<port>`).
    pub service: String,
    /// `-`, or Envoy's flags: `RBAC` denied (refused, or closed by a policy change), `NC` no
    /// such backend, `UO` connection limit, `UH` no healthy endpoint, `UF` the endpoint could
    /// not be reached.
    pub flags: &'static str,
    /// The endpoint the connection went to, if one was picked.
    pub upstream: Option<String>,
    /// Source identity.
    pub source: String,
    /// Bytes from the client toward the endpoint.
    pub bytes_sent: u64,
    /// Bytes from the endpoint back.
    pub bytes_received: u64,
    /// How long the connection lasted.
    pub duration_ms: f64,
    /// What went wrong, if anything: the endpoint unreachable, a reset on either side, a
    /// policy change closing it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The policy that decided, when one did (`ns/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Why it was denied, in a sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The AUDIT policies its authorization matched, if any (`ns/name`, comma-separated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<String>,
}

pub use sinew_telemetry::AccessLog;
