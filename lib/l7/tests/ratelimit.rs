//! Token bucket behaviour in virtual time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sinew_l7::ratelimit::{Admit, TokenBucket};

const SECOND: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn allowed(a: Admit) -> bool {
    matches!(a, Admit::Allowed { .. })
}

#[test]
fn bucket_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<TokenBucket>();
}

#[test]
fn burst_then_refill_per_interval() {
    let t0 = Instant::now();
    let b = TokenBucket::new(10, 2, SECOND, t0);
    for left in (0..10).rev() {
        assert_eq!(b.try_take(t0), Admit::Allowed { remaining: left });
    }
    assert_eq!(b.try_take(t0), Admit::Limited { retry_after: SECOND });
    // No fractional refill within an interval.
    assert_eq!(b.try_take(t0 + ms(999)), Admit::Limited { retry_after: ms(1) });
    // One whole interval: two tokens.
    assert_eq!(b.try_take(t0 + SECOND), Admit::Allowed { remaining: 1 });
    assert_eq!(b.try_take(t0 + SECOND), Admit::Allowed { remaining: 0 });
    assert_eq!(b.try_take(t0 + SECOND), Admit::Limited { retry_after: SECOND });
    // The fill clock keeps the elapsed part of an interval: 2.5 s is one more fill, and the
    // next comes at 3 s.
    assert_eq!(b.try_take(t0 + ms(2500)), Admit::Allowed { remaining: 1 });
    assert_eq!(b.try_take(t0 + ms(2500)), Admit::Allowed { remaining: 0 });
    assert_eq!(b.try_take(t0 + ms(2500)), Admit::Limited { retry_after: ms(500) });
    // Many intervals: capped at max_tokens.
    assert_eq!(b.try_take(t0 + SECOND * 100), Admit::Allowed { remaining: 9 });
}

#[test]
fn retry_after_counts_down_to_the_next_fill() {
    let t0 = Instant::now();
    let b = TokenBucket::new(1, 1, ms(100), t0);
    assert!(allowed(b.try_take(t0)));
    for elapsed in [0, 1, 30, 99] {
        assert_eq!(b.try_take(t0 + ms(elapsed)), Admit::Limited { retry_after: ms(100 - elapsed) });
    }
    assert_eq!(b.try_take(t0 + ms(100)), Admit::Allowed { remaining: 0 });
    assert_eq!(b.try_take(t0 + ms(150)), Admit::Limited { retry_after: ms(50) });
}

#[test]
fn time_going_backwards_is_no_time_passed() {
    let t0 = Instant::now() + SECOND * 10;
    let b = TokenBucket::new(1, 1, SECOND, t0);
    assert!(allowed(b.try_take(t0)));
    let earlier = t0 - SECOND * 5;
    assert_eq!(b.try_take(earlier), Admit::Limited { retry_after: SECOND });
    assert!(allowed(b.try_take(t0 + SECOND)));
}

#[test]
fn a_burst_is_limited_beyond_the_bucket() {
    let t0 = Instant::now();
    let b = TokenBucket::new(10, 1, SECOND, t0);
    let limited = (0..100).filter(|_| !allowed(b.try_take(t0))).count();
    assert_eq!(limited, 90);
}

#[test]
fn steady_overload_is_admitted_at_the_fill_rate() {
    // 100 requests a second for 10 s against 10 a second with a burst of 10.
    let t0 = Instant::now();
    let b = TokenBucket::new(10, 1, ms(100), t0);
    let limited = (0..1000u64).filter(|i| !allowed(b.try_take(t0 + ms(i * 10)))).count();
    // The burst of 10 plus one token per 100 ms for the 99 whole intervals up to 9.99 s.
    assert_eq!(limited, 1000 - 109);
}

#[test]
fn concurrent_takers_share_the_tokens() {
    let t0 = Instant::now();
    let b = Arc::new(TokenBucket::new(1000, 1, SECOND, t0));
    let admitted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| (0..500).filter(|_| allowed(b.try_take(t0))).count()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(admitted, 1000);
}

#[test]
fn from_model_and_limit() {
    let t0 = Instant::now();
    let l = sinew_model::LocalRateLimit {
        max_tokens: 3,
        tokens_per_fill: 3,
        fill_interval: sinew_model::Duration(ms(250)),
    };
    let b = TokenBucket::from_model(&l, t0);
    assert_eq!(b.limit(), 3);
    assert_eq!((0..5).filter(|_| allowed(b.try_take(t0))).count(), 3);
    assert_eq!(b.try_take(t0), Admit::Limited { retry_after: ms(250) });
    assert_eq!(b.try_take(t0 + ms(250)), Admit::Allowed { remaining: 2 });
}

#[test]
fn degenerate_buckets_do_not_panic() {
    let t0 = Instant::now();
    let never_fills = TokenBucket::new(1, 0, SECOND, t0);
    assert!(allowed(never_fills.try_take(t0)));
    assert_eq!(
        never_fills.try_take(t0 + SECOND * 1000),
        Admit::Limited { retry_after: Duration::MAX }
    );

    let empty = TokenBucket::new(0, 5, SECOND, t0);
    assert_eq!(empty.try_take(t0 + SECOND), Admit::Limited { retry_after: Duration::MAX });

    // A zero interval is one nanosecond: the bucket refills as soon as time moves.
    let instant = TokenBucket::new(1, 1, Duration::ZERO, t0);
    assert!(allowed(instant.try_take(t0)));
    assert_eq!(instant.try_take(t0), Admit::Limited { retry_after: Duration::from_nanos(1) });
    assert!(allowed(instant.try_take(t0 + ms(1))));

    let huge = TokenBucket::new(u32::MAX, u32::MAX, Duration::MAX, t0);
    assert_eq!(huge.try_take(t0 + SECOND), Admit::Allowed { remaining: u32::MAX - 1 });
    let fast = TokenBucket::new(u32::MAX, u32::MAX, Duration::from_nanos(1), t0);
    assert_eq!(fast.try_take(t0 + SECOND * 1_000_000), Admit::Allowed { remaining: u32::MAX - 1 });
}

#[test]
fn the_next_fill_is_known_for_the_reset_header() {
    let t0 = Instant::now();
    let b = TokenBucket::new(2, 1, SECOND, t0);
    assert_eq!(b.next_fill_in(t0), SECOND);
    assert_eq!(b.next_fill_in(t0 + ms(300)), ms(700));
    // Fills keep their clock: 2.3 s in, the next is 0.7 s away.
    assert_eq!(b.next_fill_in(t0 + ms(2300)), ms(700));
    let never = TokenBucket::new(2, 0, SECOND, t0);
    assert_eq!(never.next_fill_in(t0), Duration::MAX);
}
