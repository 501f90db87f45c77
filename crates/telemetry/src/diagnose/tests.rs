use std::sync::Arc;

use super::*;
use crate::{
    hist::Histogram,
    key::{Counts, Key, Protocol},
};

/// A series: `reporter` saw `n` requests of `class` to or from `peer` for `service`.
fn s(
    dir: Direction,
    reporter: &str,
    peer: &str,
    service: &str,
    class: FailureClass,
    n: u64,
) -> (Arc<Key>, Counts) {
    let env = |w: &str| -> Arc<str> {
        match w {
            w if w.ends_with("-vm") => "vm".into(),
            w if w.ends_with("-ct") => "container".into(),
            "" => "".into(),
            _ => "bare-metal".into(),
        }
    };
    let key = Key {
        direction: dir,
        protocol: Protocol::Http,
        workload: reporter.into(),
        environment: env(reporter),
        locality: "eu/eu-1".into(),
        service: service.into(),
        route: "default".into(),
        peer_workload: peer.into(),
        peer_identity: "".into(),
        peer_environment: env(peer),
        peer_locality: if peer.is_empty() {
            "".into()
        } else {
            "eu/eu-1".into()
        },
        endpoint: "".into(),
        mtls: true,
        class,
        status_class: 0,
    };
    let c = Counts {
        requests: n,
        attempts: n,
        ..Counts::default()
    };
    (Arc::new(key), c)
}

use Direction::{Inbound as In, Outbound as Out};
use FailureClass as F;

const SVC: &str = "test/catalog";

fn window(series: Vec<(Arc<Key>, Counts)>) -> Window {
    Window {
        series,
        ..Window::default()
    }
}

fn run(w: &Window, facts: &Facts) -> Vec<Verdict> {
    diagnose(w, facts, &|_| true)
}

fn workload_of(v: &Verdict) -> &str {
    match &v.place {
        Place::Workload { at } => &at.workload,
        _ => "",
    }
}

/// The healthy part of every fleet below: shop calls catalog-ct fine.
fn healthy() -> Vec<(Arc<Key>, Counts)> {
    vec![
        s(Out, "test/shop", "test/catalog-ct", SVC, F::Ok, 40),
        s(In, "test/catalog-ct", "test/shop", SVC, F::Ok, 40),
    ]
}

#[test]
fn a_healthy_fleet_has_nothing_to_say() {
    assert!(run(&window(healthy()), &Facts::default()).is_empty());
}

/// What a diagnosis judged, of its selection: the requests at both ends of the hops it
/// selects and the proxies of its workloads that reported, none of another namespace's.
#[test]
fn what_was_judged_is_counted_for_the_selection() {
    let mut w = window(healthy());
    w.series
        .push(s(Out, "other/a", "other/b", "other/b", F::Ok, 7));
    w.reporting = vec![
        ("test/shop".into(), 1),
        ("test/catalog-ct".into(), 1),
        ("other/a".into(), 1),
    ];
    let all = judged(&w, &|_| true);
    assert_eq!((all.proxies, all.requests), (3, 87));
    let test = judged(&w, &selector(Some("test"), None));
    assert_eq!((test.proxies, test.requests, test.connections), (2, 80, 0));
    let none = judged(&w, &selector(Some("nobody"), None));
    assert_eq!(none, Judged::default());
}

#[test]
fn the_application_down_on_one_host_is_the_application_there_not_the_network() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectRefused,
        12,
    ));
    w.push(s(
        In,
        "test/catalog-vm",
        "test/shop",
        SVC,
        F::ConnectRefused,
        12,
    ));
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Application);
    assert_eq!(workload_of(&v[0]), "test/catalog-vm");
    assert_eq!(v[0].callee_saw[&F::ConnectRefused], 12);
    assert_eq!(v[0].caller_saw[&F::ConnectRefused], 12);
    assert!(v[0].next.contains("running and listening"), "{}", v[0].next);
}

#[test]
fn attempts_the_callee_never_saw_are_the_link_when_other_callers_are_fine() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::UpstreamTimeout,
        8,
    ));
    w.push(s(Out, "test/web", "test/catalog-vm", SVC, F::Ok, 30));
    w.push(s(In, "test/catalog-vm", "test/web", SVC, F::Ok, 30));
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Network);
    let Place::Link { from, to } = &v[0].place else {
        panic!("{v:#?}")
    };
    assert_eq!(
        (from.workload.as_str(), to.workload.as_str()),
        ("test/shop", "test/catalog-vm")
    );
    assert_eq!(
        (from.environment.as_str(), to.environment.as_str()),
        ("bare-metal", "vm")
    );
    assert!(
        v[0].evidence.iter().any(|e| e.contains("saw no request")),
        "{v:#?}"
    );
    assert!(
        v[0].evidence.iter().any(|e| e.contains("other caller")),
        "{v:#?}"
    );
}

#[test]
fn when_every_caller_fails_and_nothing_arrives_it_is_the_callees_host() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectTimeout,
        8,
    ));
    w.push(s(
        Out,
        "test/web",
        "test/catalog-vm",
        SVC,
        F::ConnectTimeout,
        5,
    ));
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(
        (v[0].cause, workload_of(&v[0])),
        (Cause::Network, "test/catalog-vm")
    );
    assert_eq!(v[0].failed, 13);
    assert!(v[0].problem.contains("any caller"), "{}", v[0].problem);
}

#[test]
fn a_callee_whose_proxy_still_reports_is_up_so_the_way_to_it_fails() {
    // One caller, refused: without more, the link or the host. The callee's proxy
    // reporting says its host is up: the link.
    let w = vec![
        s(
            Out,
            "test/shop",
            "test/catalog-ct",
            SVC,
            F::ConnectRefused,
            6,
        ),
        s(Out, "test/shop", "test/catalog-vm", SVC, F::Ok, 40),
        s(In, "test/catalog-vm", "test/shop", SVC, F::Ok, 40),
    ];
    let mut win = window(w.clone());
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(v[0].problem.contains("cannot reach"), "{v:#?}");
    win.reporting = vec![("test/catalog-ct".into(), 9_000)];
    let facts = Facts {
        now_ms: 12_000,
        ..Facts::default()
    };
    let v = run(&win, &facts);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Network);
    assert!(
        matches!(&v[0].place, Place::Link { from, to } if from.workload == "test/shop" && to.workload == "test/catalog-ct"),
        "{v:#?}"
    );
    assert!(v[0].problem.contains("the network from"), "{v:#?}");
    assert!(
        v[0].evidence
            .iter()
            .any(|e| e.contains("reported to the control plane 3 s ago: its host is up")),
        "{v:#?}"
    );
    // Every caller fails, and the proxy is up: something in front of the host, not the
    // host.
    let mut w2 = w;
    w2.push(s(
        Out,
        "test/web",
        "test/catalog-ct",
        SVC,
        F::ConnectRefused,
        5,
    ));
    let mut win = window(w2);
    win.reporting = vec![("test/catalog-ct".into(), 9_000)];
    let v = run(&win, &facts);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(
        (v[0].cause, workload_of(&v[0])),
        (Cause::Network, "test/catalog-ct")
    );
    assert!(v[0].problem.contains("whose proxy is up"), "{v:#?}");
    assert!(v[0].next.contains("inbound port"), "{v:#?}");
}

#[test]
fn only_attempts_below_the_callees_bound_are_looked_for_in_its_list() {
    // The callee served them (its list, capped, holds ids up to 2) but the caller timed
    // out on ids 1 to 4: ids 3 and 4 were beyond what the callee could list, so they are
    // neither arrived nor lost; 2 of 2 comparable arrived: the application.
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::UpstreamTimeout,
        4,
    ));
    w.push(s(
        In,
        "test/catalog-vm",
        "test/shop",
        SVC,
        F::ClientDisconnect,
        40,
    ));
    let mut win = window(w);
    win.attempts = (1..=4)
        .map(|id| listed("test/shop", 0, id, "test/catalog-vm", F::UpstreamTimeout))
        .chain((1..=2).map(|id| {
            let mut a =
                (*listed("test/catalog-vm", 1, id, "test/shop", F::ClientDisconnect)).clone();
            a.listed_below = 2;
            Arc::new(a)
        }))
        .collect();
    let v = run(&win, &Facts::default());
    assert_eq!(v[0].cause, Cause::Application, "{v:#?}");
    assert!(
        v[0].evidence
            .iter()
            .any(|e| e.contains("2 of the 2 failed attempts")),
        "{v:#?}"
    );
}

#[test]
fn the_callers_ejections_of_a_workload_join_its_verdict() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectTimeout,
        8,
    ));
    w.push(s(Out, "test/web", "test/catalog-vm", SVC, F::Ok, 30));
    w.push(s(In, "test/catalog-vm", "test/web", SVC, F::Ok, 30));
    let mut win = window(w);
    let ejection = |who: &str, at_ms: u64, seconds: u32| {
        Arc::new(crate::store::Ejected {
            reporter: "test/shop".into(),
            received_ms: at_ms,
            ejection: crate::report::Ejection {
                service: SVC.into(),
                peer_workload: who.into(),
                endpoint: "10.0.0.3:15006".into(),
                at_ms,
                seconds,
                class: "connect_timeout".into(),
                failures: 5,
            },
        })
    };
    win.ejections = vec![
        ejection("test/catalog-vm", 4_000, 30),
        ejection("test/other", 5_000, 30),
        ejection("test/catalog-vm", 9_000, 0),
    ];
    let facts = Facts {
        now_ms: 10_000,
        ..Facts::default()
    };
    let v = run(&win, &facts);
    assert_eq!(v.len(), 1, "{v:#?}");
    let ev = v[0].evidence.join("\n");
    assert!(
        ev.contains("test/shop's proxy ejected test/catalog-vm (10.0.0.3:15006) 6 s ago for 30 s: 5 failures in a row, the last connect_timeout"),
        "{ev}"
    );
    assert!(
        ev.contains("test/shop's proxy let test/catalog-vm back in 1 s ago"),
        "{ev}"
    );
    assert!(!ev.contains("test/other"), "{ev}");
}

#[test]
fn a_verdict_says_when_its_failures_were_first_and_last_seen() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectTimeout,
        3,
    ));
    w.push(s(Out, "test/web", "test/catalog-vm", SVC, F::Ok, 30));
    w.push(s(In, "test/catalog-vm", "test/web", SVC, F::Ok, 30));
    let mut win = window(w);
    let v = run(&win, &Facts::default());
    assert_eq!(
        (v[0].first_ms, v[0].last_ms),
        (None, None),
        "nothing listed"
    );
    win.attempts = [(1, 5_000), (2, 2_000), (3, 7_000)]
        .into_iter()
        .map(|(id, at)| {
            let mut a = (*listed("test/shop", 0, id, "test/catalog-vm", F::ConnectTimeout)).clone();
            a.attempt.at_ms = at;
            Arc::new(a)
        })
        // Another class, another caller: not this verdict's.
        .chain([listed("test/web", 0, 9, "test/catalog-vm", F::AppError)])
        .collect();
    let v = run(&win, &Facts::default());
    assert_eq!(
        (v[0].first_ms, v[0].last_ms),
        (Some(2_000), Some(7_000)),
        "{v:#?}"
    );
}

#[test]
fn a_timeout_the_callee_saw_is_a_slow_application_with_its_latency() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::UpstreamTimeout,
        6,
    ));
    w.push(s(
        In,
        "test/catalog-vm",
        "test/shop",
        SVC,
        F::ClientDisconnect,
        6,
    ));
    let mut h = Histogram::default();
    for _ in 0..6 {
        h.record(0.3);
    }
    let lat = LatKey {
        direction: In,
        workload: "test/catalog-vm".into(),
        service: SVC.into(),
        peer_workload: "test/shop".into(),
    };
    let mut win = window(w);
    win.latency.push((Arc::new(lat), h));
    let facts = Facts {
        timeouts_ms: [(SVC.to_string(), 300)].into(),
        ..Facts::default()
    };
    let v = run(&win, &facts);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(
        (v[0].cause, workload_of(&v[0])),
        (Cause::Application, "test/catalog-vm")
    );
    assert!(v[0].problem.contains("slower"), "{}", v[0].problem);
    assert!(v[0].evidence.iter().any(|e| e.contains("p99")), "{v:#?}");
    assert!(v[0].evidence.iter().any(|e| e.contains("300 ms")), "{v:#?}");
}

#[test]
fn two_faults_on_two_services_give_two_verdicts_each_in_its_place() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectRefused,
        10,
    ));
    w.push(s(
        In,
        "test/catalog-vm",
        "test/shop",
        SVC,
        F::ConnectRefused,
        10,
    ));
    w.push(s(
        Out,
        "test/shop",
        "test/pay-ct",
        "test/pay",
        F::AppError,
        5,
    ));
    w.push(s(Out, "test/shop", "test/pay-ct", "test/pay", F::Ok, 15));
    w.push(s(
        In,
        "test/pay-ct",
        "test/shop",
        "test/pay",
        F::AppError,
        5,
    ));
    w.push(s(In, "test/pay-ct", "test/shop", "test/pay", F::Ok, 15));
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 2, "{v:#?}");
    let places: Vec<(&str, &str)> = v
        .iter()
        .map(|x| (workload_of(x), x.services[0].as_str()))
        .collect();
    assert_eq!(
        places,
        [("test/catalog-vm", SVC), ("test/pay-ct", "test/pay")]
    );
    assert!(v.iter().all(|x| x.cause == Cause::Application));
    let pay = &v[1];
    assert_eq!(
        (pay.caller_saw[&F::AppError], pay.callee_saw[&F::AppError]),
        (5, 5)
    );
    // Only one of them, by selector.
    let only_pay = diagnose(
        &window(vec![]),
        &Facts::default(),
        &selector(Some("test"), Some("pay")),
    );
    assert!(only_pay.is_empty());
}

#[test]
fn a_deny_names_the_policies_that_target_the_service() {
    let mut w = healthy();
    w.push(s(Out, "test/shop", "test/catalog-vm", SVC, F::Denied, 4));
    w.push(s(In, "test/catalog-vm", "test/shop", SVC, F::Denied, 4));
    let facts = Facts {
        policies: [(SVC.to_string(), vec!["test/wall (DENY)".to_string()])].into(),
        ..Facts::default()
    };
    let v = run(&window(w), &facts);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::MeshPolicy);
    assert!(
        v[0].evidence.iter().any(|e| e.contains("test/wall (DENY)")),
        "{v:#?}"
    );
}

#[test]
fn no_endpoint_is_configuration_or_the_application_by_what_the_service_selects() {
    let w = window(vec![s(
        Out,
        "test/shop",
        "",
        "test/gone",
        F::NoHealthyUpstream,
        5,
    )]);
    let v = run(&w, &Facts::default());
    assert_eq!(
        (v[0].cause, v[0].place.clone()),
        (
            Cause::Configuration,
            Place::Service {
                name: "test/gone".into()
            }
        )
    );
    let facts = Facts {
        selects: [(
            "test/gone".to_string(),
            vec![("test/gone-ct".to_string(), Some(false))],
        )]
        .into(),
        ..Facts::default()
    };
    let v = run(&w, &facts);
    assert_eq!(v[0].cause, Cause::Application);
    assert!(v[0].evidence[0].contains("test/gone-ct"), "{v:#?}");
}

#[test]
fn a_refused_config_and_an_unresolved_reference_are_configuration() {
    let facts = Facts {
        refused: vec![(
            "test/shop".into(),
            "bind 127.0.0.1:80: address in use".into(),
        )],
        unresolved: vec![(
            "HTTPRoute test/r".into(),
            "backendRefs[0]: Service test/nope not found".into(),
        )],
        ..Facts::default()
    };
    let v = run(&window(healthy()), &facts);
    assert_eq!(v.len(), 2, "{v:#?}");
    assert!(v.iter().all(|x| x.cause == Cause::Configuration));
}

#[test]
fn an_ejection_after_application_errors_joins_the_application_verdict() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/pay-ct",
        "test/pay",
        F::AppError,
        5,
    ));
    w.push(s(
        In,
        "test/pay-ct",
        "test/shop",
        "test/pay",
        F::AppError,
        5,
    ));
    w.push(s(Out, "test/shop", "", "test/pay", F::NoHealthyUpstream, 3));
    let facts = Facts {
        selects: [(
            "test/pay".to_string(),
            vec![("test/pay-ct".to_string(), Some(true))],
        )]
        .into(),
        ..Facts::default()
    };
    let v = run(&window(w), &facts);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!((v[0].cause, v[0].failed), (Cause::Application, 8));
    assert_eq!(v[0].caller_saw[&F::NoHealthyUpstream], 3);
    assert!(
        v[0].evidence.iter().any(|e| e.contains("ejected")),
        "{v:#?}"
    );
}

fn listed(
    reporter: &str,
    direction: u32,
    id: u64,
    peer: &str,
    class: F,
) -> Arc<crate::store::FailedAttempt> {
    Arc::new(crate::store::FailedAttempt {
        reporter: reporter.into(),
        received_ms: 1,
        attempt: crate::report::Attempt {
            direction,
            id,
            trace_id: format!("{id:032x}"),
            service: SVC.into(),
            peer_workload: peer.into(),
            class: class.as_str().into(),
            status: 504,
            at_ms: 1,
            latency_ms: 300,
        },
        listed_below: u64::MAX,
    })
}

/// The callee's application was down earlier in the window (its proxy answered this caller
/// `connect_refused` twice); then the caller's own connects to that proxy are refused. Those
/// never reached it (by their ids), and it still reports: the link, not more of the
/// application's answers.
#[test]
fn refused_connects_that_never_reached_a_callee_whose_application_was_down_are_the_link() {
    let mut w = healthy();
    w.push(s(Out, "test/shop", "test/catalog-vm", SVC, F::Ok, 10));
    w.push(s(In, "test/catalog-vm", "test/shop", SVC, F::Ok, 10));
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectRefused,
        7,
    ));
    w.push(s(
        In,
        "test/catalog-vm",
        "test/shop",
        SVC,
        F::ConnectRefused,
        2,
    ));
    let mut win = window(w);
    win.reporting = vec![("test/catalog-vm".into(), 9_000)];
    win.attempts = (1..=7)
        .map(|id| listed("test/shop", 0, id, "test/catalog-vm", F::ConnectRefused))
        .chain((1..=2).map(|id| listed("test/catalog-vm", 1, id, "test/shop", F::ConnectRefused)))
        .collect();
    let facts = Facts {
        now_ms: 12_000,
        ..Facts::default()
    };
    let v = run(&win, &facts);
    let link = v
        .iter()
        .find(|x| {
            matches!(&x.place, Place::Link { from, to }
                if from.workload == "test/shop" && to.workload == "test/catalog-vm")
        })
        .unwrap_or_else(|| panic!("no verdict on the link: {v:#?}"));
    assert_eq!(link.cause, Cause::Network, "{link:#?}");
    assert_eq!(link.caller_saw[&F::ConnectRefused], 7, "{link:#?}");
    assert!(
        link.evidence
            .iter()
            .any(|e| e.contains("2 of the 7 failed attempts")),
        "{link:#?}"
    );
    assert!(
        link.evidence.iter().any(|e| e.contains("its host is up")),
        "{link:#?}"
    );
    // Attempts that did reach it are its answers: the application.
    win.attempts = (1..=7)
        .map(|id| listed("test/shop", 0, id, "test/catalog-vm", F::ConnectRefused))
        .chain((1..=7).map(|id| listed("test/catalog-vm", 1, id, "test/shop", F::ConnectRefused)))
        .collect();
    let v = run(&win, &facts);
    assert!(
        v.iter().all(|x| !matches!(x.place, Place::Link { .. })),
        "{v:#?}"
    );
    assert!(
        v.iter()
            .any(|x| x.cause == Cause::Application && workload_of(x) == "test/catalog-vm"),
        "{v:#?}"
    );
}

#[test]
fn attempt_ids_tell_a_lost_answer_from_a_slow_application() {
    // The callee served the requests (ok, by its counts) but the caller timed out: by the
    // attempts' ids, none of the caller's failed attempts is among what the callee listed,
    // so the answers were lost on the way back: the network, not the application.
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::UpstreamTimeout,
        4,
    ));
    w.push(s(In, "test/catalog-vm", "test/shop", SVC, F::Ok, 4));
    let mut win = window(w);
    win.attempts = (1..=4)
        .map(|id| listed("test/shop", 0, id, "test/catalog-vm", F::UpstreamTimeout))
        .collect();
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Network, "{v:#?}");
    assert!(
        v[0].evidence
            .iter()
            .any(|e| e.contains("0 of the 4 failed attempts")),
        "{v:#?}"
    );
    assert_eq!(v[0].traces.len(), 3);
    // The callee listed the same attempts as given up on by its caller: the application
    // was slow.
    win.attempts.extend(
        (1..=4).map(|id| listed("test/catalog-vm", 1, id, "test/shop", F::ClientDisconnect)),
    );
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Application, "{v:#?}");
    assert!(
        v[0].evidence
            .iter()
            .any(|e| e.contains("4 of the 4 failed attempts")),
        "{v:#?}"
    );
    assert_eq!(v[0].traces[0], format!("{:032x}", 4));
}

#[test]
fn a_service_whose_workloads_left_is_told_when_they_left() {
    let w = window(vec![s(
        Out,
        "test/shop",
        "",
        "test/box",
        F::NoHealthyUpstream,
        3,
    )]);
    let facts = Facts {
        now_ms: 100_000,
        departed: [(
            "test/box".to_string(),
            vec![("test/box-ct".to_string(), 40_000)],
        )]
        .into(),
        events: vec![(40_000, "test/box-ct".into(), "left".into())],
        ..Facts::default()
    };
    let v = run(&w, &facts);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Application);
    assert!(v[0].problem.contains("has left"), "{v:#?}");
    assert!(
        v[0].evidence[0].contains("test/box-ct left 60 s ago"),
        "{v:#?}"
    );
}

#[test]
fn a_workloads_recent_events_join_its_verdict() {
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectRefused,
        12,
    ));
    w.push(s(
        In,
        "test/catalog-vm",
        "test/shop",
        SVC,
        F::ConnectRefused,
        12,
    ));
    let facts = Facts {
        now_ms: 100_000,
        events: vec![
            (10_000, "test/catalog-vm".into(), "joined".into()),
            (95_000, "test/catalog-vm".into(), "unhealthy".into()),
            (96_000, "test/other".into(), "left".into()),
        ],
        ..Facts::default()
    };
    let v = run(&window(w), &facts);
    assert!(
        v[0].evidence
            .contains(&"test/catalog-vm: unhealthy 5 s ago".to_string()),
        "{v:#?}"
    );
    assert!(
        !v[0].evidence.iter().any(|e| e.contains("test/other")),
        "{v:#?}"
    );
}

fn link(peer: &str, segs: u64, retrans: u64, rtt_us: u32) -> crate::report::Link {
    crate::report::Link {
        endpoint: "127.0.0.9:15006".into(),
        peer_workload: peer.into(),
        sockets: 2,
        rtt_us,
        segs_out: segs,
        retrans,
    }
}

#[test]
fn lost_segments_on_one_link_are_that_link_and_on_every_link_the_callees_host() {
    let mut win = window(healthy());
    win.links = vec![
        (
            "test/shop".into(),
            link("test/catalog-ct", 10_000, 600, 900),
        ),
        ("test/web".into(), link("test/catalog-ct", 10_000, 3, 800)),
    ];
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Network);
    let Place::Link { from, to } = &v[0].place else {
        panic!("{v:#?}")
    };
    assert_eq!(
        (from.workload.as_str(), to.workload.as_str()),
        ("test/shop", "test/catalog-ct")
    );
    assert!(
        v[0].evidence[0].contains("600 of 10000 segments retransmitted (6.0 %)"),
        "{v:#?}"
    );
    // Both callers lose segments: the callee's host.
    win.links[1].1.retrans = 500;
    let v = run(&win, &Facts::default());
    assert!(
        v.iter().all(
            |x| matches!(&x.place, Place::Workload { at } if at.workload == "test/catalog-ct")
        ),
        "{v:#?}"
    );
    // Too few segments to say, or a healthy link: nothing.
    win.links = vec![("test/shop".into(), link("test/catalog-ct", 50, 10, 900))];
    assert!(run(&win, &Facts::default()).is_empty());
}

#[test]
fn a_round_trip_far_slower_than_the_other_callers_is_latency_on_that_link() {
    let mut win = window(healthy());
    win.links = vec![
        (
            "test/shop".into(),
            link("test/catalog-ct", 1_000, 0, 180_000),
        ),
        ("test/web".into(), link("test/catalog-ct", 1_000, 0, 900)),
        ("test/api".into(), link("test/catalog-ct", 1_000, 0, 1_100)),
    ];
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(v[0].problem.contains("slow"), "{v:#?}");
}

/// A latency group: `n` requests of `ms` each, as `reporter` timed them.
fn lat(dir: Direction, reporter: &str, peer: &str, ms: f64, n: u64) -> (Arc<LatKey>, Histogram) {
    let mut h = Histogram::new(5);
    for _ in 0..n {
        h.record(ms / 1000.0);
    }
    let k = LatKey {
        direction: dir,
        workload: reporter.into(),
        service: SVC.into(),
        peer_workload: peer.into(),
    };
    (Arc::new(k), h)
}

#[test]
fn time_spent_between_two_proxies_is_latency_on_that_link_or_at_the_callees_host() {
    // shop waits 240 ms for answers catalog-ct's proxy gives in 4 ms; web waits 5 ms.
    let mut win = window(healthy());
    win.latency = vec![
        lat(Out, "test/shop", "test/catalog-ct", 240.0, 50),
        lat(In, "test/catalog-ct", "test/shop", 4.0, 50),
        lat(Out, "test/web", "test/catalog-ct", 5.0, 50),
        lat(In, "test/catalog-ct", "test/web", 4.0, 50),
        // Too few to say anything.
        lat(Out, "test/api", "test/catalog-ct", 900.0, 5),
        lat(In, "test/catalog-ct", "test/api", 4.0, 5),
    ];
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Network);
    assert!(
        matches!(&v[0].place, Place::Link { from, to } if from.workload == "test/shop" && to.workload == "test/catalog-ct"),
        "{v:#?}"
    );
    let ev = v[0].evidence.join("\n");
    assert!(ev.contains("test/shop waited 2"), "{ev}");
    assert!(
        ev.contains("1 other caller(s) of test/catalog-ct see less than 20 ms"),
        "{ev}"
    );
    // Both callers wait: the callee's host (or its proxy), not a link.
    win.latency[2] = lat(Out, "test/web", "test/catalog-ct", 200.0, 50);
    let v = run(&win, &Facts::default());
    let places: Vec<&str> = v.iter().map(workload_of).collect();
    assert!(places.contains(&"test/catalog-ct"), "{v:#?}");
    assert!(v.iter().all(|x| x.cause == Cause::Network), "{v:#?}");
    // The application itself is slow (both ends wait alike): not the network's.
    win.latency = vec![
        lat(Out, "test/shop", "test/catalog-ct", 240.0, 50),
        lat(In, "test/catalog-ct", "test/shop", 236.0, 50),
    ];
    assert!(run(&win, &Facts::default()).is_empty());
}

#[test]
fn slow_requests_slow_at_the_callee_are_its_application_and_quick_there_the_link() {
    let slow = |reporter: &str, direction: u32, id: u64, peer: &str, ms: u32| {
        let mut a = (*listed(reporter, direction, id, peer, F::Ok)).clone();
        a.attempt.latency_ms = ms;
        a.attempt.at_ms = 1_000 * id;
        Arc::new(a)
    };
    // shop's four slow requests to catalog-vm: the VM's proxy timed them slow too.
    let mut win = window(healthy());
    win.slow = (1..=4)
        .map(|id| slow("test/shop", 0, id, "test/catalog-vm", 1_500))
        .chain((1..=4).map(|id| slow("test/catalog-vm", 1, id, "test/shop", 1_450)))
        .collect();
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(
        (v[0].cause, workload_of(&v[0])),
        (Cause::Application, "test/catalog-vm")
    );
    assert!(
        v[0].evidence.iter().any(
            |e| e.contains("4 of test/shop's requests to test/catalog-vm took 1000 ms or more")
        ),
        "{v:#?}"
    );
    assert_eq!((v[0].first_ms, v[0].last_ms), (Some(1_000), Some(4_000)));
    assert_eq!(v[0].traces.len(), 3);
    // The same requests quick at the callee: their time went between the proxies.
    win.slow.truncate(4);
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Network);
    assert!(
        matches!(&v[0].place, Place::Link { to, .. } if to.workload == "test/catalog-vm"),
        "{v:#?}"
    );
    assert!(
        v[0].evidence
            .iter()
            .any(|e| e.contains("timed only 0 of 4")),
        "{v:#?}"
    );
    // Unless the callee's proxy has not reported since they ended: then nothing is said
    // yet (its list may still be on the way), and once it has, the verdict is the link's.
    win.reporting = vec![("test/catalog-vm".into(), 3_500)];
    assert!(run(&win, &Facts::default()).is_empty());
    win.reporting = vec![("test/catalog-vm".into(), 5_000)];
    let v = run(&win, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Network);
    // Two are too few to say.
    win.slow.truncate(2);
    assert!(run(&win, &Facts::default()).is_empty());
}

/// A TCP series: connections counted as `tcp_closed`; the callee's side names the caller's
/// identity only (a stream has no header to name its workload).
fn tcp(
    dir: Direction,
    reporter: &str,
    peer: &str,
    service: &str,
    class: FailureClass,
    n: u32,
) -> (Arc<Key>, Counts) {
    let (k, _) = s(dir, reporter, peer, service, class, 0);
    let mut k = (*k).clone();
    k.protocol = Protocol::Tcp;
    if dir == In {
        k.peer_identity = format!("spiffe://trellis.local/ns/test/sa/{peer}").into();
        k.peer_workload = "".into();
        k.peer_environment = "".into();
        k.peer_locality = "".into();
    }
    let c = Counts {
        tcp_closed: n,
        ..Counts::default()
    };
    (Arc::new(k), c)
}

#[test]
fn a_tcp_caller_reset_by_a_callee_whose_application_refused_is_the_application() {
    const DB: &str = "test/db";
    let w = vec![
        tcp(Out, "test/shop", "test/db-vm", DB, F::ConnectionReset, 5),
        tcp(In, "test/db-vm", "shop", DB, F::ConnectRefused, 5),
    ];
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Application);
    assert_eq!(workload_of(&v[0]), "test/db-vm");
    assert_eq!(v[0].caller_saw[&F::ConnectionReset], 5);
    assert_eq!(v[0].callee_saw[&F::ConnectRefused], 5);
    // Fewer refusals at the callee than resets at the caller: the rest went elsewhere (the
    // network's), so the resets are not all explained by the application.
    let w = vec![
        tcp(Out, "test/shop", "test/db-vm", DB, F::ConnectionReset, 9),
        tcp(In, "test/db-vm", "shop", DB, F::ConnectRefused, 5),
    ];
    let v = run(&window(w), &Facts::default());
    assert!(v.iter().any(|v| v.cause == Cause::Network), "{v:#?}");
    // Two callers of the same hop: the callee's streams name neither, so they must explain
    // both callers' resets together: 10 refused for 5 + 5 resets is one application
    // verdict with both callers' resets joined, the callee's refusals counted once.
    let w = vec![
        tcp(Out, "test/shop", "test/db-vm", DB, F::ConnectionReset, 5),
        tcp(Out, "test/cart", "test/db-vm", DB, F::ConnectionReset, 5),
        tcp(In, "test/db-vm", "shop", DB, F::ConnectRefused, 10),
    ];
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Application);
    assert_eq!(v[0].caller_saw[&F::ConnectionReset], 10);
    assert_eq!(v[0].callee_saw[&F::ConnectRefused], 10);
    // 6 refused for 5 + 5 resets: some resets are not the application's; neither caller's
    // are joined to it, and the network is judged as before.
    let w = vec![
        tcp(Out, "test/shop", "test/db-vm", DB, F::ConnectionReset, 5),
        tcp(Out, "test/cart", "test/db-vm", DB, F::ConnectionReset, 5),
        tcp(In, "test/db-vm", "shop", DB, F::ConnectRefused, 6),
    ];
    let v = run(&window(w), &Facts::default());
    let app = v
        .iter()
        .find(|v| v.cause == Cause::Application)
        .expect("the callee's own refusals");
    assert!(!app.caller_saw.contains_key(&F::ConnectionReset), "{v:#?}");
    assert!(v.iter().any(|v| v.cause == Cause::Network), "{v:#?}");
}

#[test]
fn resets_beside_refusals_already_told_are_not_the_refusals() {
    // HTTP: the caller was told of 10 refusals (connect_refused carried back) and saw 5
    // resets the callee never recorded: the resets are not the application's.
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectRefused,
        10,
    ));
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectionReset,
        5,
    ));
    w.push(s(
        In,
        "test/catalog-vm",
        "test/shop",
        SVC,
        F::ConnectRefused,
        10,
    ));
    let v = run(&window(w), &Facts::default());
    let app = v
        .iter()
        .find(|v| v.cause == Cause::Application)
        .expect("the application down");
    assert!(!app.caller_saw.contains_key(&F::ConnectionReset), "{v:#?}");
    assert!(v.iter().any(|v| v.cause == Cause::Network), "{v:#?}");
}

#[test]
fn a_tcp_caller_reset_by_a_callee_that_refused_it_by_policy_is_the_policy() {
    const DB: &str = "test/db";
    for refused in [F::Denied, F::Overloaded] {
        let w = vec![
            tcp(Out, "test/shop", "test/db-vm", DB, F::ConnectionReset, 5),
            tcp(In, "test/db-vm", "shop", DB, refused, 5),
        ];
        let v = run(&window(w), &Facts::default());
        assert_eq!(v.len(), 1, "{v:#?}");
        assert_eq!(v[0].cause, Cause::MeshPolicy, "{v:#?}");
        assert_eq!(v[0].caller_saw[&F::ConnectionReset], 5);
        assert_eq!(v[0].callee_saw[&refused], 5);
    }
    // Two callers denied on one hop: one policy verdict, the callee's count once.
    let w = vec![
        tcp(Out, "test/shop", "test/db-vm", DB, F::ConnectionReset, 5),
        tcp(Out, "test/cart", "test/db-vm", DB, F::ConnectionReset, 5),
        tcp(In, "test/db-vm", "shop", DB, F::Denied, 10),
    ];
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::MeshPolicy, "{v:#?}");
    assert_eq!(v[0].caller_saw[&F::ConnectionReset], 10);
    assert_eq!(v[0].callee_saw[&F::Denied], 10);
}

#[test]
fn an_application_that_resets_its_connections_is_the_application_not_the_network() {
    // HTTP: the callee's proxy had its exchanges with its application reset, and the caller
    // got that back: the application's.
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectionReset,
        5,
    ));
    w.push(s(
        In,
        "test/catalog-vm",
        "test/shop",
        SVC,
        F::ConnectionReset,
        5,
    ));
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].cause, Cause::Application);
    assert_eq!(workload_of(&v[0]), "test/catalog-vm");
    assert_eq!(v[0].caller_saw[&F::ConnectionReset], 5);
    assert_eq!(v[0].callee_saw[&F::ConnectionReset], 5);
    assert!(v[0].problem.contains("resets its connections"), "{v:#?}");
    // Resets the callee never recorded are still the network's.
    let mut w = healthy();
    w.push(s(
        Out,
        "test/shop",
        "test/catalog-vm",
        SVC,
        F::ConnectionReset,
        5,
    ));
    w.push(s(In, "test/catalog-vm", "test/shop", SVC, F::Ok, 5));
    let v = run(&window(w), &Facts::default());
    assert!(v.iter().all(|v| v.cause == Cause::Network), "{v:#?}");
    // A TCP stream's reset at both ends, from a proxy older than the stream's hello (the
    // callee's side names no caller), could be either side's: not the application's by
    // this rule.
    let caller = tcp(
        Out,
        "test/shop",
        "test/db-vm",
        "test/db",
        F::ConnectionReset,
        5,
    );
    let (callee, c) = tcp(In, "test/db-vm", "shop", "test/db", F::ConnectionReset, 5);
    let w = vec![caller.clone(), (callee.clone(), c)];
    let v = run(&window(w), &Facts::default());
    assert!(v.iter().all(|v| v.cause != Cause::Application), "{v:#?}");
    // A stream whose hello named its caller came through a callee's proxy that records its
    // application's reset as `connection_reset` and its caller's leaving otherwise: the
    // application's.
    let mut named = (*callee).clone();
    named.peer_workload = "test/shop".into();
    let w = vec![caller, (Arc::new(named), c)];
    let v = run(&window(w), &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(
        (v[0].cause, workload_of(&v[0])),
        (Cause::Application, "test/db-vm")
    );
    assert!(v[0].problem.contains("resets its connections"), "{v:#?}");
}

#[test]
fn no_route_to_a_service_whose_route_has_a_dangling_backend_names_that_backend() {
    let w = window(vec![s(Out, "test/shop", "", "test/web", F::NoRoute, 6)]);
    // Nothing known of the service's routes: the caller asks for a name nobody answers.
    let v = run(&w, &Facts::default());
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(workload_of(&v[0]), "test/shop");
    assert!(
        v[0].problem
            .contains("calls a name no Service or route answers"),
        "{v:#?}"
    );
    // The control plane serves test/web's route with a backend that does not resolve.
    let line = "HTTPRoute test/web: rule 0 sends 1 of 4 by weight to test/web-v2:80, which does not resolve (Service test/web-v2 not found)";
    let facts = Facts {
        dangling: [("test/web".to_string(), vec![line.to_string()])].into(),
        ..Facts::default()
    };
    let v = run(&w, &facts);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(
        (v[0].cause, v[0].place.clone()),
        (
            Cause::Configuration,
            Place::Service {
                name: "test/web".into()
            }
        )
    );
    assert!(v[0].problem.contains("does not resolve"), "{v:#?}");
    assert!(v[0].evidence.iter().any(|e| e == line), "{v:#?}");
    assert!(
        v[0].evidence[0].starts_with("6 requests from test/shop"),
        "{v:#?}"
    );
}
