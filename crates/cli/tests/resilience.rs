//! Weighted splits, retries with a budget, outlier ejection.

mod common;

use std::sync::atomic::Ordering;

use common::*;

#[tokio::test]
async fn weighted_split_follows_weights() {
    let a = upstream::named("a").await;
    let b = upstream::named("b").await;
    let cfg = docs(&[
        service("web", "HTTP", &[]),
        service("web-a", "HTTP", &[a]),
        service("web-b", "HTTP", &[b]),
        route("web", "web", "    - backendRefs: [{ name: web-a, port: 80, weight: 80 }, { name: web-b, port: 80, weight: 20 }]\n"),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    let mut c = client::Conn::h1(p.outbound).await;
    let n = 3000;
    let mut hits_a = 0;
    for _ in 0..n {
        let r = c.get("web.test", "/").await.unwrap();
        assert_eq!(r.status, 200);
        if r.body == "a" {
            hits_a += 1;
        }
    }
    let share = f64::from(hits_a) / f64::from(n);
    assert!((share - 0.8).abs() < 0.05, "share of a = {share}");
}

#[tokio::test]
async fn retries_hide_a_flaky_upstream() {
    let hits = upstream::counter();
    let f = upstream::flaky(hits.clone()).await;
    let cfg = docs(&[
        service("flaky", "HTTP", &[f]),
        route("flaky", "flaky", "    - retry: { attempts: 3, codes: [503], backoff: 1ms }\n"),
        policy("flaky", "  outlierDetection: { consecutiveFailures: 0 }\n  retryBudget: { percent: 50, minRetriesPerSecond: 10 }\n"),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    let mut c = client::Conn::h1(p.outbound).await;
    let n = 1000;
    let mut ok = 0;
    for _ in 0..n {
        if c.get("flaky.test", "/").await.unwrap().status == 200 {
            ok += 1;
        }
    }
    assert!(f64::from(ok) / f64::from(n) >= 0.99, "success {ok}/{n}");
    assert!(
        hits.load(Ordering::Relaxed) > n as usize,
        "retries reached the upstream"
    );
    assert!(
        p.metric("trellis_retries_total", &[("outcome", "sent")])
            .await
            >= 300.0
    );
}

/// An endpoint that refuses connections (a proxy drained, a host gone) costs no request,
/// without any retry policy: a try that never left is sent once more, elsewhere, at once. POSTs
/// with a body too: nothing of them reached the refusing endpoint.
#[tokio::test]
async fn a_try_refused_at_connect_is_sent_elsewhere_without_a_retry_policy() {
    let hits = upstream::counter();
    let good = upstream::status(200, hits.clone()).await;
    let gone = upstream::closed_port().await;
    let cfg = docs(&[
        service("two", "HTTP", &[good, gone]),
        // Round robin and outlier detection off: every other try goes to the refusing
        // endpoint (peak-EWMA would learn to avoid it, as fast as the requests come).
        policy("two", "  loadBalancer: { type: RoundRobin }\n  outlierDetection: { consecutiveFailures: 0 }\n"),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    let mut c = client::Conn::h1(p.outbound).await;
    for i in 0..100 {
        let r = if i % 2 == 0 {
            c.get("two.test", "/").await.unwrap()
        } else {
            c.post("two.test", "/", bytes::Bytes::from_static(b"a body"))
                .await
                .unwrap()
        };
        assert_eq!(
            r.status,
            200,
            "request {i}: {:?}",
            r.headers.get("x-trellis-failure")
        );
    }
    assert_eq!(hits.load(Ordering::Relaxed), 100);
    let unsent = p
        .metric("trellis_retries_total", &[("outcome", "unsent")])
        .await;
    assert!(unsent >= 20.0, "{unsent} tries sent again");
    // One endpoint only, and it refuses: the request still fails, after two tries.
    let cfg = docs(&[service("lone", "HTTP", &[gone]), client_workload(&[])]);
    let p = start(&cfg);
    let r = client::get_full(p.outbound, "lone.test", "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["x-trellis-failure"], "connect_refused");
}

#[tokio::test]
async fn retry_budget_stops_a_retry_storm() {
    let hits = upstream::counter();
    let down = upstream::status(503, hits.clone()).await;
    let cfg = docs(&[
        service("down", "HTTP", &[down]),
        route("down", "down", "    - retry: { attempts: 3, codes: [503], backoff: 1ms }\n"),
        policy("down", "  outlierDetection: { consecutiveFailures: 0 }\n  retryBudget: { percent: 20, minRetriesPerSecond: 1 }\n"),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    let mut c = client::Conn::h1(p.outbound).await;
    let n = 500;
    for _ in 0..n {
        assert_eq!(c.get("down.test", "/").await.unwrap().status, 503);
    }
    // Without the budget, 3 retries each would make 2000 upstream hits. With it: 500 plus
    // 20% of requests plus the floor of 10 per window.
    let h = hits.load(Ordering::Relaxed);
    assert!(h <= n + n / 5 + 10 + 1, "upstream saw {h} requests");
    assert!(
        p.metric("trellis_retries_total", &[("outcome", "budget_exhausted")])
            .await
            > 0.0
    );
}

#[tokio::test]
async fn a_bad_endpoint_is_ejected_and_success_recovers() {
    let hits = upstream::counter();
    let good1 = upstream::named("g1").await;
    let good2 = upstream::named("g2").await;
    let bad = upstream::status(500, hits.clone()).await;
    let cfg = docs(&[
        service("pool", "HTTP", &[good1, bad, good2]),
        policy("pool", "  loadBalancer: { type: RoundRobin }\n  outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 30s }\n"),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    let mut c = client::Conn::h1(p.outbound).await;
    for _ in 0..30 {
        c.get("pool.test", "/").await.unwrap();
    }
    let bad_hits = hits.load(Ordering::Relaxed);
    assert_eq!(bad_hits, 3, "ejected after 3 consecutive failures");
    for _ in 0..100 {
        assert_eq!(c.get("pool.test", "/").await.unwrap().status, 200);
    }
    assert_eq!(
        p.metric(
            "trellis_outlier_ejected_endpoints",
            &[("cluster", "test/pool:80")]
        )
        .await,
        1.0
    );
    assert_eq!(
        p.metric(
            "trellis_outlier_ejections_total",
            &[("cluster", "test/pool:80")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn traffic_stays_in_the_callers_zone_and_fails_over_to_its_region() {
    use std::sync::{atomic::AtomicBool, Arc};
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let z1 = upstream::http(move |_| {
        let down = d.load(Ordering::Relaxed);
        async move {
            let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from("z1")));
            if down {
                *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
    })
    .await;
    let (z2, r2) = (upstream::named("z2").await, upstream::named("r2").await);
    let wl = |name: &str, app: &str, port: u16, region: &str, zone: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: {app} }} }}\nspec:\n  address: 127.0.0.1\n  ports: {{ main: {port} }}\n  locality: {{ region: {region}, zone: {zone} }}\n")
    };
    let client = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec:\n  address: 127.0.0.1\n  locality: { region: r1, zone: z1 }\n".to_string();
    let cfg = docs(&[
        service("web", "HTTP", &[]),
        wl("web-z1", "web", z1.port(), "r1", "z1"),
        wl("web-z2", "web", z2.port(), "r1", "z2"),
        wl("web-r2", "web", r2.port(), "r2", "z9"),
        route(
            "web",
            "web",
            "    - retry: { attempts: 2, codes: [503], backoff: 1ms }\n",
        ),
        policy("web", "  outlierDetection: { consecutiveFailures: 2 }\n"),
        client,
    ]);
    let p = start(&cfg);
    let mut c = client::Conn::h1(p.outbound).await;
    for _ in 0..100 {
        let r = c.get("web.test", "/").await.unwrap();
        assert_eq!(
            (r.status.as_u16(), &r.body[..]),
            (200, &b"z1"[..]),
            "the caller's zone first"
        );
    }
    assert_eq!(
        p.metric("trellis_http_requests_total", &[("dst_locality", "r1/z1")])
            .await,
        100.0
    );
    // The zone's only endpoint fails: ejected after two failures, hidden by the retry; the
    // traffic moves to the caller's region, not across regions.
    down.store(true, Ordering::Relaxed);
    for _ in 0..100 {
        let r = c.get("web.test", "/").await.unwrap();
        assert_eq!(r.status, 200, "no failure reaches the client");
        assert_ne!(
            &r.body[..],
            b"r2",
            "another region while this one has capacity"
        );
    }
    assert!(
        p.metric("trellis_http_requests_total", &[("dst_locality", "r1/z2")])
            .await
            >= 98.0
    );
    assert_eq!(
        p.metric("trellis_http_requests_total", &[("dst_locality", "r2/z9")])
            .await,
        0.0
    );
}
