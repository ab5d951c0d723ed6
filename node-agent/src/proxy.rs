//! The data path: accept captured connections inside a pod's namespace, recover where they
//! were going, connect there from inside the right namespace, and copy bytes both ways with
//! half-close and reset carried across.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use sinew_ebpf_common::{
    INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, SO_ORIGINAL_DST,
};
use sinew_hbone::Pool;
use sinew_identity::SpiffeId;
use sinew_workers::PerWorker;
use socket2::{Domain, SockRef};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::warn;

use crate::{
    certs::Certs,
    config::MeshView,
    netns::Netns,
    telemetry::{AccessLog, Metrics},
};

pub mod inbound;
mod outbound;
mod splice;

pub use inbound::{Live, serve_hbone};

/// Bytes buffered per direction; large enough that a single stream is not limited by
/// syscalls, small enough for thousands of connections.
const COPY_BUFFER: usize = 64 * 1024;

/// How long a new connection, outbound or inbound, waits for its pod's first certificate.
const CERT_WAIT: Duration = Duration::from_secs(5);

/// Most inbound HBONE connections of one pod not yet authenticated (waiting for the pod's
/// first certificate, or in their TLS and HTTP/2 handshakes, 10 s at most); more are reset
/// at once, so a flood at port 15008, which anyone who can route to the pod may open, cannot
/// pin the agent's descriptors and memory for every pod.
pub const HANDSHAKES: usize = 128;

/// Most inbound HBONE connections not yet authenticated across all the node's pods: a flood
/// spread over many pods stops here, whatever the per-pod bound allows. (Plaintext
/// connections on 15006 are not bounded this way: a legitimate burst of a thousand new
/// connections to one pod is normal there, and each is only a local connect away from
/// being admitted.)
pub const AGENT_HANDSHAKES: usize = 1024;

/// A place among the inbound connections not yet admitted, for one pod ([`HANDSHAKES`]) and
/// for the node ([`AGENT_HANDSHAKES`]); given back when dropped.
pub(crate) struct Pending {
    _pod: OwnedSemaphorePermit,
    _agent: OwnedSemaphorePermit,
}

impl Pending {
    /// A place, if both bounds leave one.
    fn take(pod: &Arc<Semaphore>, agent: &Arc<Semaphore>) -> Option<Self> {
        let pod = pod.clone().try_acquire_owned().ok()?;
        Some(Self { _pod: pod, _agent: agent.clone().try_acquire_owned().ok()? })
    }
}

/// Connection counters, shared by every pod's tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// See [`sinew_local_api::Counters`].
    pub outbound: AtomicU64,
    /// See [`sinew_local_api::Counters`].
    pub inbound: AtomicU64,
    /// See [`sinew_local_api::Counters`].
    pub active: AtomicU64,
    /// See [`sinew_local_api::Counters`].
    pub upstream_errors: AtomicU64,
    /// See [`sinew_local_api::Counters`].
    pub original_dst_errors: AtomicU64,
    /// See [`sinew_local_api::Counters`].
    pub hbone_outbound: AtomicU64,
    /// See [`sinew_local_api::Counters`].
    pub hbone_inbound: AtomicU64,
    /// See [`sinew_local_api::Counters`].
    pub denied: AtomicU64,
    /// See [`sinew_local_api::Counters`].
    pub closed_by_policy: AtomicU64,
}

impl Stats {
    /// A snapshot for the local API.
    pub fn snapshot(&self, pool: &sinew_hbone::PoolStats) -> sinew_local_api::Counters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        sinew_local_api::Counters {
            outbound: g(&self.outbound),
            inbound: g(&self.inbound),
            active: g(&self.active),
            upstream_errors: g(&self.upstream_errors),
            original_dst_errors: g(&self.original_dst_errors),
            hbone_outbound: g(&self.hbone_outbound),
            hbone_inbound: g(&self.hbone_inbound),
            hbone_connections_opened: pool.opened,
            denied: g(&self.denied),
            closed_by_policy: g(&self.closed_by_policy),
        }
    }
}

/// What every pod's tasks share: the mesh view, certificates, the HBONE pool, telemetry.
pub struct Ctx {
    /// The trust domain of workload identities.
    pub trust_domain: String,
    /// The mesh view in force.
    pub mesh: MeshView,
    /// Workload certificates.
    pub certs: Arc<Certs>,
    /// Pooled HBONE connections to other agents, per worker: a worker's tunnels ride
    /// connections that worker drives.
    pub pool: PerWorker<Pool>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Access log.
    pub access: AccessLog,
    /// Counters for the local API.
    pub stats: Arc<Stats>,
    /// Inbound connections open now, re-checked when policy changes.
    pub live: Live,
    /// Notified when a drain reaches its limit: every connection still open is reset (a
    /// plain close could pass for a whole answer) and logged.
    pub stop: tokio::sync::Notify,
    /// Sources whose plaintext reaches pods without mTLS or policy (`--trust-plaintext-from`:
    /// the node's probe address; see `inbound::plaintext`).
    pub trusted_plaintext: std::collections::HashSet<IpAddr>,
    /// The node's places for inbound connections not yet admitted ([`AGENT_HANDSHAKES`]).
    pending: Arc<Semaphore>,
    /// Round-robin cursor over service endpoints.
    rr: AtomicUsize,
}

/// Counts a connection in [`Stats::active`] while it lives, also when its task is cancelled
/// or panics, which a bare add and subtract would miss (a drain would wait for it in vain).
pub(crate) struct Active<'a>(&'a AtomicU64);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    /// Connections open now ([`Stats::active`]).
    pub fn open(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// One more connection in [`Stats::active`], until the guard is dropped.
    pub(crate) fn count_active(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(&self.active)
    }
}

impl Ctx {
    /// A context over the given parts, for `workers` data-path workers.
    pub fn new(
        trust_domain: String,
        mesh: MeshView,
        certs: Arc<Certs>,
        access: AccessLog,
        workers: usize,
    ) -> Self {
        Self {
            trust_domain,
            mesh,
            certs,
            pool: PerWorker::new(workers, |_| Pool::new()),
            metrics: Arc::new({
                let mut m = Metrics::default();
                m.count_dropped_lines(&access);
                m
            }),
            access,
            stats: Arc::new(Stats::default()),
            live: Live::default(),
            stop: tokio::sync::Notify::new(),
            trusted_plaintext: Default::default(),
            pending: Arc::new(Semaphore::new(AGENT_HANDSHAKES)),
            rr: AtomicUsize::new(0),
        }
    }

    /// The counters, for the local API.
    pub fn counters(&self) -> sinew_local_api::Counters {
        self.stats.snapshot(&self.pool_stats())
    }

    /// The HBONE pools' counters, summed over the workers.
    pub fn pool_stats(&self) -> sinew_hbone::PoolStats {
        self.pool.all().iter().map(Pool::stats).fold(Default::default(), |a, b| {
            sinew_hbone::PoolStats {
                opened: a.opened + b.opened,
                open: a.open + b.open,
                streams: a.streams + b.streams,
            }
        })
    }
}

/// Which way a listener's connections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Leaving the pod (its 15001 listener).
    Outbound,
    /// Arriving at the pod (its 15006 listener).
    Inbound,
}

/// A captured pod, as its connections see it.
pub struct PodNet {
    /// `namespace/name`, for logs.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod (workload) name.
    pub workload: String,
    /// Its SPIFFE id.
    pub identity: SpiffeId,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace.
    pub netns: Netns,
    /// Permits for inbound HBONE connections not yet authenticated ([`HANDSHAKES`]).
    pub handshakes: Arc<Semaphore>,
    /// What all pods share.
    pub ctx: Arc<Ctx>,
}

impl PodNet {
    /// A place for one more inbound HBONE connection not yet authenticated, within the pod's
    /// bound and the node's; `None`: refuse it.
    pub(crate) fn pending(&self) -> Option<Pending> {
        Pending::take(&self.handshakes, &self.ctx.pending)
    }
}

/// Accepts on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, direction: Direction, pod: Arc<PodNet>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                match direction {
                    Direction::Outbound => tokio::spawn(outbound::handle(stream, peer, pod)),
                    Direction::Inbound => tokio::spawn(inbound::plaintext(stream, peer, pod)),
                };
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the listener stays.
                warn!(pod = %pod.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Copies both ways; an EOF is passed on as a FIN (half-close), an error as a reset.
/// splice(2) when two pipes can be had, user-space buffers otherwise (out of descriptors).
/// `progress` is told the bytes moved, (a -> b, b -> a): as they go with splice, at the end
/// otherwise.
pub(crate) async fn copy(
    a: &mut TcpStream,
    b: &mut TcpStream,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> io::Result<(u64, u64)> {
    let result = match splice::Pipes::take() {
        Ok(pipes) => {
            let result = splice::copy(a, b, &pipes, progress).await;
            if result.is_ok() {
                // Both directions reached EOF with their pipes drained: reusable.
                pipes.give_back();
            }
            result
        }
        Err(_) => {
            let r = tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await;
            if let Ok((ab, ba)) = r {
                progress(ab, ba);
            }
            r
        }
    };
    if result.is_err() {
        // One side was reset or failed: reset the other rather than let it see a clean end.
        reset(a);
        reset(b);
    }
    result
}

/// Makes the next close send RST instead of FIN.
/// The error of a connection reset because the agent stopped (its drain reached its limit).
pub(crate) fn stopped() -> std::io::Error {
    std::io::Error::other("reset: the agent stopped (--drain-timeout passed)")
}

pub(crate) fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Connecting to one of the agent's own in-pod listeners would loop back into the agent
/// (a connection to pod:15006 is captured onto 15006, whose upstream is pod:15006 again...).
pub(crate) fn is_own_listener(direction: Direction, addr: SocketAddr) -> bool {
    match direction {
        Direction::Outbound => addr.port() == OUTBOUND_PORT && addr.ip().is_loopback(),
        Direction::Inbound => {
            [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT].contains(&addr.port())
        }
    }
}

/// Folds IPv4-mapped IPv6 addresses (from dual-stack listeners) to IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// How long a connect from inside a pod may take (Istio's default connect timeout): a
/// destination that drops SYNs would otherwise hold the client for the kernel's two minutes
/// of retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `target` from a socket created inside `netns`.
pub async fn connect_in(netns: &Netns, target: SocketAddr) -> io::Result<TcpStream> {
    let sock = netns.tcp_socket(Domain::for_address(target))?;
    sock.set_tcp_nodelay(true)?;
    let connect = TcpSocket::from_std_stream(sock.into()).connect(target);
    tokio::time::timeout(CONNECT_TIMEOUT, connect).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {CONNECT_TIMEOUT:?}"),
        ))
    })
}

/// Asks the kernel (our getsockopt program) where an outbound connection was going.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: `storage` is larger than the `len` bytes we offer the kernel.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    match storage.ss_family as i32 {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says sockaddr_in and the kernel wrote that many bytes.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(canonical(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, 0))))
        }
        family => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST returned family {family}, length {len}"),
        )),
    }
}

/// Binds a listener inside `netns`. `dual_stack` lets an IPv6 wildcard also take IPv4.
pub fn listen_in(
    netns: &Netns,
    addr: SocketAddr,
    dual_stack: bool,
) -> io::Result<std::net::TcpListener> {
    let sock = netns.tcp_socket(Domain::for_address(addr))?;
    if addr.is_ipv6() {
        sock.set_only_v6(!dual_stack)?;
    }
    sock.set_reuse_address(true)?;
    // One listener per worker on the same address (see `pods`).
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// The wildcard address of a family with `port` (for wildcard listeners).
pub fn any(v6: bool, port: u16) -> SocketAddr {
    let ip: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_places_are_bounded_per_pod_and_per_node() {
        let node = Arc::new(Semaphore::new(3));
        let (a, b) = (Arc::new(Semaphore::new(2)), Arc::new(Semaphore::new(2)));
        let a1 = Pending::take(&a, &node).expect("a first");
        let _a2 = Pending::take(&a, &node).expect("a second");
        assert!(Pending::take(&a, &node).is_none(), "the pod's bound");
        let _b1 = Pending::take(&b, &node).expect("b first");
        assert!(Pending::take(&b, &node).is_none(), "the node's bound");
        assert_eq!(b.available_permits(), 1, "a refusal keeps no place of the pod");
        drop(a1);
        assert!(Pending::take(&b, &node).is_some(), "a place given back");
    }

    #[test]
    fn own_listeners_are_never_upstreams() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_own_listener(Direction::Outbound, a("127.0.0.1:15001")));
        assert!(is_own_listener(Direction::Outbound, a("[::1]:15001")));
        assert!(!is_own_listener(Direction::Outbound, a("198.18.2.10:15001")));
        for port in [15001, 15006, 15008] {
            assert!(is_own_listener(Direction::Inbound, a(&format!("198.18.2.10:{port}"))));
        }
        assert!(!is_own_listener(Direction::Inbound, a("198.18.2.10:8080")));
    }
}
