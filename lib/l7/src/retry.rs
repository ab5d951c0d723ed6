//! Retries: which outcomes a route's `retry` block retries, how long to wait between tries
//! (exponential backoff with full jitter, randomness passed in) and an Envoy-style budget that
//! keeps retries from multiplying load when a destination is failing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a try ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this HTTP status.
    Status(u16),
    /// A gRPC response with this `grpc-status` (HTTP 200 with a non-zero status in the
    /// trailers, or a trailers-only response).
    Grpc(u32),
    /// The stream or connection was reset before a response arrived.
    Reset,
    /// No connection could be made to the endpoint.
    ConnectFailure,
    /// The try took longer than its per-try timeout (`timeouts.backendRequest`).
    Timeout,
}

/// Whether requests with `method` are idempotent (RFC 9110 section 9.2.2).
pub fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// The default base backoff, as Envoy and Istio use.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// The default number of retries, as Istio uses.
const DEFAULT_ATTEMPTS: u32 = 2;
/// gRPC `UNAVAILABLE`.
const GRPC_UNAVAILABLE: u32 = 14;
/// gRPC `CANCELLED`.
const GRPC_CANCELLED: u32 = 1;
/// The status a per-try timeout is answered with, and retried as.
const GATEWAY_TIMEOUT: u16 = 504;

/// Which tries are retried and how long to wait between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// HTTP statuses that are retried.
    pub codes: Vec<u16>,
    /// gRPC statuses that are retried.
    pub grpc_codes: Vec<u32>,
    /// Whether a reset stream is retried.
    pub on_reset: bool,
    /// Whether a failed connect is retried.
    pub on_connect_failure: bool,
    /// The backoff ceiling of the first retry; it doubles with each retry.
    pub base_backoff: Duration,
    /// The cap on the backoff ceiling.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// From the route's `retry`: `attempts` default 2; `codes` as given, an empty list meaning
    /// Istio's default retry-on (503 plus connect failure and reset); gRPC `CANCELLED` (1)
    /// and `UNAVAILABLE` (14), as Istio's `retryOn` with retries configured;
    /// resets (for idempotent methods: [`Self::should_retry_request`]) and connect failures
    /// retried; backoff default 25 ms, capped at 10 times the base.
    /// `None` (no retry block) is Istio's default policy, [`RetryPolicy::mesh_default`]; a
    /// block with `attempts: 0` turns retries off.
    pub fn from_model(r: Option<&sinew_model::Retry>) -> Self {
        let Some(r) = r else { return Self::mesh_default() };
        let base = r.backoff.map_or(DEFAULT_BACKOFF, |b| b.0);
        Self {
            attempts: r.attempts.unwrap_or(DEFAULT_ATTEMPTS),
            codes: if r.codes.is_empty() { vec![503] } else { r.codes.clone() },
            grpc_codes: vec![GRPC_CANCELLED, GRPC_UNAVAILABLE],
            on_reset: true,
            on_connect_failure: true,
            base_backoff: base,
            max_backoff: base.saturating_mul(10),
        }
    }

    /// What Istio retries when a route says nothing: 2 retries on a connect failure, a 503,
    /// and gRPC `UNAVAILABLE` or `CANCELLED` (its default `retryOn`), with 25 ms backoff.
    /// Resets are not among them (Istio retries only refused streams, which never reached
    /// the application). Each retry goes to another endpoint when there is one.
    pub fn mesh_default() -> Self {
        Self {
            attempts: DEFAULT_ATTEMPTS,
            codes: vec![503],
            grpc_codes: vec![GRPC_CANCELLED, GRPC_UNAVAILABLE],
            on_reset: false,
            on_connect_failure: true,
            base_backoff: DEFAULT_BACKOFF,
            max_backoff: DEFAULT_BACKOFF.saturating_mul(10),
        }
    }

    /// No retries.
    pub fn none() -> Self {
        Self {
            attempts: 0,
            codes: Vec::new(),
            grpc_codes: Vec::new(),
            on_reset: false,
            on_connect_failure: false,
            base_backoff: DEFAULT_BACKOFF,
            max_backoff: DEFAULT_BACKOFF.saturating_mul(10),
        }
    }

    /// Whether try number `attempt` (1 = the first try; 0 is read as 1) that ended with
    /// `outcome` may be retried. A per-try [`Outcome::Timeout`] is retried when 504 is among
    /// the codes, as Envoy answers a per-try timeout with 504 and retries it as a gateway error.
    pub fn should_retry(&self, outcome: Outcome, attempt: u32) -> bool {
        if attempt.max(1) > self.attempts {
            return false;
        }
        match outcome {
            Outcome::Status(s) => self.codes.contains(&s),
            Outcome::Grpc(c) => self.grpc_codes.contains(&c),
            Outcome::Reset => self.on_reset,
            Outcome::ConnectFailure => self.on_connect_failure,
            Outcome::Timeout => self.codes.contains(&GATEWAY_TIMEOUT),
        }
    }

    /// [`Self::should_retry`] for a request with `method`: a reset stream is retried only for
    /// idempotent methods (RFC 9110 section 9.2.2), as the request may have reached the
    /// backend before the reset, and a second POST could place a second order. (Requests
    /// never sent, on a pooled connection that had closed, are resent by the client itself.)
    pub fn should_retry_request(&self, outcome: Outcome, attempt: u32, method: &str) -> bool {
        if outcome == Outcome::Reset && !idempotent(method) {
            return false;
        }
        self.should_retry(outcome, attempt)
    }

    /// The wait before retry number `retry` (1-based; 0 is read as 1): exponential from the
    /// base (`base * 2^(retry-1)`) capped at `max_backoff`, with full jitter: a value in
    /// `[0, that)` chosen by `rnd`. Saturates instead of overflowing; a zero ceiling gives
    /// zero. Ceilings beyond `u64::MAX` nanoseconds (584 years) are cut to that.
    pub fn backoff(&self, retry: u32, rnd: u64) -> Duration {
        let factor = 1u32.checked_shl(retry.max(1) - 1).unwrap_or(u32::MAX);
        let ceiling = self.base_backoff.saturating_mul(factor).min(self.max_backoff);
        let ceiling = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        // Multiply-shift maps rnd uniformly onto [0, ceiling) without division bias.
        let jittered = (u128::from(rnd) * u128::from(ceiling)) >> 64;
        Duration::from_nanos(u64::try_from(jittered).unwrap_or(u64::MAX))
    }
}

/// Envoy-style retry budget: retries in flight may be at most `ratio` of the requests in
/// flight (those holding a [`RequestGuard`]), but at least `min_concurrent` concurrent retries
/// are always allowed. Envoy's defaults, and [`Default`]: 0.2 and 3.
///
/// Lock-free; guards own a handle to the counters, so they can move into spawned tasks.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_concurrent: u32,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU64,
    retries: AtomicU64,
}

/// Counts an active request in its [`RetryBudget`] until dropped.
#[derive(Debug)]
#[must_use = "the request counts only while the guard lives"]
pub struct RequestGuard(Arc<Counts>);

/// Counts an active retry in its [`RetryBudget`] until dropped.
#[derive(Debug)]
#[must_use = "the retry counts only while the guard lives"]
pub struct RetryGuard(Arc<Counts>);

impl RetryBudget {
    /// A budget allowing retries up to `ratio` (0.2 = 20 %) of active requests, and at least
    /// `min_concurrent` at once. A negative or NaN ratio is read as 0.
    pub fn new(ratio: f64, min_concurrent: u32) -> Self {
        let ratio = if ratio.is_nan() { 0.0 } else { ratio.max(0.0) };
        Self { ratio, min_concurrent, counts: Arc::default() }
    }

    /// Counts an active request until the guard drops.
    pub fn request_started(&self) -> RequestGuard {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard(Arc::clone(&self.counts))
    }

    /// Reserves a retry; `None` when over budget. The guard counts an active retry until
    /// dropped.
    pub fn try_retry(&self) -> Option<RetryGuard> {
        let requests = self.counts.requests.load(Ordering::Relaxed);
        // `as` saturates from f64, and the ratio is never NaN or negative.
        let allowed = ((requests as f64 * self.ratio) as u64).max(u64::from(self.min_concurrent));
        self.counts
            .retries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| (r < allowed).then(|| r + 1))
            .ok()
            .map(|_| RetryGuard(Arc::clone(&self.counts)))
    }

    /// Retries in flight now.
    pub fn active_retries(&self) -> u64 {
        self.counts.retries.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn active_requests(&self) -> u64 {
        self.counts.requests.load(Ordering::Relaxed)
    }
}

impl Default for RetryBudget {
    /// Envoy's defaults: 20 % of active requests, at least 3 concurrent retries.
    fn default() -> Self {
        Self::new(0.2, 3)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}
