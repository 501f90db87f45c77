//! `trellis diagnose` on loopback: several faults at once under load, through real proxies
//! with mutual TLS reporting to a real control plane; each must come out with the right
//! cause and place, and nothing may be said of what works.
//!
//! The callee `test/peer` (a container) serves `ok`, `down` (its application is not
//! running), `errors` (its application answers 503), `slow` (slower than the route's 300 ms)
//! and `walled` (an AuthorizationPolicy denies the caller). `test/ghost` (a VM) is in the
//! mesh but its proxy is not running. `gone` selects no workload. `spare` selects both, and
//! its route retries: every request succeeds, yet the tries refused on the way to the ghost
//! are the network's, and said so. The caller is `test/client` (bare metal). Faults that
//! need root (a DROP rule on one link) are the test bed's.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use serde_json::Value;
use trellis_test_support::{control::ControlProcess, eventually, eventually_explained};

fn mesh(
    ok: SocketAddr,
    down: SocketAddr,
    errors: SocketAddr,
    slow: SocketAddr,
    inbound: u16,
    ghost: u16,
) -> String {
    let svc = |name: &str, sel: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: {sel} }}\n  ports: [{{ name: {name}, port: 80, targetPort: 1, protocol: HTTP }}]\n")
    };
    [
        svc("ok", "peer"),
        svc("sluggish", "peer"),
        svc("down", "peer"),
        svc("errors", "peer"),
        svc("slow", "peer"),
        svc("walled", "peer"),
        svc("far", "ghost"),
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: spare, namespace: test }\nspec:\n  selector: { tier: backend }\n  ports: [{ name: spare, port: 80, targetPort: 1, protocol: HTTP }]\n".to_string(),
        svc("gone", "nobody"),
        svc("boxed", "box"),
        svc("client", "client"),
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: peer, namespace: test, labels: {{ app: peer, tier: backend }} }}\nspec:\n  address: 127.0.0.1\n  identity: beta\n  inboundPort: {inbound}\n  environment: container\n  locality: {{ region: eu, zone: eu-1 }}\n  ports: {{ ok: {}, spare: {}, sluggish: {}, down: {}, errors: {}, slow: {}, walled: {} }}\n",
            ok.port(),
            ok.port(),
            slow.port(),
            down.port(),
            errors.port(),
            slow.port(),
            ok.port()
        ),
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: ghost, namespace: test, labels: {{ app: ghost, tier: backend }} }}\nspec:\n  address: 127.0.0.1\n  identity: ghost\n  inboundPort: {ghost}\n  environment: vm\n  ports: {{ far: {}, spare: {} }}\n",
            ok.port(),
            ok.port()
        ),
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test, labels: { app: client } }\nspec: { address: 127.0.0.1, identity: client, environment: bare-metal }\n".to_string(),
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: box, namespace: test, labels: {{ app: box }} }}\nspec:\n  address: 127.0.0.1\n  environment: container\n  ports: {{ boxed: {} }}\n",
            ok.port()
        ),
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: wall, namespace: test }\nspec:\n  targetRefs: [{ name: walled }]\n  action: DENY\n  rules: [{ from: [{ identities: [test/client] }] }]\n".to_string(),
        route("slow", "slow", "    - timeouts: { request: 300ms }\n"),
        // No ejection: every request meets the fault.
        policy("down", "  outlierDetection: { consecutiveFailures: 0 }\n"),
        policy("far", "  outlierDetection: { consecutiveFailures: 0 }\n"),
        route("spare", "spare", "    - retry: { attempts: 2, codes: [503] }\n"),
        policy("spare", "  outlierDetection: { consecutiveFailures: 0 }\n"),
    ]
    .join("---\n")
}

fn verdicts_about<'a>(v: &'a Value, service: &str) -> Vec<&'a Value> {
    v["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| {
            x["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == service)
        })
        .collect()
}

/// The one verdict about `service` (asserted to be one).
fn one_about<'a>(v: &'a Value, service: &str) -> &'a Value {
    let all = verdicts_about(v, service);
    assert_eq!(all.len(), 1, "one verdict for {service}: {v:#}");
    all[0]
}

/// What `GET /api/v1/diagnose` says of namespace test over 5 minutes.
async fn diagnosed(cp: &ControlProcess) -> Value {
    let (st, v) = cp
        .call(
            http::Method::GET,
            "/api/v1/diagnose?namespace=test&window=5m",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    v
}

#[tokio::test]
async fn diagnose_names_each_fault_with_its_cause_and_place() {
    let ok = upstream::named("ok").await;
    let (down, _down) = upstream::refusing();
    let errors = upstream::http(|_| async {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from("no")));
        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        r
    })
    .await;
    let slow = upstream::http(|_| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from("late")))
    })
    .await;
    let (ghost, _ghost) = upstream::refusing();
    let cp = ControlProcess::start(BIN, &[]);
    let m = |inbound| mesh(ok, down, errors, slow, inbound, ghost.port());
    apply_ok(&cp, m(1)).await;
    let join = |who: &str, workload: &str| join_reporting(&cp, who, workload);
    let callee = join("beta", "test/peer");
    callee.wait_ready().await;
    apply_ok(&cp, m(callee.inbound.port())).await;
    let caller = join("client", "test/client");
    caller.wait_ready().await;
    until_answered(caller.outbound, "ok.test").await;

    // A container that stopped: its Workload leaves (as `trellis containers` removes it).
    let (st, v) = cp
        .call(
            http::Method::DELETE,
            "/api/v1/resources/Workload/test/box",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    eventually(
        "the caller lets the box go",
        Duration::from_secs(10),
        async || {
            let r = client::get_full(caller.outbound, "boxed.test", "/", &[])
                .await
                .ok()?;
            (r.status == 503).then_some(())
        },
    )
    .await;

    // Slow but not failing (2 s, no route timeout): three at once, while the rest runs.
    let sluggish: Vec<_> = (0..3)
        .map(|_| {
            let to = caller.outbound;
            tokio::spawn(async move {
                client::get_full(to, "sluggish.test", "/", &[])
                    .await
                    .unwrap()
                    .status
            })
        })
        .collect();
    // Load on every service at once.
    let mut expect = Vec::new();
    for (svc, n, status) in [
        ("ok", 20, 200),
        ("down", 6, 502),
        ("errors", 6, 503),
        ("slow", 4, 504),
        ("walled", 4, 403),
        ("far", 4, 502),
        ("spare", 10, 200),
        ("gone", 4, 503),
        ("boxed", 4, 503),
    ] {
        for _ in 0..n {
            let r = client::get_full(caller.outbound, &format!("{svc}.test"), "/", &[])
                .await
                .unwrap();
            assert_eq!(r.status, status, "{svc}");
        }
        expect.push(svc);
    }

    for s in sluggish {
        assert_eq!(s.await.unwrap(), 200, "slow, not failed");
    }
    let v = eventually_explained(
        "a verdict for each fault",
        Duration::from_secs(20),
        async || {
            let v = diagnosed(&cp).await;
            let mut missing: Vec<String> = [
                "test/down",
                "test/errors",
                "test/slow",
                "test/walled",
                "test/far",
                "test/gone",
                "test/spare",
                "test/sluggish",
            ]
            .iter()
            .filter(|s| verdicts_about(&v, s).is_empty())
            .map(|s| format!("a verdict about {s}"))
            .collect();
            // Every period of both sides is in: the counts are whole.
            for (svc, side, class, n) in [
                ("test/down", "callee_saw", "connect_refused", 6),
                ("test/errors", "caller_saw", "app_error", 5),
                ("test/errors", "callee_saw", "app_error", 5),
                ("test/errors", "caller_saw", "no_healthy_upstream", 1),
                ("test/walled", "caller_saw", "denied", 4),
                ("test/slow", "callee_saw", "client_disconnect", 4),
                ("test/far", "caller_saw", "connect_refused", 4),
            ] {
                let whole = verdicts_about(&v, svc)
                    .first()
                    .is_some_and(|x| x[side][class].as_u64() >= Some(n));
                if !whole {
                    missing.push(format!("{svc}'s {side}.{class} >= {n}"));
                }
            }
            if missing.is_empty() {
                Ok(v)
            } else {
                Err(format!("missing {missing:?} in {v:#}"))
            }
        },
    )
    .await;
    // What it judged: both proxies' reports, the requests above at both ends of their hops.
    let judged = &v["judged"];
    assert_eq!(judged["proxies"], 2, "{judged}");
    assert!(judged["requests"].as_u64().unwrap() >= 2 * 20, "{judged}");
    let one = |svc: &str| one_about(&v, svc);
    let place = |x: &Value| {
        (
            x["place"]["kind"].as_str().unwrap().to_string(),
            x["place"]["at"]["workload"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };

    // The application is down behind the callee's proxy: the application, on its workload.
    let x = one("test/down");
    assert_eq!(x["cause"], "application", "{x:#}");
    assert_eq!(place(x), ("workload".into(), "test/peer".into()), "{x:#}");
    assert!(
        x["callee_saw"]["connect_refused"].as_u64().unwrap() >= 6,
        "{x:#}"
    );
    // Its application answers errors: both sides saw them; after five in a row, outlier
    // detection ejected the endpoint, and the request that then found none is part of the
    // same problem, not another one.
    let x = one("test/errors");
    assert_eq!(
        (x["cause"].as_str(), place(x).1.as_str()),
        (Some("application"), "test/peer"),
        "{x:#}"
    );
    assert_eq!(
        x["caller_saw"]["app_error"], x["callee_saw"]["app_error"],
        "{x:#}"
    );
    assert_eq!(x["failed"], 6, "{x:#}");
    assert!(x["evidence"].to_string().contains("ejected"), "{x:#}");
    // The caller's proxy told the control plane it ejected the callee, and why.
    assert!(
        x["evidence"]
            .to_string()
            .contains("test/client's proxy ejected test/peer (127.0.0.1:")
            && x["evidence"]
                .to_string()
                .contains("5 failures in a row, the last app_error"),
        "{x:#}"
    );
    let (st, peer) = cp
        .call(
            http::Method::GET,
            "/api/v1/resources/Workload/test/peer",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{peer}");
    assert!(
        peer["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "ejected"
                && e["by"] == "test/client"
                && e["class"] == "app_error"),
        "describe shows the ejection: {peer:#}"
    );
    // Slower than the route waits: the callee saw the requests.
    let x = one("test/slow");
    assert_eq!(
        (x["cause"].as_str(), place(x).1.as_str()),
        (Some("application"), "test/peer"),
        "{x:#}"
    );
    assert!(x["problem"].as_str().unwrap().contains("slower"), "{x:#}");
    assert!(x["evidence"].to_string().contains("300 ms"), "{x:#}");
    // Joined by the attempts' ids: each of the caller's timed-out attempts reached the
    // callee's proxy, and their trace ids are given.
    assert!(
        x["evidence"]
            .to_string()
            .contains("4 of the 4 failed attempts"),
        "{x:#}"
    );
    assert_eq!(x["traces"][0].as_str().map(str::len), Some(32), "{x:#}");
    // Slow but answering: listed at both ends by attempt id, slow at the callee too, so the
    // application's (part of the same verdict on test/peer as the timeouts).
    let x = one("test/sluggish");
    assert_eq!(
        (x["cause"].as_str(), place(x).1.as_str()),
        (Some("application"), "test/peer"),
        "{x:#}"
    );
    assert!(
        x["evidence"]
            .to_string()
            .contains("timed 3 of 3 of them as slow too"),
        "{x:#}"
    );
    // Denied by the mesh, with the policy named.
    let x = one("test/walled");
    assert_eq!(x["cause"], "mesh_policy", "{x:#}");
    assert!(
        x["evidence"].to_string().contains("test/wall (DENY)"),
        "{x:#}"
    );
    // The ghost's proxy is not there: the network towards it, not its application.
    let x = one("test/far");
    assert_eq!(x["cause"], "network", "{x:#}");
    assert_eq!(x["place"]["to"]["workload"], "test/ghost", "{x:#}");
    assert_eq!(x["place"]["to"]["environment"], "vm", "{x:#}");
    assert!(x["callee_saw"].as_object().unwrap().is_empty(), "{x:#}");
    // None of the refused tries reached it (each request was tried twice: a try refused at
    // connect is sent once more at once).
    let none_reached = |e: &Value| {
        let e = e.as_str().unwrap_or_default();
        e.starts_with("by attempt id: 0 of the ")
            && e.ends_with("failed attempts test/client listed reached test/ghost's proxy")
            && !e.starts_with("by attempt id: 0 of the 1 ")
    };
    assert!(
        x["evidence"].as_array().unwrap().iter().any(none_reached),
        "{x:#}"
    );
    // Retried tries: no request of `spare` failed, but its tries to the ghost were refused
    // like those of `far`, and are part of the same verdict.
    let x = one("test/spare");
    assert_eq!(x["place"]["to"]["workload"], "test/ghost", "{x:#}");
    assert!(x["services"].to_string().contains("test/far"), "{x:#}");
    assert!(
        x["evidence"]
            .to_string()
            .contains("retried on another endpoint")
            || x["caller_saw"]["connect_refused"].as_u64() > Some(4),
        "{x:#}"
    );
    assert!(x["first_ms"].as_u64() <= x["last_ms"].as_u64(), "{x:#}");
    assert!(x["first_ms"].as_u64().is_some(), "{x:#}");
    // A service that selects nothing: configuration.
    let x = one("test/gone");
    assert_eq!(x["cause"], "configuration", "{x:#}");
    // A service whose only workload left: the application's side, and when it left.
    let x = one("test/boxed");
    assert_eq!(x["cause"], "application", "{x:#}");
    assert!(x["evidence"].to_string().contains("test/box left"), "{x:#}");
    // What works is not mentioned.
    assert!(verdicts_about(&v, "test/ok").is_empty(), "{v:#}");

    // The CLI, narrowed to one service (its namespace by -n, or in its name as `get`
    // takes it).
    for args in [
        &["diagnose", "svc/down", "-n", "test", "--since", "5m"][..],
        &["diagnose", "svc/test/down", "--since", "5m"],
    ] {
        let out = common::ok(cli(&cp, args));
        assert!(
            out.contains("APPLICATION") && out.contains("workload test/peer (container, eu/eu-1)"),
            "{args:?}: {out}"
        );
        assert!(!out.contains("test/wall"), "only svc/down: {out}");
    }
}

/// Connections cut or refused. Opaque TCP, through CONNECT tunnels at the caller's proxy and
/// mutual TLS between the proxies: `db`'s application is not running behind its proxy (the
/// application's, on its workload, for both of its clients), `far-db`'s workload has no proxy running (the network's,
/// towards it), and `vault` denies the caller by AuthorizationPolicy (the mesh's); `echo`'s
/// connections work and are not mentioned; `cache`'s application resets each stream after
/// part of its answer (the application's, though the caller sees only a reset). And HTTP:
/// `crashy` is that application (the application's too).
#[tokio::test]
async fn diagnose_tells_cut_and_refused_connections_apart() {
    // Ports that refuse for the whole test (a port given back could be taken by another
    // test's listener: once, far-db's "ghost" answered, and the verdict was tls_error).
    let ((down, _down), (ghost, _ghost)) = (upstream::refusing(), upstream::refusing());
    let (echo, crashy) = (
        upstream::tcp_echo().await,
        upstream::reset_mid_response().await,
    );
    let cp = ControlProcess::start(BIN, &[]);
    let mesh = |inbound: u16| {
        let tcp = |name: &str, sel: &str, port: u16| {
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: {sel} }}\n  ports: [{{ name: {name}, port: {port}, targetPort: 1, protocol: TCP }}]\n")
        };
        [
            tcp("db", "peer", 5432),
            tcp("echo", "peer", 7),
            tcp("far-db", "ghost", 5432),
            tcp("vault", "peer", 8200),
            tcp("cache", "peer", 6379),
            "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: crashy, namespace: test }\nspec:\n  selector: { app: peer }\n  ports: [{ name: crashy, port: 80, targetPort: 1, protocol: HTTP }]\n".to_string(),
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: peer, namespace: test, labels: {{ app: peer }} }}\nspec:\n  address: 127.0.0.1\n  identity: beta\n  inboundPort: {inbound}\n  environment: container\n  ports: {{ db: {}, echo: {}, vault: {}, crashy: {3}, cache: {3} }}\n", down.port(), echo.port(), echo.port(), crashy.port()),
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: ghost, namespace: test, labels: {{ app: ghost }} }}\nspec:\n  address: 127.0.0.1\n  identity: ghost\n  inboundPort: {}\n  environment: vm\n  ports: {{ far-db: 1 }}\n", ghost.port()),
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test, labels: { app: client } }\nspec: { address: 127.0.0.1, identity: client, environment: bare-metal }\n".to_string(),
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: cart, namespace: test, labels: { app: cart } }\nspec: { address: 127.0.0.1, identity: cart, environment: vm }\n".to_string(),
            policy("db", "  outlierDetection: { consecutiveFailures: 0 }\n"),
            policy("crashy", "  outlierDetection: { consecutiveFailures: 0 }\n"),
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: sealed, namespace: test }\nspec:\n  targetRefs: [{ name: vault }]\n  action: DENY\n  rules: [{ from: [{ identities: [test/client] }] }]\n".to_string(),
            policy("far-db", "  outlierDetection: { consecutiveFailures: 0 }\n"),
        ]
        .join("---\n")
    };
    apply_ok(&cp, mesh(1)).await;
    let callee = join_reporting(&cp, "beta", "test/peer");
    callee.wait_ready().await;
    apply_ok(&cp, mesh(callee.inbound.port())).await;
    let caller = join_reporting(&cp, "client", "test/client");
    caller.wait_ready().await;
    // A second client of the database: each stream's hello names its caller.
    let cart = join_reporting(&cp, "cart", "test/cart");
    cart.wait_ready().await;
    until_echoed(caller.outbound, "echo.test:7").await;
    for _ in 0..4 {
        // The callee's proxy cannot reach its application, and answers the caller's so.
        let _ = echo_through(caller.outbound, "db.test:5432", b"select 1").await;
        let _ = echo_through(cart.outbound, "db.test:5432", b"select 2").await;
        // The caller's proxy cannot reach the ghost's: the tunnel is refused.
        let refused = echo_through(caller.outbound, "far-db.test:5432", b"select 1").await;
        assert!(refused.is_err(), "{refused:?}");
        // The callee's proxy refuses the stream by its policy, and says so.
        let sealed = echo_through(caller.outbound, "vault.test:8200", b"unseal").await;
        assert!(sealed.is_err_and(|head| head.contains("403")), "refused");
        // A head, part of the body, then a reset: never a whole answer.
        let cut = client::get_full(caller.outbound, "crashy.test", "/", &[]).await;
        assert!(cut.map_or(true, |r| r.body.len() < 1000), "a whole answer");
        // The same application behind a TCP port: it answers part, then resets the stream.
        let cut = echo_through(caller.outbound, "cache.test:6379", b"get k").await;
        assert!(cut.map_or(true, |b| b.len() < 100), "a whole answer");
    }
    let v = eventually_explained(
        "a verdict for each TCP fault",
        Duration::from_secs(20),
        async || {
            let v = diagnosed(&cp).await;
            let seen = |svc: &str, side: &str, class: &str| {
                verdicts_about(&v, svc)
                    .first()
                    .is_some_and(|x| x[side][class].as_u64() >= Some(4))
            };
            if seen("test/db", "callee_saw", "connect_refused")
                && verdicts_about(&v, "test/db").first().is_some_and(|x| {
                    x["callee_saw"]["connect_refused"].as_u64() >= Some(8)
                        && x["caller_saw"]["connect_refused"].as_u64() >= Some(8)
                })
                && seen("test/far-db", "caller_saw", "connect_refused")
                && seen("test/vault", "callee_saw", "denied")
                && seen("test/crashy", "callee_saw", "connection_reset")
                // One verdict for cache and crashy (one application): all of both in.
                && verdicts_about(&v, "test/cache").first().is_some_and(|x| {
                    x["callee_saw"]["connection_reset"].as_u64() >= Some(8)
                        && x["caller_saw"]["connection_reset"].as_u64() >= Some(8)
                })
            {
                Ok(v)
            } else {
                Err(format!("{v:#}"))
            }
        },
    )
    .await;
    let one = |svc: &str| one_about(&v, svc);
    let x = one("test/db");
    assert_eq!(x["cause"], "application", "{x:#}");
    assert_eq!(x["place"]["at"]["workload"], "test/peer", "{x:#}");
    // Both clients were told by the callee's proxy that its application refused (each
    // stream's hello named its caller, and the answer carried the callee's class): one
    // problem, the application's, with each client's share.
    assert_eq!(x["caller_saw"]["connect_refused"], 8, "{x:#}");
    assert_eq!(x["callee_saw"]["connect_refused"], 8, "{x:#}");
    for who in ["test/client", "test/cart"] {
        assert!(
            x["evidence"].to_string().contains(&format!(
                "{who} got 4 connect_refused answers from test/peer's proxy"
            )),
            "{x:#}"
        );
    }
    let x = one("test/far-db");
    assert_eq!(x["cause"], "network", "{x:#}");
    assert_eq!(x["place"]["to"]["workload"], "test/ghost", "{x:#}");
    assert!(x["callee_saw"].as_object().unwrap().is_empty(), "{x:#}");
    let x = one("test/crashy");
    assert_eq!(x["cause"], "application", "{x:#}");
    assert_eq!(x["place"]["at"]["workload"], "test/peer", "{x:#}");
    assert!(
        x["problem"]
            .as_str()
            .unwrap()
            .contains("resets its connections"),
        "{x:#}"
    );
    // The TCP stream the application reset: the callee's proxy records its application's
    // reset apart from its caller's leaving, so this is the application's too, the same
    // problem as crashy's (one application behind both ports): one verdict for both.
    let x = one("test/cache");
    assert_eq!(x["cause"], "application", "{x:#}");
    assert_eq!(x["place"]["at"]["workload"], "test/peer", "{x:#}");
    assert_eq!(
        x["services"],
        serde_json::json!(["test/cache", "test/crashy"])
    );
    assert_eq!(x["caller_saw"]["connection_reset"], 8, "{x:#}");
    for svc in ["test/cache", "test/crashy"] {
        let told = format!("test/client got 4 of them for {svc} as connection_reset");
        assert!(x["evidence"].to_string().contains(&told), "{x:#}");
    }
    let x = one("test/vault");
    assert_eq!(x["cause"], "mesh_policy", "{x:#}");
    assert_eq!(x["caller_saw"]["denied"], 4, "{x:#}");
    assert!(
        x["evidence"].to_string().contains("test/sealed (DENY)"),
        "{x:#}"
    );
    assert!(verdicts_about(&v, "test/echo").is_empty(), "{v:#}");
}

/// A TCP hop that holds every chunk from the caller for `delay` before passing it on: a
/// slow link, on loopback without root (the delay is the fault injected, not a wait).
async fn slow_hop(target: SocketAddr, delay: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(b) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut ar, mut aw) = a.into_split();
                let (mut br, mut bw) = b.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n @ 1..) = ar.read(&mut buf).await {
                        tokio::time::sleep(delay).await;
                        if bw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = bw.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut br, &mut aw).await;
                    let _ = aw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    addr
}

#[tokio::test]
async fn time_lost_between_the_two_proxies_is_the_link_even_when_nothing_fails() {
    // The medians of both ends: 80 ms more at the caller.
    let v = slow_link(Duration::from_millis(80), 25).await;
    assert!(
        v["evidence"]
            .to_string()
            .contains("between the two proxies"),
        "{v:#}"
    );
}

#[tokio::test]
async fn requests_slow_only_at_the_caller_lost_their_time_on_the_link() {
    // Listed one by one at both ends (a second or more): slow at the caller, quick at the
    // callee, by their attempt ids.
    let v = slow_link(Duration::from_millis(1100), 4).await;
    let ev = v["evidence"].to_string();
    assert!(ev.contains("took 1000 ms or more"), "{v:#}");
    assert!(ev.contains("timed only 0 of"), "{v:#}");
    assert_eq!(v["traces"].as_array().map(Vec::len), Some(3), "{v:#}");
}

/// `n` requests from a caller to a callee whose inbound is behind a hop that holds each
/// chunk `delay`: the verdict on the link `diagnose` gives.
async fn slow_link(delay: Duration, n: usize) -> Value {
    let ok = upstream::named("ok").await;
    let cp = ControlProcess::start(BIN, &[]);
    let mesh = |inbound: u16| {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: ok, namespace: test }}\nspec:\n  selector: {{ app: peer }}\n  ports: [{{ name: ok, port: 80, targetPort: 1, protocol: HTTP }}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: peer, namespace: test, labels: {{ app: peer }} }}\nspec:\n  address: 127.0.0.1\n  identity: beta\n  inboundPort: {inbound}\n  environment: vm\n  ports: {{ ok: {} }}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: client, namespace: test }}\nspec: {{ address: 127.0.0.1, identity: client, environment: container }}\n",
            ok.port()
        )
    };
    apply_ok(&cp, mesh(1)).await;
    let join = |who: &str, workload: &str| join_reporting(&cp, who, workload);
    let callee = join("beta", "test/peer");
    callee.wait_ready().await;
    // Callers reach the callee's proxy through a link that adds `delay` on the way there.
    let hop = slow_hop(callee.inbound, delay).await;
    apply_ok(&cp, mesh(hop.port())).await;
    let caller = join("client", "test/client");
    caller.wait_ready().await;
    until_answered(caller.outbound, "ok.test").await;
    for _ in 0..n {
        let r = client::get_full(caller.outbound, "ok.test", "/", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let v = verdict(&cp, "5m", Duration::from_secs(15), |x| {
        x["place"]["kind"] == "link"
    })
    .await;
    assert_eq!(v["cause"], "network", "{v:#}");
    assert_eq!(
        (
            v["place"]["from"]["workload"].as_str(),
            v["place"]["to"]["workload"].as_str()
        ),
        (Some("test/client"), Some("test/peer")),
        "{v:#}"
    );
    assert!(v["problem"].as_str().unwrap().contains("slow"), "{v:#}");
    assert_eq!(v["failed"], 0, "nothing failed: {v:#}");
    v
}
