//! Two proxies, mutual TLS between them: what each side records. A peer proxy's own answer
//! keeps its class at the caller; an application's status is the application's; the callee
//! names its caller; both sides name the addresses of both hops; endings before any request
//! (plaintext under STRICT, a failed handshake) are recorded.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use trellis_test_support::control::ControlProcess;

/// The callee's Workload `peer` (identity beta, in zone eu/eu-1) serves `ok` (200), `down`
/// (nothing listens), `spoof` (an application 503 that claims to be the mesh's `denied`) and
/// `walled` (an AuthorizationPolicy denies the caller) and `slow` (an application slower
/// than its route's 300 ms timeout). The caller `client` is selected by Service `client`.
fn mesh(
    ok: SocketAddr,
    down: SocketAddr,
    spoof: SocketAddr,
    slow: SocketAddr,
    inbound: u16,
) -> String {
    let svc = |name: &str, sel: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: {sel} }}\n  ports: [{{ name: {name}, port: 80, targetPort: 1, protocol: HTTP }}]\n")
    };
    [
        svc("ok", "peer"),
        svc("down", "peer"),
        svc("spoof", "peer"),
        svc("walled", "peer"),
        svc("slow", "peer"),
        svc("client", "client"),
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: peer, namespace: test, labels: {{ app: peer }} }}\nspec:\n  address: 127.0.0.1\n  identity: beta\n  inboundPort: {inbound}\n  environment: container\n  locality: {{ region: eu, zone: eu-1 }}\n  ports: {{ ok: {}, down: {}, spoof: {}, walled: {}, slow: {} }}\n",
            ok.port(),
            down.port(),
            spoof.port(),
            ok.port(),
            slow.port()
        ),
        route("slow", "slow", "    - timeouts: { request: 300ms }\n"),
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test, labels: { app: client } }\nspec: { address: 127.0.0.1, identity: client, environment: vm }\n".to_string(),
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: wall, namespace: test }\nspec:\n  targetRefs: [{ name: walled }]\n  action: DENY\n  rules: [{ from: [{ identities: [test/client] }] }]\n".to_string(),
    ]
    .join("---\n")
}

/// An application that answers 503 and, as if it were the mesh, `x-trellis-failure: denied`.
async fn spoofing_app() -> SocketAddr {
    upstream::http(|_| async {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from("busy")));
        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        r.headers_mut().insert(
            "x-trellis-failure",
            http::HeaderValue::from_static("denied"),
        );
        r
    })
    .await
}

/// The `Proxy-Status` entries of a response through the caller, nearest the application
/// first.
async fn proxy_status(caller: &ProxyProcess, host: &str, path: &str) -> Vec<String> {
    let r = client::get_full(caller.outbound, host, path, &[])
        .await
        .unwrap();
    r.headers
        .get_all("proxy-status")
        .iter()
        .flat_map(|v| {
            v.to_str()
                .unwrap()
                .split(", ")
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// GET `/PATH` from `host` through the caller; the caller's access-log line for it.
async fn through(
    caller: &ProxyProcess,
    host: &str,
    path: &str,
) -> (u16, String, serde_json::Value) {
    let r = client::get_full(caller.outbound, host, path, &[])
        .await
        .unwrap();
    let class = r
        .headers
        .get("x-trellis-failure")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let line = caller
        .wait_log(path, |l| l["path"] == path && l["direction"] == "outbound")
        .await;
    (r.status.as_u16(), class, line)
}

#[tokio::test]
async fn each_hop_keeps_the_class_of_the_side_that_failed() {
    let ok = upstream::named("ok").await;
    // Refusing for as long as the test runs: the callee's proxy reaches it at 127.0.0.1.
    let (down, _down) = upstream::refusing();
    let spoof = spoofing_app().await;
    let slow = upstream::http(|_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from("late")))
    })
    .await;
    let cp = ControlProcess::start(BIN, &[]);
    let (callee, caller) = mtls_pair(&cp, |inbound| mesh(ok, down, spoof, slow, inbound)).await;
    let inbound = format!("127.0.0.1:{}", callee.inbound.port());
    eventually(
        "the caller reaches the callee",
        Duration::from_secs(10),
        async || {
            let r = client::get_full(caller.outbound, "ok.test", "/warm", &[])
                .await
                .ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;
    // A response relayed over HTTP/2 between the proxies keeps its length for the client:
    // a content-length, not chunks.
    let r = client::get_full(caller.outbound, "ok.test", "/length", &[])
        .await
        .unwrap();
    assert!(
        r.headers.contains_key("content-length") && !r.headers.contains_key("transfer-encoding"),
        "{:?}",
        r.headers
    );

    // The callee's application is down: the callee's proxy says connect_refused, and the
    // caller keeps that class (a network failure at the far hop), not app_error.
    let (st, class, line) = through(&caller, "down.test", "/down").await;
    assert_eq!((st, class.as_str()), (502, "connect_refused"));
    assert_eq!(line["failure_class"], "connect_refused", "{line}");
    assert_eq!(line["failure_category"], "network", "{line}");
    assert_eq!(line["failure_side"], "upstream", "{line}");
    // Both addresses: the peer's proxy connected to, and the application behind it.
    assert_eq!(line["upstream"], inbound, "{line}");
    assert_eq!(line["upstream_app"], down.to_string(), "{line}");
    let detail = line["detail"].as_str().unwrap();
    assert!(
        detail.contains("the proxy of test/peer") && detail.contains(&inbound),
        "{detail}"
    );
    let far = callee
        .wait_log("callee's refused connect", |l| l["path"] == "/down")
        .await;
    assert_eq!(far["failure_class"], "connect_refused", "{far}");
    assert_eq!(
        far["upstream"],
        down.to_string(),
        "the callee connected to the app: {far}"
    );

    // An authorization deny at the callee stays `denied` at the caller.
    let (st, class, line) = through(&caller, "walled.test", "/walled").await;
    assert_eq!((st, class.as_str()), (403, "denied"));
    assert_eq!(line["failure_class"], "denied", "{line}");

    // An application's own 503 is the application's, whatever header it sets: the callee's
    // proxy removes the mesh's header from what the application sends.
    let (st, class, line) = through(&caller, "spoof.test", "/spoof").await;
    assert_eq!(
        (st, class.as_str()),
        (503, ""),
        "no mesh header from an application"
    );
    assert_eq!(line["failure_class"], "app_error", "{line}");

    // Metrics agree with the lines.
    for (class, status) in [
        ("connect_refused", "502"),
        ("denied", "403"),
        ("app_error", "503"),
    ] {
        let n = caller
            .metric(
                "trellis_http_requests_total",
                &[
                    ("direction", "outbound"),
                    ("failure_class", class),
                    ("status_code", status),
                ],
            )
            .await;
        assert_eq!(n, 1.0, "{class}");
    }

    // RFC 9209 Proxy-Status: each hop's entry, the one nearest the application first. The
    // callee's proxy could not reach its application; the caller relayed its 502.
    let ps = proxy_status(&caller, "down.test", "/down-ps").await;
    assert_eq!(ps.len(), 2, "{ps:?}");
    assert!(
        ps[0].starts_with("trellis; error=connection_refused; next-hop=")
            && ps[0].contains(&down.to_string()),
        "{ps:?}"
    );
    assert_eq!(
        ps[1],
        format!("trellis; received-status=502; next-hop=\"{inbound}\""),
        "{ps:?}"
    );
    // The application answered 503: both hops relayed it.
    let ps = proxy_status(&caller, "spoof.test", "/spoof-ps").await;
    assert_eq!(
        ps[..],
        [
            format!("trellis; received-status=503; next-hop=\"{spoof}\""),
            format!("trellis; received-status=503; next-hop=\"{inbound}\""),
        ],
    );
    // Too slow for the route: only the caller's proxy answered, and says how.
    let ps = proxy_status(&caller, "slow.test", "/slow-ps").await;
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert!(
        ps[0].starts_with("trellis; error=http_response_timeout; next-hop=")
            && ps[0].contains(&inbound),
        "{ps:?}"
    );
    // A success says what each hop received.
    let ps = proxy_status(&caller, "ok.test", "/ok-ps").await;
    assert_eq!(
        ps,
        [
            "trellis; received-status=200",
            "trellis; received-status=200"
        ]
    );

    // The callee names its caller: service, workload and identity; its own locality.
    let line = callee
        .wait_log("inbound ok", |l| l["path"] == "/warm")
        .await;
    assert_eq!(line["src_service"], "client.test", "{line}");
    assert_eq!(line["src_workload"], "test/client", "{line}");
    assert_eq!(
        line["source_identity"], "spiffe://trellis.local/ns/test/sa/client",
        "{line}"
    );
    assert_eq!(line["dst_locality"], "eu/eu-1", "{line}");
    assert_eq!(line["dst_environment"], "container", "{line}");
    let n = callee
        .metric(
            "trellis_http_requests_total",
            &[
                ("direction", "inbound"),
                ("src_service", "client.test"),
                ("dst_locality", "eu/eu-1"),
            ],
        )
        .await;
    assert!(n >= 1.0, "inbound metrics name the caller's service");
    // The caller's own line names its workload, and the peer's locality.
    let line = caller
        .wait_log("outbound ok", |l| l["path"] == "/warm")
        .await;
    assert_eq!(line["src_workload"], "test/client", "{line}");
    assert_eq!(line["dst_locality"], "eu/eu-1", "{line}");
}

#[tokio::test]
async fn connections_refused_before_any_request_are_recorded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ok = upstream::named("ok").await;
    let cp = ControlProcess::start(BIN, &[]);
    let (callee, _caller) = mtls_pair(&cp, |inbound| mesh(ok, ok, ok, ok, inbound)).await;
    // Plaintext to a proxy whose ports are all STRICT.
    let mut s = tokio::net::TcpStream::connect(callee.inbound)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: ok.test\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink).await;
    let line = callee
        .wait_log("plaintext refused", |l| {
            l["kind"] == "tcp" && l["failure_class"] == "denied"
        })
        .await;
    assert_eq!(line["direction"], "inbound", "{line}");
    assert!(
        line["detail"]
            .as_str()
            .unwrap()
            .contains("requires mutual TLS"),
        "{line}"
    );
    // Something that starts like TLS and is not: the handshake fails, on the caller's side.
    let mut s = tokio::net::TcpStream::connect(callee.inbound)
        .await
        .unwrap();
    s.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let _ = s.read_to_end(&mut sink).await;
    let line = callee
        .wait_log("handshake failed", |l| l["failure_class"] == "tls_error")
        .await;
    assert_eq!(line["failure_side"], "downstream", "{line}");
    assert!(
        line["detail"]
            .as_str()
            .unwrap()
            .contains("mutual TLS handshake"),
        "{line}"
    );
    assert_eq!(
        callee
            .metric("trellis_inbound_tls_refusals_total", &[])
            .await,
        2.0
    );
    let n = callee
        .metric(
            "trellis_tcp_connections_total",
            &[("failure_class", "tls_error")],
        )
        .await;
    assert_eq!(n, 1.0);
}
