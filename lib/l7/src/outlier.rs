//! Outlier detection: endpoints that fail several times in a row are ejected from load
//! balancing for a while, longer each time, with a cap on the share of endpoints ejected at
//! once (Envoy's consecutive-5xx detector as Istio configures it).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Istio's default `consecutiveErrors` (`consecutive5xxErrors`).
const DEFAULT_CONSECUTIVE_ERRORS: u32 = 5;
/// Istio's default `baseEjectionTime`.
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// The longest ejection (Envoy's default `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Istio's default `maxEjectionPercent`.
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// What a request's result says about its endpoint's health, as Envoy's outlier detection
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not a 5xx.
    Ok,
    /// A 5xx other than a gateway error (the application's own 500, say).
    ServerError,
    /// 502, 503 or 504, or a connect failure, reset or timeout (Envoy counts those as 503).
    GatewayError,
}

impl Health {
    /// An HTTP status's health.
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Self::GatewayError,
            500..=599 => Self::ServerError,
            _ => Self::Ok,
        }
    }

    /// A gRPC status's health, through the HTTP status Envoy maps it to
    /// (`Grpc::Utility::grpcToHttpStatus`): UNKNOWN, INTERNAL and DATA_LOSS are 500,
    /// UNIMPLEMENTED 501, UNAVAILABLE 503, DEADLINE_EXCEEDED 504.
    pub fn of_grpc(code: u32) -> Self {
        match code {
            2 | 13 | 15 | 12 => Self::ServerError,
            14 | 4 => Self::GatewayError,
            _ => Self::Ok,
        }
    }
}

/// Consecutive-failure ejection per endpoint (indices `0..endpoints`), with Envoy and Istio
/// semantics:
///
/// - two counts per endpoint, Envoy's consecutive 5xx and consecutive gateway failure: any
///   5xx adds to the first, a gateway error to both, a non-gateway 5xx resets the second, a
///   success both; either reaching its threshold (0: that count is off) ejects;
/// - after `consecutive_errors` failures in a row an endpoint is ejected for
///   `base_ejection_time` times the number of times it has been ejected (1 the first time);
/// - a success resets the endpoint's consecutive count, and so does an ejection, so an
///   endpoint that comes back needs a fresh run of failures to go again; results recorded
///   while an endpoint is ejected (requests that were already in flight) are ignored;
/// - an ejection is refused when the endpoints ejected after it would exceed
///   `max_ejection_percent` of the endpoints, rounding down, except that when that rounds to
///   0 and there are at least two endpoints one ejection is allowed (as Envoy does, which
///   compares the share ejected *before* the ejection with the percentage). A refused
///   endpoint keeps its count, so its next failure tries again. `max_ejection_percent` 0
///   disables ejection, and a lone endpoint is ejected only when the cap is 100 %;
/// - ejected endpoints come back when their time is up, checked lazily from `now`.
///
/// `consecutive_errors` 0 disables the detector. An ejection lasts at most Envoy's default
/// `max_ejection_time` ([`MAX_EJECTION`], or the base time if that is longer), so an endpoint
/// ejected many times is out for minutes, not hours. Unlike Envoy the ejection multiplier is
/// never decremented.
#[derive(Debug)]
pub struct OutlierDetector {
    consecutive_errors: u32,
    consecutive_gateway_errors: u32,
    base_ejection_time: Duration,
    max_ejection_percent: u32,
    endpoints: Mutex<Vec<Endpoint>>,
}

#[derive(Debug, Clone, Copy)]
struct Endpoint {
    consecutive: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_at: Option<Instant>,
    ejected_for: Duration,
}

impl Endpoint {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_at.is_some_and(|at| now.saturating_duration_since(at) < self.ejected_for)
    }
}

impl OutlierDetector {
    /// A detector for `endpoints` endpoints; `max_ejection_percent` above 100 is read as 100.
    pub fn new(
        endpoints: usize,
        consecutive_errors: u32,
        base_ejection_time: Duration,
        max_ejection_percent: u32,
    ) -> Self {
        let fresh = Endpoint {
            consecutive: 0,
            consecutive_gateway: 0,
            ejections: 0,
            ejected_at: None,
            ejected_for: Duration::ZERO,
        };
        Self {
            consecutive_errors,
            consecutive_gateway_errors: 0,
            base_ejection_time,
            max_ejection_percent: max_ejection_percent.min(100),
            endpoints: Mutex::new(vec![fresh; endpoints]),
        }
    }

    /// Also ejects after `n` consecutive gateway errors (0: off).
    pub fn with_gateway_errors(mut self, n: u32) -> Self {
        self.consecutive_gateway_errors = n;
        self
    }

    /// From a destination's `outlierDetection`: defaults 5 consecutive 5xx, gateway errors
    /// not counted, 30 s, 10 %. `None`: disabled (never ejects).
    pub fn from_model(endpoints: usize, o: Option<&sinew_model::OutlierDetection>) -> Self {
        let Some(o) = o else { return Self::new(endpoints, 0, Duration::ZERO, 0) };
        Self::new(
            endpoints,
            o.consecutive_5xx_errors.or(o.consecutive_errors).unwrap_or(DEFAULT_CONSECUTIVE_ERRORS),
            o.base_ejection_time.map_or(DEFAULT_BASE_EJECTION, |d| d.0),
            o.max_ejection_percent.unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
        )
        .with_gateway_errors(o.consecutive_gateway_errors.unwrap_or(0))
    }

    /// Takes over `old`'s state for endpoints that stay: `from_old[i]` is endpoint `i`'s
    /// index in `old`, if it was there. Endpoint changes (a rollout step) then neither forget
    /// an ejection nor the failures counted so far.
    /// The cap on the ejected share still holds for the new endpoint count: ejections past
    /// it (the list shrank) end now, so some endpoint always remains.
    pub fn carry_over(&self, old: &OutlierDetector, from_old: &[Option<usize>], now: Instant) {
        let old = old.endpoints.lock().unwrap_or_else(PoisonError::into_inner);
        let mut new = self.endpoints.lock().unwrap_or_else(PoisonError::into_inner);
        for (e, j) in new.iter_mut().zip(from_old) {
            if let Some(prev) = j.and_then(|j| old.get(j)) {
                *e = *prev;
            }
        }
        let cap = self.max_ejected(new.len());
        let mut ejected = 0;
        for e in new.iter_mut().filter(|e| e.is_ejected(now)) {
            ejected += 1;
            if ejected > cap {
                e.ejected_at = None;
            }
        }
    }

    /// Records the result of a request to `endpoint` (a failure being a 5xx, a reset or a
    /// connect failure); an index out of range is ignored.
    pub fn record(&self, endpoint: usize, success: bool, now: Instant) {
        let health = if success { Health::Ok } else { Health::GatewayError };
        self.record_health(endpoint, health, now);
    }

    /// Records a request's result by its [`Health`]; an index out of range is ignored.
    pub fn record_health(&self, endpoint: usize, health: Health, now: Instant) {
        if self.consecutive_errors == 0 && self.consecutive_gateway_errors == 0 {
            return;
        }
        let mut all = self.endpoints.lock().unwrap_or_else(PoisonError::into_inner);
        let cap = self.max_ejected(all.len());
        let ejected = all.iter().filter(|e| e.is_ejected(now)).count();
        let Some(e) = all.get_mut(endpoint) else { return };
        if e.is_ejected(now) {
            return;
        }
        match health {
            Health::Ok => {
                (e.consecutive, e.consecutive_gateway) = (0, 0);
                return;
            }
            Health::ServerError => e.consecutive_gateway = 0,
            Health::GatewayError => e.consecutive_gateway = e.consecutive_gateway.saturating_add(1),
        }
        e.consecutive = e.consecutive.saturating_add(1);
        let reached = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        if (reached(e.consecutive, self.consecutive_errors)
            || reached(e.consecutive_gateway, self.consecutive_gateway_errors))
            && ejected < cap
        {
            (e.consecutive, e.consecutive_gateway) = (0, 0);
            e.ejections = e.ejections.saturating_add(1);
            e.ejected_at = Some(now);
            let cap = MAX_EJECTION.max(self.base_ejection_time);
            e.ejected_for = self.base_ejection_time.saturating_mul(e.ejections).min(cap);
        }
    }

    /// Whether `endpoint` is ejected at `now`; an index out of range is not.
    pub fn is_ejected(&self, endpoint: usize, now: Instant) -> bool {
        let all = self.endpoints.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(endpoint).is_some_and(|e| e.is_ejected(now))
    }

    /// How many endpoints are ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        let all = self.endpoints.lock().unwrap_or_else(PoisonError::into_inner);
        all.iter().filter(|e| e.is_ejected(now)).count()
    }

    /// The most endpoints that may be ejected at once out of `n`.
    fn max_ejected(&self, n: usize) -> usize {
        if self.max_ejection_percent == 0 {
            return 0;
        }
        // The percentage is at most 100, so the share fits back into usize.
        let floor = (n as u128 * u128::from(self.max_ejection_percent) / 100) as usize;
        if floor == 0 && n >= 2 { 1 } else { floor }
    }
}
