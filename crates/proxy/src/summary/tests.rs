use super::*;

fn rec(
    service: &Label,
    status: u16,
    class: FailureClass,
    peer: PeerKey,
    period: Period,
) -> Recorded {
    Recorded {
        direction: Direction::outbound,
        service: service.clone(),
        route: Label::from("default"),
        class,
        status,
        peer,
        period,
    }
}

fn period(n: u64, attempts: u32, seconds: f64) -> Period {
    let mut p = Period::default();
    for _ in 0..n {
        p.add(seconds, attempts);
    }
    p
}

#[test]
fn keys_that_differ_only_in_the_exact_status_make_one_series() {
    let svc = Label::from("catalog.shop");
    let peer = PeerKey {
        workload: Label::from("shop/catalog-vm"),
        identity: Label::from("shop/catalog"),
        environment: Label::from("vm"),
        locality: Label::from("eu/eu-1"),
        endpoint: Some("127.0.0.2:15006".parse().unwrap()),
        mtls: true,
    };
    let r = series(
        vec![
            rec(
                &svc,
                500,
                FailureClass::AppError,
                peer.clone(),
                period(3, 2, 0.01),
            ),
            rec(
                &svc,
                503,
                FailureClass::AppError,
                peer.clone(),
                period(2, 1, 0.02),
            ),
            rec(&svc, 200, FailureClass::Ok, peer, period(10, 1, 0.001)),
        ],
        &mut TcpSummary::default(),
        500,
    );
    assert_eq!(r.folded, 0);
    assert_eq!(r.series.len(), 2);
    let failed = r.series.iter().find(|s| s.class == "app_error").unwrap();
    assert_eq!(
        (failed.requests, failed.attempts, failed.status_class),
        (5, 8, 5)
    );
    assert_eq!(failed.service, "shop/catalog", "as namespace/name");
    assert_eq!(failed.peer_workload, "shop/catalog-vm");
    assert_eq!(failed.endpoint, "127.0.0.2:15006");
    assert!(failed.mtls);
    // One latency group for the service and peer: every request, whatever its class.
    assert_eq!(r.latencies.len(), 1);
    let l = &r.latencies[0];
    assert_eq!(
        (l.service.as_str(), l.peer_workload.as_str()),
        ("shop/catalog", "shop/catalog-vm")
    );
    let h = Histogram::try_from(l.histogram.as_ref().unwrap()).unwrap();
    assert_eq!(h.count(), 15);
}

#[test]
fn beyond_the_cap_the_quietest_series_fold_into_other() {
    let requests = (0..10)
        .map(|i| {
            let svc = Label::from(format!("s{i}.shop").as_str());
            rec(
                &svc,
                200,
                FailureClass::Ok,
                PeerKey::default(),
                period(i + 1, 1, 0.01),
            )
        })
        .collect();
    let r = series(requests, &mut TcpSummary::default(), 4);
    assert_eq!(r.folded, 7);
    assert_eq!(r.series.len(), 4);
    // The busiest three whole, the other seven in one row: nothing lost.
    assert_eq!(r.series.iter().map(|s| s.requests).sum::<u64>(), 55);
    let other = r.series.iter().find(|s| s.service == OTHER).unwrap();
    assert_eq!(other.requests, 1 + 2 + 3 + 4 + 5 + 6 + 7);
}

#[test]
fn tcp_connections_open_close_and_the_gauge_of_those_still_open() {
    let mut t = TcpSummary::default();
    let svc = Label::from("db.shop");
    t.opened(Direction::outbound, &svc);
    t.opened(Direction::outbound, &svc);
    t.closed(
        Direction::outbound,
        &svc,
        FailureClass::ConnectionReset,
        PeerKey::default(),
        10,
        20,
    );
    let s = series(Vec::new(), &mut t, 500).series;
    let opened = s.iter().find(|s| s.tcp_opened > 0).unwrap();
    assert_eq!(
        (opened.tcp_opened, opened.tcp_open, opened.protocol),
        (2, 1, 1)
    );
    let closed = s.iter().find(|s| s.tcp_closed > 0).unwrap();
    assert_eq!(
        (
            closed.class.as_str(),
            closed.bytes_sent,
            closed.bytes_received
        ),
        ("connection_reset", 10, 20)
    );
    // Next period: nothing opened or closed, one still open: the gauge alone.
    let s = series(Vec::new(), &mut t, 500).series;
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].tcp_open, s[0].tcp_opened), (1, 0));
}

#[test]
fn beyond_its_bound_the_list_keeps_the_smallest_ids_at_both_ends() {
    let attempt = |id: u64| trellis_telemetry::report::Attempt {
        id,
        ..Default::default()
    };
    // The caller's and the callee's proxies see the same attempts in different orders.
    let ids: Vec<u64> = (0..500u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        .collect();
    let (mut caller, mut callee) = (FailedAttempts::default(), FailedAttempts::default());
    for id in &ids {
        caller.push(attempt(*id));
    }
    for id in ids.iter().rev() {
        callee.push(attempt(*id));
    }
    callee.push(attempt(0)); // an unmeshed caller's: no id, never preferred
    let mut smallest = ids.clone();
    smallest.sort_unstable();
    smallest.truncate(FailedAttempts::CAP);
    for list in [&caller, &callee] {
        let mut got: Vec<u64> = list.items.iter().map(|a| a.id).collect();
        got.sort_unstable();
        assert_eq!(got, smallest);
        assert_eq!(list.below(), *smallest.last().unwrap());
    }
    assert_eq!(caller.dropped, 500 - FailedAttempts::CAP as u64);
    assert_eq!(callee.dropped, 501 - FailedAttempts::CAP as u64);
    let mut few = FailedAttempts::default();
    few.push(attempt(7));
    assert_eq!(
        (few.below(), few.dropped),
        (0, 0),
        "a whole list has no bound"
    );
}
