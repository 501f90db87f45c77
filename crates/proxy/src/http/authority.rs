//! The authority a request names, as the routing stages and the record read it.

use http::{uri::Authority, HeaderValue, Request};

/// The authority a request names: the URI's (CONNECT target, absolute URI, HTTP/2
/// `:authority`), else `Host`. Both forms clone by reference count.
#[derive(Clone, Debug)]
pub(crate) enum RequestAuthority {
    /// From the URI.
    Uri(Authority),
    /// From the `Host` header.
    Host(HeaderValue),
}

impl RequestAuthority {
    /// As text (empty if `Host` is not valid text).
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Uri(a) => a.as_str(),
            Self::Host(h) => h.to_str().unwrap_or(""),
        }
    }

    /// `(host, port)`; the port only when it is a number (the digits after the last
    /// `:`). Read from the end by hand: every inbound request asks, and splitting the text
    /// and parsing the rest cost ten times more.
    pub(crate) fn host_port(&self) -> (&str, Option<u16>) {
        let s = self.as_str();
        let b = s.as_bytes();
        let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
        let colon = b.len() - digits;
        if digits == 0 || digits > 5 || colon == 0 || b[colon - 1] != b':' {
            return (s, None);
        }
        let port = b[colon..]
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
        match u16::try_from(port) {
            Ok(p) => (&s[..colon - 1], Some(p)),
            Err(_) => (s, None),
        }
    }
}

/// The authority `req` names, if any: its URI's, else `host` (its first `Host` value, as
/// noted when its head was read: [`crate::h1::codec::Noted`]).
pub(crate) fn authority<B>(
    req: &Request<B>,
    host: Option<HeaderValue>,
) -> Option<RequestAuthority> {
    if let Some(a) = req.uri().authority() {
        return Some(RequestAuthority::Uri(a.clone()));
    }
    host.map(RequestAuthority::Host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        let a = |s: &'static str| RequestAuthority::Host(HeaderValue::from_static(s));
        assert_eq!(a("web.shop:8080").host_port(), ("web.shop", Some(8080)));
        assert_eq!(a("web.shop").host_port(), ("web.shop", None));
        assert_eq!(a("[::1]:80").host_port(), ("[::1]", Some(80)));
        assert_eq!(a("[::1]").host_port(), ("[::1]", None));
        assert_eq!(a("web.shop:http").host_port(), ("web.shop:http", None));
        assert_eq!(a("web.shop:").host_port(), ("web.shop:", None));
        assert_eq!(a("web.shop:65535").host_port(), ("web.shop", Some(65535)));
        assert_eq!(a("web.shop:65536").host_port(), ("web.shop:65536", None));
        assert_eq!(a("web.shop:008080").host_port(), ("web.shop:008080", None));
        assert_eq!(a("web.shop:+80").host_port(), ("web.shop:+80", None));
        assert_eq!(a(":80").host_port(), ("", Some(80)));
        assert_eq!(a("8080").host_port(), ("8080", None));
    }
}
