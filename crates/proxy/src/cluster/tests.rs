use std::collections::HashMap;

use super::*;
use trellis_model::{
    proxy::BackendPolicy,
    resource::{Environment, Locality, Protocol},
};

/// Endpoint `i`: `127.0.0.{i+1}:80`, workload `ns/w{i}`.
fn endpoint(i: usize, weight: u32, environment: Environment, locality: Locality) -> EndpointConfig {
    EndpointConfig {
        addr: format!("127.0.0.{}:80", i + 1).parse().unwrap(),
        weight,
        workload: format!("ns/w{i}").parse().unwrap(),
        environment,
        locality,
        mesh: None,
        recoveries: 0,
    }
}

/// A new cluster `ns/s:80` of `endpoints` with `policy`, for a caller at `here`.
fn built(
    endpoints: Vec<EndpointConfig>,
    policy: BackendPolicy,
    here: Option<&Locality>,
) -> Cluster {
    let cfg = ClusterConfig {
        service: "ns/s".parse().unwrap(),
        port: 80,
        protocol: Protocol::Http,
        endpoints,
        policy,
        mtls: Default::default(),
    };
    let mut reg = prometheus_client::registry::Registry::default();
    Cluster::new(
        "ns/s:80".into(),
        Arc::new(cfg),
        None,
        &Metrics::register(&mut reg),
        here,
        false,
    )
}

fn cluster(lb: LbKind, weights: &[u32]) -> Cluster {
    let endpoints = weights
        .iter()
        .enumerate()
        .map(|(i, w)| endpoint(i, *w, Environment::Vm, Locality::default()))
        .collect();
    let policy = BackendPolicy {
        lb,
        consecutive_failures: 3,
        max_ejection_percent: 50,
        ..Default::default()
    };
    built(endpoints, policy, None)
}

fn spread(c: &Cluster, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        *m.entry(c.pick(Instant::now()).unwrap().cfg.addr.to_string())
            .or_default() += 1;
    }
    m
}

#[test]
fn round_robin_honours_weights() {
    let c = cluster(LbKind::RoundRobin, &[1, 3]);
    let m = spread(&c, 400);
    assert_eq!(m["127.0.0.1:80"], 100);
    assert_eq!(m["127.0.0.2:80"], 300);
}

#[test]
fn ewma_prefers_fast_endpoint() {
    let c = cluster(LbKind::PeakEWMA, &[1, 1]);
    c.endpoints[0].observe_latency(Duration::from_millis(50), Instant::now());
    c.endpoints[1].observe_latency(Duration::from_micros(200), Instant::now());
    let m = spread(&c, 1000);
    assert!(m.get("127.0.0.2:80").copied().unwrap_or(0) > 900, "{m:?}");
}

#[test]
fn least_request_avoids_busy_endpoint() {
    let c = cluster(LbKind::LeastRequest, &[1, 1, 1]);
    let _busy: Vec<_> = (0..10).map(|_| c.endpoints[0].start()).collect();
    let m = spread(&c, 300);
    assert_eq!(m.get("127.0.0.1:80"), None, "{m:?}");
}

#[test]
fn consecutive_failures_eject_with_cap() {
    let c = cluster(LbKind::RoundRobin, &[1, 1, 1]);
    for _ in 0..3 {
        c.report(&c.endpoints[0], FailureClass::ConnectRefused);
        c.report(&c.endpoints[1], FailureClass::AppError);
    }
    assert!(c.endpoints[0].ejected());
    // 2 of 3 would exceed 50%: the second endpoint stays in.
    assert!(!c.endpoints[1].ejected());
    let m = spread(&c, 100);
    assert!(!m.contains_key("127.0.0.1:80"));
}

#[test]
fn success_resets_the_failure_streak() {
    let c = cluster(LbKind::RoundRobin, &[1, 1]);
    for _ in 0..10 {
        c.report(&c.endpoints[0], FailureClass::AppError);
        c.report(&c.endpoints[0], FailureClass::Ok);
    }
    assert!(!c.endpoints[0].ejected());
}

#[test]
fn budget_limits_retries() {
    let b = RetryBudget::new(20, 0);
    for _ in 0..100 {
        b.deposit(Instant::now());
    }
    let granted = (0..100).filter(|_| b.withdraw(Instant::now())).count();
    assert_eq!(granted, 20);
}

fn loc(region: &str, zone: &str) -> Locality {
    Locality {
        region: Some(region.into()),
        zone: Some(zone.into()),
        host: None,
    }
}

/// Endpoints 127.0.0.1-2 in r1/z1 (the caller's zone), .3-.4 in r1/z2, .5-.6 in r2/z3.
fn located(locality: trellis_model::proxy::LocalityLb) -> Cluster {
    let places = [
        ("r1", "z1"),
        ("r1", "z1"),
        ("r1", "z2"),
        ("r1", "z2"),
        ("r2", "z3"),
        ("r2", "z3"),
    ];
    let endpoints = places
        .iter()
        .enumerate()
        .map(|(i, (r, z))| endpoint(i, 1, Environment::Vm, loc(r, z)))
        .collect();
    let policy = BackendPolicy {
        lb: LbKind::RoundRobin,
        consecutive_failures: 1,
        max_ejection_percent: 100,
        locality,
        ..Default::default()
    };
    built(endpoints, policy, Some(&loc("r1", "z1")))
}

/// Share of picks per locality label, in percent (10,000 picks: one percentage point is
/// about five standard deviations of a 30 % share).
fn shares(c: &Cluster) -> HashMap<String, usize> {
    let mut m: HashMap<String, usize> = HashMap::new();
    for _ in 0..10_000 {
        *m.entry(
            c.pick(Instant::now())
                .unwrap()
                .locality
                .as_str()
                .to_string(),
        )
        .or_default() += 1;
    }
    m.into_iter().map(|(k, v)| (k, (v + 50) / 100)).collect()
}

#[test]
fn failover_keeps_traffic_in_the_zone_then_spills_by_health() {
    let c = located(Default::default());
    // All healthy: the caller's zone takes everything.
    assert_eq!(shares(&c), HashMap::from([("r1/z1".to_string(), 100)]));
    // Half the zone ejected: 50 % × 1.4 = 70 % stays, 30 % goes to the region.
    c.report(&c.endpoints[0], FailureClass::ConnectRefused);
    let s = shares(&c);
    assert!((68..=72).contains(&s["r1/z1"]), "{s:?}");
    assert!((28..=32).contains(&s["r1/z2"]), "{s:?}");
    assert!(
        !s.contains_key("r2/z3"),
        "the other region is not needed: {s:?}"
    );
    // The zone gone: the region takes everything; the region gone too: anywhere.
    c.report(&c.endpoints[1], FailureClass::ConnectRefused);
    assert_eq!(shares(&c), HashMap::from([("r1/z2".to_string(), 100)]));
    c.report(&c.endpoints[2], FailureClass::ConnectRefused);
    c.report(&c.endpoints[3], FailureClass::ConnectRefused);
    assert_eq!(shares(&c), HashMap::from([("r2/z3".to_string(), 100)]));
}

#[test]
fn a_higher_overprovisioning_factor_keeps_a_degraded_zone_whole() {
    let c = located(trellis_model::proxy::LocalityLb {
        overprovisioning: 200,
        ..Default::default()
    });
    c.report(&c.endpoints[0], FailureClass::ConnectRefused);
    // 50 % × 2.0 = 100 %: no spill.
    assert_eq!(shares(&c), HashMap::from([("r1/z1".to_string(), 100)]));
}

#[test]
fn weighted_localities_share_by_weight_and_skip_dead_ones() {
    use trellis_model::resource::{LocalityMode, LocalityWeight};
    let w = |region: &str, zone: Option<&str>, weight| LocalityWeight {
        region: Some(region.into()),
        zone: zone.map(Into::into),
        weight,
    };
    let c = located(trellis_model::proxy::LocalityLb {
        mode: LocalityMode::Weighted,
        overprovisioning: 140,
        weights: vec![w("r1", Some("z2"), 75), w("r2", None, 25)],
    });
    let s = shares(&c);
    assert!((73..=77).contains(&s["r1/z2"]), "{s:?}");
    assert!((23..=27).contains(&s["r2/z3"]), "{s:?}");
    assert!(!s.contains_key("r1/z1"), "no weight, no traffic: {s:?}");
    c.report(&c.endpoints[4], FailureClass::ConnectRefused);
    c.report(&c.endpoints[5], FailureClass::ConnectRefused);
    assert_eq!(shares(&c), HashMap::from([("r1/z2".to_string(), 100)]));
}

#[test]
fn without_a_caller_locality_or_with_it_disabled_localities_do_not_matter() {
    let c = located(trellis_model::proxy::LocalityLb {
        mode: trellis_model::resource::LocalityMode::Disabled,
        ..Default::default()
    });
    assert_eq!(shares(&c).len(), 3, "every locality gets traffic");
}

#[test]
fn a_retry_avoids_the_endpoint_that_just_failed() {
    let c = cluster(LbKind::RoundRobin, &[1, 1]);
    let first = c.endpoints[0].clone();
    for _ in 0..50 {
        let e = c.pick_avoiding(Instant::now(), Some(&first)).unwrap();
        assert!(!Arc::ptr_eq(&e, &first));
    }
    // With localities: never the endpoint just tried; the zone's other endpoint or (as the
    // zone now counts half healthy: 70 % stays) its region, never another region.
    let z = located(Default::default());
    for _ in 0..200 {
        let again = z
            .pick_avoiding(Instant::now(), Some(&z.endpoints[0]))
            .unwrap();
        assert!(!Arc::ptr_eq(&again, &z.endpoints[0]));
        assert_ne!(again.locality.as_str(), "r2/z3");
    }
    // The only endpoint: tried again rather than none.
    let one = cluster(LbKind::RoundRobin, &[1]);
    let only = one.endpoints[0].clone();
    assert!(Arc::ptr_eq(
        &one.pick_avoiding(Instant::now(), Some(&only)).unwrap(),
        &only
    ));
}

#[test]
fn a_health_check_that_passes_again_lifts_an_ejection() {
    let c = cluster(LbKind::RoundRobin, &[1]);
    let ep = c.endpoints[0].clone();
    for _ in 0..3 {
        c.report(&ep, FailureClass::ConnectRefused);
    }
    assert!(
        ep.ejected(),
        "the only endpoint is ejected (one ejection is always allowed)"
    );
    assert!(c.pick_avoiding(Instant::now(), None).is_none());
    // The same config again: still ejected, and its pool and estimates carried over.
    let again = rebuilt(&c, 0);
    assert!(Arc::ptr_eq(&again.endpoints[0], &ep));
    assert!(ep.ejected());
    // Its agent reports a check that passed after failing: the ejection is lifted at once.
    let recovered = rebuilt(&again, 1);
    assert!(
        Arc::ptr_eq(&recovered.endpoints[0], &ep),
        "same endpoint state"
    );
    assert!(!ep.ejected());
    assert!(recovered.pick_avoiding(Instant::now(), None).is_some());
    // Seen once: a later reload with the same count does not lift a new ejection.
    for _ in 0..3 {
        recovered.report(&ep, FailureClass::ConnectRefused);
    }
    assert!(ep.ejected());
    rebuilt(&recovered, 1);
    assert!(ep.ejected());
}

#[test]
fn turning_outlier_detection_off_lifts_its_ejections() {
    let c = cluster(LbKind::RoundRobin, &[1, 1]);
    let ep = c.endpoints[0].clone();
    for _ in 0..3 {
        c.report(&ep, FailureClass::ConnectRefused);
    }
    assert!(ep.ejected());
    // Another change to the policy keeps it out for its time.
    let mut cfg = (*c.cfg).clone();
    cfg.policy.max_ejection_percent = 100;
    let other = rebuilt_from(&c, cfg);
    assert!(Arc::ptr_eq(&other.endpoints[0], &ep));
    assert!(ep.ejected());
    // Detection off: back at once, and nothing ejects it any more.
    let mut cfg = (*other.cfg).clone();
    cfg.policy.consecutive_failures = 0;
    let off = rebuilt_from(&other, cfg);
    assert!(Arc::ptr_eq(&off.endpoints[0], &ep), "same endpoint state");
    assert!(!ep.ejected());
    for _ in 0..10 {
        off.report(&ep, FailureClass::ConnectRefused);
    }
    assert!(!ep.ejected());
}

/// `c` rebuilt from its own config, its endpoints reporting `recoveries`.
fn rebuilt(c: &Cluster, recoveries: u64) -> Cluster {
    let mut cfg = (*c.cfg).clone();
    for e in &mut cfg.endpoints {
        e.recoveries = recoveries;
    }
    rebuilt_from(c, cfg)
}

/// `c` rebuilt from `cfg`.
fn rebuilt_from(c: &Cluster, cfg: ClusterConfig) -> Cluster {
    let mut reg = prometheus_client::registry::Registry::default();
    Cluster::new(
        c.key.clone(),
        Arc::new(cfg),
        Some(c),
        &Metrics::register(&mut reg),
        None,
        false,
    )
}

#[test]
fn an_endpoint_never_timed_is_tried_before_a_faster_timed_one() {
    // a has answered in 0.2 ms; b joins (or comes back) untimed, with the fixed 1 ms
    // estimate: without the warm start, power of two choices never picks it.
    let c = cluster(LbKind::PeakEWMA, &[1, 1]);
    let now = Instant::now();
    c.endpoints[0].observe_latency(Duration::from_micros(200), now);
    let mut reg = prometheus_client::registry::Registry::default();
    let again = Cluster::new(
        "ns/s:80".into(),
        c.cfg.clone(),
        Some(&c),
        &Metrics::register(&mut reg),
        None,
        false,
    );
    assert_eq!(
        again.pick(Instant::now()).unwrap().cfg.addr.to_string(),
        "127.0.0.2:80",
        "the untimed endpoint is tried next"
    );
}

/// Endpoints .1-.2 on VMs, .3-.4 in containers, .5 on bare metal; spill-over pools vm,
/// then container (bare metal matches neither: the last pool).
fn pooled() -> Cluster {
    use trellis_model::resource::PoolSpec;
    let envs = [
        Environment::Vm,
        Environment::Vm,
        Environment::Container,
        Environment::Container,
        Environment::BareMetal,
    ];
    let endpoints = envs
        .iter()
        .enumerate()
        .map(|(i, env)| endpoint(i, 1, *env, Locality::default()))
        .collect();
    let pool = |e| PoolSpec {
        environment: Some(e),
        ..Default::default()
    };
    let policy = BackendPolicy {
        lb: LbKind::RoundRobin,
        consecutive_failures: 1,
        max_ejection_percent: 100,
        spillover: Some(trellis_model::proxy::Spillover {
            pools: vec![pool(Environment::Vm), pool(Environment::Container)],
            high: 80,
            low: 50,
            hold: Duration::from_secs(3),
        }),
        ..Default::default()
    };
    built(endpoints, policy, None)
}

/// Share of picks per environment, percent.
fn env_shares(c: &Cluster) -> HashMap<String, usize> {
    let mut m: HashMap<String, usize> = HashMap::new();
    for _ in 0..10_000 {
        let e = c.pick(Instant::now()).unwrap();
        *m.entry(e.environment.as_str().to_string()).or_default() += 1;
    }
    m.into_iter().map(|(k, v)| (k, (v + 50) / 100)).collect()
}

#[test]
fn spill_shares_move_traffic_down_the_preference_with_health_underneath() {
    let c = pooled();
    let shares = c.spill_shares().unwrap();
    // No share: the first pool takes everything.
    assert_eq!(env_shares(&c), HashMap::from([("vm".to_string(), 100)]));
    // 30 % of the VMs' traffic spills to the containers.
    shares.set(&[300]);
    let s = env_shares(&c);
    assert!((68..=72).contains(&s["vm"]), "{s:?}");
    assert!((28..=32).contains(&s["container"]), "{s:?}");
    // And half of what reaches the containers on to bare metal: 15 %.
    shares.set(&[300, 500]);
    let s = env_shares(&c);
    assert!((13..=17).contains(&s["bare-metal"]), "{s:?}");
    assert!((13..=17).contains(&s["container"]), "{s:?}");
    // A rebuilt cluster with the same pools keeps the shares (a reload moves nothing back).
    let mut reg = prometheus_client::registry::Registry::default();
    let again = Cluster::new(
        c.key.clone(),
        c.cfg.clone(),
        Some(&c),
        &Metrics::register(&mut reg),
        None,
        false,
    );
    assert_eq!(again.spill_shares().unwrap().get(0), 300);
    // Health underneath: the containers gone, the VMs' spill skips to bare metal; the VMs
    // gone too, bare metal takes everything whatever the shares say.
    shares.set(&[300]);
    c.report(&c.endpoints[2], FailureClass::ConnectRefused);
    c.report(&c.endpoints[3], FailureClass::ConnectRefused);
    let s = env_shares(&c);
    assert!((28..=32).contains(&s["bare-metal"]), "{s:?}");
    assert!(!s.contains_key("container"), "{s:?}");
    c.report(&c.endpoints[0], FailureClass::ConnectRefused);
    c.report(&c.endpoints[1], FailureClass::ConnectRefused);
    assert_eq!(
        env_shares(&c),
        HashMap::from([("bare-metal".to_string(), 100)])
    );
}
