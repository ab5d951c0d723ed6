//! HTTP to endpoints: pooled HTTP/1.1 and HTTP/2 clients (hyper-util's, with keep-alive and
//! idle timeouts) whose connector opens HBONE streams to the endpoint's agent, as the
//! waypoint. A request is addressed to `http://<endpoint ip>:<port>/...`; the connector
//! looks the endpoint up to know the identity it must prove. HTTP/2 sends the URI's authority
//! as `:authority`, so there the client's Host takes its place and each endpoint gets a
//! client whose connector is bound to it.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection, HttpConnector},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use sinew_hbone::{Connect, H2Stream, HBONE_PORT, PoolKey};
use sinew_workers::PerWorker;
use tokio::net::TcpStream;

use crate::state::Waypoint;

/// The baggage member naming the original client's SPIFFE id on a waypoint's tunnels; the
/// destination agent trusts it only from a waypoint.
pub const SOURCE_PRINCIPAL_BAGGAGE: &str = "sinew.source.principal";

/// The body sent upstream.
pub type UpBody = BoxBody<Bytes, crate::replay::BoxError>;

/// Idle upstream HTTP connections are closed after this long.
const IDLE: Duration = Duration::from_secs(30);

/// Why a try failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The tunnel or the HTTP handshake could not be made.
    #[error("connect to {endpoint}: {reason}")]
    Connect {
        /// Endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The exchange broke after it started.
    #[error("{endpoint}: {reason}")]
    Reset {
        /// Endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A new connection would pass the backend's `connectionPool.maxConnections`.
    #[error("{backend}: maxConnections reached")]
    Overflow {
        /// The backend service, `namespace/name`.
        backend: String,
    },
}

/// A pooled client per (worker, original client identity, HTTP/2 endpoint, backend
/// service) through HBONE; HTTP/1.1 clients (no endpoint) pool by the URI's endpoint. Per
/// backend, as Envoy pools per cluster: its connectors apply that backend's connection limit
/// and connect timeout. Each with the time it was last asked for.
type HboneClients = std::sync::Mutex<HashMap<ClientKey, (Client<HboneConnector, UpBody>, Instant)>>;

type ClientKey = (usize, Option<u32>, Option<SocketAddr>, Option<(Arc<str>, u64)>);

/// The backend service a request goes to, as upstream clients are pooled by it.
pub struct Backend {
    /// `namespace/name`: the connector finds the backend's limits by it.
    pub key: Arc<str>,
    /// Grows when the backend's connection limits are rebuilt (a new DestinationPolicy):
    /// connections made under the old limits, which counted none of them, are not reused.
    pub generation: u64,
}

/// At most this many pooled clients (endpoints and client identities come and go): past it,
/// the ones not asked for in the longest time go (requests in flight keep their client, and
/// its idle connections close with it).
const MAX_CLIENTS: usize = 4096;

/// Makes room for one more entry in `map` (at most `cap`): entries unused for longer than
/// [`IDLE`] go first (their pools have closed every idle connection already), then, if that
/// is not enough, the least recently used quarter, so a busy waypoint does not pay for a
/// full scan on every new key, and no entry in use loses its connections all at once, as
/// clearing the whole map did.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, (V, Instant)>,
    cap: usize,
    now: Instant,
) {
    if map.len() < cap {
        return;
    }
    map.retain(|_, (_, used)| now.saturating_duration_since(*used) <= IDLE);
    if map.len() < cap {
        return;
    }
    let mut by_use: Vec<(Instant, K)> =
        map.iter().map(|(k, (_, used))| (*used, k.clone())).collect();
    by_use.sort_unstable_by_key(|(used, _)| *used);
    for (_, k) in by_use.into_iter().take(cap / 4 + 1) {
        map.remove(&k);
    }
}

/// The pooled clients.
#[allow(clippy::large_enum_variant, reason = "one per process")]
pub enum Upstreams {
    /// Through HBONE, as the waypoint (the mesh). One pooled client per original client
    /// identity, so every connection, HTTP/1.1 or HTTP/2, carries one identity, which its
    /// tunnel names to the destination.
    Hbone {
        /// The waypoint (the connectors' HBONE pool and identity).
        wp: Weak<Waypoint>,
        /// Clients by (worker, identity tag, HTTP/2 endpoint): a worker's requests use
        /// connections that worker drives.
        clients: HboneClients,
    },
    /// Plain TCP (the HTTP engine alone, for `--plain-http` benchmarking), per worker.
    Plain {
        /// HTTP/1.1.
        h1: PerWorker<Client<HttpConnector, UpBody>>,
        /// HTTP/2.
        h2: PerWorker<Client<HttpConnector, UpBody>>,
    },
}

impl Upstreams {
    /// Clients whose connections go through `wp`'s HBONE pool.
    pub fn new(wp: Weak<Waypoint>) -> Self {
        Self::Hbone { wp, clients: std::sync::Mutex::new(HashMap::new()) }
    }

    fn hbone_client(
        wp: &Weak<Waypoint>,
        clients: &HboneClients,
        source: Option<u32>,
        http2_endpoint: Option<SocketAddr>,
        backend: Option<&Backend>,
    ) -> Client<HboneConnector, UpBody> {
        let worker = sinew_workers::current().unwrap_or(0);
        let now = Instant::now();
        let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = (worker, source, http2_endpoint, backend.map(|b| (b.key.clone(), b.generation)));
        if let Some((client, used)) = clients.get_mut(&key) {
            *used = now;
            return client.clone();
        }
        // Clients of this backend's earlier limits are not asked for again (a request still
        // on older limits evicts nothing newer).
        if let Some((name, generation)) = &key.3 {
            clients.retain(|k, _| k.3.as_ref().is_none_or(|(n, g)| n != name || g >= generation));
        }
        make_room(&mut clients, MAX_CLIENTS, now);
        let mut b = Client::builder(TokioExecutor::new());
        let http2 = http2_endpoint.is_some();
        b.pool_idle_timeout(IDLE).pool_timer(TokioTimer::new()).http2_only(http2);
        let client = b.build(HboneConnector {
            wp: wp.clone(),
            source,
            endpoint: http2_endpoint,
            backend: backend.map(|b| b.key.clone()),
        });
        clients.insert(key, (client.clone(), now));
        client
    }

    /// Clients over plain TCP, for `workers` workers.
    pub fn plain(workers: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = |http2: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(IDLE).pool_timer(TokioTimer::new()).http2_only(http2);
            b.build(connector.clone())
        };
        Self::Plain {
            h1: PerWorker::new(workers, |_| client(false)),
            h2: PerWorker::new(workers, |_| client(true)),
        }
    }

    /// Sends `req` (its URI `http://<endpoint ip>:<port>/...`) over HTTP/2 or HTTP/1.1, on a
    /// connection of the original client identity `source` (see [`Waypoint::source_tag`]).
    /// Through HBONE, an HTTP/2 backend gets the client's Host as `:authority`.
    /// `backend` (`namespace/name`) names the service whose connection limits apply.
    pub async fn send(
        &self,
        mut req: http::Request<UpBody>,
        http2: bool,
        endpoint: &str,
        source: Option<u32>,
        backend: Option<&Backend>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        // Held until the response (or failure) arrives: a connect hyper moved to the
        // background because the request got a pooled connection sees it go and stops
        // waiting for a place (see `connection_place`).
        let (waiting, token) = tokio::sync::watch::channel(());
        let result = match (self, http2) {
            (Self::Hbone { wp, clients }, true) => {
                let to = authority_from_host(&mut req).ok_or_else(|| UpstreamError::Connect {
                    endpoint: endpoint.to_owned(),
                    reason: "not an <ip>:<port> authority".into(),
                })?;
                let client = Self::hbone_client(wp, clients, source, Some(to), backend);
                REQUEST_WAITING.scope(token, client.request(req)).await
            }
            (Self::Hbone { wp, clients }, false) => {
                let client = Self::hbone_client(wp, clients, source, None, backend);
                REQUEST_WAITING.scope(token, client.request(req)).await
            }
            (Self::Plain { h2, .. }, true) => h2.get().request(req).await,
            (Self::Plain { h1, .. }, false) => h1.get().request(req).await,
        };
        drop(waiting);
        result.map_err(|e| {
            // The connector's own overflow, through hyper's wrapping.
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cause {
                if let Some(UpstreamError::Overflow { backend }) = c.downcast_ref() {
                    return UpstreamError::Overflow { backend: backend.clone() };
                }
                cause = c.source();
            }
            let reason = error_chain(&e);
            if e.is_connect() {
                UpstreamError::Connect { endpoint: endpoint.to_owned(), reason }
            } else {
                UpstreamError::Reset { endpoint: endpoint.to_owned(), reason }
            }
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Opens HBONE streams for the pooled clients.
#[derive(Clone)]
pub struct HboneConnector {
    wp: Weak<Waypoint>,
    /// The original client identity its connections carry.
    source: Option<u32>,
    /// The endpoint it connects to whatever the URI names (HTTP/2, whose URIs carry the
    /// client's authority); `None`: the URI's `<ip>:<port>`.
    endpoint: Option<SocketAddr>,
    /// The backend service whose limits apply (`namespace/name`).
    backend: Option<Arc<str>>,
}

/// How long a new upstream connection may take without a `connectTimeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An HBONE stream as a hyper connection, holding its place under the backend's
/// `maxConnections` for as long as it lives.
pub struct HboneIo(
    TokioIo<Upstream>,
    #[allow(dead_code, reason = "held, not read: given back when the connection drops")]
    Option<ConnectionPlace>,
);

/// A place under a backend's `maxConnections`, given back (and waiters told) on drop.
pub struct ConnectionPlace {
    permit: Option<sinew_l7::balance::ConnectionPermit>,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        // The place first, then the news: a waiter woken before the count went down would
        // find no place and sleep through the only notification.
        drop(self.permit.take());
        self.freed.notify_waiters();
    }
}

impl Connection for HboneIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for HboneIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for HboneIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<HboneIo, UpstreamError>> + Send>>;

impl tower_service::Service<Uri> for HboneConnector {
    type Response = HboneIo;
    type Error = UpstreamError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // hyper calls this from the request's own task (see `Upstreams::send`).
        let requester = REQUEST_WAITING.try_with(|t| t.clone()).ok();
        let wp = self.wp.clone();
        let source = self.source;
        let bound = self.endpoint;
        let backend = self.backend.clone();
        Box::pin(async move {
            let endpoint = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            let wp = wp.upgrade().ok_or_else(|| UpstreamError::Connect {
                endpoint: endpoint.clone(),
                reason: "waypoint stopping".into(),
            })?;
            let authority =
                bound.or_else(|| uri_endpoint(&uri)).ok_or_else(|| UpstreamError::Connect {
                    endpoint: endpoint.clone(),
                    reason: "not an <ip>:<port> authority".into(),
                })?;
            // The backend's connectionPool: a place under maxConnections, and its timeout.
            let state = backend.as_deref().and_then(|k| wp.backend_by_key(k));
            let timeout = state.as_ref().and_then(|s| s.connect_timeout).unwrap_or(CONNECT_TIMEOUT);
            let permit = match &state {
                Some(s) => Some(connection_place(s, timeout, requester).await?),
                None => None,
            };
            let tunnel = tokio::time::timeout(timeout, open_tunnel(&wp, authority, source))
                .await
                .map_err(|_| UpstreamError::Connect {
                    endpoint,
                    reason: format!("connect timed out after {timeout:?}"),
                })??;
            Ok(HboneIo(TokioIo::new(tunnel), permit))
        })
    }
}

/// The waypoint's connection to an endpoint: an HBONE stream through its agent to one in
/// the mesh (`Left`), plain TCP to one outside it (`Right`: of a namespace not in the mesh,
/// or labelled out), as Istio's waypoint and the agents do.
pub type Upstream = tokio_util::either::Either<H2Stream, TcpStream>;

/// Ends `up` with a reset: RST_STREAM, or a TCP RST once dropped.
pub fn reset(up: &mut Upstream) {
    match up {
        Upstream::Left(s) => s.reset(),
        Upstream::Right(t) => drop(t.set_zero_linger()),
    }
}

/// A connection to `authority` (an endpoint's `<ip>:<port>`): for an endpoint in the mesh an
/// HBONE stream through its agent, as the waypoint, naming the original client identity
/// `source` (see [`Waypoint::source_tag`]) in the CONNECT's baggage; for one outside it,
/// plain TCP. Pooled HTTP connections and forwarded TCP connections both use it.
pub async fn open_tunnel(
    wp: &Waypoint,
    authority: SocketAddr,
    source: Option<u32>,
) -> Result<Upstream, UpstreamError> {
    let err = |reason: String| UpstreamError::Connect { endpoint: authority.to_string(), reason };
    let snapshot = wp.snapshot.borrow().clone();
    let workload = snapshot
        .mesh
        .workload_by_ip(authority.ip())
        .ok_or_else(|| err("no workload has this address".into()))?;
    if !workload.in_mesh {
        let tcp = TcpStream::connect(authority).await.map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        return Ok(Upstream::Right(tcp));
    }
    let expected = workload.identity(&wp.trust_domain).map_err(|e| err(e.to_string()))?;
    let identity =
        wp.identity().ok_or_else(|| err("no valid certificate (none yet, or expired)".into()))?;
    let key = PoolKey {
        source: wp.id.clone(),
        source_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        destination: SocketAddr::new(authority.ip(), HBONE_PORT),
        expected,
    };
    // Pooled HTTP connections carry many requests of one original client identity: the
    // CONNECT names that identity in its baggage.
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    let baggage = source
        .and_then(|tag| wp.source_of(tag))
        .map(|principal| format!("{SOURCE_PRINCIPAL_BAGGAGE}={principal}"));
    let connect = Connect {
        authority,
        client,
        baggage: baggage.as_deref(),
        early: Bytes::new(),
        // The waypoint retries on a refused or failed connect: it needs the answer first.
        optimistic: false,
    };
    wp.pool
        .get()
        .connect(&key, &identity, connect, TcpStream::connect)
        .await
        .map(Upstream::Left)
        .map_err(|e| err(e.to_string()))
}

tokio::task_local! {
    /// Set while a request waits for its response; its sender goes when it no longer does.
    static REQUEST_WAITING: tokio::sync::watch::Receiver<()>;
}

/// A place under the backend's `maxConnections`. When all are taken the request waits for
/// one, as Envoy queues it, if `maxPendingRequests` leaves room, for up to `timeout`;
/// otherwise it overflows (503, UO). Meanwhile hyper may hand the request a pooled
/// connection that came free and leave this connect to finish for the pool: once the
/// `requester` no longer waits, neither does this connect, so it holds no pending place
/// for a request that has none (such leftovers made later requests overflow).
async fn connection_place(
    backend: &crate::state::BackendState,
    timeout: Duration,
    requester: Option<tokio::sync::watch::Receiver<()>>,
) -> Result<ConnectionPlace, UpstreamError> {
    let overflow = || UpstreamError::Overflow { backend: backend.key.to_string() };
    let freed = backend.connection_freed.clone();
    let place = |permit| ConnectionPlace { permit: Some(permit), freed: freed.clone() };
    if let Some(p) = backend.limits.try_connection() {
        return Ok(place(p));
    }
    let _pending = backend.limits.try_pending().ok_or_else(overflow)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut requester = requester;
    let gone = async {
        match &mut requester {
            // Only ever closes: nothing is sent on it.
            Some(r) => while r.changed().await.is_ok() {},
            None => std::future::pending().await,
        }
    };
    let mut gone = std::pin::pin!(gone);
    loop {
        // Registered before looking, so a place freed in between is not missed.
        let notified = freed.notified();
        if let Some(p) = backend.limits.try_connection() {
            return Ok(place(p));
        }
        tokio::select! {
            waited = tokio::time::timeout_at(deadline, notified) => {
                if waited.is_err() {
                    return Err(overflow());
                }
            }
            () = &mut gone => {
                return Err(UpstreamError::Connect {
                    endpoint: backend.key.to_string(),
                    reason: "the request was served by a pooled connection".into(),
                });
            }
        }
    }
}

/// The `<ip>:<port>` a URI names, if it names one.
fn uri_endpoint(uri: &Uri) -> Option<SocketAddr> {
    let ip = uri.host()?.trim_matches(['[', ']']).parse::<IpAddr>().ok()?;
    Some(SocketAddr::new(ip, uri.port_u16()?))
}

/// For HTTP/2, which sends the URI's authority as `:authority`: puts the request's Host there
/// (and drops the header, as RFC 9113 section 8.3.1 asks), returning the endpoint the URI
/// named, which the connection must still reach. Without a usable Host the URI stays.
fn authority_from_host(req: &mut http::Request<UpBody>) -> Option<SocketAddr> {
    let endpoint = uri_endpoint(req.uri())?;
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    if let Some(host) = host {
        let mut parts = req.uri().clone().into_parts();
        parts.authority = Some(host);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
            req.headers_mut().remove(http::header::HOST);
        }
    }
    Some(endpoint)
}

/// The request URI toward an endpoint.
pub fn endpoint_uri(ip: IpAddr, port: u16, path_and_query: &str) -> Uri {
    Uri::builder()
        .scheme("http")
        .authority(SocketAddr::new(ip, port).to_string())
        .path_and_query(path_and_query)
        .build()
        .unwrap_or_else(|_| Uri::from_static("http://0.0.0.0/"))
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Empty};

    use super::*;

    fn request(host: Option<&str>) -> http::Request<UpBody> {
        let mut req = http::Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() = endpoint_uri("198.18.1.5".parse().expect("ip"), 9000, "/pkg.Svc/Call?x=1");
        if let Some(h) = host {
            req.headers_mut().insert(http::header::HOST, h.parse().expect("host"));
        }
        req
    }

    #[test]
    fn room_goes_to_new_clients_from_the_longest_unused() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut map: HashMap<u32, ((), Instant)> =
            (0..8).map(|i| (i, ((), at(i.into())))).collect();
        // Under the cap: nothing goes.
        make_room(&mut map, 9, at(10));
        assert_eq!(map.len(), 8);
        // At the cap, all recently used: the least recently used quarter (and one) goes.
        make_room(&mut map, 8, at(10));
        let mut left: Vec<u32> = map.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, [3, 4, 5, 6, 7]);
        // Entries idle past IDLE go first, and then that is enough.
        map.get_mut(&7).expect("7").1 = at(40_000);
        make_room(&mut map, 5, at(40_000));
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn http2_requests_carry_the_clients_authority_to_the_endpoint() {
        let mut req = request(Some("greeter.demo.svc:9000"));
        let to = authority_from_host(&mut req);
        assert_eq!(to, Some("198.18.1.5:9000".parse().expect("addr")));
        assert_eq!(req.uri().to_string(), "http://greeter.demo.svc:9000/pkg.Svc/Call?x=1");
        assert!(req.headers().get(http::header::HOST).is_none(), "Host became :authority");

        // No Host, or one that is no authority: the endpoint stays the authority.
        for host in [None, Some("a b")] {
            let mut req = request(host);
            assert_eq!(authority_from_host(&mut req), to);
            assert_eq!(req.uri().to_string(), "http://198.18.1.5:9000/pkg.Svc/Call?x=1");
        }
    }
}
