//! HTTP/1.1 on the wire (RFC 9112), both ways: request heads and response heads parsed and
//! encoded, bodies framed by length, by chunks, or (responses only) up to the close. Pure
//! functions over buffers, so that every framing rule is unit-tested without a socket.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

use super::names::{classify, Class, Field, Known};
use super::raw::{put_field, RawHeaders};

/// Largest response head (status line and headers), and largest trailer section. Offsets
/// within a head fit in a `u16`.
pub(crate) const MAX_HEAD: usize = 64 * 1024 - 1;
/// Most headers in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Fields dropped from a trailer section: framing, routing, connection handling, and how the
/// content is read.
const TRAILER_FORBIDDEN: [&str; 10] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "content-type",
    "content-encoding",
];
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// A response that does not follow HTTP/1.1.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParseError {
    /// The status line or a header line is malformed.
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    /// The head does not end within [`MAX_HEAD`] bytes.
    #[error("response head larger than {MAX_HEAD} bytes")]
    TooLarge,
    /// Content-Length is not one non-negative number.
    #[error("invalid content-length")]
    ContentLength,
    /// The chunked encoding is broken.
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
}

/// How a request body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReqFraming {
    /// No body.
    None,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
}

/// Write a request head. Framing headers of the caller are replaced by `framing`'s.
pub(crate) fn encode_request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: ReqFraming,
    out: &mut BytesMut,
) {
    out.reserve(256);
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {
            // Servers may insist on a length for methods that usually carry a body (411).
            if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                out.put_slice(b"content-length: 0\r\n");
            }
        }
        ReqFraming::Length(n) => {
            out.put_slice(b"content-length: ");
            put_decimal(out, n);
            out.put_slice(b"\r\n");
        }
        ReqFraming::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.put_slice(b"\r\n");
}

fn put_decimal(out: &mut BytesMut, n: u64) {
    out.put_slice(crate::decimal::Decimal::new(n).as_bytes());
}

/// Frame one chunk of a chunked request body: size line, data, CRLF.
pub(crate) fn encode_chunk_prefix(len: usize, out: &mut BytesMut) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
    out.put_slice(b"\r\n");
}

/// The last chunk and the trailer section of a chunked request body.
pub(crate) fn encode_chunked_end(trailers: Option<&HeaderMap>, out: &mut BytesMut) {
    out.put_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

/// How a response body is framed (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RespFraming {
    /// No body (HEAD, 1xx, 204, 304, or `content-length: 0`).
    Empty,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Everything up to the close of the connection.
    Eof,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    /// Its header lines, not read into a map ([`super::raw`]).
    pub(crate) headers: Box<RawHeaders>,
    pub(crate) framing: RespFraming,
    /// The connection may carry another request once this response ends.
    pub(crate) keep_alive: bool,
}

/// Parse a response head at the front of `buf` and consume it. `Ok(None)`: more bytes are
/// needed. `method` is the request's: a response to HEAD has no body whatever it says.
pub(crate) fn parse_response_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<Head>, ParseError> {
    // A client looks for the head as soon as its request is out, before anything came.
    if buf.is_empty() {
        return Ok(None);
    }
    SPANS.with_borrow_mut(|spans| response_head(buf, method, spans))
}

fn response_head(
    buf: &mut BytesMut,
    method: &Method,
    spans: &mut Spans,
) -> Result<Option<Head>, ParseError> {
    let parsed = match super::head::response(buf, &mut spans.at) {
        Ok(Some(p)) => p,
        Ok(None) if buf.len() > MAX_HEAD => return Err(ParseError::TooLarge),
        Ok(None) => return Ok(None),
        Err(e) => return Err(ParseError::Head(e)),
    };
    let len = parsed.len;
    if len > MAX_HEAD {
        return Err(ParseError::TooLarge);
    }
    spans.count = parsed.fields;
    let status = StatusCode::from_u16(parsed.line.code)
        .map_err(|_| ParseError::Head(httparse::Error::Status))?;
    let version = if parsed.line.version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let head = buf.split_to(len).freeze();
    let (mut headers, seen) = spans.raw(head);
    let (framing, keep_alive) = framing(status, version, method, &mut headers, seen)?;
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// Header positions within a head (at most 64 KiB), written by the parser
/// ([`super::head`]), so that names and values can share the buffer once the head is split
/// off.
struct Spans {
    at: [super::head::Field; MAX_HEADERS],
    count: usize,
}

thread_local! {
    /// Kept per thread, not made per head: each head parsed would otherwise zero its 800
    /// bytes first. The parser writes the places of the fields it finds, and only those are
    /// read ([`Spans::count`]).
    static SPANS: std::cell::RefCell<Spans> = const { std::cell::RefCell::new(Spans::NONE) };
}

impl Spans {
    const NONE: Self = Self {
        at: [(0, 0, 0, 0); MAX_HEADERS],
        count: 0,
    };

    /// The header map over `head`, with room for `extra` more, and what the request path
    /// reads of it ([`Noted`]; `x-trellis-peer` goes there, not into the map); `Err`: the
    /// offending name.
    fn header_map(
        &self,
        head: &Bytes,
        extra: usize,
        noted: &mut Noted,
    ) -> Result<(HeaderMap, Seen), String> {
        let mut headers = crate::http::spare::map(self.count + extra);
        let mut seen = Seen::default();
        *noted = Noted::default();
        let mut typed = false;
        for &(ns, nl, vs, vl) in &self.at[..self.count] {
            let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
            let raw = &head[ns..ns + nl];
            let Known { name, field, class } = match super::names::known_field(raw) {
                Some(known) => known,
                None => Known {
                    name: HeaderName::from_bytes(raw)
                        .map_err(|_| String::from_utf8_lossy(raw).into_owned())?,
                    field: Field::Other,
                    class: classify(raw),
                },
            };
            seen.note(class, &head[vs..vs + vl]);
            match field {
                Field::Peer => {
                    noted
                        .peer
                        .get_or_insert_with(|| PeerValue::Head(head.slice(vs..vs + vl)));
                    continue;
                }
                Field::TraceParent => {
                    noted
                        .traceparent
                        .get_or_insert_with(|| head.slice(vs..vs + vl));
                    continue;
                }
                _ => {}
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                .map_err(|_| name.as_str().to_owned())?;
            // The first of each, as a lookup in the map finds it.
            match field {
                Field::Other => {}
                Field::Host if noted.host.is_none() => noted.host = Some(value.clone()),
                Field::RequestId if noted.request_id.is_none() => {
                    noted.request_id = Some(value.clone());
                }
                Field::ContentType if !typed => {
                    typed = true;
                    noted.grpc = crate::http::headers::is_grpc_type(value.as_bytes());
                }
                Field::Host
                | Field::RequestId
                | Field::ContentType
                | Field::Peer
                | Field::TraceParent => {}
            }
            headers.append(name, value);
        }
        Ok((headers, seen))
    }

    /// The lines over `head`, not read into a map: httparse has checked names and values.
    fn raw(&self, head: Bytes) -> (Box<RawHeaders>, Seen) {
        let mut seen = Seen::default();
        let mut lines = RawHeaders::boxed(head, self.count);
        for &(ns, nl, vs, vl) in &self.at[..self.count] {
            let (n, v) = (ns as usize, vs as usize);
            let class = classify(&lines.head()[n..n + nl as usize]);
            seen.note(class, &lines.head()[v..v + vl as usize]);
            lines.push((ns, nl), (vs, vl), class);
        }
        (lines, seen)
    }
}

/// Whether the last transfer coding of a `Transfer-Encoding` value (the last field's) is
/// `chunked` (RFC 9112 §6.3). A value that is not visible ASCII names none.
fn chunked_last(last: Option<&[u8]>) -> bool {
    last.filter(|v| visible(v))
        .and_then(|v| v.rsplit(|b| *b == b',').next())
        .is_some_and(|t| trim_ows(t).eq_ignore_ascii_case(b"chunked"))
}

/// Which of the headers that decide framing and connection handling a head carries, noted
/// while it is parsed, so that absent ones cost no lookup; and what its content-length and
/// `Connection` say, read from their bytes then, so that present ones cost none either.
#[derive(Clone, Copy, Default)]
struct Seen {
    bits: u8,
    length: Length,
    /// The `Connection` tokens found: `Seen::CLOSE`, `KEEP_ALIVE`, `UPGRADE_TOKEN`.
    connection: u8,
}

/// The content-length of a head so far: one number, possibly repeated (`7, 7`, or in two
/// fields); anything else makes it invalid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Length {
    #[default]
    Absent,
    Is(u64),
    Invalid,
}

impl Length {
    /// Take one more `content-length` field into account.
    fn and(self, value: &[u8]) -> Self {
        // The usual field: one number of at most 19 digits (below u64's limit), read as is.
        if !value.is_empty() && value.len() <= 19 && value.iter().all(u8::is_ascii_digit) {
            let n = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            return match self {
                Self::Absent => Self::Is(n),
                Self::Is(l) if l == n => self,
                _ => Self::Invalid,
            };
        }
        let mut length = self;
        for part in value.split(|b| *b == b',') {
            let part = trim_ows(part);
            let n = (!part.is_empty() && part.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
                .flatten();
            length = match (length, n) {
                (Self::Invalid, _) | (_, None) => return Self::Invalid,
                (Self::Is(l), Some(n)) if l != n => return Self::Invalid,
                (_, Some(n)) => Self::Is(n),
            };
        }
        length
    }
}

/// `value` without the optional whitespace (spaces, tabs) around it.
fn trim_ows(value: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !ows(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    &value[start..end]
}

impl Seen {
    const CONTENT_LENGTH: u8 = 1;
    const TRANSFER_ENCODING: u8 = 2;
    const CONNECTION: u8 = 4;
    const EXPECT: u8 = 8;
    const UPGRADE: u8 = 16;
    const TE: u8 = 32;

    const CLOSE: u8 = 1;
    const KEEP_ALIVE: u8 = 2;
    const UPGRADE_TOKEN: u8 = 4;

    /// Note a field of class `class`. Most fields are of no class the framing reads: they
    /// cost a comparison where the parse loops over the fields, not a call.
    #[inline]
    fn note(&mut self, class: Class, value: &[u8]) {
        if class != Class::Other {
            self.note_framing(class, value);
        }
    }

    fn note_framing(&mut self, class: Class, value: &[u8]) {
        let bit = match class {
            Class::ContentLength => Self::CONTENT_LENGTH,
            Class::TransferEncoding => Self::TRANSFER_ENCODING,
            Class::Connection => Self::CONNECTION,
            Class::Expect => Self::EXPECT,
            Class::Upgrade => Self::UPGRADE,
            Class::Te => Self::TE,
            _ => return,
        };
        self.bits |= bit;
        if bit == Self::CONTENT_LENGTH {
            self.length = self.length.and(value);
        } else if bit == Self::CONNECTION {
            self.connection |= connection_tokens(value);
        }
    }

    fn has(self, bit: u8) -> bool {
        self.bits & bit != 0
    }

    /// Whether a `Connection` field named `token` (one of `CLOSE`, `KEEP_ALIVE`,
    /// `UPGRADE_TOKEN`).
    fn connection(self, token: u8) -> bool {
        self.connection & token != 0
    }

    /// The content-length, if any; `Err` when the fields do not make one number.
    fn content_length(self) -> Result<Option<u64>, ()> {
        match self.length {
            Length::Absent => Ok(None),
            Length::Is(n) => Ok(Some(n)),
            Length::Invalid => Err(()),
        }
    }
}

/// Whether a field value is visible ASCII (and tabs): what can be read as a list of tokens,
/// and what `HeaderValue::to_str` reads as text.
pub(crate) fn visible(value: &[u8]) -> bool {
    value
        .iter()
        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
}

/// The tokens of one `Connection` field that decide what becomes of the connection. A
/// field that is not visible ASCII names none (it cannot be read as a list of tokens).
fn connection_tokens(value: &[u8]) -> u8 {
    // The usual fields: one token.
    if value.eq_ignore_ascii_case(b"keep-alive") {
        return Seen::KEEP_ALIVE;
    }
    if value.eq_ignore_ascii_case(b"close") {
        return Seen::CLOSE;
    }
    if !visible(value) {
        return 0;
    }
    value
        .split(|b| *b == b',')
        .map(|t| {
            let t = trim_ows(t);
            if t.eq_ignore_ascii_case(b"close") {
                Seen::CLOSE
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                Seen::KEEP_ALIVE
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                Seen::UPGRADE_TOKEN
            } else {
                0
            }
        })
        .fold(0, |a, b| a | b)
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn framing(
    status: StatusCode,
    version: Version,
    method: &Method,
    headers: &mut RawHeaders,
    seen: Seen,
) -> Result<(RespFraming, bool), ParseError> {
    let mut keep_alive = if version == Version::HTTP_10 {
        seen.connection(Seen::KEEP_ALIVE)
    } else {
        !seen.connection(Seen::CLOSE)
    };
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((RespFraming::Empty, keep_alive));
    }
    if seen.has(Seen::TRANSFER_ENCODING) {
        // A length next to a transfer coding is a smuggling attempt or a bug; the coding
        // wins (RFC 9112 §6.3) and the length must not travel on.
        headers.drop_class(Class::ContentLength);
        if chunked_last(headers.last(Class::TransferEncoding)) {
            return Ok((RespFraming::Chunked, keep_alive));
        }
        return Ok((RespFraming::Eof, false));
    }
    let length = seen
        .content_length()
        .map_err(|()| ParseError::ContentLength)?;
    Ok(match length {
        Some(0) => (RespFraming::Empty, keep_alive),
        Some(n) => (RespFraming::Length(n), keep_alive),
        None => {
            keep_alive = false;
            (RespFraming::Eof, keep_alive)
        }
    })
}

/// What the body decoder produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section of a chunked body (the end follows).
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// More bytes are needed.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Decodes a response body from the connection's read buffer.
#[derive(Debug)]
pub(crate) enum Decoder {
    /// Bytes still expected.
    Length(u64),
    Chunked(Chunk),
    /// Until the peer closes.
    Eof,
    /// Complete.
    Done,
}

impl Decoder {
    /// The decoder for a framing.
    pub(crate) fn new(framing: RespFraming) -> Self {
        match framing {
            RespFraming::Empty | RespFraming::Length(0) => Self::Done,
            RespFraming::Length(n) => Self::Length(n),
            RespFraming::Chunked => Self::Chunked(Chunk::Size),
            RespFraming::Eof => Self::Eof,
        }
    }

    /// The body is complete.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Self::Done)
    }

    /// Bytes still expected, when known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self {
            Self::Length(n) => Some(*n),
            Self::Done => Some(0),
            _ => None,
        }
    }

    /// Take what `buf` holds of the body.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ParseError> {
        match self {
            Self::Done => Ok(Decoded::End),
            Self::Eof if buf.is_empty() => Ok(Decoded::NeedMore),
            Self::Eof => Ok(Decoded::Data(buf.split().freeze())),
            Self::Length(_) if buf.is_empty() => Ok(Decoded::NeedMore),
            Self::Length(n) => {
                let take = (*n).min(buf.len() as u64);
                *n -= take;
                if *n == 0 {
                    *self = Self::Done;
                }
                Ok(Decoded::Data(buf.split_to(take as usize).freeze()))
            }
            Self::Chunked(state) => {
                let out = decode_chunked(state, buf)?;
                if matches!(out, Decoded::End | Decoded::Trailers(_)) {
                    *self = Self::Done;
                }
                Ok(out)
            }
        }
    }

    /// The peer closed the connection: fine only for a body that runs up to the close.
    pub(crate) fn at_eof(&mut self) -> bool {
        match self {
            Self::Eof | Self::Done => {
                *self = Self::Done;
                true
            }
            _ => false,
        }
    }
}

fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Decoded, ParseError> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(nl) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                    return if buf.len() >= MAX_CHUNK_LINE {
                        Err(ParseError::Chunked("chunk size line too long"))
                    } else {
                        Ok(Decoded::NeedMore)
                    };
                };
                let size = parse_chunk_size(&buf[..nl])?;
                buf.advance(nl + 1);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(n) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let take = n.min(buf.len() as u64);
                *state = if take == n {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(n - take)
                };
                return Ok(Decoded::Data(buf.split_to(take as usize).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(ParseError::Chunked("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] == b"\r\n" {
                    buf.advance(2);
                    return Ok(Decoded::End);
                }
                let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let (len, map) = match httparse::parse_headers(buf, &mut raw) {
                    Ok(httparse::Status::Complete((len, hs))) => {
                        let mut map = HeaderMap::with_capacity(hs.len());
                        for h in hs.iter() {
                            // Fields that frame or route a message have no meaning in a
                            // trailer section (RFC 9110 §6.5.1), and must not travel on.
                            if TRAILER_FORBIDDEN
                                .iter()
                                .any(|f| h.name.eq_ignore_ascii_case(f))
                            {
                                continue;
                            }
                            let (Ok(n), Ok(v)) = (
                                HeaderName::from_bytes(h.name.as_bytes()),
                                HeaderValue::from_bytes(h.value),
                            ) else {
                                return Err(ParseError::Chunked("invalid trailer"));
                            };
                            map.append(n, v);
                        }
                        (len, map)
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                        return Err(ParseError::Chunked("trailer section too large"))
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(_) => return Err(ParseError::Chunked("invalid trailer")),
                };
                // The trailer section ends the body (its closing empty line included).
                buf.advance(len);
                return Ok(Decoded::Trailers(map));
            }
        }
    }
}

/// `1*HEXDIG [ BWS ";" extensions ] CR` (the LF already cut off).
fn parse_chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let Some((&b'\r', line)) = line.split_last() else {
        return Err(ParseError::Chunked("chunk size line not ended by CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ParseError::Chunked("missing chunk size"));
    }
    if digits > 15 {
        return Err(ParseError::Chunked("chunk size too large"));
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).unwrap_or(0);
        size = size << 4 | u64::from(d);
    }
    let rest = &line[digits..];
    let ext = rest.iter().position(|&b| b != b' ' && b != b'\t');
    match ext.map(|i| rest[i]) {
        None => Ok(size),
        // Extensions are skipped, but not a control character among them (a bare CR, which
        // another parser may take for the end of the line: a smuggling vector).
        Some(b';') if rest.iter().all(|&b| b == b'\t' || !b.is_ascii_control()) => Ok(size),
        Some(b';') => Err(ParseError::Chunked(
            "control character in a chunk extension",
        )),
        Some(_) => Err(ParseError::Chunked("invalid chunk size")),
    }
}

/// A request that does not follow HTTP/1.1: answered by the proxy with the status of
/// [`RequestError::status`], and the connection closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// The request line or a header line is malformed.
    #[error("malformed request head: {0}")]
    Head(httparse::Error),
    /// The head does not end within the limit, or has too many headers.
    #[error("request head too large")]
    TooLarge,
    /// The request target is not a URI.
    #[error("invalid request target")]
    Target,
    /// A header name or value that HTTP does not allow.
    #[error("invalid request header {0:?}")]
    Header(String),
    /// Content-Length is not one non-negative number.
    #[error("invalid content-length")]
    ContentLength,
    /// Both Transfer-Encoding and Content-Length: ambiguous framing, the stuff of request
    /// smuggling (RFC 9112 §6.1 allows refusing it).
    #[error("both transfer-encoding and content-length")]
    Ambiguous,
    /// A transfer coding other than a final `chunked`.
    #[error("unsupported transfer-encoding")]
    TransferEncoding,
}

impl RequestError {
    /// The status the proxy answers with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::TransferEncoding => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) method: Method,
    pub(crate) uri: http::Uri,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: ReqFraming,
    /// The client allows another request on the connection after this one.
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` on a request with a body.
    pub(crate) expect_continue: bool,
    /// `CONNECT`, or `Connection: upgrade` with an `Upgrade` header.
    pub(crate) upgrade: bool,
    /// `TE: trailers`: the client accepts a trailer section.
    pub(crate) trailers: bool,
}

/// What the request path reads of a request's head, noted while the head is parsed so that
/// it is not looked up again in the header map (each lookup hashes the name; a request
/// between two proxies made five). True of the head as it came: read before any stage
/// edits the headers. For a request from hyper (HTTP/2), the same is looked up.
#[derive(Clone, Debug, Default)]
pub(crate) struct Noted {
    /// The first `Host` value.
    pub(crate) host: Option<HeaderValue>,
    /// The first `x-request-id` value.
    pub(crate) request_id: Option<HeaderValue>,
    /// The first `content-type` starts with `application/grpc`.
    pub(crate) grpc: bool,
    /// An HTTP/1.1 upgrade is asked for: `Upgrade`, and `Connection: upgrade`.
    pub(crate) upgrade: bool,
    /// The first `x-trellis-peer` value: taken out of the headers, where it never is once
    /// a request is noted. A peer's proxy writes its own for the next hop; the callee
    /// believes it only over mutual TLS; an application's goes nowhere.
    pub(crate) peer: Option<PeerValue>,
    /// The first `traceparent` value, as it came: not put into the header map either, since
    /// the request path always writes its own for the next hop (`trace::prepare_with`
    /// continues the trace it names). hyper's requests keep theirs in the map.
    pub(crate) traceparent: Option<Bytes>,
}

/// An `x-trellis-peer` value as it came: bytes of an HTTP/1.1 head, or hyper's (HTTP/2)
/// value. The head's bytes are not made a `HeaderValue`, which would check every byte again
/// (httparse did) on every request from a peer's proxy.
#[derive(Clone, Debug)]
pub(crate) enum PeerValue {
    Head(Bytes),
    Header(HeaderValue),
}

impl PeerValue {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Head(b) => b,
            Self::Header(v) => v.as_bytes(),
        }
    }
}

/// Parse a request head at the front of `buf` (at most `max` bytes) and consume it.
/// `Ok(None)`: more bytes are needed.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn parse_request_head(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<RequestHead>, RequestError> {
    parse_request_head_noting(buf, max, &mut Noted::default())
}

/// As [`parse_request_head`], noting what the request path reads in `noted` (the caller's:
/// handed on by reference, not moved with the request).
pub(crate) fn parse_request_head_noting(
    buf: &mut BytesMut,
    max: usize,
    noted: &mut Noted,
) -> Result<Option<RequestHead>, RequestError> {
    SPANS.with_borrow_mut(|spans| request_head(buf, max, noted, spans))
}

fn request_head(
    buf: &mut BytesMut,
    max: usize,
    noted: &mut Noted,
    spans: &mut Spans,
) -> Result<Option<RequestHead>, RequestError> {
    let max = max.min(MAX_HEAD);
    let parsed = match super::head::request(buf, &mut spans.at) {
        Ok(Some(p)) => p,
        Ok(None) if buf.len() > max => return Err(RequestError::TooLarge),
        Ok(None) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge),
        Err(e) => return Err(RequestError::Head(e)),
    };
    let len = parsed.len;
    if len > max {
        return Err(RequestError::TooLarge);
    }
    spans.count = parsed.fields;
    let (m, ml) = parsed.line.method;
    let method = Method::from_bytes(&buf[m..m + ml])
        .map_err(|_| RequestError::Head(httparse::Error::Token))?;
    let version = if parsed.line.version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let (t, tl) = parsed.line.target;
    let target = t..t + tl;
    let head = buf.split_to(len).freeze();
    let uri = http::Uri::from_maybe_shared(head.slice(target)).map_err(|_| RequestError::Target)?;
    // Room for the headers the proxy adds (traceparent, x-request-id): growing the map
    // rehashes it.
    let (headers, seen) = spans
        .header_map(&head, 2, noted)
        .map_err(RequestError::Header)?;
    let framing = request_framing(&headers, seen)?;
    let keep_alive = if version == Version::HTTP_10 {
        seen.connection(Seen::KEEP_ALIVE)
    } else {
        !seen.connection(Seen::CLOSE)
    };
    let expect_continue = framing != ReqFraming::None
        && version == Version::HTTP_11
        && seen.has(Seen::EXPECT)
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    // `Upgrade` with `Connection: upgrade`: the connection may switch (so may CONNECT's);
    // the request path routes it as an upgrade over HTTP/1.1 only.
    let asks_upgrade = seen.has(Seen::UPGRADE) && seen.connection(Seen::UPGRADE_TOKEN);
    let upgrade = method == Method::CONNECT || asks_upgrade;
    let trailers = seen.has(Seen::TE) && has_token(&headers, &header::TE, "trailers");
    noted.upgrade = version == Version::HTTP_11 && asks_upgrade;
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
        trailers,
    }))
}

/// How a request's body is framed (RFC 9112 §6.3): requests are never framed by the close.
fn request_framing(headers: &HeaderMap, seen: Seen) -> Result<ReqFraming, RequestError> {
    if seen.has(Seen::TRANSFER_ENCODING) {
        if seen.has(Seen::CONTENT_LENGTH) {
            return Err(RequestError::Ambiguous);
        }
        return if chunked_last(
            headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .next_back()
                .map(HeaderValue::as_bytes),
        ) {
            Ok(ReqFraming::Chunked)
        } else {
            Err(RequestError::TransferEncoding)
        };
    }
    let length = seen
        .content_length()
        .map_err(|()| RequestError::ContentLength)?;
    Ok(match length {
        None | Some(0) => ReqFraming::None,
        Some(n) => ReqFraming::Length(n),
    })
}

/// How a response body goes to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyOut {
    /// No body follows a response to HEAD or a 304: its content-length, if any, describes
    /// the representation and is passed on.
    None,
    /// No body and no content-length: 1xx, 204, and 2xx to CONNECT.
    Never,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Up to the close (HTTP/1.0 clients, length unknown).
    Eof,
}

/// Write a response head for the client. Framing and connection headers are the proxy's
/// (`connection` says `close` or, to an HTTP/1.0 client, `keep-alive`): those of the
/// response are dropped, except on a 101, whose `connection: upgrade` belongs to the
/// handshake. `date` is added when the response has none. `raw`: the lines the upstream
/// sent (and this proxy's `Proxy-Status` entry), written before `headers` (what the proxy
/// added; [`super::raw`]).
pub(crate) fn encode_response_head(
    status: StatusCode,
    raw: Option<&RawHeaders>,
    headers: &HeaderMap,
    body: BodyOut,
    connection: Option<&'static str>,
    out: &mut BytesMut,
) {
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    out.reserve(256);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    let pass_length = body == BodyOut::None;
    let mut dated = false;
    // One rule for the lines as they came and for the map's fields.
    let mut skip = |class: Class| match class {
        Class::ContentLength => !pass_length,
        Class::TransferEncoding | Class::KeepAlive => true,
        Class::Connection => !switching,
        Class::Date => {
            dated = true;
            false
        }
        _ => false,
    };
    if let Some(raw) = raw {
        raw.write_fields(out, &mut skip);
    }
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        if !skip(classify(name)) {
            put_field(out, name, value.as_bytes());
        }
    }
    match body {
        BodyOut::Length(n) => {
            out.put_slice(b"content-length: ");
            put_decimal(out, n);
            out.put_slice(b"\r\n");
        }
        BodyOut::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        BodyOut::None | BodyOut::Never | BodyOut::Eof => {}
    }
    if let Some(c) = connection.filter(|_| !switching) {
        out.put_slice(b"connection: ");
        out.put_slice(c.as_bytes());
        out.put_slice(b"\r\n");
    }
    if !dated {
        out.put_slice(b"date: ");
        put_http_date(out);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

/// The current time as an HTTP-date (RFC 9110 §5.6.7), formatted once per second per thread.
fn put_http_date(out: &mut BytesMut) {
    use std::cell::Cell;
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (at, mut text) = CACHED.get();
    if at != secs {
        text = http_date(secs);
        CACHED.set((secs, text));
    }
    out.put_slice(&text);
}

/// `secs` since the Unix epoch as `Sun, 06 Nov 1994 08:49:37 GMT`.
pub(crate) fn http_date(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as usize;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u64;
    let mut t = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    t[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    let two = |t: &mut [u8; 29], at: usize, v: u64| {
        t[at] = b'0' + (v / 10 % 10) as u8;
        t[at + 1] = b'0' + (v % 10) as u8;
    };
    two(&mut t, 5, day);
    t[8..11].copy_from_slice(MONTHS[month - 1]);
    two(&mut t, 12, year / 100);
    two(&mut t, 14, year % 100);
    two(&mut t, 17, rem / 3600);
    two(&mut t, 20, rem / 60 % 60);
    two(&mut t, 23, rem % 60);
    t
}
