//! W3C trace context and request ids.
//!
//! Ids are kept as numbers and hex-encoded into stack buffers: this runs on every request.

use http::{header::Entry, HeaderMap, HeaderName, HeaderValue};

use crate::http::{TRACEPARENT, X_REQUEST_ID};

/// Ids of the current request.
pub(crate) struct TraceIds {
    /// The trace id.
    pub(crate) trace_id: u128,
    /// `x-request-id`, as sent upstream.
    pub(crate) request_id: HeaderValue,
    /// This proxy's spans of the request.
    pub(crate) spans: SpanIds,
}

/// This proxy's place in a trace: the span of the request it received, whose parent is the
/// caller's span, and the span of the try under way, whose id goes upstream as the parent of
/// the next hop. Ids are drawn on every request (two random numbers); spans are built only for
/// a sampled or failed request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SpanIds {
    /// The span of the request this proxy received.
    pub(crate) span: u64,
    /// The caller's span; 0 when the trace starts here.
    pub(crate) parent: u64,
    /// The span of the current try: the parent id the next hop sees.
    pub(crate) attempt: u64,
    /// Whether the trace is sampled.
    pub(crate) sampled: bool,
    /// No trace context came in: this proxy started the trace (and decided its sampling).
    pub(crate) started: bool,
}

/// The 16 lower-case hex digits of `n`, most significant first: each nibble spread to a
/// byte of its own and turned into its digit in one word, not a digit at a time (this runs
/// three times on every request).
fn hex16(n: u64) -> [u8; 16] {
    let spread = |x: u32| {
        let x = u64::from(x);
        let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f
    };
    // A byte of 10 or more gets `'a' - '0' - 10` added to its `'0'`.
    let digits = |v: u64| {
        let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        v + 0x3030_3030_3030_3030 + letters * 39
    };
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&digits(spread((n >> 32) as u32)).to_be_bytes());
    out[8..].copy_from_slice(&digits(spread(n as u32)).to_be_bytes());
    out
}

/// The 32 lower-case hex digits of `n`.
pub(crate) fn hex32(n: u128) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&hex16((n >> 64) as u64));
    out[16..].copy_from_slice(&hex16(n as u64));
    out
}

// B3's names, built once: a lookup by `&str` parses the name on every call, and these are
// looked for on every request that comes without a `traceparent`.
static B3: HeaderName = HeaderName::from_static("b3");
static X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
static X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
static X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The value of each byte as a lower-case hex digit; 16 for any other byte.
const HEX_VALUE: [u8; 256] = {
    let mut t = [16u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Eight lower-case hex digits, most significant first, read as one word: every byte
/// classed as digit or letter, turned into its value and the values packed, a few shifts
/// and masks in all (a traceparent carries 52 digits on every request between proxies).
/// `None` if any byte is not a lower-case hex digit.
fn parse_hex8(s: [u8; 8]) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    let x = u64::from_be_bytes(s);
    // With every byte below 0x80 (checked below), a byte plus at most 0x7f stays inside its
    // byte, and its top bit tells whether the byte was at least 0x80 minus what was added
    // (with a byte of 0x80 or more the sums are wrong, and thrown away).
    let digit = !(x ^ (ONES * b'0' as u64)).wrapping_add(ONES * 0x76) & HIGH; // '0'..='9'
    let letter = x.wrapping_add(ONES * 0x1f) & !x.wrapping_add(ONES * 0x19) & HIGH; // 'a'..='f'
    if x & HIGH != 0 || digit | letter != HIGH {
        return None;
    }
    // '0'..'9' are 0x30..0x39; 'a'..'f' are 0x61..0x66, 9 short of their values.
    let v = (x & (ONES * 0xf)) + (letter >> 7) * 9;
    let v = ((v >> 4) | v) & 0x00ff_00ff_00ff_00ff;
    let v = ((v >> 8) | v) & 0x0000_ffff_0000_ffff;
    Some((((v >> 16) | v) & 0xffff_ffff) as u32)
}

/// Lower-case hex only, as W3C and B3 write it; at most 16 digits.
fn parse_hex64(s: &[u8]) -> Option<u64> {
    debug_assert!(s.len() <= 16);
    if s.len() == 16 {
        let (hi, lo) = s.split_at(8);
        let word = |w: &[u8]| <[u8; 8]>::try_from(w).ok().and_then(parse_hex8);
        return Some(u64::from(word(hi)?) << 32 | u64::from(word(lo)?));
    }
    let mut n = 0u64;
    let mut bad = 0u8;
    for &b in s {
        let d = HEX_VALUE[b as usize];
        bad |= d;
        n = (n << 4) | u64::from(d & 0xf);
    }
    // Only a byte that is not a digit has the bit of 16.
    (bad & 0x10 == 0).then_some(n)
}

/// As [`parse_hex64`], at most 32 digits.
fn parse_hex(s: &[u8]) -> Option<u128> {
    if s.len() > 32 {
        return None;
    }
    let split = s.len().saturating_sub(16);
    let (hi, lo) = s.split_at(split);
    Some((u128::from(parse_hex64(hi)?) << 64) | u128::from(parse_hex64(lo)?))
}

/// A trace context that came in: trace id, the caller's span, and the sampling decision if
/// the caller made one.
#[derive(Debug, PartialEq, Eq)]
struct Incoming {
    trace: u128,
    parent: u64,
    sampled: Option<bool>,
}

/// A valid version-00-compatible `traceparent`.
fn parse_traceparent(v: &[u8]) -> Option<Incoming> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = parse_hex64(&v[..2])?;
    let trace = parse_hex(&v[3..35])?;
    let parent = parse_hex64(&v[36..52])?;
    let flags = parse_hex64(&v[53..55])?;
    // Version ff is invalid; version 00 has exactly 55 bytes; all-zero ids are invalid.
    let ok = version != 0xff && (version != 0 || v.len() == 55) && trace != 0 && parent != 0;
    ok.then_some(Incoming {
        trace,
        parent,
        sampled: Some(flags & 1 == 1),
    })
}

/// A span's place in a trace, as one proxy tells the next: the trace, the span and the
/// sampling decision (a `traceparent`'s three values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpanContext {
    pub(crate) trace_id: u128,
    pub(crate) span: u64,
    pub(crate) sampled: bool,
}

impl SpanContext {
    /// As a `traceparent` (version 00).
    pub(crate) fn traceparent(&self) -> [u8; 55] {
        traceparent_bytes(self.trace_id, self.span, self.sampled)
    }

    /// A valid `traceparent`'s context (one without a decision is not sampled).
    pub(crate) fn parse(v: &[u8]) -> Option<Self> {
        parse_traceparent(v).map(|i| Self {
            trace_id: i.trace,
            span: i.parent,
            sampled: i.sampled.unwrap_or(false),
        })
    }
}

/// An opaque TCP connection's span: its context, and its parent's span (0 for a trace that
/// starts here). A connection's bytes carry no trace context; a stream between two proxies
/// carries the caller's in its hello ([`crate::peer_stream`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnTrace {
    pub(crate) ctx: SpanContext,
    pub(crate) parent: u64,
}

impl ConnTrace {
    /// A trace that starts here, sampled with probability `p`.
    pub(crate) fn start(p: f64) -> Self {
        Self {
            ctx: SpanContext {
                trace_id: fastrand::u128(1..),
                span: fastrand::u64(1..),
                sampled: fastrand::f64() < p,
            },
            parent: 0,
        }
    }

    /// A span of the caller's trace, under the caller's span, with the caller's decision.
    pub(crate) fn child_of(caller: SpanContext) -> Self {
        Self {
            ctx: SpanContext {
                span: fastrand::u64(1..),
                ..caller
            },
            parent: caller.span,
        }
    }
}

/// The trace and parent ids of a valid `traceparent` (for the fuzz targets).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn traceparent_ids(v: &[u8]) -> Option<(u128, u64)> {
    parse_traceparent(v).map(|i| (i.trace, i.parent))
}

/// A 64- or 128-bit B3 trace id.
fn b3_trace(v: &[u8]) -> Option<u128> {
    matches!(v.len(), 16 | 32)
        .then(|| parse_hex(v))
        .flatten()
        .filter(|t| *t != 0)
}

fn b3_span(v: &[u8]) -> Option<u64> {
    (v.len() == 16)
        .then(|| parse_hex(v))
        .flatten()
        .map(|s| s as u64)
        .filter(|s| *s != 0)
}

/// B3's sampling state: `1` or `d` (debug) sample, `0` does not; anything else defers.
fn b3_sampled(v: &[u8]) -> Option<bool> {
    match v {
        b"1" | b"d" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// The single `b3` header: `TRACEID-SPANID[-SAMPLED[-PARENTSPANID]]` (a lone sampling
/// state starts a trace with that decision, which `prepare` does by itself).
fn parse_b3_single(v: &[u8]) -> Option<Incoming> {
    let mut parts = v.split(|b| *b == b'-');
    let trace = b3_trace(parts.next()?)?;
    let parent = b3_span(parts.next()?)?;
    let sampled = parts.next().and_then(b3_sampled);
    Some(Incoming {
        trace,
        parent,
        sampled,
    })
}

/// The multi-header B3 form: `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled` or `x-b3-flags`.
fn parse_b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let trace = b3_trace(headers.get(&X_B3_TRACEID)?.as_bytes())?;
    let parent = b3_span(headers.get(&X_B3_SPANID)?.as_bytes())?;
    let sampled = match headers.get(&X_B3_FLAGS).map(HeaderValue::as_bytes) {
        Some(b"1") => Some(true),
        _ => headers
            .get(&X_B3_SAMPLED)
            .and_then(|v| b3_sampled(v.as_bytes())),
    };
    Some(Incoming {
        trace,
        parent,
        sampled,
    })
}

/// Format a trace id.
#[cfg(test)]
pub(crate) fn trace_id_hex(id: u128) -> String {
    String::from_utf8_lossy(&hex32(id)).into_owned()
}

fn traceparent_bytes(trace_id: u128, span: u64, sampled: bool) -> [u8; 55] {
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
    tp[3..35].copy_from_slice(&hex32(trace_id));
    tp[36..52].copy_from_slice(&hex16(span));
    if sampled {
        tp[54] = b'1';
    }
    tp
}

/// A `traceparent` naming `span` as the parent of the next hop.
pub(crate) fn traceparent(trace_id: u128, span: u64, sampled: bool) -> HeaderValue {
    let tp = traceparent_bytes(trace_id, span, sampled);
    per_request(HeaderValue::from_bytes(&tp).expect("hex is a valid header"))
}

/// A value that belongs to one request (a `traceparent`, an `x-request-id`), marked so that
/// HTTP/2 sends it as a literal never indexed: added to the HPACK tables on both sides of a
/// connection between proxies it would only push out the entries that do repeat (the
/// authority, `x-trellis-peer`, the application's own headers), which then go as literals
/// too, and make every lookup in the tables longer.
fn per_request(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// A trace this proxy started is sampled with probability `p` (the service's own rate, once
/// routing knows the service): the decision and the `traceparent` sent upstream are redone.
/// A trace that came in keeps its caller's decision.
pub(crate) fn resample(headers: &mut HeaderMap, trace_id: u128, ids: &mut SpanIds, p: f64) {
    if !ids.started {
        return;
    }
    let sampled = fastrand::f64() < p;
    if sampled != ids.sampled {
        ids.sampled = sampled;
        headers.insert(
            TRACEPARENT.clone(),
            traceparent(trace_id, ids.attempt, sampled),
        );
    }
}

/// Continue the caller's trace (W3C `traceparent`, else B3) or start one, sampled with
/// probability `sampling`; write the `traceparent` the next hop sees (this proxy's try as its
/// parent); and make sure the request has an `x-request-id`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn prepare(headers: &mut HeaderMap, sampling: f64) -> TraceIds {
    let id = headers.get(&X_REQUEST_ID).cloned();
    prepare_with(headers, sampling, id, None)
}

/// As [`prepare`], with the request's first `x-request-id` already read (`request_id`), and
/// its first `traceparent` when the parser noted it rather than putting it in `headers`
/// (`traceparent`; `None`: the map's, if any, is read).
pub(crate) fn prepare_with(
    headers: &mut HeaderMap,
    sampling: f64,
    request_id: Option<HeaderValue>,
    traceparent: Option<&[u8]>,
) -> TraceIds {
    let existing_id = request_id.filter(|r| !r.is_empty());
    let has_b3 = headers.keys().any(|k| {
        let k = k.as_str().as_bytes();
        k.first() == Some(&b'b') && k == b"b3" || k.starts_with(b"x-b3-")
    });
    // The traceparent is hashed once: the entry read here is the one written below.
    let tp_entry = headers.entry(TRACEPARENT.clone());
    let w3c = match (traceparent, &tp_entry) {
        (Some(v), _) => parse_traceparent(v),
        (None, Entry::Occupied(e)) => parse_traceparent(e.get().as_bytes()),
        (None, Entry::Vacant(_)) => None,
    };
    let had_id = existing_id.is_some();
    let ids = match w3c {
        Some(i) => finish_with(tp_entry, existing_id, Some(i), sampling),
        // No valid traceparent, and no B3 name among the headers (one pass over the few
        // names, cheaper than hashing two of them): a trace starts here.
        None if !has_b3 => finish_with(tp_entry, existing_id, None, sampling),
        None => {
            drop(tp_entry);
            let b3 = match headers.get(&B3) {
                Some(v) => parse_b3_single(v.as_bytes()),
                None => parse_b3_multi(headers),
            };
            finish_with(
                headers.entry(TRACEPARENT.clone()),
                existing_id,
                b3,
                sampling,
            )
        }
    };
    if !had_id {
        headers.insert(X_REQUEST_ID.clone(), ids.request_id.clone());
    }
    ids
}

fn finish_with(
    tp_entry: Entry<'_, HeaderValue>,
    existing_id: Option<HeaderValue>,
    incoming: Option<Incoming>,
    sampling: f64,
) -> TraceIds {
    let started = incoming.is_none();
    let (trace_id, parent, sampled) = match incoming {
        Some(i) => (
            i.trace,
            i.parent,
            i.sampled.unwrap_or_else(|| fastrand::f64() < sampling),
        ),
        None => (fastrand::u128(1..), 0, fastrand::f64() < sampling),
    };
    let spans = SpanIds {
        span: fastrand::u64(1..),
        parent,
        attempt: fastrand::u64(1..),
        sampled,
        started,
    };
    // Both values are written into one buffer and shared from it: one allocation, not two.
    // The buffer is moved whole into the `Bytes` that owns it: one made from a copy of a
    // slice would allocate again for its reference count when first sliced.
    let mut buf = [0u8; 55 + 36];
    buf[..55].copy_from_slice(&traceparent_bytes(trace_id, spans.attempt, sampled));
    let id = &mut buf[55..];
    if existing_id.is_none() {
        // A random UUID-shaped id.
        id.copy_from_slice(b"00000000-0000-0000-0000-000000000000");
        let h = hex32(fastrand::u128(..));
        id[..8].copy_from_slice(&h[..8]);
        id[9..13].copy_from_slice(&h[8..12]);
        id[14..18].copy_from_slice(&h[12..16]);
        id[19..23].copy_from_slice(&h[16..20]);
        id[24..].copy_from_slice(&h[20..]);
    }
    let shared = bytes::Bytes::from_owner(buf);
    let value = |b: bytes::Bytes| {
        per_request(HeaderValue::from_maybe_shared(b).expect("hex is a valid header"))
    };
    match tp_entry {
        Entry::Occupied(mut e) => {
            e.insert(value(shared.slice(..55)));
        }
        Entry::Vacant(e) => {
            e.insert(value(shared.slice(..55)));
        }
    }
    let request_id = match existing_id {
        Some(r) => r,
        None => value(shared.slice(55..)),
    };
    TraceIds {
        trace_id,
        request_id,
        spans,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connections_span_continues_its_callers_trace() {
        let caller = ConnTrace::start(1.0);
        assert_eq!(caller.parent, 0);
        assert!(caller.ctx.sampled && caller.ctx.trace_id != 0 && caller.ctx.span != 0);
        // Told in a traceparent, read back whole.
        let told = SpanContext::parse(&caller.ctx.traceparent()).unwrap();
        assert_eq!(told, caller.ctx);
        let callee = ConnTrace::child_of(told);
        assert_eq!(callee.ctx.trace_id, caller.ctx.trace_id);
        assert_eq!(callee.parent, caller.ctx.span);
        assert_ne!(callee.ctx.span, caller.ctx.span);
        assert!(callee.ctx.sampled, "the caller's decision");
        assert!(!ConnTrace::start(0.0).ctx.sampled);
        assert_eq!(SpanContext::parse(b"00-00-00-00"), None);
    }

    #[test]
    fn hex_is_written_and_read_as_the_formatter_does() {
        let mut values: Vec<u128> = vec![0, 1, 9, 10, 15, 16, u128::MAX, u128::from(u64::MAX)];
        values.extend((0..2000).map(|_| fastrand::u128(..)));
        // Every nibble value in every place.
        values.extend((0..32).flat_map(|i| (0..16u128).map(move |d| d << (4 * i))));
        for n in values {
            let want = format!("{n:032x}");
            assert_eq!(std::str::from_utf8(&hex32(n)).unwrap(), want);
            assert_eq!(
                std::str::from_utf8(&hex16(n as u64)).unwrap(),
                format!("{:016x}", n as u64)
            );
            assert_eq!(parse_hex(want.as_bytes()), Some(n));
            assert_eq!(parse_hex64(&want.as_bytes()[16..]), Some(n as u64));
            // Shorter forms too (B3's 64-bit trace ids, a traceparent's two-digit fields).
            for len in [1, 2, 15, 16, 17, 31] {
                let part = &want.as_bytes()[32 - len..];
                assert_eq!(
                    parse_hex(part),
                    u128::from_str_radix(&want[32 - len..], 16).ok()
                );
            }
        }
        // Anything but a lower-case hex digit, in any place, refuses the whole.
        let good = *b"0123456789abcdef0123456789abcdef";
        for at in 0..32 {
            for b in (0..=255u8).filter(|b| !b.is_ascii_digit() && !(b'a'..=b'f').contains(b)) {
                let mut v = good;
                v[at] = b;
                assert_eq!(parse_hex(&v), None, "{b:#x} at {at}");
                if at >= 16 {
                    assert_eq!(parse_hex64(&v[16..]), None, "{b:#x} at {at}");
                }
            }
        }
        assert_eq!(parse_hex(&[b'0'; 33]), None, "more than 32 digits");
    }

    #[test]
    fn propagates_or_creates() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let ids = prepare(&mut h, 1.0);
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
            let ids = prepare(&mut h, 1.0);
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

    fn ctx(pairs: &[(&'static str, &'static str)], sampling: f64) -> (TraceIds, String) {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        let ids = prepare(&mut h, sampling);
        (ids, h["traceparent"].to_str().unwrap().to_string())
    }

    #[test]
    fn the_callers_span_is_the_parent_and_this_proxys_try_goes_upstream() {
        let (ids, tp) = ctx(
            &[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            )],
            1.0,
        );
        let s = ids.spans;
        assert_eq!(s.parent, 0x00f067aa0ba902b7);
        assert!(!s.sampled && !s.started, "the caller's decision stands");
        assert_ne!(s.span, s.attempt);
        assert_eq!(
            tp,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-00", s.attempt)
        );
    }

    /// A `traceparent` the HTTP/1.1 parser noted (and kept out of the map) is continued as
    /// one in the map is; an invalid one falls back to B3 as the map's does.
    #[test]
    fn a_noted_traceparent_is_continued_as_one_in_the_map() {
        let noted = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        let ids = prepare_with(&mut h, 0.0, None, Some(&noted[..]));
        assert_eq!(
            trace_id_hex(ids.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(ids.spans.parent, 0x00f067aa0ba902b7);
        assert!(ids.spans.sampled && !ids.spans.started);
        assert_eq!(
            h["traceparent"],
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01",
                ids.spans.attempt
            )
        );
        assert_eq!(h.get_all("traceparent").iter().count(), 1);
        let mut h = HeaderMap::new();
        h.insert(
            B3.clone(),
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        );
        let ids = prepare_with(&mut h, 0.0, None, Some(&b"00-broken"[..]));
        assert_eq!(ids.spans.parent, 0xe457b5a2e4d86bd1);
    }

    #[test]
    fn b3_single_and_multi_headers_are_continued_as_w3c() {
        let (ids, tp) = ctx(
            &[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")],
            0.0,
        );
        assert_eq!(
            trace_id_hex(ids.trace_id),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(ids.spans.parent, 0xe457b5a2e4d86bd1);
        assert!(ids.spans.sampled && !ids.spans.started);
        assert!(tp.starts_with("00-80f198ee56343ba864fe8b2a57d3eff7-") && tp.ends_with("-01"));
        // 64-bit trace id, no sampling state: this proxy decides (here: never).
        let (ids, tp) = ctx(
            &[
                ("x-b3-traceid", "a3ce929d0e0e4736"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
            ],
            0.0,
        );
        assert_eq!(ids.trace_id, 0xa3ce929d0e0e4736);
        assert_eq!(ids.spans.parent, 0x00f067aa0ba902b7);
        assert!(!ids.spans.sampled && !ids.spans.started);
        assert!(tp.ends_with("-00"));
        let (ids, _) = ctx(
            &[
                ("x-b3-traceid", "a3ce929d0e0e4736"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
                ("x-b3-flags", "1"),
            ],
            0.0,
        );
        assert!(ids.spans.sampled, "debug means sampled");
        // A valid traceparent wins over B3; a broken B3 starts a trace.
        let (ids, _) = ctx(
            &[
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
            ],
            0.0,
        );
        assert_eq!(ids.spans.parent, 0x00f067aa0ba902b7);
        let (ids, _) = ctx(&[("b3", "zz-e457b5a2e4d86bd1-1")], 0.0);
        assert!(ids.spans.started && ids.spans.parent == 0);
    }

    #[test]
    fn a_trace_started_here_is_sampled_at_the_rate_and_resampled_per_service() {
        let (never, tp) = ctx(&[], 0.0);
        assert!(never.spans.started && !never.spans.sampled && tp.ends_with("-00"));
        let (always, _) = ctx(&[], 1.0);
        assert!(always.spans.sampled);
        let sampled = (0..4000).filter(|_| ctx(&[], 0.25).0.spans.sampled).count();
        assert!((800..1200).contains(&sampled), "{sampled} of 4000 at 25 %");
        // The service asks for every trace: the header sent upstream now says so.
        let mut h = HeaderMap::new();
        let mut ids = prepare(&mut h, 0.0);
        resample(&mut h, ids.trace_id, &mut ids.spans, 1.0);
        assert!(ids.spans.sampled);
        assert!(h["traceparent"].to_str().unwrap().ends_with("-01"));
        // A caller's decision is not redone.
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        let mut ids = prepare(&mut h, 0.0);
        resample(&mut h, ids.trace_id, &mut ids.spans, 1.0);
        assert!(!ids.spans.sampled);
    }
}
