//! The waypoint's configuration in force and the state kept across changes of it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sinew_control_client::Svid;
use sinew_hbone::{Pool, tls::Identity};
use sinew_identity::SpiffeId;
use sinew_l7::{
    balance::{Algorithm, Balancer, Limits},
    outlier::OutlierDetector,
    ratelimit::TokenBucket,
    retry::RetryBudget,
    route::RouteTable,
};
use sinew_mesh::{Decision, HttpRequest, MeshIndex, ServiceInfo, Source, Target, WorkloadInfo};
use sinew_model::{LocalRateLimit, Resource};
use sinew_workers::PerWorker;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{
    telemetry::{AccessLog, Metrics},
    upstream::Upstreams,
};

/// What one configuration version compiles to.
pub struct Snapshot {
    /// Workloads, services, policies.
    pub mesh: MeshIndex,
    /// HTTPRoutes and GRPCRoutes by parent service.
    pub routes: RouteTable,
    /// DestinationPolicies by `namespace/service`.
    pub destinations: HashMap<String, sinew_model::DestinationPolicySpec>,
    /// Whether this is a whole configuration (control completed a sync, or a file source):
    /// the waypoint is ready only then.
    pub synced: bool,
}

impl Snapshot {
    /// Compiles `resources`; problems are logged (the rest applies).
    pub fn build<'a>(resources: impl IntoIterator<Item = &'a Resource> + Clone) -> Self {
        let (routes, problems) = RouteTable::build(resources.clone());
        for p in problems {
            warn!(problem = %p, "route problem");
        }
        // Control warns about rules left out (once, not at every waypoint and change).
        let (destinations, left_out) = sinew_model::destination_policies(resources.clone());
        for problem in left_out {
            debug!(%problem, "DestinationRule left out");
        }
        Self { mesh: MeshIndex::build(resources), routes, destinations, synced: true }
    }
}

/// Endpoint selection state of one backend service, kept while its endpoints stay the same.
pub struct BackendState {
    /// The endpoints, in the index's order.
    pub endpoints: Vec<Arc<WorkloadInfo>>,
    /// Load balancer over them.
    pub balancer: Balancer,
    /// Consecutive-failure ejection.
    pub outlier: OutlierDetector,
    /// Circuit-breaking limits; kept across endpoint changes (they count the service's
    /// requests and connections, whichever endpoints serve them).
    pub limits: Arc<Limits>,
    /// Which build of `limits` this is (grows with each new one; pools are kept per build).
    pub limits_generation: u64,
    /// Notified when one of its upstream connections closes: requests waiting for a place
    /// under `maxConnections` look again.
    pub connection_freed: Arc<tokio::sync::Notify>,
    /// Retries may add 20 % (at least 3) to the requests in flight to this service, as an
    /// Envoy cluster's budget: one failing service cannot use up the retries of others.
    pub budget: Arc<RetryBudget>,
    /// `connectionPool.connectTimeout`: how long a new upstream connection may take.
    pub connect_timeout: Option<std::time::Duration>,
    /// `namespace/name`, which keys its pooled upstream clients.
    pub key: Arc<str>,
    /// The DestinationPolicy it was built from.
    policy: Option<sinew_model::DestinationPolicySpec>,
}

/// Numbers the builds of backends' connection limits.
static LIMITS_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A backend's retry budget: retries may add this share of its requests in flight...
const RETRY_BUDGET_SHARE: f64 = 0.2;
/// ...and at least this many (Envoy's defaults).
const RETRY_BUDGET_MIN: u32 = 3;

/// Everything the request path shares.
pub struct Waypoint {
    /// Our name (what `sinew.io/use-waypoint` and Gateway targetRefs name).
    pub name: String,
    /// Our SPIFFE id.
    pub id: SpiffeId,
    /// Trust domain of workload identities.
    pub trust_domain: String,
    /// The configuration in force.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Our certificate.
    pub svid: watch::Receiver<Option<Arc<Svid>>>,
    /// HBONE connections to endpoints' agents, per worker thread (each connection is driven
    /// by the worker whose requests use it).
    pub pool: PerWorker<Pool>,
    /// Metrics.
    pub metrics: Metrics,
    /// Access log.
    pub access: AccessLog,
    /// Pooled HTTP clients toward endpoints.
    pub upstreams: Upstreams,
    /// Span export, when an OTLP endpoint is configured.
    pub otlp: Option<crate::otlp::Exporter>,
    /// How long a request's stream may move nothing either way (Envoy's
    /// `stream_idle_timeout`); `None`: for ever.
    pub stream_idle: Option<Duration>,
    /// Set when the waypoint is stopping: connections are told to go (GOAWAY, or a close
    /// after the request in hand) and new ones are closed.
    pub draining: watch::Sender<bool>,
    /// HBONE connections open now (what a drain waits for).
    pub open: std::sync::atomic::AtomicUsize,
    built: Mutex<Option<(Arc<Svid>, Identity)>>,
    buckets: Mutex<HashMap<String, (LocalRateLimit, Arc<TokenBucket>)>>,
    sources: Mutex<(HashMap<String, u32>, Vec<String>)>,
    backends: Mutex<HashMap<String, Arc<BackendState>>>,
}

/// How a waypoint is set up, apart from its configuration and certificate channels.
pub struct Setup {
    /// See [`Waypoint::name`].
    pub name: String,
    /// See [`Waypoint::id`].
    pub id: SpiffeId,
    /// See [`Waypoint::access`].
    pub access: AccessLog,
    /// See [`Waypoint::otlp`].
    pub otlp: Option<crate::otlp::Exporter>,
    /// Upstreams over plain TCP instead of HBONE (the `--plain-http` benchmark mode).
    pub plain: bool,
    /// Worker threads (per-worker connection pools).
    pub workers: usize,
    /// See [`Waypoint::stream_idle`].
    pub stream_idle: Option<Duration>,
}

impl Waypoint {
    /// A waypoint over the given configuration and certificate channels.
    pub fn new(
        setup: Setup,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        svid: watch::Receiver<Option<Arc<Svid>>>,
    ) -> Arc<Self> {
        let Setup { name, id, access, otlp, plain, workers, stream_idle } = setup;
        Arc::new_cyclic(|me| Self {
            name,
            trust_domain: id.trust_domain.clone(),
            id,
            snapshot,
            svid,
            pool: PerWorker::new(workers, |_| Pool::new()),
            metrics: {
                let mut m = Metrics::default();
                m.count_dropped_lines(&access);
                m
            },
            access,
            upstreams: if plain { Upstreams::plain(workers) } else { Upstreams::new(me.clone()) },
            otlp,
            stream_idle,
            draining: watch::channel(false).0,
            open: Default::default(),
            built: Mutex::new(None),
            buckets: Mutex::new(HashMap::new()),
            sources: Mutex::new((HashMap::new(), Vec::new())),
            backends: Mutex::new(HashMap::new()),
        })
    }

    /// Completes once the waypoint is draining.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut draining = self.draining.subscribe();
        async move {
            let _ = draining.wait_for(|d| *d).await;
        }
    }

    /// Our TLS credentials, if the certificate has been issued and is still valid.
    pub fn identity(&self) -> Option<Identity> {
        let svid = self.svid.borrow().clone()?;
        if svid.expires <= std::time::SystemTime::now() {
            return None;
        }
        let mut built = self.built.lock().expect("identity lock poisoned");
        if let Some((s, i)) = &*built
            && Arc::ptr_eq(s, &svid)
        {
            return Some(i.clone());
        }
        match Identity::from_pem(&svid.cert_pem, &svid.key_pem, &svid.bundle) {
            Ok(i) => {
                *built = Some((svid, i.clone()));
                Some(i)
            }
            Err(e) => {
                warn!(error = %e, "the issued certificate cannot be used for TLS");
                None
            }
        }
    }

    /// The decision of the policies attached to `svc` or this waypoint (`targetRefs`) on a
    /// request (`http`) or a connection to a plain TCP port (`None`) to service `port`, from
    /// `source` at `client`; `None` when no policy is attached (all is allowed).
    pub fn decide(
        &self,
        snapshot: &Snapshot,
        svc: &ServiceInfo,
        port: u16,
        source: &SpiffeId,
        client: IpAddr,
        http: Option<&HttpRequest<'_>>,
    ) -> Option<Decision> {
        let target = Target {
            namespace: &svc.namespace,
            service: &svc.name,
            waypoint: Some(&self.name),
            port,
        };
        let authz = snapshot.mesh.authz();
        if !authz.has_targeted_policies(&target) {
            return None;
        }
        let src = Source { identity: Some(source), ip: client };
        Some(match http {
            Some(req) => authz.check_http(&target, &src, req),
            None => authz.check_tcp(&target, &src),
        })
    }

    /// [`Waypoint::decide`], with the decision counted in
    /// `sinew_authorization_decisions_total` (a denial, and every AUDIT policy matched);
    /// `principal` is `source` as a string.
    pub fn authorize(
        &self,
        snapshot: &Snapshot,
        svc: &ServiceInfo,
        port: u16,
        (source, principal): (&SpiffeId, &str),
        client: IpAddr,
        http: Option<&HttpRequest<'_>>,
    ) -> Option<Decision> {
        let d = self.decide(snapshot, svc, port, source, client, http)?;
        if !d.allowed() {
            // Denied by default (ALLOW policies apply, none matched): policy `-`, as the
            // agent counts it.
            self.metrics.decision("deny", d.policy.as_deref().unwrap_or("-"), svc, principal);
        }
        for policy in &d.audited {
            self.metrics.decision("audit", policy, svc, principal);
        }
        Some(d)
    }

    /// A small number standing for an original client identity, for upstream URIs.
    pub fn source_tag(&self, principal: &str) -> u32 {
        let mut sources = self.sources.lock().expect("source lock poisoned");
        if let Some(tag) = sources.0.get(principal) {
            return *tag;
        }
        let tag = sources.1.len() as u32;
        sources.1.push(principal.to_owned());
        sources.0.insert(principal.to_owned(), tag);
        tag
    }

    /// The identity a tag stands for.
    pub fn source_of(&self, tag: u32) -> Option<String> {
        self.sources.lock().expect("source lock poisoned").1.get(tag as usize).cloned()
    }

    /// The token bucket of a rule (`key` names route and rule); re-created when its limits
    /// change, kept across unrelated configuration changes.
    pub fn bucket(&self, key: &str, limit: &LocalRateLimit) -> Arc<TokenBucket> {
        let mut buckets = self.buckets.lock().expect("bucket lock poisoned");
        match buckets.get(key) {
            Some((l, b)) if l == limit => b.clone(),
            _ => {
                let b = Arc::new(TokenBucket::from_model(limit, Instant::now()));
                buckets.insert(key.to_owned(), (limit.clone(), b.clone()));
                b
            }
        }
    }

    /// The endpoint state last built for `key` (`namespace/name`), as upstream connectors
    /// find their backend's limits.
    pub fn backend_by_key(&self, key: &str) -> Option<Arc<BackendState>> {
        self.backends.lock().expect("backend lock poisoned").get(key).cloned()
    }

    /// The endpoint state of service `namespace/name`, re-created when its endpoints or its
    /// DestinationPolicy change.
    pub fn backend(
        &self,
        snapshot: &Snapshot,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<BackendState>> {
        let svc = snapshot.mesh.service(namespace, name)?;
        let key = format!("{namespace}/{name}");
        let mut backends = self.backends.lock().expect("backend lock poisoned");
        let policy = snapshot.destinations.get(&key);
        if let Some(b) = backends.get(&key)
            && b.policy.as_ref() == policy
            && b.endpoints.len() == svc.endpoints.len()
            && b.endpoints.iter().zip(&svc.endpoints).all(|(a, b)| a == b)
        {
            return Some(b.clone());
        }
        let n = svc.endpoints.len();
        let pool = policy.and_then(|p| p.connection_pool.as_ref());
        let (limits, limits_generation) = match backends.get(&key) {
            Some(old) if old.policy.as_ref() == policy => {
                (old.limits.clone(), old.limits_generation)
            }
            _ => (
                Arc::new(Limits::from_model(pool)),
                LIMITS_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ),
        };
        let connection_freed = match backends.get(&key) {
            Some(old) => old.connection_freed.clone(),
            None => Arc::new(tokio::sync::Notify::new()),
        };
        let budget = match backends.get(&key) {
            Some(old) => old.budget.clone(),
            None => Arc::new(RetryBudget::new(RETRY_BUDGET_SHARE, RETRY_BUDGET_MIN)),
        };
        // Endpoints that stay keep their latency, requests in flight and ejection state
        // (matched by address); consistent hashing keys on each endpoint's name.
        let from_old: Option<Vec<Option<usize>>> = backends.get(&key).map(|old| {
            let index: HashMap<&[std::net::IpAddr], usize> =
                old.endpoints.iter().enumerate().map(|(j, o)| (o.ips.as_slice(), j)).collect();
            svc.endpoints.iter().map(|e| index.get(e.ips.as_slice()).copied()).collect()
        });
        let ids: Vec<u64> =
            svc.endpoints.iter().map(|e| sinew_l7::balance::hash_key(e.key().as_bytes())).collect();
        let algorithm = Algorithm::from_model(policy.and_then(|p| p.load_balancer.as_ref()));
        let state = Arc::new(BackendState {
            endpoints: svc.endpoints.clone(),
            balancer: match (backends.get(&key), &from_old) {
                (Some(old), Some(from_old)) => {
                    Balancer::following(ids, algorithm, &old.balancer, from_old)
                }
                _ => Balancer::with_ids(ids, algorithm),
            },
            outlier: OutlierDetector::from_model(
                n,
                policy.and_then(|p| p.outlier_detection.as_ref()),
            ),
            limits,
            limits_generation,
            connection_freed,
            budget,
            connect_timeout: pool.and_then(|p| p.connect_timeout).map(|d| d.0),
            key: Arc::from(key.as_str()),
            policy: policy.cloned(),
        });
        if let (Some(old), Some(from_old)) = (backends.get(&key), &from_old) {
            state.outlier.carry_over(&old.outlier, from_old, Instant::now());
        }
        backends.insert(key, state.clone());
        Some(state)
    }
}
