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

pub use client::{Connect, IDLE_TIMEOUT, PING_INTERVAL, Pool, PoolKey, PoolStats, random_u64};
pub use server::{Inbound, serve_connection, serve_connection_holding, serve_connection_until};
pub use stream::H2Stream;

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
