//! `trellis join` end to end on loopback: a real control plane, a real agent process, a real
//! caller proxy; the application's health switched on and off.

mod common;

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use http::Method;
use trellis_test_support::{control::ControlProcess, eventually_explained, Temp};

/// `trellis join` for `test/catalog-1`, killed on drop.
fn start_agent(cp: &ControlProcess, state: &str, app: u16, token: Option<&str>) -> Proc {
    start_agent_named(cp, state, app, token, "catalog-1")
}

/// `trellis join` for `test/NAME` (label `app=catalog`), killed on drop.
fn start_agent_named(
    cp: &ControlProcess,
    state: &str,
    app: u16,
    token: Option<&str>,
    name: &str,
) -> Proc {
    start_agent_with(cp, state, app, token, name, &[])
}

/// As [`start_agent_named`], with more flags.
fn start_agent_with(
    cp: &ControlProcess,
    state: &str,
    app: u16,
    token: Option<&str>,
    name: &str,
    extra: &[&str],
) -> Proc {
    let mut c = Command::new(BIN);
    c.args([
        "join",
        "--control-plane",
        &cp.xds_url(),
        "--state-dir",
        state,
    ])
    .args(["--name", name, "--label", "app=catalog"])
    .args([
        "--address",
        "127.0.0.1",
        "--environment",
        "vm",
        "--zone",
        "z1",
    ])
    .args(["--port", &format!("http={app}"), "--check", "http:/healthz"])
    .args(["--check-interval", "200ms", "--unhealthy-threshold", "1"])
    .args(["--admin", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
    .args(["--inbound", "127.0.0.1:0", "--no-access-log"])
    .args(extra)
    .env_remove("TRELLIS_JOIN_TOKEN")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some(t) = token {
        c.args(["--token", t]);
    }
    Proc(c.spawn().expect("spawn trellis join"))
}

/// A steady load: four clients in a loop on kept-alive connections through `outbound` to
/// `catalog.test`, every answer counted.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(outbound: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..4)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut c = client::Conn::h1(outbound).await;
                    while !stop.load(Ordering::Relaxed) {
                        match c.get("catalog.test", "/").await {
                            Ok(r) if r.status == 200 => drop(ok.fetch_add(1, Ordering::Relaxed)),
                            Ok(r) => failed.lock().unwrap().push(format!(
                                "{} {:?}",
                                r.status,
                                r.headers.get("x-trellis-failure")
                            )),
                            Err(e) => {
                                failed.lock().unwrap().push(e.to_string());
                                c = client::Conn::h1(outbound).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Requests answered so far.
    fn count(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Wait until `n` requests in all were answered.
    async fn until(&self, n: u64) {
        eventually("requests answered", Duration::from_secs(30), async || {
            (self.count() >= n).then_some(())
        })
        .await
    }

    /// Stop; the failures.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        failed
    }
}

/// The caller `test/client` (identity `client`), joined with a token and fed by `cp` (its
/// state dir removed when it drops).
async fn start_caller(cp: &ControlProcess, state: &str) -> ProxyProcess {
    let t = token(cp, "test", "client", "10m", "1");
    let dir = Temp::path(state);
    let caller = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/client",
        &["--state-dir", dir.to_str().unwrap(), "--join-token", &t],
    );
    caller.wait_ready().await;
    caller.owning(dir)
}

async fn wait_health(cp: &ControlProcess, healthy: bool, what: &str) -> serde_json::Value {
    eventually(what, Duration::from_secs(15), async || {
        let w = workload(cp, "catalog-1").await?;
        (w["status"]["health"]["healthy"] == healthy).then_some(w)
    })
    .await
}

#[tokio::test]
async fn a_joined_host_registers_reports_health_fails_over_and_leaves_on_stop() {
    let up = Arc::new(AtomicBool::new(true));
    let u = up.clone();
    let app = upstream::http(move |req| {
        let up = u.load(Ordering::Relaxed);
        async move {
            let (code, body) = match (req.uri().path(), up) {
                ("/healthz", false) => (503, "down"),
                _ => (200, "catalog-app"),
            };
            let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
            *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
            r
        }
    })
    .await;
    let cp = ControlProcess::start(BIN, &[]);
    let mesh = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec: { address: 127.0.0.1, identity: client }\n";
    apply_ok(&cp, mesh.to_string()).await;
    let state = Temp::path("agent-state");
    let state_s = state.to_str().unwrap().to_string();
    let t = token(&cp, "test", "catalog", "10m", "1");

    // Join: the Workload appears with the identity's namespace and identity, the proxy's
    // real inbound port, and turns healthy once the check passes.
    let mut agent = start_agent(&cp, &state_s, app.port(), Some(&t));
    let w = wait_health(&cp, true, "registered and healthy").await;
    assert_eq!(w["spec"]["identity"], "catalog", "{w}");
    assert_eq!(w["spec"]["environment"], "vm", "{w}");
    assert_eq!(w["spec"]["locality"]["zone"], "z1", "{w}");
    assert_eq!(w["metadata"]["labels"]["app"], "catalog", "{w}");
    assert!(w["spec"]["inboundPort"].as_u64().unwrap() > 1, "{w}");
    assert_eq!(
        w["metadata"]["annotations"]["trellis.dev/agent"],
        "spiffe://trellis.local/ns/test/sa/catalog"
    );
    // A caller reaches it through the agent's proxy, by mutual TLS.
    let caller = start_caller(&cp, "agent-caller").await;
    let reach = |want: u16| {
        let caller = &caller;
        async move {
            eventually(
                "caller sees the change",
                Duration::from_secs(15),
                async || {
                    let (st, class, body) = via(caller, "catalog.test").await;
                    (st == want).then_some((class, body))
                },
            )
            .await
        }
    };
    assert_eq!(reach(200).await.1, "catalog-app");

    // The application fails its check: the Workload turns unhealthy and leaves the
    // caller's endpoints; it comes back when the check passes again.
    // Health is status: the flap changes no resource version.
    let version = w["metadata"]["resourceVersion"].clone();
    up.store(false, Ordering::Relaxed);
    let down = wait_health(&cp, false, "unhealthy after a failed check").await;
    assert_eq!(down["metadata"]["resourceVersion"], version, "{down}");
    assert!(down["spec"].get("healthy").is_none(), "not in spec: {down}");
    assert_eq!(reach(503).await.0, "no_healthy_upstream");
    up.store(true, Ordering::Relaxed);
    let up_again = wait_health(&cp, true, "healthy again").await;
    assert_eq!(up_again["metadata"]["resourceVersion"], version);
    reach(200).await;

    // An operator deletes the Workload by hand: the agent registers it again.
    let (st, v) = cp
        .call(
            Method::DELETE,
            "/api/v1/resources/Workload/test/catalog-1",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    wait_health(&cp, true, "registered again after a deletion").await;
    // `get` says when a workload is down.
    up.store(false, Ordering::Relaxed);
    wait_health(&cp, false, "down again").await;
    let out = ok(cli(&cp, &["get", "workloads", "-n", "test"]));
    assert!(
        out.lines()
            .any(|l| l.contains("catalog-1") && l.contains("UNHEALTHY")),
        "{out}"
    );
    up.store(true, Ordering::Relaxed);
    wait_health(&cp, true, "up again").await;
    // `trellis check` on a healthy mesh: every check passes (once the proxies have taken
    // the change just made: one still taking it is "behind").
    let text = eventually("check passes", Duration::from_secs(10), async || {
        let out = cli(&cp, &["check"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        out.status.success().then_some(text)
    })
    .await;
    assert!(text.contains("✓ agents") && !text.contains("✗"), "{text}");

    // The agent dies without a word: missed heartbeats make it unhealthy.
    agent.signal("-KILL");
    let _ = agent.0.wait();
    wait_health(&cp, false, "unhealthy after missed heartbeats").await;
    // `trellis check` names the silent agent and the unhealthy workload, and fails.
    let out = cli(&cp, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("✗ agents") && l.contains("test/catalog-1")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("! workloads healthy") && l.contains("test/catalog-1")),
        "{text}"
    );
    // Its timed events: it joined, went down, came back, and went down again.
    let (st, w) = cp
        .call(
            Method::GET,
            "/api/v1/resources/Workload/test/catalog-1",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{w}");
    let events: Vec<&str> = w["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"joined"), "{events:?}");
    assert_eq!(events.last(), Some(&"unhealthy"), "{events:?}");
    assert!(
        events.contains(&"healthy") && events.contains(&"left"),
        "{events:?}"
    );
    // Restarted with no token: it rejoins with its stored identity.
    let mut agent = start_agent(&cp, &state_s, app.port(), None);
    wait_health(&cp, true, "rejoined without a token").await;
    reach(200).await;
    // A clean stop deregisters.
    agent.signal("-TERM");
    let _ = agent.0.wait();
    eventually("deregistered", Duration::from_secs(15), async || {
        workload(&cp, "catalog-1").await.is_none().then_some(())
    })
    .await;

    // The systemd unit runs the same command, without the token.
    let out = Command::new(BIN)
        .args([
            "join",
            "--control-plane",
            "https://cp.example:7071",
            "--token",
            "secret-token",
        ])
        .args([
            "--address",
            "10.0.0.5",
            "--name",
            "vm-1",
            "--print-systemd-unit",
        ])
        .output()
        .unwrap();
    let unit = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        unit.contains("ExecStart=")
            && unit.contains(" join --control-plane https://cp.example:7071"),
        "{unit}"
    );
    assert!(
        unit.contains("Restart=always")
            && unit.contains("Type=notify")
            && unit.contains("ExecReload=/bin/kill -USR2 $MAINPID")
            && !unit.contains("secret-token"),
        "{unit}"
    );
}

#[tokio::test]
async fn a_health_check_that_passes_again_lifts_the_callers_ejection() {
    // The application fails its requests and, once, its health check (below the agent's
    // threshold, so it never turns unhealthy); meanwhile the caller ejects it.
    let broken = Arc::new(AtomicBool::new(false));
    let failed_checks = upstream::counter();
    let (b, f) = (broken.clone(), failed_checks.clone());
    let app = upstream::http(move |req| {
        let broken = b.load(Ordering::Relaxed);
        let health = req.uri().path() == "/healthz";
        if broken && health {
            f.fetch_add(1, Ordering::Relaxed);
        }
        async move {
            let code = if broken { 500 } else { 200 };
            let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from("app")));
            *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
            r
        }
    })
    .await;
    let cp = ControlProcess::start(BIN, &[]);
    // An ejection far longer than the test: only the recovery can end it in time.
    let mesh = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n---\napiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: { name: catalog, namespace: test }\nspec:\n  targetRefs: [{ name: catalog }]\n  outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 10m, maxEjectionTime: 10m }\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec: { address: 127.0.0.1, identity: client }\n";
    apply_ok(&cp, mesh.to_string()).await;
    let state = Temp::path("agent-recover");
    let t = token(&cp, "test", "catalog", "10m", "1");
    let mut c = Command::new(BIN);
    c.args(["join", "--control-plane", &cp.xds_url(), "--state-dir"])
        .arg(&state)
        .args([
            "--token",
            &t,
            "--name",
            "catalog-1",
            "--label",
            "app=catalog",
        ])
        .args([
            "--address",
            "127.0.0.1",
            "--port",
            &format!("http={}", app.port()),
        ])
        .args(["--check", "http:/healthz", "--check-interval", "200ms"])
        .args(["--unhealthy-threshold", "1000"])
        .args(["--admin", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
        .args(["--inbound", "127.0.0.1:0", "--no-access-log"])
        .env_remove("TRELLIS_JOIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _agent = Proc(c.spawn().expect("spawn trellis join"));
    wait_health(&cp, true, "registered and healthy").await;
    let caller = start_caller(&cp, "agent-recover-caller").await;
    eventually(
        "the caller reaches the app",
        Duration::from_secs(15),
        async || (via(&caller, "catalog.test").await.0 == 200).then_some(()),
    )
    .await;
    broken.store(true, Ordering::Relaxed);
    // Three application errors in a row: the only endpoint is ejected.
    let ejected = eventually("ejected", Duration::from_secs(15), async || {
        let (st, class, _) = via(&caller, "catalog.test").await;
        (st == 503 && class == "no_healthy_upstream").then_some(())
    });
    ejected.await;
    // The health check failed at least once meanwhile, then the application recovers.
    eventually("a failed check", Duration::from_secs(15), async || {
        (failed_checks.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    broken.store(false, Ordering::Relaxed);
    let w = eventually(
        "the agent reports the recovery",
        Duration::from_secs(15),
        async || {
            let w = workload(&cp, "catalog-1").await?;
            (w["status"]["health"]["recoveries"].as_u64() >= Some(1)).then_some(w)
        },
    )
    .await;
    assert_eq!(
        w["status"]["health"]["healthy"], true,
        "never unhealthy: {w}"
    );
    // The caller takes the endpoint back at once, not after its ten-minute ejection.
    eventually("ejection lifted", Duration::from_secs(15), async || {
        (via(&caller, "catalog.test").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(
        caller
            .metric(
                "trellis_outlier_ejected_endpoints",
                &[("cluster", "test/catalog:80")]
            )
            .await,
        0.0
    );
}

/// An agent stopped by SIGTERM takes its Workload out of the mesh, waits until the callers
/// have the change, and only then drains: under a steady load through a caller's proxy (mutual
/// TLS to the agents' proxies), with another endpoint serving, no request fails. (Draining
/// first, as before, failed 0-2 requests per leave at ~120 requests a second.)
#[tokio::test]
async fn an_agent_leaving_on_sigterm_fails_no_request_of_a_steady_load() {
    let app = |name: &'static str| {
        upstream::http(move |_req| async move {
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from(name)))
        })
    };
    let (app1, app2) = (app("one").await, app("two").await);
    let cp = ControlProcess::start(BIN, &[]);
    let mesh = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec: { address: 127.0.0.1, identity: client }\n";
    apply_ok(&cp, mesh.to_string()).await;
    let t = token(&cp, "test", "catalog", "10m", "2");
    let (s1, s2) = (Temp::path("leave-1"), Temp::path("leave-2"));
    let mut one = start_agent_named(
        &cp,
        s1.to_str().unwrap(),
        app1.port(),
        Some(&t),
        "catalog-1",
    );
    let _two = start_agent_named(
        &cp,
        s2.to_str().unwrap(),
        app2.port(),
        Some(&t),
        "catalog-2",
    );
    let caller = start_caller(&cp, "leave-caller").await;
    // Both serve the caller.
    let mut seen = std::collections::BTreeSet::new();
    // On a timeout, what answered and what the control plane holds of each agent (CI once
    // waited 20 s here; it never has locally).
    eventually_explained(
        "both endpoints answer",
        Duration::from_secs(20),
        async || {
            let (st, class, body) = via(&caller, "catalog.test").await;
            if st == 200 {
                seen.insert(body.clone());
            }
            if seen.len() == 2 {
                return Ok(());
            }
            let mut held = Vec::new();
            for name in ["catalog-1", "catalog-2"] {
                let w = workload(&cp, name).await;
                let health = w.map(|w| w["status"]["health"].to_string());
                held.push(format!(
                    "{name}: {}",
                    health.as_deref().unwrap_or("not registered")
                ));
            }
            Err(format!(
                "answers {seen:?}, the last {st} {class:?} {body:?}; {held:?}"
            ))
        },
    )
    .await;
    let load = Load::start(caller.outbound);
    load.until(300).await;
    let before = load.count();
    one.signal("-TERM");
    let exited = tokio::task::spawn_blocking(move || {
        let status = one.0.wait();
        (one, status)
    });
    let (_one, status) = tokio::time::timeout(Duration::from_secs(30), exited)
        .await
        .expect("the agent exits within 30 s")
        .unwrap();
    assert!(status.is_ok(), "{status:?}");
    let during = load.count() - before;
    // And a while after it left.
    load.until(load.count() + 300).await;
    let all = load.count();
    let failed = load.stop().await;
    println!("leave: {during} requests while the agent left, {all} in all, failed: {failed:?}");
    assert!(during > 0, "no request went while the agent left");
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(workload(&cp, "catalog-1").await.is_none(), "deregistered");
}

/// An agent upgraded in place: the same `trellis join` command started again (a new binary
/// would be) takes over the running agent's listeners through STATE_DIR/handoff.sock, with
/// its health verdict; the old agent drains and exits without deregistering. Under a steady
/// load through a caller's proxy (mutual TLS) to this, the only endpoint, no request fails,
/// and the Workload stays registered and healthy throughout.
#[tokio::test]
async fn an_agent_upgraded_in_place_fails_no_request_and_stays_registered() {
    let app = upstream::http(|_req| async {
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from("one")))
    })
    .await;
    let cp = ControlProcess::start(BIN, &[]);
    let mesh = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec: { address: 127.0.0.1, identity: client }\n";
    apply_ok(&cp, mesh.to_string()).await;
    let t = token(&cp, "test", "catalog", "10m", "1");
    let state = Temp::path("upgrade");
    let s = state.to_str().unwrap();
    // Three passes to become healthy: a new agent that started from unhealthy would show.
    let slow_up = ["--healthy-threshold", "3"];
    let mut old = start_agent_with(&cp, s, app.port(), Some(&t), "catalog-1", &slow_up);
    let caller = start_caller(&cp, "upgrade-caller").await;
    // On a timeout, the last answer and what the control plane holds of the agent (CI once
    // waited 20 s here, before the upgrade began; it never has locally).
    eventually_explained(
        "the agent's workload answers",
        Duration::from_secs(20),
        async || {
            let (st, class, body) = via(&caller, "catalog.test").await;
            if st == 200 && body == "one" {
                return Ok(());
            }
            let held = workload(&cp, "catalog-1")
                .await
                .map(|w| w["status"].to_string());
            Err(format!(
                "the last answer {st} {class:?} {body:?}; catalog-1: {}",
                held.as_deref().unwrap_or("not registered")
            ))
        },
    )
    .await;
    let registered = workload(&cp, "catalog-1").await.expect("registered");
    let load = Load::start(caller.outbound);
    load.until(200).await;
    let before = load.count();
    let new = start_agent_with(&cp, s, app.port(), None, "catalog-1", &slow_up);
    let exited = tokio::task::spawn_blocking(move || {
        let status = old.0.wait();
        (old, status)
    });
    // What the control plane says of the workload while the upgrade goes on.
    let watching = AtomicBool::new(true);
    let watch = async {
        let mut seen = Vec::new();
        while watching.load(Ordering::Relaxed) {
            seen.push(healthy(&cp, "catalog-1").await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    };
    let upgrade = async {
        let (_old, status) = tokio::time::timeout(Duration::from_secs(30), exited)
            .await
            .expect("the old agent exits once the new one took over")
            .unwrap();
        assert!(status.as_ref().is_ok_and(|s| s.success()), "{status:?}");
        let during = load.count() - before;
        load.until(load.count() + 300).await;
        watching.store(false, Ordering::Relaxed);
        during
    };
    let (seen, during) = tokio::join!(watch, upgrade);
    let all = load.count();
    let failed = load.stop().await;
    let first: Vec<_> = failed.iter().take(10).collect();
    println!(
        "upgrade: {during} requests while the agent was replaced, {all} in all, {} failed (first: {first:?}); {} looks at the workload",
        failed.len(),
        seen.len()
    );
    // (Before the load, the caller was answered `no_healthy_upstream` until the workload
    // was healthy.)
    let unexpected = |c: &str| c != "ok" && c != "no_healthy_upstream";
    for l in caller
        .logs()
        .iter()
        .filter(|l| l["failure_class"].as_str().is_some_and(unexpected))
        .take(5)
    {
        println!("caller: {l}");
    }
    assert!(during > 0, "no request went during the upgrade");
    assert!(failed.is_empty(), "{} failed: {first:?}", failed.len());
    assert!(
        seen.iter().all(|h| *h == Some(true)),
        "the workload was unhealthy or gone during the upgrade: {seen:?}"
    );
    let now = workload(&cp, "catalog-1").await.expect("still registered");
    assert_eq!(
        now["spec"]["inboundPort"], registered["spec"]["inboundPort"],
        "the same inbound listener"
    );
    drop(new);
}
