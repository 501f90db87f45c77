use super::*;

fn side(requests: u64, failures: u64, median: f64, tail: f64) -> Side {
    Side {
        requests,
        failures,
        latency_ms: Some(tail),
        median_ms: Some(median),
        slower: 0,
    }
}

/// A canary's side with `slower` of its `requests` over the latency allowed.
fn slow(requests: u64, median: f64, tail: f64, slower: u64) -> Side {
    Side {
        slower,
        ..side(requests, 0, median, tail)
    }
}

fn none() -> Share {
    Share::default()
}

fn spec(min: u32) -> RolloutAnalysis {
    RolloutAnalysis {
        min_requests: min,
        ..Default::default()
    }
}

#[test]
fn a_clear_error_regression_fails_at_once_even_early_and_below_the_sample() {
    // 20 % of the canary's answers fail; the stable's do not.
    let stable = side(400, 0, 2.0, 5.0);
    let (v, why) = judge(&spec(200), &side(30, 6, 2.0, 5.0), &stable, &none(), false);
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(why.contains("6 of 30"), "{why}");
    // Two failures in ten is not yet clear: it holds.
    let (v, _) = judge(&spec(200), &side(10, 2, 2.0, 5.0), &stable, &none(), false);
    assert_eq!(v, Verdict::Hold);
    // Nor is a canary failing as often as the stable version (and short of the sample).
    let (v, _) = judge(
        &spec(200),
        &side(100, 2, 2.0, 5.0),
        &side(400, 8, 2.0, 5.0),
        &none(),
        true,
    );
    assert_eq!(v, Verdict::Hold);
}

#[test]
fn a_step_holds_without_enough_traffic_and_passes_with_it() {
    let stable = side(1000, 1, 2.0, 6.0);
    let (v, why) = judge(&spec(200), &side(50, 0, 2.0, 6.0), &stable, &none(), true);
    assert_eq!(v, Verdict::Hold);
    assert!(
        why.contains("not enough traffic") && why.contains("50 of the 200"),
        "{why}"
    );
    // No traffic at all: holds, never passes (Flagger's "keeps advancing" is what this
    // avoids).
    let (v, _) = judge(
        &spec(200),
        &Side::default(),
        &Side::default(),
        &none(),
        true,
    );
    assert_eq!(v, Verdict::Hold);
    let (v, why) = judge(&spec(200), &side(250, 1, 2.0, 7.0), &stable, &none(), true);
    assert_eq!(v, Verdict::Pass, "{why}");
    // Before its interval, even a full sample holds.
    let (v, _) = judge(&spec(200), &side(250, 1, 2.0, 7.0), &stable, &none(), false);
    assert_eq!(v, Verdict::Hold);
}

#[test]
fn an_error_rate_over_the_margin_fails_at_the_end_of_the_step() {
    // 3 % against 1 %: not clear at 99 % with 250 requests, but over the 1-point margin.
    let (v, why) = judge(
        &spec(200),
        &side(250, 8, 2.0, 5.0),
        &side(1000, 10, 2.0, 5.0),
        &none(),
        true,
    );
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(why.contains("more than 1 points"), "{why}");
}

#[test]
fn a_slow_canary_fails_on_latency() {
    let stable = side(1000, 0, 3.0, 10.0);
    // Its median over the stable's p99 × 1.5 + 5 ms: clear, at once.
    let (v, why) = judge(
        &spec(200),
        &side(25, 0, 205.0, 260.0),
        &stable,
        &none(),
        false,
    );
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(why.contains("clearly slower"), "{why}");
    // Only its tail slower (12 of 300 over 20 ms, 4 %): judged at the end of the step.
    let tail = slow(300, 3.0, 40.0, 12);
    assert_eq!(
        judge(&spec(200), &tail, &stable, &none(), false).0,
        Verdict::Hold
    );
    let (v, why) = judge(&spec(200), &tail, &stable, &none(), true);
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(
        why.contains("12 of the canary's 300 requests took over 20.0 ms")
            && why.contains("more than the 1 % its p99 allows")
            && why.contains("p99 40.0 ms"),
        "{why}"
    );
    // Within the ratio and the slack: passes.
    let (v, _) = judge(&spec(200), &side(300, 0, 3.0, 19.0), &stable, &none(), true);
    assert_eq!(v, Verdict::Pass);
}

#[test]
fn wilson_bounds() {
    let (lo, hi) = wilson(0, 400);
    assert_eq!(lo, 0.0);
    assert!(hi > 0.0 && hi < 0.02, "{hi}");
    let (lo, hi) = wilson(6, 30);
    assert!(lo > 0.05 && lo < 0.1 && hi > 0.4 && hi < 0.5, "{lo} {hi}");
    assert_eq!(wilson(0, 0), (0.0, 1.0));
}

/// The callers' side: `requests` through the rules, `unreached` of them failed toward the
/// canary (connect_refused).
fn share(weight: u32, requests: u64, unreached: u64) -> Share {
    let mut routed = Routed {
        requests,
        pool: requests as f64,
        ..Default::default()
    };
    if unreached > 0 {
        routed
            .unreached
            .insert(FailureClass::ConnectRefused, unreached);
    }
    Share {
        weight,
        copies: false,
        routed,
    }
}

#[test]
fn a_canary_that_answers_little_of_the_share_it_was_sent_is_not_reached() {
    let stable = side(900, 0, 2.0, 6.0);
    // 10 % of 1,000 requests were meant for it; it answered none, its callers' 100 failed.
    let (v, why) = judge(
        &spec(20),
        &Side::default(),
        &stable,
        &share(10, 1000, 100),
        true,
    );
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(
        why.contains("not reached")
            && why.contains("answered 0 requests")
            && why.contains("~100")
            && why.contains("connect_refused 100"),
        "{why}"
    );
    assert!(why.contains("its weight of 10 %"), "{why}");
    // In the dark stage the share is the copies' (the canary answers none of them).
    let (v, why) = judge(
        &spec(20),
        &Side::default(),
        &stable,
        &Share {
            copies: true,
            ..share(10, 1000, 100)
        },
        true,
    );
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(
        why.contains("where copies of 10 % of the callers' 1000 sent it ~100"),
        "{why}"
    );
    // Not before its interval: the weights may still be on their way to the callers.
    let (v, _) = judge(
        &spec(20),
        &Side::default(),
        &stable,
        &share(10, 1000, 100),
        false,
    );
    assert_eq!(v, Verdict::Hold);
    // Its share smaller than the sample a step needs: no conclusion, it holds.
    let (v, why) = judge(
        &spec(200),
        &side(0, 0, 2.0, 6.0),
        &stable,
        &share(10, 1000, 0),
        true,
    );
    assert_eq!(v, Verdict::Hold, "{why}");
    // It answered a good part of its share (a report still on its way): holds for the
    // sample, never fails on the shortfall.
    let (v, why) = judge(
        &spec(200),
        &side(60, 0, 2.0, 6.0),
        &stable,
        &share(10, 1500, 0),
        true,
    );
    assert_eq!(v, Verdict::Hold, "{why}");
    assert!(why.contains("not enough traffic"), "{why}");
    // No traffic at all: holds, as before.
    let (v, _) = judge(
        &spec(20),
        &Side::default(),
        &Side::default(),
        &share(10, 0, 0),
        true,
    );
    assert_eq!(v, Verdict::Hold);
}

#[test]
fn a_tail_is_slower_only_with_enough_slow_requests_to_show_it() {
    // The stable's p99 2 ms: 8 ms allowed. A few dozen canary requests, so the canary's p99
    // is its slowest request or two: one slow one (a busy host) does not fail a good canary.
    let stable = side(400, 0, 1.0, 2.0);
    let (v, why) = judge(&spec(20), &slow(25, 1.0, 30.0, 1), &stable, &none(), true);
    assert_eq!(v, Verdict::Pass, "{why}");
    assert!(
        why.contains("p99 30.0 ms against 2.0 ms (1 of 25 requests over 8.0 ms: too few"),
        "{why}"
    );
    // Four of 25 (16 %) could be one pause of its process: not yet.
    let (v, why) = judge(&spec(20), &slow(25, 1.0, 30.0, 4), &stable, &none(), true);
    assert_eq!(v, Verdict::Pass, "{why}");
    // Six of 25 is a slower tail.
    let (v, why) = judge(&spec(20), &slow(25, 1.0, 30.0, 6), &stable, &none(), true);
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(
        why.contains("6 of the canary's 25 requests took over 8.0 ms"),
        "{why}"
    );
    // With many requests the fraction must be clearly over the 1 % p99 allows: 1.25 % of
    // 2,000 may be chance, 2.25 % is not.
    let (v, why) = judge(&spec(20), &slow(2000, 1.0, 9.0, 25), &stable, &none(), true);
    assert_eq!(v, Verdict::Pass, "{why}");
    let (v, why) = judge(&spec(20), &slow(2000, 1.0, 9.0, 45), &stable, &none(), true);
    assert_eq!(v, Verdict::Fail, "{why}");
    // At p90, a tenth of the requests may be over: 15 of 100 is not clearly more, 25 is.
    let p90 = RolloutAnalysis {
        latency_percentile: 90.0,
        ..spec(20)
    };
    let stable = side(400, 0, 1.0, 2.0);
    let (v, why) = judge(&p90, &slow(100, 1.0, 9.0, 15), &stable, &none(), true);
    assert_eq!(v, Verdict::Pass, "{why}");
    let (v, why) = judge(&p90, &slow(100, 1.0, 9.0, 25), &stable, &none(), true);
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(why.contains("more than the 10 % its p90 allows"), "{why}");
}

#[test]
fn a_weight_divides_the_share_the_stable_had_not_every_request_of_the_rule() {
    // A rule that sends half its requests to another backend: of 1,000, 500 are the
    // stable's and the canary's, and 10 % of those (~50) the canary's. It answered 20: it
    // is reached (10 % of all 1,000 would be 100, and 20 under a quarter of that), and a
    // short sample holds.
    let stable = side(450, 0, 2.0, 6.0);
    let half = Share {
        routed: Routed {
            requests: 1000,
            pool: 500.0,
            ..Default::default()
        },
        ..share(10, 1000, 0)
    };
    let (v, why) = judge(&spec(100), &side(20, 0, 2.0, 6.0), &stable, &half, true);
    assert_eq!(v, Verdict::Hold, "{why}");
    assert!(why.contains("not enough traffic"), "{why}");
    // Answering none of its ~50 is not being reached, said with the share it was sent.
    let (v, why) = judge(&spec(20), &Side::default(), &stable, &half, true);
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(
        why.contains("its weight of 10 % of the ~500 of the callers' 1000 requests that the stable and the canary share sent it ~50"),
        "{why}"
    );
    // Copies are of every request through the rule.
    let copies = Share {
        copies: true,
        ..half
    };
    let (v, why) = judge(&spec(20), &Side::default(), &stable, &copies, true);
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(
        why.contains("copies of 10 % of the callers' 1000 sent it ~100"),
        "{why}"
    );
}
