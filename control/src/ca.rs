//! The CA service: bootstrap-token authentication and node authorization in front of
//! [`sinew_identity::Ca`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sinew_api::{SignRequest, SignResponse, ca_server};
use sinew_identity::{Ca, CaError, SpiffeId};
use sinew_model::Resource;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    snapshot::Snapshot,
    tokens::{SharedTokens, Tokens},
};

/// The shortest lifetime a caller may ask for (tests use short ones to exercise renewal).
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// The longest certificate lifetime the CA issues (a year): `--cert-ttl-secs` is checked
/// against it, so lifetimes stay far from the date arithmetic's limits.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Authenticates callers as nodes (shared by the CA and discovery services).
#[derive(Clone, Debug)]
pub struct Authenticator {
    tokens: SharedTokens,
    trust_domain: String,
}

impl Authenticator {
    /// The calling node, and how it proved it.
    pub fn node<T>(&self, request: &Request<T>) -> Result<(String, crate::auth::Proof), Status> {
        crate::auth::caller(request, &self.tokens.current(), &self.trust_domain)
    }

    /// Whether `node`'s proof still holds (listed, token or certificate not replaced since
    /// it authenticated).
    pub fn still_valid(&self, node: &str, proof: &crate::auth::Proof) -> bool {
        proof.holds(node, &self.tokens.current())
    }
}

/// CA counters for metrics.
#[derive(Debug, Default)]
pub struct CaStats {
    /// Certificates signed.
    pub issued: AtomicU64,
    /// Requests refused (authentication, authorization or CSR).
    pub refused: AtomicU64,
}

/// The CA gRPC service.
#[derive(Clone)]
pub struct CaService {
    /// Counters.
    pub stats: Arc<CaStats>,
    ca: Arc<Ca>,
    tokens: SharedTokens,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    default_ttl: Duration,
}

impl CaService {
    /// A service signing with `ca` for callers in `tokens`, authorizing against `snapshots`.
    pub fn new(
        ca: Arc<Ca>,
        tokens: Tokens,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        default_ttl: Duration,
    ) -> Self {
        Self {
            stats: Arc::default(),
            ca,
            tokens: SharedTokens::new(tokens),
            snapshots,
            default_ttl,
        }
    }

    /// Keeps the tokens' times in `path` across restarts (see [`crate::tokens::restore`]).
    pub fn remember_tokens_in(mut self, path: std::path::PathBuf) -> Self {
        self.tokens = self.tokens.remembered_in(path);
        self
    }

    /// The tokens in force, to replace when the file changes.
    pub fn tokens(&self) -> SharedTokens {
        self.tokens.clone()
    }

    /// The roots this CA serves (PEM, the signing root first): published to every client
    /// with each discovery response.
    pub fn bundle(&self) -> Arc<[String]> {
        self.ca.bundle().into()
    }

    /// Authenticates callers for the other services too.
    pub fn authenticator(&self) -> Authenticator {
        Authenticator {
            tokens: self.tokens.clone(),
            trust_domain: self.ca.trust_domain().to_owned(),
        }
    }

    /// Node authorization: the node's own identity, or that of a workload scheduled on `node`.
    /// Sinew's own namespace holds only Sinew's identities (nodes, control): a Workload there
    /// could otherwise obtain control's identity, which mesh-wide policies may name.
    fn authorize(&self, node: &str, id: &SpiffeId) -> Result<(), Status> {
        if let Some(n) = id.node_name() {
            return if n == node {
                Ok(())
            } else {
                Err(Status::permission_denied(format!("node {node} cannot have {id}")))
            };
        }
        if id.namespace == sinew_identity::NODE_NAMESPACE {
            return Err(Status::permission_denied(format!(
                "{id}: namespace {} is reserved for Sinew's own identities",
                sinew_identity::NODE_NAMESPACE
            )));
        }
        let snap = self.snapshots.borrow().clone();
        let allowed = snap.resources.values().any(|e| match e.resource.as_ref() {
            Resource::Workload(w) => {
                w.spec.node == node
                    && w.metadata.namespace.as_deref() == Some(id.namespace.as_str())
                    && w.spec.service_account == id.service_account
            }
            _ => false,
        });
        if allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "node {node} runs no workload with identity {id}"
            )))
        }
    }
}

#[tonic::async_trait]
impl ca_server::Ca for CaService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let peer = request.remote_addr();
        let result = self.sign_inner(request);
        let counter = if result.is_ok() { &self.stats.issued } else { &self.stats.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            // Every refusal with who asked, whatever the reason (authentication too).
            warn!(peer = ?peer, code = ?e.code(), reason = e.message(), "signing request refused");
        }
        result.map(Response::new)
    }
}

impl CaService {
    fn sign_inner(&self, request: Request<SignRequest>) -> Result<SignResponse, Status> {
        let (node, proof) =
            crate::auth::caller(&request, &self.tokens.current(), self.ca.trust_domain())?;
        let req = request.into_inner();
        let id: SpiffeId = req
            .identity
            .parse()
            .map_err(|e: sinew_identity::SpiffeIdError| Status::invalid_argument(e.to_string()))?;
        if id.trust_domain != self.ca.trust_domain() {
            return Err(Status::permission_denied(format!(
                "{id} is outside trust domain {}",
                self.ca.trust_domain()
            )));
        }
        if id.node_name().is_some() && !matches!(proof, crate::auth::Proof::Token(_)) {
            // A node certificate that could sign its own successor would outlive any token
            // change: the node's identity is issued against its token only.
            return Err(Status::permission_denied(format!(
                "node {node}, {id}: a node certificate is issued only against the node's bootstrap token"
            )));
        }
        if let Err(e) = self.authorize(&node, &id) {
            return Err(Status::permission_denied(format!("node {node}, {id}: {}", e.message())));
        }
        let ttl = match req.ttl_seconds {
            0 => self.default_ttl,
            // Never `clamp`, which panics when the bounds cross.
            s => Duration::from_secs(s).min(self.default_ttl).max(MIN_TTL),
        };
        let pem = self.ca.sign(&req.csr_pem, &id, ttl).map_err(|e| match e {
            CaError::Csr(m) => Status::invalid_argument(m),
            other => Status::internal(other.to_string()),
        })?;
        info!(%node, %id, ttl_secs = ttl.as_secs(), "certificate issued");
        Ok(SignResponse { certificate_pem: pem, trust_bundle_pem: self.ca.bundle().to_vec() })
    }
}
