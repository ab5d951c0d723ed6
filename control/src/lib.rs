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
pub mod tokens;

use std::sync::Arc;

use tokio::{net::TcpListener, sync::watch};

/// Serves both services on `listener` (over TLS when `tls` is given) until the future is
/// dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    snapshots: watch::Receiver<Arc<snapshot::Snapshot>>,
    ca: ca::CaService,
    registry: Arc<discovery::Registry>,
) -> Result<(), tonic::transport::Error> {
    let discovery = discovery::DiscoveryService::new(snapshots, registry, ca.authenticator());
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(sinew_api::discovery_server::DiscoveryServer::new(discovery))
        .add_service(sinew_api::ca_server::CaServer::new(ca))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}

/// The control service's TLS identity, issued by its own CA: clients verify the DNS name
/// [`SERVER_NAME`] against the trust bundle; client certificates are optional so that a node
/// can bootstrap with a token, and verified against the bundle when presented.
pub fn server_tls(
    ca: &sinew_identity::Ca,
) -> Result<tonic::transport::ServerTlsConfig, sinew_identity::CaError> {
    let id = sinew_identity::SpiffeId::new(
        ca.trust_domain(),
        sinew_identity::NODE_NAMESPACE,
        "sinew-control",
    )
    .map_err(|e| sinew_identity::CaError::Csr(e.to_string()))?;
    let (key, cert) = ca.issue(&id, &[SERVER_NAME], SERVER_CERT_TTL)?;
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .client_ca_root(tonic::transport::Certificate::from_pem(ca.bundle().concat()))
        .client_auth_optional(true))
}

/// The DNS name in the control service's certificate.
pub const SERVER_NAME: &str = "sinew-control";
/// The control service's own certificate is re-issued at every start; it lives this long.
pub const SERVER_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);
