use std::collections::HashMap;

use http::HeaderValue;

use super::*;
use crate::{error::Side, trace::SpanIds};

fn attrs(s: &Span) -> HashMap<String, String> {
    s.attributes
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn origin() -> Origin {
    Origin {
        workload: "shop/web-1".into(),
        identity: Some("spiffe://example.org/ns/shop/sa/web".into()),
        environment: "bare-metal".into(),
        locality: "eu/eu-1".into(),
    }
}

/// An outbound request to `api.shop` tried twice: refused by one endpoint, then answered
/// 200 by another through its proxy.
fn retried() -> Finished {
    let mut line = HttpLine::taken();
    line.direction = Direction::outbound;
    line.method = http::Method::POST;
    line.uri = "/orders?id=1".parse().unwrap();
    line.status = 200;
    line.dst_service = Label::from("api.shop");
    line.dst_workload = Label::from("api-2");
    line.dst_environment = "container";
    line.dst_locality = Label::from("eu/eu-2");
    line.dst_identity = Label::from("shop/api");
    line.upstream = Some("127.0.0.7:15006".parse().unwrap());
    line.attempts = 2;
    line.first_byte = Some(Duration::from_millis(9));
    line.trace_id = 0x4bf92f3577b34da6a3ce929d0e0e4736;
    line.request_id = Some(HeaderValue::from_static("req-1"));
    line.spans = SpanIds {
        span: 0x1111,
        parent: 0x00f067aa0ba902b7,
        attempt: 0x3333,
        sampled: true,
        started: false,
    };
    line.try_start = Duration::from_millis(4);
    Finished {
        line,
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        total: Duration::from_millis(10),
        earlier: vec![TrySpan {
            span: 0x2222,
            start: Duration::ZERO,
            took: Duration::from_millis(3),
            endpoint: Some("127.0.0.6:15006".parse().unwrap()),
            workload: Label::from("api-1"),
            identity: Label::from("shop/api"),
            class: FailureClass::ConnectRefused,
            status: 0,
        }],
    }
}

#[test]
fn a_retried_request_is_a_server_span_with_a_client_span_per_try() {
    let f = retried();
    let out = spans(&f, &origin());
    assert_eq!(out.len(), 3);
    let (req, first, last) = (&out[0], &out[1], &out[2]);
    let trace = 0x4bf92f3577b34da6a3ce929d0e0e4736u128
        .to_be_bytes()
        .to_vec();
    assert!(out.iter().all(|s| s.trace_id == trace));
    assert_eq!(req.span_id, 0x1111u64.to_be_bytes());
    assert_eq!(req.parent_span_id, 0x00f067aa0ba902b7u64.to_be_bytes());
    assert_eq!(req.kind, span::SpanKind::Server as i32);
    assert_eq!(
        req.end_time_unix_nano - req.start_time_unix_nano,
        10_000_000
    );
    assert!(req.status.is_none(), "a success is not an error");
    let a = attrs(req);
    assert_eq!(
        a["trellis.source.identity"],
        "spiffe://example.org/ns/shop/sa/web"
    );
    assert_eq!(
        a["trellis.destination.identity"],
        "spiffe://example.org/ns/shop/sa/api"
    );
    assert_eq!(a["trellis.destination.environment"], "container");
    assert_eq!(a["trellis.destination.locality"], "eu/eu-2");
    assert_eq!(a["trellis.destination.workload"], "shop/api-2");
    assert_eq!(a["trellis.failure_class"], "ok");
    assert_eq!(a["url.path"], "/orders");
    assert_eq!(a["trellis.attempts"], "2");
    assert_eq!(a["trellis.request_id"], "req-1");
    // Tries are children of the request, in order, each with its own endpoint and outcome.
    for (t, id) in [(first, 0x2222u64), (last, 0x3333)] {
        assert_eq!(t.kind, span::SpanKind::Client as i32);
        assert_eq!(t.parent_span_id, 0x1111u64.to_be_bytes());
        assert_eq!(t.span_id, id.to_be_bytes());
    }
    let (fa, la) = (attrs(first), attrs(last));
    assert_eq!(fa["trellis.attempt"], "1");
    assert_eq!(fa["trellis.failure_class"], "connect_refused");
    assert_eq!(fa["network.peer.address"], "127.0.0.6");
    assert_eq!(fa["trellis.destination.workload"], "shop/api-1");
    assert_eq!(la["trellis.destination.workload"], "shop/api-2");
    assert!(!fa.contains_key("http.response.status_code"));
    assert_eq!(
        first.status.as_ref().map(|s| s.code),
        Some(status::StatusCode::Error as i32)
    );
    assert_eq!(
        first.end_time_unix_nano - first.start_time_unix_nano,
        3_000_000
    );
    assert_eq!(la["trellis.attempt"], "2");
    assert_eq!(la["http.response.status_code"], "200");
    assert_eq!(la["network.peer.port"], "15006");
    assert_eq!(
        last.start_time_unix_nano - req.start_time_unix_nano,
        4_000_000
    );
    assert_eq!(last.end_time_unix_nano, req.end_time_unix_nano);
}

#[test]
fn a_failure_is_an_error_span_with_its_class_side_and_detail() {
    let mut f = retried();
    f.earlier.clear();
    f.line.direction = Direction::inbound;
    f.line.attempts = 1;
    f.line.status = 502;
    f.line.first_byte = None;
    f.line.class = FailureClass::ConnectRefused;
    f.line.side = Some(Side::Upstream);
    f.line.detail = Some("connect to 127.0.0.1:8080: refused".into());
    f.line.source_identity = Label::from("spiffe://example.org/ns/shop/sa/gateway");
    let out = spans(&f, &origin());
    assert_eq!(out.len(), 2);
    let a = attrs(&out[0]);
    assert_eq!(a["trellis.failure_class"], "connect_refused");
    assert_eq!(a["trellis.failure_side"], "upstream");
    assert_eq!(a["http.response.status_code"], "502");
    // Inbound: the caller proved its identity; this proxy is the destination.
    assert_eq!(
        a["trellis.source.identity"],
        "spiffe://example.org/ns/shop/sa/gateway"
    );
    assert_eq!(
        a["trellis.destination.identity"],
        "spiffe://example.org/ns/shop/sa/web"
    );
    let st = out[0].status.as_ref().unwrap();
    assert_eq!(st.code, status::StatusCode::Error as i32);
    assert!(
        st.message.starts_with("connect_refused: connect to"),
        "{}",
        st.message
    );
    // The try got no answer: the 502 is the proxy's, not the endpoint's.
    assert!(!attrs(&out[1]).contains_key("http.response.status_code"));
}

/// An outbound TCP connection to `db.shop` through its endpoint's proxy.
fn connection() -> ConnFinished {
    ConnFinished {
        line: TcpLine {
            direction: Direction::outbound,
            dst_service: Label::from("db.shop"),
            dst_workload: Label::from("db-1"),
            upstream: Some("127.0.0.9:15006".parse().unwrap()),
            source_identity: Label::default(),
            src_workload: Label::default(),
            class: FailureClass::Ok,
            side: None,
            detail: None,
            sent: 1200,
            received: 34_000,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            total: Duration::from_millis(2500),
        },
        dst_identity: Label::from("shop/db"),
        trace: crate::trace::ConnTrace::start(1.0),
    }
}

#[test]
fn a_tcp_connection_is_a_root_span_with_its_bytes_both_ways() {
    let s = conn_span(&connection(), &origin());
    assert_eq!(s.kind, span::SpanKind::Client as i32);
    assert_eq!(s.name, "outbound tcp db.shop");
    assert!(s.parent_span_id.is_empty(), "a trace of its own");
    assert_eq!((s.trace_id.len(), s.span_id.len()), (16, 8));
    assert!(s.trace_id.iter().any(|&b| b != 0) && s.span_id.iter().any(|&b| b != 0));
    assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 2_500_000_000);
    assert_eq!(s.start_time_unix_nano, 1_800_000_000_000_000_000);
    let a = attrs(&s);
    assert_eq!(a["network.transport"], "tcp");
    assert_eq!(a["trellis.tcp.bytes_from_client"], "1200");
    assert_eq!(a["trellis.tcp.bytes_to_client"], "34000");
    assert_eq!(a["trellis.failure_class"], "ok");
    assert_eq!(a["trellis.destination.workload"], "shop/db-1");
    assert_eq!(
        a["trellis.destination.identity"],
        "spiffe://example.org/ns/shop/sa/db"
    );
    assert_eq!(
        a["trellis.source.identity"],
        "spiffe://example.org/ns/shop/sa/web"
    );
    assert_eq!(a["network.peer.port"], "15006");
    assert!(s.status.is_none());
    // Two connections, two traces.
    assert_ne!(conn_span(&connection(), &origin()).trace_id, s.trace_id);
}

#[test]
fn a_refused_inbound_tcp_connection_is_an_error_span() {
    let c = ConnFinished {
        line: TcpLine {
            direction: Direction::inbound,
            upstream: None,
            dst_workload: Label::default(),
            source_identity: Label::from("spiffe://example.org/ns/shop/sa/gateway"),
            src_workload: Label::from("shop/gateway-1"),
            class: FailureClass::Denied,
            side: Some(Side::Proxy),
            detail: Some("denied by shop/wall".into()),
            sent: 0,
            received: 0,
            ..connection().line
        },
        dst_identity: Label::default(),
        // The caller's span, told in the stream's hello: not sampled.
        trace: crate::trace::ConnTrace::child_of(crate::trace::SpanContext {
            trace_id: 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
            span: 0xb7ad_6b71_6920_3331,
            sampled: false,
        }),
    };
    let s = conn_span(&c, &origin());
    assert_eq!(s.kind, span::SpanKind::Server as i32);
    // A span of the caller's trace, under the caller's span.
    assert_eq!(
        s.trace_id,
        0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128.to_be_bytes()
    );
    assert_eq!(s.parent_span_id, 0xb7ad_6b71_6920_3331u64.to_be_bytes());
    assert_ne!(s.span_id, s.parent_span_id);
    let a = attrs(&s);
    assert_eq!(a["trellis.failure_class"], "denied");
    assert_eq!(a["trellis.failure_side"], "proxy");
    assert_eq!(a["trellis.sampled"], "false");
    assert_eq!(
        a["trellis.source.identity"],
        "spiffe://example.org/ns/shop/sa/gateway"
    );
    // The caller's workload, as its proxy said in the stream's hello.
    assert_eq!(a["trellis.source.workload"], "shop/gateway-1");
    // This proxy is the destination.
    assert_eq!(
        a["trellis.destination.identity"],
        "spiffe://example.org/ns/shop/sa/web"
    );
    let st = s.status.unwrap();
    assert_eq!(st.code, status::StatusCode::Error as i32);
    assert_eq!(st.message, "denied: denied by shop/wall");
}

#[test]
fn failures_but_a_clients_own_are_always_exported() {
    for c in FailureClass::ALL {
        let expect = !matches!(c, FailureClass::Ok | FailureClass::ClientError);
        assert_eq!(always_exported(c), expect, "{c:?}");
    }
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let (spans, mut rx, metrics) = Spans::for_test(2);
    for _ in 0..5 {
        spans.offer(retried());
    }
    let dropped = metrics
        .spans
        .get_or_create(&OutcomeLabels { outcome: "dropped" })
        .get();
    assert_eq!(dropped, 3);
    assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err());
}

#[test]
fn a_collector_is_http_or_https_with_a_host() {
    assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
    assert!(check_endpoint("https://collector:4317").is_ok());
    let e = check_endpoint("127.0.0.1:4317").unwrap_err();
    assert!(e.to_string().contains("https://HOST:PORT"), "{e}");
    assert!(check_endpoint("grpc://collector:4317").is_err());
    assert!(check_endpoint("http://bad host").is_err());
    assert!(check_endpoint("https://:4317").is_err());
}

#[test]
fn tls_to_a_collector_needs_readable_pem_roots() {
    // Plain HTTP needs none.
    assert!(
        collector_tls("http://127.0.0.1:4317", CollectorTls::default())
            .unwrap()
            .is_none()
    );
    let dir = std::env::temp_dir().join(format!("trellis-otlp-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for (ca, says) in [
        (dir.join("missing.pem"), "No such file"),
        (empty.clone(), "no certificate in it"),
        (junk.clone(), "not PEM certificates"),
    ] {
        let tls = CollectorTls {
            ca: Some(&ca),
            ..CollectorTls::default()
        };
        let e = collector_tls("https://collector:4317", tls).unwrap_err();
        let e = e.to_string();
        assert!(
            e.starts_with(&format!("--otlp-ca {}: ", ca.display())) && e.contains(says),
            "{e}"
        );
    }
    // TLS settings for a plaintext collector are refused, not ignored.
    let tls = CollectorTls {
        ca: Some(&empty),
        ..CollectorTls::default()
    };
    let e = collector_tls("http://127.0.0.1:4317", tls)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("--otlp-ca {}: ", empty.display())) && e.contains("plaintext"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_peers_identity_is_named_in_this_proxys_trust_domain() {
    assert_eq!(
        origin().spiffe("pay/ledger").as_deref(),
        Some("spiffe://example.org/ns/pay/sa/ledger")
    );
    assert_eq!(Origin::default().spiffe("pay/ledger"), None);
}

#[test]
fn collector_headers_are_names_and_visible_ascii_values() {
    let m =
        collector_headers(&["Authorization=Bearer abc".into(), "x-tenant= shop ".into()]).unwrap();
    assert_eq!(m.get("authorization").unwrap(), "Bearer abc");
    assert_eq!(m.get("x-tenant").unwrap(), "shop");
    for (bad, says) in [
        ("no-equals", "expected NAME=VALUE"),
        ("bad name=x", "not a header name"),
        ("grpc-timeout=1S", "reserved"),
        ("key-bin=AAAA", "reserved"),
        ("x-key=caf\u{e9}", "not visible ASCII"),
    ] {
        let e = collector_headers(&[bad.into()]).unwrap_err().to_string();
        assert!(
            e.starts_with("--otlp-header ") && e.contains(says),
            "{bad}: {e}"
        );
        // A value never shows in the error.
        assert!(!e.contains("AAAA") && !e.contains("caf"), "{e}");
    }
}
