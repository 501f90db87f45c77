use super::*;

fn state(estimate: f64) -> State {
    State {
        estimate,
        long_s: None,
        windows: 0,
        sum_s: 0.0,
        samples: 0,
        peak: 0,
        start: Instant::now(),
        min: 20,
        max: 1000,
        busy_s: 0.0,
        answered: 0,
        slow_run: 0,
    }
}

/// An application that serves `capacity` requests at once in `base` seconds each and
/// queues the rest: with `n` in flight, each takes `base × max(1, n / capacity)`.
fn service_time(base: f64, capacity: f64, n: f64) -> f64 {
    base * (n / capacity).max(1.0)
}

#[test]
fn under_a_flood_the_limit_settles_where_queueing_starts() {
    // Callers at the door grow from 10 to 400 and stay; the application serves 50 at once
    // in 10 ms and queues the rest.
    let mut s = state(100.0);
    let mut limits = Vec::new();
    // 800 windows: 80 s or more.
    for i in 0..800 {
        let door = (10.0 + f64::from(i)).min(400.0);
        let n = s.estimate.floor().min(door);
        s.peak = n as u32;
        limits.push(step(&mut s, service_time(0.010, 50.0, n)));
    }
    let settled = &limits[300..];
    let (lo, hi) = (
        *settled.iter().min().unwrap(),
        *settled.iter().max().unwrap(),
    );
    // At most 1.8× what the application serves at once (its time under 1.8× the unloaded
    // one: under the 2× the surge issue asks of the served p99), and not starved below it.
    assert!(
        lo >= 50 && hi <= 90,
        "settled between {lo} and {hi}: {:?}",
        &limits[..400]
    );
}

#[test]
fn a_small_application_queueing_far_below_the_starting_limit_brings_it_down() {
    // A VM that serves 4 at once in 20 ms, with 24 callers: in flight never reaches half of
    // the limit it starts with (100), but its time is 6× the unloaded one.
    let mut s = state(100.0);
    for _ in 0..20 {
        s.peak = 2;
        step(&mut s, service_time(0.020, 4.0, 2.0));
    }
    assert_eq!(s.estimate as u32, 100, "light load moves nothing");
    let mut limits = Vec::new();
    for _ in 0..100 {
        let n = s.estimate.floor().min(24.0);
        s.peak = n as u32;
        limits.push(step(&mut s, service_time(0.020, 4.0, n)));
    }
    // Down to its minimum (20) at once, and kept there: the queue is not learnt as normal.
    assert_eq!(limits[0], 20, "{limits:?}");
    assert!(limits.iter().all(|&l| l == 20), "{limits:?}");
    assert!(s.long_s.unwrap() < 0.025, "baseline {:?}", s.long_s);
    // Three windows in a row 1.5× slower than the baseline, far below the limit: a queue
    // that stays, the limit comes down; two, then a normal one, are jitter.
    let mut s = state(100.0);
    for _ in 0..20 {
        s.peak = 30;
        step(&mut s, 0.020);
    }
    for t in [0.030, 0.030, 0.020, 0.030, 0.030] {
        s.peak = 30;
        assert_eq!(step(&mut s, t), 100, "two slow windows in a row are jitter");
    }
    s.peak = 30;
    assert!(step(&mut s, 0.030) < 100, "the third brings the limit down");
    // A jittery but unqueued application (1.5× its time now and then) keeps its limit.
    let mut s = state(100.0);
    for i in 0..200 {
        s.peak = 3;
        let t = if i % 7 == 0 { 0.030 } else { 0.020 };
        assert_eq!(step(&mut s, t), 100);
    }
}

#[test]
fn it_grows_only_when_used_and_stays_within_its_bounds() {
    // Idle: app-limited, no growth.
    let mut s = state(100.0);
    for _ in 0..100 {
        s.peak = 5;
        assert_eq!(step(&mut s, 0.002), 100);
    }
    // Busy at the limit and fast: it grows, up to the maximum.
    s.max = 300;
    for _ in 0..2000 {
        s.peak = s.estimate as u32;
        step(&mut s, 0.002);
    }
    assert_eq!(s.estimate as u32, 300);
    // Much slower: it shrinks, at most by half a window, never below the minimum.
    let before = s.estimate;
    s.peak = 300;
    let after = step(&mut s, 0.2);
    assert!(
        f64::from(after) >= before * (1.0 - SMOOTHING * 0.5) - 1.0,
        "{before} → {after}"
    );
    for _ in 0..200 {
        s.peak = s.estimate as u32;
        step(&mut s, 0.2);
    }
    assert!(
        s.estimate as u32 >= 20 && s.estimate < 300.0,
        "{}",
        s.estimate
    );
}

#[test]
fn requests_over_the_limit_are_shed_and_counted() {
    let a = Arc::new(Adaptive::default());
    a.bound(20, 20);
    let held: Vec<Permit> = (0..20)
        .map(|_| a.admit().expect("within the limit"))
        .collect();
    assert!(a.admit().is_none(), "the 21st is shed");
    assert_eq!(a.figures(), (20, 20, 1));
    drop(held);
    assert_eq!(a.figures().1, 0, "permits give their place back");
    assert!(a.admit().is_some());
}

#[test]
fn the_load_exchange_counts_every_request_that_was_in_flight() {
    // Answered or not (a request that timed out was in flight all along), each request's
    // time counts towards the load; only answered ones are samples of the application.
    let a = Arc::new(Adaptive::default());
    let p = a.admit().unwrap();
    p.done(Duration::from_millis(300), true, Instant::now());
    let p = a.admit().unwrap();
    p.done(Duration::from_millis(700), false, Instant::now());
    let (busy, answered) = a.take_busy();
    assert!((busy - 1.0).abs() < 1e-9, "{busy}");
    assert_eq!(answered, 1);
    assert_eq!(a.take_busy(), (0.0, 0), "taken");
}
