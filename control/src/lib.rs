//! `sinew-control`: the mesh's authority. It signs workload identities for the node agents
//! that run them (node authorization) and streams configuration to agents and waypoints as
//! deltas, from a directory of Kubernetes-shaped YAML (the embedded default).
//!
//! - [`source`] watches the directory and publishes [`snapshot::Snapshot`]s: the last good
//!   version of every resource, each with a content-hash version.
//! - [`discovery`] serves one gRPC stream per client: only what differs from what the client
//!   holds, then every change, each response ACKed or NACKed by nonce.
//! - [`ca`] signs CSRs for callers authenticated by a bootstrap token, for identities of
//!   workloads on the caller's node only.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ca;
pub mod discovery;
pub mod snapshot;
pub mod source;
pub mod tokens;

use std::sync::Arc;

use tokio::{net::TcpListener, sync::watch};

/// Serves both services on `listener` until the future is dropped.
pub async fn serve(
    listener: TcpListener,
    snapshots: watch::Receiver<Arc<snapshot::Snapshot>>,
    ca: ca::CaService,
    registry: Arc<discovery::Registry>,
) -> Result<(), tonic::transport::Error> {
    let discovery = discovery::DiscoveryService::new(snapshots, registry);
    tonic::transport::Server::builder()
        .add_service(sinew_api::discovery_server::DiscoveryServer::new(discovery))
        .add_service(sinew_api::ca_server::CaServer::new(ca))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}
