//! The HBONE client: a pool of mTLS HTTP/2 connections, one `CONNECT` stream per tunnelled
//! connection.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use sinew_identity::SpiffeId;
use tokio::net::TcpStream;
use tracing::debug;

use crate::{
    CONNECTION_WINDOW, H2Stream, HboneError, MAX_FRAME, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW,
    server::HANDSHAKE_TIMEOUT, tls::Identity,
};

/// Connections opened per pool key before streams share them: concurrent streams use at
/// least this many, so more than one worker thread encrypts.
pub const MIN_CONNECTIONS: usize = 2;

/// A pooled connection with no streams is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Past this many pool keys, keys without connections are dropped when a new one comes.
const PRUNE_SLOTS_AT: usize = 1024;

/// How long a CONNECT may wait for the peer's answer: longer than the peer's own connect to
/// the destination application (10 s), so a slow application gets its 503 from the peer
/// instead of costing a healthy pooled connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A pooled connection is pinged this often; one whose ping is not answered by the next is
/// dead (a peer that crashed or was cut off sends no FIN): its streams are reset rather than
/// left hanging, and new ones go elsewhere.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);

/// What may share a connection (ztunnel's key): the same source identity and address toward
/// the same destination address proving the same identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity presented.
    pub source: SpiffeId,
    /// The address connections are made from (the source pod's).
    pub source_ip: IpAddr,
    /// The peer's HBONE address (`<pod ip>:15008`).
    pub destination: SocketAddr,
    /// The identity the peer must prove.
    pub expected: SpiffeId,
}

/// Counters of a pool.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// TLS connections opened since start.
    pub opened: u64,
    /// TLS connections open now.
    pub open: usize,
    /// Streams (tunnelled connections) opened since start.
    pub streams: u64,
}

struct Conn {
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    closed: AtomicBool,
    /// The certificate and bundle it was made with: after a renewal or a rotation new
    /// streams go on a new connection, so none rides an old authentication indefinitely.
    identity: Identity,
    /// When either side's certificate expires: no new streams after that.
    valid_until: std::time::SystemTime,
}

impl Conn {
    /// May carry a new stream for `identity`.
    fn usable_for(&self, identity: &Identity) -> bool {
        !self.closed.load(Ordering::Relaxed)
            && self.identity.same_credentials(identity)
            && std::time::SystemTime::now() < self.valid_until
            && self.accepts_streams()
    }

    /// Whether h2 would open a stream here now: not after the peer's GOAWAY or a connection
    /// error (a request there would fail unsent and use up a try), as ztunnel checks with
    /// its `ready_to_use`.
    fn accepts_streams(&self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(self.send.clone().poll_ready(&mut cx), std::task::Poll::Ready(Ok(())))
    }

    /// The most streams this connection carries: ours, or fewer if the peer said so
    /// (SETTINGS_MAX_CONCURRENT_STREAMS), since h2 would queue the others.
    fn stream_limit(&self) -> usize {
        MAX_STREAMS_PER_CONNECTION.min(self.send.current_max_send_streams())
    }
}

#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Serializes dialling, so a burst of new streams opens one connection, not one each.
    /// It holds the last failed dial's time and reason: whoever waited through it fails
    /// with it at once, instead of each waiter dialling (and timing out) again in turn.
    dialing: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl Slot {
    /// The least loaded usable connection (open, made with `identity`, certificates still
    /// valid) with room for one more stream, reserving it. `None` also while fewer than
    /// [`MIN_CONNECTIONS`] exist and all are busy, so concurrent streams spread over that
    /// many connections (each driven on its own worker).
    fn reserve(&self, identity: &Identity) -> Option<Arc<Conn>> {
        let conns = self.conns.lock().expect("pool lock poisoned");
        // One pass: whether a connection is usable asks h2 (a lock each), once per connection.
        let (mut open, mut best) = (0, None::<&Arc<Conn>>);
        for c in conns.iter().filter(|c| c.usable_for(identity)) {
            open += 1;
            let load = c.active.load(Ordering::Acquire);
            if best.is_none_or(|b| load < b.active.load(Ordering::Acquire)) {
                best = Some(c);
            }
        }
        let best = best?;
        if open < MIN_CONNECTIONS && best.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        // The lock is held, so no other reservation races this one.
        let n = best.active.fetch_add(1, Ordering::AcqRel);
        if n < best.stream_limit() {
            Some(best.clone())
        } else {
            best.active.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }

    fn remove(&self, conn: &Arc<Conn>) {
        self.conns.lock().expect("pool lock poisoned").retain(|c| !Arc::ptr_eq(c, conn));
    }
}

/// Releases a stream's place on its connection when the stream is dropped.
struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct Counters {
    opened: AtomicU64,
    open: AtomicUsize,
    streams: AtomicU64,
}

/// The client side of HBONE, shared by every outbound connection of a process.
#[derive(Clone)]
pub struct Pool {
    slots: Arc<Mutex<HashMap<PoolKey, Arc<Slot>>>>,
    counters: Arc<Counters>,
    ping_interval: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Self { slots: Arc::default(), counters: Arc::default(), ping_interval: PING_INTERVAL }
    }
}

/// One tunnel request.
#[derive(Debug, Clone)]
pub struct Connect<'a> {
    /// `:authority`: where the peer should connect (`<pod ip>:<port>`, or a service VIP:port
    /// toward a waypoint).
    pub authority: SocketAddr,
    /// The original client, sent as `forwarded: for="..."`.
    pub client: SocketAddr,
    /// `baggage` (namespace and workload of the source), if any.
    pub baggage: Option<&'a str>,
    /// Bytes the client already sent, queued as DATA right behind the request instead of
    /// after the peer's 200: for protocols where the client speaks first, the first answer
    /// comes one round trip between the agents sooner. If the peer refuses the tunnel they
    /// are dropped with it. Empty for none.
    pub early: Bytes,
    /// Return as soon as the request is sent, without waiting for the peer's answer: bytes
    /// go out at once, bytes in wait for the answer, and a refusal is the stream's error (see
    /// [`crate::refused`]). The request says so ([`OPTIMISTIC_HEADER`]), so a Sinew
    /// peer may send its 200 with the application's first answer, one TLS record instead of
    /// two. For a byte tunnel; not where the caller acts on the tunnel being up (retries on
    /// connect failure).
    pub optimistic: bool,
}

/// Request header of a client that does not wait for the 200 (see [`Connect::optimistic`]).
pub const OPTIMISTIC_HEADER: &str = "sinew-optimistic";

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pings its connections every `interval` instead of [`PING_INTERVAL`] (a connection
    /// whose ping is unanswered by the next one closes); for tests, which cannot wait 30 s.
    pub fn with_ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Counters for metrics and tests.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            opened: self.counters.opened.load(Ordering::Relaxed),
            open: self.counters.open.load(Ordering::Relaxed),
            streams: self.counters.streams.load(Ordering::Relaxed),
        }
    }

    /// Opens a tunnel to `req.authority` through the peer of `key`, reusing a pooled
    /// connection when one has room; `dial` makes the TCP connection when a new one is needed
    /// (so the caller picks the namespace and source address).
    pub async fn connect<D, F>(
        &self,
        key: &PoolKey,
        identity: &Identity,
        req: Connect<'_>,
        dial: D,
    ) -> Result<H2Stream, HboneError>
    where
        D: FnOnce(SocketAddr) -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let slot = {
            let mut slots = self.slots.lock().expect("pool lock poisoned");
            if slots.len() >= PRUNE_SLOTS_AT && !slots.contains_key(key) {
                // Keys of pods long gone: a slot nobody holds and with no connection.
                slots.retain(|_, s| {
                    Arc::strong_count(s) > 1
                        || !s.conns.lock().expect("pool lock poisoned").is_empty()
                });
            }
            slots.entry(key.clone()).or_default().clone()
        };
        let peer = key.destination;
        let mut dial = Some(dial);
        // Twice at most: a request that never left (the pooled connection had been told to
        // go away, or had died) is safe to send again, on a fresh connection.
        for attempt in 0..2 {
            let conn = match slot.reserve(identity) {
                Some(c) => c,
                None => {
                    let waited_from = std::time::Instant::now();
                    let mut dialing = slot.dialing.lock().await;
                    match slot.reserve(identity) {
                        Some(c) => c,
                        None => {
                            if let Some((at, reason)) = dialing.as_ref()
                                && *at >= waited_from
                            {
                                return Err(HboneError::DialFailed {
                                    peer,
                                    reason: reason.clone(),
                                });
                            }
                            let Some(d) = dial.take() else {
                                return Err(HboneError::Timeout { what: "redial", peer });
                            };
                            let conn = match self.dial(key, identity, &slot, d).await {
                                Ok(c) => c,
                                Err(e) => {
                                    *dialing = Some((std::time::Instant::now(), e.to_string()));
                                    return Err(e);
                                }
                            };
                            *dialing = None;
                            conn.active.fetch_add(1, Ordering::AcqRel);
                            conn
                        }
                    }
                }
            };
            let guard = StreamGuard(conn.clone());
            // A peer that never answers the CONNECT (or keeps its stream limit below ours, so
            // h2 queues the stream) must not hold the application's connection forever. (An
            // optimistic stream's answer is timed in the stream, which retires the connection
            // the same way, below.)
            let result =
                tokio::time::timeout(CONNECT_TIMEOUT, open_stream(&conn, peer, req.clone()))
                    .await
                    .unwrap_or(Err((HboneError::Timeout { what: "CONNECT", peer }, true)));
            let dead = match &result {
                Ok(_) => false,
                Err((HboneError::Timeout { .. }, _)) => true,
                Err(_) => !matches!(
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.send.clone().ready()).await,
                    Ok(Ok(_))
                ),
            };
            if dead {
                // The connection is dead or stuck: stop handing it out.
                conn.closed.store(true, Ordering::Relaxed);
                slot.remove(&conn);
            }
            match result {
                Ok(stream) => {
                    self.counters.streams.fetch_add(1, Ordering::Relaxed);
                    let stream = stream.with_guard(Box::new(guard));
                    if !req.optimistic {
                        return Ok(stream);
                    }
                    // Answered later, in the stream: a peer that stops answering CONNECTs
                    // (while still answering pings) retires its connection from there.
                    let (c, s) = (conn.clone(), Arc::downgrade(&slot));
                    let retire = move || {
                        c.closed.store(true, Ordering::Relaxed);
                        if let Some(s) = s.upgrade() {
                            s.remove(&c);
                        }
                    };
                    return Ok(stream.on_answer_timeout(Box::new(retire)));
                }
                Err((e, sent)) if sent || !dead || attempt == 1 || dial.is_none() => {
                    return Err(e);
                }
                Err((e, _)) => {
                    debug!(%peer, error = %e, "CONNECT never left a dead connection; again on a new one")
                }
            }
        }
        Err(HboneError::Timeout { what: "CONNECT", peer })
    }

    async fn dial<D, F>(
        &self,
        key: &PoolKey,
        identity: &Identity,
        slot: &Arc<Slot>,
        dial: D,
    ) -> Result<Arc<Conn>, HboneError>
    where
        D: FnOnce(SocketAddr) -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let peer = key.destination;
        let timeout = |what| HboneError::Timeout { what, peer };
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, dial(peer))
            .await
            .map_err(|_| timeout("TCP connect"))?
            .map_err(|source| HboneError::Connect { peer, source })?;
        let _ = tcp.set_nodelay(true);
        let config = identity.client_config(std::slice::from_ref(&key.expected))?;
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config)
                .connect(crate::tls::server_name(peer), crate::wire(tcp)),
        )
        .await
        .map_err(|_| timeout("TLS handshake"))?
        .map_err(|source| HboneError::Tls { peer, source })?;
        let peer_expiry = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| sinew_identity::not_after_of_der(c).ok());
        let (send, connection) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_send_buffer_size(1 << 20)
                // Off, as ztunnel has it: a tunnel forwards whatever writes its app makes, so
                // many small DATA frames on a slow reader are normal, and h2's default budget
                // would close the whole connection (every stream) with ENHANCE_YOUR_CALM.
                // Flow control still bounds the bytes.
                .data_frame_budget(usize::MAX)
                .handshake::<_, Bytes>(tls),
        )
        .await
        .map_err(|_| timeout("HTTP/2 handshake"))?
        .map_err(|source| HboneError::H2 { peer, source })?;
        let valid_until = peer_expiry.map_or(identity.not_after(), |p| p.min(identity.not_after()));
        let conn = Arc::new(Conn {
            send,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            identity: identity.clone(),
            valid_until,
        });
        slot.conns.lock().expect("pool lock poisoned").push(conn.clone());
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        debug!(%peer, source = %key.source, expected = %key.expected, "HBONE connection opened");
        tokio::spawn(drive(
            connection,
            Arc::downgrade(&conn),
            Arc::downgrade(slot),
            self.counters.clone(),
            peer,
            self.ping_interval,
        ));
        Ok(conn)
    }
}

/// Runs a connection until it fails or has been idle for [`IDLE_TIMEOUT`], then takes it out
/// of the pool (in-flight streams of a closing connection still finish).
async fn drive(
    connection: h2::client::Connection<tokio_rustls::client::TlsStream<crate::Wire>, Bytes>,
    conn: Weak<Conn>,
    slot: Weak<Slot>,
    counters: Arc<Counters>,
    peer: SocketAddr,
    ping_interval: Duration,
) {
    let mut connection = connection;
    let mut keepalive = crate::Keepalive::new(connection.ping_pong(), ping_interval).await;
    let mut connection = std::pin::pin!(connection);
    let mut idle_checks = 0u32;
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "HBONE connection failed");
                }
                break;
            }
            beat = keepalive.next() => {
                if beat == crate::Beat::Gone {
                    // No answer for a whole interval: the peer is gone. Dropping the
                    // connection resets its streams, so their applications see the end.
                    debug!(%peer, "HBONE connection unanswered ping: closing");
                    break;
                }
                let Some(c) = conn.upgrade() else { break };
                if c.active.load(Ordering::Acquire) == 0 {
                    idle_checks += 1;
                } else {
                    idle_checks = 0;
                }
                if ping_interval * idle_checks >= IDLE_TIMEOUT {
                    // Out of the pool: once the last handle goes, h2 closes gracefully.
                    c.closed.store(true, Ordering::Relaxed);
                    if let Some(s) = slot.upgrade() {
                        s.remove(&c);
                    }
                    drop(c);
                    let _ = (&mut connection).await;
                    break;
                }
            }
        }
    }
    if let (Some(c), Some(s)) = (conn.upgrade(), slot.upgrade()) {
        c.closed.store(true, Ordering::Relaxed);
        s.remove(&c);
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);
    debug!(%peer, "HBONE connection closed");
}

/// Sends the CONNECT and waits for its answer (an optimistic request: only sends it, the
/// stream waits). An error says whether the request went out (`false`: the connection
/// refused it before sending, so it may be sent elsewhere).
async fn open_stream(
    conn: &Conn,
    peer: SocketAddr,
    req: Connect<'_>,
) -> Result<H2Stream, (HboneError, bool)> {
    let unsent = |source| (HboneError::H2 { peer, source }, false);
    let h2err = |source| (HboneError::H2 { peer, source }, true);
    let mut send = conn.send.clone().ready().await.map_err(unsent)?;
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = http::Uri::try_from(req.authority.to_string()).map_err(|_| {
        let status = StatusCode::BAD_REQUEST;
        (HboneError::Refused { peer, authority: req.authority, status }, false)
    })?;
    let headers = request.headers_mut();
    if let Ok(v) = format!("for=\"{}\"", req.client).parse() {
        headers.insert("forwarded", v);
    }
    if let Ok(v) = traceparent().parse() {
        headers.insert("traceparent", v);
    }
    if let Some(v) = req.baggage.and_then(|b| b.parse().ok()) {
        headers.insert("baggage", v);
    }
    if req.optimistic {
        headers.insert(OPTIMISTIC_HEADER, http::HeaderValue::from_static("1"));
    }
    let (response, mut stream) = send.send_request(request, false).map_err(unsent)?;
    if !req.early.is_empty() {
        // h2 queues DATA beyond the stream's window until the peer grants it; the early bytes
        // are at most a socket read, far below the 4 MiB window of our peers.
        stream.send_data(req.early, false).map_err(h2err)?;
    }
    if req.optimistic {
        return Ok(H2Stream::awaiting(stream, response, peer, req.authority));
    }
    let response = response.await.map_err(h2err)?;
    if response.status() != StatusCode::OK {
        let status = response.status();
        return Err((HboneError::Refused { peer, authority: req.authority, status }, true));
    }
    Ok(H2Stream::new(stream, response.into_body()))
}

/// A fresh W3C trace context (`00-<trace id>-<span id>-00`, not sampled).
fn traceparent() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!("00-{a:016x}{b:016x}-{:016x}-00", random_u64() | 1)
}

/// Unique-enough random bits without a dependency: a counter mixed with the clock
/// (splitmix64). For ids, sampling and load balancing, not for secrets.
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mut z = nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
