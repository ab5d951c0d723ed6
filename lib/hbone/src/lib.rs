//! HBONE: TCP tunnelled in HTTP/2 `CONNECT` over mutual TLS, wire-compatible with Istio
//! ambient's ztunnel (DESIGN.md, "Tunnel").
//!
//! - [`tls`]: rustls configurations for both ends: TLS 1.3 only, AES-GCM suites, ALPN `h2`, no
//!   SNI, no resumption; both sides present SPIFFE SVIDs; the server accepts clients of its
//!   trust domain, the client accepts only the server identities it expects (never a DNS name).
//! - [`Pool`]: the client side. Connections are pooled per (source identity, destination
//!   identity, source address, destination address) and multiplexed, up to
//!   [`MAX_STREAMS_PER_CONNECTION`] streams each.
//! - [`server`]: the server side, handing each `CONNECT` to the caller, who answers with
//!   200, 400, 401 or 503.
//! - [`H2Stream`]: one tunnelled connection as `AsyncRead + AsyncWrite`, with half-close
//!   carried as `END_STREAM` and resets as `RST_STREAM`.
//!
//! Shared by the node agent and the waypoint.
#![forbid(unsafe_code)]

mod client;
pub mod server;
mod stream;
pub mod tls;

use std::net::SocketAddr;

pub use client::{
    Connect, IDLE_TIMEOUT, OPTIMISTIC_HEADER, PING_INTERVAL, Pool, PoolKey, PoolStats, random_u64,
};
pub use server::{Inbound, serve_connection, serve_connection_holding, serve_connection_until};
pub use stream::{ANSWER_WAIT, H2Stream, refused};

/// The HBONE port on every mesh pod.
pub const HBONE_PORT: u16 = 15008;
/// HTTP/2 stream window (ztunnel: 4 MiB).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 connection window (ztunnel: 16 MiB).
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept (ztunnel: 1 MiB).
pub const MAX_FRAME: u32 = 1 << 20;
/// Streams per pooled connection before another connection is opened (ztunnel: 100).
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// Largest request header block a server accepts; larger ones are refused.
pub const MAX_HEADER_LIST: u32 = 16 << 10;

/// Why a tunnel could not be opened or served.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// TCP to the peer failed.
    #[error("connecting to {peer}: {source}")]
    Connect {
        /// Peer address.
        peer: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The TLS handshake failed (untrusted peer, wrong identity, not TLS...).
    #[error("TLS with {peer}: {source}")]
    Tls {
        /// Peer address.
        peer: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// HTTP/2 failed.
    #[error("HTTP/2 with {peer}: {source}")]
    H2 {
        /// Peer address.
        peer: SocketAddr,
        /// Cause.
        source: h2::Error,
    },
    /// The peer answered the `CONNECT` with something other than 200.
    #[error("{peer} refused CONNECT {authority}: HTTP {status}")]
    Refused {
        /// Peer address.
        peer: SocketAddr,
        /// Requested authority.
        authority: SocketAddr,
        /// Its answer.
        status: http::StatusCode,
    },
    /// A certificate or key could not be used.
    #[error(transparent)]
    Config(#[from] tls::TlsError),
    /// Took too long.
    #[error("{what} with {peer} timed out")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// Peer address.
        peer: SocketAddr,
    },
    /// A connection to the peer was being made while this request waited, and it failed:
    /// the waiters share that outcome instead of each trying (and waiting) again in turn.
    #[error("connecting to {peer} failed just now: {reason}")]
    DialFailed {
        /// Peer address.
        peer: SocketAddr,
        /// The failure.
        reason: String,
    },
}

/// The TCP connection under TLS, with reads buffered: rustls asks for 4 KiB at a time, so
/// without a buffer a 16 KiB record costs several `recv` calls.
pub(crate) type Wire = tokio::io::BufReader<tokio::net::TcpStream>;

/// Read buffer of a [`Wire`]: a few TLS records.
const WIRE_BUFFER: usize = 64 << 10;

pub(crate) fn wire(tcp: tokio::net::TcpStream) -> Wire {
    tokio::io::BufReader::with_capacity(WIRE_BUFFER, tcp)
}

/// What a keepalive tick found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// A ping went out (the previous one was answered).
    Pinged,
    /// The last ping was not answered by the next tick, or the connection failed it.
    Gone,
}

/// HTTP/2 keepalive pings, on both sides of a connection: a ping every interval, and a peer
/// that has not answered one by the next is gone (no FIN or RST may ever come from a node
/// that lost power or its network).
pub(crate) struct Keepalive {
    ping: Option<h2::PingPong>,
    awaiting: bool,
    tick: tokio::time::Interval,
}

impl Keepalive {
    /// Pings through `ping` every `interval`, the first an interval from now.
    pub(crate) async fn new(ping: Option<h2::PingPong>, interval: std::time::Duration) -> Self {
        let mut tick = tokio::time::interval(interval.max(std::time::Duration::from_millis(1)));
        // After a stall (a paused VM, a starved runtime) the next ping goes a whole interval
        // later, not at once: ticks in a burst would judge a healthy peer by a ping just sent.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        Self { ping, awaiting: false, tick }
    }

    /// Waits for the next tick (answers arriving meanwhile are taken). Cancel-safe: its state
    /// lives in `self`, so it may be raced against the connection in a `select!`.
    pub(crate) async fn next(&mut self) -> Beat {
        loop {
            let (ping, awaiting) = (&mut self.ping, self.awaiting);
            tokio::select! {
                pong = std::future::poll_fn(|cx| match ping.as_mut() {
                    Some(p) if awaiting => p.poll_pong(cx),
                    _ => std::task::Poll::Pending,
                }) => {
                    self.awaiting = false;
                    if pong.is_err() {
                        return Beat::Gone;
                    }
                }
                _ = self.tick.tick() => {
                    if self.awaiting {
                        return Beat::Gone;
                    }
                    if let Some(p) = self.ping.as_mut() {
                        self.awaiting = p.send_ping(h2::Ping::opaque()).is_ok();
                    }
                    return Beat::Pinged;
                }
            }
        }
    }
}
