//! W3C trace context and request ids.

use http::{HeaderMap, HeaderValue};

/// Ids of the current request.
pub struct TraceIds {
    /// 32 hex digits.
    pub trace_id: String,
    /// `x-request-id`.
    pub request_id: String,
}

fn hex(n: usize) -> String {
    let mut s = String::with_capacity(n);
    while s.len() < n {
        s.push_str(&format!("{:016x}", fastrand::u64(..)));
    }
    s.truncate(n);
    s
}

fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let mut it = v.split('-');
    let (ver, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (is_hex(ver, 2)
        && ver != "ff"
        && is_hex(trace, 32)
        && trace != "0".repeat(32)
        && is_hex(parent, 16)
        && is_hex(flags, 2))
    .then_some((trace, flags))
}

/// Continue the caller's trace (new span id, same trace id and flags) or start one, and make
/// sure the request has an `x-request-id`.
pub fn prepare(headers: &mut HeaderMap) -> TraceIds {
    let existing = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
        .map(|(t, f)| (t.to_string(), f.to_string()));
    let (trace_id, flags) = existing.unwrap_or_else(|| (hex(32), "01".into()));
    let tp = format!("00-{trace_id}-{}-{flags}", hex(16));
    if let Ok(v) = HeaderValue::from_str(&tp) {
        headers.insert("traceparent", v);
    }
    let request_id = match headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        Some(r) if !r.is_empty() => r.to_string(),
        _ => {
            let id = hex(32);
            let id = format!(
                "{}-{}-{}-{}-{}",
                &id[..8],
                &id[8..12],
                &id[12..16],
                &id[16..20],
                &id[20..]
            );
            headers.insert(
                "x-request-id",
                HeaderValue::from_str(&id).expect("hex is a valid header"),
            );
            id
        }
    };
    TraceIds {
        trace_id,
        request_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn propagates_or_creates() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let ids = prepare(&mut h);
        assert_eq!(ids.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp = h["traceparent"].to_str().unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && !tp.contains("00f067aa0ba902b7")
        );
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        let ids = prepare(&mut h);
        assert_eq!(ids.trace_id.len(), 32);
        assert_eq!(h["x-request-id"].to_str().unwrap(), ids.request_id);
    }
}
