//! Outlier detection in virtual time.

use std::time::{Duration, Instant};

use sinew_l7::outlier::OutlierDetector;

const SECOND: Duration = Duration::from_secs(1);

fn fail(d: &OutlierDetector, endpoint: usize, times: u32, now: Instant) {
    for _ in 0..times {
        d.record(endpoint, false, now);
    }
}

#[test]
fn detector_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<OutlierDetector>();
}

#[test]
fn ejected_after_consecutive_errors_and_back_after_base_time() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(4, 5, SECOND * 30, 50);
    fail(&d, 1, 4, t0);
    assert!(!d.is_ejected(1, t0));
    d.record(1, false, t0);
    assert!(d.is_ejected(1, t0));
    assert_eq!(d.ejected_count(t0), 1);
    assert!(!d.is_ejected(0, t0));
    assert!(d.is_ejected(1, t0 + SECOND * 30 - Duration::from_nanos(1)));
    assert!(!d.is_ejected(1, t0 + SECOND * 30));
    assert_eq!(d.ejected_count(t0 + SECOND * 30), 0);
}

#[test]
fn each_ejection_lasts_longer() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(2, 3, SECOND * 10, 50);
    fail(&d, 0, 3, t0);
    let t1 = t0 + SECOND * 10;
    assert!(!d.is_ejected(0, t1));
    // Coming back resets the count: the next ejection needs a full run of failures.
    fail(&d, 0, 2, t1);
    assert!(!d.is_ejected(0, t1));
    d.record(0, false, t1);
    assert!(d.is_ejected(0, t1 + SECOND * 19));
    assert!(!d.is_ejected(0, t1 + SECOND * 20), "second ejection: twice the base");
    let t2 = t1 + SECOND * 20;
    fail(&d, 0, 3, t2);
    assert!(d.is_ejected(0, t2 + SECOND * 29));
    assert!(!d.is_ejected(0, t2 + SECOND * 30), "third ejection: three times the base");
}

#[test]
fn a_success_resets_the_count() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(2, 5, SECOND, 50);
    fail(&d, 0, 4, t0);
    d.record(0, true, t0);
    fail(&d, 0, 4, t0);
    assert!(!d.is_ejected(0, t0));
    d.record(0, false, t0);
    assert!(d.is_ejected(0, t0));
}

#[test]
fn results_while_ejected_are_ignored() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(2, 2, SECOND, 50);
    fail(&d, 0, 2, t0);
    fail(&d, 0, 10, t0 + Duration::from_millis(500));
    let back = t0 + SECOND;
    assert!(!d.is_ejected(0, back));
    d.record(0, false, back);
    assert!(!d.is_ejected(0, back), "late failures did not count");
}

#[test]
fn max_ejection_percent_caps_the_ejected() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(10, 1, SECOND, 20);
    for e in 0..10 {
        d.record(e, false, t0);
    }
    assert_eq!(d.ejected_count(t0), 2);
    assert!(d.is_ejected(0, t0) && d.is_ejected(1, t0));
    // A refused endpoint keeps its count and goes as soon as there is room.
    let t1 = t0 + SECOND;
    assert_eq!(d.ejected_count(t1), 0);
    d.record(9, false, t1);
    assert!(d.is_ejected(9, t1));
}

#[test]
fn one_ejection_is_allowed_when_the_percentage_rounds_to_zero() {
    let t0 = Instant::now();
    let d = OutlierDetector::new(3, 1, SECOND, 10);
    for e in 0..3 {
        d.record(e, false, t0);
    }
    assert_eq!(d.ejected_count(t0), 1);

    let lone = OutlierDetector::new(1, 1, SECOND, 10);
    lone.record(0, false, t0);
    assert!(!lone.is_ejected(0, t0), "a lone endpoint stays unless the cap is 100 %");
    let lone = OutlierDetector::new(1, 1, SECOND, 100);
    lone.record(0, false, t0);
    assert!(lone.is_ejected(0, t0));

    let all = OutlierDetector::new(4, 1, SECOND, 100);
    (0..4).for_each(|e| all.record(e, false, t0));
    assert_eq!(all.ejected_count(t0), 4);
    let none = OutlierDetector::new(4, 1, SECOND, 0);
    (0..4).for_each(|e| none.record(e, false, t0));
    assert_eq!(none.ejected_count(t0), 0);
}

#[test]
fn from_model_defaults_and_disabled() {
    let t0 = Instant::now();
    let off = OutlierDetector::from_model(3, None);
    fail(&off, 0, 100, t0);
    assert_eq!(off.ejected_count(t0), 0);

    let d = OutlierDetector::from_model(10, Some(&sinew_model::OutlierDetection::default()));
    fail(&d, 0, 4, t0);
    assert!(!d.is_ejected(0, t0));
    d.record(0, false, t0);
    assert!(d.is_ejected(0, t0 + SECOND * 29));
    assert!(!d.is_ejected(0, t0 + SECOND * 30));
    fail(&d, 1, 5, t0);
    assert!(!d.is_ejected(1, t0), "10 % of 10: one at a time");

    let o = sinew_model::OutlierDetection {
        consecutive_errors: Some(2),
        base_ejection_time: Some(sinew_model::Duration(SECOND)),
        max_ejection_percent: Some(250),
        ..Default::default()
    };
    let d = OutlierDetector::from_model(2, Some(&o));
    (0..2).for_each(|e| fail(&d, e, 2, t0));
    assert_eq!(d.ejected_count(t0), 2, "a percentage above 100 is 100");
    assert_eq!(d.ejected_count(t0 + SECOND), 0);
}

#[test]
fn odd_inputs_do_not_panic() {
    let t0 = Instant::now() + SECOND * 100;
    let d = OutlierDetector::new(2, 1, Duration::MAX, 100);
    d.record(7, false, t0);
    d.record(usize::MAX, true, t0);
    assert!(!d.is_ejected(7, t0));
    assert_eq!(d.ejected_count(t0), 0);
    d.record(0, false, t0);
    assert!(d.is_ejected(0, t0 - SECOND * 50), "an earlier now is still within the ejection");
    assert!(d.is_ejected(0, t0 + SECOND * 1_000_000));

    let empty = OutlierDetector::new(0, 1, SECOND, 100);
    empty.record(0, false, t0);
    assert_eq!(empty.ejected_count(t0), 0);
    let disabled = OutlierDetector::new(2, 0, SECOND, 100);
    fail(&disabled, 0, 10, t0);
    assert_eq!(disabled.ejected_count(t0), 0);
}

#[test]
fn an_ejection_lasts_at_most_five_minutes() {
    let d = OutlierDetector::new(2, 1, SECOND * 30, 50);
    let mut t = Instant::now();
    // Eleven ejections in a row: 30 s, 60 s, ... would reach 330 s; the cap holds at 300 s.
    for n in 1..=11u32 {
        fail(&d, 0, 1, t);
        let lasts = (SECOND * 30 * n).min(SECOND * 300);
        assert!(d.is_ejected(0, t + lasts - Duration::from_nanos(1)), "ejection {n}");
        assert!(!d.is_ejected(0, t + lasts), "ejection {n}");
        t += lasts;
    }
}

#[test]
fn endpoints_that_stay_keep_their_state_across_a_change() {
    let t0 = Instant::now();
    let old = OutlierDetector::new(2, 2, SECOND * 30, 100);
    fail(&old, 1, 2, t0);
    fail(&old, 0, 1, t0);
    assert!(old.is_ejected(1, t0));
    // A new endpoint list: the ejected one is now index 0, the other index 2, index 1 new.
    let new = OutlierDetector::new(3, 2, SECOND * 30, 100);
    new.carry_over(&old, &[Some(1), None, Some(0)], t0);
    assert!(new.is_ejected(0, t0), "the ejection is not forgotten");
    assert!(!new.is_ejected(1, t0));
    fail(&new, 2, 1, t0);
    assert!(new.is_ejected(2, t0), "its earlier failure still counts");
}

#[test]
fn a_carried_over_ejection_past_the_cap_ends() {
    let t0 = Instant::now();
    let old = OutlierDetector::new(2, 1, SECOND * 30, 50);
    fail(&old, 0, 1, t0);
    assert!(old.is_ejected(0, t0));
    // Only the ejected endpoint remains: the cap (at most 50 %, so none of one) ends it.
    let new = OutlierDetector::new(1, 1, SECOND * 30, 50);
    new.carry_over(&old, &[Some(0)], t0);
    assert!(!new.is_ejected(0, t0), "some endpoint always remains");
}

#[test]
fn gateway_errors_and_an_applications_500s_count_apart() {
    use sinew_l7::outlier::Health;
    let t0 = Instant::now();
    let gateway_only = sinew_model::OutlierDetection {
        consecutive_5xx_errors: Some(0),
        consecutive_gateway_errors: Some(3),
        max_ejection_percent: Some(100),
        ..Default::default()
    };
    let d = OutlierDetector::from_model(2, Some(&gateway_only));
    // The application's own 500s never eject it here...
    (0..10).for_each(|_| d.record_health(0, Health::ServerError, t0));
    assert!(!d.is_ejected(0, t0));
    // ... and one breaks a run of gateway errors.
    for h in [Health::GatewayError, Health::GatewayError, Health::ServerError, Health::GatewayError]
    {
        d.record_health(1, h, t0);
    }
    assert!(!d.is_ejected(1, t0));
    (0..2).for_each(|_| d.record_health(1, Health::GatewayError, t0));
    assert!(d.is_ejected(1, t0), "three 502/503/504 in a row");

    // The default counts every 5xx (Istio's consecutive5xxErrors, 5).
    let d = OutlierDetector::from_model(
        2,
        Some(&sinew_model::OutlierDetection {
            max_ejection_percent: Some(100),
            ..Default::default()
        }),
    );
    (0..5).for_each(|_| d.record_health(0, Health::ServerError, t0));
    assert!(d.is_ejected(0, t0));
}

#[test]
fn grpc_and_http_statuses_read_as_envoy_maps_them() {
    use sinew_l7::outlier::Health;
    assert_eq!(Health::of_status(200), Health::Ok);
    assert_eq!(Health::of_status(404), Health::Ok);
    assert_eq!(Health::of_status(500), Health::ServerError);
    assert_eq!(Health::of_status(503), Health::GatewayError);
    // UNKNOWN, INTERNAL, DATA_LOSS: 500; UNIMPLEMENTED: 501; UNAVAILABLE: 503; DEADLINE: 504.
    for code in [2, 13, 15, 12] {
        assert_eq!(Health::of_grpc(code), Health::ServerError, "{code}");
    }
    assert_eq!(Health::of_grpc(14), Health::GatewayError);
    assert_eq!(Health::of_grpc(4), Health::GatewayError);
    for code in [0, 1, 3, 5, 7, 8, 16] {
        assert_eq!(Health::of_grpc(code), Health::Ok, "{code}");
    }
}
