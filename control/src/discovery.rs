//! The discovery stream: deltas against what each client holds, ACK/NACK by nonce, resume.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;
use sinew_api::{DiscoveryRequest, DiscoveryResponse, discovery_server::Discovery};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::snapshot::Snapshot;

/// The most resources one response carries: a first sync of 10,000 workloads goes out in
/// slices, each after the previous one was acknowledged, so a thousand clients syncing at once
/// hold a bounded amount of memory in the server.
const MAX_PER_RESPONSE: usize = 500;

/// Kinds only waypoints need; agents do not receive them.
const WAYPOINT_ONLY: [&str; 2] = ["HTTPRoute/", "GRPCRoute/"];

/// A connected client as the admin endpoint shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientState {
    /// Node or waypoint name.
    pub name: String,
    /// `agent` or `waypoint`.
    pub role: String,
    /// Resource key -> version the client acknowledged.
    pub acked: BTreeMap<String, String>,
    /// Responses acknowledged.
    pub acks: u64,
    /// Responses rejected.
    pub nacks: u64,
    /// The last rejection's reason.
    pub last_nack: Option<String>,
}

/// Connected clients and counters, shared with the admin endpoint and tests.
#[derive(Debug, Default)]
pub struct Registry {
    clients: Mutex<BTreeMap<u64, ClientState>>,
    next_id: AtomicU64,
    /// Responses sent since start.
    pub responses_sent: AtomicU64,
    /// Resources sent since start (a resumed client that holds everything costs zero).
    pub resources_sent: AtomicU64,
    /// ACKs received since start.
    pub acks: AtomicU64,
    /// NACKs received since start.
    pub nacks: AtomicU64,
}

impl Registry {
    /// A copy of every connected client's state.
    pub fn clients(&self) -> Vec<ClientState> {
        self.clients.lock().expect("registry lock poisoned").values().cloned().collect()
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ClientState)) {
        if let Some(c) = self.clients.lock().expect("registry lock poisoned").get_mut(&id) {
            f(c);
        }
    }
}

/// The Discovery gRPC service.
pub struct DiscoveryService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<Registry>,
}

impl DiscoveryService {
    /// A service publishing `snapshots`.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, registry: Arc<Registry>) -> Self {
        Self { snapshots, registry }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream closed before the first request")
        })?;
        let client = first
            .client
            .ok_or_else(|| Status::invalid_argument("the first request must carry `client`"))?;
        if !matches!(client.role.as_str(), "agent" | "waypoint") {
            return Err(Status::invalid_argument(format!(
                "client.role {:?}: must be agent or waypoint",
                client.role
            )));
        }
        if client.name.is_empty() {
            return Err(Status::invalid_argument("client.name is empty"));
        }
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        self.registry.clients.lock().expect("registry lock poisoned").insert(
            id,
            ClientState {
                name: client.name.clone(),
                role: client.role.clone(),
                ..Default::default()
            },
        );
        info!(client = %client.name, role = %client.role, held = first.held_versions.len(), "client connected");
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            id,
            agent: client.role == "agent",
            held: first.held_versions.into_iter().collect(),
            pending: BTreeMap::new(),
            outstanding: None,
            nonce: 0,
            registry: self.registry.clone(),
        };
        tokio::spawn(session.run(inbound, tx, self.snapshots.clone(), client.name));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    id: u64,
    agent: bool,
    /// What the client holds (or is being sent): key -> version.
    held: BTreeMap<String, String>,
    /// Nonce -> the versions that response carried.
    pending: BTreeMap<String, Vec<(String, Option<String>)>>,
    /// The response awaiting its ACK or NACK; none is sent while one is outstanding.
    outstanding: Option<String>,
    nonce: u64,
    registry: Arc<Registry>,
}

impl Session {
    fn wanted(&self, key: &str) -> bool {
        !(self.agent && WAYPOINT_ONLY.iter().any(|p| key.starts_with(p)))
    }

    /// The response that brings the client from what it holds to `snap`, if anything differs.
    fn delta(&mut self, snap: &Snapshot) -> Option<DiscoveryResponse> {
        let mut resources = Vec::new();
        let mut changes = Vec::new();
        for (key, e) in snap.resources.iter().filter(|(k, _)| self.wanted(k)) {
            if resources.len() == MAX_PER_RESPONSE {
                break;
            }
            if self.held.get(key) != Some(&e.version) {
                resources.push(sinew_api::Resource {
                    key: key.clone(),
                    version: e.version.clone(),
                    body: e.body.clone(),
                });
                changes.push((key.clone(), Some(e.version.clone())));
            }
        }
        let removed: Vec<String> = self
            .held
            .keys()
            .filter(|k| !snap.resources.contains_key(*k) || !self.wanted(k))
            .cloned()
            .collect();
        changes.extend(removed.iter().map(|k| (k.clone(), None)));
        if changes.is_empty() {
            return None;
        }
        for (k, v) in &changes {
            match v {
                Some(v) => self.held.insert(k.clone(), v.clone()),
                None => self.held.remove(k),
            };
        }
        self.nonce += 1;
        let nonce = format!("{}-{}", self.id, self.nonce);
        self.pending.insert(nonce.clone(), changes);
        self.outstanding = Some(nonce.clone());
        self.registry.responses_sent.fetch_add(1, Ordering::Relaxed);
        self.registry.resources_sent.fetch_add(resources.len() as u64, Ordering::Relaxed);
        Some(DiscoveryResponse { system_version: snap.system_version, nonce, resources, removed })
    }

    fn on_request(&mut self, req: DiscoveryRequest, client: &str) {
        if self.outstanding.as_deref() == Some(req.response_nonce.as_str()) {
            self.outstanding = None;
        }
        let Some(changes) = self.pending.remove(&req.response_nonce) else {
            debug!(%client, nonce = %req.response_nonce, "request for an unknown nonce");
            return;
        };
        if req.error.is_empty() {
            self.registry.acks.fetch_add(1, Ordering::Relaxed);
            self.registry.update(self.id, |c| {
                c.acks += 1;
                for (k, v) in changes {
                    match v {
                        Some(v) => c.acked.insert(k, v),
                        None => c.acked.remove(&k),
                    };
                }
            });
        } else {
            warn!(%client, error = %req.error, "client rejected a configuration update (NACK)");
            self.registry.nacks.fetch_add(1, Ordering::Relaxed);
            self.registry.update(self.id, |c| {
                c.nacks += 1;
                c.last_nack = Some(req.error.clone());
            });
        }
    }

    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        client: String,
    ) {
        loop {
            let snap = snapshots.borrow_and_update().clone();
            if self.outstanding.is_none()
                && let Some(resp) = self.delta(&snap)
                && tx.send(Ok(resp)).await.is_err()
            {
                break;
            }
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { break },
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req, &client),
                    Ok(None) => break,
                    Err(e) => {
                        debug!(%client, error = %e, "stream error");
                        break;
                    }
                },
            }
        }
        self.registry.clients.lock().expect("registry lock poisoned").remove(&self.id);
        info!(%client, "client disconnected");
    }
}
