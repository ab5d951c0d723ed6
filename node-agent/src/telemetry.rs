//! What the agent reports: Istio's `istio_tcp_*` metrics (same names and labels, so existing
//! dashboards work), authorization decisions, and one JSON access-log line per connection.

use std::{net::SocketAddr, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Serialize;
pub use sinew_telemetry::{
    labels::{DestinationLabels, SourceLabels},
    tcp::{ByteCounters, TcpLabels, TcpMetrics},
};

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
    /// The `istio_tcp_*` families.
    pub tcp: TcpMetrics,
    /// `sinew_authorization_decisions_total`.
    pub decisions: Family<DecisionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        let decisions = Family::default();
        registry.register(
            "sinew_authorization_decisions",
            "L4 authorization decisions on inbound connections",
            decisions.clone(),
        );
        Metrics { registry, tcp, decisions }
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
        let bytes = m.tcp.bytes(&labels);
        bytes.add(60, 0);
        bytes.add(40, 1000);
        m.tcp.closed(&labels);
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
