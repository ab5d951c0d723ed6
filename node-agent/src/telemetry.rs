//! What the agent reports: Istio's `istio_tcp_*` metrics (same names and labels, so existing
//! dashboards work), authorization decisions, and one JSON access-log line per connection.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Serialize;
pub use sinew_telemetry::labels::{DestinationLabels, SourceLabels};

/// The labels of every `istio_tcp_*` series: Istio's names and values, as ztunnel reports
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    /// `source_workload`, `source_principal`, `source_canonical_service`, ...
    #[prometheus(flatten)]
    pub source: SourceLabels,
    /// `destination_workload`, `destination_service`, ...
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    /// Always `tcp` at L4.
    pub request_protocol: &'static str,
    /// `-`, or `DENY` when authorization refused the connection, `CONNECT` when the
    /// destination could not be reached (ztunnel's flags).
    pub response_flags: &'static str,
    /// `mutual_tls` over HBONE, `unknown` for plaintext (as ztunnel).
    pub connection_security_policy: &'static str,
}

/// The labels of `sinew_authorization_decisions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny` or `audit` (admitted, but an AUDIT policy matched).
    pub decision: &'static str,
    /// The deciding policy (`<namespace>/<name>`), or `-`.
    pub policy: String,
    /// Destination workload name.
    pub destination_workload: String,
    /// Destination workload namespace.
    pub destination_workload_namespace: String,
    /// Source principal, or `unknown`.
    pub source_principal: String,
}

/// `response_flags` of a connection whose destination could not be reached (ztunnel's
/// `ConnectionFailure`).
pub const CONNECT_FAILED: &str = "CONNECT";

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// `istio_tcp_connections_opened_total`.
    pub opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total`: bytes of the request, from the source toward the
    /// destination (Istio: "bytes received during request").
    pub request_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total`: bytes of the response, from the destination back
    /// (Istio: "bytes sent during response").
    pub response_bytes: Family<TcpLabels, Counter>,
    /// `sinew_authorization_decisions_total`.
    pub decisions: Family<DecisionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            opened: Family::default(),
            closed: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            decisions: Family::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during response (from the destination back to the source)",
            m.response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during request (from the source toward the destination)",
            m.request_bytes.clone(),
        );
        registry.register(
            "sinew_authorization_decisions",
            "L4 authorization decisions on inbound connections",
            m.decisions.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Adds `sinew_access_log_lines_dropped_total` for `access`.
    pub fn count_dropped_lines(&mut self, access: &sinew_telemetry::AccessLog) {
        self.registry.register_collector(Box::new(access.dropped_lines()));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a closed connection.
    pub fn closed(&self, labels: &TcpLabels) {
        self.closed.get_or_create(labels).inc();
    }

    /// The byte counters of a connection's series, to count into as bytes flow (ztunnel's
    /// way: a long-lived connection's traffic shows while it lives, and bytes moved before a
    /// reset count too).
    pub fn bytes(&self, labels: &TcpLabels) -> ByteCounters {
        ByteCounters {
            toward: self.request_bytes.get_or_create(labels).clone(),
            back: self.response_bytes.get_or_create(labels).clone(),
            totals: Default::default(),
        }
    }
}

/// One connection's bytes: `istio_tcp_received_bytes_total` (toward the destination) and
/// `istio_tcp_sent_bytes_total` (back from it) of its series, and its own totals for the
/// access log (which a reset does not lose).
pub struct ByteCounters {
    toward: Counter,
    back: Counter,
    totals: [AtomicU64; 2],
}

impl ByteCounters {
    /// Counts bytes moved `toward` the destination and `back` from it.
    pub fn add(&self, toward: u64, back: u64) {
        if toward > 0 {
            self.toward.inc_by(toward);
            self.totals[0].fetch_add(toward, Ordering::Relaxed);
        }
        if back > 0 {
            self.back.inc_by(back);
            self.totals[1].fetch_add(back, Ordering::Relaxed);
        }
    }

    /// (toward the destination, back from it) so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.totals[0].load(Ordering::Relaxed), self.totals[1].load(Ordering::Relaxed))
    }
}

/// One side of a connection in the access log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Peer {
    /// Address.
    pub addr: Option<SocketAddr>,
    /// `<namespace>/<name>` of the workload, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// SPIFFE id, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Service (`<name>.<namespace>`), for destinations reached through one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The waypoint a source came through (its SPIFFE id); `identity` is then the original
    /// client's, as the waypoint named it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// One access-log line.
#[derive(Debug, Clone, Serialize)]
pub struct AccessEntry {
    /// Seconds since the epoch, when the connection ended.
    pub ts: f64,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The pod whose traffic this is (`<namespace>/<name>`).
    pub pod: String,
    /// `HBONE` (mutual TLS) or `TCP` (plaintext).
    pub protocol: &'static str,
    /// Where it came from.
    pub src: Peer,
    /// Where it went.
    pub dst: Peer,
    /// `allow`, `deny` or `audit` (inbound), `-` when not evaluated here.
    pub decision: &'static str,
    /// The deciding policy, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Why, in a sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes toward the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination.
    pub bytes_received: u64,
    /// How long the connection lasted.
    pub duration_ms: u64,
    /// What went wrong, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AccessEntry {
    /// A line for a connection that lasted `duration`.
    pub fn new(
        direction: &'static str,
        pod: &str,
        protocol: &'static str,
        duration: Duration,
    ) -> Self {
        Self {
            ts: sinew_telemetry::unix_seconds(),
            direction,
            pod: pod.to_owned(),
            protocol,
            src: Peer::default(),
            dst: Peer::default(),
            decision: "-",
            policy: None,
            reason: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: duration.as_millis() as u64,
            error: None,
        }
    }
}

pub use sinew_telemetry::AccessLog;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_are_received_and_response_bytes_sent_as_istio_counts_them() {
        let m = Metrics::default();
        let labels = TcpLabels {
            reporter: "destination",
            source: SourceLabels::new(None, None, None),
            destination: DestinationLabels::new(None, None, None, None),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: "unknown",
        };
        let bytes = m.bytes(&labels);
        bytes.add(60, 0);
        bytes.add(40, 1000);
        m.closed(&labels);
        assert_eq!(bytes.totals(), (100, 1000));
        let text = m.encode();
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit_once(' '))
                .map(|(_, v)| v.to_owned())
                .unwrap_or_default()
        };
        assert_eq!(value("istio_tcp_received_bytes_total"), "100", "{text}");
        assert_eq!(value("istio_tcp_sent_bytes_total"), "1000", "{text}");
    }
}
