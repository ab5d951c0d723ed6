//! Workload certificates: one SVID per identity of the node's captured pods, requested from
//! the control service (node authorization limits it to this node's workloads), cached on
//! disk, renewed at half life, and turned into HBONE TLS credentials.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use sinew_control_client::{
    BUNDLE_RENEWAL_SPREAD, BundleUpdates, CertConfig, Credentials, Svid,
    start_certificate_following,
};
use sinew_hbone::tls::Identity;
use sinew_identity::SpiffeId;
use tokio::{runtime::Handle, sync::watch, task::JoinHandle};
use tracing::warn;

/// Where certificates come from.
#[derive(Debug, Clone)]
pub struct CertSource {
    /// The control service.
    pub endpoint: String,
    /// How the agent authenticates to it.
    pub credentials: Credentials,
    /// Cache directory.
    pub cache_dir: std::path::PathBuf,
    /// The trust bundle control publishes: certificates are renewed when it changes.
    pub bundle: BundleUpdates,
}

struct Entry {
    svids: watch::Receiver<Option<Arc<Svid>>>,
    task: JoinHandle<()>,
    /// The TLS credentials of the SVID they were built from.
    built: Mutex<Option<(Arc<Svid>, Identity)>>,
    /// The identity, for logs.
    id: SpiffeId,
    /// The expired SVID already warned about: one line per certificate that runs out, not
    /// one per connection refused meanwhile (which anyone who can connect would multiply).
    expired_noted: Mutex<Option<Arc<Svid>>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The certificates this agent holds, by identity.
pub struct Certs {
    source: Option<CertSource>,
    runtime: Handle,
    entries: Mutex<HashMap<SpiffeId, Arc<Entry>>>,
}

/// A certificate as shown by the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// The identity.
    pub identity: String,
    /// Seconds until it expires (None: not issued yet).
    pub expires_in_secs: Option<u64>,
    /// Seconds until it is renewed.
    pub renews_in_secs: Option<u64>,
}

impl Certs {
    /// Certificates from `source`; `None` (capture-only mode) holds none.
    pub fn new(source: Option<CertSource>, runtime: Handle) -> Self {
        Self { source, runtime, entries: Mutex::new(HashMap::new()) }
    }

    /// True when the agent can hold certificates (it talks to a control service).
    pub fn enabled(&self) -> bool {
        self.source.is_some()
    }

    /// Stops keeping the certificates of identities `keep` rejects (no captured pod has them
    /// any more): their renewal stops, which control would refuse anyway under node
    /// authorization, retrying forever.
    pub fn retain(&self, keep: impl Fn(&SpiffeId) -> bool) {
        self.entries.lock().expect("certificate lock poisoned").retain(|id, _| keep(id));
    }

    /// Starts keeping a certificate for `id`, if not already.
    pub fn ensure(&self, id: &SpiffeId) {
        let Some(source) = &self.source else { return };
        let mut entries = self.entries.lock().expect("certificate lock poisoned");
        if entries.contains_key(id) {
            return;
        }
        let cfg = CertConfig {
            endpoint: source.endpoint.clone(),
            credentials: source.credentials.clone(),
            identity: id.clone(),
            ttl: None,
            cache_dir: source.cache_dir.clone(),
        };
        let _guard = self.runtime.enter();
        let (svids, task) =
            start_certificate_following(cfg, source.bundle.clone(), BUNDLE_RENEWAL_SPREAD);
        let entry = Entry {
            svids,
            task,
            built: Mutex::new(None),
            id: id.clone(),
            expired_noted: Mutex::new(None),
        };
        entries.insert(id.clone(), Arc::new(entry));
    }

    /// The TLS credentials for `id`, if its certificate has been issued.
    pub fn identity(&self, id: &SpiffeId) -> Option<Identity> {
        let entry = self.entries.lock().expect("certificate lock poisoned").get(id)?.clone();
        current(&entry)
    }

    /// Like [`Self::identity`], waiting up to `wait` for a first certificate.
    pub async fn wait_identity(&self, id: &SpiffeId, wait: Duration) -> Option<Identity> {
        let entry = self.entries.lock().expect("certificate lock poisoned").get(id)?.clone();
        if let Some(i) = current(&entry) {
            return Some(i);
        }
        let mut rx = entry.svids.clone();
        let _ = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        current(&entry)
    }

    /// Every certificate held, for the admin API.
    pub fn dump(&self) -> Vec<CertInfo> {
        let now = SystemTime::now();
        let secs = |t: SystemTime| t.duration_since(now).map(|d| d.as_secs()).unwrap_or(0);
        let mut out: Vec<CertInfo> = self
            .entries
            .lock()
            .expect("certificate lock poisoned")
            .iter()
            .map(|(id, e)| {
                let svid = e.svids.borrow().clone();
                CertInfo {
                    identity: id.to_string(),
                    expires_in_secs: svid.as_ref().map(|s| secs(s.expires)),
                    renews_in_secs: svid.as_ref().map(|s| secs(s.renew_at())),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

fn current(entry: &Entry) -> Option<Identity> {
    let svid = entry.svids.borrow().clone()?;
    // An expired certificate (control unreachable past its renewal) is not offered: peers
    // would refuse it with an alert that names nothing; this names the cause.
    if svid.expires <= SystemTime::now() {
        let mut noted = entry.expired_noted.lock().expect("certificate lock poisoned");
        if !noted.as_ref().is_some_and(|n| Arc::ptr_eq(n, &svid)) {
            warn!(
                identity = %entry.id,
                expired_secs_ago =
                    SystemTime::now().duration_since(svid.expires).unwrap_or_default().as_secs(),
                "certificate expired and not renewed (control unreachable?): not used"
            );
            *noted = Some(svid);
        }
        return None;
    }
    let mut built = entry.built.lock().expect("certificate lock poisoned");
    if let Some((s, identity)) = &*built
        && Arc::ptr_eq(s, &svid)
    {
        return Some(identity.clone());
    }
    match Identity::from_pem(&svid.cert_pem, &svid.key_pem, &svid.bundle) {
        Ok(identity) => {
            *built = Some((svid, identity.clone()));
            Some(identity)
        }
        Err(e) => {
            warn!(error = %e, "an issued certificate cannot be used for TLS");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identities_no_pod_uses_are_let_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = CertSource {
            // Nothing listens there: the renewal tasks just keep retrying.
            endpoint: "http://127.0.0.1:9".into(),
            credentials: Credentials::default(),
            cache_dir: dir.path().to_path_buf(),
            bundle: watch::channel(None).1,
        };
        let certs = Certs::new(Some(source), Handle::current());
        let id = |sa: &str| SpiffeId::new("cluster.local", "shop", sa).expect("id");
        certs.ensure(&id("web"));
        certs.ensure(&id("api"));
        assert_eq!(certs.dump().len(), 2);
        certs.retain(|i| i.service_account == "api");
        let left: Vec<String> = certs.dump().into_iter().map(|c| c.identity).collect();
        assert_eq!(left, ["spiffe://cluster.local/ns/shop/sa/api"]);
    }
}
