//! Header handling shared by every stage: hop-by-hop stripping, a route's edits, gRPC
//! detection and the status a gRPC response carries.

use http::{header, HeaderMap, HeaderValue, Request, Response};
use trellis_model::proxy::HeaderEdits;

use super::{GRPC_STATUS, X_TRELLIS_FAILURE};

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

/// Index of `x-trellis-failure` in the presence bits (after [`HOP_BY_HOP`]).
const FAILURE_BIT: usize = 8;

/// The index in [`HOP_BY_HOP`] of a (lower-case) header name, or [`FAILURE_BIT`] for
/// `x-trellis-failure`. A match on the string is a length switch and one comparison;
/// comparing `HeaderName`s one by one cost ten times more.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "x-trellis-failure" => FAILURE_BIT,
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
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let present = presence(h) & !(1 << FAILURE_BIT);
    strip_present(h, present);
}

/// As [`strip_hop_by_hop`], for a response: `x-trellis-failure` goes too, unless the
/// response comes from a peer's proxy (`from_peer`), which made it.
pub(crate) fn strip_response_headers(h: &mut HeaderMap, from_peer: bool) {
    let mut present = presence(h);
    if present & (1 << FAILURE_BIT) != 0 && !from_peer {
        h.remove(&X_TRELLIS_FAILURE);
    }
    present &= !(1 << FAILURE_BIT);
    strip_present(h, present);
}

/// Which of the names the stripping cares about occur: one pass over the few headers
/// present; usually none on requests and only `connection` on responses. A removal per name
/// would cost a hash and a probe each.
fn presence(h: &HeaderMap) -> u16 {
    let mut present = 0u16;
    for k in h.keys() {
        if let Some(i) = hop_by_hop_index(k.as_str()) {
            present |= 1 << i;
        }
    }
    present
}

fn strip_present(h: &mut HeaderMap, present: u16) {
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
            // Split as bytes: a value with other bytes beside the names still names them.
            for token in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                // `te` is handled below; other hop-by-hop names are removed anyway.
                let listed = token.eq_ignore_ascii_case(b"te")
                    || HOP_BY_HOP
                        .iter()
                        .any(|n| token.eq_ignore_ascii_case(n.as_str().as_bytes()));
                if token.is_empty() || listed {
                    continue;
                }
                if let Ok(n) = header::HeaderName::from_bytes(token) {
                    if h.contains_key(&n) {
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
pub(crate) fn edit_headers(h: &mut HeaderMap, e: &HeaderEdits) {
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

/// Is this a gRPC request?
pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_type(v.as_bytes()))
}

/// Whether a `content-type` value is gRPC's (`application/grpc`, `application/grpc+proto`,
/// …): the HTTP/1.1 server asks it of a head as it parses it ([`crate::h1::codec::Noted`]).
pub(crate) fn is_grpc_type(v: &[u8]) -> bool {
    v.starts_with(b"application/grpc")
}

/// The `grpc-status` in response headers or trailers, if any.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    grpc_code(headers.get(&GRPC_STATUS)?.as_bytes())
}

/// The `grpc-status` in a response's headers, raw lines ([`crate::h1::raw`]) or map.
pub(crate) fn response_grpc_status<B: crate::h1::raw::Lines>(resp: &Response<B>) -> Option<u32> {
    grpc_code(crate::h1::raw::get(resp, &GRPC_STATUS)?)
}

fn grpc_code(v: &[u8]) -> Option<u32> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests;
