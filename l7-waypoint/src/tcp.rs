//! Service ports that speak plain TCP: `appProtocol: tcp`, or a port named `tcp` or `tcp-*`
//! (Istio's naming convention, [`ServiceInfo::is_tcp_port`]). Putting a namespace behind a
//! waypoint must not break its databases and queues, so their bytes pass through unparsed:
//! to an endpoint the service's balancer picks (skipping ejected ones, within its connection
//! limits), over HBONE as the waypoint naming the original client, with half-close and
//! resets carried across. The destination agent then applies its L4 policy to that client.
//!
//! The policies attached to the service or the waypoint (`targetRefs`) apply here too, with
//! the L4 rule semantics ([`sinew_mesh::Authz::check_tcp`]): a connection they deny is
//! refused with 401, as an agent refuses one, and a configuration change that denies an open
//! connection resets it. Every connection gets one access-log line.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::StatusCode;
use sinew_hbone::{H2Stream, Inbound, random_u64};
use sinew_identity::SpiffeId;
use sinew_mesh::{CLOSED_BY_POLICY, ServiceInfo, WorkloadInfo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};
use tracing::debug;

use crate::{
    state::{Snapshot, Waypoint},
    telemetry::{ByteCounters, ConnectionEntry, DestinationLabels, SourceLabels, TcpLabels},
    upstream::{self, open_tunnel},
};

/// Serves one CONNECT to plain TCP port `port` of `service`: authorizes it, then carries the
/// bytes through to an endpoint. `client` is the original client's address.
pub async fn serve(
    wp: Arc<Waypoint>,
    inbound: Inbound,
    service: Arc<ServiceInfo>,
    port: u16,
    client: SocketAddr,
) {
    let start = Instant::now();
    let source = inbound.peer.clone();
    let mut entry = ConnectionEntry {
        ts: 0.0,
        protocol: "tcp",
        service: format!("{}.{}:{port}", service.name, service.namespace),
        flags: "-",
        upstream: None,
        source: source.to_string(),
        bytes_sent: 0,
        bytes_received: 0,
        duration_ms: 0.0,
        error: None,
        policy: None,
        reason: None,
        audit: None,
    };
    // Every configuration after the one decided on here decides the connection again.
    let mut changes = wp.snapshot.clone();
    let snapshot = changes.borrow_and_update().clone();
    let principal = (&*source, entry.source.as_str());
    if let Some(d) = wp.authorize(&snapshot, &service, port, principal, client.ip(), None) {
        if !d.audited.is_empty() {
            entry.audit = Some(d.audited.join(","));
        }
        entry.policy = d.policy.clone();
        if !d.allowed() {
            debug!(service = %entry.service, source = %entry.source, reason = %d.reason, "TCP deny");
            inbound.refuse(StatusCode::UNAUTHORIZED);
            entry.flags = "RBAC";
            entry.reason = Some(d.reason.into_owned());
            count_failed(&wp, &snapshot, &service, (&source, client), &entry);
            return log(&wp, entry, start);
        }
    }
    let source_tag = wp.source_tag(&entry.source);
    match inbound.accept() {
        Ok(down) => {
            let peer = Peer { source: &source, client, source_tag, changes };
            if !forward(&wp, down, &service, port, peer, &mut entry).await {
                count_failed(&wp, &snapshot, &service, (&source, client), &entry);
            }
        }
        Err(e) => {
            debug!(error = %e, "CONNECT accept failed");
            entry.error = Some(format!("accepting the CONNECT: {e}"));
        }
    }
    log(&wp, entry, start);
}

/// The `istio_tcp_*` labels of a connection from `source` at `client` to `service`, through
/// `endpoint` when one was picked, as a waypoint reports them.
fn tcp_labels(
    wp: &Waypoint,
    snapshot: &Snapshot,
    service: &ServiceInfo,
    (source, client): (&SpiffeId, SocketAddr),
    endpoint: Option<&WorkloadInfo>,
    response_flags: &'static str,
) -> TcpLabels {
    TcpLabels {
        reporter: "waypoint",
        source: SourceLabels::new(
            snapshot.mesh.workload_by_ip(client.ip()).map(|w| &**w),
            Some(&source.namespace),
            Some(source.to_string()),
        ),
        destination: DestinationLabels::new(
            endpoint,
            Some(endpoint.map_or(service.namespace.as_str(), |w| w.namespace.as_str())),
            endpoint.and_then(|w| w.identity(&wp.trust_domain).ok()).map(|i| i.to_string()),
            Some(service),
        ),
        request_protocol: "tcp",
        response_flags,
        connection_security_policy: "mutual_tls",
    }
}

/// Counts a connection that never reached an endpoint: opened and closed at once, with its
/// flags, as the agents count theirs.
fn count_failed(
    wp: &Waypoint,
    snapshot: &Snapshot,
    service: &ServiceInfo,
    peer: (&SpiffeId, SocketAddr),
    entry: &ConnectionEntry,
) {
    wp.metrics.tcp.refused(&tcp_labels(wp, snapshot, service, peer, None, entry.flags));
}

/// Writes the connection's access-log line.
fn log(wp: &Waypoint, mut entry: ConnectionEntry, start: Instant) {
    if wp.access.enabled() {
        entry.ts = sinew_telemetry::unix_seconds();
        entry.duration_ms = start.elapsed().as_secs_f64() * 1000.0;
        wp.access.write(&entry);
    }
}

/// Who a connection is from: the original client's identity, its address, and the
/// waypoint's tag for the identity (see [`Waypoint::source_tag`]); and the configurations
/// after the one that admitted it.
struct Peer<'a> {
    source: &'a SpiffeId,
    client: SocketAddr,
    source_tag: u32,
    changes: watch::Receiver<Arc<Snapshot>>,
}

/// Carries one accepted connection through to an endpoint the service's balancer picks, as
/// long as the policies admit it: every new configuration decides it again, and one that
/// denies it resets both sides (as the agents do with theirs). Failures reset the client's
/// stream; what happened goes into `entry`. True once the endpoint was reached (and the
/// connection counted in the metrics).
async fn forward(
    wp: &Arc<Waypoint>,
    mut down: H2Stream,
    service: &ServiceInfo,
    port: u16,
    peer: Peer<'_>,
    entry: &mut ConnectionEntry,
) -> bool {
    let Peer { source, client, source_tag, mut changes } = peer;
    let snapshot = wp.snapshot.borrow().clone();
    let (Some(backend), Some(target_port)) =
        (wp.backend(&snapshot, &service.namespace, &service.name), service.target_port(port))
    else {
        debug!(service = %entry.service, "TCP: no such service port");
        entry.flags = "NC";
        down.reset();
        return false;
    };
    // A TCP connection is what maxConnections counts (as Istio applies it to TCP).
    let Some(_permit) = backend.limits.try_connection() else {
        debug!(service = %entry.service, "TCP: connection limit reached");
        entry.flags = "UO";
        down.reset();
        return false;
    };
    let now = Instant::now();
    let Some(i) = backend.balancer.pick(random_u64(), None, |i| backend.outlier.is_ejected(i, now))
    else {
        debug!(service = %entry.service, "TCP: no healthy endpoint");
        entry.flags = "UH";
        down.reset();
        return false;
    };
    let endpoint = &backend.endpoints[i];
    entry.upstream = Some(endpoint.key());
    let ip =
        endpoint.ips.iter().find(|ip| ip.is_ipv4() == client.is_ipv4()).or(endpoint.ips.first());
    let Some(ip) = ip.copied() else {
        debug!(service = %entry.service, endpoint = %endpoint.key(), "TCP: endpoint has no address");
        entry.flags = "UH";
        down.reset();
        return false;
    };
    let _inflight = backend.balancer.start(i);
    let up = match open_tunnel(wp, SocketAddr::new(ip, target_port), Some(source_tag)).await {
        Ok(up) => up,
        Err(e) => {
            backend.outlier.record(i, false, Instant::now());
            debug!(service = %entry.service, error = %e, "TCP: upstream tunnel failed");
            entry.flags = "UF";
            entry.error = Some(e.to_string());
            down.reset();
            return false;
        }
    };
    backend.outlier.record(i, true, Instant::now());
    let labels = tcp_labels(wp, &snapshot, service, (source, client), Some(endpoint), "-");
    wp.metrics.tcp.opened(&labels);
    let bytes = wp.metrics.tcp.bytes(&labels);
    let (mut down, mut up) = (Counted::new(down, &bytes, true), Counted::new(up, &bytes, false));
    let copied = {
        let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                copied = &mut copy => break Ok(copied),
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The configuration is gone with the waypoint: just finish.
                        break Ok(copy.await);
                    }
                    let snapshot = changes.borrow_and_update().clone();
                    if let Some(d) = wp.decide(&snapshot, service, port, source, client.ip(), None)
                        && !d.allowed()
                    {
                        break Err(d);
                    }
                }
            }
        }
    };
    // Counted as they went, so a reset loses none.
    (entry.bytes_sent, entry.bytes_received) = bytes.totals();
    match copied {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            // One side was reset or failed: reset the other rather than end it cleanly.
            debug!(service = %entry.service, error = %e, "TCP connection reset");
            entry.error = Some(e.to_string());
            down.inner.reset();
            upstream::reset(&mut up.inner);
        }
        Err(d) => {
            debug!(service = %entry.service, source = %entry.source, reason = %d.reason, "TCP connection closed by a policy change");
            entry.flags = "RBAC";
            entry.error = Some(CLOSED_BY_POLICY.to_owned());
            entry.policy = d.policy.clone();
            entry.reason = Some(d.reason.into_owned());
            down.inner.reset();
            upstream::reset(&mut up.inner);
        }
    }
    wp.metrics.tcp.closed(&labels);
    true
}

/// A tunnelled stream whose bytes read are counted as they go: toward the destination (the
/// client's side) or back from it (the endpoint's).
struct Counted<'a, S> {
    inner: S,
    bytes: &'a ByteCounters,
    toward: bool,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: S, bytes: &'a ByteCounters, toward: bool) -> Self {
        Self { inner, bytes, toward }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        if self.toward {
            self.bytes.add(n, 0)
        } else {
            self.bytes.add(0, n)
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use sinew_model::{Port, ServicePort};

    use super::*;

    fn port(port: u16, name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            port: Port(port),
            target_port: None,
            protocol: "TCP".into(),
            app_protocol: app.map(str::to_owned),
        }
    }

    #[test]
    fn tcp_ports_are_declared_by_app_protocol_or_istio_port_names() {
        let svc = ServiceInfo {
            namespace: "shop".into(),
            name: "db".into(),
            vips: vec![],
            ports: vec![
                port(5432, None, Some("TCP")),
                port(6379, Some("tcp-redis"), None),
                port(7000, Some("tcp"), None),
                port(80, Some("http"), None),
                port(8080, Some("tcpish"), None),
                port(9000, None, Some("grpc")),
            ],
            labels: Default::default(),
            waypoint: None,
            endpoints: vec![],
        };
        for (p, tcp) in
            [(5432, true), (6379, true), (7000, true), (80, false), (8080, false), (9000, false)]
        {
            assert_eq!(svc.is_tcp_port(p), tcp, "port {p}");
        }
        assert!(!svc.is_tcp_port(1), "a port the service does not have");
    }
}
