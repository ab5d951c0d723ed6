//! The file source: a directory of YAML, re-read when anything in it changes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use sinew_model::{ConfigError, Store};
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
    /// Reads `dir` once and returns the source and its first snapshot.
    pub fn new(dir: &Path) -> (Self, Snapshot) {
        let mut s = Self {
            dir: dir.to_path_buf(),
            store: Store::new(),
            fingerprint: vec![],
            errors: Arc::default(),
        };
        s.reload();
        let snap = Snapshot::from_store(&s.store, 1, None);
        (s, snap)
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
    }

    /// Polls the directory and publishes a new snapshot whenever the served content changes.
    pub async fn run(mut self, tx: watch::Sender<Arc<Snapshot>>) {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            if fingerprint(&self.dir) == self.fingerprint {
                continue;
            }
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
            }
        }
    }
}
