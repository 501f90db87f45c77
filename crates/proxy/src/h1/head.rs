//! The request path's HTTP/1.1 head parser: a request line or status line, then the header
//! lines, as positions in the buffer. Its rules are httparse's (1.10, default configuration:
//! no space before a colon, no folded lines, no invalid line skipped; bare LF taken as CRLF;
//! blank lines before the first line skipped), and it answers as httparse does: the same
//! error, the same "more bytes needed", the same positions. `tests` checks chosen heads cut
//! at every byte and generated ones against httparse, and the `http1_request` and
//! `http1_response` fuzz targets check every input they make ([`check_against_httparse`]).
//!
//! Why not httparse itself: per call it chooses its SIMD code at run time and moves a cursor
//! type over every byte, and the codec then copied each field's position out of its array;
//! here a value is scanned eight bytes a step, a name through a table, and the positions
//! are written where [`super::codec`] keeps them. Measured (callgrind): 596 instructions a
//! request fewer over the two proxies of the mesh path, 405 on one plaintext hop
//! (docs/benchmarks.md).

use httparse::Error;

/// A header line's name and value: start and length of each in the head. Offsets fit in a
/// `u16` because a head longer than [`super::codec::MAX_HEAD`] is refused.
pub(crate) type Field = (u16, u16, u16, u16);

/// A request line: where the method and the target lie, and the minor version (`1.0` or
/// `1.1`).
pub(crate) struct RequestLine {
    pub(crate) method: (usize, usize),
    pub(crate) target: (usize, usize),
    pub(crate) version: u8,
}

/// A status line: the code and the minor version.
pub(crate) struct StatusLine {
    pub(crate) code: u16,
    pub(crate) version: u8,
}

/// A parsed head: its first line, its length (to the end of the empty line), and how many
/// fields were written.
pub(crate) struct Parsed<L> {
    pub(crate) line: L,
    pub(crate) len: usize,
    pub(crate) fields: usize,
}

/// `Ok(None)`: the head does not end within `buf` (yet).
type Step<T> = Result<Option<T>, Error>;

/// `tchar` (RFC 9110 §5.6.2): methods and field names.
static TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

/// Bytes a request target may hold (httparse's: visible ASCII and any byte from 0x80; the
/// target must then be UTF-8).
static URI: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b >= 0x21 && b <= 0x7e) || b >= 0x80;
        b += 1;
    }
    t
};

/// Bytes a field value may hold: HTAB, SP, visible ASCII, obs-text.
static VALUE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b == 0x09 || (b >= 0x20 && b <= 0x7e) || b >= 0x80;
        b += 1;
    }
    t
};

const LOW: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The first byte at or after `i` that is not a value byte (or `buf.len()`): eight bytes a
/// step while none of them is a control byte or DEL, then one at a time.
#[inline(always)]
fn value_end(buf: &[u8], mut i: usize) -> usize {
    while let Some(w) = buf.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) {
        let w = u64::from_le_bytes(w);
        // Some byte below 0x20 (exact as to whether there is one), or some byte 0x7f.
        let low = w.wrapping_sub(0x20 * LOW) & !w & HIGH;
        let del = w ^ (0x7f * LOW);
        let del = del.wrapping_sub(LOW) & !del & HIGH;
        if low | del != 0 {
            break;
        }
        i += 8;
    }
    while buf.get(i).is_some_and(|&b| VALUE[b as usize]) {
        i += 1;
    }
    i
}

/// `?` for a [`Step`]: return its error, or `Ok(None)` when it needs more bytes.
macro_rules! step {
    ($e:expr) => {
        match $e? {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

/// After the blank lines a head may start with (CRLF or LF each), where the first line
/// starts.
fn skip_empty_lines(buf: &[u8]) -> Step<usize> {
    let mut i = 0;
    loop {
        match buf.get(i) {
            None => return Ok(None),
            Some(b'\r' | b'\n') => i = step!(newline(buf, i, Error::NewLine)),
            Some(_) => return Ok(Some(i)),
        }
    }
}

/// `HTTP/1.0` or `HTTP/1.1` at `i`: the minor version. Fewer than eight bytes that could
/// still become one: `None`.
fn version(buf: &[u8], i: usize) -> Step<u8> {
    match buf.get(i..i + 8) {
        Some(b"HTTP/1.0") => Ok(Some(0)),
        Some(b"HTTP/1.1") => Ok(Some(1)),
        Some(_) => Err(Error::Version),
        None => {
            let have = &buf[i..];
            let want = &b"HTTP/1."[..have.len().min(7)];
            if have[..want.len()] == *want {
                Ok(None)
            } else {
                Err(Error::Version)
            }
        }
    }
}

/// A line end (CRLF or LF) at `i`: where the next line starts; `bad` for anything else.
#[inline(always)]
fn newline(buf: &[u8], i: usize, bad: Error) -> Step<usize> {
    match buf.get(i) {
        None => Ok(None),
        Some(b'\r') => match buf.get(i + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some(i + 2)),
            Some(_) => Err(bad),
        },
        Some(b'\n') => Ok(Some(i + 1)),
        Some(_) => Err(bad),
    }
}

/// A request head at the front of `buf`, its fields' positions written to `fields`
/// ([`Error::TooManyHeaders`] past its length).
pub(crate) fn request(buf: &[u8], fields: &mut [Field]) -> Step<Parsed<RequestLine>> {
    let mut i = step!(skip_empty_lines(buf));
    // The method: one token, then a space.
    let m = i;
    if !TOKEN[buf[i] as usize] {
        return Err(Error::Token);
    }
    i += 1;
    loop {
        match buf.get(i) {
            None => return Ok(None),
            Some(b' ') => break,
            Some(&b) if TOKEN[b as usize] => i += 1,
            Some(_) => return Err(Error::Token),
        }
    }
    let method = (m, i - m);
    i += 1;
    // The target: at least one byte, then a space; UTF-8.
    let t = i;
    while buf.get(i).is_some_and(|&b| URI[b as usize]) {
        i += 1;
    }
    match buf.get(i) {
        None => return Ok(None),
        Some(b' ') if i > t => {}
        Some(_) => return Err(Error::Token),
    }
    if std::str::from_utf8(&buf[t..i]).is_err() {
        return Err(Error::Token);
    }
    let target = (t, i - t);
    i += 1;
    let version = step!(version(buf, i));
    i = step!(newline(buf, i + 8, Error::NewLine));
    let (len, count) = step!(headers(buf, i, fields));
    Ok(Some(Parsed {
        line: RequestLine {
            method,
            target,
            version,
        },
        len,
        fields: count,
    }))
}

/// A response head at the front of `buf`, as [`request`].
pub(crate) fn response(buf: &[u8], fields: &mut [Field]) -> Step<Parsed<StatusLine>> {
    let mut i = step!(skip_empty_lines(buf));
    let version = step!(version(buf, i));
    i += 8;
    match buf.get(i) {
        None => return Ok(None),
        Some(b' ') => i += 1,
        Some(_) => return Err(Error::Version),
    }
    let mut code = 0u16;
    for _ in 0..3 {
        match buf.get(i) {
            None => return Ok(None),
            Some(&d @ b'0'..=b'9') => code = code * 10 + u16::from(d - b'0'),
            Some(_) => return Err(Error::Status),
        }
        i += 1;
    }
    // A reason after a space (HTAB, SP, visible ASCII, obs-text), or the line's end.
    match buf.get(i) {
        None => return Ok(None),
        Some(b' ') => {
            i += 1;
            loop {
                match buf.get(i) {
                    None => return Ok(None),
                    Some(b'\r' | b'\n') => break,
                    // A reason's bytes are those a field value may hold.
                    Some(&b) if VALUE[b as usize] => i += 1,
                    Some(_) => return Err(Error::Status),
                }
            }
            i = step!(newline(buf, i, Error::Status));
        }
        Some(b'\r' | b'\n') => i = step!(newline(buf, i, Error::Status)),
        Some(_) => return Err(Error::Status),
    }
    let (len, count) = step!(headers(buf, i, fields));
    Ok(Some(Parsed {
        line: StatusLine { code, version },
        len,
        fields: count,
    }))
}

/// The header lines from `i` to the empty line that ends them: the head's length and how
/// many fields were written.
fn headers(buf: &[u8], mut i: usize, fields: &mut [Field]) -> Step<(usize, usize)> {
    let mut count = 0;
    loop {
        // The empty line ends the head.
        let n = i;
        match buf.get(i) {
            None => return Ok(None),
            Some(b'\r' | b'\n') => {
                return Ok(Some((step!(newline(buf, i, Error::NewLine)), count)))
            }
            Some(&b) if TOKEN[b as usize] => i += 1,
            Some(_) => return Err(Error::HeaderName),
        }
        // The name, then a colon right after it. (Eight bytes a step, as values are, was
        // measured slower: most names are short, or end inside their first eight bytes.)
        while buf.get(i).is_some_and(|&b| TOKEN[b as usize]) {
            i += 1;
        }
        match buf.get(i) {
            None => return Ok(None),
            Some(b':') => {}
            Some(_) => return Err(Error::HeaderName),
        }
        let name = (n, i - n);
        i += 1;
        // Spaces and tabs before the value.
        while matches!(buf.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        let v = i;
        let end = value_end(buf, i);
        i = step!(newline(buf, end, Error::HeaderValue));
        let Some(slot) = fields.get_mut(count) else {
            return Err(Error::TooManyHeaders);
        };
        // Without the spaces and tabs it ends with.
        let mut e = end;
        while e > v && matches!(buf[e - 1], b' ' | b'\t') {
            e -= 1;
        }
        *slot = (name.0 as u16, name.1 as u16, v as u16, (e - v) as u16);
        count += 1;
    }
}

/// Check that [`request`] and [`response`] answer for `buf` what httparse answers, given
/// `slots` places for fields: the same error, the same "more bytes needed", or the same line,
/// length and fields (each at the same place). Panics otherwise. For the tests and the fuzz
/// targets.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn check_against_httparse(buf: &[u8], slots: usize) {
    use std::mem::MaybeUninit;
    let at = |s: &str| s.as_ptr() as usize - buf.as_ptr() as usize;
    let theirs_fields = |hs: &[httparse::Header<'_>]| -> Vec<(usize, usize, usize, usize)> {
        hs.iter()
            .map(|h| {
                (
                    at(h.name),
                    h.name.len(),
                    h.value.as_ptr() as usize - buf.as_ptr() as usize,
                    h.value.len(),
                )
            })
            .collect()
    };
    let ours_fields = |f: &[Field]| -> Vec<(usize, usize, usize, usize)> {
        f.iter()
            .map(|&(a, b, c, d)| (a as usize, b as usize, c as usize, d as usize))
            .collect()
    };
    let mut fields = vec![(0, 0, 0, 0); slots];
    let mut raw = vec![MaybeUninit::<httparse::Header<'_>>::uninit(); slots];
    let mut req = httparse::Request::new(&mut []);
    let theirs = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut raw);
    let ours = request(buf, &mut fields);
    match (&ours, theirs) {
        (Ok(None), Ok(httparse::Status::Partial)) => {}
        (Err(a), Err(b)) => assert_eq!(*a, b, "request {buf:?}"),
        (Ok(Some(p)), Ok(httparse::Status::Complete(n))) if buf.len() <= u16::MAX as usize => {
            assert_eq!(p.len, n, "request length {buf:?}");
            let m = req.method.expect("a method");
            assert_eq!(p.line.method, (at(m), m.len()), "method {buf:?}");
            let t = req.path.expect("a target");
            assert_eq!(p.line.target, (at(t), t.len()), "target {buf:?}");
            assert_eq!(Some(p.line.version), req.version, "version {buf:?}");
            assert_eq!(
                ours_fields(&fields[..p.fields]),
                theirs_fields(req.headers),
                "fields {buf:?}"
            );
        }
        // Positions past 64 KiB do not fit a `Field` (the codec refuses such heads).
        (Ok(Some(p)), Ok(httparse::Status::Complete(n))) => assert_eq!(p.len, n),
        (a, b) => panic!(
            "request {buf:?}: ours {:?}, httparse {b:?}",
            a.as_ref().map(|p| p.as_ref().map(|p| p.len))
        ),
    }
    let mut raw = vec![MaybeUninit::<httparse::Header<'_>>::uninit(); slots];
    let mut res = httparse::Response::new(&mut []);
    let theirs = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut raw);
    let ours = response(buf, &mut fields);
    match (&ours, theirs) {
        (Ok(None), Ok(httparse::Status::Partial)) => {}
        (Err(a), Err(b)) => assert_eq!(*a, b, "response {buf:?}"),
        (Ok(Some(p)), Ok(httparse::Status::Complete(n))) if buf.len() <= u16::MAX as usize => {
            assert_eq!(p.len, n, "response length {buf:?}");
            assert_eq!(Some(p.line.code), res.code, "code {buf:?}");
            assert_eq!(Some(p.line.version), res.version, "version {buf:?}");
            assert_eq!(
                ours_fields(&fields[..p.fields]),
                theirs_fields(res.headers),
                "fields {buf:?}"
            );
        }
        (Ok(Some(p)), Ok(httparse::Status::Complete(n))) => assert_eq!(p.len, n),
        (a, b) => panic!(
            "response {buf:?}: ours {:?}, httparse {b:?}",
            a.as_ref().map(|p| p.as_ref().map(|p| p.len))
        ),
    }
}

#[cfg(test)]
mod tests;
