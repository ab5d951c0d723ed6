//! The discovery stream: deltas against what each client holds, ACK/NACK by nonce, resume.

use std::{
    collections::{BTreeMap, VecDeque},
    ops::Bound,
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

/// A response also ends once its resources' bodies reach this size (Sinew's clients decode
/// messages of up to 16 MiB, tonic's default is 4 MiB, and a resource is at most
/// [`sinew_model::MAX_RESOURCE_BYTES`]).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Most bytes of removed keys in one response: with the resources' own bound a response
/// stays well under a client's 4 MiB message limit, so deleting a hundred thousand
/// workloads goes out over several responses instead of one the client cannot take.
const MAX_REMOVED_BYTES: usize = 1024 * 1024;

/// How many of `removed` fit in one response ([`MAX_REMOVED_BYTES`], at least one).
fn removed_that_fit(removed: &[String]) -> usize {
    let mut bytes = 0;
    removed
        .iter()
        .position(|k| {
            bytes += k.len() + 4;
            bytes > MAX_REMOVED_BYTES
        })
        .map_or(removed.len(), |n| n.max(1))
}

/// Whether a response of `count` resources and `bytes` of bodies is full.
fn full(count: usize, bytes: usize) -> bool {
    count >= MAX_PER_RESPONSE || bytes >= MAX_RESPONSE_BYTES
}

/// Kinds only waypoints need; agents do not receive them.
const WAYPOINT_ONLY: [&str; 3] = ["HTTPRoute/", "GRPCRoute/", "DestinationRule/"];

/// A connected client as the admin endpoint shows it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientState {
    /// Node or waypoint name.
    pub name: String,
    /// `agent` or `waypoint`.
    pub role: String,
    /// The system version the client acknowledged holding completely (0: still syncing).
    pub acked_version: u64,
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
    auth: crate::ca::Authenticator,
    /// The CA's roots, sent with every response (clients renew when they change).
    bundle: Arc<[String]>,
}

impl DiscoveryService {
    /// A service publishing `snapshots` and the CA's `bundle` to callers `auth` accepts.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        registry: Arc<Registry>,
        auth: crate::ca::Authenticator,
        bundle: Arc<[String]>,
    ) -> Self {
        Self { snapshots, registry, auth, bundle }
    }
}

/// How often a stream checks that its node's proof still holds (see `Proof::holds`).
const REVOCATION_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a new stream may take to send its first request (which names the client).
const FIRST_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How much of a NACK's reason is logged and kept.
const MAX_NACK_TEXT: usize = 1024;

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let (node, proof) = self.auth.node(&request).inspect_err(|e| {
            warn!(peer = ?request.remote_addr(), reason = e.message(), "discovery stream refused");
        })?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no first request within 10 s"))??
            .ok_or_else(|| {
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
        if client.role == "agent" && client.name != node {
            return Err(Status::permission_denied(format!(
                "authenticated as node {node}, cannot stream as agent {:?}",
                client.name
            )));
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
        // The session's receiver marks this target seen: a snapshot published between here
        // and the session's first wait is then a change it applies, not one it skips.
        let mut snapshots = self.snapshots.clone();
        let target = snapshots.borrow_and_update().clone();
        let mut session = Session {
            id,
            agent: client.role == "agent",
            target: target.clone(),
            todo: Todo::Everything { after: None },
            removed: Vec::new(),
            outstanding: None,
            parked: Default::default(),
            splits: VecDeque::new(),
            nonce: 0,
            registry: self.registry.clone(),
            bundle: self.bundle.clone(),
        };
        if !first.held_versions.is_empty() {
            // Resume: only what differs from what the client holds.
            let held = first.held_versions;
            let changed = target
                .resources
                .iter()
                .filter(|(k, e)| {
                    held.get(k.as_ref()).is_none_or(|v| v.as_str() != e.version.as_ref())
                })
                .map(|(k, _)| k.clone())
                .collect();
            session.removed =
                held.into_keys().filter(|k| !target.resources.contains_key(k.as_str())).collect();
            session.todo = Todo::Keys(changed);
        }
        let revoked = {
            let auth = self.auth.clone();
            async move {
                // A node taken out of the token file loses the stream it has open too, and so
                // does a stream opened with a token or node certificate replaced since.
                let mut tick = tokio::time::interval(REVOCATION_CHECK);
                loop {
                    tick.tick().await;
                    if !auth.still_valid(&node, &proof) {
                        return node;
                    }
                }
            }
        };
        tokio::spawn(session.run(inbound, tx, snapshots, client.name, revoked));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a client still lacks of `Session::target`.
enum Todo {
    /// A fresh client: everything after this key, in key order.
    Everything { after: Option<Arc<str>> },
    /// These keys (in any order).
    Keys(VecDeque<Arc<str>>),
}

impl Todo {
    fn is_empty(&self) -> bool {
        matches!(self, Todo::Keys(k) if k.is_empty())
    }
}

/// A resource key and one of its versions.
type KeyVersion = (Arc<str>, Arc<str>);

/// A response awaiting its ACK or NACK.
struct Outstanding {
    nonce: String,
    /// The system version it completes the sync to, if it is the last slice.
    completes: Option<u64>,
    keys: Vec<Arc<str>>,
    /// The version of each key sent, in the same order.
    versions: Vec<Arc<str>>,
    removed: Vec<String>,
}

struct Session {
    id: u64,
    agent: bool,
    /// The snapshot being brought to the client; it holds it fully once `todo` is empty and
    /// no response is outstanding.
    target: Arc<Snapshot>,
    todo: Todo,
    /// Keys the client must drop, sent with the next response.
    removed: Vec<String>,
    /// The response awaiting its ACK or NACK.
    outstanding: Option<Outstanding>,
    /// What rejected responses carried (keys with the version rejected, removals): the
    /// client kept its last good state, so a key is sent again once its version changed (the
    /// same one would be rejected again) and removals with the next change, as xDS does.
    parked: (Vec<KeyVersion>, Vec<String>),
    /// Halves of a rejected response, each sent on its own (before other work): the client
    /// takes a response whole or not at all, so one resource it cannot take would otherwise
    /// hold back every other one that rode with it, now and with every later change. A
    /// rejected half is split again; a single rejected resource is parked.
    splits: VecDeque<(Vec<Arc<str>>, Vec<String>)>,
    nonce: u64,
    registry: Arc<Registry>,
    bundle: Arc<[String]>,
}

impl Session {
    /// Moves the target to a newer snapshot, adding what changed to the work left.
    fn retarget(&mut self, newer: Arc<Snapshot>) {
        if newer.system_version == self.target.system_version {
            return;
        }
        let (mut changed, removed) = if newer.prev_version == self.target.system_version {
            (newer.changed.clone(), newer.removed.clone())
        } else {
            self.target.diff(&newer)
        };
        // What the client rejected is tried again: all of it was sent before the cursor, so
        // it goes as explicit keys either way.
        let (parked_keys, parked_removed) = std::mem::take(&mut self.parked);
        for (key, rejected) in parked_keys {
            match newer.resources.get(&key) {
                Some(e) if e.version == rejected => self.parked.0.push((key, rejected)),
                _ => changed.push(key),
            }
        }
        self.removed.extend(parked_removed);
        // A removal pending from before must not delete what exists again (the client adds
        // a response's resources, then drops its removals).
        self.removed.retain(|k| !newer.resources.contains_key(k.as_str()));
        for (_, removed) in &mut self.splits {
            removed.retain(|k| !newer.resources.contains_key(k.as_str()));
        }
        match &mut self.todo {
            // Keys after the cursor are read from the new target anyway.
            Todo::Everything { after } => {
                let done: VecDeque<Arc<str>> = match after {
                    Some(a) => changed.into_iter().filter(|k| k <= a).collect(),
                    None => VecDeque::new(),
                };
                if !done.is_empty() {
                    // Rare: a change during a first sync. Finish the rest as explicit keys.
                    let mut keys = done;
                    let start = after.clone();
                    keys.extend(
                        newer
                            .resources
                            .keys()
                            .filter(|k| start.as_ref().is_none_or(|a| *k > a))
                            .cloned(),
                    );
                    self.todo = Todo::Keys(keys);
                }
            }
            Todo::Keys(keys) => {
                keys.extend(changed);
                // Once each: a key changed twice before it was sent, or parked and changed.
                let unique: std::collections::BTreeSet<Arc<str>> = keys.drain(..).collect();
                keys.extend(unique);
            }
        }
        self.removed.extend(removed.iter().map(|k| k.to_string()));
        self.target = newer;
    }

    /// The next slice of what the client lacks, if anything.
    fn next_response(&mut self) -> Option<DiscoveryResponse> {
        let mut resources = Vec::new();
        let target = self.target.clone();
        let agent = self.agent;
        if let Some((keys, removed)) = self.splits.pop_front() {
            let mut gone = Vec::new();
            for k in keys {
                match target.resources.get(&k) {
                    Some(e) if wanted(agent, &k) => resources.push(resource(&k, e)),
                    Some(_) => {}
                    None => gone.push(k.to_string()),
                }
            }
            let removed: Vec<String> = removed.into_iter().chain(gone).collect();
            return self.respond(target, resources, removed);
        }
        match &mut self.todo {
            Todo::Everything { after } => {
                let range = match after.clone() {
                    Some(a) => target
                        .resources
                        .range::<Arc<str>, _>((Bound::Excluded(a), Bound::Unbounded)),
                    None => target.resources.range::<Arc<str>, _>(..),
                };
                let mut last = None;
                let mut bytes = 0;
                for (k, e) in range {
                    last = Some(k.clone());
                    if wanted(agent, k) {
                        bytes += e.body.len();
                        resources.push(resource(k, e));
                    }
                    if full(resources.len(), bytes) {
                        break;
                    }
                }
                let more = last.as_ref().is_some_and(|l| {
                    full(resources.len(), bytes)
                        && target
                            .resources
                            .range::<Arc<str>, _>((Bound::Excluded(l.clone()), Bound::Unbounded))
                            .any(|(k, _)| wanted(agent, k))
                });
                if more {
                    *after = last;
                } else {
                    self.todo = Todo::Keys(VecDeque::new());
                }
            }
            Todo::Keys(keys) => {
                let mut bytes = 0;
                while !full(resources.len(), bytes) {
                    let Some(k) = keys.pop_front() else { break };
                    match target.resources.get(&k) {
                        Some(e) if wanted(agent, &k) => {
                            bytes += e.body.len();
                            resources.push(resource(&k, e));
                        }
                        Some(_) => {}
                        None => self.removed.push(k.to_string()),
                    }
                }
            }
        }
        let removed: Vec<String> = self.removed.drain(..removed_that_fit(&self.removed)).collect();
        self.respond(target, resources, removed)
    }

    /// Sends `resources` and `removed` as the next response, awaiting its ACK; `None` when
    /// there is nothing to send (but the first response goes even when empty: it tells the
    /// client its sync is complete).
    fn respond(
        &mut self,
        target: Arc<Snapshot>,
        resources: Vec<sinew_api::Resource>,
        removed: Vec<String>,
    ) -> Option<DiscoveryResponse> {
        if resources.is_empty() && removed.is_empty() && self.nonce > 0 {
            return None;
        }
        self.nonce += 1;
        let nonce = format!("{}-{}", self.id, self.nonce);
        // A sync with a rejected slice is not complete until that slice is taken.
        let completes = (self.todo.is_empty()
            && self.removed.is_empty()
            && self.splits.is_empty()
            && self.parked.0.is_empty()
            && self.parked.1.is_empty())
        .then_some(target.system_version);
        self.outstanding = Some(Outstanding {
            nonce: nonce.clone(),
            completes,
            keys: resources.iter().map(|r| Arc::from(r.key.as_str())).collect(),
            versions: resources.iter().map(|r| Arc::from(r.version.as_str())).collect(),
            removed: removed.clone(),
        });
        self.registry.responses_sent.fetch_add(1, Ordering::Relaxed);
        self.registry.resources_sent.fetch_add(resources.len() as u64, Ordering::Relaxed);
        Some(DiscoveryResponse {
            system_version: target.system_version,
            nonce,
            resources,
            removed,
            complete: Some(completes.is_some()),
            trust_bundle: self.bundle.to_vec(),
        })
    }

    fn on_request(&mut self, req: DiscoveryRequest, client: &str) {
        let Some(Outstanding { nonce, completes, keys, versions, removed }) =
            self.outstanding.take_if(|o| o.nonce == req.response_nonce)
        else {
            debug!(%client, nonce = %req.response_nonce, "request for an unknown nonce");
            return;
        };
        if req.error.is_empty() {
            self.registry.acks.fetch_add(1, Ordering::Relaxed);
            self.registry.update(self.id, |c| {
                c.acks += 1;
                if let Some(v) = completes {
                    c.acked_version = v;
                }
            });
        } else {
            // Bounded: a client's reason is logged and kept for /clients, not its whole text.
            let error: String = req.error.chars().take(MAX_NACK_TEXT).collect();
            warn!(%client, %nonce, %error, keys = keys.len(), "client rejected a configuration update (NACK); it keeps its last good state; the rest is sent in halves, and what it still rejects again with the next change");
            if keys.len() > 1 {
                let mut keys = keys;
                let second = keys.split_off(keys.len() / 2);
                self.splits.push_front((second, Vec::new()));
                self.splits.push_front((keys, removed));
            } else {
                self.parked.0.extend(keys.into_iter().zip(versions));
                self.parked.1.extend(removed);
            }
            self.registry.nacks.fetch_add(1, Ordering::Relaxed);
            self.registry.update(self.id, |c| {
                c.nacks += 1;
                c.last_nack = Some(error);
            });
        }
    }

    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        client: String,
        revoked: impl std::future::Future<Output = String>,
    ) {
        let mut revoked = std::pin::pin!(revoked);
        loop {
            if self.outstanding.is_none()
                && let Some(resp) = self.next_response()
                && tx.send(Ok(resp)).await.is_err()
            {
                break;
            }
            tokio::select! {
                changed = snapshots.changed() => match changed {
                    Ok(()) => {
                        let newer = snapshots.borrow_and_update().clone();
                        self.retarget(newer);
                    }
                    Err(_) => break,
                },
                node = &mut revoked => {
                    warn!(%client, %node, "node revoked: ending its discovery stream");
                    let status = Status::permission_denied(format!("node {node} is revoked"));
                    let _ = tx.send(Err(status)).await;
                    break;
                }
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

/// Agents do not receive the kinds only waypoints use.
fn wanted(agent: bool, key: &str) -> bool {
    !(agent && WAYPOINT_ONLY.iter().any(|p| key.starts_with(p)))
}

fn resource(key: &Arc<str>, e: &crate::snapshot::Entry) -> sinew_api::Resource {
    sinew_api::Resource {
        key: key.to_string(),
        version: e.version.to_string(),
        body: e.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_go_out_in_responses_of_bounded_size() {
        let keys: Vec<String> = (0..150_000).map(|i| format!("Workload/shop/pod-{i:06}")).collect();
        let first = removed_that_fit(&keys);
        let bytes: usize = keys[..first].iter().map(|k| k.len() + 4).sum();
        assert!(first < keys.len() && bytes <= MAX_REMOVED_BYTES, "{first} keys, {bytes} bytes");
        assert_eq!(removed_that_fit(&keys[..10]), 10);
        assert_eq!(removed_that_fit(&[]), 0);
        // One key longer than the budget still goes, alone.
        assert_eq!(removed_that_fit(&["x".repeat(MAX_REMOVED_BYTES * 2), "y".into()]), 1);
    }
}
