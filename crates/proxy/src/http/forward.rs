//! Sending a request to a cluster: admission (circuit breaker), endpoint choice, tries with
//! timeouts and budgeted retries, and the proxy's own responses when all of that fails.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header,
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version,
};
use http_body::Body as _;
use tokio::io::AsyncWriteExt as _;
use trellis_model::{
    proxy::{HeaderEdits, RetryConfig},
    resource::Protocol,
};

use super::{
    body::{ClientBody, ProxyBody, Replay, UpBody, UpstreamBody},
    GRPC_MESSAGE, GRPC_STATUS, X_TRELLIS_FAILURE,
};
use crate::{
    cluster::{Cluster, Endpoint},
    failure::grpc_status,
    h1::{self, Conn, H1Body},
    pool::{ConnectCtx, Sender, UpstreamError},
    record::Record,
    FailureClass, Shared,
};

/// Largest request body kept for replay; bigger bodies are streamed and not retried.
const REPLAY_CAP: usize = 64 * 1024;
const BACKOFF_CAP: Duration = Duration::from_secs(1);

// Typed names: removing by `&str` would parse each name again on every request.
static HOP_BY_HOP: [header::HeaderName; 8] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// The index in [`HOP_BY_HOP`] of a (lower-case) header name. A match on the string is a
/// length switch and one comparison; comparing `HeaderName`s one by one cost ten times more.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "te" => 7,
        _ => return None,
    })
}

/// Remove hop-by-hop headers (keeping `te: trailers`, which gRPC needs end to end), and
/// the headers that `Connection` names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the few headers present finds which hop-by-hop names occur; usually
    // none on requests and only `connection` on responses. A removal per name would cost a
    // hash and a probe each.
    let mut present = 0u16;
    for k in h.keys() {
        if let Some(i) = hop_by_hop_index(k.as_str()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let mut named = Vec::new();
    // `keep-alive` (and `close`, unless a header is literally named so), the usual values,
    // name no header to remove beyond the hop-by-hop ones.
    let usual = |v: &HeaderValue| {
        let v = v.as_bytes();
        v.eq_ignore_ascii_case(b"keep-alive")
            || (v.eq_ignore_ascii_case(b"close") && !h.contains_key("close"))
    };
    if present & 1 != 0 && !h.get_all(header::CONNECTION).iter().all(usual) {
        for v in h.get_all(header::CONNECTION) {
            for token in v.to_str().unwrap_or("").split(',').map(str::trim) {
                // `te` is handled below; other hop-by-hop names are removed anyway.
                let listed = token.eq_ignore_ascii_case("te")
                    || HOP_BY_HOP
                        .iter()
                        .any(|n| token.eq_ignore_ascii_case(n.as_str()));
                if !token.is_empty() && !listed && h.contains_key(token) {
                    if let Ok(n) = header::HeaderName::from_bytes(token.as_bytes()) {
                        named.push(n);
                    }
                }
            }
        }
    }
    let trailers = h
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    for n in &named {
        h.remove(n);
    }
    if trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Apply header edits.
pub fn edit_headers(h: &mut HeaderMap, e: &HeaderEdits) {
    for n in &e.remove {
        h.remove(n.as_str());
    }
    for (n, v) in &e.set {
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(n, v);
        }
    }
    for (n, v) in &e.add {
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(n, v);
        }
    }
}

/// A response the proxy makes up itself: the class in `x-trellis-failure`, and for gRPC a
/// trailers-only response with a proper `grpc-status`.
pub fn local_reply(
    mut rec: Box<Record>,
    class: FailureClass,
    detail: String,
    grpc: bool,
) -> Response<ProxyBody> {
    rec.class = class;
    let mut resp = if grpc {
        let code = class.grpc_status();
        rec.grpc_status = Some(code);
        let mut r = Response::new(ProxyBody::full(Bytes::new()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(GRPC_STATUS.clone(), HeaderValue::from(code));
        if let Ok(v) = HeaderValue::from_str(&format!(
            "trellis: {}: {}",
            class.as_str(),
            detail.replace(['\r', '\n'], " ")
        )) {
            h.insert(GRPC_MESSAGE.clone(), v);
        }
        r
    } else {
        let body = format!("trellis: {}: {detail}\n", class.as_str());
        let mut r = Response::new(ProxyBody::full(body));
        *r.status_mut() = class.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut().insert(
        X_TRELLIS_FAILURE.clone(),
        HeaderValue::from_static(class.as_str()),
    );
    rec.status = resp.status().as_u16();
    rec.detail = Some(detail);
    resp.map(|b| b.with_on_end(rec))
}

/// Is this a gRPC request?
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What the route asks of this exchange.
pub struct Plan<'a> {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Deadline until response headers.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: Option<&'a RetryConfig>,
    /// Response header edits.
    pub response_headers: Option<&'a HeaderEdits>,
}

/// The request for one try. `last` says no try follows, so the headers can be moved rather
/// than copied. URI parts are `Bytes`-backed: cloning them does not copy.
fn upstream_request(
    parts: &mut http::request::Parts,
    body: UpBody,
    h2: bool,
    last: bool,
) -> Request<UpBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = if last {
        std::mem::take(&mut parts.headers)
    } else {
        parts.headers.clone()
    };
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = http::uri::Parts::default();
    uri.path_and_query = Some(path);
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        let host = req.headers_mut().remove(header::HOST);
        let authority = parts.uri.authority().cloned().or_else(|| {
            host.and_then(|h| {
                Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(h.as_bytes())).ok()
            })
        });
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(authority.unwrap_or_else(|| Authority::from_static("upstream")));
    } else {
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            if let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(header::HOST, v);
            }
        }
    }
    *req.uri_mut() = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
    req
}

// A short-lived value on the stack: boxing the response would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Try {
    Response(Response<UpstreamBody>),
    Failed(FailureClass, String),
}

async fn send_once(
    shared: &Shared,
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    req: Request<UpBody>,
    h2: bool,
    rec: &mut Record,
    began: Instant,
) -> Try {
    let ctx = cluster.connect_ctx(shared);
    let (sender, connect) = match ep.pool.checkout(h2, &ctx, began).await {
        Ok(s) => s,
        Err(e) => return Try::Failed(e.class(), e.to_string()),
    };
    rec.connect = Some(connect);
    match sender {
        Sender::H1(conn) => send_h1(ep, conn, req, &ctx, rec, began).await,
        Sender::H2(s) => send_h2(ep, s, req).await,
    }
}

async fn send_h2(
    ep: &Endpoint,
    mut s: hyper::client::conn::http2::SendRequest<UpBody>,
    req: Request<UpBody>,
) -> Try {
    let sent = match s.ready().await {
        Ok(()) => s.send_request(req).await,
        Err(e) => Err(e),
    };
    match sent {
        Ok(r) => Try::Response(r.map(UpstreamBody::H2)),
        Err(source) => {
            let e = UpstreamError::Send {
                addr: ep.cfg.addr,
                source,
            };
            Try::Failed(e.class(), e.to_string())
        }
    }
}

/// One HTTP/1.1 exchange. A pooled connection may have been closed by the server just as we
/// picked it; an idempotent request is then sent once more on a fresh connection.
async fn send_h1(
    ep: &Arc<Endpoint>,
    mut conn: Box<Conn>,
    mut req: Request<UpBody>,
    ctx: &ConnectCtx<'_>,
    rec: &mut Record,
    began: Instant,
) -> Try {
    let mut result = h1::exchange(&mut conn, &mut req).await;
    if let Err(e) = &result {
        if conn.is_reused() && h1::prepare_resend(e, &mut req) {
            drop(conn);
            let start = Instant::now();
            // Boxed for the same reason as in `Pool::checkout`.
            conn = match Box::pin(ep.pool.connect_h1(ctx)).await {
                Ok(c) => c,
                Err(e) => return Try::Failed(e.class(), e.to_string()),
            };
            rec.connect = Some(start.elapsed());
            result = h1::exchange(&mut conn, &mut req).await;
        }
    }
    match result {
        Ok(head) if head.status == StatusCode::SWITCHING_PROTOCOLS => Try::Failed(
            FailureClass::ProtocolError,
            format!("{} switched protocols unasked", ep.cfg.addr),
        ),
        Ok(head) => {
            let body = H1Body::new(&head, conn, ep.clone(), began);
            let mut resp = Response::new(UpstreamBody::H1(body));
            *resp.status_mut() = head.status;
            *resp.headers_mut() = head.headers;
            Try::Response(resp)
        }
        Err(e) => Try::Failed(e.class(), format!("request to {} failed: {e}", ep.cfg.addr)),
    }
}

/// `grpc` is the response's grpc-status, read once by the caller.
fn retry_wanted(retry: &RetryConfig, t: &Try, grpc: Option<u32>) -> bool {
    match t {
        Try::Failed(class, _) => class.retriable(),
        Try::Response(r) => {
            retry.codes.contains(&r.status().as_u16())
                || grpc.is_some_and(|c| retry.grpc_codes.contains(&c))
        }
    }
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.min(10)).min(BACKOFF_CAP);
    // Full jitter.
    ceiling.mul_f64(fastrand::f64())
}

/// Forward `req` as `plan` says, and build the response for the client.
pub async fn forward(
    shared: &Shared,
    plan: Plan<'_>,
    req: Request<ClientBody>,
    mut rec: Box<Record>,
    grpc: bool,
) -> Response<ProxyBody> {
    let cluster = plan.cluster;
    let deadline = plan.timeout.map(|t| rec.start + t);
    let h2 = matches!(cluster.cfg.protocol, Protocol::Http2 | Protocol::Grpc);
    cluster.budget.deposit(rec.start);
    let permit = match cluster.admit(cluster.policy().connect_timeout).await {
        Ok(p) => p,
        Err(e) => return local_reply(rec, FailureClass::Overloaded, e.to_string(), grpc),
    };
    let (mut parts, body) = req.into_parts();
    let small = body
        .size_hint()
        .upper()
        .is_none_or(|n| n as usize <= REPLAY_CAP);
    let mut replay = None;
    // No body at all: nothing to record, every try sends none, and a stale pooled connection
    // may send it again.
    let empty = body.is_end_stream();
    let mut first = Some(match plan.retry {
        _ if empty => UpBody::Empty,
        Some(_) if small => {
            let r = Replay::new(body, REPLAY_CAP);
            replay = r.replay();
            UpBody::Replay(r)
        }
        _ => UpBody::Incoming(body),
    });
    let max_tries = 1 + plan.retry.map_or(0, |r| r.attempts);
    // Built only when a try fails: formatting an error on every request costs.
    let mut last_failure: Option<(FailureClass, String)> = None;
    // The endpoint of the previous try: a retry goes elsewhere if it can.
    let mut last_ep: Option<Arc<Endpoint>> = None;
    for attempt in 0..max_tries {
        let body = match first.take() {
            Some(b) => b,
            None if empty => UpBody::Empty,
            None => match replay.as_ref().and_then(Replay::replay) {
                Some(r) => UpBody::Replay(r),
                None => break,
            },
        };
        // The first try reuses the request's start time: each clock read costs in a VM.
        let try_start = if attempt == 0 {
            rec.start
        } else {
            Instant::now()
        };
        let Some(ep) = cluster.pick_avoiding(try_start, last_ep.as_ref()) else {
            last_failure = Some((
                FailureClass::NoHealthyUpstream,
                format!(
                    "cluster {} has no healthy endpoint ({} configured, all ejected or none)",
                    cluster.key,
                    cluster.endpoints.len()
                ),
            ));
            break;
        };
        rec.attempts = attempt + 1;
        rec.set_endpoint(&ep);
        last_ep = Some(ep.clone());
        let in_flight = ep.start();
        let per_try = plan.retry.and_then(|r| r.per_try_timeout);
        let remaining = deadline.map(|d| d.saturating_duration_since(try_start));
        let limit = match (per_try, remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // A peer proxy is always reached by HTTP/2.
        let h2 = ep.pool.uses_h2(h2, &cluster.connect_ctx(shared));
        let req = upstream_request(&mut parts, body, h2, attempt + 1 == max_tries);
        // The try's future is built inside each arm: a future bound to a local and then moved
        // into `timeout` would occupy space twice in this function's future.
        let outcome = match limit {
            Some(l) => tokio::time::timeout(
                l,
                send_once(shared, &cluster, &ep, req, h2, &mut rec, try_start),
            )
            .await
            .unwrap_or_else(|_| {
                Try::Failed(
                    FailureClass::UpstreamTimeout,
                    format!("no response from {} within {l:?}", ep.cfg.addr),
                )
            }),
            None => send_once(shared, &cluster, &ep, req, h2, &mut rec, try_start).await,
        };
        let done = Instant::now();
        // The grpc-status header is read once, and only for gRPC requests: for the class, the
        // retry decision and the record.
        let (class, grpc_code) = match &outcome {
            Try::Response(r) => {
                ep.observe_latency(done.saturating_duration_since(try_start), done);
                let code = if grpc { grpc_status(r.headers()) } else { None };
                let class = code.map_or_else(
                    || FailureClass::from_status(r.status().as_u16()),
                    FailureClass::from_grpc,
                );
                (class, code)
            }
            Try::Failed(c, _) => (*c, None),
        };
        let deadline_passed = deadline.is_some_and(|d| done >= d);
        let can_retry = plan
            .retry
            .is_some_and(|r| retry_wanted(r, &outcome, grpc_code))
            && attempt + 1 < max_tries
            && !deadline_passed
            && (empty || replay.as_ref().is_some_and(Replay::can_replay));
        if can_retry {
            if cluster.budget.withdraw(done) {
                cluster.report(&ep, class);
                count_retry(shared, &cluster, "sent");
                let b = backoff(plan.retry.map_or(Duration::ZERO, |r| r.backoff), attempt);
                let b = deadline.map_or(b, |d| b.min(d.saturating_duration_since(Instant::now())));
                tokio::time::sleep(b).await;
                if let Try::Failed(c, d) = outcome {
                    last_failure = Some((c, d));
                }
                continue;
            }
            count_retry(shared, &cluster, "budget_exhausted");
            rec.detail = Some("retry budget exhausted".into());
        }
        match outcome {
            Try::Failed(c, d) => {
                cluster.report(&ep, c);
                last_failure = Some((c, d));
                break;
            }
            Try::Response(resp) => {
                rec.first_byte = Some(done.saturating_duration_since(rec.start));
                rec.class = class;
                rec.grpc_status = grpc_code;
                rec.guards = Some((in_flight, permit));
                // Outlier detection sees the final outcome once the body ends, so that a
                // reset mid-body counts too.
                rec.report_to = Some((cluster.clone(), ep.clone()));
                return relay(resp, rec, plan.response_headers);
            }
        }
    }
    let (class, detail) = last_failure.unwrap_or_else(|| {
        let detail = format!("cluster {} has no healthy endpoint", cluster.key);
        (FailureClass::NoHealthyUpstream, detail)
    });
    drop(permit);
    local_reply(rec, class, detail, grpc)
}

/// The upstream's response on its way to the client: hop-by-hop headers out, the route's
/// edits applied, and the record completed when the body ends.
fn relay(
    resp: Response<UpstreamBody>,
    mut rec: Box<Record>,
    edits: Option<&HeaderEdits>,
) -> Response<ProxyBody> {
    rec.status = resp.status().as_u16();
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(e) = edits {
        edit_headers(&mut parts.headers, e);
    }
    Response::from_parts(parts, ProxyBody::upstream(body).with_on_end(rec))
}

fn count_retry(shared: &Shared, cluster: &Cluster, outcome: &'static str) {
    let labels = crate::metrics::RetryLabels {
        cluster: cluster.key.clone(),
        outcome,
    };
    shared.metrics.retries.get_or_create(&labels).inc();
}

/// Forward an HTTP/1.1 Upgrade (e.g. WebSocket) on a dedicated connection, then splice the
/// two upgraded streams.
pub async fn upgrade(
    shared: &Shared,
    cluster: Arc<Cluster>,
    mut req: Request<ClientBody>,
    mut rec: Box<Record>,
) -> Response<ProxyBody> {
    let Some(ep) = cluster.pick(rec.start) else {
        return local_reply(
            rec,
            FailureClass::NoHealthyUpstream,
            format!("cluster {} has no healthy endpoint", cluster.key),
            false,
        );
    };
    rec.attempts = 1;
    rec.set_endpoint(&ep);
    let client_upgrade = super::upgrade::on(&mut req);
    let ctx = cluster.connect_ctx(shared);
    let start = Instant::now();
    let mut conn = match ep.pool.connect_h1(&ctx).await {
        Ok(c) => c,
        Err(e) => return local_reply(rec, e.class(), e.to_string(), false),
    };
    rec.connect = Some(start.elapsed());
    // The upgrade handshake is hop-by-hop by nature: Connection and Upgrade stay as sent.
    let (mut parts, body) = req.into_parts();
    let mut up = upstream_request(&mut parts, UpBody::Incoming(body), false, true);
    let head = match h1::exchange(&mut conn, &mut up).await {
        Ok(h) => h,
        Err(e) => {
            let detail = format!("request to {} failed: {e}", ep.cfg.addr);
            return local_reply(rec, e.class(), detail, false);
        }
    };
    rec.first_byte = Some(rec.start.elapsed());
    rec.status = head.status.as_u16();
    rec.class = FailureClass::from_status(rec.status);
    let mut resp = if head.status == StatusCode::SWITCHING_PROTOCOLS {
        let (mut upstream, early, slot) = h1::into_upgraded(*conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Ok(mut client) = client_upgrade.wait().await {
                // What the server sent right after its 101 was read with the head.
                if early.is_empty() || client.write_all(&early).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            }
        });
        Response::new(ProxyBody::full(Bytes::new()).with_on_end(rec))
    } else {
        let body = H1Body::new(&head, conn, ep.clone(), rec.start);
        Response::new(ProxyBody::upstream(UpstreamBody::H1(body)).with_on_end(rec))
    };
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_index_agrees_with_the_list() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(n.as_str()), Some(i), "{n}");
        }
        assert_eq!(hop_by_hop_index("content-length"), None);
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = map(&[("host", "a"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["accept", "host"]);

        let mut h = map(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("x", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x"]);

        let mut h = map(&[
            ("connection", "x-hop, Upgrade"),
            ("x-hop", "1"),
            ("upgrade", "ws"),
            ("y", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["y"]);

        let mut h = map(&[("connection", "close"), ("close", "odd"), ("y", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["y"]);

        let mut h = map(&[
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "x"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["te"]);
        assert_eq!(h["te"], "trailers");

        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }
}
