//! Service ports that speak plain TCP: `appProtocol: tcp`, or a port named `tcp` or `tcp-*`
//! (Istio's naming convention). Putting a namespace behind a waypoint must not break its
//! databases and queues, so their bytes pass through unparsed: to an endpoint the service's
//! balancer picks (skipping ejected ones, within its connection limits), over HBONE as the
//! waypoint naming the original client, with half-close and resets carried across. The
//! destination agent then applies its L4 policy to that client.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use sinew_hbone::{H2Stream, random_u64};
use sinew_mesh::ServiceInfo;
use tracing::debug;

use crate::{state::Waypoint, upstream::open_tunnel};

/// Whether service port `port` is declared plain TCP.
pub fn is_tcp_port(service: &ServiceInfo, port: u16) -> bool {
    service.ports.iter().filter(|p| p.port.0 == port).any(|p| {
        p.app_protocol.as_deref().is_some_and(|a| a.eq_ignore_ascii_case("tcp"))
            || p.name.as_deref().is_some_and(|n| n == "tcp" || n.starts_with("tcp-"))
    })
}

/// Carries one tunnelled connection to service port `port` through to an endpoint;
/// `client` is the original client's address, `source_tag` its identity (see
/// [`Waypoint::source_tag`]). Failures reset the client's stream.
pub async fn forward(
    wp: Arc<Waypoint>,
    mut down: H2Stream,
    service: Arc<ServiceInfo>,
    port: u16,
    client: SocketAddr,
    source_tag: u32,
) {
    let name = format!("{}/{}:{port}", service.namespace, service.name);
    let snapshot = wp.snapshot.borrow().clone();
    let (Some(backend), Some(target_port)) =
        (wp.backend(&snapshot, &service.namespace, &service.name), service.target_port(port))
    else {
        debug!(service = %name, "TCP: no such service port");
        return down.reset();
    };
    // A TCP connection is what maxConnections counts (as Istio applies it to TCP).
    let Some(_permit) = backend.limits.try_connection() else {
        debug!(service = %name, "TCP: connection limit reached");
        return down.reset();
    };
    let now = Instant::now();
    let Some(i) = backend.balancer.pick(random_u64(), None, |i| backend.outlier.is_ejected(i, now))
    else {
        debug!(service = %name, "TCP: no healthy endpoint");
        return down.reset();
    };
    let endpoint = &backend.endpoints[i];
    let ip =
        endpoint.ips.iter().find(|ip| ip.is_ipv4() == client.is_ipv4()).or(endpoint.ips.first());
    let Some(ip) = ip.copied() else {
        debug!(service = %name, endpoint = %endpoint.key(), "TCP: endpoint has no address");
        return down.reset();
    };
    let _inflight = backend.balancer.start(i);
    let mut up = match open_tunnel(&wp, SocketAddr::new(ip, target_port), Some(source_tag)).await {
        Ok(up) => up,
        Err(e) => {
            backend.outlier.record(i, false, Instant::now());
            debug!(service = %name, error = %e, "TCP: upstream tunnel failed");
            return down.reset();
        }
    };
    backend.outlier.record(i, true, Instant::now());
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((sent, received)) => {
            debug!(service = %name, endpoint = %endpoint.key(), sent, received, "TCP connection done");
        }
        Err(e) => {
            // One side was reset or failed: reset the other rather than end it cleanly.
            debug!(service = %name, error = %e, "TCP connection reset");
            down.reset();
            up.reset();
        }
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
            assert_eq!(is_tcp_port(&svc, p), tcp, "port {p}");
        }
        assert!(!is_tcp_port(&svc, 1), "a port the service does not have");
    }
}
