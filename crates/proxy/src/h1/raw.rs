//! A response's header lines as an HTTP/1.1 upstream sent them, kept as spans of its head
//! instead of read into a `HeaderMap`. Most responses are relayed as they came, and reading
//! their lines into a map (a hash, an insertion and a value per line, the map's allocations
//! and its drop) was the largest part of a proxy's work per request.
//!
//! The response's body carries them ([`Lines`]: the HTTP/1.1 upstream's body, from the
//! client that read the head to the server that writes it; as an `http::Extensions` entry
//! they cost three allocations and a hashed insertion per response). Its `HeaderMap` then
//! holds only what the proxy added, which goes out after them. The proxy's own
//! `Proxy-Status` entry, added to every relayed response, is kept beside the lines
//! ([`RawHeaders::append_status`]) while the map is empty: a map for that one field cost two
//! allocations and a hash per response. It goes out after the lines and before the map's
//! fields. Code that needs one field asks [`get`]; code that needs the whole section (a
//! route's edits, a tap, hyper's encoders) calls [`complete`] first, which reads the lines
//! into the map ahead of what is already there, so the order stays the wire's. The HTTP/1.1
//! encoder writes the lines as they came ([`RawHeaders::lines`]), names in their own case, as
//! HTTP allows. A response rebuilt around another body would lose them: the one place that
//! moves an upstream's body into another (`respond::relay`, into a `ProxyBody`) keeps it
//! whole, and a response whose head is needed apart from its body is completed first.
//!
//! The lines' box and their list are two allocations per response: once its body has been
//! dropped, the box is emptied and kept on its thread ([`keep`]) for the next response head
//! parsed there ([`RawHeaders::boxed`]), as request header maps are (`http::spare`).

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response};

use crate::http::spare;

use super::names::{Class, PROXY_STATUS};

/// One header line: where its name and value are in the head (which is at most 64 KiB).
#[derive(Clone, Copy, Debug)]
struct Line {
    name: (u16, u16),
    value: (u16, u16),
    class: Class,
    dropped: bool,
}

/// The header lines of a response head, as received (see the module's documentation).
#[derive(Clone, Debug, Default)]
pub(crate) struct RawHeaders {
    head: Bytes,
    lines: Vec<Line>,
    /// This proxy's `Proxy-Status` entry, after the lines (see the module's documentation).
    status: Option<HeaderValue>,
}

/// How many boxes of lines a thread keeps (about the responses it has in flight), and the
/// most lines one may have room for to be kept.
const KEEP: usize = 64;
const LARGEST: usize = 64;

thread_local! {
    // The boxes themselves are what is kept: a box handed out again is one allocation fewer.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<RawHeaders>>> = const { RefCell::new(Vec::new()) };
}

impl RawHeaders {
    /// No lines yet, over `head`, with room for `n`.
    pub(super) fn with_capacity(head: Bytes, n: usize) -> Self {
        Self {
            head,
            lines: Vec::with_capacity(n),
            status: None,
        }
    }

    /// As [`RawHeaders::with_capacity`], boxed: a box this thread kept ([`keep`]) when it
    /// has one.
    pub(super) fn boxed(head: Bytes, n: usize) -> Box<Self> {
        match spare::take(&SPARE) {
            Some(mut b) => {
                // Kept empty, with no head and no entry of this proxy's.
                b.head = head;
                b.lines.reserve(n);
                b
            }
            None => Box::new(Self::with_capacity(head, n)),
        }
    }

    /// Add a line: `name` and `value` are (start, length) in the head. httparse accepted
    /// both: the name is token characters, the value is tab, visible ASCII and obs-text,
    /// which is what `HeaderName` and `HeaderValue` accept.
    pub(super) fn push(&mut self, name: (u16, u16), value: (u16, u16), class: Class) {
        self.lines.push(Line {
            name,
            value,
            class,
            dropped: false,
        });
    }

    /// The head the lines are in.
    pub(super) fn head(&self) -> &[u8] {
        &self.head
    }

    fn bytes(&self, (at, len): (u16, u16)) -> &[u8] {
        &self.head[at as usize..at as usize + len as usize]
    }

    /// The lines not dropped: class, name (as sent), value.
    pub(crate) fn lines(&self) -> impl Iterator<Item = (Class, &[u8], &[u8])> + '_ {
        self.lines
            .iter()
            .filter(|l| !l.dropped)
            .map(|l| (l.class, self.bytes(l.name), self.bytes(l.value)))
    }

    /// The lines not dropped, then this proxy's `Proxy-Status` entry: every field to write.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (Class, &[u8], &[u8])> + '_ {
        let status = self
            .status
            .as_ref()
            .map(|v| (Class::Other, &b"proxy-status"[..], v.as_bytes()));
        self.lines().chain(status)
    }

    /// Write every field [`RawHeaders::fields`] gives that `skip` does not refuse, as
    /// [`put_field`] writes each: `name: value` and CRLF. A line that came in exactly that
    /// form, right after the last line written, is copied with it in one piece: most lines do,
    /// and a copy a run is cheaper than four a line.
    pub(crate) fn write_fields(&self, out: &mut BytesMut, mut skip: impl FnMut(Class) -> bool) {
        let head = &self.head[..];
        // The run of the head to copy, not written yet.
        let mut run = 0..0;
        for l in &self.lines {
            if l.dropped || skip(l.class) {
                continue;
            }
            let (n, nl) = (l.name.0 as usize, l.name.1 as usize);
            let (v, vl) = (l.value.0 as usize, l.value.1 as usize);
            let end = v + vl + LINE_END.len();
            let as_written = v == n + nl + NAME_END.len()
                && head.get(n + nl..v) == Some(NAME_END)
                && head.get(v + vl..end) == Some(LINE_END);
            if as_written && run.end == n && !run.is_empty() {
                run.end = end;
                continue;
            }
            out.put_slice(&head[run.clone()]);
            if as_written {
                run = n..end;
            } else {
                run = 0..0;
                put_field(out, &head[n..n + nl], &head[v..v + vl]);
            }
        }
        out.put_slice(&head[run]);
        if let Some(v) = &self.status {
            if !skip(Class::Other) {
                put_field(out, b"proxy-status", v.as_bytes());
            }
        }
    }

    /// Check that [`RawHeaders::write_fields`] writes what writing [`RawHeaders::fields`] one
    /// by one writes, skipping the same, and asks `skip` of the same classes in the same
    /// order; each of a few rules of what to skip, the `n`th first. Panics otherwise. For the
    /// tests and the fuzz targets.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn check_written_in_runs(&self, n: usize) {
        let rules: [fn(Class) -> bool; 4] = [
            |_| false,
            |c| {
                matches!(
                    c,
                    Class::ContentLength | Class::Connection | Class::KeepAlive
                )
            },
            |c| c == Class::Date || c == Class::Other,
            |c| c != Class::Other,
        ];
        for i in 0..rules.len() {
            let rule = rules[(n + i) % rules.len()];
            let mut one_by_one = BytesMut::new();
            let mut asked = Vec::new();
            for (class, name, value) in self.fields() {
                asked.push(class);
                if !rule(class) {
                    put_field(&mut one_by_one, name, value);
                }
            }
            let mut runs = BytesMut::new();
            let mut asked_runs = Vec::new();
            self.write_fields(&mut runs, |c| {
                asked_runs.push(c);
                rule(c)
            });
            let head = String::from_utf8_lossy(&self.head);
            assert_eq!(runs, one_by_one, "written in runs, rule {i}, {head:?}");
            assert_eq!(asked_runs, asked, "classes asked, rule {i}, {head:?}");
        }
    }

    /// How many fields are left.
    pub(crate) fn len(&self) -> usize {
        self.lines.iter().filter(|l| !l.dropped).count() + usize::from(self.status.is_some())
    }

    /// The first value of `name` (lower case).
    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields()
            .find(|(_, n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, _, v)| v)
    }

    /// Add this proxy's `Proxy-Status` entry after the lines; the response's map must hold
    /// nothing yet, as the entry goes out before the map's fields.
    pub(crate) fn append_status(&mut self, entry: HeaderValue) {
        self.status = Some(entry);
    }

    /// The last value of a class.
    pub(super) fn last(&self, class: Class) -> Option<&[u8]> {
        self.lines()
            .filter(|(c, _, _)| *c == class)
            .last()
            .map(|(_, _, v)| v)
    }

    /// Drop every line of a class.
    pub(super) fn drop_class(&mut self, class: Class) {
        for l in &mut self.lines {
            if l.class == class {
                l.dropped = true;
            }
        }
    }

    /// Drop the hop-by-hop lines (and `x-trellis-failure`, unless `from_peer`), as
    /// `http::headers::strip_response_headers` does to a map. `false`, dropping nothing, when
    /// that needs the map's rules: a `Connection` that names other fields, or a `TE`.
    pub(crate) fn strip(&mut self, from_peer: bool) -> bool {
        let named_close = self.lines().any(|(c, _, _)| c == Class::Close);
        let simple = self.lines().all(|(c, _, v)| match c {
            Class::Te => false,
            Class::Connection => {
                v.eq_ignore_ascii_case(b"keep-alive")
                    || (v.eq_ignore_ascii_case(b"close") && !named_close)
            }
            _ => true,
        });
        if !simple {
            return false;
        }
        for l in &mut self.lines {
            l.dropped |= match l.class {
                Class::Connection
                | Class::KeepAlive
                | Class::TransferEncoding
                | Class::Upgrade
                | Class::HopByHop => true,
                Class::Failure => !from_peer,
                _ => false,
            };
        }
        true
    }

    /// The lines as a map, followed by `after`'s fields.
    pub(crate) fn into_map(self, after: HeaderMap) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.len() + after.len());
        for l in self.lines.iter().filter(|l| !l.dropped) {
            let raw = self.bytes(l.name);
            let name = super::names::known(raw).or_else(|| HeaderName::from_bytes(raw).ok());
            let (at, len) = (l.value.0 as usize, l.value.1 as usize);
            let value = HeaderValue::from_maybe_shared(self.head.slice(at..at + len)).ok();
            // Both were accepted by httparse, whose rules are `http`'s (see `push`); the
            // fuzz target checks that no line is lost here.
            if let (Some(name), Some(value)) = (name, value) {
                map.append(name, value);
            }
        }
        if let Some(v) = self.status {
            map.append(PROXY_STATUS.clone(), v);
        }
        let mut last = None;
        for (name, value) in after {
            if let Some(n) = name {
                last = Some(n);
            }
            if let Some(n) = &last {
                map.append(n.clone(), value);
            }
        }
        map
    }

    /// A map of the lines alone (for tests and the fuzz targets).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn to_map(&self) -> HeaderMap {
        self.clone().into_map(HeaderMap::new())
    }
}

/// What [`put_field`] writes after a name, and after a value: a line that came with exactly
/// these is copied as it came ([`RawHeaders::write_fields`]).
const NAME_END: &[u8] = b": ";
const LINE_END: &[u8] = b"\r\n";

/// One field line: `name: value` and CRLF.
pub(super) fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(NAME_END);
    out.put_slice(value);
    out.put_slice(LINE_END);
}

/// Keep `raw`'s box and list, emptied (its head let go), for a later [`RawHeaders::boxed`]
/// on this thread; freed when the thread keeps enough already, or the list is long.
pub(crate) fn keep(mut raw: Box<RawHeaders>) {
    if raw.lines.capacity() > LARGEST {
        return;
    }
    raw.head = Bytes::new();
    raw.lines.clear();
    raw.status = None;
    spare::put(&SPARE, raw, KEEP);
}

/// How many boxes this thread keeps now.
#[cfg(test)]
pub(crate) fn kept() -> usize {
    spare::count(&SPARE)
}

/// A body that may carry its response's raw lines (an HTTP/1.1 upstream's does, boxed: the
/// body moves through every stage, and a pointer moves for less).
pub(crate) trait Lines {
    /// The lines, when this body carries them.
    fn lines(&self) -> Option<&RawHeaders> {
        None
    }

    /// Where this body keeps them, when it can.
    fn slot(&mut self) -> Option<&mut Option<Box<RawHeaders>>> {
        None
    }

    /// The lines, to change.
    fn lines_mut(&mut self) -> Option<&mut RawHeaders> {
        self.slot()?.as_deref_mut()
    }

    /// The lines, taken out (the response's map then has to hold the whole section).
    fn take_lines(&mut self) -> Option<RawHeaders> {
        self.slot()?.take().map(|b| *b)
    }
}

/// No body: no lines.
impl Lines for () {}

/// hyper's bodies: it reads heads into maps.
impl Lines for hyper::body::Incoming {}

/// The slot itself (what an upstream's body holds; a response of lines alone in tests).
impl Lines for Option<Box<RawHeaders>> {
    fn lines(&self) -> Option<&RawHeaders> {
        self.as_deref()
    }

    fn slot(&mut self) -> Option<&mut Option<Box<RawHeaders>>> {
        Some(self)
    }
}

/// Make `headers` the whole header section: the raw lines `body` carries, if any, are read
/// into it ahead of what it holds.
pub(crate) fn complete_parts(headers: &mut HeaderMap, body: &mut impl Lines) {
    if let Some(raw) = body.take_lines() {
        *headers = raw.into_map(std::mem::take(headers));
    }
}

/// The response's whole header map, its raw lines read into it first.
pub(crate) fn complete<B: Lines>(resp: &mut Response<B>) -> &mut HeaderMap {
    if let Some(raw) = resp.body_mut().take_lines() {
        let after = std::mem::take(resp.headers_mut());
        *resp.headers_mut() = raw.into_map(after);
    }
    resp.headers_mut()
}

/// The first value of `name` in a response, raw lines or map (the lines come first).
pub(crate) fn get<'a, B: Lines>(resp: &'a Response<B>, name: &HeaderName) -> Option<&'a [u8]> {
    resp.body()
        .lines()
        .and_then(|r| r.get(name.as_str()))
        .or_else(|| resp.headers().get(name).map(HeaderValue::as_bytes))
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use http::Method;

    use super::*;
    use crate::http::headers::strip_response_headers;

    fn parse(fields: &str) -> RawHeaders {
        *parse_boxed(fields)
    }

    fn parse_boxed(fields: &str) -> Box<RawHeaders> {
        let wire = format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
        let mut buf = BytesMut::from(wire.as_bytes());
        super::super::codec::parse_response_head(&mut buf, &Method::HEAD)
            .unwrap()
            .unwrap()
            .headers
    }

    /// Lines written a run at a time come out as written one at a time, whatever their form
    /// (spaces or a tab around the value, a bare LF, an empty value, lines dropped or
    /// skipped between them) and whichever the skipped classes are.
    #[test]
    fn lines_written_in_runs_read_as_lines_written_one_by_one() {
        let forms = [
            "Server: nginx\r\n",
            "Date: Mon, 07 Dec 2026 22:00:00 GMT\r\n",
            "content-type:text/plain\r\n",
            "Content-Length: 2\r\n",
            "X-Spaced:   a b  \r\n",
            "X-Tab:\tv\t\r\n",
            "X-Bare: lf\n",
            "X-Empty: \r\n",
            "X-Empty-Tight:\r\n",
            "Connection: keep-alive\r\n",
            "Keep-Alive: timeout=5\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Proxy-Connection: x\r\n",
        ];
        // Heads of four lines (the first two of any form, the last two of a few), and each
        // form twice in a row.
        let mut heads: Vec<String> = Vec::new();
        for a in 0..forms.len() {
            heads.push(format!("{}{}", forms[a], forms[a]));
            for b in 0..forms.len() {
                for c in [0, 3, 5, 9] {
                    for d in [1, 6, 7, 12] {
                        heads.push([forms[a], forms[b], forms[c], forms[d]].concat());
                    }
                }
            }
        }
        for fields in &heads {
            for stripped in [false, true] {
                let mut raw = parse(fields);
                if stripped {
                    raw.strip(false);
                }
                for with_status in [false, true] {
                    if with_status {
                        raw.append_status(HeaderValue::from_static("trellis; error=x"));
                    }
                    raw.check_written_in_runs(0);
                }
            }
        }
    }

    /// A kept box comes back for the next head parsed on its thread, with nothing of the
    /// response it held: no line, no head, no `Proxy-Status` entry.
    #[test]
    fn a_kept_box_of_lines_serves_the_next_head_and_holds_nothing_of_the_last() {
        let mut first = parse_boxed("Server: a\r\nX-One: 1\r\nX-Two: 2\r\n");
        first.append_status(HeaderValue::from_static("trellis; received-status=200"));
        let at: *const RawHeaders = &*first;
        let before = kept();
        keep(first);
        assert_eq!(kept(), before + 1);
        let next = parse_boxed("Server: b\r\n");
        assert_eq!(kept(), before);
        assert!(std::ptr::eq(at, &*next), "the same box");
        let fields: Vec<(&[u8], &[u8])> = next.fields().map(|(_, n, v)| (n, v)).collect();
        assert_eq!(fields, [(&b"Server"[..], &b"b"[..])]);
        // Too many lines for their list to be kept: freed.
        let many: String = (0..80).map(|i| format!("x-{i}: v\r\n")).collect();
        keep(parse_boxed(&many));
        assert_eq!(kept(), before);
    }

    #[test]
    fn stripped_lines_leave_what_a_stripped_map_leaves() {
        let heads = [
            "Server: x\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
            "connection: close\r\nx-trellis-failure: app_error\r\ncontent-length: 1\r\n",
            "Upgrade: h2c\r\nProxy-Connection: x\r\nTransfer-Encoding: chunked\r\nVary: a\r\n",
            "Proxy-Authenticate: Basic\r\nProxy-Authorization: y\r\nSet-Cookie: a\r\nset-cookie: b\r\n",
            // The map's rules: a Connection that names a field, a TE, a field named close.
            "Connection: x-private, keep-alive\r\nX-Private: 1\r\nX-Kept: 2\r\n",
            "TE: trailers\r\nTE: gzip\r\nServer: y\r\n",
            "Connection: close\r\nClose: 1\r\nServer: z\r\n",
        ];
        for fields in heads {
            for from_peer in [false, true] {
                let mut want = parse(fields).to_map();
                strip_response_headers(&mut want, from_peer);
                let mut raw = parse(fields);
                let simple = raw.strip(from_peer);
                let got = raw.into_map(HeaderMap::new());
                let mut map = got.clone();
                if !simple {
                    strip_response_headers(&mut map, from_peer);
                }
                assert_eq!(map, want, "{fields:?}, from a peer: {from_peer}");
                let maps_rules = fields.contains("x-private") || fields.contains("TE:");
                let maps_rules = maps_rules || fields.contains("Close:");
                assert_eq!(simple, !maps_rules, "{fields:?}");
            }
        }
    }

    #[test]
    fn lines_read_into_a_map_come_before_what_the_proxy_added() {
        let raw = parse("Proxy-Status: upstream\r\nServer: x\r\nX-Custom: 1\r\n");
        let mut added = HeaderMap::new();
        added.append("proxy-status", HeaderValue::from_static("trellis"));
        added.append("x-custom", HeaderValue::from_static("2"));
        let map = raw.into_map(added);
        let all = |n: &str| map.get_all(n).iter().cloned().collect::<Vec<_>>();
        assert_eq!(all("proxy-status"), ["upstream", "trellis"]);
        assert_eq!(all("x-custom"), ["1", "2"]);
        assert_eq!(all("server"), ["x"]);
    }

    #[test]
    fn a_response_reads_one_field_from_its_lines_or_its_map_and_completes_into_one_map() {
        let lines = parse("X-Trellis-Failure: app_error\r\nServer: x\r\n");
        let mut resp = Response::new(Some(Box::new(lines)));
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("14"));
        let failure = HeaderName::from_static("x-trellis-failure");
        assert_eq!(get(&resp, &failure), Some(&b"app_error"[..]));
        let grpc = HeaderName::from_static("grpc-status");
        assert_eq!(get(&resp, &grpc), Some(&b"14"[..]));
        assert_eq!(get(&resp, &http::header::DATE), None);
        let map = complete(&mut resp).clone();
        assert!(resp.body().is_none(), "the lines were taken into the map");
        assert_eq!(map.len(), 3);
        assert_eq!(map[&failure], "app_error");
        assert_eq!(map["server"], "x");
        assert_eq!(map[&grpc], "14");
    }
}
