//! Real clients through the real proxy: HTTP/1.1, h2c, proxy-form, gRPC, WebSocket, TCP,
//! CONNECT over HTTP/1.1 and HTTP/2.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn http1_h2c_and_proxy_form_reach_the_service() {
    let a = upstream::named("a").await;
    let p = start(&docs(&[
        service("alpha", "HTTP", &[a]),
        client_workload(&["alpha"]),
    ]));
    // HTTP/1.1 with Host.
    let r = client::get_full(p.outbound, "alpha.test", "/x", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "a");
    // Trace context created and request id set.
    let tp = r.headers["x-seen-traceparent"].to_str().unwrap();
    assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
    assert!(r.headers.contains_key("x-seen-x-request-id"));
    // HTTP/2 prior knowledge on the same listener.
    let mut h2 = client::Conn::h2(p.outbound).await;
    for _ in 0..3 {
        let r = h2.get("alpha.test:80", "/h2").await.unwrap();
        assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"a"[..]));
        // The upstream's own fields (an HTTP/1.1 head the proxy keeps as received lines)
        // reach an HTTP/2 client too, ahead of the proxy's Proxy-Status entry.
        assert!(
            r.headers.contains_key("x-seen-x-request-id"),
            "{:?}",
            r.headers
        );
        let ps: Vec<_> = r.headers.get_all("proxy-status").iter().collect();
        assert_eq!(ps, ["trellis; received-status=200"], "{:?}", r.headers);
    }
    // Proxy form (HTTP_PROXY) with an absolute URI, raw on the wire.
    let mut s = tokio::net::TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(
        b"GET http://alpha.test/pf HTTP/1.1\r\nHost: alpha.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("a"),
        "{out}"
    );
    // Explicit-mode bind.
    let (st, body) = client::get(p.upstream("alpha.test:80"), "whatever", "/", &[])
        .await
        .unwrap();
    assert_eq!((st.as_u16(), &body[..]), (200, &b"a"[..]));
    let log = p
        .wait_log("h2 log line", |l| {
            l["protocol"] == "HTTP/2" && l["path"] == "/h2"
        })
        .await;
    assert_eq!(log["dst_service"], "alpha.test");
    assert_eq!(log["dst_workload"], "alpha-0");
    assert_eq!(log["dst_environment"], "vm");
    assert_eq!(log["failure_class"], "ok");
    assert_eq!(log["trace_id"].as_str().unwrap().len(), 32);
    assert!(log["first_byte_ms"].as_f64().is_some() && log["total_ms"].as_f64().is_some());
}

/// A route's response header edits apply to what an HTTP/1.1 upstream sent: a field removed
/// is gone, a field set has the one value, a field added comes after the upstream's own.
#[tokio::test]
async fn a_routes_response_header_edits_apply_to_the_upstreams_fields() {
    let a = upstream::named("a").await;
    let rule = "    - backendRefs: [{ name: alpha, port: 80 }]\n      filters:\n        - type: ResponseHeaderModifier\n          responseHeaderModifier:\n            set: [{ name: x-upstream-secret, value: replaced }]\n            add: [{ name: x-seen-traceparent, value: added }]\n            remove: [x-seen-x-request-id]\n";
    let p = start(&docs(&[
        service("alpha", "HTTP", &[a]),
        route("alpha", "alpha", rule),
        client_workload(&["alpha"]),
    ]));
    let r = client::get_full(p.outbound, "alpha.test", "/x", &[])
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"a"[..]));
    let all = |n: &str| -> Vec<_> { r.headers.get_all(n).iter().cloned().collect() };
    assert!(all("x-seen-x-request-id").is_empty(), "{:?}", r.headers);
    assert_eq!(all("x-upstream-secret"), ["replaced"], "{:?}", r.headers);
    let tp = all("x-seen-traceparent");
    assert_eq!(tp.len(), 2, "{:?}", r.headers);
    assert!(tp[0].len() == 55 && tp[1] == "added", "{:?}", r.headers);
}

#[tokio::test]
async fn traceparent_is_continued() {
    let a = upstream::named("a").await;
    let p = start(&docs(&[
        service("alpha", "HTTP", &[a]),
        client_workload(&[]),
    ]));
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = client::get_full(
        p.outbound,
        "alpha.test",
        "/",
        &[("traceparent", tp), ("x-request-id", "req-1")],
    )
    .await
    .unwrap();
    let seen = r.headers["x-seen-traceparent"].to_str().unwrap();
    assert!(
        seen.starts_with("00-0af7651916cd43dd8448eb211c80319c-")
            && !seen.contains("b7ad6b7169203331"),
        "{seen}"
    );
    assert_eq!(r.headers["x-seen-x-request-id"], "req-1");
    p.wait_log("trace id logged", |l| {
        l["trace_id"] == "0af7651916cd43dd8448eb211c80319c" && l["request_id"] == "req-1"
    })
    .await;
}

#[tokio::test]
async fn grpc_unary_streaming_and_errors_pass_through() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let (reporter, g) = health_server(tonic_health::ServingStatus::Serving).await;
    let p = start(&docs(&[
        service("grpc", "GRPC", &[g]),
        client_workload(&[]),
    ]));
    let mut c = HealthClient::new(grpc_channel(&p).await);
    // Unary.
    let r = c
        .check(HealthCheckRequest {
            service: "shop.Catalog".into(),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().status, ServingStatus::Serving as i32);
    // An application error status passes through intact (trailers-only from the server).
    let e = c
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Server streaming: the first update, then a change pushed by the server.
    let mut stream = c
        .watch(HealthCheckRequest {
            service: "shop.Catalog".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    reporter
        .set_service_status("shop.Catalog", tonic_health::ServingStatus::NotServing)
        .await;
    assert_eq!(
        stream.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let log = p
        .wait_log("grpc NOT_FOUND logged", |l| l["grpc_status"] == 5)
        .await;
    assert_eq!(log["failure_class"], "client_error");
    assert_eq!(log["protocol"], "HTTP/2");
}

/// A tonic health server on an ephemeral port where `shop.Catalog` has `status`, and the
/// reporter that changes it.
async fn health_server(
    status: tonic_health::ServingStatus,
) -> (tonic_health::server::HealthReporter, std::net::SocketAddr) {
    let (reporter, svc) = tonic_health::server::health_reporter();
    reporter.set_service_status("shop.Catalog", status).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream_from(l)),
    );
    (reporter, addr)
}

/// A gRPC channel to `grpc.test` through the proxy's outbound listener.
async fn grpc_channel(p: &ProxyProcess) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", p.outbound))
        .unwrap()
        .origin("http://grpc.test".parse().unwrap())
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn grpc_route_sends_one_method_elsewhere() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let (_ra, a) = health_server(tonic_health::ServingStatus::Serving).await;
    let (_rb, b) = health_server(tonic_health::ServingStatus::NotServing).await;
    let grpc_route = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: { name: check-to-b, namespace: test }\nspec:\n  parentRefs: [{ name: grpc, port: 80 }]\n  rules:\n    - matches: [{ method: { service: grpc.health.v1.Health, method: Check } }]\n      backendRefs: [{ name: grpc-b, port: 80 }]\n".to_string();
    let p = start(&docs(&[
        service("grpc", "GRPC", &[a]),
        service("grpc-b", "GRPC", &[b]),
        grpc_route,
        client_workload(&[]),
    ]));
    let mut c = HealthClient::new(grpc_channel(&p).await);
    let req = || HealthCheckRequest {
        service: "shop.Catalog".into(),
    };
    // Check matches the route: served by b.
    let r = c.check(req()).await.unwrap().into_inner();
    assert_eq!(r.status, ServingStatus::NotServing as i32);
    // Watch does not: the default route, served by a.
    let mut stream = c.watch(req()).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let log = p
        .wait_log("routed check", |l| {
            l["path"] == "/grpc.health.v1.Health/Check"
        })
        .await;
    assert_eq!(log["dst_workload"], "grpc-b-0");
}

fn tokio_stream_from(
    l: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() {
                        ws.send(m).await.unwrap();
                    }
                }
            });
        }
    });
    let p = start(&docs(&[
        service("chat", "HTTP", &[ws]),
        client_workload(&[]),
    ]));
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/socket", p.outbound)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", "chat.test".parse().unwrap());
    let (mut c, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        c.send(format!("hello {i}").into()).await.unwrap();
        let m = c.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("hello {i}"));
    }
}

#[tokio::test]
async fn tcp_bind_and_connect_tunnel() {
    let e = upstream::tcp_echo().await;
    let p = start(&docs(&[
        service("echo", "TCP", &[e]),
        client_workload(&["echo"]),
    ]));
    let mut s = tokio::net::TcpStream::connect(p.upstream("echo.test:80"))
        .await
        .unwrap();
    s.write_all(b"ping over tcp").await.unwrap();
    let mut buf = [0u8; 13];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping over tcp");
    drop(s);
    // CONNECT through the outbound listener.
    let mut s = tokio::net::TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"CONNECT echo.test:80 HTTP/1.1\r\nHost: echo.test:80\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 256];
    let n = s.read(&mut head).await.unwrap();
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    s.write_all(b"tunnelled").await.unwrap();
    let mut buf = [0u8; 9];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"tunnelled");
    drop(s);
    let log = p
        .wait_log("tcp line", |l| l["kind"] == "tcp" && l["bytes_sent"] == 13)
        .await;
    assert_eq!(log["failure_class"], "ok");
    eventually(
        "tcp metrics",
        std::time::Duration::from_secs(5),
        async || {
            let m = p.metrics().await;
            (trellis_test_support::sum_metric(
                &m,
                "trellis_tcp_connections_total",
                &[("dst_service", "echo.test"), ("failure_class", "ok")],
            ) >= 2.0
                && trellis_test_support::sum_metric(
                    &m,
                    "trellis_tcp_sent_bytes_total",
                    &[("dst_service", "echo.test")],
                ) >= 22.0)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn inbound_forwards_to_the_local_workload() {
    let app = upstream::named("local-app").await;
    let cfg = docs(&[service("alpha", "HTTP", &[app]), client_workload(&[])]);
    let p = ProxyProcess::start(BIN, &cfg, &["--workload", "test/alpha-0"]);
    let (st, body) = client::get(p.inbound, "alpha.test", "/in", &[])
        .await
        .unwrap();
    assert_eq!((st.as_u16(), &body[..]), (200, &b"local-app"[..]));
    let log = p
        .wait_log("inbound line", |l| l["direction"] == "inbound")
        .await;
    assert_eq!(log["dst_service"], "alpha.test");
    assert_eq!(log["route"], "inbound");
}

#[tokio::test]
async fn inbound_connect_reaches_a_tcp_port_of_the_local_workload() {
    let e = upstream::tcp_echo().await;
    let cfg = docs(&[service("echo", "TCP", &[e]), client_workload(&[])]);
    let p = ProxyProcess::start(BIN, &cfg, &["--workload", "test/echo-0"]);
    let mut s = tokio::net::TcpStream::connect(p.inbound).await.unwrap();
    s.write_all(b"CONNECT echo.test:80 HTTP/1.1\r\nHost: echo.test:80\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 256];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"opaque bytes in").await.unwrap();
    let mut buf = [0u8; 15];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"opaque bytes in");
    drop(s);
    let log = p
        .wait_log("inbound tcp line", |l| {
            l["kind"] == "tcp" && l["direction"] == "inbound"
        })
        .await;
    assert_eq!(log["dst_service"], "echo.test");
    assert_eq!(log["bytes_sent"], 15);
    // A port the workload does not have is refused, naming the ports it has.
    let mut s = tokio::net::TcpStream::connect(p.inbound).await.unwrap();
    s.write_all(b"CONNECT echo.test:81 HTTP/1.1\r\nHost: echo.test:81\r\n\r\n")
        .await
        .unwrap();
    let mut out = vec![0u8; 1024];
    let n = s.read(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out[..n]).into_owned();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains("x-trellis-failure: no_route"), "{out}");
}

#[tokio::test]
async fn connect_over_h2_is_tunnelled() {
    use hyper_util::rt::TokioIo;
    let e = upstream::tcp_echo().await;
    let p = start(&docs(&[
        service("echo", "TCP", &[e]),
        client_workload(&["echo"]),
    ]));
    let mut send = h2_over(tokio::net::TcpStream::connect(p.outbound).await.unwrap()).await;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("echo.test:80")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut tunnel = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    tunnel.write_all(b"over h2").await.unwrap();
    let mut buf = [0u8; 7];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"over h2");
}

#[tokio::test]
async fn inbound_enforces_authorization_policies() {
    let app = upstream::named("local-app").await;
    let policy = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: no-admin, namespace: test }\nspec:\n  targetRefs: [{ name: alpha }]\n  action: DENY\n  rules:\n    - to: [{ paths: [{ prefix: /admin }] }]\n".to_string();
    let cfg = docs(&[
        service("alpha", "HTTP", &[app]),
        client_workload(&[]),
        policy,
    ]);
    let p = ProxyProcess::start(BIN, &cfg, &["--workload", "test/alpha-0"]);

    // Allowed: any path but /admin.
    let (st, body) = client::get(p.inbound, "alpha.test", "/in", &[])
        .await
        .unwrap();
    assert_eq!((st.as_u16(), &body[..]), (200, &b"local-app"[..]));
    // Denied: 403, class `denied`, naming the policy; the application never sees it.
    let req = |path: &str, grpc: bool| {
        let mut b = http::Request::post(path).header("host", "alpha.test");
        if grpc {
            b = b.header("content-type", "application/grpc");
        }
        b.body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let r = client::send1(p.inbound, req("/admin/users", false))
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.headers["x-trellis-failure"], "denied");
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(text.contains("test/no-admin"), "{text}");
    // gRPC callers get PERMISSION_DENIED.
    let r = client::send1(p.inbound, req("/admin/Drop", true))
        .await
        .unwrap();
    assert_eq!(r.headers["grpc-status"], "7", "{:?}", r.headers);
    // A TCP tunnel cannot be checked against paths: a DENY rule with paths refuses it
    // (fail closed), and the connection is closed.
    let mut s = tokio::net::TcpStream::connect(p.inbound).await.unwrap();
    s.write_all(b"CONNECT alpha.test:80 HTTP/1.1\r\nHost: alpha.test:80\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes a refused tunnel")
        .unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(
        out.starts_with("HTTP/1.1 403") && out.contains("x-trellis-failure: denied"),
        "{out}"
    );
    let denied = eventually(
        "denials counted",
        std::time::Duration::from_secs(10),
        async || {
            let n = p
                .metric(
                    "trellis_http_requests_total",
                    &[("direction", "inbound"), ("failure_class", "denied")],
                )
                .await;
            (n >= 3.0).then_some(n)
        },
    )
    .await;
    assert_eq!(denied, 3.0);
}
