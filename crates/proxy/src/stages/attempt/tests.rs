use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use http::{header, Method};

use crate::{
    h1::{Conn, H1Error},
    stages::exchange::prepare_resend,
};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use trellis_model::{
    proxy::{BackendPolicy, ClusterConfig, EndpointConfig},
    resource::{Environment, Locality},
};

use super::*;
use crate::{
    access_log::AccessLog,
    metrics::{Direction, Metrics},
    telemetry::Telemetry,
    test_util::Sink,
};

fn chunks(parts: &[&'static [u8]]) -> ClientBody {
    ClientBody::Chunks(Box::new(
        parts
            .iter()
            .map(|p| Bytes::from_static(p))
            .collect::<VecDeque<_>>(),
    ))
}

async fn collect(b: impl http_body::Body<Data = Bytes, Error = crate::error::BoxError>) -> Vec<u8> {
    b.collect().await.unwrap().to_bytes().to_vec()
}

#[tokio::test]
async fn a_replayed_body_is_the_body_sent_first() {
    let first = Replay::new(chunks(&[b"hello ", b"world"]), 64);
    let again = first.replay().unwrap();
    assert_eq!(collect(first).await, b"hello world");
    assert_eq!(collect(again).await, b"hello world");
    // Past the cap, nothing is kept: no retry can send it again.
    let big = Replay::new(chunks(&[b"0123456789", b"0123456789"]), 15);
    let later = big.replay().unwrap();
    assert_eq!(
        collect(big).await.len(),
        20,
        "the first try streams it whole"
    );
    assert!(!later.can_replay());
    assert!(later.replay().is_none());
}

#[test]
fn the_shortest_limit_applies_and_says_which_it_was() {
    let s = Duration::from_secs;
    assert_eq!(try_limit(None, None, None), None);
    assert_eq!(
        try_limit(Some(s(2)), Some(s(5)), None),
        Some((s(2), Kind::Timeout))
    );
    assert_eq!(
        try_limit(Some(s(9)), Some(s(5)), None),
        Some((s(5), Kind::Timeout))
    );
    assert_eq!(
        try_limit(None, None, Some(s(15))),
        Some((s(15), Kind::Idle))
    );
    assert_eq!(
        try_limit(Some(s(20)), None, Some(s(15))),
        Some((s(15), Kind::Idle))
    );
    assert_eq!(
        try_limit(Some(s(1)), None, Some(s(15))),
        Some((s(1), Kind::Timeout))
    );
}

#[test]
fn back_off_is_jittered_under_a_growing_ceiling() {
    let base = Duration::from_millis(10);
    for attempt in 0..20 {
        let b = backoff(base, attempt);
        let ceiling = (base * (1 << attempt.min(10))).min(BACKOFF_CAP);
        assert!(b <= ceiling, "{attempt}: {b:?}");
    }
}

fn response(status: u16, failure: Option<&'static str>) -> Try {
    let mut r = Response::new(UpstreamBody::H1(dummy_h1_body()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    if let Some(f) = failure {
        r.headers_mut()
            .insert("x-trellis-failure", HeaderValue::from_static(f));
    }
    Try::Response(r)
}

/// Retry decisions only look at the head; a body that is never read will do.
fn dummy_h1_body() -> H1Body {
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(std.local_addr().unwrap()).unwrap();
    client.set_nonblocking(true).unwrap();
    let io = tokio::net::TcpStream::from_std(client).unwrap();
    let sem = Arc::new(tokio::sync::Semaphore::new(1));
    let slot = crate::slot::Slot::new(sem.try_acquire_owned().unwrap(), Default::default());
    let conn = Box::new(Conn::new(io, slot));
    let head = h1::codec::Head {
        status: StatusCode::OK,
        headers: Default::default(),
        framing: h1::codec::RespFraming::Empty,
        keep_alive: false,
    };
    H1Body::new(
        &head,
        conn,
        Arc::new(h1::Idle::new(Duration::from_secs(1))),
        Instant::now(),
    )
}

#[tokio::test]
async fn retries_follow_the_route_and_a_peer_proxys_class() {
    let retry = RetryConfig {
        attempts: 2,
        codes: vec![503],
        grpc_codes: vec![14],
        backoff: Duration::ZERO,
        per_try_timeout: None,
    };
    let r = &retry;
    assert!(
        retry_wanted(r, &response(503, None), None, None),
        "a listed status"
    );
    assert!(
        !retry_wanted(r, &response(500, None), None, None),
        "an unlisted one"
    );
    assert!(
        retry_wanted(r, &response(200, None), Some(14), None),
        "a listed gRPC status"
    );
    // The peer's proxy could not reach its app: retried whatever the codes say.
    let peer = Some(FailureClass::ConnectRefused);
    assert!(retry_wanted(
        r,
        &response(502, Some("connect_refused")),
        None,
        peer
    ));
    // The peer's policy refused: another endpoint would refuse too.
    let denied = Some(FailureClass::Denied);
    assert!(!retry_wanted(
        r,
        &response(403, Some("denied")),
        None,
        denied
    ));
    let refused = Error::new(Kind::Connect, "x");
    assert!(retry_wanted(r, &Try::Failed(refused), None, None));
    let denied = Error::new(Kind::Denied, "x");
    assert!(!retry_wanted(r, &Try::Failed(denied), None, None));
}

#[test]
fn only_a_stale_idempotent_request_is_resent_as_is() {
    let mk = |m: Method, body: UpBody| {
        let mut r = Request::new(body);
        *r.method_mut() = m;
        r
    };
    let stale = H1Error::Closed(true);
    assert!(prepare_resend(&stale, &mut mk(Method::GET, UpBody::Empty)));
    assert!(!prepare_resend(
        &stale,
        &mut mk(Method::POST, UpBody::Empty)
    ));
    let streamed = UpBody::Incoming(ClientBody::Empty);
    assert!(
        !prepare_resend(&stale, &mut mk(Method::PUT, streamed)),
        "a streamed body is gone"
    );
    let replay = UpBody::Replay(Replay::new(chunks(&[b"x"]), 16));
    assert!(prepare_resend(&stale, &mut mk(Method::PUT, replay)));
    let midway = H1Error::Closed(false);
    assert!(
        !prepare_resend(&midway, &mut mk(Method::GET, UpBody::Empty)),
        "an answer began"
    );
}

type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

/// An upstream that answers each request on one connection with the next status of
/// `statuses`, and keeps the bodies and the heads it received.
async fn upstream(statuses: Vec<u16>) -> (std::net::SocketAddr, Seen, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (seen, seen_heads) = (bodies.clone(), heads.clone());
    tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                let Some(end) = text.find("\r\n\r\n") else {
                    continue;
                };
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() < end + 4 + len {
                    continue;
                }
                seen.lock()
                    .unwrap()
                    .push(buf[end + 4..end + 4 + len].to_vec());
                seen_heads.lock().unwrap().push(buf[..end].to_vec());
                buf.drain(..end + 4 + len);
                let status = statuses.next().unwrap_or(200);
                let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        }
    });
    (addr, bodies, heads)
}

/// A cluster of one endpoint at `addr`, the dialer and the telemetry (its log in a sink).
fn fixture(addr: std::net::SocketAddr) -> (Arc<Dialer>, Arc<Cluster>, Arc<Telemetry>, Sink) {
    let mut reg = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut reg);
    let cfg = ClusterConfig {
        service: "shop/up".parse().unwrap(),
        port: 80,
        protocol: trellis_model::resource::Protocol::Http,
        endpoints: vec![EndpointConfig {
            addr,
            weight: 1,
            workload: "shop/up-1".parse().unwrap(),
            environment: Environment::Vm,
            locality: Locality::default(),
            mesh: None,
            recoveries: 0,
        }],
        policy: BackendPolicy::default(),
        mtls: Default::default(),
    };
    let cluster = Arc::new(Cluster::new(
        "shop/up:80".into(),
        Arc::new(cfg),
        None,
        &metrics,
        None,
        false,
    ));
    let sink = Sink::default();
    let telemetry = Arc::new(Telemetry {
        metrics: metrics.clone(),
        log: AccessLog::to(Some(Box::new(sink.clone())), Counter::default()),
        taps: Default::default(),
        spans: None,
        trace_sampling: 0.0,
    });
    let dialer = Arc::new(Dialer {
        metrics,
        tls: None,
        mark: None,
    });
    (dialer, cluster, telemetry, sink)
}

fn get(path: &str) -> Request<ClientBody> {
    let mut req = Request::new(ClientBody::Empty);
    *req.uri_mut() = path.parse().unwrap();
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("up.shop"));
    req
}

fn plan(
    cluster: &Arc<Cluster>,
    timeout: Option<Duration>,
    idle: Option<Duration>,
) -> Plan<'static> {
    Plan {
        cluster: cluster.clone(),
        timeout,
        idle,
        retry: None,
        response_headers: None,
        peer_header: None,
        faults: &[],
        mirror_to: Vec::new(),
    }
}

/// An upstream that reads a request and answers `reply`, then stays silent.
async fn answering(reply: &'static [u8]) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                std::future::pending::<()>().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn silence_past_the_idle_timeout_fails_the_try_as_a_network_timeout() {
    // No head at all.
    let (dialer, cluster, telemetry, sink) = fixture(answering(b"").await);
    let rec = Record::new(
        telemetry.clone(),
        Direction::outbound,
        "HTTP/1.1",
        Default::default(),
    );
    let idle = Some(Duration::from_millis(300));
    let resp = forward(
        &dialer,
        plan(&cluster, None, idle),
        &mut get("/silent"),
        rec,
        false,
    )
    .await;
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["x-trellis-failure"], "upstream_timeout");
    collect(resp.into_body()).await;
    // A head, then a body that stops: cut after the idle timeout, recorded as such.
    let (dialer, cluster, _, _) =
        fixture(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc").await);
    let rec = Record::new(
        telemetry.clone(),
        Direction::outbound,
        "HTTP/1.1",
        Default::default(),
    );
    let resp = forward(
        &dialer,
        plan(&cluster, None, idle),
        &mut get("/stalls"),
        rec,
        false,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let err = resp.into_body().collect().await.unwrap_err();
    assert!(err.to_string().contains("sent nothing for 300ms"), "{err}");
    telemetry.log.close();
    let lines = sink.lines();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["failure_class"], "upstream_timeout");
    assert!(
        lines[0]["detail"]
            .as_str()
            .unwrap()
            .contains("the idle timeout"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1]["failure_class"], "upstream_timeout");
    assert_eq!(lines[1]["status"], 200);
}

#[tokio::test]
async fn a_retried_request_sends_its_body_again_and_is_recorded_once() {
    let (addr, bodies, _) = upstream(vec![503, 200]).await;
    let (dialer, cluster, telemetry, sink) = fixture(addr);
    let retry = RetryConfig {
        attempts: 2,
        codes: vec![503],
        grpc_codes: vec![],
        backoff: Duration::ZERO,
        per_try_timeout: None,
    };
    let plan = Plan {
        cluster,
        timeout: Some(Duration::from_secs(10)),
        idle: None,
        retry: Some(&retry),
        response_headers: None,
        peer_header: None,
        faults: &[],
        mirror_to: Vec::new(),
    };
    let mut req = Request::new(chunks(&[b"pay", b"load"]));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = "/orders".parse().unwrap();
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("up.shop"));
    let rec = Record::new(
        telemetry.clone(),
        Direction::outbound,
        "HTTP/1.1",
        Default::default(),
    );
    let resp = forward(&dialer, plan, &mut req, rec, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(collect(resp.into_body()).await, b"ok");
    assert_eq!(
        *bodies.lock().unwrap(),
        [b"payload".to_vec(), b"payload".to_vec()]
    );
    telemetry.log.close();
    let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["attempts"], 2);
    assert_eq!(lines[0]["failure_class"], "ok");
    assert_eq!(lines[0]["upstream"], addr.to_string());
}

/// The parent span id an upstream saw in a request head's `traceparent`.
fn parent_seen(head: &[u8]) -> u64 {
    let head = String::from_utf8_lossy(head);
    let tp = head
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .expect("a traceparent");
    u64::from_str_radix(&tp[36..52], 16).unwrap()
}

#[tokio::test]
async fn each_try_is_a_span_under_the_request_and_the_next_hop_sees_it_as_parent() {
    let (addr, _, heads) = upstream(vec![503, 200]).await;
    let (dialer, cluster, telemetry, _sink) = fixture(addr);
    let (spans, mut queued, _) = crate::otlp::Spans::for_test(8);
    let telemetry = Arc::new(Telemetry {
        metrics: telemetry.metrics.clone(),
        log: AccessLog::to(None, Counter::default()),
        taps: Default::default(),
        spans: Some(spans),
        trace_sampling: 0.0,
    });
    let retry = RetryConfig {
        attempts: 1,
        codes: vec![503],
        grpc_codes: vec![],
        backoff: Duration::ZERO,
        per_try_timeout: None,
    };
    let plan = Plan {
        retry: Some(&retry),
        ..plan(&cluster, Some(Duration::from_secs(10)), None)
    };
    let mut req = get("/");
    req.headers_mut().insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let mut rec = Record::new(
        telemetry.clone(),
        Direction::outbound,
        "HTTP/1.1",
        Default::default(),
    );
    let ids = crate::trace::prepare(req.headers_mut(), 0.0);
    rec.trace_id = ids.trace_id;
    rec.spans = ids.spans;
    let resp = forward(&dialer, plan, &mut req, rec, false).await;
    assert_eq!(resp.status(), 200);
    collect(resp.into_body()).await;
    let f = queued
        .try_recv()
        .expect("a sampled request's spans are queued")
        .request();
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2);
    let (first, second) = (parent_seen(&heads[0]), parent_seen(&heads[1]));
    assert_ne!(first, second, "each try is its own parent of the next hop");
    assert_eq!(f.line.spans.parent, 0x00f067aa0ba902b7);
    assert_eq!(f.earlier.len(), 1);
    let t = &f.earlier[0];
    assert_eq!(
        (t.span, t.class, t.status, t.endpoint),
        (first, FailureClass::AppError, 503, Some(addr))
    );
    assert_eq!(f.line.spans.attempt, second);
    assert!(f.line.try_start >= t.start + t.took);
    assert_eq!((f.line.attempts, f.line.class), (2, FailureClass::Ok));
}

#[tokio::test]
async fn an_unsampled_request_queues_spans_only_when_it_failed() {
    let (addr, _, _) = upstream(vec![200, 500]).await;
    let (dialer, cluster, telemetry, _sink) = fixture(addr);
    let (spans, mut queued, _) = crate::otlp::Spans::for_test(8);
    let telemetry = Arc::new(Telemetry {
        metrics: telemetry.metrics.clone(),
        log: AccessLog::to(None, Counter::default()),
        taps: Default::default(),
        spans: Some(spans),
        trace_sampling: 0.0,
    });
    for expect in [200, 500] {
        let mut req = get("/");
        let mut rec = Record::new(
            telemetry.clone(),
            Direction::outbound,
            "HTTP/1.1",
            Default::default(),
        );
        let ids = crate::trace::prepare(req.headers_mut(), 0.0);
        rec.trace_id = ids.trace_id;
        rec.spans = ids.spans;
        let resp = forward(&dialer, plan(&cluster, None, None), &mut req, rec, false).await;
        assert_eq!(resp.status(), expect);
        collect(resp.into_body()).await;
    }
    let f = queued
        .try_recv()
        .expect("the failed request's spans")
        .request();
    assert_eq!((f.line.status, f.line.class), (500, FailureClass::AppError));
    assert!(!f.line.spans.sampled);
    assert!(
        queued.try_recv().is_err(),
        "the successful one was not sampled"
    );
}

/// An upstream's header lines go with its body through `relay` into the body the client's
/// server gets: no header map is built for a plain relayed response, the hop-by-hop lines
/// are dropped, and this proxy's `Proxy-Status` entry follows the upstream's fields.
#[tokio::test]
async fn an_upstreams_lines_travel_with_its_body_to_the_client() {
    use crate::h1::raw::Lines;
    let wire = b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: keep-alive\r\nX-Up: 1\r\n\r\n";
    let head = h1::codec::parse_response_head(&mut bytes::BytesMut::from(&wire[..]), &Method::GET)
        .unwrap()
        .unwrap();
    let mut resp = Response::new(UpstreamBody::H1(dummy_h1_body().with_lines(head.headers)));
    *resp.status_mut() = StatusCode::OK;
    let (_, _, telemetry, _) = fixture("127.0.0.1:1".parse().unwrap());
    let rec = Record::new(
        telemetry,
        Direction::outbound,
        "HTTP/1.1",
        Default::default(),
    );
    let out = crate::stages::respond::relay(resp, rec, None, Default::default(), false);
    assert!(out.headers().is_empty(), "{:?}", out.headers());
    let lines = out.body().lines().expect("the lines came with the body");
    let fields: Vec<(&[u8], &[u8])> = lines.fields().map(|(_, n, v)| (n, v)).collect();
    assert_eq!(
        fields,
        [
            (&b"Server"[..], &b"up"[..]),
            (&b"X-Up"[..], &b"1"[..]),
            (&b"proxy-status"[..], &b"trellis; received-status=200"[..]),
        ]
    );
}

/// A request's header map, once the request has gone upstream, is kept on its thread and is
/// the map of the next request head parsed there, emptied (`http::spare`); the response's
/// box of lines is kept once its body is done with (`h1::raw::keep`).
#[tokio::test]
async fn a_sent_requests_map_and_its_responses_lines_serve_the_next_heads() {
    let (addr, _, heads) = upstream(vec![200]).await;
    let (dialer, cluster, telemetry, _) = fixture(addr);
    let mut req = get("/a");
    req.headers_mut()
        .insert("x-only-here", HeaderValue::from_static("1"));
    req.headers_mut().reserve(20);
    let room = req.headers().capacity();
    let rec = Record::new(
        telemetry,
        Direction::outbound,
        "HTTP/1.1",
        Default::default(),
    );
    let kept = crate::http::spare::kept();
    let lines_kept = h1::raw::kept();
    let resp = forward(&dialer, plan(&cluster, None, None), &mut req, rec, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(collect(resp.into_body()).await, b"ok");
    assert_eq!(
        h1::raw::kept(),
        lines_kept + 1,
        "the response's lines were kept"
    );
    let sent = String::from_utf8(heads.lock().unwrap()[0].clone()).unwrap();
    assert!(sent.contains("x-only-here: 1"), "{sent}");
    assert_eq!(crate::http::spare::kept(), kept + 1, "the map was kept");
    // The next head parsed on this thread gets it, with its room and none of its fields.
    let mut buf = bytes::BytesMut::from(&b"GET /b HTTP/1.1\r\nHost: up.shop\r\n\r\n"[..]);
    let head = h1::codec::parse_request_head(&mut buf, 8192)
        .unwrap()
        .unwrap();
    assert_eq!(crate::http::spare::kept(), kept);
    assert_eq!(head.headers.capacity(), room);
    assert_eq!(head.headers.len(), 1, "{:?}", head.headers);
    assert!(head.headers.get("x-only-here").is_none());
}
