//! Outbound: a pod's captured connection, its original destination resolved against the mesh
//! (service VIP -> an endpoint, pod address -> its workload), then HBONE to the destination
//! pod's agent when the destination is in the mesh, plain TCP otherwise.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use sinew_hbone::{Connect, HBONE_PORT, HboneError, PoolKey, refused};
use sinew_mesh::{MeshIndex, ServiceInfo, WorkloadInfo};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    CERT_WAIT, Direction, PodNet, canonical, connect_in, copy, is_own_listener, original_dst, reset,
};
use crate::telemetry::{
    AccessEntry, ByteCounters, CONNECT_FAILED, DestinationLabels, Peer, SourceLabels, TcpLabels,
};

/// Most bytes sent along with a CONNECT (see [`read_early`]).
const EARLY_MAX: usize = 16 << 10;

/// Where an outbound connection goes.
struct Resolved {
    /// The address to reach (an endpoint's, for a service VIP), or, through a waypoint, the
    /// service's VIP and port (the CONNECT authority the waypoint routes on).
    addr: SocketAddr,
    /// The workload reached: the endpoint, or the waypoint.
    workload: Option<Arc<WorkloadInfo>>,
    service: Option<Arc<ServiceInfo>>,
}

fn resolve(mesh: &MeshIndex, target: SocketAddr, rr: usize) -> Result<Resolved, String> {
    if let Some(svc) = mesh.service_by_vip(target.ip()) {
        // A service with a waypoint: the waypoint takes the connection, addressed to the VIP.
        if let Some(name) = &svc.waypoint {
            let waypoint = mesh.workload(&svc.namespace, name).ok_or_else(|| {
                format!("service {}/{} uses waypoint {name:?}, which is not a workload of its namespace", svc.namespace, svc.name)
            })?;
            return Ok(Resolved {
                addr: target,
                workload: Some(waypoint.clone()),
                service: Some(svc.clone()),
            });
        }
        let Some(port) = svc.target_port(target.port()) else {
            return Err(format!(
                "service {}/{} has no port {}",
                svc.namespace,
                svc.name,
                target.port()
            ));
        };
        let v4 = target.is_ipv4();
        let endpoints: Vec<(&Arc<WorkloadInfo>, std::net::IpAddr)> = svc
            .endpoints
            .iter()
            .filter_map(|w| w.ips.iter().find(|ip| ip.is_ipv4() == v4).map(|ip| (w, *ip)))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("service {}/{} has no endpoints", svc.namespace, svc.name));
        }
        let (w, ip) = endpoints[rr % endpoints.len()];
        return Ok(Resolved {
            addr: SocketAddr::new(ip, port),
            workload: Some(w.clone()),
            service: Some(svc.clone()),
        });
    }
    Ok(Resolved {
        addr: target,
        workload: mesh.workload_by_ip(target.ip()).cloned(),
        service: None,
    })
}

pub(super) async fn handle(downstream: TcpStream, peer: std::net::SocketAddr, pod: Arc<PodNet>) {
    let mut peer = canonical(peer);
    // The connect hook sends the app to 127.0.0.1:15001, so the kernel gave its socket a
    // loopback source; on the wire it leaves with the pod's address, which is what others see.
    if peer.ip().is_loopback()
        && let Some(ip) = pod.ips.iter().find(|ip| ip.is_ipv4() == peer.is_ipv4())
    {
        peer.set_ip(*ip);
    }
    let ctx = &pod.ctx;
    ctx.stats.outbound.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let mut log = AccessEntry::new("outbound", &pod.name, "TCP", Duration::ZERO);
    log.src = Peer {
        addr: Some(peer),
        workload: Some(pod.name.clone()),
        identity: Some(pod.identity.to_string()),
        service: None,
        via: None,
    };
    let target = match original_dst(&downstream) {
        Ok(t) if !is_own_listener(Direction::Outbound, t) => t,
        Ok(t) => {
            tracing::warn!(pod = %pod.name, %peer, %t, "refusing a connection to the agent's own listener");
            return reset(&downstream);
        }
        Err(e) => {
            ctx.stats.original_dst_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pod = %pod.name, %peer, error = %e, "original destination unknown");
            return reset(&downstream);
        }
    };
    let mesh = ctx.mesh.borrow().clone();
    let resolved = resolve(&mesh, target, ctx.rr.fetch_add(1, Ordering::Relaxed));
    let resolved = match resolved {
        Ok(r) => r,
        Err(why) => {
            ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            log.dst.addr = Some(target);
            log.error = Some(why);
            finish(&pod, log, start);
            return reset(&downstream);
        }
    };
    log.dst = Peer {
        addr: Some(resolved.addr),
        workload: resolved.workload.as_ref().map(|w| w.key()),
        identity: None,
        service: resolved.service.as_ref().map(|s| s.hostname()),
        via: None,
    };
    // A waypoint takes HBONE whatever its own Workload's labels say (Istio labels waypoint
    // pods `dataplane-mode: none`: no agent captures them, they terminate HBONE themselves).
    let via_waypoint = resolved.service.as_ref().is_some_and(|s| s.waypoint.is_some());
    let hbone = resolved.workload.as_ref().filter(|w| {
        (w.in_mesh || via_waypoint) && ctx.certs.enabled() && !pod.ips.contains(&resolved.addr.ip())
    });
    let mut labels = TcpLabels {
        reporter: "source",
        source: SourceLabels::new(
            mesh.workload_by_ip(peer.ip()).map(|w| &**w),
            Some(&pod.namespace),
            Some(pod.identity.to_string()),
        ),
        destination: DestinationLabels::new(
            resolved.workload.as_deref(),
            None,
            None,
            resolved.service.as_deref(),
        ),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: "unknown",
    };
    if labels.source.source_workload == "unknown" {
        // No Workload (yet) for the pod: it is still the enrolled pod it is.
        labels.source.source_workload = pod.workload.clone();
    }
    match hbone {
        Some(w) => {
            let expected = match w.identity(&ctx.trust_domain) {
                Ok(id) => id,
                Err(e) => {
                    log.error = Some(e.to_string());
                    finish(&pod, log, start);
                    return reset(&downstream);
                }
            };
            log.protocol = "HBONE";
            log.dst.identity = Some(expected.to_string());
            labels.destination.destination_principal = expected.to_string();
            labels.connection_security_policy = "mutual_tls";
            let Some(identity) = ctx.certs.wait_identity(&pod.identity, CERT_WAIT).await else {
                ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                log.error = Some(format!("no certificate for {} yet", pod.identity));
                finish(&pod, log, start);
                return reset(&downstream);
            };
            // The tunnel goes to the workload's own address (a waypoint's, for its services).
            let Some(peer_ip) =
                w.ips.iter().find(|ip| ip.is_ipv4() == resolved.addr.is_ipv4()).copied()
            else {
                log.error = Some(format!("{} has no address of the destination's family", w.key()));
                finish(&pod, log, start);
                return reset(&downstream);
            };
            let key = PoolKey {
                source: pod.identity.clone(),
                source_ip: peer.ip(),
                destination: SocketAddr::new(peer_ip, HBONE_PORT),
                expected,
            };
            let early = match read_early(&downstream) {
                Ok(b) => b,
                Err(e) => {
                    log.error = Some(format!("client: {e}"));
                    finish(&pod, log, start);
                    return reset(&downstream);
                }
            };
            let early_len = early.len() as u64;
            // Optimistic: the app's bytes go out without waiting for the peer's 200, which a
            // Sinew peer sends with the app's first answer (one TLS record, one wakeup here).
            let req = Connect {
                authority: resolved.addr,
                client: peer,
                baggage: None,
                early,
                optimistic: true,
            };
            let netns = &pod.netns;
            let tunnel =
                ctx.pool.get().connect(&key, &identity, req, |a| connect_in(netns, a)).await;
            let mut tunnel = match tunnel {
                Ok(t) => t,
                Err(e) => {
                    ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    if let HboneError::Refused { status, .. } = &e
                        && *status == http::StatusCode::UNAUTHORIZED
                    {
                        log.decision = "deny";
                        labels.response_flags = "DENY";
                    } else {
                        labels.response_flags = CONNECT_FAILED;
                    }
                    debug!(pod = %pod.name, %peer, dst = %resolved.addr, error = %e, "HBONE connect failed");
                    log.error = Some(e.to_string());
                    ctx.metrics.tcp.refused(&labels);
                    finish(&pod, log, start);
                    return reset(&downstream);
                }
            };
            let active = ctx.stats.count_active();
            let mut downstream = downstream;
            // The connection counts as opened, and its bytes (the early ones went with the
            // CONNECT) as moved, once the peer accepted it, as when the 200 was awaited
            // first; a refusal is the copy's error, counted below with its flag.
            let bytes = OnceLock::<ByteCounters>::new();
            let unanswered_up = AtomicU64::new(early_len);
            let on_answer = || {
                let b = bytes.get_or_init(|| ctx.metrics.tcp.bytes(&labels));
                b.add(unanswered_up.swap(0, Ordering::Relaxed), 0);
                ctx.stats.hbone_outbound.fetch_add(1, Ordering::Relaxed);
                ctx.metrics.tcp.opened(&labels);
            };
            let progress = |to, from| match bytes.get() {
                Some(b) => b.add(to, from),
                None => drop(unanswered_up.fetch_add(to, Ordering::Relaxed)),
            };
            let result = tokio::select! {
                r = tunnel.copy_tcp_with(&mut downstream, &progress, &on_answer) => r,
                // Reset below, as any failed copy.
                () = ctx.stop.notified() => Err(super::stopped()),
            };
            drop(active);
            (log.bytes_sent, log.bytes_received) = bytes.get().map_or((0, 0), ByteCounters::totals);
            if let Err(e) = result {
                // Refused, or reset with RST_STREAM: the app gets a TCP RST.
                reset(&downstream);
                if bytes.get().is_none() {
                    // Not answered. Either the tunnel never opened (refused, no answer in
                    // time), or the app's side failed while the answer was on its way.
                    if tunnel.answer_failed() {
                        ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                        labels.response_flags = CONNECT_FAILED;
                        if refused(&e) == Some(http::StatusCode::UNAUTHORIZED) {
                            log.decision = "deny";
                            labels.response_flags = "DENY";
                        }
                        debug!(pod = %pod.name, %peer, dst = %resolved.addr, error = %e, "HBONE tunnel not accepted");
                    }
                    ctx.metrics.tcp.opened(&labels);
                }
                log.error = Some(e.to_string());
            }
            ctx.metrics.tcp.closed(&labels);
            finish(&pod, log, start);
        }
        None => {
            let upstream = match connect_in(&pod.netns, resolved.addr).await {
                Ok(u) => u,
                Err(e) => {
                    ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(pod = %pod.name, %peer, target = %resolved.addr, error = %e, "upstream connect failed");
                    labels.response_flags = CONNECT_FAILED;
                    ctx.metrics.tcp.refused(&labels);
                    log.error = Some(e.to_string());
                    finish(&pod, log, start);
                    return reset(&downstream);
                }
            };
            ctx.metrics.tcp.opened(&labels);
            let active = ctx.stats.count_active();
            let (mut downstream, mut upstream) = (downstream, upstream);
            let bytes = ctx.metrics.tcp.bytes(&labels);
            let progress = |to, from| bytes.add(to, from);
            let result = tokio::select! {
                r = copy(&mut downstream, &mut upstream, &progress) => r,
                () = ctx.stop.notified() => {
                    reset(&downstream);
                    reset(&upstream);
                    Err(super::stopped())
                }
            };
            drop(active);
            (log.bytes_sent, log.bytes_received) = bytes.totals();
            if let Err(e) = result {
                log.error = Some(e.to_string());
            }
            ctx.metrics.tcp.closed(&labels);
            finish(&pod, log, start);
        }
    }
}

/// What the app has already sent, without waiting (empty when nothing has arrived yet, as
/// with protocols where the server speaks first): it goes out with the CONNECT.
fn read_early(downstream: &TcpStream) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(EARLY_MAX);
    match downstream.try_read_buf(&mut buf) {
        Ok(_) => Ok(buf.freeze()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    }
}

fn finish(pod: &PodNet, mut log: AccessEntry, start: Instant) {
    log.duration_ms = start.elapsed().as_millis() as u64;
    pod.ctx.access.write(&log);
}
