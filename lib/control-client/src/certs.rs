//! Workload certificates: request, cache, renew at half life.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use sinew_api::{SignRequest, ca_client::CaClient};
use sinew_identity::{SpiffeId, new_csr, renew_at, verify_leaf};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{Backoff, ClientError, write_private};

/// How long a signing request may take.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);

/// What to request and where to keep it.
#[derive(Debug, Clone)]
pub struct CertConfig {
    /// `http://host:port` of the control service.
    pub endpoint: String,
    /// Token and TLS.
    pub credentials: crate::Credentials,
    /// The identity.
    pub identity: SpiffeId,
    /// Requested lifetime (`None`: the control service's default).
    pub ttl: Option<Duration>,
    /// Cache directory.
    pub cache_dir: PathBuf,
}

/// A workload certificate with its key and trust bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Svid {
    /// Private key, PEM.
    pub key_pem: String,
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Trusted roots, PEM.
    pub bundle: Vec<String>,
    /// When it was received.
    pub issued: SystemTime,
    /// When it expires.
    pub expires: SystemTime,
}

impl Svid {
    /// When it should be renewed.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.issued, self.expires)
    }
}

/// Asks the control service for a certificate for `cfg.identity`.
pub async fn request_certificate(cfg: &CertConfig) -> Result<Svid, ClientError> {
    let channel = crate::connect(&cfg.endpoint, &cfg.credentials).await?;
    let (key_pem, csr_pem) = new_csr(&cfg.identity)?;
    let mut request = tonic::Request::new(SignRequest {
        csr_pem,
        identity: cfg.identity.to_string(),
        ttl_seconds: cfg.ttl.map(|t| t.as_secs()).unwrap_or(0),
    });
    crate::authorize(&mut request, &cfg.credentials)?;
    // A hung control service must not hold the renewal loop until the certificate expires.
    let resp = tokio::time::timeout(SIGN_TIMEOUT, CaClient::new(channel).sign(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer to the signing request"))??
        .into_inner();
    let issued = SystemTime::now();
    let (id, expires) = verify_leaf(&resp.certificate_pem, &resp.trust_bundle_pem, issued)?;
    if id != cfg.identity {
        return Err(tonic::Status::internal(format!("asked for {}, got {id}", cfg.identity)).into());
    }
    Ok(Svid {
        key_pem,
        cert_pem: resp.certificate_pem,
        bundle: resp.trust_bundle_pem,
        issued,
        expires,
    })
}

/// `svid-<trust domain>_<namespace>_<service account>.json`: none of the three may contain
/// `_`, so two identities never share a file (with `-` as separator, `a-b`/`c` and
/// `a`/`b-c` did).
fn cache_path(cfg: &CertConfig) -> PathBuf {
    let id = &cfg.identity;
    cfg.cache_dir
        .join(format!("svid-{}_{}_{}.json", id.trust_domain, id.namespace, id.service_account))
}

fn load_cached(cfg: &CertConfig) -> Option<Svid> {
    let svid: Svid = serde_json::from_slice(&std::fs::read(cache_path(cfg)).ok()?).ok()?;
    let (id, _) = verify_leaf(&svid.cert_pem, &svid.bundle, SystemTime::now()).ok()?;
    (id == cfg.identity).then_some(svid)
}

/// Keeps a valid certificate for `cfg.identity` published: the cached one at once if still
/// valid, then renewals at half life; failures retry with backoff while the old one serves.
pub fn start_certificate(cfg: CertConfig) -> (watch::Receiver<Option<Arc<Svid>>>, JoinHandle<()>) {
    let (_, fixed) = watch::channel(None);
    start_certificate_following(cfg, fixed, Duration::ZERO)
}

/// How long renewals triggered by a new trust bundle are spread over (each waits a random
/// part of it first): a control restart with a new root must not have every workload of
/// every node ask for a certificate in the same second. The old root is still trusted, so
/// there is no hurry.
pub const BUNDLE_RENEWAL_SPREAD: Duration = Duration::from_secs(30);

/// The trust bundle the control service publishes (`None` until it has), for
/// [`start_certificate_following`].
pub type BundleUpdates = watch::Receiver<Option<Arc<[String]>>>;

/// The trust bundle as `get` reads it from each value of `source` (the client's view of the
/// configuration), published only when it changes.
pub fn bundle_updates<T: Send + Sync + 'static>(
    mut source: watch::Receiver<T>,
    get: impl Fn(&T) -> Option<Arc<[String]>> + Send + 'static,
) -> BundleUpdates {
    let (tx, rx) = watch::channel(get(&source.borrow_and_update()));
    tokio::spawn(async move {
        while source.changed().await.is_ok() {
            let b = get(&source.borrow_and_update());
            tx.send_if_modified(|cur| {
                let changed = *cur != b;
                if changed {
                    cur.clone_from(&b);
                }
                changed
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// As [`start_certificate`], and renews when `bundle` differs from the bundle the
/// certificate came with (a root added or a new signing root), after a random delay below
/// `spread` ([`BUNDLE_RENEWAL_SPREAD`]): a rotation reaches this client without waiting for
/// half life. A bundle that a renewal did not bring is not chased again (no renewal loop if
/// control's two answers ever disagree); a renewal that fails is retried with backoff.
pub fn start_certificate_following(
    cfg: CertConfig,
    mut bundle: BundleUpdates,
    spread: Duration,
) -> (watch::Receiver<Option<Arc<Svid>>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(load_cached(&cfg).map(Arc::new));
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::new();
        // The last bundle a renewal was made for, and the one being renewed for now (it
        // becomes `chased` only once that renewal succeeds: a failure retries with backoff).
        let mut chased: Option<Arc<[String]>> = None;
        let mut chasing: Option<Arc<[String]>> = None;
        loop {
            let current = tx.borrow().clone();
            if let Some(svid) = &current {
                // A floor, so a very short lifetime cannot turn renewal into a busy loop.
                let wait = svid.renew_at().duration_since(SystemTime::now()).unwrap_or_default();
                let wait = wait.max(Duration::from_secs(1));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    new = new_bundle(&mut bundle, &svid.bundle, chased.as_ref()) => {
                        if chasing.is_none() {
                            let wait = random_below(&cfg.identity.to_string(), spread);
                            info!(identity = %cfg.identity, in_ms = wait.as_millis() as u64, "trust bundle changed: renewing");
                            tokio::time::sleep(wait).await;
                        }
                        chasing = Some(new);
                    }
                }
            }
            match request_certificate(&cfg).await {
                Ok(svid) => {
                    backoff.reset();
                    if chasing.is_some() {
                        chased = chasing.take();
                    }
                    info!(identity = %cfg.identity, expires_in = ?svid.expires.duration_since(svid.issued).unwrap_or_default(), "certificate renewed");
                    if let Err(e) = write_private(
                        &cache_path(&cfg),
                        &serde_json::to_vec(&svid).expect("SVIDs serialize"),
                    ) {
                        warn!(error = %e, "cannot cache the certificate");
                    }
                    tx.send_replace(Some(Arc::new(svid)));
                }
                Err(e) => {
                    warn!(identity = %cfg.identity, error = %e, "certificate request failed; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    });
    (rx, task)
}

/// A pseudo-random duration below `max` (zero for zero), different per `seed` and moment:
/// enough to spread renewals, no randomness crate needed.
fn random_below(seed: &str, max: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let max_ms = max.as_millis() as u64;
    if max_ms == 0 {
        return Duration::ZERO;
    }
    let mut h = std::hash::DefaultHasher::new();
    seed.hash(&mut h);
    SystemTime::now().hash(&mut h);
    Duration::from_millis(h.finish() % max_ms)
}

/// Forwards the bundle `from` publishes into `to` (for a client whose certificate task had
/// to start before the configuration stream that carries the bundle, such as the node's).
pub fn forward_bundle(mut from: BundleUpdates, to: watch::Sender<Option<Arc<[String]>>>) {
    tokio::spawn(async move {
        loop {
            let b = from.borrow_and_update().clone();
            to.send_replace(b);
            if from.changed().await.is_err() || to.is_closed() {
                return;
            }
        }
    });
}

/// Waits until `bundle` holds roots other than `held` (and than `chased`, the last bundle a
/// renewal was made for); pends for good once the sender is gone.
async fn new_bundle(
    bundle: &mut BundleUpdates,
    held: &[String],
    chased: Option<&Arc<[String]>>,
) -> Arc<[String]> {
    loop {
        let now = bundle.borrow_and_update().clone();
        if let Some(b) = now
            && b[..] != *held
            && chased.is_none_or(|c| c[..] != b[..])
        {
            return b;
        }
        if bundle.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_delays_stay_below_the_spread_and_vary() {
        let spread = Duration::from_secs(30);
        let delays: Vec<Duration> =
            (0..50).map(|i| random_below(&format!("spiffe://td/ns/a/sa/{i}"), spread)).collect();
        assert!(delays.iter().all(|d| *d < spread));
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 40, "spread out: {distinct:?}");
        assert_eq!(random_below("x", Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_bundle_is_forwarded_to_a_later_channel() {
        let (from_tx, from) = watch::channel(None);
        let (to, mut to_rx) = watch::channel(None);
        forward_bundle(from, to);
        from_tx.send_replace(Some(vec!["root".to_string()].into()));
        tokio::time::timeout(Duration::from_secs(2), to_rx.wait_for(Option::is_some))
            .await
            .expect("forwarded")
            .expect("open");
    }
}
