//! Local rate limiting: a token bucket per route (the `localRateLimit` filter), refilled in
//! whole intervals computed lazily from the `now` each call passes in, so there is no timer
//! task and tests run in virtual time.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A token bucket: starts full; `tokens_per_fill` added every `fill_interval`, capped at
/// `max_tokens`.
///
/// Fills are whole intervals (no fractional refills) counted from the bucket's creation, and
/// the fill clock runs while the bucket is full, as Envoy's timer-driven bucket does. A `now`
/// earlier than the last fill is treated as no time passed. A zero `fill_interval` is treated
/// as one nanosecond; with zero `tokens_per_fill` or zero `max_tokens` the bucket never
/// admits more than it started with and refusals say [`Duration::MAX`].
#[derive(Debug)]
pub struct TokenBucket {
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: u32,
    /// The instant of the last whole fill (or of creation).
    last_fill: Instant,
}

/// The answer of [`TokenBucket::try_take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Admitted; tokens left after this one.
    Allowed {
        /// Tokens left in the bucket, for the `x-ratelimit-remaining` header.
        remaining: u32,
    },
    /// Refused; when the next token arrives.
    Limited {
        /// Time until the next fill, for the `retry-after` header.
        retry_after: Duration,
    },
}

impl TokenBucket {
    /// A full bucket whose fill clock starts at `now`.
    pub fn new(
        max_tokens: u32,
        tokens_per_fill: u32,
        fill_interval: Duration,
        now: Instant,
    ) -> Self {
        Self {
            max_tokens,
            tokens_per_fill,
            fill_interval: fill_interval.max(Duration::from_nanos(1)),
            state: Mutex::new(State { tokens: max_tokens, last_fill: now }),
        }
    }

    /// The bucket of a route's `localRateLimit` filter.
    pub fn from_model(l: &sinew_model::LocalRateLimit, now: Instant) -> Self {
        Self::new(l.max_tokens, l.tokens_per_fill, l.fill_interval.0, now)
    }

    /// Takes one token if there is one.
    pub fn try_take(&self, now: Instant) -> Admit {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.refill(&mut s, now);
        if s.tokens > 0 {
            s.tokens -= 1;
            return Admit::Allowed { remaining: s.tokens };
        }
        if self.tokens_per_fill == 0 || self.max_tokens == 0 {
            return Admit::Limited { retry_after: Duration::MAX };
        }
        let since_fill = now.saturating_duration_since(s.last_fill);
        Admit::Limited { retry_after: self.fill_interval.saturating_sub(since_fill) }
    }

    /// Time until the next fill, for the `x-ratelimit-reset` header (`Duration::MAX` when
    /// the bucket never fills).
    pub fn next_fill_in(&self, now: Instant) -> Duration {
        if self.tokens_per_fill == 0 || self.max_tokens == 0 {
            return Duration::MAX;
        }
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.refill(&mut s, now);
        self.fill_interval.saturating_sub(now.saturating_duration_since(s.last_fill))
    }

    /// The bucket size (`max_tokens`), for the `x-ratelimit-limit` header.
    pub fn limit(&self) -> u32 {
        self.max_tokens
    }

    /// Adds the tokens of every whole interval since the last fill and moves the fill clock on
    /// by those intervals, keeping the part of an interval already elapsed.
    fn refill(&self, s: &mut State, now: Instant) {
        let elapsed = now.saturating_duration_since(s.last_fill).as_nanos();
        let interval = self.fill_interval.as_nanos();
        let fills = elapsed / interval;
        if fills == 0 {
            return;
        }
        let added = fills.saturating_mul(u128::from(self.tokens_per_fill));
        let tokens = u128::from(s.tokens).saturating_add(added).min(u128::from(self.max_tokens));
        s.tokens = u32::try_from(tokens).unwrap_or(self.max_tokens);
        s.last_fill = now.checked_sub(nanos(elapsed % interval)).unwrap_or(now);
    }
}

/// A nanosecond count as a [`Duration`], saturating.
fn nanos(n: u128) -> Duration {
    let secs = u64::try_from(n / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 10^9, so it fits.
    Duration::new(secs, (n % 1_000_000_000) as u32)
}
