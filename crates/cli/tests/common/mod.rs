//! Shared helpers of the proxy's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

#[allow(unused_imports)]
pub use trellis_test_support::{client, eventually, upstream, ProxyProcess};

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis");

/// An HTTP/2 client over `io`, its connection driven in a task of its own.
pub async fn h2_over<T, B>(io: T) -> hyper::client::conn::http2::SendRequest<B>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

pub mod fleet;
#[allow(unused_imports)]
pub use fleet::*;

/// A Service `name` in namespace `test` on port 80 with one Workload per endpoint (environment
/// taken round-robin from vm, container, bare-metal).
pub fn service(name: &str, protocol: &str, endpoints: &[SocketAddr]) -> String {
    let envs = ["vm", "container", "bare-metal"];
    let mut y = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: {name} }}\n  ports: [{{ name: main, port: 80, targetPort: 1, protocol: {protocol} }}]\n"
    );
    for (i, ep) in endpoints.iter().enumerate() {
        y.push_str(&format!(
            "---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}-{i}, namespace: test, labels: {{ app: {name} }} }}\nspec:\n  address: {}\n  ports: {{ main: {} }}\n  environment: {}\n",
            ep.ip(),
            ep.port(),
            envs[i % 3]
        ));
    }
    y
}

/// A client workload with explicit-mode binds to `upstreams` (service names, port 80).
pub fn client_workload(upstreams: &[&str]) -> String {
    let mut y = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test, labels: { app: client } }\nspec:\n  address: 127.0.0.1\n  upstreams:\n".to_string();
    if upstreams.is_empty() {
        y = y.replace("  upstreams:\n", "");
    }
    for u in upstreams {
        y.push_str(&format!(
            "    - {{ service: {u}.test, port: 80, bind: 127.0.0.1:0 }}\n"
        ));
    }
    y
}

/// Join documents.
pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// A route on `parent` with one rule given as YAML (indented as a list item under rules).
pub fn route(name: &str, parent: &str, rule: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  parentRefs: [{{ name: {parent}, port: 80 }}]\n  rules:\n{rule}"
    )
}

/// A backend policy on `target` with the given spec lines (indented two spaces).
pub fn policy(target: &str, spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{ name: {target}, namespace: test }}\nspec:\n  targetRefs: [{{ name: {target} }}]\n{spec}"
    )
}

pub fn start(config: &str) -> ProxyProcess {
    ProxyProcess::start(BIN, config, &["--workload", "test/client"])
}

/// Read one HTTP/1.1 head (request or response) from `s`; bytes after it stay in `buf`.
/// `None` at EOF.
pub async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).into_owned();
            buf.drain(..i + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// CONNECT `authority` through the proxy at `proxy`, send `msg`, and read it echoed back.
pub async fn echo_through(
    proxy: std::net::SocketAddr,
    authority: &str,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| e.to_string())?;
    let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf)
        .await
        .ok_or("no response head")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head);
    }
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    while buf.len() < msg.len() {
        let mut chunk = [0u8; 1024];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(buf)
}

/// Run the CLI against the control plane `cp` (its URL and admin token); the output.
pub fn cli(
    cp: &trellis_test_support::control::ControlProcess,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .args(["--server", &cp.api_url(), "--token", &cp.token])
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .expect("run trellis")
}

/// Stdout of a command that must have succeeded.
pub fn ok(out: std::process::Output) -> String {
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "command failed:\n{so}\n{se}");
    so
}

/// A join token for NS/ID from the real CLI.
pub fn token(
    cp: &trellis_test_support::control::ControlProcess,
    ns: &str,
    id: &str,
    ttl: &str,
    uses: &str,
) -> String {
    let args = [
        "token",
        "create",
        "-n",
        ns,
        "--identity",
        id,
        "--ttl",
        ttl,
        "--uses",
        uses,
    ];
    ok(cli(cp, &args)).trim().to_string()
}

/// GET `/` from `host` through the proxy's outbound listener: status, failure class, body.
pub async fn via(p: &ProxyProcess, host: &str) -> (u16, String, String) {
    let r = client::get_full(p.outbound, host, "/", &[]).await.unwrap();
    let class = r
        .headers
        .get("x-trellis-failure")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        r.status.as_u16(),
        class,
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

/// Apply YAML through the API; it must succeed.
pub async fn apply_ok(cp: &trellis_test_support::control::ControlProcess, yaml: String) {
    let (st, v) = cp
        .call(http::Method::POST, "/api/v1/apply", &yaml, None)
        .await;
    assert_eq!(st, 200, "{v}");
}

/// A proxy for `workload`, joined to `cp` through `xds` with a single-use token for identity
/// `id` of namespace `test` (its key and certificate in a fresh state dir), with `extra`
/// flags.
pub fn join_xds(
    cp: &trellis_test_support::control::ControlProcess,
    xds: &str,
    id: &str,
    workload: &str,
    extra: &[&str],
) -> ProxyProcess {
    let t = token(cp, "test", id, "10m", "1");
    let state = trellis_test_support::Temp::path(&format!("{id}-state"));
    let mut args = vec!["--state-dir", state.to_str().unwrap(), "--join-token", &t];
    args.extend_from_slice(extra);
    ProxyProcess::start_xds(BIN, &[xds.to_string()], workload, &args).owning(state)
}

/// A callee (`test/peer`, identity `beta`) and a caller (`test/client`, identity `client`)
/// fed by `cp`, each joined with a token; `mesh(inbound)` is the mesh with the callee's
/// inbound port (applied first with a placeholder, as the port is known once it runs).
/// Each one's state dir is removed when its handle drops.
pub async fn mtls_pair(
    cp: &trellis_test_support::control::ControlProcess,
    mesh: impl Fn(u16) -> String,
) -> (ProxyProcess, ProxyProcess) {
    use trellis_test_support::Temp;
    apply_ok(cp, mesh(1)).await;
    let (callee_state, caller_state) = (Temp::path("callee-state"), Temp::path("caller-state"));
    let join = |who: &str, state: &Temp, workload: &str| {
        let t = token(cp, "test", who, "10m", "1");
        ProxyProcess::start_xds(
            BIN,
            &[cp.xds_url()],
            workload,
            &["--state-dir", state.to_str().unwrap(), "--join-token", &t],
        )
    };
    let callee = join("beta", &callee_state, "test/peer");
    callee.wait_ready().await;
    apply_ok(cp, mesh(callee.inbound.port())).await;
    let caller = join("client", &caller_state, "test/client");
    caller.wait_ready().await;
    (callee.owning(callee_state), caller.owning(caller_state))
}

/// The first verdict `trellis diagnose` gives over `window` (`5m`, …) in namespace `test`
/// that `pred` accepts, asked until one does (or `within` passes: the test fails).
pub async fn verdict(
    cp: &trellis_test_support::control::ControlProcess,
    window: &str,
    within: std::time::Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let path = format!("/api/v1/diagnose?namespace=test&window={window}");
    eventually(&format!("a verdict in {path}"), within, async || {
        let (st, v) = cp.call(http::Method::GET, &path, "", None).await;
        assert_eq!(st, 200, "{v}");
        v["verdicts"].as_array()?.iter().find(|x| pred(x)).cloned()
    })
    .await
}

/// As [`join_xds`] on `cp`'s own xDS address, reporting every 200 ms (a test's window fills
/// within a second).
pub fn join_reporting(
    cp: &trellis_test_support::control::ControlProcess,
    id: &str,
    workload: &str,
) -> ProxyProcess {
    join_xds(
        cp,
        &cp.xds_url(),
        id,
        workload,
        &["--report-interval", "200ms"],
    )
}

/// Wait (10 s at most) until a request to `host` through `via` is answered 200.
pub async fn until_answered(via: SocketAddr, host: &str) {
    eventually(
        &format!("{host} answers through {via}"),
        std::time::Duration::from_secs(10),
        async || {
            let r = client::get_full(via, host, "/", &[]).await.ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;
}

/// Wait until a CONNECT tunnel to `authority` through the proxy at `via` echoes bytes back.
pub async fn until_echoed(via: SocketAddr, authority: &str) {
    eventually(
        &format!("an echo from {authority} through {via}"),
        std::time::Duration::from_secs(15),
        async || {
            let e = echo_through(via, authority, b"ping").await.ok()?;
            (e == b"ping").then_some(())
        },
    )
    .await;
}

/// Wait until the page's `css` shows `want` (in a real browser); its text.
#[allow(dead_code)]
pub async fn wait_text(
    b: &trellis_test_support::browser::Browser,
    css: &str,
    want: &str,
) -> String {
    eventually(
        &format!("{css} shows {want:?}"),
        std::time::Duration::from_secs(20),
        async || {
            let id = b.find(css).await.ok()?;
            let t = b.text(&id).await.ok()?;
            t.contains(want).then_some(t)
        },
    )
    .await
}

/// The single pane of `cp` in a real browser, signed in through a one-time link; None (said
/// so) where chromium is not installed.
pub async fn open_pane(
    cp: &trellis_test_support::control::ControlProcess,
) -> Option<trellis_test_support::browser::Browser> {
    let browser = trellis_test_support::browser::Browser::start().await?;
    let (st, link) = cp
        .call(http::Method::POST, "/api/v1/ui/links", "", None)
        .await;
    assert_eq!(st, 200, "{link}");
    let url = format!("http://{}{}", cp.api, link["path"].as_str().unwrap());
    browser.goto(&url).await.unwrap();
    Some(browser)
}

/// The real `openssl` command run in `dir` (it must succeed): its stdout and stderr.
pub fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (installed by .ci/setup)");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "openssl {args:?} failed:\n{so}\n{se}");
    so + &se
}

/// openssl's arguments for a new P-256 key, unencrypted.
pub const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];
