//! The file source: a directory of YAML, re-read when anything in it changes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use sinew_mesh::{MeshIndex, warn_once};
use sinew_model::{ConfigError, Resource, Store};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::snapshot::Snapshot;

/// How often the directory is checked for changes.
pub const POLL: Duration = Duration::from_millis(250);

/// The directory, its store of last good resources, and the errors of the last reload.
pub struct FileSource {
    dir: PathBuf,
    store: Store,
    fingerprint: Vec<(PathBuf, SystemTime, u64)>,
    errors: Arc<Mutex<Vec<ConfigError>>>,
    /// Where the last good resources are kept across restarts (`--state-file`).
    state: Option<PathBuf>,
    /// What the configuration does not do although accepted (policies enforced nowhere,
    /// DestinationRules left out), as last warned about (each is warned about once).
    unbound: Vec<String>,
}

/// The last good configuration as saved: per file, its resources as JSON.
#[derive(serde::Deserialize)]
struct Saved {
    files: Vec<SavedFile>,
}

#[derive(serde::Deserialize)]
struct SavedFile {
    path: PathBuf,
    resources: Vec<serde_json::Value>,
}

/// Reads the saved last good configuration; anything unusable is named and left out (the
/// directory, read next, is the source of truth).
fn load_saved(state: &Path) -> Store {
    let text = match std::fs::read(state) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Store::new(),
        Err(e) => {
            warn!(file = %state.display(), error = %e, "cannot read the saved configuration; starting from the directory alone");
            return Store::new();
        }
    };
    let saved: Saved = match serde_json::from_slice(&text) {
        Ok(s) => s,
        Err(e) => {
            warn!(file = %state.display(), error = %e, "the saved configuration is not valid; starting from the directory alone");
            return Store::new();
        }
    };
    let source = state.display().to_string();
    let files = saved
        .files
        .into_iter()
        .map(|f| {
            let resources = f
                .resources
                .iter()
                .filter_map(|v| {
                    let body = serde_json::to_vec(v).ok()?;
                    Resource::from_json(&source, &body)
                        .inspect_err(|errs| {
                            for e in errs {
                                warn!(error = %e, "saved resource left out");
                            }
                        })
                        .ok()
                })
                .collect();
            (f.path, resources)
        })
        .collect();
    Store::restore(files)
}

/// Writes `store`'s last good configuration to `state` (a temporary file, synced, then
/// renamed, so a crash leaves the old or the new one whole). Streamed: each resource's JSON
/// goes straight to the file, with no document tree of the whole configuration in memory.
fn save(store: &Store, state: &Path) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = state.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = state.with_extension("tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut out = std::io::BufWriter::new(file);
    out.write_all(b"{\"files\":[")?;
    for (i, (path, resources)) in store.last_good().into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        out.write_all(b"{\"path\":")?;
        serde_json::to_writer(&mut out, path).map_err(std::io::Error::other)?;
        out.write_all(b",\"resources\":[")?;
        for (j, r) in resources.into_iter().enumerate() {
            if j > 0 {
                out.write_all(b",")?;
            }
            out.write_all(&r.to_json())?;
        }
        out.write_all(b"]}")?;
    }
    out.write_all(b"]}")?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, state)
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.modified().ok()?, m.len()))
        })
        .collect();
    out.sort();
    out
}

impl FileSource {
    /// Reads `dir` once and returns the source and its first snapshot. With `state`, the
    /// last good configuration saved there before a restart is where the reload starts from
    /// (a file that is broken now keeps what it last held), and every change is saved there.
    pub fn new(dir: &Path, state: Option<&Path>) -> (Self, Snapshot) {
        let store = state.map(load_saved).unwrap_or_default();
        let mut s = Self {
            dir: dir.to_path_buf(),
            store,
            fingerprint: vec![],
            errors: Arc::default(),
            state: state.map(Path::to_path_buf),
            unbound: Vec::new(),
        };
        s.reload();
        s.save();
        let snap = Snapshot::from_store(&s.store, 1, None);
        (s, snap)
    }

    fn save(&self) {
        if let Some(state) = &self.state
            && let Err(e) = save(&self.store, state)
        {
            warn!(file = %state.display(), error = %e, "cannot save the last good configuration");
        }
    }

    /// The rejections of the last reload (shared with the admin endpoint).
    pub fn errors(&self) -> Arc<Mutex<Vec<ConfigError>>> {
        self.errors.clone()
    }

    fn reload(&mut self) {
        self.fingerprint = fingerprint(&self.dir);
        let errors = self.store.reload_dir(&self.dir);
        for e in &errors {
            warn!(error = %e, "resource rejected; its last good version stays in service");
        }
        *self.errors.lock().expect("errors lock poisoned") = errors;
        let resources = self.store.resources();
        let mut problems = MeshIndex::build(resources.values().copied()).unbound_policies(true);
        problems.extend(sinew_model::destination_policies(resources.into_values()).1);
        warn_once(problems, &mut self.unbound);
    }

    /// Polls the directory and publishes a new snapshot whenever the served content changes.
    pub async fn run(mut self, tx: watch::Sender<Arc<Snapshot>>) {
        let mut tick = tokio::time::interval(POLL);
        // After a stall, ticks must not fire back to back: "held still for one poll" means
        // a poll's time.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut settling = None;
        loop {
            tick.tick().await;
            let now = fingerprint(&self.dir);
            if now == self.fingerprint {
                settling = None;
                continue;
            }
            // A file being written (truncated, then filled) looks different at every poll:
            // it is read once it has held still for one poll, not half-written.
            if settling.as_ref() != Some(&now) {
                settling = Some(now);
                continue;
            }
            settling = None;
            self.reload();
            let current = tx.borrow().clone();
            let next =
                Snapshot::from_store(&self.store, current.system_version + 1, Some(&current));
            if !next.is_unchanged() {
                info!(
                    version = next.system_version,
                    resources = next.resources.len(),
                    "configuration changed"
                );
                tx.send_replace(Arc::new(next));
                self.save();
            }
        }
    }
}
