//! One request to one endpoint: an HBONE stream to the endpoint's agent (pooled TLS), then
//! HTTP/1.1 or HTTP/2 on it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sinew_hbone::{Connect, HBONE_PORT, PoolKey};
use sinew_mesh::WorkloadInfo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::state::Waypoint;

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
}

/// Sends `req` to `endpoint` on `port` (HTTP/2 when `http2`, else HTTP/1.1) over HBONE, as
/// the waypoint, telling the destination the original `client`.
pub async fn send(
    wp: &Waypoint,
    endpoint: &WorkloadInfo,
    port: u16,
    client: SocketAddr,
    req: Request<Full<Bytes>>,
    http2: bool,
) -> Result<Response<Incoming>, UpstreamError> {
    let connect_err = |reason: String| UpstreamError::Connect { endpoint: endpoint.key(), reason };
    let ip = endpoint
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == client.is_ipv4())
        .or(endpoint.ips.first())
        .copied()
        .ok_or_else(|| connect_err("no address".into()))?;
    let identity = wp.identity().ok_or_else(|| connect_err("no certificate yet".into()))?;
    let expected = endpoint.identity(&wp.trust_domain).map_err(|e| connect_err(e.to_string()))?;
    let key = PoolKey {
        source: wp.id.clone(),
        source_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        destination: SocketAddr::new(ip, HBONE_PORT),
        expected,
    };
    let authority = SocketAddr::new(ip, port);
    let stream = wp
        .pool
        .connect(&key, &identity, Connect { authority, client, baggage: None }, TcpStream::connect)
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let io = TokioIo::new(stream);
    let reset =
        |e: hyper::Error| UpstreamError::Reset { endpoint: endpoint.key(), reason: e.to_string() };
    if http2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        sender.send_request(req).await.map_err(reset)
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        sender.send_request(req).await.map_err(reset)
    }
}
