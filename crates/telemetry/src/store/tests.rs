use super::*;
use crate::{
    report::{Histogram as WireHist, Latency, Report, Series},
    view::{self, Kind, Selector},
};

const NOW: u64 = 1_000_000_000;

fn series(service: &str, peer: &str, class: &str, n: u64) -> Series {
    Series {
        direction: 0,
        protocol: 0,
        service: service.into(),
        route: "default".into(),
        peer_workload: peer.into(),
        peer_identity: format!("spiffe://t/ns/shop/sa/{peer}"),
        peer_environment: "vm".into(),
        peer_locality: "r/z".into(),
        endpoint: "127.0.0.2:15006".into(),
        mtls: true,
        class: class.into(),
        status_class: if class == "ok" { 2 } else { 5 },
        requests: n,
        attempts: n,
        ..Default::default()
    }
}

/// The latency group of `s`: `n` requests of `latency_s` seconds.
fn latency(s: &Series, n: u64, latency_s: f64) -> Latency {
    let mut h = Histogram::default();
    for _ in 0..n {
        h.record(latency_s);
    }
    Latency {
        direction: s.direction,
        service: s.service.clone(),
        peer_workload: s.peer_workload.clone(),
        histogram: Some(WireHist::from(&h)),
    }
}

fn report(workload: &str, run: u64, seq: u64, start: u64, series: Vec<Series>) -> Report {
    let latencies = series
        .iter()
        .map(|s| latency(s, s.requests, 0.01))
        .collect();
    Report {
        latencies,
        workload: workload.into(),
        node: "n1".into(),
        environment: "container".into(),
        locality: "r/z".into(),
        run,
        seq,
        start_ms: start,
        period_ms: 10_000,
        series,
        folded: 0,
        ..Default::default()
    }
}

fn all(s: &Store, window: u64) -> Window {
    s.window(NOW, window, |_| true, |_| true)
}

fn total(s: &Store, window: u64) -> u64 {
    all(s, window).series.iter().map(|(_, c)| c.requests).sum()
}

#[test]
fn reports_add_up_and_a_resent_one_is_not_counted_twice() {
    let mut s = Store::new(Limits::default());
    let r1 = report(
        "shop/web",
        7,
        1,
        NOW - 20_000,
        vec![series("shop/cat", "shop/cat-1", "ok", 90)],
    );
    let r2 = report(
        "shop/web",
        7,
        2,
        NOW - 10_000,
        vec![series("shop/cat", "shop/cat-1", "app_error", 10)],
    );
    assert_eq!(s.ingest(&r1, None, NOW).unwrap(), 1);
    assert_eq!(s.ingest(&r2, None, NOW).unwrap(), 2);
    assert_eq!(s.ingest(&r1, None, NOW).unwrap(), 2, "already merged");
    assert_eq!(s.duplicates(), 1);
    assert_eq!(total(&s, 60_000), 100);
    // A window covers whole slots: one that starts in the second period's slot leaves the
    // first out, and reaches back to the start of that slot.
    assert_eq!(total(&s, 5_000), 10);
    assert_eq!(all(&s, 5_000).from_ms, NOW - 10_000);
    let rows = view::stat(&all(&s, 60_000), &Selector::default(), 60.0);
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!((r.name.as_str(), r.figures.requests), ("shop/cat", 100));
    assert_eq!(r.figures.success, Some(0.9));
    assert_eq!(r.figures.failures.application[0].count, 10);
    assert_eq!(r.environments, vec!["vm".to_string()]);
}

#[test]
fn a_gap_is_counted_lost_and_a_new_run_starts_again() {
    let mut s = Store::new(Limits::default());
    let r = |run, seq| {
        report(
            "shop/web",
            run,
            seq,
            NOW - 5_000,
            vec![series("shop/cat", "w", "ok", 1)],
        )
    };
    s.ingest(&r(1, 1), None, NOW).unwrap();
    s.ingest(&r(1, 4), None, NOW).unwrap();
    assert_eq!(s.lost(), 2);
    assert_eq!(
        s.ingest(&r(2, 1), None, NOW).unwrap(),
        1,
        "a restarted proxy"
    );
    assert_eq!(total(&s, 60_000), 3);
}

#[test]
fn a_bad_series_refuses_the_whole_report() {
    let mut s = Store::new(Limits::default());
    let mut bad = series("shop/cat", "w", "no_such_class", 1);
    let good = series("shop/cat", "w", "ok", 1);
    let e = s
        .ingest(
            &report("shop/web", 1, 1, NOW, vec![good.clone(), bad.clone()]),
            None,
            NOW,
        )
        .unwrap_err();
    assert!(e.to_string().contains("series[1].class"), "{e}");
    bad.class = "ok".into();
    let mut r = report("shop/web", 1, 1, NOW, vec![bad]);
    r.latencies[0].histogram = Some(WireHist {
        scale: 99,
        ..Default::default()
    });
    let e = s.ingest(&r, None, NOW).unwrap_err();
    assert!(e.to_string().contains("latencies[0].histogram"), "{e}");
    assert_eq!(s.series_count(), 0);
    let e = s
        .ingest(&report("shop/web", 1, 0, NOW, vec![good]), None, NOW)
        .unwrap_err();
    assert!(e.to_string().contains("seq"), "{e}");
}

#[test]
fn series_beyond_the_caps_fold_into_other() {
    let limits = Limits {
        series_per_reporter: 3,
        series: 5,
        ..Limits::default()
    };
    let mut s = Store::new(limits);
    let many: Vec<Series> = (0..10)
        .map(|i| series(&format!("shop/s{i}"), "w", "ok", 1))
        .collect();
    s.ingest(&report("shop/a", 1, 1, NOW, many.clone()), None, NOW)
        .unwrap();
    // Three of its own, then one `other` row for the rest.
    assert_eq!(s.series_count(), 4);
    assert_eq!(s.folded(), 7);
    assert_eq!(total(&s, 60_000), 10, "folded, not lost");
    let other = s.window(NOW, 60_000, |k| &*k.service == OTHER, |_| false);
    assert_eq!(other.series[0].1.requests, 7);
    s.ingest(&report("shop/b", 1, 1, NOW, many), None, NOW)
        .unwrap();
    // The mesh's cap: one more of b's own, then its `other` row.
    assert_eq!(s.series_count(), 6);
    assert_eq!(total(&s, 60_000), 20);
}

#[test]
fn old_slots_move_to_minutes_and_then_go() {
    let mut s = Store::new(Limits::default());
    let hour = 3_600_000;
    s.ingest(
        &report(
            "shop/a",
            1,
            1,
            NOW - hour,
            vec![series("shop/x", "w", "ok", 5)],
        ),
        None,
        NOW,
    )
    .unwrap();
    s.ingest(
        &report(
            "shop/a",
            1,
            2,
            NOW - 5_000,
            vec![series("shop/x", "w", "ok", 1)],
        ),
        None,
        NOW,
    )
    .unwrap();
    assert_eq!(total(&s, 2 * hour), 6);
    assert_eq!(total(&s, 60_000), 1);
    // A day later the old period is gone; fifteen minutes later the new one is in minutes.
    s.compact(NOW + 20 * 60_000);
    let w = s.window(NOW + 20 * 60_000, 2 * hour, |_| true, |_| true);
    assert_eq!(w.series[0].1.requests, 6);
    // The histograms moved too, at the coarse scale.
    assert_eq!(w.latency[0].1.count(), 6);
    assert_eq!(w.latency[0].1.scale(), COARSE_SCALE);
    s.compact(NOW + 24 * hour);
    assert_eq!(s.series_count(), 1);
    s.compact(NOW + 25 * hour);
    assert_eq!(s.series_count(), 0);
}

#[test]
fn effective_and_actual_outcomes_with_a_retried_failure() {
    let mut s = Store::new(Limits::default());
    let mut ok = series("shop/cat", "w", "ok", 8);
    ok.attempts = 10; // two requests succeeded on their second attempt
    let failed = series("shop/cat", "w", "app_error", 2);
    s.ingest(&report("shop/web", 1, 1, NOW, vec![ok, failed]), None, NOW)
        .unwrap();
    let rows = view::stat(&all(&s, 60_000), &Selector::default(), 60.0);
    let f = &rows[0].figures;
    assert_eq!((f.requests, f.attempts), (10, 12));
    assert_eq!(f.success, Some(0.8));
    // 12 attempts, 2 retried ones failed and 2 last ones failed: 8 good.
    assert_eq!(f.actual_success, Some(8.0 / 12.0));
}

/// The (source, destination) of every edge over the last minute.
fn edge_ends(s: &Store) -> Vec<(String, String)> {
    let e = view::edges(&all(s, 60_000), &Selector::default(), 60.0, |_| None);
    e.into_iter().map(|e| (e.src, e.dst)).collect()
}

#[test]
fn a_meshed_callers_tcp_stream_is_its_own_edge_not_an_unmeshed_one() {
    let mut s = Store::new(Limits::default());
    let tcp = |direction: u32, peer: &str| Series {
        direction,
        protocol: 1,
        requests: 0,
        attempts: 0,
        tcp_opened: 2,
        tcp_closed: 2,
        ..series("shop/db", peer, "ok", 0)
    };
    s.ingest(
        &report("shop/web", 1, 1, NOW, vec![tcp(0, "shop/db-vm")]),
        Some("spiffe://t/ns/shop/sa/web"),
        NOW,
    )
    .unwrap();
    // The callee's side: the caller's identity (mutual TLS), no workload.
    let mut inbound = tcp(1, "");
    inbound.peer_identity = "spiffe://t/ns/shop/sa/web".into();
    s.ingest(&report("shop/db-vm", 1, 1, NOW, vec![inbound]), None, NOW)
        .unwrap();
    assert_eq!(edge_ends(&s), [("shop/web".into(), "shop/db-vm".into())]);
}

#[test]
fn a_tcp_services_count_of_open_connections_is_no_callers_edge() {
    let mut s = Store::new(Limits::default());
    let tcp = |direction: u32, peer: &str, closed: u64| Series {
        direction,
        protocol: 1,
        requests: 0,
        attempts: 0,
        tcp_closed: closed,
        ..series("shop/db", peer, "ok", 0)
    };
    s.ingest(
        &report("shop/db-vm", 1, 1, NOW, vec![]),
        Some("spiffe://t/ns/shop/sa/db"),
        NOW,
    )
    .unwrap();
    s.ingest(
        &report("shop/web", 1, 1, NOW, vec![tcp(0, "shop/db-vm", 2)]),
        Some("spiffe://t/ns/shop/sa/web"),
        NOW,
    )
    .unwrap();
    // The callee's proxy: its streams, each naming its caller (the stream's hello), and the
    // service's count of connections opened and open, which names no caller.
    let mut named = tcp(1, "shop/web", 2);
    named.peer_identity = "spiffe://t/ns/shop/sa/web".into();
    let mut gauge = tcp(1, "", 0);
    gauge.peer_identity.clear();
    gauge.mtls = false;
    (gauge.tcp_opened, gauge.tcp_open) = (2, 1);
    s.ingest(
        &report("shop/db-vm", 1, 2, NOW, vec![named, gauge]),
        None,
        NOW,
    )
    .unwrap();
    assert_eq!(edge_ends(&s), [("shop/web".into(), "shop/db-vm".into())]);
}

#[test]
fn a_tcp_edge_counts_its_connections_and_their_success() {
    let mut s = Store::new(Limits::default());
    let tcp = |class: &str, closed: u64| Series {
        protocol: 1,
        requests: 0,
        attempts: 0,
        tcp_closed: closed,
        ..series("shop/db", "shop/db-vm", class, 0)
    };
    let streams = vec![
        tcp("ok", 3),
        tcp("connect_refused", 1),
        tcp("client_disconnect", 1),
    ];
    s.ingest(
        &report("shop/web", 1, 1, NOW, streams),
        Some("spiffe://t/ns/shop/sa/web"),
        NOW,
    )
    .unwrap();
    let e = view::edges(&all(&s, 60_000), &Selector::default(), 60.0, |_| None);
    let f = &e[0].figures;
    // Five ended; the refused one failed (the client's leaving is not the service's).
    assert_eq!((f.tcp_closed, f.tcp_success), (5, Some(0.8)), "{e:?}");
    assert_eq!((f.requests, f.success), (0, None));
    // Its rate: five ended over the 60-s window.
    assert!((f.tcp_cps - 5.0 / 60.0).abs() < 1e-9, "{}", f.tcp_cps);
}

#[test]
fn edges_join_caller_and_callee_and_unmeshed_callers_come_from_the_callee() {
    let mut s = Store::new(Limits::default());
    s.ingest(
        &report(
            "shop/web",
            1,
            1,
            NOW,
            vec![series("shop/cat", "shop/cat-vm", "ok", 4)],
        ),
        Some("spiffe://t/ns/shop/sa/web"),
        NOW,
    )
    .unwrap();
    let mut inbound = series("shop/cat", "", "ok", 3);
    inbound.direction = 1;
    inbound.peer_identity.clear();
    inbound.mtls = false;
    s.ingest(&report("shop/cat-vm", 1, 1, NOW, vec![inbound]), None, NOW)
        .unwrap();
    let ids: std::collections::HashMap<String, String> = s
        .reporters()
        .iter()
        .filter_map(|(k, r)| Some((k.to_string(), r.identity.clone()?)))
        .collect();
    let e = view::edges(&all(&s, 60_000), &Selector::default(), 60.0, |w| {
        ids.get(w).cloned()
    });
    assert_eq!(e.len(), 2);
    let meshed = e.iter().find(|e| e.src == "shop/web").unwrap();
    assert_eq!(
        (meshed.dst.as_str(), meshed.figures.requests, meshed.mtls),
        ("shop/cat-vm", 4, true)
    );
    assert_eq!(meshed.src_identity, "spiffe://t/ns/shop/sa/web");
    assert_eq!(meshed.dst_environment, "vm");
    let unmeshed = e.iter().find(|e| e.src == "unmeshed").unwrap();
    assert_eq!(
        (
            unmeshed.dst.as_str(),
            unmeshed.figures.requests,
            unmeshed.mtls
        ),
        ("shop/cat-vm", 3, false)
    );
    let w = view::stat(
        &all(&s, 60_000),
        &Selector {
            kind: Some(Kind::Workload),
            ..Default::default()
        },
        60.0,
    );
    assert_eq!(
        w.iter()
            .map(|r| (r.name.as_str(), r.figures.requests))
            .collect::<Vec<_>>(),
        vec![("shop/cat-vm", 3), ("shop/web", 4)]
    );
}

#[test]
fn the_memory_budget_drops_the_oldest_slots_first_and_says_from_when_it_holds_all() {
    let hour = 3_600_000;
    let limits = Limits {
        memory: 64 << 10,
        ..Limits::default()
    };
    let mut s = Store::new(limits);
    // Twelve hours of minutes, then the last quarter hour in 10 s slots.
    let mut seq = 0;
    for m in (0..12 * 60).rev() {
        seq += 1;
        let r = report(
            "shop/a",
            1,
            seq,
            NOW - 16 * 60_000 - m * 60_000,
            vec![series("shop/x", "w", "ok", 1)],
        );
        s.ingest(&r, None, NOW).unwrap();
    }
    for k in (0..90).rev() {
        seq += 1;
        let r = report(
            "shop/a",
            1,
            seq,
            NOW - k * 10_000,
            vec![series("shop/x", "w", "ok", 1)],
        );
        s.ingest(&r, None, NOW).unwrap();
    }
    assert!(s.bytes() <= 64 << 10, "{} bytes", s.bytes());
    let held = s.held_from_ms();
    assert!(held > NOW - 12 * hour && held < NOW, "held from {held}");
    // What is held is whole: every period since `held`, none before.
    let w = s.window(NOW, NOW - held, |_| true, |_| true);
    let n = w.series[0].1.requests;
    assert!(n >= 90, "{n}");
    assert_eq!(total(&s, 24 * hour), n, "nothing older than held");
}

#[test]
fn periods_too_old_to_keep_do_not_use_up_the_cap() {
    let limits = Limits {
        series_per_reporter: 2,
        ..Limits::default()
    };
    let mut s = Store::new(limits);
    let day = 24 * 3_600_000;
    // The same series, many times, in periods older than anything kept.
    for seq in 1..=10 {
        let r = report(
            "shop/a",
            1,
            seq,
            NOW - 2 * day,
            vec![series("shop/x", "w", "ok", 1)],
        );
        s.ingest(&r, None, NOW).unwrap();
    }
    assert_eq!(s.series_count(), 0);
    // The reporter's own series are still its own, not folded.
    let r = report(
        "shop/a",
        1,
        11,
        NOW,
        vec![
            series("shop/x", "w", "ok", 1),
            series("shop/y", "w", "ok", 1),
        ],
    );
    s.ingest(&r, None, NOW).unwrap();
    assert_eq!(s.folded(), 0);
    let w = all(&s, 60_000);
    let mut names: Vec<&str> = w.series.iter().map(|(k, _)| &*k.service).collect();
    names.sort();
    assert_eq!(names, vec!["shop/x", "shop/y"]);
    // Counted all the same.
    let t: u64 = s.totals().values().map(|t| t.requests).sum();
    assert_eq!(t, 12);
}

#[test]
fn replicas_windows_merged_through_shards_answer_as_one_store_would() {
    use crate::shard::Shard;
    use prost::Message;
    let web = |seq, start, class, n| {
        report(
            "shop/web",
            7,
            seq,
            start,
            vec![series("shop/cat", "shop/cat-1", class, n)],
        )
    };
    let mut inbound = report(
        "shop/cat-1",
        9,
        1,
        NOW - 20_000,
        vec![series("shop/cat", "shop/web", "ok", 40)],
    );
    inbound.series[0].direction = 1;
    inbound.latencies[0] = latency(&inbound.series[0], 40, 0.3);
    // The web proxy reported its first period to A, then moved to B; the callee reports to B.
    let (mut a, mut b, mut one) = (
        Store::new(Limits::default()),
        Store::new(Limits::default()),
        Store::new(Limits::default()),
    );
    let reports = [
        (web(1, NOW - 20_000, "ok", 90), true),
        (web(2, NOW - 10_000, "app_error", 10), false),
        (inbound, false),
    ];
    for (r, to_a) in &reports {
        let s = if *to_a { &mut a } else { &mut b };
        s.ingest(r, Some("spiffe://t/ns/shop/sa/x"), NOW).unwrap();
        one.ingest(r, Some("spiffe://t/ns/shop/sa/x"), NOW).unwrap();
    }
    let ids = std::collections::HashMap::from([(
        "shop/cat-1".to_string(),
        "spiffe://t/ns/shop/sa/cat".to_string(),
    )]);
    let wire = Shard::of(&all(&b, 60_000), &ids).encode_to_vec();
    let (from_b, got_ids) = Shard::decode(wire.as_slice())
        .unwrap()
        .into_window()
        .unwrap();
    assert_eq!(got_ids, ids);
    let mut merged = all(&a, 60_000);
    merged.merge(from_b);
    for kind in [Kind::Service, Kind::Workload] {
        let sel = Selector {
            kind: Some(kind),
            ..Selector::default()
        };
        let rows = |w: &Window| serde_json::to_value(view::stat(w, &sel, 60.0)).unwrap();
        assert_eq!(rows(&merged), rows(&all(&one, 60_000)), "{kind:?}");
    }
    let svc = view::stat(&merged, &Selector::default(), 60.0);
    assert_eq!(svc[0].figures.requests, 100);
    // A shard that lies is refused whole.
    let mut bad = Shard::of(&all(&b, 60_000), &ids);
    bad.series[0].class = "teapot".into();
    assert!(bad.into_window().is_err());
}

#[test]
fn a_services_timeline_has_a_point_per_slot_with_who_served() {
    let mut s = Store::new(Limits::default());
    // Two periods, 20 s apart: the VM serves the first, the container (and a failure) the
    // second; another service's traffic is not in it.
    let first = report(
        "shop/shopper",
        1,
        1,
        NOW - 40_000,
        vec![
            series("shop/catalog", "shop/catalog-vm", "ok", 30),
            series("shop/other", "shop/x", "ok", 99),
        ],
    );
    let second = report(
        "shop/shopper",
        1,
        2,
        NOW - 20_000,
        vec![
            series("shop/catalog", "shop/catalog-ct", "ok", 18),
            series("shop/catalog", "shop/catalog-ct", "app_error", 2),
        ],
    );
    for (r, at) in [(first, NOW - 30_000), (second, NOW - 10_000)] {
        s.ingest(&r, None, at).unwrap();
    }
    let t = s.timeline(NOW, 60_000, "shop/catalog");
    assert_eq!(t.step_ms, 10_000);
    assert_eq!(t.points.len(), 2, "{t:#?}");
    let (a, b) = (&t.points[0], &t.points[1]);
    assert_eq!((a.at_ms, a.requests, a.failed), (NOW - 40_000, 30, 0));
    assert_eq!(a.by_workload.get("shop/catalog-vm"), Some(&30));
    assert_eq!((b.at_ms, b.requests, b.failed), (NOW - 20_000, 20, 2));
    assert_eq!(b.by_workload.get("shop/catalog-ct"), Some(&20));
    assert!(b.p50_ms.is_some_and(|ms| (ms - 10.0).abs() < 1.0), "{b:?}");
    // A shorter window keeps the slots it reaches.
    assert_eq!(s.timeline(NOW, 25_000, "shop/catalog").points.len(), 1);
    assert!(s.timeline(NOW, 60_000, "shop/none").points.is_empty());
}
