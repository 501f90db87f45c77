//! RFC 9209 `Proxy-Status`: each proxy appends one entry to every response it relays or
//! makes, never removing earlier ones, so that a client sees which hop failed and how. The
//! first entry is the hop nearest the application; the last, the one nearest the client.
//!
//! An entry is `trellis` with either `error=TYPE` (the proxy answered itself: the failure
//! class mapped onto the RFC's error types, with `details` and the `next-hop` it was trying)
//! or `received-status=N` (it relayed what the next hop answered; with `next-hop` when that
//! was a 5xx). `x-trellis-failure` is unchanged beside it.
//!
//! Entries are appended as field lines of their own (a list-based field may be split over
//! lines, RFC 9110 §5.3), so a proxy never rewrites the entries before it. A relayed
//! success's entry is a static value: no formatting on the common path.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::FailureClass;

/// `proxy-status`.
pub(crate) static PROXY_STATUS: HeaderName = HeaderName::from_static("proxy-status");

/// The RFC 9209 error type of a response this proxy made for `class`.
pub(crate) fn error_type(class: FailureClass) -> &'static str {
    match class {
        FailureClass::ConnectRefused => "connection_refused",
        FailureClass::ConnectTimeout => "connection_timeout",
        FailureClass::ConnectionReset => "connection_terminated",
        FailureClass::TlsError => "tls_certificate_error",
        FailureClass::NoHealthyUpstream => "destination_unavailable",
        FailureClass::UpstreamTimeout => "http_response_timeout",
        FailureClass::ProtocolError => "http_protocol_error",
        FailureClass::Overloaded => "connection_limit_reached",
        // RFC 9209 has no type for a rate limit: the request was refused by this hop's
        // policy (the class, `rate_limited`, says which).
        FailureClass::Denied | FailureClass::RateLimited => "http_request_denied",
        FailureClass::NoRoute => "destination_not_found",
        FailureClass::ClientError | FailureClass::ClientDisconnect => "http_request_error",
        // An injected fault is this hop's own answer, made without trying the next hop; the
        // proxy makes no answer of its own for the others (if it ever does, it is its own).
        FailureClass::Injected
        | FailureClass::Ok
        | FailureClass::AppError
        | FailureClass::AppGrpcError => "proxy_internal_response",
    }
}

/// `s` as a structured-field string body: printable ASCII only, `"` and `\` escaped.
fn sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars().take(256) {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

fn value(s: String) -> HeaderValue {
    // Printable ASCII by construction.
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static("trellis"))
}

/// Append this proxy's entry for an answer it made itself.
pub(crate) fn append_error(
    h: &mut HeaderMap,
    class: FailureClass,
    next_hop: Option<SocketAddr>,
    details: Option<&str>,
) {
    let mut s = format!("trellis; error={}", error_type(class));
    if let Some(hop) = next_hop {
        s.push_str("; next-hop=");
        sf_string(&mut s, &hop.to_string());
    }
    if let Some(d) = details {
        s.push_str("; details=");
        sf_string(&mut s, d);
    }
    h.append(PROXY_STATUS.clone(), value(s));
}

/// This proxy's entry for a response it relayed: the status it received, and the next hop
/// when that answered a server error.
pub(crate) fn received_entry(status: u16, next_hop: Option<SocketAddr>) -> HeaderValue {
    match (status, next_hop) {
        (500..=599, Some(hop)) => {
            let mut s = format!("trellis; received-status={status}; next-hop=");
            sf_string(&mut s, &hop.to_string());
            value(s)
        }
        _ => received(status),
    }
}

fn received(status: u16) -> HeaderValue {
    macro_rules! statuses {
        ($($n:literal),*) => {
            match status {
                $($n => HeaderValue::from_static(concat!("trellis; received-status=", $n)),)*
                n => value(format!("trellis; received-status={n}")),
            }
        };
    }
    statuses!(
        200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 409, 429, 500, 502,
        503, 504
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(h: &HeaderMap) -> Vec<String> {
        h.get_all(&PROXY_STATUS)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn every_failure_class_maps_onto_an_rfc_9209_error_type() {
        // The registered types (RFC 9209 §2.3).
        let registered = [
            "connection_refused",
            "connection_timeout",
            "connection_terminated",
            "tls_certificate_error",
            "destination_unavailable",
            "http_response_timeout",
            "http_protocol_error",
            "connection_limit_reached",
            "http_request_denied",
            "destination_not_found",
            "http_request_error",
            "proxy_internal_response",
        ];
        for c in FailureClass::ALL {
            assert!(registered.contains(&error_type(c)), "{c:?}");
        }
        assert_eq!(
            error_type(FailureClass::UpstreamTimeout),
            "http_response_timeout"
        );
    }

    #[test]
    fn entries_are_appended_after_earlier_ones_and_strings_escaped() {
        let mut h = HeaderMap::new();
        h.append(
            &PROXY_STATUS,
            HeaderValue::from_static("origin-cache; error=http_request_error"),
        );
        append_error(
            &mut h,
            FailureClass::ConnectRefused,
            Some("127.0.0.1:8080".parse().unwrap()),
            Some("connect \"app\"\\ refused\n"),
        );
        for (status, hop) in [(502, Some("10.0.0.5:15006")), (200, None), (299, None)] {
            let entry = received_entry(status, hop.map(|h| h.parse().unwrap()));
            h.append(&PROXY_STATUS, entry);
        }
        assert_eq!(
            entries(&h),
            [
                "origin-cache; error=http_request_error",
                r#"trellis; error=connection_refused; next-hop="127.0.0.1:8080"; details="connect \"app\"\\ refused?""#,
                r#"trellis; received-status=502; next-hop="10.0.0.5:15006""#,
                "trellis; received-status=200",
                "trellis; received-status=299",
            ]
        );
    }
}
