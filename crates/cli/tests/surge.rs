//! Absorbing a surge, on loopback through real proxies with mutual TLS: the callee's proxy
//! keeps an adaptive concurrency limit on its inbound side (on by default) that follows the
//! application's latency, and sheds what is over it at once, as `overloaded` with
//! `Proxy-Status: …; error=connection_limit_reached`, rather than queueing it.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use trellis_test_support::{control::ControlProcess, sum_metric};

fn mesh(app: u16, inbound: u16, adaptive: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: busy, namespace: test }}\nspec:\n  selector: {{ app: peer }}\n  ports: [{{ name: http, port: 80, targetPort: 1, protocol: HTTP }}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: peer, namespace: test, labels: {{ app: peer }} }}\nspec:\n  address: 127.0.0.1\n  identity: beta\n  inboundPort: {inbound}\n  ports: {{ http: {app} }}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: client, namespace: test }}\nspec: {{ address: 127.0.0.1, identity: client }}\n---\n{}",
        policy(
            "busy",
            &format!("  outlierDetection: {{ consecutiveFailures: 0 }}\n{adaptive}")
        )
    )
}

/// `n` requests at once, `rounds` times over: (answered, shed by the limit).
async fn flood(to: std::net::SocketAddr, n: usize, until: Instant) -> (usize, usize) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut shed) = (0, 0);
            while Instant::now() < until {
                let r = client::get_full(to, "busy.test", "/", &[]).await.unwrap();
                if r.status == 200 {
                    ok += 1;
                } else {
                    let class = r
                        .headers
                        .get("x-trellis-failure")
                        .map(|v| v.to_str().unwrap().to_string());
                    let status = r
                        .headers
                        .get("proxy-status")
                        .map(|v| v.to_str().unwrap().to_string());
                    assert_eq!(
                        (r.status.as_u16(), class.as_deref()),
                        (503, Some("overloaded")),
                        "{status:?}"
                    );
                    assert!(
                        status
                            .as_deref()
                            .is_some_and(|s| s.contains("error=connection_limit_reached")),
                        "{status:?}"
                    );
                    shed += 1;
                }
            }
            (ok, shed)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (ok, shed) = t.await.unwrap();
        total = (total.0 + ok, total.1 + shed);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_shed_early_by_the_adaptive_limit_and_not_when_the_policy_turns_it_off() {
    // The application serves 10 at once in 20 ms; beyond that its requests queue (each
    // takes 20 ms × in flight / 10).
    let in_flight = Arc::new(AtomicUsize::new(0));
    let n = in_flight.clone();
    let app = upstream::http(move |_| {
        let n = n.clone();
        async move {
            let now = n.fetch_add(1, Ordering::SeqCst) + 1;
            let ms = 20 * (now as u64).max(10) / 10;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from("done")))
        }
    })
    .await;
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, mesh(app.port(), 1, "")).await;
    let join = |who: &str, workload: &str| {
        join_xds(
            &cp,
            &cp.xds_url(),
            who,
            workload,
            &["--report-interval", "200ms"],
        )
    };
    let callee = join("beta", "test/peer");
    callee.wait_ready().await;
    apply_ok(&cp, mesh(app.port(), callee.inbound.port(), "")).await;
    let caller = join("client", "test/client");
    caller.wait_ready().await;
    eventually(
        "the caller reaches the callee",
        Duration::from_secs(10),
        async || {
            let r = client::get_full(caller.outbound, "busy.test", "/", &[])
                .await
                .ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;

    // Light load first (5 at once, 2 s): the limit learns the unloaded time.
    let (ok, shed) = flood(caller.outbound, 5, Instant::now() + Duration::from_secs(2)).await;
    assert_eq!(shed, 0, "light load is never shed ({ok} answered)");
    // Then 150 at once: latency climbs, the limit comes down, and the excess is shed.
    let (ok, shed) = flood(
        caller.outbound,
        150,
        Instant::now() + Duration::from_secs(4),
    )
    .await;
    let m = callee.metrics().await;
    let limit = sum_metric(&m, "trellis_adaptive_concurrency_limit", &[]);
    let counted = sum_metric(&m, "trellis_adaptive_concurrency_shed_total", &[]);
    eprintln!("flood: {ok} answered, {shed} shed; limit {limit}");
    assert!(shed > 0 && ok > 0, "{ok} answered, {shed} shed");
    assert!(counted >= shed as f64, "{counted} counted for {shed} seen");
    assert!(limit < 100.0, "the limit came down from its start: {limit}");

    // `diagnose` names the limit, at the callee.
    let v = verdict(&cp, "1m", Duration::from_secs(15), |x| {
        x["cause"] == "mesh_policy"
    })
    .await;
    assert!(
        v["problem"]
            .as_str()
            .unwrap()
            .contains("test/peer are shed by its adaptive concurrency limit"),
        "{v:#}"
    );

    // `stat` shows the workload's limit, as its proxy reported it.
    let out = eventually(
        "stat shows the limit",
        Duration::from_secs(10),
        async || {
            let out = common::ok(cli(
                &cp,
                &["stat", "workloads", "-n", "test", "--window", "1m"],
            ));
            let header = out.lines().find(|l| l.starts_with("NAME"))?.to_string();
            let col = header.find("LIMIT (IN FLIGHT)")?;
            let row = out
                .lines()
                .find(|l| l.starts_with("test/peer "))?
                .to_string();
            let limit: f64 = row.get(col..)?.split_whitespace().next()?.parse().ok()?;
            (limit < 100.0).then_some(out)
        },
    )
    .await;
    assert!(out.contains("overloaded"), "the sheds, as failures: {out}");

    // Turned off by the service's policy: the same flood queues, nothing is shed.
    apply_ok(
        &cp,
        mesh(
            app.port(),
            callee.inbound.port(),
            "  adaptiveConcurrency: { enabled: false }\n",
        ),
    )
    .await;
    eventually(
        "the callee takes the policy",
        Duration::from_secs(10),
        async || {
            let (ok, shed) = flood(
                caller.outbound,
                150,
                Instant::now() + Duration::from_secs(1),
            )
            .await;
            (shed == 0 && ok > 0).then_some(())
        },
    )
    .await;
}
