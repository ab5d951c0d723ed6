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

use crate::{snapshot::Snapshot, tokens::Tokens};

/// The shortest lifetime a caller may ask for (tests use short ones to exercise renewal).
const MIN_TTL: Duration = Duration::from_secs(2);

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
    tokens: Arc<Tokens>,
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
        Self { stats: Arc::default(), ca, tokens: Arc::new(tokens), snapshots, default_ttl }
    }

    fn caller_node<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let header = request.metadata().get(sinew_api::AUTHORIZATION).ok_or_else(|| {
            Status::unauthenticated("no bootstrap token (authorization: Bearer <token>)")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        self.tokens
            .node(token)
            .map(str::to_owned)
            .ok_or_else(|| Status::unauthenticated("unknown bootstrap token"))
    }

    /// Node authorization: some workload with this identity is scheduled on `node`.
    fn authorize(&self, node: &str, id: &SpiffeId) -> Result<(), Status> {
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
        let result = self.sign_inner(request);
        let counter = if result.is_ok() { &self.stats.issued } else { &self.stats.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        result.map(Response::new)
    }
}

impl CaService {
    fn sign_inner(&self, request: Request<SignRequest>) -> Result<SignResponse, Status> {
        let node = self.caller_node(&request)?;
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
        if let Err(e) = self.authorize(&node, &id) {
            warn!(%node, %id, "certificate refused: not scheduled on the caller's node");
            return Err(e);
        }
        let ttl = match req.ttl_seconds {
            0 => self.default_ttl,
            s => Duration::from_secs(s).clamp(MIN_TTL, self.default_ttl),
        };
        let pem = self.ca.sign(&req.csr_pem, &id, ttl).map_err(|e| match e {
            CaError::Csr(m) => Status::invalid_argument(m),
            other => Status::internal(other.to_string()),
        })?;
        info!(%node, %id, ttl_secs = ttl.as_secs(), "certificate issued");
        Ok(SignResponse { certificate_pem: pem, trust_bundle_pem: self.ca.bundle().to_vec() })
    }
}
