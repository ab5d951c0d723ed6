//! `sinew-waypoint`: the optional L7 proxy. Node agents send the traffic of services
//! labelled `sinew.io/use-waypoint=<name>` to the waypoint of that name over HBONE; the
//! waypoint terminates the tunnel, serves HTTP/1.1 and HTTP/2 (gRPC included) on it, routes
//! each request with HTTPRoute/GRPCRoute (`sinew-l7`), applies the rule's filters, timeouts,
//! retries, rate limits and faults, picks an endpoint (load balancing, outlier detection,
//! circuit breaking) and forwards the request over HBONE with its own identity.
//!
//! - [`state`]: the configuration in force and the per-rule and per-service state that
//!   survives configuration changes (token buckets, balancers, ejections).
//! - [`proxy`]: one request, end to end.
//! - [`upstream`]: HTTP to an endpoint through an HBONE stream.
//! - [`replay`]: request bodies that stream to a try while kept for the next one.
//! - [`tcp`]: plain TCP service ports, passed through to an endpoint unparsed.
//! - [`telemetry`]: Istio's request metrics (`istio_tcp_*` on plain TCP ports) and the JSON
//!   access log.
//! - [`otlp`]: OpenTelemetry span export (OTLP/HTTP JSON).
#![forbid(unsafe_code)]

pub mod idle;
pub mod otlp;
pub mod proxy;
pub mod replay;
pub mod state;
pub mod tcp;
pub mod telemetry;
pub mod upstream;
