//! `sinew-control`: the mesh's authority. It signs workload identities for the node agents
//! that run them (node authorization) and streams configuration to agents and waypoints as
//! deltas, from a directory of Kubernetes-shaped YAML (the embedded default).
//!
//! - [`source`] watches the directory and publishes [`snapshot::Snapshot`]s: the last good
//!   version of every resource, each with a content-hash version.
//! - [`discovery`] serves one gRPC stream per client: only what differs from what the client
//!   holds, then every change, each response ACKed or NACKed by nonce.
//! - [`ca`] signs CSRs for callers authenticated as a node ([`auth`]: their own node
//!   certificate over mTLS, or a bootstrap token), for identities of workloads on the caller's
//!   node only, and the node's own identity.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod ca;
pub mod discovery;
pub mod snapshot;
pub mod source;
pub mod tls;
pub mod tokens;

use std::sync::Arc;

use tokio::{net::TcpListener, sync::watch};

/// Serves both services on `listener` (over TLS when `tls` is given, see [`server_tls`])
/// until the future is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    snapshots: watch::Receiver<Arc<snapshot::Snapshot>>,
    ca: ca::CaService,
    registry: Arc<discovery::Registry>,
) -> Result<(), tonic::transport::Error> {
    let discovery =
        discovery::DiscoveryService::new(snapshots, registry, ca.authenticator(), ca.bundle());
    // Anyone who can reach the port can open connections: bound what each may hold (tonic's
    // default is no stream limit and no keepalive), and find dead peers.
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE))
        // A resuming client's first request lists every version it holds (about 80 bytes
        // each): room for 200,000 resources. It is read only once the caller is authenticated.
        .add_service(
            sinew_api::discovery_server::DiscoveryServer::new(discovery)
                .max_decoding_message_size(MAX_DISCOVERY_REQUEST),
        )
        .add_service(
            sinew_api::ca_server::CaServer::new(ca).max_decoding_message_size(MAX_SIGN_REQUEST),
        );
    match tls {
        Some(tls) => router.serve_with_incoming(tls::incoming(listener, tls)).await,
        None => {
            router
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        }
    }
}

/// The control service's TLS configuration (see [`tls::server_config`]): clients verify the
/// DNS name [`SERVER_NAME`] against the trust bundle; client certificates are optional so
/// that a node can bootstrap with a token, and verified against the bundle when presented.
/// The serving certificate lives [`SERVER_CERT_TTL`] and is re-issued at half life.
pub fn server_tls(ca: Arc<sinew_identity::Ca>) -> Result<Arc<rustls::ServerConfig>, tls::TlsError> {
    tls::server_config(ca, SERVER_CERT_TTL)
}

/// How long a peer has for the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Concurrent gRPC streams per connection: an agent or waypoint needs two or three, but a
/// proxy in front of control multiplexes many clients' long-lived discovery streams on one
/// connection (`cargo xtask bench control` puts 100 on each).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// HTTP/2 pings and TCP keepalive on idle connections, to find peers that went away.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);
/// An unanswered ping closes the connection after this long.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest discovery request.
pub const MAX_DISCOVERY_REQUEST: usize = 16 * 1024 * 1024;
/// Largest signing request (a CSR is well under 1 KiB).
pub const MAX_SIGN_REQUEST: usize = 64 * 1024;

/// The DNS name in the control service's certificate.
pub const SERVER_NAME: &str = "sinew-control";
/// The control service's own certificate lives this long; it is re-issued at half life.
pub const SERVER_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);
