//! The discovery client.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};
use sinew_api::{
    ClientInfo, DiscoveryRequest, DiscoveryResponse, discovery_client::DiscoveryClient,
};
use sinew_model::Resource;
use tokio::{sync::mpsc, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{Backoff, ClientError, write_private};

/// Who the client is and where it keeps its cache.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` of the control service.
    pub endpoint: String,
    /// Node or waypoint name.
    pub name: String,
    /// `agent` or `waypoint`.
    pub role: String,
    /// Cache directory (`config.json` inside).
    pub cache_dir: PathBuf,
    /// Token and TLS.
    pub credentials: crate::Credentials,
}

/// One resource as held.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its version.
    pub version: String,
    /// Its JSON body, as received.
    pub body: String,
    /// The validated resource.
    pub resource: Arc<Resource>,
}

/// The configuration in force on this client.
#[derive(Debug, Clone, Default)]
pub struct ConfigView {
    /// The control service's version of the last applied response (0: from cache or none).
    pub system_version: u64,
    /// Resources by key.
    pub resources: BTreeMap<String, Held>,
    /// Loaded from the disk cache and not yet confirmed by the control service.
    pub from_cache: bool,
    /// A stream is up.
    pub connected: bool,
    /// Responses applied and acknowledged on this client since start.
    pub acks: u64,
    /// Responses rejected since start.
    pub nacks: u64,
    /// The configuration is whole: a response completed a sync (servers that do not say so
    /// complete one with every response), or the cache, written only when whole, was loaded.
    /// Once true it stays true (a later change arriving in slices is still the last whole
    /// configuration plus part of the next).
    pub synced: bool,
    /// The roots the control service's CA serves, as its last response carried them.
    pub trust_bundle: Option<Arc<[String]>>,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    version: String,
    body: String,
}

fn cache_file(cfg: &ClientConfig) -> PathBuf {
    cfg.cache_dir.join("config.json")
}

fn load_cache(cfg: &ClientConfig) -> ConfigView {
    let path = cache_file(cfg);
    let Ok(bytes) = std::fs::read(&path) else { return ConfigView::default() };
    let entries: Vec<CacheEntry> = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring an unreadable configuration cache");
            return ConfigView::default();
        }
    };
    // Written only when whole (see `synced`).
    let mut view = ConfigView { from_cache: true, synced: true, ..Default::default() };
    for e in entries {
        match Resource::from_json(&path.display().to_string(), e.body.as_bytes()) {
            Ok(r) => {
                view.resources.insert(
                    e.key,
                    Held { version: e.version, body: e.body, resource: Arc::new(r) },
                );
            }
            Err(errors) => {
                warn!(key = %e.key, error = %errors[0], "dropping an invalid cached resource")
            }
        }
    }
    view
}

fn save_cache(cfg: &ClientConfig, view: &ConfigView) -> Result<(), ClientError> {
    let entries: Vec<CacheEntry> = view
        .resources
        .iter()
        .map(|(k, h)| CacheEntry {
            key: k.clone(),
            version: h.version.clone(),
            body: h.body.clone(),
        })
        .collect();
    write_private(&cache_file(cfg), &serde_json::to_vec(&entries).expect("cache entries serialize"))
}

/// Applies a response to `current`, validating every resource first: all or nothing.
fn apply(current: &ConfigView, resp: &DiscoveryResponse) -> Result<ConfigView, String> {
    let mut next = current.clone();
    let mut problems = Vec::new();
    for r in &resp.resources {
        let body = match String::from_utf8(r.body.to_vec()) {
            Ok(b) => b,
            Err(_) => {
                problems.push(format!("{}: body is not UTF-8", r.key));
                continue;
            }
        };
        match Resource::from_json("control", body.as_bytes()) {
            Ok(res) if res.key().to_string() == r.key => {
                next.resources.insert(
                    r.key.clone(),
                    Held { version: r.version.clone(), body, resource: Arc::new(res) },
                );
            }
            Ok(res) => problems.push(format!("{}: body is {}", r.key, res.key())),
            Err(errors) => problems.extend(errors.iter().map(|e| format!("{}: {e}", r.key))),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    for k in &resp.removed {
        next.resources.remove(k);
    }
    next.system_version = resp.system_version;
    next.from_cache = false;
    next.connected = true;
    next.acks += 1;
    next.synced |= resp.complete.unwrap_or(true);
    if !resp.trust_bundle.is_empty() {
        next.trust_bundle = Some(resp.trust_bundle.clone().into());
    }
    Ok(next)
}

/// Starts the discovery client: the cache is published at once, then the stream's updates.
pub fn start_config(cfg: ClientConfig) -> (watch::Receiver<Arc<ConfigView>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(load_cache(&cfg)));
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            if let Err(e) = session(&cfg, &tx, &mut backoff).await {
                warn!(endpoint = %cfg.endpoint, error = %e, "configuration stream down; serving the last good configuration");
            }
            tx.send_modify(|v| Arc::make_mut(v).connected = false);
            tokio::time::sleep(backoff.next()).await;
        }
    });
    (rx, task)
}

async fn session(
    cfg: &ClientConfig,
    tx: &watch::Sender<Arc<ConfigView>>,
    backoff: &mut Backoff,
) -> Result<(), ClientError> {
    let channel = crate::connect(&cfg.endpoint, &cfg.credentials).await?;
    // Control bounds its responses well under this (tonic's default is 4 MiB).
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(16 << 20);
    let (req_tx, req_rx) = mpsc::channel(4);
    let held = tx.borrow().resources.iter().map(|(k, h)| (k.clone(), h.version.clone())).collect();
    let first = DiscoveryRequest {
        client: Some(ClientInfo { name: cfg.name.clone(), role: cfg.role.clone() }),
        held_versions: held,
        ..Default::default()
    };
    req_tx.send(first).await.expect("receiver alive");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(req_rx));
    crate::authorize(&mut request, &cfg.credentials)?;
    let mut stream = client.stream(request).await?.into_inner();
    backoff.reset();
    tx.send_modify(|v| Arc::make_mut(v).connected = true);
    info!(endpoint = %cfg.endpoint, "configuration stream up");
    while let Some(resp) = stream.message().await? {
        let current = tx.borrow().clone();
        let reply = match apply(&current, &resp) {
            Ok(next) => {
                // Only a whole configuration is cached: a restart resumes from the last one.
                if resp.complete.unwrap_or(true)
                    && let Err(e) = save_cache(cfg, &next)
                {
                    warn!(error = %e, "cannot cache the configuration");
                }
                tx.send_replace(Arc::new(next));
                DiscoveryRequest { response_nonce: resp.nonce, ..Default::default() }
            }
            Err(error) => {
                warn!(%error, "rejecting a configuration update (NACK); keeping the last good");
                tx.send_modify(|v| Arc::make_mut(v).nacks += 1);
                DiscoveryRequest { response_nonce: resp.nonce, error, ..Default::default() }
            }
        };
        if req_tx.send(reply).await.is_err() {
            break;
        }
    }
    Ok(())
}
