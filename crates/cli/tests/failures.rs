//! Each failure class provoked for real, and checked in the response header, the metric
//! and the access-log line.

mod common;

use std::time::Duration;

use common::*;

async fn check(p: &ProxyProcess, host: &str, status: u16, class: &str) {
    let r = client::get_full(p.outbound, host, &format!("/{class}"), &[])
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), status, "{host}: {:?}", r.body);
    assert_eq!(
        r.headers
            .get("x-trellis-failure")
            .map(|v| v.to_str().unwrap()),
        Some(class),
        "{host}"
    );
    let log = p
        .wait_log(class, |l| l["path"] == format!("/{class}"))
        .await;
    assert_eq!(log["failure_class"], class, "{log}");
    assert_eq!(log["status"], status);
    let n = p
        .metric(
            "trellis_http_requests_total",
            &[
                ("failure_class", class),
                ("status_code", &status.to_string()),
            ],
        )
        .await;
    assert!(n >= 1.0, "metric for {class}");
}

#[tokio::test]
async fn network_failures_are_classified() {
    let closed = upstream::closed_port().await;
    let hang = upstream::hang().await;
    let reset = upstream::reset_mid_response().await;
    let (backlog, _fill, _sock) = upstream::full_backlog().await;
    let cfg = docs(&[
        service("refused", "HTTP", &[closed]),
        service("hang", "HTTP", &[hang]),
        service("reset", "HTTP", &[reset]),
        service("backlog", "HTTP", &[backlog]),
        service("empty", "HTTP", &[]),
        route("hang", "hang", "    - timeouts: { request: 300ms }\n"),
        policy("backlog", "  connectionPool: { connectTimeout: 300ms }\n"),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    check(&p, "refused.test", 502, "connect_refused").await;
    check(&p, "hang.test", 504, "upstream_timeout").await;
    check(&p, "backlog.test", 504, "connect_timeout").await;
    check(&p, "empty.test", 503, "no_healthy_upstream").await;
    check(&p, "nothing.test", 404, "no_route").await;
    // A reset after the head: the client sees a truncated body; the proxy records the reset.
    let r = client::get_full(p.outbound, "reset.test", "/reset", &[]).await;
    assert!(r.is_err(), "truncated body must fail at the client");
    let log = p.wait_log("reset line", |l| l["path"] == "/reset").await;
    assert_eq!(log["failure_class"], "connection_reset", "{log}");
    assert_eq!(log["failure_category"], "network");
}

#[tokio::test]
async fn application_errors_are_not_network_errors() {
    let hits = upstream::counter();
    let s503 = upstream::status(503, hits.clone()).await;
    let s404 = upstream::status(404, hits).await;
    let cfg = docs(&[
        service("bad", "HTTP", &[s503]),
        service("missing", "HTTP", &[s404]),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    let r = client::get_full(p.outbound, "bad.test", "/app", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert!(
        r.headers.get("x-trellis-failure").is_none(),
        "the upstream's own 503 is not proxy-made"
    );
    let log = p.wait_log("503 line", |l| l["path"] == "/app").await;
    assert_eq!(log["failure_class"], "app_error");
    assert_eq!(log["failure_category"], "application");
    client::get(p.outbound, "missing.test", "/c", &[])
        .await
        .unwrap();
    let log = p.wait_log("404 line", |l| l["path"] == "/c").await;
    assert_eq!(log["failure_class"], "client_error");
    let n = p
        .metric(
            "trellis_http_requests_total",
            &[
                ("dst_service", "bad.test"),
                ("failure_class", "app_error"),
                ("dst_environment", "vm"),
            ],
        )
        .await;
    assert_eq!(n, 1.0);
}

#[tokio::test]
async fn grpc_callers_get_trailers_only_status() {
    let closed = upstream::closed_port().await;
    let hang = upstream::hang().await;
    let cfg = docs(&[
        service("down", "GRPC", &[closed]),
        service("slow", "GRPC", &[hang]),
        route("slow", "slow", "    - timeouts: { request: 200ms }\n"),
        // A backend as the control plane serves one whose Service is gone: UNAVAILABLE, as
        // the Gateway API asks of a GRPCRoute (an HTTP caller gets 500).
        service("gone", "GRPC", &[]),
        route(
            "gone",
            "gone",
            "    - backendRefs: [{ name: nothing, port: 80, unresolved: Service test/nothing not found }]\n",
        ),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    for (host, code, class) in [
        ("down.test", tonic::Code::Unavailable, "connect_refused"),
        ("gone.test", tonic::Code::Unavailable, "no_route"),
        (
            "slow.test",
            tonic::Code::DeadlineExceeded,
            "upstream_timeout",
        ),
    ] {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", p.outbound))
            .unwrap()
            .origin(format!("http://{host}").parse().unwrap())
            .connect()
            .await
            .unwrap();
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
        let e = c
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{host}: {e:?}");
        assert_eq!(e.metadata().get("x-trellis-failure").unwrap(), class);
        assert!(e.message().contains(class), "{}", e.message());
    }
}

#[tokio::test]
async fn circuit_breaker_sheds_load_as_overloaded() {
    let slow = upstream::slow(Duration::from_millis(500)).await;
    let cfg = docs(&[
        service("busy", "HTTP", &[slow]),
        policy(
            "busy",
            "  connectionPool: { maxRequests: 2, maxPendingRequests: 1, connectTimeout: 100ms }\n",
        ),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    let outbound = p.outbound;
    let calls: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                client::get_full(outbound, "busy.test", "/cb", &[])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut overloaded = 0;
    let mut ok = 0;
    for c in calls {
        let r = c.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(r.headers["x-trellis-failure"], "overloaded");
                overloaded += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(ok, 2, "two in flight");
    assert_eq!(
        overloaded, 4,
        "one pending slot that times out after 100ms, the rest refused at once"
    );
    assert!(
        p.metric(
            "trellis_circuit_breaker_overflows_total",
            &[("cluster", "test/busy:80")]
        )
        .await
            >= 4.0
    );
}
