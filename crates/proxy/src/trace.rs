//! W3C trace context and request ids.
//!
//! Ids are kept as numbers and hex-encoded into stack buffers: this runs on every request.

use http::{header::Entry, HeaderMap, HeaderValue};

use crate::http::{TRACEPARENT, X_REQUEST_ID};

/// Ids of the current request.
pub(crate) struct TraceIds {
    /// The trace id.
    pub(crate) trace_id: u128,
    /// `x-request-id`, as sent upstream.
    pub(crate) request_id: HeaderValue,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn hex_into(out: &mut [u8], mut n: u128) {
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}

fn parse_hex(s: &[u8]) -> Option<u128> {
    let mut n = 0u128;
    for &b in s {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        n = (n << 4) | u128::from(d);
    }
    Some(n)
}

/// `(trace id, flags)` of a valid version-00-compatible `traceparent`.
fn parse_traceparent(v: &[u8]) -> Option<(u128, u8)> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = parse_hex(&v[..2])?;
    let trace = parse_hex(&v[3..35])?;
    parse_hex(&v[36..52])?;
    let flags = parse_hex(&v[53..55])?;
    // Version ff is invalid; version 00 has exactly 55 bytes; an all-zero trace id is invalid.
    let ok = version != 0xff && (version != 0 || v.len() == 55) && trace != 0;
    ok.then_some((trace, flags as u8))
}

/// Format a trace id.
#[cfg(test)]
pub(crate) fn trace_id_hex(id: u128) -> String {
    let mut b = [0u8; 32];
    hex_into(&mut b, id);
    String::from_utf8_lossy(&b).into_owned()
}

/// Continue the caller's trace (new span id, same trace id and flags) or start one, and make
/// sure the request has an `x-request-id`.
pub(crate) fn prepare(headers: &mut HeaderMap) -> TraceIds {
    let existing_id = headers
        .get(&X_REQUEST_ID)
        .filter(|r| !r.is_empty())
        .cloned();
    // The traceparent is hashed once: the entry read here is the one written below.
    let traceparent = headers.entry(TRACEPARENT.clone());
    let existing = match &traceparent {
        Entry::Occupied(e) => parse_traceparent(e.get().as_bytes()),
        Entry::Vacant(_) => None,
    };
    let (trace_id, flags) = existing.unwrap_or_else(|| (fastrand::u128(1..), 1));
    // Both values are written into one buffer and shared from it: one allocation, not two.
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-0000000000-0000-0000-0000-000000000000";
    let (tp, id) = buf.split_at_mut(55);
    hex_into(&mut tp[3..35], trace_id);
    hex_into(&mut tp[36..52], u128::from(fastrand::u64(1..)));
    hex_into(&mut tp[53..55], u128::from(flags));
    if existing_id.is_none() {
        // A random UUID-shaped id.
        let n = fastrand::u128(..);
        hex_into(&mut id[..8], n >> 96);
        hex_into(&mut id[9..13], n >> 80);
        hex_into(&mut id[14..18], n >> 64);
        hex_into(&mut id[19..23], n >> 48);
        hex_into(&mut id[24..], n);
    }
    let shared = bytes::Bytes::copy_from_slice(if existing_id.is_some() {
        &buf[..55]
    } else {
        &buf[..]
    });
    let value = |b: bytes::Bytes| HeaderValue::from_maybe_shared(b).expect("hex is a valid header");
    match traceparent {
        Entry::Occupied(mut e) => {
            e.insert(value(shared.slice(..55)));
        }
        Entry::Vacant(e) => {
            e.insert(value(shared.slice(..55)));
        }
    }
    let request_id = match existing_id {
        Some(r) => r,
        None => {
            let v = value(shared.slice(55..));
            headers.insert(X_REQUEST_ID.clone(), v.clone());
            v
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
        assert_eq!(
            trace_id_hex(ids.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let tp = h["traceparent"].to_str().unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && tp.ends_with("-01")
                && !tp.contains("00f067aa0ba902b7")
        );
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", HeaderValue::from_static(bad));
            let ids = prepare(&mut h);
            assert_ne!(
                trace_id_hex(ids.trace_id),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            let tp = h["traceparent"].to_str().unwrap();
            assert_eq!(tp.len(), 55, "{tp}");
            assert_eq!(h["x-request-id"], ids.request_id);
            assert_eq!(ids.request_id.len(), 36);
        }
    }
}
