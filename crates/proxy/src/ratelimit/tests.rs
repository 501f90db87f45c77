use std::{collections::BTreeMap, time::Duration};

use super::*;

fn rate(requests: u32, per_s: u64, burst: u32) -> Rate {
    Rate {
        requests,
        per: Duration::from_secs(per_s),
        burst,
    }
}

fn limiter(total: Vec<Rate>, per_caller: Vec<Rate>) -> RateLimiter {
    RateLimiter::new(RateLimit {
        policy: "test/p".into(),
        route: None,
        matches: Vec::new(),
        shadow: false,
        total,
        per_caller,
        overrides: BTreeMap::new(),
    })
}

const S: u64 = 1_000_000_000;

fn allowed(l: &RateLimiter, caller: &str, n: usize, at: u64) -> usize {
    (0..n)
        .filter(|_| l.check_at(Caller::Id(caller), at) == Decision::Allow)
        .count()
}

#[test]
fn a_caller_over_its_share_drains_nobody_elses() {
    // 5 a minute each, 8 a minute in all.
    let l = limiter(vec![rate(8, 60, 8)], vec![rate(5, 60, 5)]);
    assert_eq!(allowed(&l, "ns/a", 20, S), 5, "a gets its share");
    // a's 15 refused requests took nothing from the total: b gets the 3 left.
    assert_eq!(allowed(&l, "ns/b", 10, S), 3);
    match l.check_at(Caller::Id("ns/c"), S) {
        Decision::Limited { scope, .. } => assert_eq!(scope, Over::Total),
        d => panic!("{d:?}"),
    }
    match l.check_at(Caller::Id("ns/a"), S) {
        Decision::Limited {
            scope,
            retry_after_ns,
            ..
        } => {
            assert_eq!(scope, Over::Caller);
            // Its next request fits 12 s on (60 s / 5).
            assert!(retry_after_ns <= 12 * S, "{retry_after_ns}");
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn burst_and_both_windows_hold() {
    // 10 a second with bursts of 2, and 20 a minute.
    let l = limiter(vec![], vec![rate(10, 1, 2), rate(20, 60, 20)]);
    assert_eq!(allowed(&l, "x", 5, 0), 2, "a burst of 2");
    // A tenth of a second later, one more.
    assert_eq!(allowed(&l, "x", 5, S / 10), 1);
    // Over the next 10 s at 10 a second, the minute's limit holds: its burst of 20, and one
    // more every 3 s (60 s / 20) as it refills: 23, not the hundred the second's allows.
    let mut n = 3;
    for i in 2..100 {
        n += allowed(&l, "x", 1, i * S / 10);
    }
    assert_eq!(n, 23, "20 a minute, with its refill");
}

#[test]
fn overrides_give_an_identity_its_own_share() {
    let mut cfg = limiter(vec![], vec![rate(2, 60, 2)]).cfg;
    cfg.overrides
        .insert("ns/vip".into(), vec![rate(50, 60, 50)]);
    let l = RateLimiter::new(cfg);
    assert_eq!(allowed(&l, "spiffe://td/ns/ns/sa/vip", 60, 0), 50);
    assert_eq!(allowed(&l, "spiffe://td/ns/ns/sa/other", 10, 0), 2);
    // Not a prefix or a suffix of another identity's.
    assert_eq!(allowed(&l, "spiffe://td/ns/ns/sa/xvip", 10, 0), 2);
    assert_eq!(allowed(&l, "spiffe://td/ns/xns/sa/vip", 10, 0), 2);
}

#[test]
fn memory_is_bounded_whatever_the_number_of_callers() {
    let l = limiter(vec![], vec![rate(1, 1, 1)]);
    // Many callers at once, each owing: beyond the cap they share the overflow bucket.
    for i in 0..(CALLERS + 500) {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
        l.check_at(Caller::Ip(ip.into()), 0);
    }
    assert_eq!(l.callers(), CALLERS);
    // A second later every one owes nothing: the table makes room again.
    assert_eq!(l.check_at(Caller::Id("ns/new"), 2 * S), Decision::Allow);
    assert!(l.callers() < 10, "{}", l.callers());
}
