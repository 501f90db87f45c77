//! Every request and every connection ends in exactly one record, including the endings that
//! used to leave none, and an outcome already known survives the client leaving.

mod common;

use std::time::Duration;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A proxy for the client workload, with a service `ok` whose application answers "ok", a
/// 300-ms header-read timeout, and `flags` besides.
async fn ok_proxy(flags: &[&str]) -> ProxyProcess {
    let ok = upstream::named("ok").await;
    let cfg = docs(&[service("ok", "HTTP", &[ok]), client_workload(&[])]);
    let mut args = vec![
        "--workload",
        "test/client",
        "--header-read-timeout",
        "300ms",
    ];
    args.extend_from_slice(flags);
    ProxyProcess::start(BIN, &cfg, &args)
}

/// The access-log line of a head that did not end within `ok_proxy`'s header-read timeout.
async fn head_timeout_line(p: &ProxyProcess) -> serde_json::Value {
    let line = p.wait_log("head timeout", |l| l["status"] == 408).await;
    assert!(
        line["detail"]
            .as_str()
            .unwrap()
            .contains("did not end within 300ms"),
        "{line}"
    );
    line
}

#[tokio::test]
async fn requests_refused_before_routing_are_recorded() {
    let p = ok_proxy(&[]).await;
    // A malformed head: 400, and a line that says so.
    let out = send_raw(p.outbound, b"GET / HTTP/1.1\r\nbad header line\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("x-trellis-failure: client_error"),
        "{out}"
    );
    let line = p.wait_log("malformed", |l| l["status"] == 400).await;
    assert_eq!(line["failure_class"], "client_error", "{line}");
    assert_eq!(line["failure_side"], "downstream", "{line}");
    assert_eq!(line["direction"], "outbound", "{line}");
    // A head begun and not finished within the header-read timeout: 408, recorded.
    let out = send_raw(p.outbound, b"GET / HTTP/1.1\r\nhost: ok.te").await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    let line = head_timeout_line(&p).await;
    assert_eq!(line["failure_class"], "client_error", "{line}");
    // An idle connection that closes at the same timeout is no request: no line for it.
    let _quiet = TcpStream::connect(p.outbound).await.unwrap();
    let n = |c: &'static str, s: &'static str| {
        let p = &p;
        async move {
            p.metric(
                "trellis_http_requests_total",
                &[("failure_class", c), ("status_code", s)],
            )
            .await
        }
    };
    assert_eq!(n("client_error", "400").await, 1.0);
    assert_eq!(n("client_error", "408").await, 1.0);
    assert_eq!(p.logs().len(), 2, "{:?}", p.logs());
}

/// A kept-alive connection waits for its next request under the idle timeout; once that
/// request's head begins, the head has the header-read timeout, counted from then (the
/// server sets a deadline only when it has to wait, and the switch is what this checks: a
/// second head that never ends would otherwise be kept for the 120-s idle timeout).
#[tokio::test]
async fn the_next_head_on_a_kept_alive_connection_has_the_header_read_timeout() {
    let p = ok_proxy(&["--idle-timeout", "120s"]).await;
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nhost: ok.test\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&out).ends_with("\r\n\r\nok") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("the first answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed before the first answer");
        out.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    let line = p.wait_log("first", |l| l["status"] == 200).await;
    assert_eq!(line["path"], "/first", "{line}");
    s.write_all(b"GET /second HTTP/1.1\r\nhost: ok.te")
        .await
        .unwrap();
    // The second head never ends: 408 at the header-read timeout, long before 120 s.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest}");
    head_timeout_line(&p).await;
}

/// An application that answers `500` with a body it never finishes.
async fn failing_slowly() -> std::net::SocketAddr {
    upstream::tcp(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 100\r\n\r\npartial")
            .await;
        std::future::pending::<()>().await;
    })
    .await
}

#[tokio::test]
async fn an_application_error_stays_one_when_the_client_leaves() {
    let app = failing_slowly().await;
    let cfg = docs(&[service("bad", "HTTP", &[app]), client_workload(&[])]);
    let p = start(&cfg);
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"GET /gone HTTP/1.1\r\nhost: bad.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 500"), "{head}");
    drop(s);
    let line = p
        .wait_log("the line of the request", |l| l["path"] == "/gone")
        .await;
    assert_eq!(line["failure_class"], "app_error", "{line}");
    assert_eq!(line["failure_category"], "application", "{line}");
    assert_eq!(line["client_disconnected"], true, "{line}");
    assert_eq!(line["status"], 500, "{line}");
    let n = p
        .metric(
            "trellis_http_requests_total",
            &[("failure_class", "client_disconnect")],
        )
        .await;
    assert_eq!(n, 0.0, "the application's failure is not the client's");
}

/// An application that sends its head at once and then stalls in the body.
async fn stalling_body() -> std::net::SocketAddr {
    upstream::tcp(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nthe beginning")
            .await;
        std::future::pending::<()>().await;
    })
    .await
}

#[tokio::test]
async fn the_request_timeout_covers_the_response_body() {
    let app = stalling_body().await;
    let cfg = docs(&[
        service("stall", "HTTP", &[app]),
        route("stall", "stall", "    - timeouts: { request: 400ms }\n"),
        client_workload(&[]),
    ]);
    let p = start(&cfg);
    let started = std::time::Instant::now();
    // The client sees the head, then the body cut short.
    let r = client::get_full(p.outbound, "stall.test", "/stall", &[]).await;
    assert!(r.is_err(), "a truncated body fails at the client");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut at the route's timeout"
    );
    let line = p.wait_log("stalled", |l| l["path"] == "/stall").await;
    assert_eq!(line["failure_class"], "upstream_timeout", "{line}");
    assert_eq!(line["status"], 200, "the head had gone out: {line}");
    let total = line["total_ms"].as_f64().unwrap();
    assert!((350.0..3000.0).contains(&total), "{total} ms");
    assert!(line["detail"].as_str().unwrap().contains("400ms"), "{line}");
}

#[tokio::test]
async fn a_route_without_a_timeout_gets_the_idle_default() {
    let ok = upstream::named("ok").await;
    let cfg = docs(&[service("ok", "HTTP", &[ok]), client_workload(&[])]);
    let p = start(&cfg);
    let (_, dump) = client::get(p.admin, "admin", "/config_dump", &[])
        .await
        .unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&dump).unwrap();
    let route = &dump["config"]["services"]["test/ok"]["ports"][0]["routes"][0];
    assert_eq!(route["name"], "default");
    assert_eq!(route["timeout"], serde_json::Value::Null);
    assert_eq!(route["idle_timeout"]["secs"], 15, "{route}");
}
