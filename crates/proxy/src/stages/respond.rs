//! Stage `respond`: the response the client gets. Either the proxy answers itself for a
//! failure (the class in `x-trellis-failure`; for gRPC a trailers-only response with a
//! proper `grpc-status`), or it relays the upstream's response with hop-by-hop headers out
//! and the route's edits in, completing the record when the body ends.
//!
//! Either way the proxy appends its RFC 9209 `Proxy-Status` entry ([`proxy_status`]).
//!
//! `x-trellis-failure` means "a Trellis proxy made this answer": it is relayed only from a
//! peer's proxy (reached by mutual TLS) and removed from what an application sends, so that
//! a caller can trust it and keep the peer's class across hops.

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use trellis_model::proxy::HeaderEdits;

use crate::{
    error::{Error, FailureClass, Kind},
    h1::raw::{self, Lines},
    http::{
        body::{Limits, ProxyBody, UpstreamBody},
        headers::{edit_headers, strip_response_headers},
        proxy_status, GRPC_MESSAGE, GRPC_STATUS, X_TRELLIS_FAILURE,
    },
    stages::record::Record,
};

/// The proxy's own answer for `e`.
pub(crate) fn local_reply(mut rec: Box<Record>, e: &Error, grpc: bool) -> Response<ProxyBody> {
    rec.fail(e);
    let class = e.class();
    let code = match e.kind() {
        Kind::Injected { grpc, .. } => grpc,
        Kind::UnresolvedBackend => 14, // UNAVAILABLE
        _ => class.grpc_status(),
    };
    if grpc {
        rec.grpc_status = Some(code);
    }
    let detail = rec.detail.as_deref().unwrap_or_default();
    let mut resp = if grpc {
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
        *r.status_mut() =
            http::StatusCode::from_u16(e.status()).unwrap_or(http::StatusCode::BAD_GATEWAY);
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
    proxy_status::append_error(
        resp.headers_mut(),
        class,
        rec.upstream,
        rec.detail.as_deref(),
    );
    rec.status = resp.status().as_u16();
    if let Some(h) = rec.tap_headers.as_mut() {
        h[1] = resp.headers().clone();
    }
    resp.map(|b| b.with_on_end(rec))
}

/// The class a peer's proxy gave its own answer, from `x-trellis-failure`.
pub(crate) fn peer_class<B: Lines>(resp: &Response<B>) -> Option<FailureClass> {
    let v = raw::get(resp, &X_TRELLIS_FAILURE)?;
    FailureClass::from_bytes(v).filter(|c| *c != FailureClass::Ok)
}

/// The upstream's response on its way to the client: hop-by-hop headers out (and a
/// `x-trellis-failure` that did not come from a peer's proxy), the route's edits applied,
/// `limits` running while the body streams, and the record completed when the body ends.
pub(crate) fn relay(
    resp: Response<UpstreamBody>,
    mut rec: Box<Record>,
    edits: Option<&HeaderEdits>,
    limits: Limits,
    from_peer: bool,
) -> Response<ProxyBody> {
    rec.status = resp.status().as_u16();
    let (mut parts, mut body) = resp.into_parts();
    // Lines as they came stay so unless a rule needs them in the map (`h1::raw`).
    let stripped = body.lines_mut().is_some_and(|r| r.strip(from_peer));
    if edits.is_some() || rec.tap_headers.is_some() || !stripped {
        raw::complete_parts(&mut parts.headers, &mut body);
    }
    strip_response_headers(&mut parts.headers, from_peer);
    if let Some(e) = edits {
        edit_headers(&mut parts.headers, e);
    }
    let entry = proxy_status::received_entry(rec.status, rec.upstream);
    // Beside the lines while the map is empty (no map for one field: `h1::raw`).
    match body.lines_mut() {
        Some(lines) if parts.headers.is_empty() => lines.append_status(entry),
        _ => {
            parts
                .headers
                .append(proxy_status::PROXY_STATUS.clone(), entry);
        }
    }
    if let Some(h) = rec.tap_headers.as_mut() {
        h[1] = parts.headers.clone();
    }
    Response::from_parts(parts, ProxyBody::upstream(body, limits).with_on_end(rec))
}
