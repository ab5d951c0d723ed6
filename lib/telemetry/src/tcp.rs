//! Istio's `istio_tcp_*` metrics, for the agents (reporters `source` and `destination`, as
//! ztunnel reports them) and for the waypoint's plain TCP ports (reporter `waypoint`, as an
//! Istio waypoint reports them): same names, same labels.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::labels::{DestinationLabels, SourceLabels};

/// The labels of every `istio_tcp_*` series: Istio's names and values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (an agent's outbound side), `destination` (its inbound side) or `waypoint`.
    pub reporter: &'static str,
    /// `source_workload`, `source_principal`, `source_canonical_service`, ...
    #[prometheus(flatten)]
    pub source: SourceLabels,
    /// `destination_workload`, `destination_service`, ...
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    /// Always `tcp` at L4.
    pub request_protocol: &'static str,
    /// `-`, or ztunnel's and Envoy's flags: `DENY` (agent) or `RBAC` (waypoint) when
    /// authorization refused the connection, `CONNECT` (agent) or `UF` (waypoint) when the
    /// destination could not be reached; at the waypoint also `NC` (no such backend), `UO`
    /// (connection limit) and `UH` (no healthy endpoint).
    pub response_flags: &'static str,
    /// `mutual_tls` over HBONE, `unknown` for plaintext (as ztunnel).
    pub connection_security_policy: &'static str,
}

/// `istio_tcp_connections_opened_total`, `..._closed_total`, `istio_tcp_received_bytes_total`
/// and `istio_tcp_sent_bytes_total`.
#[derive(Default)]
pub struct TcpMetrics {
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
}

impl TcpMetrics {
    /// Registers the four families in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during response (from the destination back to the source)",
            self.response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during request (from the source toward the destination)",
            self.request_bytes.clone(),
        );
    }

    /// Counts an opened connection.
    pub fn opened(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// Counts a closed connection.
    pub fn closed(&self, labels: &TcpLabels) {
        self.closed.get_or_create(labels).inc();
    }

    /// Counts a connection that ended before it carried a byte (refused, or its destination
    /// unreachable): opened and closed at once, as ztunnel counts them.
    pub fn refused(&self, labels: &TcpLabels) {
        self.opened(labels);
        self.closed(labels);
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
