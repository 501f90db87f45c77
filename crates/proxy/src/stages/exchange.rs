//! Stage `exchange`: one try's exchange with one endpoint, for [`super::attempt`]'s tries and
//! [`super::mirror`]'s copies: a connection from the endpoint's pool (or a new one), the
//! request sent, the response head read within the try's time limit. An HTTP/1.1 request
//! that meets a pooled connection the server just closed is sent once more on a fresh one.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use http::{
    header,
    uri::{Authority, Scheme},
    HeaderValue, Request, Response, StatusCode, Uri, Version,
};

use crate::{
    cluster::Endpoint,
    error::{Error, Kind},
    h1::{self, Conn, H1Body, H1Error},
    h2_client::H2Sender,
    http::body::{UpBody, UpstreamBody},
    pool::{ConnectCtx, Sender},
};

/// The request for one try of `from` (whose body was taken: `body`). `last` says no try
/// follows, so the headers can be moved rather than copied. URI parts are `Bytes`-backed:
/// cloning them does not copy.
pub(crate) fn upstream_request<B>(
    from: &mut Request<B>,
    body: UpBody,
    h2: bool,
    last: bool,
) -> Request<UpBody> {
    let mut req = Request::new(body);
    *req.method_mut() = from.method().clone();
    *req.headers_mut() = if last {
        std::mem::take(from.headers_mut())
    } else {
        from.headers().clone()
    };
    let path = crate::http::origin_form(from.uri());
    let mut uri = http::uri::Parts::default();
    uri.path_and_query = Some(path);
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        h2_target(req.headers_mut(), from.uri().authority().cloned(), &mut uri);
    } else {
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            if let Some(v) = from
                .uri()
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
pub(crate) enum Try {
    Response(Response<UpstreamBody>),
    Failed(Error),
}

/// A try whose request never left: no connection could be had (refused, timed out, a TLS or
/// HTTP/2 handshake failed, or it closed before the request went). The request is left with
/// the caller, body untouched, for a try elsewhere.
pub(crate) struct Unsent {
    pub(crate) error: Error,
}

/// What one try came to, or that its request did not leave.
pub(crate) type Sent = Result<Try, Unsent>;

fn unsent(error: Error) -> Sent {
    Err(Unsent { error })
}

/// One try: a connection from the pool (or a new one), the request sent, the response head
/// read, all within `limit` (its length, and whether it is the idle timeout); `connect` set
/// to the time a new connection took. The request is borrowed, not moved into the try's
/// future (it is 248 bytes, and each move is a copy): it is left as it was if it did not
/// leave ([`Unsent`]); once sent, only its head is left.
pub(crate) async fn send_once(
    ctx: &ConnectCtx<'_>,
    ep: &Arc<Endpoint>,
    req: &mut Request<UpBody>,
    h2: bool,
    connect: &mut Option<Duration>,
    began: Instant,
    limit: Option<(Duration, Kind)>,
) -> Sent {
    let within = limit.map(|l| l.0);
    let (sender, took) = match ep.pool.checkout(h2, ctx, began, within).await {
        Ok(s) => s,
        Err(e) => return unsent(e),
    };
    *connect = Some(took);
    match sender {
        Sender::H1(conn) => send_h1(ep, conn, req, ctx, connect, began, limit).await,
        Sender::H2(s) => {
            // HTTP/1.1 for a peer's proxy that takes only HTTP/2 (one older than this).
            if !h2 {
                as_h2(req);
            }
            match limit {
                Some((l, kind)) => tokio::time::timeout(l, send_h2(ep, s, req))
                    .await
                    .unwrap_or_else(|_| Ok(Try::Failed(timed_out(ep, l, kind)))),
                None => send_h2(ep, s, req).await,
            }
        }
    }
}

/// An HTTP/2 request's target: `authority` (the client's, when its request had one), else
/// the `Host` header (taken out: HTTP/2 carries it as `:authority`), else `upstream`; the
/// scheme `http`.
fn h2_target(
    headers: &mut http::HeaderMap,
    authority: Option<Authority>,
    uri: &mut http::uri::Parts,
) {
    let host = headers.remove(header::HOST);
    let authority = authority.or_else(|| {
        host.and_then(|h| {
            Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(h.as_bytes())).ok()
        })
    });
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority.unwrap_or_else(|| Authority::from_static("upstream")));
}

/// A request made for HTTP/1.1 ([`upstream_request`]), made over for HTTP/2: its `Host`
/// becomes the URI's authority.
fn as_h2(req: &mut Request<UpBody>) {
    *req.version_mut() = Version::HTTP_2;
    let mut uri = std::mem::take(req.uri_mut()).into_parts();
    h2_target(req.headers_mut(), None, &mut uri);
    *req.uri_mut() = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
}

pub(crate) fn exchange_failed(ep: &Endpoint, cause: impl Into<crate::error::BoxError>) -> Error {
    Error::with_cause(
        Kind::Exchange,
        format!("request to {}", ep.pool.describe(ep.target)),
        cause,
    )
}

async fn send_h2(ep: &Endpoint, s: H2Sender, req: &mut Request<UpBody>) -> Sent {
    // HTTP/2 takes the request whole; an empty one stands in for it meanwhile.
    let sent = std::mem::replace(req, Request::new(UpBody::Empty));
    match s.send(sent).await {
        Ok(r) => Ok(Try::Response(r.map(UpstreamBody::H2))),
        // The connection closed (a draining peer's GOAWAY) before a stream was opened for it:
        // the request is put back as it went.
        Err(e) => match e.unsent {
            Some(back) => {
                *req = back;
                unsent(exchange_failed(ep, e.error))
            }
            None => Ok(Try::Failed(exchange_failed(ep, e.error))),
        },
    }
}

/// One HTTP/1.1 exchange. A pooled connection may have been closed by the server just as we
/// picked it; an idempotent request is then sent once more on a fresh connection.
async fn send_h1(
    ep: &Arc<Endpoint>,
    mut conn: Box<Conn>,
    req: &mut Request<UpBody>,
    ctx: &ConnectCtx<'_>,
    connect: &mut Option<Duration>,
    began: Instant,
    limit: Option<(Duration, Kind)>,
) -> Sent {
    // The connection's own timer bounds the wait: no timer is made per request.
    let wait = match limit {
        None => h1::Wait::Forever,
        Some((l, Kind::Idle)) => h1::Wait::Idle(l),
        Some((l, _)) => h1::Wait::Until(began + l),
    };
    let mut result = h1::exchange(&mut conn, req, wait, began).await;
    if let Err(e) = &result {
        if conn.is_reused() && prepare_resend(e, req) {
            drop(conn);
            let start = Instant::now();
            // Boxed for the same reason as in `Pool::checkout`.
            conn = match Box::pin(ep.pool.connect_h1(ctx)).await {
                Ok(c) => c,
                // Ready to be sent again, and not sent on a new connection.
                Err(e) => return unsent(e),
            };
            *connect = Some(start.elapsed());
            result = h1::exchange(&mut conn, req, wait, began).await;
        }
    }
    // Sent: its header map serves the next request this thread parses.
    crate::http::spare::keep(req.headers_mut());
    Ok(match result {
        Ok(head) if head.status == StatusCode::SWITCHING_PROTOCOLS => Try::Failed(Error::new(
            Kind::Protocol,
            format!("{} switched protocols unasked", ep.pool.describe(ep.target)),
        )),
        Ok(head) => {
            // The lines stay as they came, carried by the body, until a stage needs a map
            // (`h1::raw`).
            let body = H1Body::new(&head, conn, ep.pool.idle().clone(), began);
            let mut resp = Response::new(UpstreamBody::H1(body.with_lines(head.headers)));
            *resp.status_mut() = head.status;
            Try::Response(resp)
        }
        Err(H1Error::TimedOut) => {
            let (l, kind) = limit.unwrap_or((Duration::ZERO, Kind::Timeout));
            Try::Failed(timed_out(ep, l, kind))
        }
        Err(e) => Try::Failed(exchange_failed(ep, e)),
    })
}

/// After a pooled connection failed with `err`, make `req` ready to be sent again on a fresh
/// one: only when the connection had simply gone stale, the method is idempotent and the body
/// can be sent again.
pub(crate) fn prepare_resend(err: &H1Error, req: &mut Request<UpBody>) -> bool {
    if !err.is_stale() || !h1::idempotent(req.method()) {
        return false;
    }
    let again = match std::mem::replace(req.body_mut(), UpBody::Empty) {
        UpBody::Empty => Some(UpBody::Empty),
        UpBody::Replay(r) => r.replay().map(UpBody::Replay),
        UpBody::Incoming(_) => None,
    };
    match again {
        Some(body) => {
            *req.body_mut() = body;
            true
        }
        None => false,
    }
}

pub(crate) fn timed_out(ep: &Endpoint, limit: Duration, kind: Kind) -> Error {
    let who = ep.pool.describe(ep.target);
    let msg = match kind {
        Kind::Idle => format!(
            "no response from {who} within {limit:?} (the idle timeout; a route's \
             timeouts.request replaces it)"
        ),
        _ => format!("no response from {who} within {limit:?}"),
    };
    Error::new(kind, msg)
}

/// The class a peer's proxy gave its own answer (`x-trellis-failure`), believed only from
/// an endpoint reached at its proxy.
pub(crate) fn peer_answer<B: crate::h1::raw::Lines>(
    ep: &Endpoint,
    resp: &Response<B>,
) -> Option<crate::error::FailureClass> {
    if ep.via_peer_proxy() {
        super::respond::peer_class(resp)
    } else {
        None
    }
}
