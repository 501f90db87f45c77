//! Absorbing a surge, on loopback through real proxies with mutual TLS: the callee's proxy
//! keeps an adaptive concurrency limit on its inbound side (on by default) that follows the
//! application's latency, and sheds what is over it at once, as `overloaded` with
//! `Proxy-Status: …; error=connection_limit_reached`, rather than queueing it; and it holds
//! callers to a RateLimitPolicy's shares, fairly (a caller over its share drains nobody
//! else's), with 429 `rate_limited` and the RateLimit headers; and a service's traffic spills
//! over by load from its saturated VM pool to its containers, and comes back (also when the
//! caller's control-plane replica is not the one its callees tell their loads).

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
    let join = |who: &str, workload: &str| join_reporting(&cp, who, workload);
    let callee = join("beta", "test/peer");
    callee.wait_ready().await;
    apply_ok(&cp, mesh(app.port(), callee.inbound.port(), "")).await;
    let caller = join("client", "test/client");
    caller.wait_ready().await;
    until_answered(caller.outbound, "busy.test").await;

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

fn limited_mesh(app: u16, inbound: u16, mode: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: busy, namespace: test }}\nspec:\n  selector: {{ app: peer }}\n  ports: [{{ name: http, port: 80, targetPort: 1, protocol: HTTP }}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: peer, namespace: test, labels: {{ app: peer }} }}\nspec:\n  address: 127.0.0.1\n  identity: beta\n  inboundPort: {inbound}\n  ports: {{ http: {app} }}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: client, namespace: test }}\nspec: {{ address: 127.0.0.1, identity: client }}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: other, namespace: test }}\nspec: {{ address: 127.0.0.1, identity: other }}\n---\napiVersion: trellis.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{ name: busy, namespace: test }}\nspec:\n  targetRefs: [{{ name: busy }}]\n  mode: {mode}\n  perCaller: [{{ requests: 5, per: 1m }}]\n  total: [{{ requests: 8, per: 1m }}]\n"
    )
}

/// Wait until `proxy`'s config holds the RateLimitPolicy `policy`.
async fn holds_policy(proxy: &trellis_test_support::ProxyProcess, policy: &str) {
    let want = format!("\"policy\": \"{policy}\"");
    eventually(
        &format!("the callee holds {policy}"),
        Duration::from_secs(10),
        async || {
            let (_, body) = client::get(proxy.admin, "admin", "/config_dump", &[])
                .await
                .ok()?;
            String::from_utf8_lossy(&body).contains(&want).then_some(())
        },
    )
    .await;
}

/// `n` requests one after another from `via`: the statuses, and the last refusal.
async fn send(via: std::net::SocketAddr, n: usize) -> (usize, Option<client::Reply>) {
    let (mut ok, mut refused) = (0, None);
    for _ in 0..n {
        let r = client::get_full(via, "busy.test", "/", &[]).await.unwrap();
        if r.status == 200 {
            ok += 1;
        } else {
            refused = Some(r);
        }
    }
    (ok, refused)
}

#[tokio::test]
async fn a_caller_over_its_rate_limit_drains_nobody_elses_share() {
    let app = upstream::named("ok").await;
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, limited_mesh(app.port(), 1, "Enforce")).await;
    let join = |who: &str, workload: &str| join_reporting(&cp, who, workload);
    let callee = join("beta", "test/peer");
    callee.wait_ready().await;
    apply_ok(
        &cp,
        limited_mesh(app.port(), callee.inbound.port(), "Enforce"),
    )
    .await;
    let a = join("client", "test/client");
    let b = join("other", "test/other");
    a.wait_ready().await;
    b.wait_ready().await;
    // Each caller may send 5 a minute, all together 8 a minute (per callee workload): once
    // the callee's proxy holds the policy, the counts are exact.
    holds_policy(&callee, "test/busy").await;
    until_answered(a.outbound, "busy.test").await;
    // a used 1 already: 4 more of its own, then refused, without taking from the total.
    let (ok, refused) = send(a.outbound, 20).await;
    assert_eq!(ok, 4, "a's share");
    let r = refused.expect("a was refused");
    assert_eq!(r.status, 429);
    let h = |k: &str| r.headers.get(k).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(h("x-trellis-failure").as_deref(), Some("rate_limited"));
    assert_eq!(
        h("ratelimit-policy").as_deref(),
        Some("\"caller\";q=5;w=60")
    );
    assert!(
        h("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() >= 1),
        "{:?}",
        r.headers
    );
    assert!(h("proxy-status").is_some_and(|s| s.contains("error=http_request_denied")));
    // b gets what the total has left: 8 − a's 5 = 3, then the total refuses it.
    let (ok, refused) = send(b.outbound, 10).await;
    assert_eq!(
        ok, 3,
        "the total's rest, not drained by a's refused requests"
    );
    let r = refused.expect("b was refused");
    assert_eq!(
        r.headers.get("ratelimit-policy").unwrap(),
        "\"total\";q=8;w=60"
    );
    let m = callee.metrics().await;
    let over = |scope: &str, mode: &str| {
        sum_metric(
            &m,
            "trellis_rate_limited_total",
            &[("policy", "test/busy"), ("scope", scope), ("mode", mode)],
        )
    };
    assert_eq!(
        (over("caller", "enforce"), over("total", "enforce")),
        (16.0, 7.0)
    );

    // `diagnose` names the policy.
    let v = verdict(&cp, "1m", Duration::from_secs(15), |x| {
        x["problem"]
            .as_str()
            .is_some_and(|p| p.contains("over its RateLimitPolicy"))
    })
    .await;
    assert_eq!(v["cause"], "mesh_policy", "{v:#}");

    // Shadow mode counts what it would refuse and refuses nothing.
    apply_ok(
        &cp,
        limited_mesh(app.port(), callee.inbound.port(), "Shadow"),
    )
    .await;
    until_answered(a.outbound, "busy.test").await;
    // (A changed policy starts with fresh buckets: a has 5 again, and used at least 1.)
    let (ok, _) = send(a.outbound, 12).await;
    assert_eq!(ok, 12, "nothing refused");
    let m = callee.metrics().await;
    assert!(
        sum_metric(&m, "trellis_rate_limited_total", &[("mode", "shadow")]) >= 8.0,
        "{m}"
    );
}

/// `test/busy` on two workloads whose limit is 1 in flight each, in front of applications
/// that take 300 ms, and two callers; the route retries.
fn two_of_one(apps: (u16, u16), inbound: (u16, u16)) -> String {
    let peer = |name: &str, zone: &str, app: u16, inbound: u16| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: peer }} }}\nspec:\n  address: 127.0.0.1\n  identity: beta\n  locality: {{ region: r1, zone: {zone} }}\n  inboundPort: {inbound}\n  ports: {{ http: {app} }}\n")
    };
    let caller = |name: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test }}\nspec: {{ address: 127.0.0.1, identity: {name}, locality: {{ region: r1, zone: z1 }} }}\n")
    };
    [
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: busy, namespace: test }\nspec:\n  selector: { app: peer }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n".to_string(),
        peer("peer-1", "z1", apps.0, inbound.0),
        peer("peer-2", "z2", apps.1, inbound.1),
        caller("client"),
        caller("other"),
        route("busy", "busy", "    - backendRefs: [{ name: busy, port: 80 }]\n      retry: { attempts: 2, backoff: 1ms }\n"),
        policy(
            "busy",
            "  outlierDetection: { consecutiveFailures: 0 }\n  adaptiveConcurrency: { minLimit: 1, maxLimit: 1 }\n",
        ),
    ]
    .join("---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_shed_by_one_workload_is_retried_on_another() {
    let slow = || {
        upstream::http(|_| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from("done")))
        })
    };
    let (a1, a2) = (slow().await, slow().await);
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, two_of_one((a1.port(), a2.port()), (1, 1))).await;
    let (p1, p2) = (
        join_reporting(&cp, "beta", "test/peer-1"),
        join_reporting(&cp, "beta", "test/peer-2"),
    );
    p1.wait_ready().await;
    p2.wait_ready().await;
    let inbound = (p1.inbound.port(), p2.inbound.port());
    apply_ok(&cp, two_of_one((a1.port(), a2.port()), inbound)).await;
    let (a, b) = (
        join_reporting(&cp, "client", "test/client"),
        join_reporting(&cp, "other", "test/other"),
    );
    a.wait_ready().await;
    b.wait_ready().await;
    until_answered(a.outbound, "busy.test").await;
    until_answered(b.outbound, "busy.test").await;
    // Two callers at once, both in peer-1's zone, so both choose it (by locality) every
    // round: its limit of 1 sheds one, and that caller's retry takes it to the other
    // workload, free, in the next zone. (Left to choose on their own with their latency
    // estimates, two callers can settle on different workloads and never meet: a CI run
    // saw 20 rounds without a shed.)
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let (x, y) = tokio::join!(
            client::get_full(a.outbound, "busy.test", "/", &[]),
            client::get_full(b.outbound, "busy.test", "/", &[]),
        );
        statuses.push(x.unwrap().status.as_u16());
        statuses.push(y.unwrap().status.as_u16());
    }
    let mut shed = 0.0;
    for p in [&p1, &p2] {
        shed += sum_metric(
            &p.metrics().await,
            "trellis_adaptive_concurrency_shed_total",
            &[],
        );
    }
    assert!(
        statuses.iter().all(|&s| s == 200),
        "{statuses:?} ({shed} shed)"
    );
    assert!(shed >= 1.0, "no request was shed: {statuses:?}");
}

#[tokio::test]
async fn a_rate_limit_on_a_route_holds_its_requests_and_the_services_holds_the_rest() {
    let app = upstream::named("ok").await;
    let cp = ControlProcess::start(BIN, &[]);
    // The service's policy (5 a minute per caller, 8 in all) and, on a route of it for
    // /search, 2 a minute per caller: the more specific target holds /search.
    let mesh = |inbound: u16| {
        format!(
            "{}---\n{}---\napiVersion: trellis.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{ name: search, namespace: test }}\nspec:\n  targetRefs: [{{ kind: HTTPRoute, name: search }}]\n  perCaller: [{{ requests: 2, per: 1m }}]\n",
            limited_mesh(app.port(), inbound, "Enforce"),
            route(
                "search",
                "busy",
                "    - matches: [{ path: { type: PathPrefix, value: /search } }]\n      backendRefs: [{ name: busy, port: 80 }]\n"
            )
        )
    };
    apply_ok(&cp, mesh(1)).await;
    let callee = join_reporting(&cp, "beta", "test/peer");
    callee.wait_ready().await;
    apply_ok(&cp, mesh(callee.inbound.port())).await;
    let a = join_reporting(&cp, "client", "test/client");
    a.wait_ready().await;
    holds_policy(&callee, "test/search").await;
    let get = async |path: &str| {
        client::get_full(a.outbound, "busy.test", path, &[])
            .await
            .unwrap()
    };
    // Answered once the callee is reachable (it counts against the service's 5).
    eventually("busy answers", Duration::from_secs(10), async || {
        (get("/warm").await.status == 200).then_some(())
    })
    .await;
    let mut search = Vec::new();
    for _ in 0..4 {
        search.push(get("/search/q").await);
    }
    let statuses: Vec<u16> = search.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 429, 429]);
    assert_eq!(
        search[2].headers.get("ratelimit-policy").unwrap(),
        "\"caller\";q=2;w=60"
    );
    // The rest of the service: its own policy, untouched by /search (4 more of its 5).
    let mut rest = Vec::new();
    for _ in 0..6 {
        rest.push(get("/other").await.status.as_u16());
    }
    assert_eq!(rest, [200, 200, 200, 200, 429, 429]);
    // Counted under each policy.
    let m = callee.metrics().await;
    let refused =
        |policy: &str| sum_metric(&m, "trellis_rate_limited_total", &[("policy", policy)]);
    assert_eq!((refused("test/search"), refused("test/busy")), (2.0, 2.0));
}

/// `test/catalog` on a VM (`catalog-vm`) and in a container (`catalog-ct`), with the VM
/// preferred and the container taking what spills over; `inbound`: the two proxies'.
fn spill_mesh(vm: u16, ct: u16, inbound: (u16, u16)) -> String {
    let workload = |name: &str, env: &str, port: u16, inbound: u16| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: catalog }} }}\nspec:\n  address: 127.0.0.1\n  identity: catalog\n  environment: {env}\n  inboundPort: {inbound}\n  ports: {{ http: {port} }}\n")
    };
    [
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n".to_string(),
        workload("catalog-vm", "vm", vm, inbound.0),
        workload("catalog-ct", "container", ct, inbound.1),
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec: { address: 127.0.0.1, identity: client }\n".to_string(),
        policy(
            "catalog",
            "  outlierDetection: { consecutiveFailures: 0 }\n  spillover:\n    pools: [{ environment: vm }, { environment: container }]\n    hold: 1s\n",
        ),
    ]
    .join("---\n")
}

/// The proxies of `catalog-vm`, `catalog-ct` (identity `catalog`) and `test/client`, joined
/// to `cp` with `extra` flags; `mesh(inbound)` is the mesh with the two callees' inbound
/// ports (applied first with placeholders: a port is known once its proxy runs).
async fn pools(
    cp: &ControlProcess,
    mesh: impl Fn((u16, u16)) -> String,
    extra: &[&str],
) -> (
    trellis_test_support::ProxyProcess,
    trellis_test_support::ProxyProcess,
    trellis_test_support::ProxyProcess,
) {
    pools_on(cp, cp, mesh, extra).await
}

/// As [`pools`], the callees' proxies connected to `callees`, the caller's to `caller` (two
/// replicas on one store).
async fn pools_on(
    callees: &ControlProcess,
    caller: &ControlProcess,
    mesh: impl Fn((u16, u16)) -> String,
    extra: &[&str],
) -> (
    trellis_test_support::ProxyProcess,
    trellis_test_support::ProxyProcess,
    trellis_test_support::ProxyProcess,
) {
    apply_ok(callees, mesh((1, 1))).await;
    let join = |cp: &ControlProcess, who: &str, workload: &str| {
        join_xds(cp, &cp.xds_url(), who, workload, extra)
    };
    let (vm, ct) = (
        join(callees, "catalog", "test/catalog-vm"),
        join(callees, "catalog", "test/catalog-ct"),
    );
    vm.wait_ready().await;
    ct.wait_ready().await;
    apply_ok(callees, mesh((vm.inbound.port(), ct.inbound.port()))).await;
    let client = join(caller, "client", "test/client");
    client.wait_ready().await;
    (vm, ct, client)
}

/// An application that serves `capacity` requests at once in 20 ms (the rest wait their
/// turn), and counts what it served.
async fn pool_app(
    name: &'static str,
    capacity: usize,
    served: Arc<AtomicUsize>,
) -> std::net::SocketAddr {
    let slots = Arc::new(tokio::sync::Semaphore::new(capacity));
    upstream::http(move |_| {
        let (slots, served) = (slots.clone(), served.clone());
        async move {
            let _slot = slots.acquire().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            served.fetch_add(1, Ordering::SeqCst);
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from(name)))
        }
    })
    .await
}

/// The VM pool's line of the control plane's spill-over state.
async fn vm_pool(cp: &ControlProcess) -> Option<serde_json::Value> {
    let (st, v) = cp
        .call(http::Method::GET, "/api/v1/spill?namespace=test", "", None)
        .await;
    assert_eq!(st, 200, "{v}");
    let s = v
        .as_array()?
        .iter()
        .find(|s| s["service"] == "test/catalog")?;
    Some(json_with_history(&s["pools"][0], &s["history"]))
}

fn json_with_history(pool: &serde_json::Value, history: &serde_json::Value) -> serde_json::Value {
    let mut p = pool.clone();
    p["history"] = history.clone();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_spills_from_the_saturated_vm_pool_to_containers_and_comes_back() {
    // The VM serves 4 at once; the container as many as come.
    let (vm_served, ct_served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (vm_app, ct_app) = (
        pool_app("vm", 4, vm_served.clone()).await,
        pool_app("ct", 1000, ct_served.clone()).await,
    );
    let cp = ControlProcess::start(BIN, &[]);
    let (_vm, _ct, caller) = pools(
        &cp,
        |inbound| spill_mesh(vm_app.port(), ct_app.port(), inbound),
        &["--report-interval", "200ms"],
    )
    .await;
    let to = caller.outbound;
    let light = async |n: usize| {
        for _ in 0..n {
            let r = client::get_full(to, "catalog.test", "/", &[])
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
    };
    eventually("the VM answers", Duration::from_secs(15), async || {
        client::get_full(to, "catalog.test", "/", &[])
            .await
            .ok()
            .filter(|r| r.status == 200 && vm_served.load(Ordering::SeqCst) > 0)
    })
    .await;

    // Light load: the preferred pool takes it all (and the VM's limit learns its unloaded
    // time: 150 requests, 15 windows or more).
    let ct_before = ct_served.load(Ordering::SeqCst);
    light(150).await;
    assert_eq!(
        ct_served.load(Ordering::SeqCst),
        ct_before,
        "light load stays on the VM"
    );

    // A surge of 24 callers at once, 6× what the VM serves: its load stays over the high
    // mark, and a growing share spills to the container.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut surge = Vec::new();
    for _ in 0..24 {
        let stop = stop.clone();
        surge.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = client::get_full(to, "catalog.test", "/", &[]).await;
            }
        }));
    }
    let spilling = eventually(
        "the VM pool spills to the container",
        Duration::from_secs(30),
        async || {
            let p = vm_pool(&cp).await?;
            (p["spilled_percent"].as_f64()? > 0.0 && ct_served.load(Ordering::SeqCst) > ct_before)
                .then_some(p)
        },
    )
    .await;
    assert_eq!(spilling["to"], "container", "{spilling:#}");
    assert!(spilling["since_ms"].as_u64().is_some(), "{spilling:#}");
    assert_eq!(spilling["history"][0]["what"], "started", "{spilling:#}");
    // `stat` says so under the services.
    let out = common::ok(cli(&cp, &["stat", "-n", "test"]));
    assert!(
        out.contains("test/catalog: ") && out.contains("% spilled vm → container since"),
        "{out}"
    );
    // And the pane, under its services (in a real browser, when there is one).
    if let Some(browser) = common::open_pane(&cp).await {
        let shown = eventually(
            "the pane shows the spill",
            Duration::from_secs(20),
            async || {
                let id = browser.find("#spill").await.ok()?;
                let t = browser.text(&id).await.ok()?;
                t.contains("% spilled vm → container since").then_some(t)
            },
        )
        .await;
        assert!(shown.contains("test/catalog: "), "{shown}");
        assert!(shown.contains("vm load "), "{shown}");
    }
    stop.store(true, Ordering::SeqCst);
    for t in surge {
        t.await.unwrap();
    }

    // The surge over, light load again: the share comes back to nothing, and then the VM
    // takes everything again.
    let back = eventually(
        "the traffic comes back to the VM",
        Duration::from_secs(40),
        async || {
            light(5).await;
            let p = vm_pool(&cp).await?;
            (p["spilled_percent"].as_f64()? == 0.0).then_some(p)
        },
    )
    .await;
    let history = back["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["what"], "ended", "{back:#}");
    // Proxies take the shares at their next exchange (a second).
    eventually(
        "the caller sends nothing to the container",
        Duration::from_secs(5),
        async || {
            let before = ct_served.load(Ordering::SeqCst);
            light(20).await;
            (ct_served.load(Ordering::SeqCst) == before).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_on_another_replica_spills_by_the_loads_that_replica_is_passed() {
    // Two replicas on one etcd: the pools' proxies tell A their loads; the caller is
    // connected to B, which hears none of the pools' loads itself.
    let etcd = trellis_test_support::etcd::Etcd::start().await;
    let store = etcd.url();
    let a = ControlProcess::start(BIN, &["--store", &store]);
    let mut b = ControlProcess::start(BIN, &["--store", &store]);
    b.token = a.token.clone();
    let (vm_served, ct_served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (vm_app, ct_app) = (
        pool_app("vm", 4, vm_served.clone()).await,
        pool_app("ct", 1000, ct_served.clone()).await,
    );
    let (_vm, _ct, caller) = pools_on(
        &a,
        &b,
        |inbound| spill_mesh(vm_app.port(), ct_app.port(), inbound),
        &[],
    )
    .await;
    let to = caller.outbound;
    // Light load first (the VM's limit learns its unloaded time), all on the VM.
    for _ in 0..150 {
        let r = client::get_full(to, "catalog.test", "/", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        ct_served.load(Ordering::SeqCst),
        0,
        "light load stays on the VM"
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let surge: Vec<_> = (0..24)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let _ = client::get_full(to, "catalog.test", "/", &[]).await;
                }
            })
        })
        .collect();
    // B sees the VM pool's load (passed on by A), spills, and the caller follows it.
    let spilling = eventually(
        "B spills the VM pool to the container",
        Duration::from_secs(30),
        async || {
            let p = vm_pool(&b).await?;
            (p["spilled_percent"].as_f64()? > 0.0 && ct_served.load(Ordering::SeqCst) > 0)
                .then_some(p)
        },
    )
    .await;
    assert_eq!(spilling["workloads"], 1, "{spilling:#}");
    assert_eq!(spilling["to"], "container", "{spilling:#}");
    stop.store(true, Ordering::SeqCst);
    for t in surge {
        t.await.unwrap();
    }
    let back = eventually(
        "B brings the traffic back to the VM",
        Duration::from_secs(40),
        async || {
            client::get_full(to, "catalog.test", "/", &[]).await.ok()?;
            let p = vm_pool(&b).await?;
            (p["spilled_percent"].as_f64()? == 0.0).then_some(p)
        },
    )
    .await;
    assert_eq!(
        back["history"].as_array().unwrap().last().unwrap()["what"],
        "ended"
    );
}

/// How one scenario of the surge benchmark protects the VM pool.
#[derive(Clone, Copy, Debug)]
enum Protection {
    None,
    Static,
    Adaptive,
    Spill,
}

/// The benchmark's mesh: `test/catalog` on one VM (zone z1, the caller's) and one container
/// (zone z2); requests time out after 1 s.
fn bench_mesh(vm: u16, ct: u16, inbound: (u16, u16), p: Protection) -> String {
    let workload = |name: &str, env: &str, zone: &str, port: u16, inbound: u16| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: catalog }} }}\nspec:\n  address: 127.0.0.1\n  identity: catalog\n  environment: {env}\n  locality: {{ region: r1, zone: {zone} }}\n  inboundPort: {inbound}\n  ports: {{ http: {port} }}\n")
    };
    let spec = match p {
        Protection::None => "  adaptiveConcurrency: { enabled: false }\n",
        Protection::Static => "  adaptiveConcurrency: { minLimit: 16, maxLimit: 16 }\n",
        // The pools serve 8 at once: below the default minimum limit (20), so the policy
        // lowers it, as an operator of small VMs would.
        Protection::Adaptive => "  adaptiveConcurrency: { minLimit: 4 }\n",
        Protection::Spill => "  adaptiveConcurrency: { minLimit: 4 }\n  spillover:\n    pools: [{ environment: vm }, { environment: container }]\n",
    };
    [
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n".to_string(),
        workload("catalog-vm", "vm", "z1", vm, inbound.0),
        workload("catalog-ct", "container", "z2", ct, inbound.1),
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec: { address: 127.0.0.1, identity: client, locality: { region: r1, zone: z1 } }\n".to_string(),
        route("catalog", "catalog", "    - timeouts: { request: 1s }\n"),
        policy("catalog", spec),
    ]
    .join("---\n")
}

/// One request's outcome in the benchmark.
struct Outcome {
    phase: usize,
    ok: bool,
    /// Served by the container.
    ct: bool,
    ms: f64,
    class: String,
}

/// The surge benchmark (issue 18): a fixed-capacity VM pool (8 at once, 20 ms: 400 requests
/// a second) preferred by the caller's locality, and a container pool of the same size;
/// offered load stepped 0.5×, 1×, 2×, 3×, 1×, 0.5× the VM's capacity; four protections. Run
/// by `bench/surge.sh` (release build); prints a table per scenario.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/surge.sh runs it"]
async fn surge_benchmark() {
    let only = std::env::var("SURGE_ONLY").ok();
    for p in [
        Protection::None,
        Protection::Static,
        Protection::Adaptive,
        Protection::Spill,
    ] {
        if only
            .as_ref()
            .is_some_and(|o| !format!("{p:?}").eq_ignore_ascii_case(o))
        {
            continue;
        }
        surge_scenario(p).await;
    }
}

async fn surge_scenario(p: Protection) {
    const CAPACITY: f64 = 400.0;
    let phases: [(f64, u64); 6] = [
        (0.5, 10),
        (1.0, 10),
        (2.0, 10),
        (3.0, 20),
        (1.0, 10),
        (0.5, 30),
    ];
    let (vm_served, ct_served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (vm_app, ct_app) = (
        pool_app("vm", 8, vm_served.clone()).await,
        pool_app("ct", 8, ct_served.clone()).await,
    );
    let cp = ControlProcess::start(BIN, &[]);
    let (vm, _ct, caller) = pools(
        &cp,
        |inbound| bench_mesh(vm_app.port(), ct_app.port(), inbound, p),
        &["--no-access-log"],
    )
    .await;
    until_answered(caller.outbound, "catalog.test").await;

    // Open loop: requests are sent at the phase's rate whatever happens to earlier ones.
    let to = caller.outbound;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    // Who served, second by second.
    let per_second = {
        let (vm_served, ct_served) = (vm_served.clone(), ct_served.clone());
        let total: u64 = phases.iter().map(|(_, s)| s).sum();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let (mut v0, mut c0) = (0, 0);
            for _ in 0..=total {
                tick.tick().await;
                let (v, c) = (
                    vm_served.load(Ordering::SeqCst),
                    ct_served.load(Ordering::SeqCst),
                );
                out.push((v - v0, c - c0));
                (v0, c0) = (v, c);
            }
            out
        })
    };
    let mut limits = Vec::new();
    for (i, (x, secs)) in phases.iter().enumerate() {
        if i > 0 {
            limits.push(sum_metric(
                &vm.metrics().await,
                "trellis_adaptive_concurrency_limit",
                &[],
            ));
        }
        let rate = CAPACITY * x;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let until = Instant::now() + Duration::from_secs(*secs);
        while Instant::now() < until {
            tick.tick().await;
            let tx = tx.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(2),
                    client::get_full(to, "catalog.test", "/", &[]),
                )
                .await;
                let ct = matches!(&r, Ok(Ok(r)) if r.body.as_ref() == b"ct");
                let (ok, class) = match r {
                    Ok(Ok(r)) if r.status == 200 => (true, String::new()),
                    Ok(Ok(r)) => (
                        false,
                        r.headers
                            .get("x-trellis-failure")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or(r.status.as_str())
                            .to_string(),
                    ),
                    Ok(Err(_)) => (false, "client_error".into()),
                    Err(_) => (false, "client_timeout".into()),
                };
                let _ = tx.send(Outcome {
                    phase: i,
                    ok,
                    ct,
                    ms: sent.elapsed().as_secs_f64() * 1000.0,
                    class,
                });
            });
        }
    }
    limits.push(sum_metric(
        &vm.metrics().await,
        "trellis_adaptive_concurrency_limit",
        &[],
    ));
    drop(tx);
    let mut all = Vec::new();
    while let Some(o) = rx.recv().await {
        all.push(o);
    }
    let served = per_second.await.unwrap();

    println!("\n## {p:?}");
    println!("| phase | offered/s | goodput/s | p99 served (VM, container) | failed | failures | to container | VM limit at the end |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut unloaded_p99 = 0.0;
    let mut t0 = 0;
    for (i, (x, secs)) in phases.iter().enumerate() {
        let mine: Vec<&Outcome> = all.iter().filter(|o| o.phase == i).collect();
        let p99 = |f: &dyn Fn(&Outcome) -> bool| {
            let mut ok: Vec<f64> = mine.iter().filter(|o| o.ok && f(o)).map(|o| o.ms).collect();
            ok.sort_by(f64::total_cmp);
            ok.get((ok.len() * 99 / 100).min(ok.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        let ok: Vec<&&Outcome> = mine.iter().filter(|o| o.ok).collect();
        let (p99, p99_vm, p99_ct) = (p99(&|_| true), p99(&|o| !o.ct), p99(&|o| o.ct));
        if i == 0 {
            unloaded_p99 = p99;
        }
        let mut classes: std::collections::BTreeMap<&str, usize> = Default::default();
        for o in mine.iter().filter(|o| !o.ok) {
            *classes.entry(o.class.as_str()).or_default() += 1;
        }
        let secs_range = t0 as usize..(t0 + secs) as usize;
        let (v, c) = served[secs_range.start + 1..=secs_range.end.min(served.len() - 1)]
            .iter()
            .fold((0, 0), |(a, b), (v, c)| (a + v, b + c));
        println!(
            "| {x}× {secs}s | {:.0} | {:.0} | {p99:.0} ms ({p99_vm:.0}, {p99_ct:.0}) | {} | {} | {:.0} % | {} |",
            mine.len() as f64 / *secs as f64,
            ok.len() as f64 / *secs as f64,
            mine.len() - ok.len(),
            classes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            100.0 * c as f64 / (v + c).max(1) as f64,
            match p {
                Protection::None => "-".to_string(),
                _ => limits[i].to_string(),
            },
        );
        t0 += secs;
    }
    // When traffic came back to the VM after the surge: the first second from which the
    // container served under 5 % of what was served, to the end.
    let surge_end: u64 = phases[..4].iter().map(|(_, s)| s).sum();
    let back = (surge_end as usize..served.len()).find(|&s| {
        served[s..]
            .iter()
            .all(|(v, c)| (*c as f64) < 0.05 * (*v + *c).max(1) as f64)
    });
    let waited = all.iter().filter(|o| o.ms > 1100.0).count();
    println!(
        "\nunloaded p99 {unloaded_p99:.0} ms; back on the VM {}; requests that waited past the 1 s timeout: {waited}",
        back.map_or("never".into(), |s| format!("{} s after the surge", s as u64 - surge_end))
    );
}
