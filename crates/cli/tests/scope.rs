//! Scoped delivery and on-demand discovery, end to end: a real `trellis control` and real
//! proxies fed over xDS, on loopback. A proxy gets what its workload needs (its upstreams
//! and what they name), asks for any other Service it is sent a request for, is told at once
//! of a name that does not exist, and releases what it asked for once unused; a change to a
//! Service it does not call does not reach it.

mod common;

use std::time::Duration;

use common::*;
use trellis_test_support::control::ControlProcess;

/// Workload `name` in namespace `test` calling `upstreams` (service names, port 80).
fn caller(name: &str, upstreams: &[&str]) -> String {
    let mut y = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: {name} }} }}\nspec:\n  address: 127.0.0.1\n  upstreams:\n"
    );
    for u in upstreams {
        y.push_str(&format!(
            "    - {{ service: {u}.test, port: 80, bind: 127.0.0.1:0 }}\n"
        ));
    }
    y
}

async fn dump(p: &ProxyProcess) -> serde_json::Value {
    let (_, body) = client::get(p.admin, "admin", "/config_dump", &[])
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// The Services of `p`'s live config, sorted.
async fn services(p: &ProxyProcess) -> Vec<String> {
    let d = dump(p).await;
    let mut v: Vec<String> = d["config"]["services"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    v.sort();
    v
}

/// The control-plane version `p` applied last.
async fn applied(p: &ProxyProcess) -> u64 {
    let d = dump(p).await;
    d["xds"]["applied"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_proxy_holds_what_its_workload_calls_and_asks_for_the_rest() {
    let (a, b, c) = (
        upstream::named("a").await,
        upstream::named("b").await,
        upstream::named("c").await,
    );
    let cp = ControlProcess::start(BIN, &[]);
    // svc-b's pooled connections close after a second idle, so that it can be released.
    let idle_pool = policy("svc-b", "  connectionPool: { idleTimeout: 1s }\n");
    apply_ok(
        &cp,
        docs(&[
            service("svc-a", "HTTP", &[a]),
            service("svc-b", "HTTP", &[b]),
            service("svc-c", "HTTP", &[c]),
            idle_pool,
            caller("client", &["svc-a"]),
            caller("other", &["svc-c"]),
        ]),
    )
    .await;
    let p = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/client",
        &["--on-demand-idle", "1s"],
    );
    let other = ProxyProcess::start_xds(BIN, &[cp.xds_url()], "test/other", &[]);
    p.wait_ready().await;
    other.wait_ready().await;

    // Each holds what it calls, not the mesh.
    assert_eq!(services(&p).await, ["test/svc-a"]);
    assert_eq!(services(&other).await, ["test/svc-c"]);
    assert_eq!(via(&p, "svc-a.test").await.2, "a");

    // A Service it does not hold is asked for and served on the first request.
    let (status, class, body) = via(&p, "svc-b.test").await;
    assert_eq!((status, body.as_str()), (200, "b"), "{class}");
    assert_eq!(services(&p).await, ["test/svc-a", "test/svc-b"]);
    assert_eq!(
        dump(&p).await["on_demand"],
        serde_json::json!(["test/svc-b"])
    );
    let found = p
        .metric("trellis_on_demand_lookups_total", &[("outcome", "found")])
        .await;
    assert_eq!(found, 1.0);

    // A name that does not exist is answered no_route, told by the control plane (not by
    // the wait running out), and then answered so without asking again.
    for _ in 0..2 {
        let (status, class, _) = via(&p, "nope.test").await;
        assert_eq!((status, class.as_str()), (404, "no_route"));
    }
    let lookups = async |outcome: &str| {
        p.metric("trellis_on_demand_lookups_total", &[("outcome", outcome)])
            .await
    };
    assert_eq!(lookups("absent").await, 2.0);
    assert_eq!(lookups("timeout").await, 0.0);

    // A change to a Service the client does not call reaches the proxy that calls it, and
    // not the client.
    let before = applied(&p).await;
    let seen = applied(&other).await;
    apply_ok(
        &cp,
        service("svc-c", "HTTP", &[c]).replace("environment: vm", "environment: container"),
    )
    .await;
    let pushed = eventually(
        "the caller of svc-c applies the change",
        Duration::from_secs(10),
        async || {
            let v = applied(&other).await;
            (v > seen).then_some(v)
        },
    )
    .await;
    assert!(
        applied(&p).await < pushed,
        "the client was sent a change it does not need"
    );
    assert_eq!(applied(&p).await, before);
    // ... and the control plane counts it in step with that revision all the same (what
    // `check` and a deregistration waiting for the proxies read).
    eventually(
        "the client counted in step",
        Duration::from_secs(10),
        async || {
            let (_, v) = cp
                .call(http::Method::GET, "/api/v1/proxies", "", None)
                .await;
            let me = v["proxies"]
                .as_array()?
                .iter()
                .find(|x| x["workload"] == "test/client")?
                .clone();
            let acked: u64 = me["types"]["document"]["acked"].as_str()?.parse().ok()?;
            (acked >= pushed).then_some(())
        },
    )
    .await;
    // One to svc-a reaches it.
    apply_ok(
        &cp,
        service("svc-a", "HTTP", &[a]).replace("environment: vm", "environment: container"),
    )
    .await;
    eventually(
        "the client applies svc-a's change",
        Duration::from_secs(10),
        async || (applied(&p).await > pushed).then_some(()),
    )
    .await;

    // Unused past the idle time (no request in the 10 s window, no connection open), the
    // Service asked for is released; the declared upstream stays.
    eventually("svc-b released", Duration::from_secs(40), async || {
        (services(&p).await == ["test/svc-a"]).then_some(())
    })
    .await;
    assert_eq!(dump(&p).await["on_demand"], serde_json::json!([]));
    // And asked for again when needed.
    assert_eq!(via(&p, "svc-b.test").await.2, "b");
}

/// An upgrade in place keeps what was asked for on demand: the old process passes its names
/// on with its listeners and the new one asks for them in its first request, so it holds
/// them from its first config. A client that resolved a name through the old process (its
/// DNS answer, a virtual IP) and connects to the new one is served without a lookup.
#[tokio::test]
async fn an_upgrade_in_place_keeps_the_names_asked_for_on_demand() {
    let (a, b) = (upstream::named("a").await, upstream::named("b").await);
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(
        &cp,
        docs(&[
            service("svc-a", "HTTP", &[a]),
            service("svc-b", "HTTP", &[b]),
            caller("client", &["svc-a"]),
        ]),
    )
    .await;
    let sock = trellis_test_support::Temp(trellis_test_support::temp_path("scope-handoff.sock"));
    let args = ["--handoff", sock.to_str().unwrap()];
    let mut old = ProxyProcess::start_xds(BIN, &[cp.xds_url()], "test/client", &args);
    old.wait_ready().await;
    assert_eq!(via(&old, "svc-b.test").await.2, "b");
    assert_eq!(services(&old).await, ["test/svc-a", "test/svc-b"]);

    let new = ProxyProcess::start_xds(BIN, &[cp.xds_url()], "test/client", &args);
    assert_eq!(old.wait_exit(Duration::from_secs(20)).await, Some(0));
    new.wait_ready().await;
    // Before any request reaches it, the new process holds what the old one asked for.
    assert_eq!(services(&new).await, ["test/svc-a", "test/svc-b"]);
    assert_eq!(
        dump(&new).await["on_demand"],
        serde_json::json!(["test/svc-b"])
    );
    assert_eq!(via(&new, "svc-b.test").await.2, "b");
    let lookups = new.metric("trellis_on_demand_lookups_total", &[]).await;
    assert_eq!(lookups, 0.0, "the new process had to look svc-b up");
}
