//! Stage `attempt`: the tries of one request to one cluster. Each try picks an endpoint
//! (stage `balance`), checks a connection out of its pool and exchanges the request, within
//! the per-try timeout, the route's deadline and the idle timeout. A failed try is retried
//! when the route asks for it, the failure allows it (the error says whether it may be
//! retried; a peer proxy's own answer counts as its class), the body can be sent again and
//! the cluster's retry budget has room, after a jittered back-off and on another endpoint if
//! one is usable. A try that never left (no connection could be had: refused, timed out, a
//! failed handshake, a connection closing) is tried once more elsewhere at once, with or
//! without a retry policy and outside the budget, with its body untouched.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use trellis_model::proxy::{FaultConfig, HeaderEdits, RetryConfig};

use crate::{
    cluster::{Cluster, Endpoint},
    error::{Error, FailureClass, Kind},
    h1::{self, H1Body},
    http::{
        body::{ClientBody, Limits, ProxyBody, Replay, UpBody, UpstreamBody},
        headers::response_grpc_status,
        upgrade, TRACEPARENT, X_TRELLIS_PEER,
    },
    metrics::RetryLabels,
    pool::{ConnectCtx, Dialer, ForUpgrade},
    stages::{
        balance,
        exchange::{exchange_failed, peer_answer, send_once, upstream_request, Sent, Try, Unsent},
        fault, mirror,
        record::Record,
        respond::{local_reply, relay},
    },
};

/// Largest request body kept for replay; bigger bodies are streamed and not retried.
const REPLAY_CAP: usize = 64 * 1024;
// A mirrored body is the one recorded for retries: a chunked one that outgrew this cap is
// not copied, so the mirrors' cap cannot be larger.
const _: () = assert!(mirror::BODY_CAP <= REPLAY_CAP);
const BACKOFF_CAP: Duration = Duration::from_secs(1);

/// What the route asks of this exchange.
pub(crate) struct Plan<'a> {
    /// The cluster.
    pub(crate) cluster: Arc<Cluster>,
    /// Deadline of the whole exchange, the response body included.
    pub(crate) timeout: Option<Duration>,
    /// Longest wait for the response head, and between two parts of the response body.
    pub(crate) idle: Option<Duration>,
    /// Retries.
    pub(crate) retry: Option<&'a RetryConfig>,
    /// Response header edits; `None` when there are none (an upstream's raw lines are then
    /// not read into a map for them: `h1::raw`).
    pub(crate) response_headers: Option<&'a HeaderEdits>,
    /// `x-trellis-peer` for tries that go to a peer's proxy.
    pub(crate) peer_header: Option<&'a HeaderValue>,
    /// Faults to inject into each try.
    pub(crate) faults: &'a [FaultConfig],
    /// Mirrors that came up for this request (rolled by the route stage).
    pub(crate) mirror_to: Vec<Arc<Cluster>>,
}

/// Whether the route's retry policy wants another try after `t`. `grpc` is the response's
/// grpc-status and `peer` the class a peer's proxy gave its own answer, read once by the
/// caller.
fn retry_wanted(
    retry: &RetryConfig,
    t: &Try,
    grpc: Option<u32>,
    peer: Option<FailureClass>,
) -> bool {
    match t {
        // An injected abort is retried as the status it stands for would be.
        Try::Failed(e) => match e.kind() {
            Kind::Injected {
                status, grpc: code, ..
            } => {
                // (A GRPCRoute's retry policy names gRPC codes, an HTTPRoute's statuses.)
                e.retryable() || retry.codes.contains(&status) || retry.grpc_codes.contains(&code)
            }
            _ => e.retryable(),
        },
        Try::Response(r) => {
            peer.is_some_and(crate::error::peer_retryable)
                || retry.codes.contains(&r.status().as_u16())
                || grpc.is_some_and(|c| retry.grpc_codes.contains(&c))
        }
    }
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.min(10)).min(BACKOFF_CAP);
    // Full jitter.
    ceiling.mul_f64(fastrand::f64())
}

/// The wait a try may take for its response head: the per-try timeout, the time left until
/// the route's deadline and the idle timeout, whichever is shortest; with the kind of
/// failure its expiry is.
fn try_limit(
    per_try: Option<Duration>,
    remaining: Option<Duration>,
    idle: Option<Duration>,
) -> Option<(Duration, Kind)> {
    let timeout = match (per_try, remaining) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match (timeout, idle) {
        (Some(t), Some(i)) if i < t => Some((i, Kind::Idle)),
        (Some(t), _) => Some((t, Kind::Timeout)),
        (None, Some(i)) => Some((i, Kind::Idle)),
        (None, None) => None,
    }
}

/// Forward `client` (the request as the client sent it; its body and, for the last try, its
/// headers are taken) as `plan` says, and build the response for the client.
pub(crate) async fn forward(
    dialer: &Arc<Dialer>,
    plan: Plan<'_>,
    client: &mut Request<ClientBody>,
    mut rec: Box<Record>,
    grpc: bool,
) -> Response<ProxyBody> {
    let cluster = plan.cluster;
    let deadline = plan.timeout.map(|t| rec.start + t);
    // HTTP/2 for an HTTP/2 cluster; anything else goes as HTTP/1.1, to a peer's proxy on a
    // stream of its one connection (`pool::Pool::connect`).
    let h2 = cluster.http2();
    cluster.budget.deposit(rec.start);
    let permit = match balance::admit(&cluster).await {
        Ok(p) => p,
        Err(e) => return local_reply(rec, &e, grpc),
    };
    let ctx = cluster.connect_ctx(dialer);
    let body = std::mem::replace(client.body_mut(), ClientBody::Empty);
    let small = body
        .size_hint()
        .upper()
        .is_none_or(|n| n as usize <= REPLAY_CAP);
    let mut replay = None;
    // No body at all: nothing to record, every try sends none, and a stale pooled connection
    // may send it again.
    let empty = body.is_end_stream();
    let mut mirror_to = plan.mirror_to;
    let mirror_head = if mirror_to.is_empty() {
        None
    } else if empty
        || body
            .size_hint()
            .upper()
            .is_none_or(|n| n as usize <= mirror::BODY_CAP)
    {
        // A body of a length not told (chunked) is recorded as it streams to the primary,
        // up to the cap, and copied only if it ended within it (`mirror_all`).
        Some(mirror::Head {
            method: client.method().clone(),
            uri: client.uri().clone(),
            headers: client.headers().clone(),
        })
    } else {
        // Over the mirrors' body cap: not mirrored.
        skip_mirrors(dialer, &cluster, &mut mirror_to, &rec);
        None
    };
    let mirrored = mirror_head.is_some();
    let mut first = Some(match plan.retry {
        _ if empty => UpBody::Empty,
        _ if small && (plan.retry.is_some() || mirrored) => {
            let r = Replay::new(body, REPLAY_CAP);
            replay = r.replay();
            UpBody::Replay(r)
        }
        _ => UpBody::Incoming(body),
    });
    let mut max_tries = 1 + plan.retry.map_or(0, |r| r.attempts);
    // A request that never left (no connection could be had) gets one more try elsewhere,
    // with or without a retry policy: nothing reached the upstream, so any method is safe to
    // send again, and an endpoint that just went away (a drained proxy) costs no failure.
    let mut unsent_retry = true;
    let mut next_attempt = 0;
    // Built only when a try fails: formatting an error on every request costs.
    let mut last_failure: Option<Error> = None;
    // The endpoint of the previous try: a retry goes elsewhere if it can.
    let mut last_ep: Option<Arc<Endpoint>> = None;
    while next_attempt < max_tries {
        let attempt = next_attempt;
        next_attempt += 1;
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
        let ep = match balance::pick(&cluster, try_start, last_ep.as_ref()) {
            Ok(ep) => ep,
            Err(e) => {
                last_failure = Some(e);
                break;
            }
        };
        rec.attempts = attempt + 1;
        rec.set_endpoint(&ep);
        last_ep = Some(ep.clone());
        let in_flight = ep.start();
        let limit = try_limit(
            plan.retry.and_then(|r| r.per_try_timeout),
            deadline.map(|d| d.saturating_duration_since(try_start)),
            plan.idle,
        );
        let mut req = upstream_request(client, body, h2, attempt + 1 == max_tries);
        if attempt > 0 {
            // A retry is a span of its own: the next hop sees it as its parent.
            let tp = rec.begin_try(try_start.saturating_duration_since(rec.start));
            req.headers_mut().insert(TRACEPARENT.clone(), tp);
        }
        if let (true, Some(v)) = (ep.via_peer_proxy(), plan.peer_header) {
            req.headers_mut().insert(X_TRELLIS_PEER.clone(), v.clone());
        }
        let outcome = match plan.faults {
            [] => send_once(&ctx, &ep, &mut req, h2, &mut rec.connect, try_start, limit).await,
            faults => match fault::roll(faults, fault::draw) {
                None => {
                    send_once(&ctx, &ep, &mut req, h2, &mut rec.connect, try_start, limit).await
                }
                Some(f) => {
                    count_faults(dialer, &rec, f);
                    Box::pin(faulty_try(
                        f, &ctx, &ep, &mut req, h2, &mut rec, limit, grpc,
                    ))
                    .await
                }
            },
        };
        let done = Instant::now();
        let outcome = match outcome {
            Ok(t) => t,
            Err(Unsent { error: e }) if unsent_retry && deadline.is_none_or(|d| done < d) => {
                unsent_retry = false;
                cluster.report(&ep, e.class());
                rec.end_try(done.saturating_duration_since(rec.start), e.class(), 0);
                count_retry(dialer, &cluster, "unsent");
                // The request as it was: its headers (the last try took them), its body.
                let (up, body) = req.into_parts();
                let headers = client.headers_mut();
                *headers = up.headers;
                headers.remove(&X_TRELLIS_PEER);
                if let (false, Some(a)) =
                    (headers.contains_key(http::header::HOST), up.uri.authority())
                {
                    if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                        headers.insert(http::header::HOST, v);
                    }
                }
                first = Some(body);
                max_tries = max_tries.max(attempt + 2);
                last_failure = Some(e);
                continue;
            }
            Err(u) => Try::Failed(u.error),
        };
        // The grpc-status header is read once, and only for gRPC requests; a peer proxy's
        // own answer keeps the class it gave it.
        let (class, grpc_code, peer) = match &outcome {
            Try::Response(r) => {
                ep.observe_latency(done.saturating_duration_since(try_start), done);
                let peer = peer_answer(&ep, r);
                let code = if grpc { response_grpc_status(r) } else { None };
                let class = peer.unwrap_or_else(|| {
                    code.map_or_else(
                        || FailureClass::from_status(r.status().as_u16()),
                        FailureClass::from_grpc,
                    )
                });
                (class, code, peer)
            }
            Try::Failed(e) => (e.class(), None, None),
        };
        let deadline_passed = deadline.is_some_and(|d| done >= d);
        let can_retry = plan
            .retry
            .is_some_and(|r| retry_wanted(r, &outcome, grpc_code, peer))
            && attempt + 1 < max_tries
            && !deadline_passed
            && (empty || replay.as_ref().is_some_and(Replay::can_replay));
        if can_retry {
            if cluster.budget.withdraw(done) {
                cluster.report(&ep, class);
                let status = match &outcome {
                    Try::Response(r) => r.status().as_u16(),
                    Try::Failed(_) => 0,
                };
                rec.end_try(done.saturating_duration_since(rec.start), class, status);
                count_retry(dialer, &cluster, "sent");
                let b = backoff(plan.retry.map_or(Duration::ZERO, |r| r.backoff), attempt);
                let b = deadline.map_or(b, |d| b.min(d.saturating_duration_since(Instant::now())));
                tokio::time::sleep(b).await;
                if let Try::Failed(e) = outcome {
                    last_failure = Some(e);
                }
                continue;
            }
            count_retry(dialer, &cluster, "budget_exhausted");
            rec.detail = Some("retry budget exhausted".into());
        }
        if let Some(head) = &mirror_head {
            let status = match &outcome {
                Try::Response(r) => r.status().as_u16(),
                Try::Failed(e) => e.status(),
            };
            let primary = mirror::Primary {
                status,
                first_byte: done.saturating_duration_since(try_start),
            };
            mirror_all(
                dialer,
                &cluster,
                &mut mirror_to,
                head,
                empty,
                replay.as_ref(),
                &rec,
                plan.peer_header,
                primary,
            );
        }
        match outcome {
            Try::Failed(e) => {
                cluster.report(&ep, e.class());
                last_failure = Some(e);
                break;
            }
            Try::Response(resp) => {
                rec.first_byte = Some(done.saturating_duration_since(rec.start));
                rec.class = class;
                rec.grpc_status = grpc_code;
                if let Some(c) = peer {
                    let who = ep.pool.describe(ep.target);
                    rec.fail(&Error::new(
                        Kind::PeerProxy(c),
                        format!("{who} answered {c}"),
                    ));
                }
                rec.guards = Some((in_flight, permit));
                // Outlier detection sees the final outcome once the body ends, so that a
                // reset mid-body counts too.
                rec.report_to = Some((cluster.clone(), ep.clone()));
                let limits = Limits::new(
                    deadline.zip(plan.timeout).map(|(d, t)| (d.into(), t)),
                    plan.idle,
                );
                return relay(
                    resp,
                    rec,
                    plan.response_headers,
                    limits,
                    ep.via_peer_proxy(),
                );
            }
        }
    }
    // No try came to an end (no endpoint, or a body that cannot be sent again): the copies
    // are not sent, and say so.
    skip_mirrors(dialer, &cluster, &mut mirror_to, &rec);
    let e = last_failure.unwrap_or_else(|| {
        Error::new(
            Kind::NoEndpoint,
            format!("cluster {} has no healthy endpoint", cluster.key),
        )
    });
    drop(permit);
    local_reply(rec, &e, grpc)
}

/// Count the copies left in `to` as skipped (and empty it).
fn skip_mirrors(dialer: &Dialer, cluster: &Cluster, to: &mut Vec<Arc<Cluster>>, rec: &Record) {
    if to.is_empty() {
        return;
    }
    let (route, service) = (rec.route.as_str(), cluster.cfg.service.to_string());
    for c in to.drain(..) {
        dialer.metrics.mirrors.skipped(route, &service, &c.key);
    }
}

/// Send the copies of a request whose last try ended as `primary` says (once: the list is
/// emptied), each with the body recorded whole; without it they are skipped.
#[allow(clippy::too_many_arguments)]
fn mirror_all(
    dialer: &Arc<Dialer>,
    cluster: &Cluster,
    to: &mut Vec<Arc<Cluster>>,
    head: &mirror::Head,
    empty: bool,
    replay: Option<&Replay>,
    rec: &Record,
    peer_header: Option<&HeaderValue>,
    primary: mirror::Primary,
) {
    // The body, if any, must have been read whole and kept.
    let replay = replay.filter(|r| r.complete());
    if !empty && replay.is_none() {
        return skip_mirrors(dialer, cluster, to, rec);
    }
    let route: Arc<str> = rec.route.as_str().into();
    let service = cluster.cfg.service.to_string();
    for c in to.drain(..) {
        let body = match replay.and_then(Replay::replay) {
            Some(r) => UpBody::Replay(r),
            None => UpBody::Empty,
        };
        mirror::send(
            dialer,
            c,
            route.clone(),
            service.clone(),
            head,
            body,
            peer_header.cloned(),
            primary,
        );
    }
}

/// A try with faults injected: held for the delay (within its time limit, which a longer
/// delay exhausts as a slow upstream would), then aborted or sent.
#[allow(clippy::too_many_arguments)]
async fn faulty_try(
    f: fault::Rolled,
    ctx: &ConnectCtx<'_>,
    ep: &Arc<Endpoint>,
    req: &mut Request<UpBody>,
    h2: bool,
    rec: &mut Record,
    limit: Option<(Duration, Kind)>,
    grpc: bool,
) -> Sent {
    if !f.delay.is_zero() {
        if let Some((l, _)) = limit.filter(|(l, _)| *l <= f.delay) {
            // The try times out as it would behind a slow upstream, but the class says
            // whose doing it was.
            tokio::time::sleep(l).await;
            rec.injected += l;
            return Ok(Try::Failed(Error::new(
                Kind::Injected {
                    status: 504,
                    grpc: 4,
                    timeout: true,
                },
                format!(
                    "fault injected by the route: a delay of {:?} outlasted the try's {l:?}",
                    f.delay
                ),
            )));
        }
        tokio::time::sleep(f.delay).await;
        rec.injected += f.delay;
        if rec.detail.is_none() {
            rec.detail = Some(format!("injected delay of {:?}", f.delay));
        }
    }
    if let Some((status, code)) = f.abort {
        let what = if grpc {
            format!("gRPC status {code}")
        } else {
            format!("status {status}")
        };
        return Ok(Try::Failed(Error::new(
            Kind::Injected {
                status,
                grpc: code,
                timeout: false,
            },
            format!("fault injected by the route: {what}"),
        )));
    }
    let limit = limit.map(|(l, kind)| (l.saturating_sub(f.delay), kind));
    send_once(ctx, ep, req, h2, &mut rec.connect, Instant::now(), limit).await
}

fn count_faults(dialer: &Dialer, rec: &Record, f: fault::Rolled) {
    for (fault, on) in [("delay", !f.delay.is_zero()), ("abort", f.abort.is_some())] {
        if on {
            let labels = crate::metrics::FaultLabels {
                route: rec.route.as_str().to_string(),
                fault,
            };
            dialer.metrics.faults.get_or_create(&labels).inc();
        }
    }
}

fn count_retry(dialer: &Dialer, cluster: &Cluster, outcome: &'static str) {
    let labels = RetryLabels {
        cluster: cluster.key.clone(),
        outcome,
    };
    dialer.metrics.retries.get_or_create(&labels).inc();
}

/// Forward an HTTP/1.1 Upgrade (e.g. WebSocket) on a dedicated connection, then splice the
/// two upgraded streams.
pub(crate) async fn upgrade(
    dialer: &Dialer,
    cluster: Arc<Cluster>,
    mut req: Request<ClientBody>,
    mut rec: Box<Record>,
) -> Response<ProxyBody> {
    let ep = match balance::pick(&cluster, rec.start, None) {
        Ok(ep) => ep,
        Err(e) => return local_reply(rec, &e, false),
    };
    rec.attempts = 1;
    rec.set_endpoint(&ep);
    let client_upgrade = upgrade::on(&mut req);
    let ctx = cluster.connect_ctx(dialer);
    let start = Instant::now();
    let conn = match ep.pool.connect_upgrade(&ctx).await {
        Ok(c) => c,
        Err(e) => return local_reply(rec, &e, false),
    };
    rec.connect = Some(start.elapsed());
    // The upgrade handshake is hop-by-hop by nature: Connection and Upgrade stay as sent.
    let body = std::mem::replace(req.body_mut(), ClientBody::Empty);
    let mut up = upstream_request(&mut req, UpBody::Incoming(body), false, true);
    let mut conn = match conn {
        ForUpgrade::Plain(conn) => conn,
        ForUpgrade::Peer(tls, permit) => {
            return via_peer(&ep, *tls, permit, up, client_upgrade, rec).await;
        }
    };
    let head = match h1::exchange(&mut conn, &mut up, h1::Wait::Forever, rec.start).await {
        Ok(h) => h,
        Err(e) => return local_reply(rec, &exchange_failed(&ep, e), false),
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
        let body = H1Body::new(&head, conn, ep.pool.idle().clone(), rec.start);
        Response::new(
            ProxyBody::upstream(UpstreamBody::H1(body), Limits::default()).with_on_end(rec),
        )
    };
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers.into_map(http::HeaderMap::new());
    resp
}

/// An upgrade to an endpoint behind a peer proxy: the request as it came, over mutual TLS
/// (ALPN `http/1.1`) on a connection of its own, read with hyper's HTTP/1.1 client; on 101,
/// the two switched streams are spliced.
async fn via_peer(
    ep: &Endpoint,
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    permit: tokio::sync::OwnedSemaphorePermit,
    up: Request<UpBody>,
    client_upgrade: upgrade::OnUpgrade,
    mut rec: Box<Record>,
) -> Response<ProxyBody> {
    let failed = |why: &str, e: hyper::Error| {
        Error::with_cause(
            Kind::Exchange,
            format!("{why} {}", ep.pool.describe(ep.target)),
            e,
        )
    };
    let (mut send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
        Ok(c) => c,
        Err(e) => return local_reply(rec, &failed("HTTP/1.1 with", e), false),
    };
    // The connection lives until the switched streams (or the refusal's body) end.
    tokio::spawn(async move {
        let _permit = permit;
        let _ = conn.with_upgrades().await;
    });
    let mut resp = match send.send_request(up).await {
        Ok(r) => r,
        Err(e) => return local_reply(rec, &failed("the upgrade request to", e), false),
    };
    rec.first_byte = Some(rec.start.elapsed());
    rec.status = resp.status().as_u16();
    // A refusal by the peer's proxy itself (its authorization, its application down) keeps
    // the class that proxy gave it.
    rec.class = peer_answer(ep, &resp).unwrap_or_else(|| FailureClass::from_status(rec.status));
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = resp.into_parts();
        let mut out = Response::new(
            ProxyBody::upstream(UpstreamBody::Hyper(body), Limits::default()).with_on_end(rec),
        );
        *out.status_mut() = parts.status;
        *out.headers_mut() = parts.headers;
        return out;
    }
    let switched = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (Ok(upstream), Ok(mut client)) = (switched.await, client_upgrade.wait().await) else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut client, &mut TokioIo::new(upstream)).await;
    });
    let mut out = Response::new(ProxyBody::full(Bytes::new()).with_on_end(rec));
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = std::mem::take(resp.headers_mut());
    out
}

#[cfg(test)]
mod tests;
