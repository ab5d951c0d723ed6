//! Inbound: tunnels arriving on a pod's HBONE listener (15008) and plaintext connections on
//! its 15006 listener, each authorized against the L4 policies in force before the agent
//! connects to the application inside the pod. Admitted connections are kept in [`Live`] so a
//! policy change can close the ones it no longer admits.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use sinew_hbone::{H2Stream, Inbound};
use sinew_identity::SpiffeId;
use sinew_mesh::{CLOSED_BY_POLICY, Decision, Destination, MeshIndex, Source};
use sinew_model::MtlsMode;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tracing::{debug, warn};

use super::{
    AGENT_HANDSHAKES, CERT_WAIT, Direction, HANDSHAKES, PodNet, canonical, connect_in, copy,
    is_own_listener, reset,
};
use crate::telemetry::{
    AccessEntry, ByteCounters, CONNECT_FAILED, DecisionLabels, DestinationLabels, Peer,
    SourceLabels, TcpLabels,
};

/// Why a plaintext connection from a trusted source was admitted without a decision.
const TRUSTED_SOURCE: &str =
    "from a --trust-plaintext-from source (the node's probes): neither mTLS nor policy applies";

/// An admitted inbound connection, as policy sees it.
struct LiveConn {
    namespace: String,
    destination: SocketAddr,
    source_ip: IpAddr,
    identity: Option<Arc<SpiffeId>>,
    kill: Arc<Notify>,
}

/// Inbound connections open now.
#[derive(Default)]
pub struct Live {
    conns: Mutex<HashMap<u64, LiveConn>>,
    next: AtomicU64,
}

/// Removes a connection from [`Live`] when it ends.
struct LiveGuard<'a> {
    live: &'a Live,
    id: u64,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.live.conns.lock().expect("live lock poisoned").remove(&self.id);
    }
}

impl Live {
    fn register(&self, conn: LiveConn) -> LiveGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().expect("live lock poisoned").insert(id, conn);
        LiveGuard { live: self, id }
    }

    /// Closes the connections `mesh` no longer admits; returns how many.
    pub fn recheck(&self, mesh: &MeshIndex) -> usize {
        let conns = self.conns.lock().expect("live lock poisoned");
        let mut closed = 0;
        for c in conns.values() {
            let decision =
                decide(mesh, &c.namespace, c.destination, c.identity.as_deref(), c.source_ip);
            if !decision.is_ok_and(|d| d.allowed()) {
                c.kill.notify_one();
                closed += 1;
            }
        }
        closed
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.conns.lock().expect("live lock poisoned").len()
    }

    /// True when none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The decision on a connection to `destination`, of a pod in `namespace`, from `identity`
/// (`None`: plaintext) at `source_ip`; `Err` with the reason when it is refused before any
/// AuthorizationPolicy is consulted: plaintext under STRICT, or a destination whose labels
/// are unknown (no Workload has its address) while policies select by label.
fn decide(
    mesh: &MeshIndex,
    namespace: &str,
    destination: SocketAddr,
    identity: Option<&SpiffeId>,
    source_ip: IpAddr,
) -> Result<Decision, String> {
    let no_labels = BTreeMap::new();
    let labels = match mesh.workload_by_ip(destination.ip()) {
        Some(w) => &w.labels,
        None if mesh.authz().selects_by_label(namespace) => {
            return Err(format!(
                "destination {} has no Workload in the mesh view: policies that select by label cannot be decided",
                destination.ip()
            ));
        }
        None => &no_labels,
    };
    if identity.is_none()
        && mesh.authz().mtls_mode(namespace, labels, destination.port()) == MtlsMode::Strict
    {
        return Err("STRICT mTLS: plaintext refused".to_string());
    }
    let dst = Destination { namespace, labels, port: destination.port() };
    Ok(mesh.authz().check(&dst, &Source { identity, ip: source_ip }))
}

/// Accepts HBONE connections for `pod` until the task is aborted. Aborting it (the pod is
/// un-enrolled or leaves the mesh) also drains the connections it accepted: their open
/// streams finish, but no new one is opened on them.
pub async fn serve_hbone(listener: TcpListener, pod: Arc<PodNet>) {
    // Dropped with this task: each connection's receiver then sees the channel closed.
    let (listening, _) = tokio::sync::watch::channel(());
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let peer = canonical(peer);
                // Until its client is authenticated a connection holds a permit: anyone who
                // can route to the pod can open them, and each holds a socket and buffers.
                let Some(permit) = pod.pending() else {
                    // debug: a flood must not flood the log too.
                    debug!(pod = %pod.name, %peer, pod_limit = HANDSHAKES, node_limit = AGENT_HANDSHAKES, "too many HBONE connections in their handshake: refusing");
                    reset(&tcp);
                    continue;
                };
                let pod = pod.clone();
                let mut listening = listening.subscribe();
                tokio::spawn(async move {
                    // A pod enrolled a moment ago may still wait for its first certificate
                    // while a peer already connects: wait for it as outbound connections do.
                    let certs = &pod.ctx.certs;
                    let Some(identity) = certs.wait_identity(&pod.identity, CERT_WAIT).await else {
                        // Per connection, so at debug: the certificate's state is logged once.
                        debug!(pod = %pod.name, %peer, "no certificate yet: refusing HBONE");
                        return reset(&tcp);
                    };
                    let config = match identity.server_config() {
                        Ok(c) => c,
                        Err(e) => return warn!(pod = %pod.name, error = %e, "TLS configuration"),
                    };
                    let p = pod.clone();
                    let drain = async move {
                        // Never sent on: it returns once the listener's task is gone.
                        let _ = listening.changed().await;
                    };
                    let served = sinew_hbone::serve_connection_until(
                        tcp,
                        peer,
                        config,
                        permit,
                        drain,
                        sinew_hbone::PING_INTERVAL,
                        move |i| tunnel(p.clone(), i),
                    )
                    .await;
                    if let Err(e) = served {
                        // Garbage, untrusted peers, protocol errors: this peer only.
                        debug!(pod = %pod.name, %peer, error = %e, "HBONE connection ended");
                    }
                });
            }
            Err(e) => {
                warn!(pod = %pod.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// What an inbound connection is, for policy, metrics and the access log.
struct Arrival {
    source: SocketAddr,
    /// The client's identity: the TLS peer's, or, through a waypoint, the original client's.
    identity: Option<Arc<SpiffeId>>,
    /// The waypoint the connection came through, if any.
    via: Option<Arc<SpiffeId>>,
    destination: SocketAddr,
    protocol: &'static str,
}

/// The baggage member a waypoint names its original client with (see `sinew-waypoint`).
const SOURCE_PRINCIPAL_BAGGAGE: &str = "sinew.source.principal";

/// The original client a waypoint's tunnel carries, if the peer is the waypoint of a service
/// that `destination` serves ([`MeshIndex::is_waypoint_for`]) and it named a client of this
/// trust domain; anyone else's baggage is ignored.
fn original_source(
    mesh: &MeshIndex,
    trust_domain: &str,
    inbound: &Inbound,
    destination: IpAddr,
) -> Option<SpiffeId> {
    let baggage = inbound.headers.get("baggage")?.to_str().ok()?;
    let principal = baggage.split(',').find_map(|m| {
        let (k, v) = m.trim().split_once('=')?;
        (k.trim() == SOURCE_PRINCIPAL_BAGGAGE).then(|| v.trim())
    })?;
    if !mesh.is_waypoint_for(&inbound.peer, inbound.peer_addr.ip(), trust_domain, destination) {
        return None;
    }
    principal.parse::<SpiffeId>().ok().filter(|id| id.trust_domain == trust_domain)
}

impl Arrival {
    fn entry(&self, pod: &PodNet, mesh: &MeshIndex) -> (AccessEntry, TcpLabels) {
        let mut log = AccessEntry::new("inbound", &pod.name, self.protocol, Duration::ZERO);
        let src_workload = mesh.workload_by_ip(self.source.ip());
        log.src = Peer {
            addr: Some(self.source),
            workload: src_workload.map(|w| w.key()),
            identity: self.identity.as_ref().map(|i| i.to_string()),
            service: None,
            via: self.via.as_ref().map(|i| i.to_string()),
        };
        log.dst = Peer {
            addr: Some(self.destination),
            workload: Some(pod.name.clone()),
            identity: Some(pod.identity.to_string()),
            service: None,
            via: None,
        };
        // Through a waypoint the source is the original client, known by its identity (the
        // workload at the source address is the waypoint's, so it is not named).
        let src_workload = if self.via.is_some() { None } else { src_workload.map(|w| &**w) };
        let dst_workload = mesh.workload_by_ip(self.destination.ip());
        let service =
            dst_workload.and_then(|w| mesh.service_of_endpoint(w, self.destination.port()));
        log.dst.service = service.map(|s| s.hostname());
        let mut labels = TcpLabels {
            reporter: "destination",
            source: SourceLabels::new(
                src_workload,
                self.identity.as_ref().map(|i| i.namespace.as_str()),
                self.identity.as_ref().map(|i| i.to_string()),
            ),
            destination: DestinationLabels::new(
                dst_workload.map(|w| &**w),
                Some(&pod.namespace),
                Some(pod.identity.to_string()),
                service.map(|s| &**s),
            ),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if self.identity.is_some() {
                "mutual_tls"
            } else {
                "unknown"
            },
        };
        if labels.destination.destination_workload == "unknown" {
            // No Workload (yet) for the pod: it is still the enrolled pod it is.
            labels.destination.destination_workload = pod.workload.clone();
        }
        (log, labels)
    }
}

/// Authorizes an arrival; records the decision in metrics and the log entry.
fn authorize(
    pod: &PodNet,
    mesh: &MeshIndex,
    a: &Arrival,
    log: &mut AccessEntry,
    labels: &mut TcpLabels,
) -> bool {
    let decision =
        decide(mesh, &pod.namespace, a.destination, a.identity.as_deref(), a.source.ip());
    let (allowed, word, policy, reason) = match decision {
        Err(reason) => (false, "deny", None, reason),
        Ok(d) => describe(&d),
    };
    pod.ctx
        .metrics
        .decisions
        .get_or_create(&DecisionLabels {
            decision: word,
            policy: policy.clone().unwrap_or_else(|| "-".into()),
            destination_workload: pod.workload.clone(),
            destination_workload_namespace: pod.namespace.clone(),
            source_principal: labels.source.source_principal.clone(),
        })
        .inc();
    log.decision = word;
    log.policy = policy;
    log.reason = Some(reason);
    if !allowed {
        labels.response_flags = "DENY";
        pod.ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
    }
    allowed
}

fn describe(d: &Decision) -> (bool, &'static str, Option<String>, String) {
    let word = if !d.allowed() {
        "deny"
    } else if d.audited.is_empty() {
        "allow"
    } else {
        "audit"
    };
    let policy = d.policy.clone().or_else(|| d.audited.first().cloned());
    (d.allowed(), word, policy, d.reason.to_string())
}

/// One `CONNECT` on the pod's HBONE listener.
async fn tunnel(pod: Arc<PodNet>, inbound: Inbound) {
    let ctx = &pod.ctx;
    ctx.stats.inbound.fetch_add(1, Ordering::Relaxed);
    ctx.stats.hbone_inbound.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let destination = canonical(inbound.authority);
    if !pod.ips.contains(&destination.ip()) || is_own_listener(Direction::Inbound, destination) {
        debug!(pod = %pod.name, %destination, "CONNECT to an address that is not this pod's");
        return inbound.refuse(StatusCode::BAD_REQUEST);
    }
    let mesh = ctx.mesh.borrow().clone();
    let arrival = match original_source(&mesh, &ctx.trust_domain, &inbound, destination.ip()) {
        Some(original) => Arrival {
            source: canonical(inbound.peer_addr),
            identity: Some(Arc::new(original)),
            via: Some(inbound.peer.clone()),
            destination,
            protocol: "HBONE",
        },
        None => Arrival {
            source: canonical(inbound.peer_addr),
            identity: Some(inbound.peer.clone()),
            via: None,
            destination,
            protocol: "HBONE",
        },
    };
    let (mut log, mut labels) = arrival.entry(&pod, &mesh);
    if !authorize(&pod, &mesh, &arrival, &mut log, &mut labels) {
        inbound.refuse(StatusCode::UNAUTHORIZED);
        ctx.metrics.tcp.refused(&labels);
        return finish(&pod, log, start);
    }
    // Live from the decision on: a policy change while the application is being connected
    // to reaches this connection too (its kill is kept and ends the copy at once).
    let kill = Arc::new(Notify::new());
    let _live = ctx.live.register(LiveConn {
        namespace: pod.namespace.clone(),
        destination,
        source_ip: arrival.source.ip(),
        identity: arrival.identity.clone(),
        kill: kill.clone(),
    });
    let upstream = match connect_in(&pod.netns, destination).await {
        Ok(u) => u,
        Err(e) => {
            ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            inbound.refuse(StatusCode::SERVICE_UNAVAILABLE);
            labels.response_flags = CONNECT_FAILED;
            ctx.metrics.tcp.refused(&labels);
            log.error = Some(format!("connecting to {destination}: {e}"));
            return finish(&pod, log, start);
        }
    };
    // An optimistic client gets its 200 with the app's first answer, in one TLS record.
    let stream = match inbound.accept_with_answer() {
        Ok(s) => s,
        Err(e) => {
            log.error = Some(e.to_string());
            return finish(&pod, log, start);
        }
    };
    ctx.metrics.tcp.opened(&labels);
    let active = ctx.stats.count_active();
    let (mut stream, mut upstream) = (stream, upstream);
    let bytes = ctx.metrics.tcp.bytes(&labels);
    let result = tokio::select! {
        r = copy_tunnel(&mut stream, &mut upstream, &bytes) => r,
        () = kill.notified() => {
            stream.reset();
            reset(&upstream);
            Err(std::io::Error::other(CLOSED_BY_POLICY))
        }
        () = ctx.stop.notified() => {
            stream.reset();
            reset(&upstream);
            Err(super::stopped())
        }
    };
    drop(active);
    record(&pod, result, &mut log, &labels, &bytes);
    finish(&pod, log, start);
}

async fn copy_tunnel(
    stream: &mut H2Stream,
    upstream: &mut TcpStream,
    bytes: &ByteCounters,
) -> std::io::Result<(u64, u64)> {
    // The peer is the source: to it goes the response, from it comes the request.
    let r = stream.copy_tcp(upstream, &|to_peer, from_peer| bytes.add(from_peer, to_peer)).await;
    if r.is_err() {
        reset(upstream);
    }
    r
}

/// Logs and counts a connection's end; its bytes were counted as they went.
fn record(
    pod: &PodNet,
    result: std::io::Result<(u64, u64)>,
    log: &mut AccessEntry,
    labels: &TcpLabels,
    bytes: &ByteCounters,
) {
    (log.bytes_sent, log.bytes_received) = bytes.totals();
    if let Err(e) = result {
        if e.to_string() == CLOSED_BY_POLICY {
            pod.ctx.stats.closed_by_policy.fetch_add(1, Ordering::Relaxed);
        }
        log.error = Some(e.to_string());
    }
    pod.ctx.metrics.tcp.closed(labels);
}

/// A plaintext connection on the pod's 15006 listener (a client outside the mesh, or a
/// capture-only agent): refused under STRICT, else authorized without an identity.
pub(super) async fn plaintext(downstream: TcpStream, peer: SocketAddr, pod: Arc<PodNet>) {
    let ctx = &pod.ctx;
    ctx.stats.inbound.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    // sk_lookup keeps the destination the client used: it is our local address.
    let destination = match downstream.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => {
            ctx.stats.original_dst_errors.fetch_add(1, Ordering::Relaxed);
            warn!(pod = %pod.name, error = %e, "inbound destination unknown");
            return reset(&downstream);
        }
    };
    if is_own_listener(Direction::Inbound, destination) {
        warn!(pod = %pod.name, %peer, %destination, "refusing a connection to the agent's own listener");
        return reset(&downstream);
    }
    let arrival = Arrival {
        source: canonical(peer),
        identity: None,
        via: None,
        destination,
        protocol: "TCP",
    };
    let mesh = ctx.mesh.borrow().clone();
    let (mut log, mut labels) = arrival.entry(&pod, &mesh);
    // The node's health probes, which its CNI rewrites to a source no pod or peer can have,
    // reach their pods whatever the mTLS mode and policies, as ztunnel's do from istio-cni's
    // 169.254.7.127: STRICT must not fail every probe.
    let trusted = ctx.trusted_plaintext.contains(&arrival.source.ip());
    if trusted {
        log.decision = "allow";
        log.reason = Some(TRUSTED_SOURCE.into());
    } else if !authorize(&pod, &mesh, &arrival, &mut log, &mut labels) {
        ctx.metrics.tcp.refused(&labels);
        finish(&pod, log, start);
        return reset(&downstream);
    }
    // Live from the decision on, as for a tunnel; trusted ones are not re-checked.
    let kill = Arc::new(Notify::new());
    let _live = (!trusted).then(|| {
        ctx.live.register(LiveConn {
            namespace: pod.namespace.clone(),
            destination,
            source_ip: arrival.source.ip(),
            identity: None,
            kill: kill.clone(),
        })
    });
    let upstream = match connect_in(&pod.netns, destination).await {
        Ok(u) => u,
        Err(e) => {
            ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            labels.response_flags = CONNECT_FAILED;
            ctx.metrics.tcp.refused(&labels);
            log.error = Some(format!("connecting to {destination}: {e}"));
            finish(&pod, log, start);
            return reset(&downstream);
        }
    };
    ctx.metrics.tcp.opened(&labels);
    let active = ctx.stats.count_active();
    let (mut downstream, mut upstream) = (downstream, upstream);
    let bytes = ctx.metrics.tcp.bytes(&labels);
    let progress = |toward, back| bytes.add(toward, back);
    let result = tokio::select! {
        r = copy(&mut downstream, &mut upstream, &progress) => r,
        () = kill.notified() => {
            reset(&downstream);
            reset(&upstream);
            Err(std::io::Error::other(CLOSED_BY_POLICY))
        }
        () = ctx.stop.notified() => {
            reset(&downstream);
            reset(&upstream);
            Err(super::stopped())
        }
    };
    drop(active);
    record(&pod, result, &mut log, &labels, &bytes);
    finish(&pod, log, start);
}

fn finish(pod: &PodNet, mut log: AccessEntry, start: Instant) {
    log.duration_ms = start.elapsed().as_millis() as u64;
    pod.ctx.access.write(&log);
}
