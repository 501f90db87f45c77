//! The single pane in a real browser (Debian's chromium through chromedriver): sign-in with
//! the admin token, the fleet's topology with its edges, a workload's view, the problems
//! `diagnose` finds, the services' figures and a service's view over time, a live tap, a
//! traffic shift confirmed in a dialog and applied through the API, and the page as a
//! read-only token sees it. The session cookie's flags, sign-in links, read-only tokens and
//! the Host check (DNS rebinding) are checked over raw HTTP.
//!
//! The mesh: `test/shop` (bare metal) calls `catalog.test`, whose route splits it between
//! `catalog-a` (the VM `test/catalog-vm`) and `catalog-b` (the container `test/catalog-ct`);
//! both applications answer 500 to paths ending in `/fail`.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use trellis_test_support::{browser::Browser, control::ControlProcess, eventually};

fn mesh(vm: SocketAddr, ct: SocketAddr, vm_in: u16, ct_in: u16) -> String {
    let svc = |name: &str, sel: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ {sel} }}\n  ports: [{{ name: http, port: 80, targetPort: 1, protocol: HTTP }}]\n")
    };
    let workload = |name: &str, version: &str, env: &str, port: u16, inbound: u16| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: catalog, version: {version} }} }}\nspec:\n  address: 127.0.0.1\n  identity: catalog\n  environment: {env}\n  ports: {{ http: {port} }}\n  inboundPort: {inbound}\n")
    };
    [
        svc("catalog", "app: catalog"),
        svc("catalog-a", "version: a"),
        svc("catalog-b", "version: b"),
        workload("catalog-vm", "a", "vm", vm.port(), vm_in),
        workload("catalog-ct", "b", "container", ct.port(), ct_in),
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: shop, namespace: test, labels: { app: shop } }\nspec: { address: 127.0.0.1, identity: shop, environment: bare-metal }\n".to_string(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: catalog, namespace: test }\nspec:\n  parentRefs: [{ kind: Service, name: catalog, port: 80 }]\n  rules:\n    - backendRefs:\n        - { name: catalog-a, port: 80, weight: 50 }\n        - { name: catalog-b, port: 80, weight: 50 }\n".to_string(),
        policy("catalog-a", "  outlierDetection: { consecutiveFailures: 0 }\n"),
        policy("catalog-b", "  outlierDetection: { consecutiveFailures: 0 }\n"),
    ]
    .join("---\n")
}

async fn app(name: &'static str) -> SocketAddr {
    upstream::http(move |req| async move {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(name)));
        if req.uri().path().ends_with("/fail") {
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        }
        r
    })
    .await
}

/// One raw HTTP/1.1 exchange with the API listener: status line and headers, and the body.
async fn raw(addr: SocketAddr, request: String) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// Draws 1,000 workloads in 5 namespaces and 3 environments with 5,000 edges (3 % of them
/// unhealthy) twice, and says how long each took, layout included.
const SCALE: &str = r##"
const envs = ["vm", "container", "bare-metal"], W = 1000, E = 5000;
const wl = (i) => `ns${i % 5}/w${i}`, env = (i) => envs[i % 3];
let seed = 7;
const rnd = (n) => { seed = (seed * 48271) % 2147483647; return seed % n; };
const none = { network: [], application: [], policy: [], client: [] };
const edges = [];
for (let k = 0; k < E; k++) {
  const a = k % W, b = rnd(W);
  edges.push({ src: wl(a), dst: wl(b), src_environment: env(a), dst_environment: env(b), rps: 1 + rnd(50),
    requests: 100, success: rnd(100) < 3 ? 0.9 : 1, latency_ms: { p50: 1, p99: 5 }, failures: none, mtls: true });
}
const stat = [];
for (let i = 0; i < 200; i++) stat.push({ name: `ns${i % 5}/svc${i}`, environments: ["vm"], success: 1, rps: 10,
  latency_ms: { p50: 1, p95: 2, p99: 3 }, failures: none });
const f = { stat, edges, diagnose: { verdicts: [] }, proxies: [] };
const t0 = performance.now();
window.trellisPane.draw(f);
document.body.getBoundingClientRect();
const first = performance.now() - t0;
edges.forEach((e) => { e.rps += 1; });
const t1 = performance.now();
window.trellisPane.draw(f);
document.body.getBoundingClientRect();
const update = performance.now() - t1;
return { first_ms: first, update_ms: update, nodes: document.querySelectorAll("#topology .node").length,
  edges_drawn: document.querySelectorAll("#topology .edge").length, summary: document.getElementById("summary").textContent };
"##;

/// Draws a database's edge and service (TCP connections, no requests) and reads back the
/// edge's label and colour and the service's success cell.
const TCP_ONLY: &str = r##"
const none = { network: [], application: [], policy: [], client: [] };
const tcp = { rps: 0, requests: 0, success: null, tcp_closed: 5, tcp_success: 0.8, tcp_cps: 0.5,
  latency_ms: { p50: null, p95: null, p99: null }, failures: none };
const edges = [{ src: "t/web", dst: "t/db-vm", src_environment: "container", dst_environment: "vm", mtls: true, ...tcp }];
const stat = [{ name: "t/db", environments: ["vm"], ...tcp }];
window.trellisPane.draw({ stat, edges, diagnose: { verdicts: [] }, proxies: [] });
const path = document.getElementById("edge-t/web--t/db-vm");
return { label: document.querySelector("#topology text.label").textContent,
  stroke: path && path.getAttribute("stroke"),
  service: document.querySelector("#services tbody tr td:nth-child(3)").textContent,
  rate: document.querySelector("#services tbody tr td:nth-child(4)").textContent };
"##;

/// Draws no verdict with what diagnose judged: no proxy, proxies without traffic, traffic;
/// reads back what the problems' list says each time.
const NOTHING_FOUND: &str = r##"
const said = (judged, connected = 0) => {
  window.trellisPane.draw({ stat: [], edges: [], diagnose: { verdicts: [], judged, connected }, proxies: [] });
  return document.getElementById("verdicts").textContent;
};
return { none: said({ proxies: 0, requests: 0, connections: 0 }),
  waiting: said({ proxies: 0, requests: 0, connections: 0 }, 3),
  idle: said({ proxies: 2, requests: 0, connections: 0 }, 2),
  busy: said({ proxies: 2, requests: 40, connections: 1 }),
  marker: getComputedStyle(document.querySelector("#verdicts li")).listStyleType };
"##;

/// Draws edges that leave one workload towards several in neighbouring environments and rows
/// (the demo's caller and its two backends, and more), and reads back whether any two
/// labels' boxes overlap, whether each label lies inside its box, and whether the picture
/// is tall enough for all of them.
const LABELS: &str = r##"
const none = { network: [], application: [], policy: [], client: [] };
const e = (src, se, dst, de, rps) => ({ src, dst, src_environment: se, dst_environment: de, mtls: true,
  rps, requests: 100, success: 1, latency_ms: { p50: 1.2, p95: 3.4, p99: 4.6 }, failures: none });
const edges = [
  e("t/shopper", "bare-metal", "t/catalog-container", "container", 0.5),
  e("t/shopper", "bare-metal", "t/catalog-vm", "vm", 0.5),
  e("t/shopper", "bare-metal", "t/pay-vm", "vm", 12.25),
  e("t/shopper", "bare-metal", "t/cart-container", "container", 3),
  e("t/cart-container", "container", "t/pay-vm", "vm", 1),
  e("t/cart-container", "container", "t/catalog-vm", "vm", 1),
  e("t/pay-vm", "vm", "t/shopper", "bare-metal", 0.25),
];
window.trellisPane.draw({ stat: [], edges, diagnose: { verdicts: [] }, proxies: [] });
const boxes = [...document.querySelectorAll("#topology rect.label-bg")].map((r) => r.getBBox());
const labels = [...document.querySelectorAll("#topology text.label")].map((t) => t.getBBox());
const height = +document.getElementById("topology").getAttribute("height");
const overlaps = [];
boxes.forEach((a, i) => boxes.forEach((b, j) => {
  if (i < j && a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height) {
    overlaps.push([i, j]);
  }
}));
const inside = labels.every((l, i) => l.x >= boxes[i].x && l.y >= boxes[i].y &&
  l.x + l.width <= boxes[i].x + boxes[i].width && l.y + l.height <= boxes[i].y + boxes[i].height);
// A label stands for its edge: a click on it shows the edge, a pointer over it marks the
// edge's curve.
const second = document.querySelector('#topology text.label[data-edge="1"]');
second.dispatchEvent(new MouseEvent("click", { bubbles: true }));
const shown = document.getElementById("edge-detail").textContent.split("\n")[0];
second.dispatchEvent(new MouseEvent("mouseenter"));
const marked = [...document.querySelectorAll("#topology .edge.hover")].map((p) => p.id);
second.dispatchEvent(new MouseEvent("mouseleave"));
const after = document.querySelectorAll("#topology .hover").length;
return { edges: edges.length, labels: labels.length, boxes: boxes.length, overlaps, inside,
  within: boxes.every((b) => b.y + b.height <= height), shown, marked, after };
"##;

/// With `TRELLIS_SCREENSHOTS=DIR`, a picture of the page as `DIR/file`, scrolled to the
/// element `id` when one is named (then back to the top).
async fn keep_picture(
    browser: &trellis_test_support::browser::Browser,
    id: Option<&str>,
    file: &str,
) {
    let Some(dir) = std::env::var_os("TRELLIS_SCREENSHOTS") else {
        return;
    };
    if let Some(id) = id {
        browser
            .eval(&format!("document.getElementById('{id}').scrollIntoView()"))
            .await
            .unwrap();
    }
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(std::path::Path::new(&dir).join(file), png).unwrap();
    if id.is_some() {
        browser.eval("window.scrollTo(0, 0)").await.unwrap();
    }
}

#[tokio::test]
async fn the_pane_shows_the_fleet_and_shifts_traffic_after_a_confirmation() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let (vm_app, ct_app) = (app("vm").await, app("ct").await);
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, mesh(vm_app, ct_app, 1, 1)).await;
    let join = |who: &str, workload: &str| join_reporting(&cp, who, workload);
    let vm = join("catalog", "test/catalog-vm");
    let ct = join("catalog", "test/catalog-ct");
    vm.wait_ready().await;
    ct.wait_ready().await;
    apply_ok(
        &cp,
        mesh(vm_app, ct_app, vm.inbound.port(), ct.inbound.port()),
    )
    .await;
    let shop = join("shop", "test/shop");
    shop.wait_ready().await;
    eventually(
        "both backends answer",
        Duration::from_secs(15),
        async || {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..10 {
                let r = client::get_full(shop.outbound, "catalog.test", "/warm", &[])
                    .await
                    .ok()?;
                seen.insert(r.body.clone());
            }
            (seen.len() == 2).then_some(())
        },
    )
    .await;
    for _ in 0..32 {
        client::get_full(shop.outbound, "catalog.test", "/ok", &[])
            .await
            .unwrap();
    }
    // Errors from both applications, enough of each for a verdict (the route's split is
    // random: a fixed number of requests can leave one side with a single failure).
    let (mut vm_errors, mut ct_errors) = (0, 0);
    for _ in 0..200 {
        if vm_errors >= 3 && ct_errors >= 3 {
            break;
        }
        let r = client::get_full(shop.outbound, "catalog.test", "/x/fail", &[])
            .await
            .unwrap();
        match r.body.as_ref() {
            b"vm" => vm_errors += 1,
            b"ct" => ct_errors += 1,
            other => panic!("an answer from neither application: {other:?}"),
        }
    }
    assert!(vm_errors >= 3 && ct_errors >= 3, "{vm_errors} {ct_errors}");

    // Sign in: the page asks for the token, and takes it once.
    let origin = format!("http://{}", cp.api);
    let url = format!("{origin}/ui/");
    browser.goto(&url).await.unwrap();
    let field = eventually("the sign-in form", Duration::from_secs(10), async || {
        browser.find("#signin:not([hidden]) #token").await.ok()
    })
    .await;
    browser.type_into(&field, &cp.token).await.unwrap();
    let submit = browser.find("#signin-button").await.unwrap();
    browser.click(&submit).await.unwrap();

    // The topology: the caller's edges to both callees, each in its environment.
    let edge = r#"[id="edge-test/shop--test/catalog-vm"]"#;
    eventually(
        "the edge to the VM is drawn",
        Duration::from_secs(20),
        async || browser.find(edge).await.ok(),
    )
    .await;
    let svg = browser.find("#topology").await.unwrap();
    let drawn = browser.text(&svg).await.unwrap();
    for want in [
        "bare-metal",
        "container",
        "vm",
        "test/catalog-ct",
        "test/shop",
    ] {
        assert!(drawn.contains(want), "{want}: {drawn}");
    }
    // Each label lies on a box over every curve (drawn after all of them), so that no later
    // edge's curve runs across an earlier edge's figures.
    let on_top = r#"const paths = [...document.querySelectorAll('#topology .edge')];
const labels = [...document.querySelectorAll('#topology text.label')];
const boxes = [...document.querySelectorAll('#topology rect.label-bg')];
return paths.length >= 2 && labels.length === paths.length && boxes.length === labels.length &&
  [...labels, ...boxes].every((l) =>
    paths.every((p) => p.compareDocumentPosition(l) & Node.DOCUMENT_POSITION_FOLLOWING));"#;
    eventually(
        "both edges drawn, their labels over every curve",
        Duration::from_secs(20),
        async || (browser.eval(on_top).await.ok()? == serde_json::json!(true)).then_some(()),
    )
    .await;
    // A click on the edge shows its failure classes and the verdicts about it (clicked
    // again until the verdict is in: the proxies' reports come in over a second or so, and
    // the detail is what the page held at the click).
    let click = format!(
        "document.querySelector('{}').dispatchEvent(new MouseEvent('click', {{bubbles: true}}))",
        edge.replace('\'', "\\'")
    );
    let detail = eventually(
        "the edge's detail with its verdict",
        Duration::from_secs(20),
        async || {
            browser.eval(&click).await.ok()?;
            let id = browser.find("#edge-detail").await.ok()?;
            let t = browser.text(&id).await.ok()?;
            (t.contains("app_error")
                && t.contains("application: the application of test/catalog-vm answers errors"))
            .then_some(t)
        },
    )
    .await;
    assert!(
        detail.contains("test/shop (bare-metal) → test/catalog-vm (vm)"),
        "{detail}"
    );
    assert!(
        detail.contains("application: the application of test/catalog-vm answers errors"),
        "{detail}"
    );
    // A click on a workload: its proxy, its edges, what happened to it.
    browser
        .eval(r#"document.querySelector('#topology g.node[data-workload="test/catalog-vm"]').dispatchEvent(new MouseEvent('click', {bubbles: true}))"#)
        .await
        .unwrap();
    let proxy = wait_text(&browser, "#workload-proxy", "in sync").await;
    assert!(proxy.contains("certificate expires in"), "{proxy}");
    let edges = wait_text(&browser, "#workload-edges", "test/shop").await;
    assert!(edges.contains("test/catalog-vm"), "{edges}");
    wait_text(&browser, "#workload-events", "joined").await;
    // Its inbound adaptive concurrency limit (on by default; it starts at 100).
    wait_text(
        &browser,
        "#workload-limit",
        "adaptive concurrency limit 100",
    )
    .await;
    // The problems and the services' figures.
    wait_text(
        &browser,
        "#verdicts",
        "the application of test/catalog-ct answers errors",
    )
    .await;
    let services = wait_text(&browser, "#services", "test/catalog").await;
    assert!(services.contains("app_error"), "{services}");
    // The header counts them, in the singular for one.
    wait_text(&browser, "#summary", "1 service · 2 edges · 2 problems").await;
    // A click on a service opens its view: requests over time by the workload that served
    // them, its endpoints by environment with their health, the route that names it.
    let row = browser
        .find(r#"#services tr[data-service="test/catalog"] td"#)
        .await
        .unwrap();
    browser.click(&row).await.unwrap();
    let endpoints = wait_text(&browser, "#service-endpoints", "test/catalog-ct").await;
    assert!(
        endpoints.contains("test/catalog-vm")
            && endpoints.contains("vm")
            && endpoints.contains("container"),
        "{endpoints}"
    );
    for w in ["test/catalog-vm", "test/catalog-ct"] {
        browser
            .find(&format!(r#"#service-rps polyline[data-series="{w}"]"#))
            .await
            .unwrap_or_else(|e| panic!("a line for {w}: {e:?}"));
    }
    let routes = wait_text(&browser, "#service-routes", "test/catalog").await;
    assert!(routes.contains("catalog-a 50 / catalog-b 50"), "{routes}");
    let facts = wait_text(&browser, "#service-facts", "requests").await;
    assert!(facts.contains("mutual TLS STRICT"), "{facts}");
    // Live tap from the page, on the service just opened: requests show as they happen.
    let start = browser.find("#tap-start").await.unwrap();
    browser.click(&start).await.unwrap();
    // The page says how many proxies the tap reaches (the caller and the two callees).
    wait_text(&browser, "#tap-status", "tapping through 3 proxies").await;
    let row = eventually(
        "a tapped request in the page",
        Duration::from_secs(20),
        async || {
            client::get_full(shop.outbound, "catalog.test", "/tapped", &[])
                .await
                .ok()?;
            let id = browser.find("#tap tbody").await.ok()?;
            let t = browser.text(&id).await.ok()?;
            t.contains("/tapped").then_some(t)
        },
    )
    .await;
    assert!(
        row.contains("test/shop")
            && row.contains("catalog.test/tapped 200 ok")
            && (row.contains("@ test/catalog-vm") || row.contains("@ test/catalog-ct")),
        "{row}"
    );
    keep_picture(&browser, Some("tap"), "pane-tap.png").await;
    let stop = browser.find("#tap-stop").await.unwrap();
    browser.click(&stop).await.unwrap();
    wait_text(&browser, "#tap-status", "stopped").await;
    keep_picture(&browser, Some("service-view"), "pane-service.png").await;
    // Each proxy: its config in step and its certificate (reported by the proxy).
    let row = wait_text(
        &browser,
        r#"#proxies tr[data-proxy="test/catalog-vm"]"#,
        "in sync",
    )
    .await;
    assert!(row.contains("expires in"), "{row}");
    // The figures are pushed by the server (every second here: `?every=1`), no reload.
    eventually(
        "the server pushes fresh figures",
        Duration::from_secs(10),
        async || {
            let n = browser
                .eval("return window.trellisPane.updates")
                .await
                .ok()?;
            (n.as_u64()? >= 3).then_some(())
        },
    )
    .await;
    // `TRELLIS_SCREENSHOTS=DIR` keeps a picture of the pane (docs/pane.png is one).
    keep_picture(&browser, None, "pane.png").await;
    // Nothing came from anywhere but the control plane.
    let fetched = browser
        .eval("return performance.getEntriesByType('resource').map(e => e.name)")
        .await
        .unwrap();
    for url in fetched.as_array().unwrap() {
        assert!(url.as_str().unwrap().starts_with(&origin), "{url}");
    }

    // Shift everything to catalog-b with the sliders: the page asks, the API applies.
    for (backend, weight) in [("catalog-b", 100), ("catalog-a", 0)] {
        browser
            .eval(&format!(
                r#"const i = document.querySelector('form.route input[name="{backend}"]'); i.value = {weight}; i.dispatchEvent(new Event('input', {{bubbles: true}}));"#
            ))
            .await
            .unwrap();
    }
    let shown = browser.find("form.route").await.unwrap();
    let shown = browser.text(&shown).await.unwrap();
    assert!(
        shown.contains("catalog-a 0") && shown.contains("catalog-b 100"),
        "{shown}"
    );
    let go = browser.find("form.route button").await.unwrap();
    browser.click(&go).await.unwrap();
    let asked = eventually("the confirmation", Duration::from_secs(5), async || {
        browser.accept_dialog().await.ok()
    })
    .await;
    assert_eq!(asked, "Apply test/catalog: catalog-a=0, catalog-b=100?");
    wait_text(&browser, "#shift-result", "applied").await;
    let (st, route) = cp
        .call(
            http::Method::GET,
            "/api/v1/resources/HTTPRoute/test/catalog",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200);
    let refs = &route["spec"]["rules"][0]["backendRefs"];
    assert_eq!(
        (refs[0]["weight"].as_u64(), refs[1]["weight"].as_u64()),
        (Some(0), Some(100)),
        "{route}"
    );
    eventually(
        "the caller follows the shift",
        Duration::from_secs(10),
        async || {
            for _ in 0..10 {
                let r = client::get_full(shop.outbound, "catalog.test", "/ok", &[])
                    .await
                    .ok()?;
                if r.body != "ct" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;

    // A read-only token: the page shows the fleet, and no way to change it.
    let ro = common::ok(cli(&cp, &["token", "read-only", "--name", "wall"]))
        .trim()
        .to_string();
    let out = browser.find("#signout").await.unwrap();
    browser.click(&out).await.unwrap();
    let field = eventually(
        "the sign-in form again",
        Duration::from_secs(10),
        async || browser.find("#signin:not([hidden]) #token").await.ok(),
    )
    .await;
    browser.type_into(&field, &ro).await.unwrap();
    let submit = browser.find("#signin-button").await.unwrap();
    browser.click(&submit).await.unwrap();
    wait_text(&browser, "#role", "read-only").await;
    wait_text(&browser, "#services", "test/catalog").await;
    assert_eq!(
        browser
            .eval("return document.getElementById('shift').hidden")
            .await
            .unwrap(),
        serde_json::Value::Bool(true)
    );

    // `TRELLIS_PANE_SCALE=1`: time the page drawing a fleet of 1,000 workloads and 5,000
    // edges, first and as an update (printed, for docs/benchmarks.md; not a threshold).
    if std::env::var_os("TRELLIS_PANE_SCALE").is_some() {
        let v = browser.eval(SCALE).await.unwrap();
        eprintln!("pane at scale: {v}");
        assert!(v["nodes"].as_u64() > Some(0), "{v}");
    }

    // A database's edge (TCP connections, no requests) is labelled by its connections and
    // coloured by their success (80 %: red), and so is its service's row; not drawn idle.
    let v = browser.eval(TCP_ONLY).await.unwrap();
    assert_eq!(v["label"], "5 conn · 80.00%", "{v}");
    assert_eq!(v["stroke"], "#cf222e", "{v}");
    assert_eq!(v["service"], "80.00% of 5 conn", "{v}");
    assert_eq!(v["rate"], "0.5 conn/s", "{v}");

    // With no verdict, the list says whether nothing failed or there was nothing to judge.
    let v = browser.eval(NOTHING_FOUND).await.unwrap();
    assert_eq!(
        v["none"], "No proxy reported in this window: nothing to judge.",
        "{v}"
    );
    assert_eq!(
        v["waiting"], "No report yet from the 3 proxies connected: nothing to judge (proxies report every 10 s by default).",
        "{v}"
    );
    assert_eq!(
        v["idle"], "No traffic in this window: 2 proxies reported, nothing to judge.",
        "{v}"
    );
    assert_eq!(
        v["busy"],
        "No problem found in this window, in 40 requests and 1 TCP connection that 2 proxies reported.",
        "{v}"
    );
    // One line, not numbered as the problems are.
    assert_eq!(v["marker"], "none", "{v}");
    keep_picture(&browser, Some("verdicts"), "pane-nothing-found.png").await;

    // Labels of edges that leave one workload towards neighbouring groups do not overlap
    // (the demo's two edges from its shopper ran into each other).
    let v = browser.eval(LABELS).await.unwrap();
    assert_eq!(v["labels"], v["edges"], "{v}");
    assert_eq!(v["boxes"], v["edges"], "{v}");
    assert_eq!(v["overlaps"], serde_json::json!([]), "{v}");
    assert_eq!(v["inside"], true, "{v}");
    assert_eq!(v["within"], true, "{v}");
    assert_eq!(
        v["shown"], "t/shopper (bare-metal) → t/catalog-vm (vm)",
        "{v}"
    );
    assert_eq!(
        v["marked"],
        serde_json::json!(["edge-t/shopper--t/catalog-vm"]),
        "{v}"
    );
    assert_eq!(v["after"], 0, "{v}");
    keep_picture(&browser, Some("topology"), "labels.png").await;

    // The session over raw HTTP: its cookie's flags, and the Host check.
    let host = cp.api.to_string();
    let (head, _) = raw(
        cp.api,
        format!(
            "POST /ui/session HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\ntoken={}",
            6 + cp.token.len(),
            cp.token
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("{head}"))
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap();
    let get = |h: &str| {
        format!("GET /api/v1/stat HTTP/1.1\r\nhost: {h}\r\ncookie: {session}\r\nconnection: close\r\n\r\n")
    };
    assert!(raw(cp.api, get(&host)).await.0.starts_with("HTTP/1.1 200"));
    // The same session from a page of another name that resolves here: refused.
    let rebound = format!("evil.example:{}", cp.api.port());
    assert!(raw(cp.api, get(&rebound))
        .await
        .0
        .starts_with("HTTP/1.1 401"));
    let (head, _) = raw(
        cp.api,
        format!("GET /ui/ HTTP/1.1\r\nhost: {rebound}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 421"), "{head}");
    // `trellis dashboard` prints a sign-in link: it opens a session once.
    let link = common::ok(cli(&cp, &["dashboard", "--no-open"]))
        .trim()
        .to_string();
    let path = link
        .strip_prefix(&format!("http://{host}"))
        .unwrap_or_else(|| panic!("a link to this control plane: {link}"));
    assert!(path.starts_with("/ui/enter?code="), "{link}");
    let enter = |h: &str| format!("GET {path} HTTP/1.1\r\nhost: {h}\r\nconnection: close\r\n\r\n");
    // Not from a page of another name (and the link stays good).
    assert!(raw(cp.api, enter(&rebound))
        .await
        .0
        .starts_with("HTTP/1.1 421"));
    let (head, _) = raw(cp.api, enter(&host)).await;
    assert!(head.starts_with("HTTP/1.1 303"), "{head}");
    assert!(head.lines().any(|l| l == "location: /ui/"), "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("{head}"));
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let linked = cookie.split(';').next().unwrap();
    let (head, _) = raw(
        cp.api,
        format!("GET /api/v1/stat HTTP/1.1\r\nhost: {host}\r\ncookie: {linked}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = raw(cp.api, enter(&host)).await;
    assert!(
        head.starts_with("HTTP/1.1 401"),
        "a link works once: {head}"
    );
    // The read-only token over raw HTTP: it reads, and changes nothing, nor reads tokens.
    let bearer = |method: &str, path: &str, t: &str| {
        format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {t}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    };
    assert!(raw(cp.api, bearer("GET", "/api/v1/stat", &ro))
        .await
        .0
        .starts_with("HTTP/1.1 200"));
    assert!(
        raw(cp.api, bearer("GET", "/api/v1/resources/HTTPRoute", &ro))
            .await
            .0
            .starts_with("HTTP/1.1 200")
    );
    for (method, path) in [
        ("POST", "/api/v1/apply"),
        ("DELETE", "/api/v1/resources/HTTPRoute/test/catalog"),
        ("GET", "/api/v1/tokens"),
        ("GET", "/api/v1/viewer-tokens"),
        ("POST", "/api/v1/ui/links"),
    ] {
        let (head, body) = raw(cp.api, bearer(method, path, &ro)).await;
        assert!(
            head.starts_with("HTTP/1.1 403"),
            "{method} {path}: {head} {body}"
        );
    }
    // Its session may only read as well.
    let (head, _) = raw(
        cp.api,
        format!(
            "POST /ui/session HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\ntoken={ro}",
            6 + ro.len()
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    let ro_session = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let with_cookie = |method: &str, path: &str| {
        format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\ncookie: {ro_session}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    };
    let (head, body) = raw(cp.api, with_cookie("GET", "/ui/session")).await;
    assert!(
        head.starts_with("HTTP/1.1 200") && body.contains("\"readOnly\":true"),
        "{head} {body}"
    );
    assert!(raw(cp.api, with_cookie("POST", "/api/v1/apply"))
        .await
        .0
        .starts_with("HTTP/1.1 403"));
    // Revoked, it opens nothing.
    let id = common::ok(cli(&cp, &["token", "read-only-list"]));
    let id = id
        .lines()
        .find(|l| l.contains("wall"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    common::ok(cli(&cp, &["token", "read-only-revoke", &id]));
    assert!(raw(cp.api, bearer("GET", "/api/v1/stat", &ro))
        .await
        .0
        .starts_with("HTTP/1.1 401"));
    // ... and the session it opened ends with it.
    assert!(raw(cp.api, with_cookie("GET", "/api/v1/stat"))
        .await
        .0
        .starts_with("HTTP/1.1 401"));
    // A wrong token gets no session.
    let (head, _) = raw(
        cp.api,
        format!("POST /ui/session HTTP/1.1\r\nhost: {host}\r\ncontent-length: 11\r\nconnection: close\r\n\r\ntoken=nope!"),
    )
    .await;
    assert!(
        head.starts_with("HTTP/1.1 401") && !head.contains("set-cookie"),
        "{head}"
    );
}
