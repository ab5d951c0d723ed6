//! Retry policy, backoff and budget.

use std::time::Duration;

use sinew_l7::retry::{Outcome, RetryBudget, RetryGuard, RetryPolicy};

mod common;
use common::XorShift;

/// Reserves retries until refused or `most` are held, holding them.
fn grab(budget: &RetryBudget, most: usize) -> Vec<RetryGuard> {
    std::iter::from_fn(|| budget.try_retry()).take(most).collect()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn model(codes: &[u16], attempts: Option<u32>, backoff: Option<u64>) -> sinew_model::Retry {
    sinew_model::Retry {
        codes: codes.to_vec(),
        attempts,
        backoff: backoff.map(|b| sinew_model::Duration(ms(b))),
    }
}

#[test]
fn types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<RetryPolicy>();
    check::<RetryBudget>();
    check::<sinew_l7::retry::RequestGuard>();
    check::<sinew_l7::retry::RetryGuard>();
}

#[test]
fn no_retry_block_is_istios_default_and_attempts_zero_retries_nothing() {
    let p = RetryPolicy::from_model(None);
    assert_eq!(p, RetryPolicy::mesh_default());
    for o in [Outcome::Status(503), Outcome::Grpc(14), Outcome::Grpc(1), Outcome::ConnectFailure] {
        assert!(p.should_retry(o, 1) && p.should_retry(o, 2), "{o:?}");
        assert!(!p.should_retry(o, 3), "{o:?}: 2 retries");
    }
    for o in [Outcome::Status(500), Outcome::Status(502), Outcome::Grpc(13), Outcome::Reset] {
        assert!(!p.should_retry(o, 1), "{o:?}");
    }
    let off = sinew_model::Retry { attempts: Some(0), ..Default::default() };
    let p = RetryPolicy::from_model(Some(&off));
    for o in [
        Outcome::Status(503),
        Outcome::Grpc(14),
        Outcome::Reset,
        Outcome::ConnectFailure,
        Outcome::Timeout,
    ] {
        assert!(!p.should_retry(o, 1), "{o:?}");
    }
}

#[test]
fn codes_and_attempts() {
    let p = RetryPolicy::from_model(Some(&model(&[503, 429], Some(3), None)));
    assert_eq!(p.attempts, 3);
    for attempt in 1..=3 {
        assert!(p.should_retry(Outcome::Status(503), attempt));
        assert!(p.should_retry(Outcome::Status(429), attempt));
    }
    assert!(!p.should_retry(Outcome::Status(503), 4));
    assert!(!p.should_retry(Outcome::Status(503), u32::MAX));
    assert!(p.should_retry(Outcome::Status(503), 0), "0 is read as the first try");
    for status in [200, 404, 500, 502, 504] {
        assert!(!p.should_retry(Outcome::Status(status), 1), "{status}");
    }
}

#[test]
fn resets_connect_failures_and_grpc_unavailable() {
    let p = RetryPolicy::from_model(Some(&model(&[500], Some(1), None)));
    assert!(p.should_retry(Outcome::Reset, 1));
    assert!(p.should_retry(Outcome::ConnectFailure, 1));
    assert!(p.should_retry(Outcome::Grpc(14), 1));
    assert!(!p.should_retry(Outcome::Grpc(0), 1));
    assert!(!p.should_retry(Outcome::Grpc(2), 1));
    assert!(!p.should_retry(Outcome::Reset, 2));
    assert!(!p.should_retry(Outcome::ConnectFailure, 2));
    assert!(!p.should_retry(Outcome::Grpc(14), 2));
}

#[test]
fn a_per_try_timeout_is_retried_as_504() {
    let without = RetryPolicy::from_model(Some(&model(&[503], None, None)));
    assert!(!without.should_retry(Outcome::Timeout, 1));
    let with = RetryPolicy::from_model(Some(&model(&[503, 504], None, None)));
    assert!(with.should_retry(Outcome::Timeout, 1));
}

#[test]
fn defaults() {
    let p = RetryPolicy::from_model(Some(&model(&[], None, None)));
    assert_eq!(p.attempts, 2);
    assert_eq!(p.codes, vec![503]);
    assert_eq!(p.grpc_codes, vec![1, 14], "CANCELLED and UNAVAILABLE, as Istio's retryOn");
    assert!(p.on_reset && p.on_connect_failure);
    assert_eq!((p.base_backoff, p.max_backoff), (ms(25), ms(250)));
    assert!(p.should_retry(Outcome::Status(503), 2));
    assert!(!p.should_retry(Outcome::Status(503), 3));

    let p = RetryPolicy::from_model(Some(&model(&[502], Some(0), Some(100))));
    assert_eq!((p.base_backoff, p.max_backoff), (ms(100), ms(1000)));
    assert!(!p.should_retry(Outcome::Status(502), 1), "attempts 0: no retries");
}

#[test]
fn backoff_stays_below_the_doubling_ceiling() {
    let p = RetryPolicy::from_model(Some(&model(&[503], None, Some(25))));
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for retry in 1..=12u32 {
        let ceiling = (ms(25) * 2u32.pow(retry - 1)).min(ms(250));
        let (mut lowest, mut highest, mut sum) = (Duration::MAX, Duration::ZERO, Duration::ZERO);
        for _ in 0..2000 {
            let b = p.backoff(retry, rng.next());
            assert!(b < ceiling, "retry {retry}: {b:?} >= {ceiling:?}");
            lowest = lowest.min(b);
            highest = highest.max(b);
            sum += b;
        }
        // Full jitter: the whole range is used, and the mean is about half the ceiling.
        assert!(lowest < ceiling / 20, "retry {retry}: lowest {lowest:?}");
        assert!(highest > ceiling * 19 / 20, "retry {retry}: highest {highest:?}");
        let mean = sum / 2000;
        assert!(mean > ceiling * 2 / 5 && mean < ceiling * 3 / 5, "retry {retry}: mean {mean:?}");
    }
}

#[test]
fn backoff_grows_then_caps() {
    let p = RetryPolicy::from_model(Some(&model(&[503], None, Some(25))));
    let top = |retry| p.backoff(retry, u64::MAX);
    let one_ns = Duration::from_nanos(1);
    assert_eq!(top(1), ms(25) - one_ns);
    assert_eq!(top(2), ms(50) - one_ns);
    assert_eq!(top(3), ms(100) - one_ns);
    assert_eq!(top(4), ms(200) - one_ns);
    for retry in [5, 6, 31, 32, 33, 1000, u32::MAX] {
        assert_eq!(top(retry), ms(250) - one_ns, "retry {retry}");
    }
    assert_eq!(top(0), top(1), "0 is read as the first retry");
    assert_eq!(p.backoff(3, 0), Duration::ZERO);
}

#[test]
fn backoff_saturates() {
    let huge = RetryPolicy {
        base_backoff: Duration::MAX,
        max_backoff: Duration::MAX,
        ..RetryPolicy::none()
    };
    let mut rng = XorShift(7);
    for retry in [0, 1, 2, 64, u32::MAX] {
        assert!(huge.backoff(retry, rng.next()) <= Duration::from_nanos(u64::MAX));
    }
    let zero = RetryPolicy { base_backoff: Duration::ZERO, ..RetryPolicy::none() };
    assert_eq!(zero.backoff(10, u64::MAX), Duration::ZERO);
}

#[test]
fn budget_allows_min_concurrent_then_the_ratio() {
    let budget = RetryBudget::new(0.2, 3);
    let _one = budget.request_started();
    let retries = grab(&budget, 10);
    assert_eq!(retries.len(), 3, "min_concurrent with one request in flight");
    drop(retries);
    assert_eq!(budget.active_retries(), 0);

    let requests: Vec<_> = (0..99).map(|_| budget.request_started()).collect();
    assert_eq!(budget.active_requests(), 100);
    let mut retries = grab(&budget, 50);
    assert_eq!(retries.len(), 20, "20 % of 100 requests");

    // A retry that ends frees its place.
    retries.pop();
    assert!(budget.try_retry().is_some_and(|r| {
        retries.push(r);
        true
    }));
    assert!(budget.try_retry().is_none());

    // Fewer requests in flight: the budget shrinks to the floor, and the retries already
    // out count against it.
    drop(requests);
    assert!(budget.try_retry().is_none());
    retries.truncate(2);
    assert!(budget.try_retry().is_some());
}

#[test]
fn default_budget_and_odd_ratios() {
    let d = RetryBudget::default();
    let _r: Vec<_> = (0..10).map(|_| d.request_started()).collect();
    assert_eq!(grab(&d, 10).len(), 3);

    for ratio in [f64::NAN, -1.0, 0.0] {
        let b = RetryBudget::new(ratio, 1);
        let _r: Vec<_> = (0..100).map(|_| b.request_started()).collect();
        assert_eq!(grab(&b, 10).len(), 1, "{ratio}");
    }
    let b = RetryBudget::new(f64::INFINITY, 0);
    assert!(b.try_retry().is_none(), "no requests: inf * 0 is NaN, read as 0");
    let _r = b.request_started();
    assert_eq!(grab(&b, 100).len(), 100);
}

#[test]
fn budget_under_concurrency() {
    let budget = RetryBudget::new(0.1, 0);
    let _requests: Vec<_> = (0..1000).map(|_| budget.request_started()).collect();
    let barrier = std::sync::Barrier::new(4);
    let granted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let held: Vec<_> = (0..100).filter_map(|_| budget.try_retry()).collect();
                    // Every thread holds its retries until all have asked.
                    barrier.wait();
                    held.len()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(granted, 100);
    assert_eq!(budget.active_retries(), 0);
}

#[test]
fn resets_are_retried_only_for_idempotent_methods() {
    let p = RetryPolicy::from_model(Some(&model(&[], None, None)));
    for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
        assert!(p.should_retry_request(Outcome::Reset, 1, m), "{m}");
    }
    for m in ["POST", "PATCH", "CONNECT", "get"] {
        assert!(!p.should_retry_request(Outcome::Reset, 1, m), "{m}");
        // Outcomes where the backend answered or was never reached are retried as before.
        assert!(p.should_retry_request(Outcome::Status(503), 1, m), "{m}");
        assert!(p.should_retry_request(Outcome::ConnectFailure, 1, m), "{m}");
        assert!(p.should_retry_request(Outcome::Grpc(14), 1, m), "{m}");
    }
}
