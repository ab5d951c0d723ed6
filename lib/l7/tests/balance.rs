//! Load balancing and circuit-breaking limits, with deterministic randomness.

use std::collections::VecDeque;
use std::time::Duration;

use sinew_l7::balance::{Algorithm, Balancer, Limits, hash_key};

mod common;
use common::XorShift;

const NONE: fn(usize) -> bool = |_| false;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn types_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Balancer>();
    check::<sinew_l7::balance::InFlight>();
    check::<Limits>();
    check::<sinew_l7::balance::RequestPermit>();
    check::<sinew_l7::balance::PendingPermit>();
    check::<sinew_l7::balance::ConnectionPermit>();
}

#[test]
fn algorithm_from_model() {
    use sinew_model::{ConsistentHash, LbAlgorithm, LoadBalancer};
    assert_eq!(Algorithm::from_model(None), Algorithm::P2cEwma);
    let lb = |simple| LoadBalancer { simple: Some(simple), consistent_hash: None };
    assert_eq!(Algorithm::from_model(Some(&lb(LbAlgorithm::LeastRequest))), Algorithm::P2cEwma);
    assert_eq!(Algorithm::from_model(Some(&lb(LbAlgorithm::RoundRobin))), Algorithm::RoundRobin);
    assert_eq!(Algorithm::from_model(Some(&lb(LbAlgorithm::Random))), Algorithm::Random);
    let hashed = LoadBalancer {
        simple: None,
        consistent_hash: Some(ConsistentHash {
            http_header_name: Some("x-user".into()),
            http_cookie: None,
            use_source_ip: false,
        }),
    };
    assert_eq!(Algorithm::from_model(Some(&hashed)), Algorithm::ConsistentHash);
}

#[test]
fn round_robin_cycles_and_skips() {
    let b = Balancer::new(3, Algorithm::RoundRobin);
    let picks: Vec<_> = (0..7).map(|_| b.pick(0, None, NONE).unwrap()).collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    let picks: Vec<_> = (0..6).map(|_| b.pick(0, None, |i| i == 1).unwrap()).collect();
    assert_eq!(picks, [2, 0, 2, 0, 2, 0], "no double turn after a skipped endpoint");
    assert_eq!(b.pick(0, None, |i| i != 1), Some(1));
}

#[test]
fn random_covers_every_endpoint_evenly() {
    let b = Balancer::new(5, Algorithm::Random);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut counts = [0u32; 5];
    for _ in 0..10_000 {
        counts[b.pick(rng.next(), None, NONE).unwrap()] += 1;
    }
    assert!(counts.iter().all(|&c| (1600..2400).contains(&c)), "{counts:?}");

    let mut counts = [0u32; 5];
    for _ in 0..10_000 {
        counts[b.pick(rng.next(), None, |i| i % 2 == 0).unwrap()] += 1;
    }
    assert_eq!((counts[0], counts[2], counts[4]), (0, 0, 0));
    assert!(counts[1] > 4500 && counts[3] > 4500, "{counts:?}");
}

#[test]
fn p2c_prefers_the_faster_endpoint_under_load() {
    // Endpoint 0 answers in 1 ms, endpoint 1 in 5 ms; ten requests are in flight at a time.
    let b = Balancer::new(2, Algorithm::P2cEwma);
    let latency = [ms(1), ms(5)];
    let mut rng = XorShift(12345);
    let mut in_flight = VecDeque::new();
    let mut fast = 0;
    for _ in 0..10_000 {
        let e = b.pick(rng.next(), None, NONE).unwrap();
        fast += usize::from(e == 0);
        in_flight.push_back(b.start(e));
        b.observe(e, latency[e]);
        if in_flight.len() >= 10 {
            in_flight.pop_front();
        }
    }
    assert!(fast > 7_000, "fast endpoint chosen {fast} times out of 10,000");
    assert!(fast < 10_000, "the slow endpoint still gets some load");
}

#[test]
fn p2c_never_picks_the_worst_of_three() {
    let b = Balancer::new(3, Algorithm::P2cEwma);
    for (e, l) in [(0, 1), (1, 2), (2, 3)] {
        b.observe(e, ms(l));
    }
    let mut rng = XorShift(99);
    let mut counts = [0u32; 3];
    for _ in 0..10_000 {
        counts[b.pick(rng.next(), None, NONE).unwrap()] += 1;
    }
    // Two distinct candidates: the slowest never wins, the fastest wins 2/3 of the time.
    assert_eq!(counts[2], 0);
    assert!((6_200..7_100).contains(&counts[0]), "{counts:?}");
}

#[test]
fn p2c_weighs_in_flight_and_tries_unmeasured_first() {
    let b = Balancer::new(2, Algorithm::P2cEwma);
    b.observe(0, ms(1));
    let mut rng = XorShift(5);
    assert!((0..100).all(|_| b.pick(rng.next(), None, NONE) == Some(1)), "unmeasured first");
    b.observe(1, ms(1));
    let guards: Vec<_> = (0..3).map(|_| b.start(0)).collect();
    assert_eq!(b.in_flight(0), 3);
    assert!((0..100).all(|_| b.pick(rng.next(), None, NONE) == Some(1)));
    drop(guards);
    assert_eq!(b.in_flight(0), 0);
    let _busy = b.start(1);
    assert!((0..100).all(|_| b.pick(rng.next(), None, NONE) == Some(0)));
}

#[test]
fn p2c_with_one_endpoint_left_returns_it() {
    let b = Balancer::new(5, Algorithm::P2cEwma);
    (0..5).for_each(|e| b.observe(e, ms(e as u64 + 1)));
    let mut rng = XorShift(77);
    assert!((0..1000).all(|_| b.pick(rng.next(), None, |i| i != 4) == Some(4)));
    assert_eq!(Balancer::new(1, Algorithm::P2cEwma).pick(rng.next(), None, NONE), Some(0));
}

#[test]
fn consistent_hashing_is_stable() {
    let a = Balancer::new(8, Algorithm::ConsistentHash);
    let b = Balancer::new(8, Algorithm::ConsistentHash);
    let mut rng = XorShift(3);
    for user in 0..1000 {
        let key = hash_key(format!("user-{user}").as_bytes());
        let first = a.pick(rng.next(), Some(key), NONE);
        assert_eq!(a.pick(rng.next(), Some(key), NONE), first);
        assert_eq!(b.pick(rng.next(), Some(key), NONE), first, "same choice in a new balancer");
    }
}

#[test]
fn consistent_hashing_moves_only_the_skipped_endpoints_keys() {
    const N: usize = 10;
    let b = Balancer::new(N, Algorithm::ConsistentHash);
    let keys: Vec<u64> = (0..10_000).map(|k| hash_key(format!("10.0.{k}").as_bytes())).collect();
    let before: Vec<usize> = keys.iter().map(|&k| b.pick(0, Some(k), NONE).unwrap()).collect();
    let mut per_endpoint = [0u32; N];
    before.iter().for_each(|&e| per_endpoint[e] += 1);
    assert!(per_endpoint.iter().all(|&c| (700..1300).contains(&c)), "{per_endpoint:?}");

    let after: Vec<usize> = keys.iter().map(|&k| b.pick(0, Some(k), |i| i == 3).unwrap()).collect();
    let moved: Vec<usize> = (0..keys.len()).filter(|&i| before[i] != after[i]).collect();
    assert!(moved.len() < 2 * keys.len() / N, "{} of {} keys moved", moved.len(), keys.len());
    assert!(moved.iter().all(|&i| before[i] == 3), "only endpoint 3's keys move");
    assert!(after.iter().all(|&e| e != 3));
}

#[test]
fn consistent_hashing_without_a_key_falls_back_to_p2c() {
    let b = Balancer::new(3, Algorithm::ConsistentHash);
    b.observe(0, ms(1));
    b.observe(1, ms(2));
    b.observe(2, ms(3));
    let mut rng = XorShift(11);
    assert!((0..1000).all(|_| b.pick(rng.next(), None, NONE) != Some(2)));
}

#[test]
fn nothing_to_pick() {
    let mut rng = XorShift(1);
    for algorithm in
        [Algorithm::P2cEwma, Algorithm::RoundRobin, Algorithm::Random, Algorithm::ConsistentHash]
    {
        let b = Balancer::new(4, algorithm);
        assert_eq!(b.pick(rng.next(), Some(42), |_| true), None, "{algorithm:?}");
        assert_eq!(b.pick(rng.next(), None, |_| true), None, "{algorithm:?}");
        let empty = Balancer::new(0, algorithm);
        assert!(empty.is_empty());
        assert_eq!(empty.pick(rng.next(), Some(42), NONE), None, "{algorithm:?}");
        assert_eq!(empty.pick(u64::MAX, None, NONE), None, "{algorithm:?}");
    }
}

#[test]
fn out_of_range_endpoints_are_ignored() {
    let b = Balancer::new(2, Algorithm::P2cEwma);
    let guard = b.start(9);
    b.observe(9, ms(1));
    b.observe(0, Duration::MAX);
    assert_eq!(b.in_flight(9), 0);
    drop(guard);
    assert_eq!(b.in_flight(0), 0);
    assert_eq!(b.pick(u64::MAX, None, NONE), Some(1));
}

#[test]
fn hash_key_is_fnv1a_64() {
    assert_eq!(hash_key(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(hash_key(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(hash_key(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn limits_refuse_beyond_the_limit_and_release_on_drop() {
    let l = Limits::new(Some(2), Some(1), Some(3));
    let r1 = l.try_request().unwrap();
    let _r2 = l.try_request().unwrap();
    assert!(l.try_request().is_none());
    assert_eq!(l.requests(), 2);
    drop(r1);
    assert_eq!(l.requests(), 1);
    let _r3 = l.try_request().unwrap();

    let p = l.try_pending().unwrap();
    assert!(l.try_pending().is_none());
    drop(p);
    assert!(l.try_pending().is_some());
    assert_eq!(l.pending(), 0);

    let conns: Vec<_> = std::iter::from_fn(|| l.try_connection()).take(10).collect();
    assert_eq!(conns.len(), 3);
    drop(conns);
    assert_eq!(l.connections(), 0);
}

#[test]
fn limits_from_model() {
    let unlimited = Limits::from_model(None);
    let held: Vec<_> = (0..10_000).map(|_| unlimited.try_request().unwrap()).collect();
    assert_eq!(unlimited.requests(), 10_000);
    drop(held);

    let pool = sinew_model::ConnectionPool { max_requests: Some(1), ..Default::default() };
    let l = Limits::from_model(Some(&pool));
    let _r = l.try_request().unwrap();
    assert!(l.try_request().is_none());
    assert!(l.try_pending().is_some() && l.try_connection().is_some());
    let zero = Limits::new(Some(0), Some(0), Some(0));
    assert!(zero.try_request().is_none() && zero.try_pending().is_none());
    assert!(zero.try_connection().is_none());
}

#[test]
fn limits_hold_under_concurrency() {
    let l = Limits::new(Some(50), None, None);
    let barrier = std::sync::Barrier::new(4);
    let granted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let held: Vec<_> = (0..40).filter_map(|_| l.try_request()).collect();
                    barrier.wait();
                    held.len()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(granted, 50);
    assert_eq!(l.requests(), 0);
}

#[test]
fn an_endpoint_failing_fast_does_not_draw_the_traffic() {
    let b = Balancer::new(2, Algorithm::P2cEwma);
    // Endpoint 0 answers in 50 ms; endpoint 1 fails at once, every time.
    b.observe(0, ms(50));
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut to_failing = 0;
    for _ in 0..1000 {
        let i = b.pick(rng.next(), None, NONE).unwrap();
        if i == 1 {
            to_failing += 1;
            b.observe_failure(1, Duration::from_micros(500));
        } else {
            b.observe(0, ms(50));
        }
    }
    // Failures count as slow as the slowest healthy endpoint, so the failing one never looks
    // better: it gets at most its fair share (recorded as 0.5 ms successes, all of it).
    assert!(to_failing <= 600, "{to_failing} of 1000 went to the failing endpoint");

    // Against a 1 ms endpoint, failures count for at least 10 ms.
    let c = Balancer::new(2, Algorithm::P2cEwma);
    c.observe(0, ms(1));
    c.observe_failure(1, Duration::from_micros(100));
    let picks = (0..100).filter(|_| c.pick(rng.next(), None, NONE) == Some(1)).count();
    assert_eq!(picks, 0, "a 1 ms endpoint beats one whose only answer was a failure");
}

#[test]
fn endpoints_that_stay_keep_their_latency_across_a_change() {
    let old = Balancer::new(2, Algorithm::P2cEwma);
    old.observe(0, ms(1));
    old.observe(1, ms(100));
    // Same endpoints, listed the other way round.
    let new = Balancer::following(vec![1, 0], Algorithm::P2cEwma, &old, &[Some(1), Some(0)]);
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    assert!((0..50).all(|_| new.pick(rng.next(), None, NONE) == Some(1)), "the 1 ms one");
}

#[test]
fn requests_in_flight_count_across_an_endpoint_change() {
    let old = Balancer::new(2, Algorithm::P2cEwma);
    let held = old.start(0);
    let new = Balancer::following(vec![9, 0], Algorithm::P2cEwma, &old, &[None, Some(0)]);
    assert_eq!(new.in_flight(1), 1, "the old balancer's request counts for the new one");
    assert_eq!(new.in_flight(0), 0, "a new endpoint starts empty");
    drop(held);
    assert_eq!((new.in_flight(1), old.in_flight(0)), (0, 0));
}

#[test]
fn a_busy_endpoint_never_measured_does_not_draw_every_request() {
    // A hung endpoint (accepts, never answers, no per-try timeout) never gets a sample.
    let b = Balancer::new(2, Algorithm::P2cEwma);
    b.observe(0, ms(10));
    let _stuck: Vec<_> = (0..1000).map(|_| b.start(1)).collect();
    let mut rng = XorShift(77);
    let to_healthy = (0..100).filter(|_| b.pick(rng.next(), None, NONE) == Some(0)).count();
    assert!(to_healthy > 90, "{to_healthy} of 100 to the healthy endpoint");
}

#[test]
fn an_endpoint_that_once_looked_slow_is_tried_again_as_its_estimate_decays() {
    let b = Balancer::new(2, Algorithm::P2cEwma);
    let us = |s: u64| s * 1_000_000;
    b.observe_at_for_test(0, 0, ms(1));
    b.observe_at_for_test(0, 1, ms(4));
    // At low concurrency endpoint 0 wins every pick and endpoint 1 gets no new samples...
    assert_eq!(b.pick_at_for_test(us(1), 1), Some(0));
    // ... until endpoint 0 keeps being measured while 1's old estimate decays below it.
    let mut to_one = 0;
    for t in 1..=60u64 {
        match b.pick_at_for_test(us(t), t) {
            Some(0) => b.observe_at_for_test(us(t), 0, ms(1)),
            Some(1) => {
                to_one += 1;
                b.observe_at_for_test(us(t), 1, ms(1));
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(to_one > 10, "endpoint 1 picked {to_one} times in 60 s");
}

#[test]
fn consistent_hashing_keeps_keys_when_an_endpoint_joins_anywhere_in_the_list() {
    // Endpoints sorted by name: a new one can land first and shift every index.
    let before = Balancer::with_ids(
        vec![hash_key(b"b"), hash_key(b"c"), hash_key(b"d")],
        Algorithm::ConsistentHash,
    );
    let after = Balancer::with_ids(
        vec![hash_key(b"a"), hash_key(b"b"), hash_key(b"c"), hash_key(b"d")],
        Algorithm::ConsistentHash,
    );
    let mut moved = 0;
    for key in 0..10_000u64 {
        let old = before.pick(0, Some(key), NONE).unwrap();
        let new = after.pick(0, Some(key), NONE).unwrap();
        // Old index i is new index i + 1; a key may only move to the new endpoint.
        if new != old + 1 {
            assert_eq!(new, 0, "key {key} moved between two endpoints that stayed");
            moved += 1;
        }
    }
    assert!((2_000..3_000).contains(&moved), "{moved} of 10,000 keys went to the new endpoint");
}

#[test]
fn retries_go_to_another_endpoint_unless_alone() {
    let mut rng = XorShift(0x5EED);
    for algorithm in [Algorithm::P2cEwma, Algorithm::RoundRobin, Algorithm::Random] {
        let b = Balancer::new(3, algorithm);
        // P2C: the failed endpoint looks fastest, so only the rule keeps it from being
        // picked again.
        b.observe(1, ms(1));
        b.observe(0, ms(50));
        b.observe(2, ms(50));
        for _ in 0..200 {
            let first = b.pick_try(rng.next(), None, None, NONE).expect("an endpoint");
            let retry = b.pick_try(rng.next(), None, Some(first), NONE).expect("an endpoint");
            assert_ne!(retry, first, "{algorithm:?}");
            // With the others skipped (ejected), the retry goes back rather than nowhere.
            let skip_others = |i| i != first;
            assert_eq!(b.pick_try(rng.next(), None, Some(first), skip_others), Some(first));
        }
    }
    // One endpoint: the retry goes back to it.
    let alone = Balancer::new(1, Algorithm::P2cEwma);
    assert_eq!(alone.pick_try(rng.next(), None, Some(0), NONE), Some(0));
    // A consistent hash retries on the key's next endpoint (Envoy's ring hash moves along
    // the ring), the same one every time; without a hash it spreads like P2C.
    let hashed = Balancer::new(4, Algorithm::ConsistentHash);
    for key in 0..100u64 {
        let home = hashed.pick_try(rng.next(), Some(key), None, NONE);
        let next = hashed.pick_try(rng.next(), Some(key), home, NONE);
        assert_ne!(next, home);
        assert_eq!(hashed.pick_try(rng.next(), Some(key), home, NONE), next);
        let only_home = |i| Some(i) != home;
        assert_eq!(hashed.pick_try(rng.next(), Some(key), home, only_home), home);
        let first = hashed.pick_try(rng.next(), None, None, NONE).expect("an endpoint");
        assert_ne!(hashed.pick_try(rng.next(), None, Some(first), NONE), Some(first));
    }
}

#[test]
fn an_endpoint_failing_for_ever_keeps_a_finite_estimate() {
    // A backend down for good: every try fails, thousands of times.
    let b = Balancer::new(2, Algorithm::P2cEwma);
    b.observe(0, ms(1));
    for _ in 0..5_000 {
        b.observe_failure(1, ms(2));
        b.observe_failure(0, ms(2));
    }
    let mut rng = XorShift(3);
    assert!(b.pick(rng.next(), None, NONE).is_some(), "picks go on, nothing overflowed");
    // One endpoint alone failing: its estimate settles a quarter above the others', not
    // compounding, so a few successes bring it back.
    let c = Balancer::new(2, Algorithm::P2cEwma);
    c.observe(0, ms(20));
    for _ in 0..5_000 {
        c.observe_failure(1, ms(1));
    }
    let worse = (0..100).filter(|_| c.pick(rng.next(), None, NONE) == Some(1)).count();
    assert_eq!(worse, 0, "worse than the healthy one");
    for _ in 0..3 {
        c.observe(1, ms(1));
    }
    let back = (0..100).filter(|_| c.pick(rng.next(), None, NONE) == Some(1)).count();
    assert_eq!(back, 100, "three fast answers and it is the faster again");
}
