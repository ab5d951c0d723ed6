//! Load balancing over a destination's endpoints (P2C over EWMA latency, round robin, random
//! or consistent hashing) and circuit-breaking limits. Randomness is passed in as `u64` bits,
//! so picks are reproducible in tests; all state is atomics, so one balancer serves many tasks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Endpoint choice: P2C over EWMA latency (default), round robin, random, or consistent hashing
/// on a key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// Power of two choices: two random endpoints, the one with the lower
    /// `ewma_latency * (in_flight + 1)` wins.
    #[default]
    P2cEwma,
    /// Each endpoint in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Rendezvous hashing on the request's key (header, cookie or source address).
    ConsistentHash,
}

impl Algorithm {
    /// From a destination's `loadBalancer` (`consistentHash` and `simple` are exclusive);
    /// `LEAST_REQUEST` (and no block at all) is P2C over EWMA.
    pub fn from_model(lb: Option<&sinew_model::LoadBalancer>) -> Self {
        use sinew_model::LbAlgorithm;
        match lb {
            None => Self::P2cEwma,
            Some(lb) if lb.consistent_hash.is_some() => Self::ConsistentHash,
            Some(lb) => match lb.simple.unwrap_or_default() {
                LbAlgorithm::LeastRequest => Self::P2cEwma,
                LbAlgorithm::RoundRobin => Self::RoundRobin,
                LbAlgorithm::Random => Self::Random,
            },
        }
    }
}

/// The EWMA weight of a new latency sample: `ewma = 0.3 * sample + 0.7 * ewma`, so a change in
/// latency shows after a handful of requests while one slow request moves it little.
const EWMA_ALPHA: f64 = 0.3;
/// An endpoint's latency estimate decays toward zero with this time constant while no sample
/// arrives (Linkerd's peak-EWMA default): an endpoint that once looked slow, and so lost every
/// pick at low concurrency, gets tried again within seconds instead of never.
const DECAY_US: f64 = 10_000_000.0;
/// The EWMA of an endpoint never measured (a NaN bit pattern arithmetic never produces here).
const UNMEASURED: u64 = u64::MAX;
/// The least a failure counts for, in microseconds (10 ms).
const FAILURE_FLOOR: f64 = 10_000.0;
/// The most any sample counts for, in microseconds (a minute): estimates stay finite however
/// long an endpoint keeps failing.
const SAMPLE_CAP: f64 = 60_000_000.0;
/// Salt for the per-endpoint hash in rendezvous hashing.
const ENDPOINT_SALT: u64 = 0x5bd1_e995_9e37_79b9;

/// Microseconds since the first call in this process: the clock of every balancer, so stats
/// carried from one balancer to the next keep their meaning.
fn now_us() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64
}

#[derive(Debug)]
struct Stats {
    in_flight: AtomicU64,
    /// `f64` bits of the EWMA latency in microseconds, or [`UNMEASURED`].
    ewma_us: AtomicU64,
    /// When the EWMA last took a sample ([`now_us`]).
    updated_us: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            ewma_us: AtomicU64::new(UNMEASURED),
            updated_us: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// The latency estimate at `now`, decayed since its last sample; `None` if never measured.
    fn ewma_at(&self, now: u64) -> Option<f64> {
        let bits = self.ewma_us.load(Ordering::Relaxed);
        if bits == UNMEASURED {
            return None;
        }
        let idle = now.saturating_sub(self.updated_us.load(Ordering::Relaxed)) as f64;
        Some(f64::from_bits(bits) * (-idle / DECAY_US).exp())
    }
}

/// Picks endpoints `0..endpoints` of one destination; shared by every task sending to it.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    /// Per endpoint; shared with the next balancer for endpoints that stay, so requests in
    /// flight keep counting across an endpoint change.
    stats: Box<[Arc<Stats>]>,
    /// Stable per-endpoint ids for consistent hashing, so a key stays on its endpoint when
    /// others come and go.
    ids: Box<[u64]>,
    /// Round robin: where the next scan starts.
    next: AtomicUsize,
}

/// Counts a request in flight to one endpoint until dropped.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight {
    stats: Option<Arc<Stats>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(s) = &self.stats {
            s.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Balancer {
    /// A balancer over `endpoints` endpoints, none measured yet, identified by their index
    /// (see [`Balancer::with_ids`]).
    pub fn new(endpoints: usize, algorithm: Algorithm) -> Self {
        Self::with_ids((0..endpoints as u64).collect(), algorithm)
    }

    /// A balancer over endpoints with stable `ids` (a hash of each endpoint's name): with
    /// consistent hashing a key moves only when its own endpoint leaves, wherever the others
    /// sit in the list.
    pub fn with_ids(ids: Vec<u64>, algorithm: Algorithm) -> Self {
        let stats = ids.iter().map(|_| Arc::default()).collect();
        Self { algorithm, stats, ids: ids.into(), next: AtomicUsize::new(0) }
    }

    /// A balancer over endpoints with `ids` that takes over `old`'s state for endpoints that
    /// stay (`from_old[i]`: endpoint `i`'s index in `old`): their latency and their requests
    /// in flight, which go on counting for both.
    pub fn following(
        ids: Vec<u64>,
        algorithm: Algorithm,
        old: &Balancer,
        from_old: &[Option<usize>],
    ) -> Self {
        let stats = (0..ids.len())
            .map(|i| {
                from_old
                    .get(i)
                    .copied()
                    .flatten()
                    .and_then(|j| old.stats.get(j))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        Self { algorithm, stats, ids: ids.into(), next: AtomicUsize::new(0) }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The number of endpoints.
    pub fn len(&self) -> usize {
        self.stats.len()
    }

    /// Whether there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.stats.is_empty()
    }

    /// Requests in flight to `endpoint` (0 out of range).
    pub fn in_flight(&self, endpoint: usize) -> u64 {
        self.stats.get(endpoint).map_or(0, |s| s.in_flight.load(Ordering::Relaxed))
    }

    /// Picks an endpoint index, skipping those for which `skip(i)` is true (ejected); `rnd`
    /// random bits; `hash` the request's key for [`Algorithm::ConsistentHash`] (`None`: fall
    /// back to P2C). `None` when every endpoint is skipped or there are none.
    ///
    /// P2C: two distinct random candidates among the endpoints not skipped, the lower score
    /// wins (the first on a tie), score = `ewma_latency_us * (in_flight + 1)`, the EWMA decayed
    /// toward zero over idle time. An endpoint never measured scores 0 while it has nothing
    /// in flight (tried first), and as the slowest measured endpoint once it has (a new or
    /// hung endpoint does not draw every request). ConsistentHash: rendezvous (highest random
    /// weight) hashing over the endpoints not skipped, weight = splitmix64(hash ^
    /// splitmix64(id ^ salt)), so an endpoint leaving or skipped moves only its own keys.
    pub fn pick(&self, rnd: u64, hash: Option<u64>, skip: impl Fn(usize) -> bool) -> Option<usize> {
        self.pick_at(now_us(), rnd, hash, &skip)
    }

    fn pick_at(
        &self,
        now: u64,
        rnd: u64,
        hash: Option<u64>,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        match (self.algorithm, hash) {
            (Algorithm::RoundRobin, _) => self.round_robin(skip),
            (Algorithm::Random, _) => self.random(rnd, skip),
            (Algorithm::ConsistentHash, Some(h)) => self.rendezvous(h, skip),
            (Algorithm::P2cEwma | Algorithm::ConsistentHash, _) => self.p2c(now, rnd, skip),
        }
    }

    /// The endpoint for a try: as [`Balancer::pick`], but a retry (`last`: the endpoint the
    /// previous try failed on) goes to another endpoint when one is not skipped, as Envoy's
    /// `previous_hosts` retry predicate (on by default in Istio) does; with a hash that is
    /// the key's next endpoint (as Envoy's ring hash moves along the ring), and with nowhere
    /// else to go the retry goes back to `last`.
    pub fn pick_try(
        &self,
        rnd: u64,
        hash: Option<u64>,
        last: Option<usize>,
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let elsewhere = last.and_then(|last| self.pick(rnd, hash, |i| i == last || skip(i)));
        elsewhere.or_else(|| self.pick(rnd, hash, skip))
    }

    /// A request to `endpoint` started; the guard decrements in-flight on drop. An index out
    /// of range gives a guard that counts nothing.
    pub fn start(&self, endpoint: usize) -> InFlight {
        let stats = self.stats.get(endpoint).map(|s| {
            s.in_flight.fetch_add(1, Ordering::Relaxed);
            Arc::clone(s)
        });
        InFlight { stats }
    }

    /// Records a latency sample for `endpoint` (ignored out of range) into its EWMA with
    /// weight 0.3 for the new sample; the first sample is taken as is.
    pub fn observe(&self, endpoint: usize, latency: Duration) {
        self.observe_at(now_us(), endpoint, latency);
    }

    fn observe_at(&self, now: u64, endpoint: usize, latency: Duration) {
        self.observe_us(now, endpoint, latency.as_secs_f64() * 1e6);
    }

    fn observe_us(&self, now: u64, endpoint: usize, sample: f64) {
        let Some(s) = self.stats.get(endpoint) else { return };
        let sample = sample.min(SAMPLE_CAP);
        let ewma = match s.ewma_at(now) {
            None => sample,
            Some(decayed) => EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * decayed,
        };
        // Concurrent samples may overwrite each other: one sample lost, never a torn value.
        s.ewma_us.store(ewma.to_bits(), Ordering::Relaxed);
        s.updated_us.store(now, Ordering::Relaxed);
    }

    /// Records a failed try (5xx, reset, connect failure) at `endpoint` as a sample a quarter
    /// slower than the slowest endpoint measured (and at least [`FAILURE_FLOOR`]): an endpoint
    /// that fails fast (a crash-looping pod answering 503 in a millisecond) would otherwise
    /// look like the fastest and draw most of the traffic. It stays in the running, as under
    /// Envoy's least-request balancing; outlier detection is what takes it out.
    pub fn observe_failure(&self, endpoint: usize, latency: Duration) {
        let now = now_us();
        // Strictly slower than the slowest other endpoint: equal, the failing endpoint's
        // estimate, decayed a little less than a busy healthy one's, would keep winning the
        // ties. (Not counting its own estimate, which would compound with every failure.)
        let others = self
            .stats
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != endpoint)
            .filter_map(|(_, s)| s.ewma_at(now))
            .reduce(f64::max);
        let slowest = (others.unwrap_or(0.0) * 1.25).max(FAILURE_FLOOR);
        self.observe_us(now, endpoint, (latency.as_secs_f64() * 1e6).max(slowest));
    }

    /// The highest latency estimate among measured endpoints.
    fn slowest(&self, now: u64) -> Option<f64> {
        self.stats.iter().filter_map(|s| s.ewma_at(now)).reduce(f64::max)
    }

    fn unskipped<'a>(&self, skip: &'a dyn Fn(usize) -> bool) -> impl Iterator<Item = usize> + 'a {
        (0..self.stats.len()).filter(move |&i| !skip(i))
    }

    fn score(&self, now: u64, endpoint: usize) -> f64 {
        let Some(s) = self.stats.get(endpoint) else { return 0.0 };
        let in_flight = s.in_flight.load(Ordering::Relaxed);
        let latency = match s.ewma_at(now) {
            Some(l) => l,
            None if in_flight == 0 => return 0.0,
            // No sample yet but busy (new, or hung with no per-try timeout to end its
            // requests): as slow as the slowest, so its queue counts against it.
            None => self.slowest(now).unwrap_or(1.0),
        };
        latency * (in_flight as f64 + 1.0)
    }

    fn round_robin(&self, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.stats.len();
        if n == 0 {
            return None;
        }
        let mut chosen = None;
        // Move the cursor just past the endpoint chosen, so skipped endpoints do not give
        // double turns to the endpoints after them.
        let _ = self.next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
            let start = cur % n;
            chosen = (0..n).map(|j| (start + j) % n).find(|&i| !skip(i));
            chosen.map(|i| (i + 1) % n)
        });
        chosen
    }

    fn random(&self, rnd: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        let count = self.unskipped(skip).count();
        // `skip` may change between the scans when ejections race with the pick.
        self.unskipped(skip).nth(reduce(rnd, count)).or_else(|| self.unskipped(skip).next())
    }

    fn p2c(&self, now: u64, rnd: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        let count = self.unskipped(skip).count();
        if count < 2 {
            return self.unskipped(skip).next();
        }
        let a = reduce(rnd, count);
        let mut b = reduce(splitmix64(rnd), count - 1);
        if b >= a {
            b += 1;
        }
        let (ia, ib) = (self.unskipped(skip).nth(a), self.unskipped(skip).nth(b));
        match (ia, ib) {
            (Some(ia), Some(ib)) => {
                let better = self.score(now, ib) < self.score(now, ia);
                Some(if better { ib } else { ia })
            }
            (one, other) => one.or(other).or_else(|| self.unskipped(skip).next()),
        }
    }

    fn rendezvous(&self, hash: u64, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        self.unskipped(skip)
            .max_by_key(|&i| splitmix64(hash ^ splitmix64(self.ids[i] ^ ENDPOINT_SALT)))
    }

    /// Test support: [`Balancer::pick`] and [`Balancer::observe`] at a given time
    /// (microseconds on the balancers' clock), for decay without waiting.
    #[doc(hidden)]
    pub fn pick_at_for_test(&self, now_us: u64, rnd: u64) -> Option<usize> {
        self.pick_at(now_us, rnd, None, &|_| false)
    }

    /// See [`Balancer::pick_at_for_test`].
    #[doc(hidden)]
    pub fn observe_at_for_test(&self, now_us: u64, endpoint: usize, latency: Duration) {
        self.observe_at(now_us, endpoint, latency);
    }
}

/// Maps `rnd` uniformly onto `[0, n)` by multiply-shift (0 when `n` is 0).
fn reduce(rnd: u64, n: usize) -> usize {
    // The product shifted down is below n, so it fits back into usize.
    ((u128::from(rnd) * n as u128) >> 64) as usize
}

/// The splitmix64 finalizer: a bijective 64-bit mix with good avalanche.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash helper for consistent hashing keys: FNV-1a 64, stable across runs and platforms.
pub fn hash_key(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Circuit breaking: limits on connections, pending requests and requests in flight per
/// destination; a request is refused (the caller answers 503 with `x-sinew-overloaded`)
/// instead of queueing when a limit is reached. Counts are kept even without a limit.
#[derive(Debug)]
pub struct Limits {
    requests: Gate,
    pending: Gate,
    connections: Gate,
}

#[derive(Debug)]
struct Gate {
    max: Option<u32>,
    count: Arc<AtomicU32>,
}

impl Gate {
    fn new(max: Option<u32>) -> Self {
        Self { max, count: Arc::default() }
    }

    fn try_acquire(&self) -> Option<Slot> {
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| match self.max {
                Some(max) if c >= max => None,
                _ => c.checked_add(1),
            })
            .ok()
            .map(|_| Slot(Arc::clone(&self.count)))
    }

    fn current(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in flight, counted until dropped.
#[derive(Debug)]
#[must_use = "the request counts only while the permit lives"]
pub struct RequestPermit {
    _slot: Slot,
}

/// A request waiting for a connection, counted until dropped.
#[derive(Debug)]
#[must_use = "the pending request counts only while the permit lives"]
pub struct PendingPermit {
    _slot: Slot,
}

/// An open connection, counted until dropped.
#[derive(Debug)]
#[must_use = "the connection counts only while the permit lives"]
pub struct ConnectionPermit {
    _slot: Slot,
}

impl Limits {
    /// Limits on requests in flight, pending requests and connections; `None` is unlimited.
    pub fn new(
        max_requests: Option<u32>,
        max_pending: Option<u32>,
        max_connections: Option<u32>,
    ) -> Self {
        Self {
            requests: Gate::new(max_requests),
            pending: Gate::new(max_pending),
            connections: Gate::new(max_connections),
        }
    }

    /// From a destination's `connectionPool`; `None` or absent fields: unlimited.
    pub fn from_model(p: Option<&sinew_model::ConnectionPool>) -> Self {
        match p {
            None => Self::new(None, None, None),
            Some(p) => Self::new(p.max_requests, p.max_pending_requests, p.max_connections),
        }
    }

    /// A request may go out; `None` when `max_requests` are in flight.
    pub fn try_request(&self) -> Option<RequestPermit> {
        self.requests.try_acquire().map(|_slot| RequestPermit { _slot })
    }

    /// A request may wait for a connection; `None` when `max_pending` are waiting.
    pub fn try_pending(&self) -> Option<PendingPermit> {
        self.pending.try_acquire().map(|_slot| PendingPermit { _slot })
    }

    /// A connection may be opened; `None` when `max_connections` are open.
    pub fn try_connection(&self) -> Option<ConnectionPermit> {
        self.connections.try_acquire().map(|_slot| ConnectionPermit { _slot })
    }

    /// Requests in flight now.
    pub fn requests(&self) -> u32 {
        self.requests.current()
    }

    /// Requests pending now.
    pub fn pending(&self) -> u32 {
        self.pending.current()
    }

    /// Connections open now.
    pub fn connections(&self) -> u32 {
        self.connections.current()
    }
}
