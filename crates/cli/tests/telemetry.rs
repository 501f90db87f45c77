//! Fleet telemetry end to end: real proxies report to a real control plane over the
//! connection they hold for xDS (mutual TLS), and `trellis stat`, `trellis edges` and the
//! control plane's `/metrics` give back exactly the traffic sent.
//!
//! The mesh: `test/shop` (bare metal) calls `catalog.test`, served by `test/catalog-vm`
//! (a VM) and `test/catalog-ct` (a container), each behind its own proxy, over mutual TLS.
//! The environments are labels here (loopback); the test bed's tests make them real. All
//! three share a zone, so that the caller spreads its requests over both endpoints.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use serde_json::Value;
use trellis_test_support::{control::ControlProcess, eventually, temp_path, ProxyProcess, Temp};

/// Counts of an application: requests, and those it failed.
#[derive(Default)]
struct Hits {
    all: AtomicUsize,
    failed: AtomicUsize,
}

/// An application that answers 500 to paths ending in `/fail` and 200 to anything else,
/// counting.
async fn app(name: &'static str, hits: Arc<Hits>) -> SocketAddr {
    upstream::http(move |req| {
        hits.all.fetch_add(1, Ordering::SeqCst);
        let fail = req.uri().path().ends_with("/fail");
        if fail {
            hits.failed.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(name)));
            if fail {
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await
}

fn mesh(vm: SocketAddr, ct: SocketAddr, vm_in: u16, ct_in: u16) -> String {
    let workload = |name: &str, id: &str, env: &str, zone: &str, port: u16, inbound: u16| {
        let ports = if port > 0 {
            format!("\n  ports: {{ http: {port} }}\n  inboundPort: {inbound}")
        } else {
            String::new()
        };
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: {id} }} }}\nspec:\n  address: 127.0.0.1\n  identity: {id}\n  environment: {env}\n  locality: {{ region: eu, zone: {zone} }}{ports}\n"
        )
    };
    [
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n".to_string(),
        workload("catalog-vm", "catalog", "vm", "eu-1", vm.port(), vm_in),
        workload("catalog-ct", "catalog", "container", "eu-1", ct.port(), ct_in),
        workload("shop", "shop", "bare-metal", "eu-1", 0, 0),
        // Every failed request is tried twice: the actual attempts are known.
        route("catalog", "catalog", "    - retry: { attempts: 1, codes: [500], backoff: 1ms }\n"),
        policy("catalog", "  outlierDetection: { consecutiveFailures: 0 }\n  retryBudget: { percent: 100, minRetriesPerSecond: 1000 }\n  loadBalancer: { type: RoundRobin }\n"),
    ]
    .join("---\n")
}

struct Mesh {
    cp: ControlProcess,
    shop: ProxyProcess,
    vm: ProxyProcess,
    ct: ProxyProcess,
    vm_hits: Arc<Hits>,
    ct_hits: Arc<Hits>,
    shop_state: std::path::PathBuf,
}

/// The mesh, every proxy on xDS over mutual TLS, reporting every 200 ms.
async fn start_mesh() -> Mesh {
    let (vm_hits, ct_hits) = (Arc::new(Hits::default()), Arc::new(Hits::default()));
    let (vm_app, ct_app) = (
        app("vm", vm_hits.clone()).await,
        app("ct", ct_hits.clone()).await,
    );
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, mesh(vm_app, ct_app, 1, 1)).await;
    let xds = format!("https://{}", cp.xds);
    let join = |id: &str, uses: &str, workload: &str, state: Temp| {
        let t = token(&cp, "test", id, "10m", uses);
        ProxyProcess::start_xds(
            BIN,
            std::slice::from_ref(&xds),
            workload,
            &[
                "--state-dir",
                state.to_str().unwrap(),
                "--join-token",
                &t,
                "--ca-hash",
                &cp.ca_hash,
                "--report-interval",
                "200ms",
            ],
        )
        .owning(state)
    };
    let vm = join("catalog", "1", "test/catalog-vm", Temp::path("vm-state"));
    let ct = join("catalog", "1", "test/catalog-ct", Temp::path("ct-state"));
    vm.wait_ready().await;
    ct.wait_ready().await;
    apply_ok(
        &cp,
        mesh(vm_app, ct_app, vm.inbound.port(), ct.inbound.port()),
    )
    .await;
    let shop_state = temp_path("shop-state");
    let shop = join("shop", "1", "test/shop", Temp(shop_state.clone()));
    shop.wait_ready().await;
    // Both endpoints answer through the caller before counting starts.
    eventually(
        "the caller reaches both endpoints",
        Duration::from_secs(15),
        async || {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..6 {
                let r = client::get_full(shop.outbound, "catalog.test", "/warm", &[])
                    .await
                    .ok()?;
                (r.status == 200).then_some(())?;
                seen.insert(r.body.clone());
            }
            (seen.len() == 2).then_some(())
        },
    )
    .await;
    Mesh {
        cp,
        shop,
        vm,
        ct,
        vm_hits,
        ct_hits,
        shop_state,
    }
}

async fn api(cp: &ControlProcess, path: &str) -> Value {
    let (st, v) = cp.call(http::Method::GET, path, "", None).await;
    assert_eq!(st, 200, "{path}: {v}");
    v
}

/// The row `name` of `query` once it counts `n` requests (waited for, with a deadline of
/// `secs`): reports arrive every period.
async fn counted(
    what: &str,
    secs: u64,
    cp: &ControlProcess,
    query: &str,
    name: &str,
    n: u64,
) -> Value {
    eventually(what, Duration::from_secs(secs), async || {
        let v = api(cp, query).await;
        let r = row(&v, name)?.clone();
        (r["requests"] == n).then_some(r)
    })
    .await
}

fn row<'a>(rows: &'a Value, name: &str) -> Option<&'a Value> {
    rows.as_array()?.iter().find(|r| r["name"] == name)
}

/// Sum of a Prometheus counter's samples whose labels include every pair of `want`.
fn prom_sum(text: &str, metric: &str, want: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The nearest-rank quantile of `v` (sorted).
fn exact(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).max(1);
    v[rank - 1]
}

#[tokio::test]
async fn stat_and_edges_give_back_exactly_the_traffic_sent() {
    let m = start_mesh().await;
    let warm = (
        m.vm_hits.all.load(Ordering::SeqCst),
        m.ct_hits.all.load(Ordering::SeqCst),
    );
    // Known traffic: N requests, M of them to /fail (500 from the application, retried once).
    let (n, fails) = (120u64, 18u64);
    let mut c = client::Conn::h1(m.shop.outbound).await;
    for i in 0..n {
        let path = if i % (n / fails) == 0 && i / (n / fails) < fails {
            "/fail"
        } else {
            "/ok"
        };
        let r = c.get("catalog.test", path).await.unwrap();
        assert_eq!(r.status, if path == "/fail" { 500 } else { 200 }, "{path}");
    }
    let vm_hits = m.vm_hits.all.load(Ordering::SeqCst) - warm.0;
    let ct_hits = m.ct_hits.all.load(Ordering::SeqCst) - warm.1;
    assert_eq!(
        (vm_hits + ct_hits) as u64,
        n + fails,
        "each failure tried twice"
    );

    // The warm-up requests are in the window too: they are counted from the caller's log.
    let lines = eventually(
        "the caller's log has every request",
        Duration::from_secs(10),
        async || {
            let l = m.shop.logs();
            let known = l
                .iter()
                .filter(|l| l["path"] == "/ok" || l["path"] == "/fail")
                .count();
            (known as u64 == n).then_some(l)
        },
    )
    .await;
    let calls: Vec<&Value> = lines
        .iter()
        .filter(|l| l["direction"] == "outbound" && l["dst_service"] == "catalog.test")
        .collect();
    let warm: Vec<&&Value> = calls.iter().filter(|l| l["path"] == "/warm").collect();
    let total = calls.len() as u64;
    assert_eq!(total, warm.len() as u64 + n, "one log line a request");
    let failed = fails + warm.iter().filter(|l| l["failure_class"] != "ok").count() as u64;
    let attempts: u64 = calls.iter().map(|l| l["attempts"].as_u64().unwrap()).sum();
    assert_eq!(
        attempts
            - warm
                .iter()
                .map(|l| l["attempts"].as_u64().unwrap())
                .sum::<u64>(),
        n + fails
    );
    let stat = counted(
        "stat counts every request",
        15,
        &m.cp,
        "/api/v1/stat?namespace=test&window=5m",
        "test/catalog",
        total,
    )
    .await;
    // The callers' view: exact counts, the failure class, effective and actual outcomes.
    assert_eq!(stat["seen"], "callers", "{stat}");
    assert_eq!(stat["meshed"], true, "{stat}");
    assert_eq!(
        stat["environments"],
        serde_json::json!(["container", "vm"]),
        "{stat}"
    );
    let success = stat["success"].as_f64().unwrap();
    assert!(
        (success - (total - failed) as f64 / total as f64).abs() < 1e-12,
        "{stat}"
    );
    assert_eq!(
        stat["failures"]["application"][0],
        serde_json::json!({ "class": "app_error", "count": fails }),
        "{stat}"
    );
    assert_eq!(stat["attempts"], attempts, "{stat}");
    // Every attempt but a request's last failed.
    let actual = stat["actual_success"].as_f64().unwrap();
    let good = total - failed;
    assert!(
        (actual - good as f64 / attempts as f64).abs() < 1e-12,
        "{stat}"
    );
    // Quantiles within the histogram's error of the exact ones from the access log (which
    // has the same durations, to the microsecond).
    let mut ms: Vec<f64> = calls
        .iter()
        .map(|l| l["total_ms"].as_f64().unwrap())
        .collect();
    ms.sort_by(f64::total_cmp);
    let err = stat["latency_ms"]["error"].as_f64().unwrap();
    assert!(err < 0.011, "the proxies' scale: about 1 %: {err}");
    for (q, key) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")] {
        let (got, want) = (stat["latency_ms"][key].as_f64().unwrap(), exact(&ms, q));
        assert!(
            (got - want).abs() <= want * err + 0.001,
            "{key}: {got} vs {want}"
        );
    }

    // Each workload as it served: every attempt it got, from its own proxy.
    let wl = api(&m.cp, "/api/v1/stat?kind=workload&namespace=test&window=5m").await;
    for (name, env, hits) in [
        ("test/catalog-vm", "vm", &m.vm_hits),
        ("test/catalog-ct", "container", &m.ct_hits),
    ] {
        let all = hits.all.load(Ordering::SeqCst) as u64;
        let failed = hits.failed.load(Ordering::SeqCst) as u64;
        let r = counted(
            "the workload's own report",
            10,
            &m.cp,
            "/api/v1/stat?kind=workload&namespace=test&window=5m",
            name,
            all,
        )
        .await;
        assert_eq!(
            (r["seen"].as_str(), r["environments"][0].as_str()),
            (Some("served"), Some(env)),
            "{r}"
        );
        assert_eq!(r["failures"]["application"][0]["count"], failed, "{r}");
    }
    assert_eq!(
        row(&wl, "test/shop").map(|r| r["seen"].clone()),
        Some("callers".into()),
        "{wl}"
    );

    // Edges: the caller to each endpoint, with both identities and mTLS; together every
    // request.
    let edges = api(&m.cp, "/api/v1/edges?namespace=test&window=5m").await;
    let mut sum = 0;
    for (dst, env) in [("test/catalog-vm", "vm"), ("test/catalog-ct", "container")] {
        let e = edges
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["src"] == "test/shop" && e["dst"] == dst)
            .unwrap_or_else(|| panic!("no edge to {dst}: {edges}"));
        assert_eq!(e["src_environment"], "bare-metal", "{e}");
        assert_eq!(e["dst_environment"], env, "{e}");
        assert_eq!(e["mtls"], true, "{e}");
        assert_eq!(
            e["src_identity"], "spiffe://trellis.local/ns/test/sa/shop",
            "{e}"
        );
        assert_eq!(
            e["dst_identity"], "spiffe://trellis.local/ns/test/sa/catalog",
            "{e}"
        );
        assert_eq!(e["services"], serde_json::json!(["test/catalog"]), "{e}");
        // The kernel's figures of the caller's connections to that callee's proxy, read
        // with ss on the caller's host.
        assert!(e["link"]["connections"].as_u64() >= Some(1), "{e}");
        assert!(e["link"]["rtt_ms"].as_f64() > Some(0.0), "{e}");
        // Loopback loses nothing, but a loaded machine's loopback sees the odd spurious
        // retransmission (a tail-loss probe before a delayed ACK): a share, not a count.
        let r = e["link"]["retransmitted"].as_f64();
        assert!(r.is_some_and(|r| (0.0..0.1).contains(&r)), "{e}");
        sum += e["requests"].as_u64().unwrap();
    }
    assert_eq!(sum, total, "{edges}");

    // The CLI shows the API's rows.
    let out = ok(cli(
        &m.cp,
        &[
            "stat",
            "svc/catalog",
            "-n",
            "test",
            "--window",
            "5m",
            "-o",
            "json",
        ],
    ));
    let cli_rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cli_rows[0]["requests"], total, "{out}");
    let table = ok(cli(&m.cp, &["stat", "-n", "test", "--window", "5m"]));
    let line = table
        .lines()
        .find(|l| l.starts_with("test/catalog "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains(&format!("app {fails} (app_error {fails}")),
        "{table}"
    );
    // An empty view tells a name the control plane does not hold (a typo, the wrong
    // namespace) from a defined service that had no traffic.
    apply_ok(
        &m.cp,
        service("idle", "HTTP", &["127.0.0.1:9".parse().unwrap()]),
    )
    .await;
    let said = |args: &[&str]| {
        let out = cli(&m.cp, args);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let se = said(&["stat", "svc/catalog", "-n", "other"]);
    assert!(
        se.contains("Service other/catalog is not defined") && se.contains("no traffic"),
        "{se}"
    );
    let se = said(&["stat", "svc/catalgo"]);
    assert!(
        se.contains("No Service named catalgo is defined in any namespace"),
        "{se}"
    );
    let se = said(&["edges", "wl/test/nobody"]);
    assert!(se.contains("Workload test/nobody is not defined"), "{se}");
    for args in [
        &["stat", "svc/test/idle"][..],
        &["stat", "svc/idle"],
        &["edges", "svc/idle", "-n", "test"],
    ] {
        let se = said(args);
        assert!(
            se.starts_with("No traffic") && !se.contains("not defined"),
            "{args:?}: {se}"
        );
    }
    let edges_table = ok(cli(
        &m.cp,
        &["edges", "-n", "test", "--window", "5m", "-o", "wide"],
    ));
    assert!(
        edges_table.lines().any(|l| l.starts_with("test/shop")
            && l.contains("test/catalog-vm")
            && l.contains("spiffe://trellis.local/ns/test/sa/catalog")),
        "{edges_table}"
    );

    // One scrape of the control plane: the same counts.
    let (st, text) = scrape(&m.cp).await;
    assert_eq!(st, 200);
    let out = [("direction", "outbound"), ("service", "test/catalog")];
    assert_eq!(
        prom_sum(&text, "trellis_fleet_requests_total", &out),
        total,
        "{text}"
    );
    let failed_labels = [
        ("direction", "outbound"),
        ("service", "test/catalog"),
        ("success", "false"),
    ];
    assert_eq!(
        prom_sum(&text, "trellis_fleet_requests_total", &failed_labels),
        failed
    );
    assert_eq!(
        prom_sum(&text, "trellis_fleet_attempts_total", &out),
        attempts
    );
    assert_eq!(prom_sum(&text, "trellis_fleet_reports_lost_total", &[]), 0);
    drop((m.vm, m.ct));
}

/// `GET /metrics` of the control plane with its token: status and text.
async fn scrape(cp: &ControlProcess) -> (u16, String) {
    let req = http::Request::get("/metrics")
        .header("host", "control")
        .header("authorization", format!("Bearer {}", cp.token))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = trellis_test_support::client::send1(cp.api, req)
        .await
        .unwrap();
    (
        r.status.as_u16(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

/// `req` sent to the control plane's xDS address over mutual TLS as the proxy whose identity
/// is stored in `state`: the answer's status and body.
async fn send_as_proxy(
    cp: &ControlProcess,
    state: &std::path::Path,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> (u16, String) {
    let creds = trellis_proxy::identity::bootstrap(
        &trellis_proxy::identity::IdentityOptions {
            state_dir: state.to_path_buf(),
            join_token: None,
            ca_hash: None,
        },
        &[cp.xds_url()],
    )
    .await
    .expect("the stored identity");
    let tls = trellis_proxy::control_link::connect_control(&cp.xds.to_string(), Some(&creds), None)
        .await
        .expect("mutual TLS to the control plane");
    let mut send = h2_over(tls).await;
    let r = send.send_request(req).await.unwrap();
    let st = r.status().as_u16();
    let body = http_body_util::BodyExt::collect(r.into_body())
        .await
        .unwrap()
        .to_bytes();
    (st, String::from_utf8_lossy(&body).into_owned())
}

/// POST a batch of one report for `workload` to `/v1/telemetry` over mutual TLS as the
/// proxy whose identity is stored in `state`.
async fn post_report(
    cp: &ControlProcess,
    state: &std::path::Path,
    workload: &str,
) -> (u16, String) {
    use prost::Message;
    use trellis_telemetry::report::{Batch, Report, Series};
    let batch = Batch {
        reports: vec![Report {
            workload: workload.into(),
            node: "forger".into(),
            run: 42,
            seq: 1,
            start_ms: 1,
            period_ms: 1,
            series: vec![Series {
                service: "test/catalog".into(),
                class: "app_error".into(),
                status_class: 5,
                requests: 1_000_000,
                attempts: 1_000_000,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let req = http::Request::post(format!("http://{}/v1/telemetry", cp.xds))
        .header("content-type", "application/x-protobuf")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            batch.encode_to_vec(),
        )))
        .unwrap();
    send_as_proxy(cp, state, req).await
}

#[tokio::test]
async fn a_report_for_another_workload_is_refused() {
    let m = start_mesh().await;
    // The caller's identity (shop) speaking for the catalog's VM: refused whole.
    let (st, body) = post_report(&m.cp, &m.shop_state, "test/catalog-vm").await;
    assert_eq!(st, 403, "{body}");
    assert!(
        body.contains("belongs to identity \\\"catalog\\\""),
        "{body}"
    );
    let (st, body) = post_report(&m.cp, &m.shop_state, "other/shop").await;
    assert_eq!(st, 403, "{body}");
    let v = api(&m.cp, "/api/v1/stat?kind=workload&namespace=test&window=5m").await;
    assert!(
        row(&v, "test/catalog-vm").is_none_or(|r| r["requests"].as_u64() < Some(1_000_000)),
        "{v}"
    );
    // For its own workload, the same report is taken (the check is not a blanket refusal).
    let (st, body) = post_report(&m.cp, &m.shop_state, "test/shop").await;
    assert_eq!(st, 200, "{body}");
    // What one replica asks another is refused to a proxy's identity: a tap session's part
    // (with every header value but credentials'), a window's part, the fleet's loads.
    for path in [
        "/v1/fleet/tap?kind=service&name=test/catalog&headers=true",
        "/v1/fleet/shard?window=5m",
        "/v1/fleet/loads",
    ] {
        let req = http::Request::get(format!("http://{}{path}", m.cp.xds))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let (st, body) = send_as_proxy(&m.cp, &m.shop_state, req).await;
        assert_eq!(st, 403, "{path}: {body}");
        assert!(
            body.contains("only another control-plane replica"),
            "{body}"
        );
    }
}

/// A TCP relay to `to` that can be cut: while cut, its connections are closed and new ones
/// are closed at once.
struct Relay {
    addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c, cs) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                cs.lock().unwrap().push(h.abort_handle());
            }
        });
        Self { addr, cut, conns }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            for h in self.conns.lock().unwrap().drain(..) {
                h.abort();
            }
        }
    }
}

#[tokio::test]
async fn a_proxy_cut_off_from_the_control_plane_loses_no_period() {
    let hits = Arc::new(Hits::default());
    let a = app("a", hits.clone()).await;
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(
        &cp,
        docs(&[service("direct", "HTTP", &[a]), client_workload(&[])]),
    )
    .await;
    let relay = Relay::start(cp.xds).await;
    let p = ProxyProcess::start_xds(
        BIN,
        &[format!("http://{}", relay.addr)],
        "test/client",
        &["--report-interval", "200ms"],
    );
    p.wait_ready().await;
    let mut c = client::Conn::h1(p.outbound).await;
    let mut sent = 0u64;
    let mut send = async |k: u64, sent: &mut u64| {
        for _ in 0..k {
            assert_eq!(c.get("direct.test", "/").await.unwrap().status, 200);
            *sent += 1;
        }
    };
    send(20, &mut sent).await;
    relay.set_cut(true);
    // Cut off for fifteen report periods, with traffic all along.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        send(5, &mut sent).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It really was cut off: the xDS stream broke, and nothing came back meanwhile.
    assert!(
        p.stderr().iter().any(|l| l.contains("xds stream lost")),
        "{:?}",
        p.stderr()
    );
    relay.set_cut(false);
    send(10, &mut sent).await;
    let v = counted(
        "every request counted once",
        20,
        &cp,
        "/api/v1/stat?namespace=test&window=5m",
        "test/direct",
        sent,
    )
    .await;
    assert_eq!(v["requests"], sent);
    let (_, text) = scrape(&cp).await;
    assert_eq!(
        prom_sum(&text, "trellis_fleet_reports_lost_total", &[]),
        0,
        "{text}"
    );
    assert_eq!(
        prom_sum(
            &text,
            "trellis_fleet_requests_total",
            &[("service", "test/direct")]
        ),
        sent
    );
}

/// A real Prometheus (Debian's), scraping `target`'s `/metrics` every second with `token`;
/// killed and its data removed on drop.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr, token: &str) -> Option<Self> {
        if std::process::Command::new("prometheus")
            .arg("--version")
            .output()
            .is_err()
        {
            return None;
        }
        let dir = temp_path("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: trellis\n    metrics_path: /metrics\n    authorization: {{ credentials: {token} }}\n    static_configs: [{{ targets: ['{target}'] }}]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        // An ephemeral port, chosen by the kernel and handed over.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus");
        Some(Self { child, addr, dir })
    }

    /// The value of an instant PromQL query, if it has one.
    async fn query(&self, promql: &str) -> Option<f64> {
        let enc: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect();
        let (st, body) = client::get(
            self.addr,
            "prometheus",
            &format!("/api/v1/query?query={enc}"),
            &[],
        )
        .await
        .ok()?;
        if st != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn prometheus_scraping_the_control_plane_agrees_with_stat() {
    let hits = Arc::new(Hits::default());
    let a = app("a", hits.clone()).await;
    let cp = ControlProcess::start(BIN, &[]);
    // Failures in a row would eject the one endpoint: outlier detection off.
    let no_ejection = policy("direct", "  outlierDetection: { consecutiveFailures: 0 }\n");
    apply_ok(
        &cp,
        docs(&[
            service("direct", "HTTP", &[a]),
            no_ejection,
            client_workload(&[]),
        ]),
    )
    .await;
    let Some(prom) = Prometheus::start(cp.api, &cp.token) else {
        panic!("prometheus is not installed: bash .ci/setup installs it");
    };
    let p = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/client",
        &["--report-interval", "200ms"],
    );
    p.wait_ready().await;
    let mut c = client::Conn::h1(p.outbound).await;
    let (n, fails) = (50u64, 7u64);
    for i in 0..n {
        let path = if i < fails { "/fail" } else { "/ok" };
        c.get("direct.test", path).await.unwrap();
    }
    let stat = counted(
        "stat counts every request",
        15,
        &cp,
        "/api/v1/stat?namespace=test&window=5m",
        "test/direct",
        n,
    )
    .await;
    let success = stat["success"].as_f64().unwrap();
    assert!(
        (success - (n - fails) as f64 / n as f64).abs() < 1e-12,
        "{stat}"
    );
    // The same success rate from PromQL over the control plane's one scrape target (its
    // counters cover its whole life, which the 5 minute window of `stat` covers too).
    let q = "sum(trellis_fleet_requests_total{service=\"test/direct\",direction=\"outbound\",success=\"true\"}) / sum(trellis_fleet_requests_total{service=\"test/direct\",direction=\"outbound\"})";
    let total_q =
        "sum(trellis_fleet_requests_total{service=\"test/direct\",direction=\"outbound\"})";
    eventually(
        "Prometheus scraped every request",
        Duration::from_secs(30),
        async || (prom.query(total_q).await? == n as f64).then_some(()),
    )
    .await;
    let promql = prom.query(q).await.expect("a success rate");
    assert!(
        (promql - success).abs() < 1e-12,
        "PromQL {promql} vs stat {success}"
    );
    // And a quantile from the exported buckets: within a power of two of stat's (the
    // buckets are powers of two).
    let p50 = prom
        .query("histogram_quantile(0.5, sum by (le) (trellis_fleet_request_duration_seconds_bucket{service=\"test/direct\",direction=\"outbound\"}))")
        .await
        .expect("a median");
    let stat_p50 = stat["latency_ms"]["p50"].as_f64().unwrap() / 1000.0;
    assert!(
        p50 / stat_p50 < 2.0 && stat_p50 / p50 < 2.0,
        "PromQL {p50} vs stat {stat_p50}"
    );
}

/// `trellis tap ARGS` against `cp`, its output lines collected as they come; killed on drop.
struct TapProcess {
    child: std::process::Child,
    lines: Arc<std::sync::Mutex<Vec<Value>>>,
    errors: Arc<std::sync::Mutex<String>>,
}

impl TapProcess {
    fn start(cp: &ControlProcess, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(BIN)
            .arg("tap")
            .args(args)
            .args([
                "-o",
                "json",
                "--server",
                &cp.api_url(),
                "--token",
                &cp.token,
            ])
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run trellis tap");
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let errors: Arc<std::sync::Mutex<String>> = Arc::default();
        let e = errors.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                e.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let lines: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                l.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).expect("a JSON line"));
            }
        });
        Self {
            child,
            lines,
            errors,
        }
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// What it wrote on stderr so far.
    fn errors(&self) -> String {
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for TapProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The taps a proxy applies now (its admin page).
async fn taps_of(p: &ProxyProcess) -> Value {
    let (_, body) = client::get(p.admin, "admin", "/taps", &[]).await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn tap_shows_live_requests_that_match_within_its_bound_split_over_the_proxies() {
    let hits = Arc::new(Hits::default());
    let a = app("a", hits.clone()).await;
    let cp = ControlProcess::start(BIN, &[]);
    let second = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client2, namespace: test }\nspec: { address: 127.0.0.1 }\n".to_string();
    let no_ejection = policy("direct", "  outlierDetection: { consecutiveFailures: 0 }\n");
    apply_ok(
        &cp,
        docs(&[
            service("direct", "HTTP", &[a]),
            no_ejection,
            client_workload(&[]),
            second,
        ]),
    )
    .await;
    let p1 = ProxyProcess::start_xds(BIN, &[cp.xds_url()], "test/client", &[]);
    let p2 = ProxyProcess::start_xds(BIN, &[cp.xds_url()], "test/client2", &[]);
    p1.wait_ready().await;
    p2.wait_ready().await;

    // A tap no connected proxy can serve says so, rather than printing nothing.
    let nobody = TapProcess::start(&cp, &["wl/test/nobody"]);
    eventually(
        "the tap says the workload's proxy is not connected",
        Duration::from_secs(10),
        async || {
            nobody
                .errors()
                .contains("Workload test/nobody's proxy is not connected")
                .then_some(())
        },
    )
    .await;
    drop(nobody);

    // Filters: only /a paths that failed in the application.
    let tap = TapProcess::start(
        &cp,
        &[
            "svc/direct",
            "-n",
            "test",
            "--path-prefix",
            "/a",
            "--failure-class",
            "app_error",
            "--max-rps",
            "1000",
        ],
    );
    // The bound is split over the two proxies following taps.
    for p in [&p1, &p2] {
        eventually(
            "the proxy applies its share of the tap",
            Duration::from_secs(10),
            async || {
                let t = taps_of(p).await;
                (t[0]["rate"].as_f64() == Some(500.0) && t[0]["service"] == "direct.test")
                    .then_some(())
            },
        )
        .await;
    }
    let (mut c1, mut c2) = (
        client::Conn::h1(p1.outbound).await,
        client::Conn::h1(p2.outbound).await,
    );
    let secret = [
        ("authorization", "Bearer sekrit-token"),
        ("cookie", "sekrit-cookie"),
    ];
    for path in ["/a/fail", "/a/ok", "/b/fail", "/a/x/fail"] {
        assert!(client::get_full(p1.outbound, "direct.test", path, &secret)
            .await
            .is_ok());
        c2.get("direct.test", path).await.unwrap();
    }
    let events = eventually(
        "the matching requests of both proxies",
        Duration::from_secs(10),
        async || {
            let l = tap.lines();
            (l.len() >= 4).then_some(l)
        },
    )
    .await;
    let mut got: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["src_workload"].as_str().unwrap_or_default().to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("test/client".into(), "/a/fail".into()),
            ("test/client".into(), "/a/x/fail".into()),
            ("test/client2".into(), "/a/fail".into()),
            ("test/client2".into(), "/a/x/fail".into()),
        ],
        "{events:?}"
    );
    for e in &events {
        assert_eq!(
            (
                e["class"].as_str(),
                e["status"].as_u64(),
                e["direction"].as_str()
            ),
            (Some("app_error"), Some(500), Some("outbound")),
            "{e}"
        );
        assert_eq!(e["dst_service"], "direct.test", "{e}");
        assert!(e["latency_ms"].as_f64().unwrap() > 0.0, "{e}");
        // No header values, ever.
        let text = e.to_string();
        assert!(!text.contains("sekrit"), "{text}");
    }
    drop(tap);
    // The session is gone: the proxies stop tapping.
    for p in [&p1, &p2] {
        eventually(
            "the tap ends with its session",
            Duration::from_secs(10),
            async || (taps_of(p).await == serde_json::json!([])).then_some(()),
        )
        .await;
    }

    // `top` adds the same up: count, success and the failure class by source, destination,
    // method and path (run for a fixed time, so it prints its table once at the end).
    let top = std::process::Command::new(BIN)
        .args([
            "top",
            "svc/direct",
            "-n",
            "test",
            "--max-rps",
            "1000",
            "--duration",
            "5s",
        ])
        .args(["--server", &cp.api_url(), "--token", &cp.token])
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run trellis top");
    eventually(
        "the proxies apply top's tap",
        Duration::from_secs(3),
        async || (taps_of(&p1).await[0]["rate"].as_f64() == Some(500.0)).then_some(()),
    )
    .await;
    for path in ["/t/ok", "/t/ok", "/t/ok", "/t/fail", "/t/fail"] {
        c1.get("direct.test", path).await.unwrap();
    }
    c2.get("direct.test", "/t/ok").await.unwrap();
    let out = top.wait_with_output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = |src: &str, path: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{src} ")) && l.split_whitespace().any(|w| w == path))
            .unwrap_or_else(|| panic!("no row {src} {path}: {table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // SOURCE DESTINATION (WORKLOAD) METHOD PATH COUNT SUCCESS BEST WORST LAST FAILURE
    let ok = row("test/client", "/t/ok");
    assert_eq!(
        (
            ok[3].as_str(),
            ok[5].as_str(),
            ok[6].as_str(),
            ok[10].as_str()
        ),
        ("GET", "3", "100.00%", "-"),
        "{table}"
    );
    let failed = row("test/client", "/t/fail");
    assert_eq!(
        (failed[5].as_str(), failed[6].as_str()),
        ("2", "0.00%"),
        "{table}"
    );
    assert!(failed[10..].join(" ") == "app_error 2", "{table}");
    assert_eq!(row("test/client2", "/t/ok")[5], "1", "{table}");

    // A bound of 2 a second over both proxies: a burst of requests yields at most what the
    // bound allows for the time it took (one second's burst, plus the rate).
    let tap = TapProcess::start(&cp, &["svc/direct", "-n", "test", "--max-rps", "2"]);
    eventually(
        "a share of one a second each",
        Duration::from_secs(10),
        async || {
            (taps_of(&p1).await[0]["rate"].as_f64() == Some(1.0)
                && taps_of(&p2).await[0]["rate"].as_f64() == Some(1.0))
            .then_some(())
        },
    )
    .await;
    let start = tokio::time::Instant::now();
    for _ in 0..100 {
        c1.get("direct.test", "/burst").await.unwrap();
        c2.get("direct.test", "/burst").await.unwrap();
    }
    eventually(
        "some requests tapped",
        Duration::from_secs(10),
        async || (!tap.lines().is_empty()).then_some(()),
    )
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let n = tap.lines().len() as f64;
    assert!(
        n <= 2.0 + 2.0 * (elapsed + 1.0),
        "{n} events of 200 requests in {elapsed:.2} s"
    );
    drop(tap);

    // With --headers, header values show, but credentials' never do.
    let tap = TapProcess::start(
        &cp,
        &[
            "svc/direct",
            "-n",
            "test",
            "--path-prefix",
            "/h",
            "--headers",
        ],
    );
    eventually(
        "the proxy's tap shows headers",
        Duration::from_secs(10),
        async || (taps_of(&p1).await[0]["headers"] == true).then_some(()),
    )
    .await;
    let mut with = secret.to_vec();
    with.push(("x-order", "o-17"));
    // The caller's trace context shows as it came (the parser keeps it out of the map).
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    with.push(("traceparent", tp));
    client::get_full(p1.outbound, "direct.test", "/h/ok", &with)
        .await
        .unwrap();
    let e = eventually("the tapped request", Duration::from_secs(10), async || {
        tap.lines().into_iter().next()
    })
    .await;
    let req = &e["request_headers"];
    assert_eq!(req["x-order"], "o-17", "{e}");
    assert_eq!(req["traceparent"], tp, "{e}");
    assert_eq!(req["authorization"], "<withheld>", "{e}");
    assert_eq!(req["cookie"], "<withheld>", "{e}");
    assert_eq!(e["response_headers"]["content-length"], "1", "{e}");
    assert!(!e.to_string().contains("sekrit"), "{e}");
}

#[tokio::test]
async fn two_replicas_on_etcd_each_answer_for_the_whole_fleet() {
    let etcd = trellis_test_support::etcd::Etcd::start().await;
    let store = etcd.url();
    let a = ControlProcess::start(BIN, &["--store", &store]);
    let mut b = ControlProcess::start(BIN, &["--store", &store]);
    b.token = a.token.clone();
    let (vm_hits, ct_hits) = (Arc::new(Hits::default()), Arc::new(Hits::default()));
    let (vm_app, ct_app) = (
        app("vm", vm_hits.clone()).await,
        app("ct", ct_hits.clone()).await,
    );
    apply_ok(&a, mesh(vm_app, ct_app, 1, 1)).await;
    // Each proxy reports to the replica it is connected to: the callee catalog-vm to A; the
    // caller and the callee catalog-ct to B.
    let join = |cp: &ControlProcess, id: &str, workload: &str| {
        let extra = ["--ca-hash", &cp.ca_hash, "--report-interval", "200ms"];
        join_xds(cp, &format!("https://{}", cp.xds), id, workload, &extra)
    };
    let vm = join(&a, "catalog", "test/catalog-vm");
    let ct = join(&b, "catalog", "test/catalog-ct");
    vm.wait_ready().await;
    ct.wait_ready().await;
    apply_ok(
        &a,
        mesh(vm_app, ct_app, vm.inbound.port(), ct.inbound.port()),
    )
    .await;
    let shop = join(&b, "shop", "test/shop");
    shop.wait_ready().await;
    // Taps opened on A reach the proxies connected to B: the service's caller, and a
    // workload of B's.
    let svc_tap = TapProcess::start(&a, &["svc/test/catalog", "--max-rps", "1000"]);
    let ct_tap = TapProcess::start(&a, &["wl/test/catalog-ct", "--max-rps", "1000"]);
    eventually(
        "B's proxies apply the taps opened on A",
        Duration::from_secs(10),
        async || {
            let (s, c) = (taps_of(&shop).await, taps_of(&ct).await);
            (s.as_array().map(Vec::len) == Some(1) && c.as_array().map(Vec::len) == Some(2))
                .then_some(())
        },
    )
    .await;
    let (n, fails) = (40u64, 8u64);
    let mut c = client::Conn::h1(shop.outbound).await;
    for i in 0..n {
        let path = if i % 5 == 0 { "/fail" } else { "/ok" };
        let r = c.get("catalog.test", path).await.unwrap();
        assert_eq!(r.status, if i % 5 == 0 { 500 } else { 200 });
    }
    let served = (vm_hits.all.load(Ordering::SeqCst) + ct_hits.all.load(Ordering::SeqCst)) as u64;
    assert_eq!(served, n + fails, "each failure tried twice");
    assert!(vm_hits.all.load(Ordering::SeqCst) > 0 && ct_hits.all.load(Ordering::SeqCst) > 0);

    let tapped = eventually(
        "A's service tap shows every request of B's caller",
        Duration::from_secs(10),
        async || {
            let l = svc_tap.lines();
            (l.len() as u64 >= n).then_some(l)
        },
    )
    .await;
    assert_eq!(tapped.len() as u64, n, "{tapped:?}");
    for e in &tapped {
        assert_eq!(
            (e["src_workload"].as_str(), e["direction"].as_str()),
            (Some("test/shop"), Some("outbound")),
            "{e}"
        );
    }
    let to_ct = ct_hits.all.load(Ordering::SeqCst) as u64;
    let served = eventually(
        "A's workload tap shows what B's catalog-ct served",
        Duration::from_secs(10),
        async || {
            let l = ct_tap.lines();
            (l.len() as u64 >= to_ct).then_some(l)
        },
    )
    .await;
    for e in &served {
        assert_eq!(
            (e["dst_workload"].as_str(), e["direction"].as_str()),
            (Some("test/catalog-ct"), Some("inbound")),
            "{e}"
        );
    }
    assert!(
        !svc_tap.errors().contains("not connected") && !ct_tap.errors().contains("not connected"),
        "A counts B's proxies: {} {}",
        svc_tap.errors(),
        ct_tap.errors()
    );
    // The session ends on B with the tap on A.
    drop((svc_tap, ct_tap));
    for p in [&shop, &ct] {
        eventually(
            "B's proxies stop tapping",
            Duration::from_secs(10),
            async || (taps_of(p).await == serde_json::json!([])).then_some(()),
        )
        .await;
    }

    // The service's row comes from the caller's reports, which only B holds: A answers it
    // as B does, counts and quantiles alike (histograms merge exactly).
    // A failed try is reported when it fails, apart from its request: both are waited for.
    let q = "/api/v1/stat?namespace=test&window=5m";
    let every_try = async |what: &str, cp: &ControlProcess| {
        eventually(what, Duration::from_secs(20), async || {
            let v = api(cp, q).await;
            let r = row(&v, "test/catalog")?.clone();
            (r["requests"] == n && r["attempts"] == n + fails).then_some(r)
        })
        .await
    };
    let from_a = every_try("A counts the caller's requests and tries", &a).await;
    let from_b = every_try("B counts the caller's requests and tries", &b).await;
    for f in [
        "requests",
        "attempts",
        "success",
        "actual_success",
        "latency_ms",
        "failures",
    ] {
        assert_eq!(from_a[f], from_b[f], "{f}: A {from_a} B {from_b}");
    }
    assert_eq!(from_a["attempts"], n + fails);
    // The callees' rows: catalog-vm reported to A, catalog-ct to B; both answer both.
    let workloads = "/api/v1/stat?kind=workload&namespace=test&window=5m";
    for cp in [&a, &b] {
        let vm_row = counted(
            "catalog-vm served",
            20,
            cp,
            workloads,
            "test/catalog-vm",
            vm_hits.all.load(Ordering::SeqCst) as u64,
        )
        .await;
        assert_eq!(vm_row["seen"], "served");
        counted(
            "catalog-ct served",
            20,
            cp,
            workloads,
            "test/catalog-ct",
            ct_hits.all.load(Ordering::SeqCst) as u64,
        )
        .await;
        // Edges join a caller reported on one replica with a callee on the other.
        let edges = api(cp, "/api/v1/edges?namespace=test&window=5m").await;
        let to_vm = edges
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["src"] == "test/shop" && e["dst"] == "test/catalog-vm")
            .unwrap_or_else(|| panic!("no shop → catalog-vm edge: {edges}"));
        assert_eq!(
            to_vm["src_identity"], "spiffe://trellis.local/ns/test/sa/shop",
            "{to_vm}"
        );
    }

    // B goes away (killed, its data dir removed): A still answers, with what it holds, and
    // says what is missing.
    let b_xds = b.xds;
    drop(b);
    let out = cli(&a, &["stat", "workloads", "-n", "test", "--window", "5m"]);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("test/catalog-vm"), "{so}");
    assert!(!so.contains("test/catalog-ct"), "B's part is gone: {so}");
    assert!(
        se.contains("warning:") && se.contains(&b_xds.to_string()),
        "the answer names the missing replica: {se}"
    );
}
