//! Where the agent's view of the mesh comes from: the control service (certificates and
//! configuration, cached on disk so the agent serves while control is away) or, in
//! capture-only mode, a directory of YAML read directly.
//!
//! Either way the result is a [`MeshIndex`] published on a watch channel: built once per
//! change, read on every connection.

use std::{path::PathBuf, sync::Arc, time::Duration};

use sinew_control_client::{ClientConfig, start_config};
use sinew_mesh::{MeshIndex, warn_once};
use sinew_model::{Resource, Store};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

/// How often the directory source re-reads its files.
pub const DIR_POLL: Duration = Duration::from_secs(2);

/// The mesh view in force, and a way to wait for the next one.
pub type MeshView = watch::Receiver<Arc<MeshIndex>>;

/// Reads `dir` now and every [`DIR_POLL`]; a rejected file or resource is logged once and its
/// last good version stays in force.
pub fn from_dir(dir: PathBuf) -> (MeshView, JoinHandle<()>) {
    let mut store = Store::new();
    let (mut reported, mut unbound) = (Vec::new(), Vec::new());
    let mut last = reload(&mut store, &dir, &mut reported);
    let first = MeshIndex::build(last.iter());
    // Without control there is no waypoint: every attached policy is enforced nowhere.
    warn_once(first.unbound_policies(false), &mut unbound);
    let (tx, rx) = watch::channel(Arc::new(first));
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(DIR_POLL).await;
            let now = reload(&mut store, &dir, &mut reported);
            if now != last {
                let mesh = MeshIndex::build(now.iter());
                warn_once(mesh.unbound_policies(false), &mut unbound);
                tx.send_replace(Arc::new(mesh));
                last = now;
            }
        }
    });
    (rx, task)
}

fn reload(store: &mut Store, dir: &std::path::Path, reported: &mut Vec<String>) -> Vec<Resource> {
    let errors: Vec<String> = store.reload_dir(dir).iter().map(ToString::to_string).collect();
    for e in errors.iter().filter(|e| !reported.contains(e)) {
        warn!(error = %e, "configuration rejected; its last good version (if any) stays in force");
    }
    *reported = errors;
    store.resources().into_values().cloned().collect()
}

/// Streams configuration from the control service (see `sinew-control-client`): the disk
/// cache is published at once, then every accepted update.
/// Also returns whether the view is configuration yet (becomes true): a whole cache was
/// loaded, or control completed a sync; false while an agent without a cache has heard
/// nothing, or only part of a sync. And the trust bundle control publishes.
pub fn from_control(
    cfg: ClientConfig,
) -> (MeshView, JoinHandle<()>, watch::Receiver<bool>, sinew_control_client::BundleUpdates) {
    let (mut views, client) = start_config(cfg);
    let bundle = sinew_control_client::bundle_updates(views.clone(), |v| v.trust_bundle.clone());
    let first = views.borrow_and_update().clone();
    // Whole: a response completed a sync, or a (whole) cache was loaded. A first slice
    // alone would miss namespaces, and open their pods.
    let is_known =
        |v: &sinew_control_client::ConfigView| v.synced && (v.acks > 0 || !v.resources.is_empty());
    let (known_tx, known) = watch::channel(is_known(&first));
    let build = |v: &sinew_control_client::ConfigView| {
        Arc::new(MeshIndex::build(v.resources.values().map(|h| &*h.resource)))
    };
    if first.from_cache && !first.resources.is_empty() {
        info!(
            resources = first.resources.len(),
            "serving the cached configuration until control answers"
        );
    }
    let (tx, rx) = watch::channel(build(&first));
    let task = tokio::spawn(async move {
        let _client = AbortOnDrop(client);
        while views.changed().await.is_ok() {
            let view = views.borrow_and_update().clone();
            tx.send_replace(build(&view));
            if is_known(&view) {
                known_tx.send_if_modified(|k| !std::mem::replace(k, true));
            }
        }
    });
    (rx, task, known, bundle)
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
