//! The HBONE server: TLS, then HTTP/2, then one `CONNECT` per tunnelled connection, each
//! handed to the caller to authorize, connect upstream and answer.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, Method, Response, StatusCode};
use rustls::ServerConfig;
use sinew_identity::SpiffeId;
use tokio::net::TcpStream;
use tracing::debug;

use crate::{
    CONNECTION_WINDOW, H2Stream, HboneError, MAX_FRAME, MAX_HEADER_LIST, STREAM_WINDOW,
    tls::{ALPN_H2, peer_identity},
};

/// How long a peer has to finish the TLS and HTTP/2 handshakes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a client may have open on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// One accepted `CONNECT`, waiting for the caller's answer.
pub struct Inbound {
    /// Where the client wants to go (`:authority`).
    pub authority: SocketAddr,
    /// The client's SPIFFE id, from its certificate.
    pub peer: Arc<SpiffeId>,
    /// The TCP peer (the source pod, or a waypoint).
    pub peer_addr: SocketAddr,
    /// All request headers (`forwarded`, `traceparent`, `baggage`...).
    pub headers: HeaderMap,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl Inbound {
    /// The original client address from `forwarded: for="..."`, if present and well formed.
    pub fn forwarded_for(&self) -> Option<SocketAddr> {
        let value = self.headers.get("forwarded")?.to_str().ok()?;
        value.split(';').find_map(|part| {
            let v = part.trim().strip_prefix("for=")?;
            v.trim_matches('"').parse().ok()
        })
    }

    /// Answers 200 and returns the tunnelled stream.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self.respond.send_response(response(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, self.recv))
    }

    /// Whether the client sends without waiting for the 200 ([`crate::OPTIMISTIC_HEADER`]).
    pub fn optimistic(&self) -> bool {
        self.headers.contains_key(crate::OPTIMISTIC_HEADER)
    }

    /// Accepts the tunnel; the 200 goes out with the first bytes to the client, so an answer
    /// the application gives at once shares its TLS record (and the client's wakeup):
    /// [`H2Stream::copy_tcp`] holds it at most [`crate::ANSWER_WAIT`]. Only for an
    /// [`Self::optimistic`] client (a client waiting for the 200 before sending more would
    /// stall until then); others are answered at once, as [`Self::accept`] does.
    pub fn accept_with_answer(self) -> Result<H2Stream, h2::Error> {
        if !self.optimistic() {
            return self.accept();
        }
        Ok(H2Stream::unanswered(self.respond, self.recv))
    }

    /// Answers `status` (401 denied, 503 upstream unreachable...) and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let _ = self.respond.send_response(response(status), true);
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// Serves one TCP connection: TLS with `config`, HTTP/2, then `handler` for every valid
/// `CONNECT` (spawned; it must answer). Non-CONNECT requests and bad authorities get 400 here.
/// Returns when the client goes away or breaks the protocol.
pub async fn serve_connection<F, Fut>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    config: Arc<ServerConfig>,
    handler: F,
) -> Result<(), HboneError>
where
    F: Fn(Inbound) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_connection_holding(tcp, peer_addr, config, (), handler).await
}

/// Like [`serve_connection`], holding `until_handshaken` (a semaphore permit, say) until the
/// client is authenticated and HTTP/2 is up, or the connection fails: so the caller can bound
/// how many connections nobody has authenticated yet, which anyone who can reach the port may
/// open.
pub async fn serve_connection_holding<F, Fut, P>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    config: Arc<ServerConfig>,
    until_handshaken: P,
    handler: F,
) -> Result<(), HboneError>
where
    F: Fn(Inbound) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let never = std::future::pending();
    let ping = crate::client::PING_INTERVAL;
    serve_connection_until(tcp, peer_addr, config, until_handshaken, never, ping, handler).await
}

/// Like [`serve_connection_holding`], draining when `drain` completes: the client is told to
/// go away (GOAWAY), so it opens no new stream here, while the streams already open finish.
/// For a destination that leaves the mesh: its live connections end as they would, new ones
/// no longer ride an old tunnel.
///
/// The client is pinged every `ping_interval` (as ztunnel's server does): one whose ping is
/// unanswered by the next ends the connection, which resets its streams, so a client node
/// that lost power or its network, sending no FIN or RST, does not hold its tunnels and the
/// application connections behind them open forever.
#[allow(clippy::too_many_arguments, reason = "the layers of serve_connection, each one knob")]
pub async fn serve_connection_until<F, Fut, P, D>(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    config: Arc<ServerConfig>,
    until_handshaken: P,
    drain: D,
    ping_interval: std::time::Duration,
    handler: F,
) -> Result<(), HboneError>
where
    F: Fn(Inbound) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let _ = tcp.set_nodelay(true);
    let timeout = |what| HboneError::Timeout { what, peer: peer_addr };
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(crate::wire(tcp)),
    )
    .await
    .map_err(|_| timeout("TLS handshake"))?
    .map_err(|source| HboneError::Tls { peer: peer_addr, source })?;
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN_H2) {
        return Err(HboneError::Tls {
            peer: peer_addr,
            source: std::io::Error::other("the client did not negotiate ALPN h2"),
        });
    }
    let peer = peer_identity(session.peer_certificates()).map(Arc::new).ok_or_else(|| {
        HboneError::Tls {
            peer: peer_addr,
            source: std::io::Error::other("client certificate without a SPIFFE id"),
        }
    })?;
    let mut conn = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_send_buffer_size(1 << 20)
            // See the client: small DATA frames are normal in a tunnel.
            .data_frame_budget(usize::MAX)
            .handshake::<_, Bytes>(tls),
    )
    .await
    .map_err(|_| timeout("HTTP/2 handshake"))?
    .map_err(|source| HboneError::H2 { peer: peer_addr, source })?;
    drop(until_handshaken);
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    let mut keepalive = crate::Keepalive::new(conn.ping_pong(), ping_interval).await;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut drain, if !draining => {
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
            beat = keepalive.next() => match beat {
                crate::Beat::Pinged => continue,
                crate::Beat::Gone => return Err(timeout("an answer to a keepalive ping")),
            },
        };
        let Some(next) = next else { break };
        let (request, mut respond) =
            next.map_err(|source| HboneError::H2 { peer: peer_addr, source })?;
        let authority = request.uri().authority().and_then(|a| a.as_str().parse().ok());
        let authority = match (request.method(), authority) {
            (&Method::CONNECT, Some(a)) => a,
            (method, _) => {
                debug!(%peer_addr, %method, uri = %request.uri(), "refusing a request that is not CONNECT <ip>:<port>");
                let _ = respond.send_response(response(StatusCode::BAD_REQUEST), true);
                continue;
            }
        };
        let (parts, recv) = request.into_parts();
        let inbound = Inbound {
            authority,
            peer: peer.clone(),
            peer_addr,
            headers: parts.headers,
            respond,
            recv,
        };
        tokio::spawn(handler(inbound));
    }
    Ok(())
}
