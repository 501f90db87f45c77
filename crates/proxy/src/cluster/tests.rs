use std::collections::HashMap;

use super::*;
use trellis_model::{
    proxy::BackendPolicy,
    resource::{Environment, Locality, Protocol},
};

fn cluster(lb: LbKind, weights: &[u32]) -> Cluster {
    let endpoints = weights
        .iter()
        .enumerate()
        .map(|(i, w)| EndpointConfig {
            addr: format!("127.0.0.{}:80", i + 1).parse().unwrap(),
            weight: *w,
            workload: format!("ns/w{i}").parse().unwrap(),
            environment: Environment::Vm,
            locality: Locality::default(),
            mesh: None,
        })
        .collect();
    let cfg = ClusterConfig {
        service: "ns/s".parse().unwrap(),
        port: 80,
        protocol: Protocol::Http,
        endpoints,
        policy: BackendPolicy {
            lb,
            consecutive_failures: 3,
            max_ejection_percent: 50,
            ..Default::default()
        },
        mtls: Default::default(),
    };
    let mut reg = prometheus_client::registry::Registry::default();
    Cluster::new("ns/s:80".into(), cfg, None, &Metrics::register(&mut reg))
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
