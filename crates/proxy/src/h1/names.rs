//! Header names met on most requests and responses, recognised from their bytes without
//! `HeaderName::from_bytes`, which lower-cases every name into a scratch buffer before it
//! looks the standard ones up, and allocates for any other (`traceparent`, `x-request-id`
//! and `x-trellis-peer` arrive on every request between proxies).

use http::{header, HeaderName};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_TRELLIS_PEER: HeaderName = HeaderName::from_static("x-trellis-peer");
const X_TRELLIS_FAILURE: HeaderName = HeaderName::from_static("x-trellis-failure");
pub(super) const PROXY_STATUS: HeaderName = HeaderName::from_static("proxy-status");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Fields of a request head the request path reads: the parser notes them as it meets
/// them ([`super::codec::Noted`]), found by the same match that names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Field {
    Other,
    Host,
    RequestId,
    ContentType,
    Peer,
    TraceParent,
}

/// What a header name is, among the few the proxy acts on (in any case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Other,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    Date,
    Expect,
    Te,
    Upgrade,
    /// `proxy-connection`, `proxy-authenticate`, `proxy-authorization`: hop-by-hop only.
    HopByHop,
    /// `x-trellis-failure`: kept only from a peer's proxy.
    Failure,
    /// A field literally named `close`, which `Connection: close` then names too.
    Close,
}

/// The class of a header name (token characters, any case): a switch on the length and one
/// comparison, a word at a time ([`same_token`]).
pub(crate) fn classify(name: &[u8]) -> Class {
    let is = |s: &[u8]| same_token(name, s);
    match name.len() {
        2 if is(b"te") => Class::Te,
        4 if is(b"date") => Class::Date,
        5 if is(b"close") => Class::Close,
        6 if is(b"expect") => Class::Expect,
        7 if is(b"upgrade") => Class::Upgrade,
        10 if is(b"connection") => Class::Connection,
        10 if is(b"keep-alive") => Class::KeepAlive,
        14 if is(b"content-length") => Class::ContentLength,
        16 if is(b"proxy-connection") => Class::HopByHop,
        17 if is(b"transfer-encoding") => Class::TransferEncoding,
        17 if is(b"x-trellis-failure") => Class::Failure,
        18 if is(b"proxy-authenticate") => Class::HopByHop,
        19 if is(b"proxy-authorization") => Class::HopByHop,
        _ => Class::Other,
    }
}

/// `name` (a header name as httparse accepted it: token characters only) as one of the
/// common names, whatever its case; `None` for any other, which `HeaderName::from_bytes`
/// then reads.
pub(super) fn known(name: &[u8]) -> Option<HeaderName> {
    known_field(name).map(|k| k.name)
}

/// A common name ([`known_field`]): the name, the field the request path reads if it is
/// one, and its [`Class`] (what [`classify`] says of it, without comparing it again).
pub(super) struct Known {
    pub(super) name: HeaderName,
    pub(super) field: Field,
    pub(super) class: Class,
}

/// As [`known`], with the field the request path reads and the name's class.
pub(super) fn known_field(name: &[u8]) -> Option<Known> {
    let first = *name.first()? | 0x20;
    let mut field = Field::Other;
    let mut class = Class::Other;
    let (lower, known) = match (name.len(), first) {
        (2, b't') => {
            class = Class::Te;
            (&b"te"[..], header::TE)
        }
        (4, b'h') => {
            field = Field::Host;
            (&b"host"[..], header::HOST)
        }
        (4, b'd') => {
            class = Class::Date;
            (&b"date"[..], header::DATE)
        }
        (4, b'e') => (&b"etag"[..], header::ETAG),
        (4, b'v') => (&b"vary"[..], header::VARY),
        (6, b's') => (&b"server"[..], header::SERVER),
        (6, b'a') => (&b"accept"[..], header::ACCEPT),
        (6, b'c') => (&b"cookie"[..], header::COOKIE),
        (6, b'e') => {
            class = Class::Expect;
            (&b"expect"[..], header::EXPECT)
        }
        (6, b'o') => (&b"origin"[..], header::ORIGIN),
        (7, b'u') => {
            class = Class::Upgrade;
            (&b"upgrade"[..], header::UPGRADE)
        }
        (7, b'r') => (&b"referer"[..], header::REFERER),
        (8, b'l') => (&b"location"[..], header::LOCATION),
        (10, b'c') => {
            class = Class::Connection;
            (&b"connection"[..], header::CONNECTION)
        }
        (10, b'u') => (&b"user-agent"[..], header::USER_AGENT),
        (10, b'k') => {
            class = Class::KeepAlive;
            (&b"keep-alive"[..], KEEP_ALIVE)
        }
        (10, b's') => (&b"set-cookie"[..], header::SET_COOKIE),
        (10, b't') => (&b"tracestate"[..], TRACESTATE),
        (11, b't') => {
            field = Field::TraceParent;
            (&b"traceparent"[..], TRACEPARENT)
        }
        (11, b'g') => (&b"grpc-status"[..], GRPC_STATUS),
        (12, b'c') => {
            field = Field::ContentType;
            (&b"content-type"[..], header::CONTENT_TYPE)
        }
        (12, b'x') => {
            field = Field::RequestId;
            (&b"x-request-id"[..], X_REQUEST_ID)
        }
        (12, b'p') => (&b"proxy-status"[..], PROXY_STATUS),
        (13, b'c') => (&b"cache-control"[..], header::CACHE_CONTROL),
        (13, b'a') => (&b"authorization"[..], header::AUTHORIZATION),
        (13, b'l') => (&b"last-modified"[..], header::LAST_MODIFIED),
        (14, b'c') => {
            class = Class::ContentLength;
            (&b"content-length"[..], header::CONTENT_LENGTH)
        }
        (14, b'x') => {
            field = Field::Peer;
            (&b"x-trellis-peer"[..], X_TRELLIS_PEER)
        }
        (15, b'a') if name[7] | 0x20 == b'e' => (&b"accept-encoding"[..], header::ACCEPT_ENCODING),
        (15, b'a') => (&b"accept-language"[..], header::ACCEPT_LANGUAGE),
        (15, b'x') => (&b"x-forwarded-for"[..], X_FORWARDED_FOR),
        (16, b'c') => (&b"content-encoding"[..], header::CONTENT_ENCODING),
        (17, b't') => {
            class = Class::TransferEncoding;
            (&b"transfer-encoding"[..], header::TRANSFER_ENCODING)
        }
        (17, b'x') => {
            class = Class::Failure;
            (&b"x-trellis-failure"[..], X_TRELLIS_FAILURE)
        }
        _ => return None,
    };
    same_token(name, lower).then_some(Known {
        name: known,
        field,
        class,
    })
}

/// Whether `name` is `lower` (lower-case letters and `-`) in any case. Setting bit 5 maps
/// an upper-case letter to its lower case and leaves `-` as it is; the only other byte it
/// maps onto one of those is CR (onto `-`), which is no token character. Compared eight
/// bytes at a time (four for shorter names; the last word overlaps the one before it), not
/// a byte at a time: this runs for about every header line of every head.
#[inline]
pub(super) fn same_token(name: &[u8], lower: &[u8]) -> bool {
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n >= 8 {
        const BIT5: u64 = 0x2020_2020_2020_2020;
        let mut d = 0;
        let mut at = 0;
        while at + 8 < n {
            d |= (word8(name, at) | BIT5) ^ word8(lower, at);
            at += 8;
        }
        d |= (word8(name, n - 8) | BIT5) ^ word8(lower, n - 8);
        d == 0
    } else if n >= 4 {
        const BIT5: u32 = 0x2020_2020;
        let d = ((word4(name, 0) | BIT5) ^ word4(lower, 0))
            | ((word4(name, n - 4) | BIT5) ^ word4(lower, n - 4));
        d == 0
    } else {
        name.iter()
            .zip(lower)
            .fold(0u8, |d, (n, l)| d | ((n | 0x20) ^ l))
            == 0
    }
}

/// The eight bytes of `s` from `at`, as one word.
#[inline(always)]
fn word8(s: &[u8], at: usize) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The four bytes of `s` from `at`, as one word.
#[inline(always)]
fn word4(s: &[u8], at: usize) -> u32 {
    let mut w = [0; 4];
    w.copy_from_slice(&s[at..at + 4]);
    u32::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name the table knows reads as `HeaderName::from_bytes` reads it, in any case;
    /// names that differ by a byte, or are other names of the same length and first letter,
    /// are left to it.
    #[test]
    fn known_names_read_as_from_bytes_reads_them() {
        let names = [
            "te",
            "host",
            "date",
            "etag",
            "vary",
            "server",
            "accept",
            "cookie",
            "expect",
            "origin",
            "upgrade",
            "referer",
            "location",
            "connection",
            "user-agent",
            "keep-alive",
            "set-cookie",
            "tracestate",
            "traceparent",
            "grpc-status",
            "content-type",
            "x-request-id",
            "cache-control",
            "authorization",
            "last-modified",
            "proxy-status",
            "content-length",
            "x-trellis-peer",
            "accept-encoding",
            "accept-language",
            "x-forwarded-for",
            "content-encoding",
            "transfer-encoding",
            "x-trellis-failure",
        ];
        for n in names {
            let upper = n.to_ascii_uppercase();
            let title: String = n
                .split('-')
                .map(|w| w[..1].to_ascii_uppercase() + &w[1..])
                .collect::<Vec<_>>()
                .join("-");
            for form in [n.to_string(), upper, title] {
                let want = HeaderName::from_bytes(form.as_bytes()).unwrap();
                assert_eq!(known(form.as_bytes()), Some(want), "{form}");
                // The class it gives is the one `classify` finds by comparing.
                let k = known_field(form.as_bytes()).unwrap();
                assert_eq!(k.class, classify(form.as_bytes()), "{form}");
            }
            // One byte off, anywhere: not this name.
            for i in 0..n.len() {
                let mut off = n.as_bytes().to_vec();
                off[i] = if off[i] == b'q' { b'z' } else { b'q' };
                if let Some(k) = known(&off) {
                    assert_eq!(k.as_str().as_bytes(), &off[..], "{n} with byte {i} changed");
                }
            }
        }
        for other in [
            "accept-charset",
            "x-custom",
            "t",
            "",
            "content-lengthy",
            "hosts",
        ] {
            assert_eq!(known(other.as_bytes()), None, "{other}");
        }
    }

    /// Word by word, [`same_token`] says what a byte-by-byte comparison in any case says,
    /// for every length up to 24 and a byte changed anywhere (to its other case, to another
    /// token character, to a byte one bit away), over token characters.
    #[test]
    fn same_token_compares_as_byte_by_byte_in_any_case() {
        const TOKEN: &[u8] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~";
        for len in 0..=24usize {
            for _ in 0..200 {
                let lower: Vec<u8> = (0..len)
                    .map(|_| b"abcdefghijklmnopqrstuvwxyz-"[fastrand::usize(..27)])
                    .collect();
                let mut name: Vec<u8> = lower
                    .iter()
                    .map(|b| {
                        if fastrand::bool() {
                            b.to_ascii_uppercase()
                        } else {
                            *b
                        }
                    })
                    .collect();
                assert!(
                    same_token(&name, &lower),
                    "{:?}",
                    String::from_utf8_lossy(&name)
                );
                if len > 0 {
                    let i = fastrand::usize(..len);
                    name[i] = match fastrand::u8(..3) {
                        0 => TOKEN[fastrand::usize(..TOKEN.len())],
                        1 => name[i] ^ 0x20,
                        _ => name[i] ^ (1 << fastrand::u8(..8)),
                    };
                    // Bytes as httparse passes them: token characters only.
                    if name.iter().all(|b| TOKEN.contains(b)) {
                        assert_eq!(
                            same_token(&name, &lower),
                            name.eq_ignore_ascii_case(&lower),
                            "{:?} against {:?}",
                            String::from_utf8_lossy(&name),
                            String::from_utf8_lossy(&lower)
                        );
                    }
                }
                assert!(!same_token(&name[..len.saturating_sub(1)], &lower) || len == 0);
            }
        }
    }

    #[test]
    fn names_are_classed_in_any_case() {
        for (name, class) in [
            ("Content-Length", Class::ContentLength),
            ("TRANSFER-ENCODING", Class::TransferEncoding),
            ("connection", Class::Connection),
            ("Keep-Alive", Class::KeepAlive),
            ("x-Trellis-Failure", Class::Failure),
            ("Proxy-Authorization", Class::HopByHop),
            ("te", Class::Te),
            ("tf", Class::Other),
            ("content-lengths", Class::Other),
        ] {
            assert_eq!(classify(name.as_bytes()), class, "{name}");
        }
    }
}
