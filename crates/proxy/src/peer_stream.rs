//! An opaque TCP stream between two Trellis proxies over mutual TLS: one of many on an HTTP/2
//! connection ([`ALPN_TCP_STREAMS`], [`crate::h2_stream`]), or one on a connection of its own
//! (ALPN `trellis-tcp/2`). Either way, before the stream's first byte the caller's proxy says
//! who calls (its `x-trellis-peer`:
//! service, workload, environment, locality), and the callee's proxy answers whether its
//! application took the connection, with the failure's class and detail when it did not.
//!
//! The hello also carries a span of the caller's (a `traceparent`: its span of the stream, or
//! the try of the CONNECT that opened it), under which the callee's span of the stream joins
//! the caller's trace.
//!
//! So the caller records a refusal as the callee saw it (`connect_refused`, `denied`,
//! `overloaded`), not as a reset of a stream that had been accepted; it tries another
//! endpoint, as for a failed connect, and an endpoint whose application is down is ejected
//! by its TCP callers too. The callee records which workload called, as it does for an HTTP
//! request. The caller relays no byte of its client's until the answer has come (HBONE's
//! CONNECT waits the same way): one round trip more per connection, nothing per byte.
//!
//! Each is one frame: a two-byte big-endian length, then that many bytes (at most
//! [`MAX_FRAME`]) of `name=value` lines. Names not known are skipped, so either side may add
//! one. A peer that offers only `trellis-tcp` (a proxy older than this) gets the bare stream,
//! as before.

use std::{io, time::Duration};

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    error::{Error, FailureClass, Kind},
    trace::SpanContext,
};

/// The ALPN of a stream that starts with the hello and the answer.
pub(crate) const ALPN_TCP_HELLO: &[u8] = b"trellis-tcp/2";

/// The ALPN of an HTTP/2 connection that carries opaque TCP streams only, each a request of
/// method [`STREAM_METHOD`] that opens with the same hello and answer
/// ([`crate::h2_stream`]). Kept apart from the connection that carries HTTP requests, with
/// flow-control windows of its own, so that a stream whose reader stalls does not hold up
/// requests. A callee older than this agrees to none of it, and its callers open a
/// connection per stream as before.
pub(crate) const ALPN_TCP_STREAMS: &[u8] = b"trellis-tcp/h2";

/// The method of a request that is an opaque TCP stream to the service port its connection is
/// for, on an [`ALPN_TCP_STREAMS`] connection.
pub(crate) const STREAM_METHOD: &str = "TRELLIS-TCP";

/// How many opaque streams one [`ALPN_TCP_STREAMS`] connection carries at most (ztunnel's
/// HBONE pools likewise cap streams per connection); past it a stream has a connection of its
/// own. The callee allows a few more at once, for those still closing.
pub(crate) const MAX_STREAMS: usize = 100;

/// The flow-control window of each stream on an [`ALPN_TCP_STREAMS`] connection, both ways: a
/// stream whose reader stalls holds at most this much of its connection's window. 256 KiB is
/// ~2 Gbit/s per stream at a 1-ms round trip.
pub(crate) const STREAM_WINDOW: u32 = 256 * 1024;

/// The flow-control window of an [`ALPN_TCP_STREAMS`] connection, both ways: more than
/// [`MAX_STREAMS`] stalled streams hold, so that no number of them holds up the others (at the
/// cost of up to 25 MiB buffered should all stall at once).
pub(crate) const STREAMS_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// The largest hello or answer either side reads.
pub(crate) const MAX_FRAME: usize = 2048;

/// How long either side waits for the other's frame: the callee for the hello, the caller for
/// the answer (which comes once the callee's connect to its application has ended, itself
/// bounded by the callee's connect timeout).
pub(crate) const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// What the caller's proxy says before the stream.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Hello {
    /// The caller's `x-trellis-peer`.
    pub(crate) peer: Option<HeaderValue>,
    /// The caller's span the callee's span of the stream is a child of.
    pub(crate) trace: Option<SpanContext>,
}

/// What the callee's proxy answers: connected when its application took the connection (the
/// stream follows; class `ok` on the wire), else the failure's class and detail (the stream
/// is closed).
#[derive(Debug, PartialEq)]
pub(crate) enum Answer {
    /// The stream follows.
    Connected,
    /// The callee's proxy could not, or would not, connect.
    Refused {
        /// The failure's class, as the callee's proxy recorded it.
        class: FailureClass,
        /// What it said.
        detail: String,
    },
}

/// Whether `b` is written and read as a space: a control character but a tab (a line break
/// in a value would end its line).
fn blanked(b: u8) -> bool {
    b < b' ' && b != b'\t'
}

/// A frame of `lines`, which the callers keep within [`MAX_FRAME`].
fn frame(lines: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    for (name, value) in lines {
        body.extend_from_slice(name.as_bytes());
        body.push(b'=');
        body.extend(value.iter().map(|&b| if blanked(b) { b' ' } else { b }));
        body.push(b'\n');
    }
    debug_assert!(body.len() <= MAX_FRAME, "a frame of {} bytes", body.len());
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// The `name=value` lines of a frame's body; a line without `=` is refused.
fn lines(body: &[u8]) -> io::Result<Vec<(&[u8], &[u8])>> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let eq = l.iter().position(|b| *b == b'=');
            eq.map(|i| (&l[..i], &l[i + 1..])).ok_or_else(|| {
                invalid(format!(
                    "a line without '=': {:?}",
                    String::from_utf8_lossy(l)
                ))
            })
        })
        .collect()
}

/// One frame's body, read within [`FRAME_TIMEOUT`]: a frame too long is `InvalidData`, one
/// cut short `UnexpectedEof`, none in time `TimedOut`, each saying so.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Vec<u8>> {
    let read = async {
        let len = usize::from(s.read_u16().await?);
        if len > MAX_FRAME {
            return Err(invalid(format!(
                "a frame of {len} bytes (at most {MAX_FRAME})"
            )));
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await?;
        Ok(body)
    };
    match tokio::time::timeout(FRAME_TIMEOUT, read).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed before the frame ended",
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no frame within {FRAME_TIMEOUT:?}"),
        )),
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(s: &mut S, frame: &[u8]) -> io::Result<()> {
    s.write_all(frame).await?;
    s.flush().await
}

/// A hello's body: `peer` and `traceparent` read (a trace context not valid is skipped, as
/// an HTTP request's is: the callee starts a trace), other names skipped.
pub(crate) fn parse_hello(body: &[u8]) -> io::Result<Hello> {
    let mut hello = Hello::default();
    for (name, value) in lines(body)? {
        match name {
            b"peer" => {
                let v = HeaderValue::from_bytes(value)
                    .map_err(|_| invalid("the peer is not a header value".into()))?;
                hello.peer = Some(v);
            }
            b"traceparent" => hello.trace = SpanContext::parse(value),
            _ => {}
        }
    }
    Ok(hello)
}

/// A hello as a frame. A caller that does not fit is not named (rather than named wrong).
pub(crate) fn hello_frame(hello: &Hello) -> Vec<u8> {
    let tp = hello.trace.map(|t| t.traceparent());
    let mut lines: Vec<(&str, &[u8])> = Vec::with_capacity(2);
    if let Some(tp) = &tp {
        lines.push(("traceparent", tp));
    }
    let room = MAX_FRAME - tp.map_or(0, |t| "traceparent=\n".len() + t.len());
    if let Some(p) = hello
        .peer
        .as_ref()
        .filter(|p| "peer=\n".len() + p.len() <= room)
    {
        lines.push(("peer", p.as_bytes()));
    }
    frame(&lines)
}

/// An answer's body: `class` (`ok`, or the failure's) and `detail` read, other names
/// skipped; a class not known is refused.
pub(crate) fn parse_answer(body: &[u8]) -> io::Result<Answer> {
    let (mut class, mut detail) = (None, String::new());
    for (name, value) in lines(body)? {
        match name {
            b"class" => {
                class = Some(FailureClass::from_bytes(value).ok_or_else(|| {
                    invalid(format!(
                        "an unknown class {:?}",
                        String::from_utf8_lossy(value)
                    ))
                })?)
            }
            b"detail" => {
                let v: Vec<u8> = value
                    .iter()
                    .map(|&b| if blanked(b) { b' ' } else { b })
                    .collect();
                detail = String::from_utf8_lossy(&v).into_owned();
            }
            _ => {}
        }
    }
    match class {
        Some(FailureClass::Ok) => Ok(Answer::Connected),
        Some(class) => Ok(Answer::Refused { class, detail }),
        None => Err(invalid("an answer without a class".into())),
    }
}

/// An answer as a frame.
pub(crate) fn answer_frame(answer: &Answer) -> Vec<u8> {
    match answer {
        Answer::Connected => frame(&[("class", FailureClass::Ok.as_str().as_bytes())]),
        Answer::Refused { class, detail } => {
            let class = class.as_str();
            // A detail that does not fit loses its tail, at a character's boundary.
            let room = MAX_FRAME - "class=\ndetail=\n".len() - class.len();
            let mut end = detail.len().min(room);
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            frame(&[
                ("class", class.as_bytes()),
                ("detail", &detail.as_bytes()[..end]),
            ])
        }
    }
}

/// The callee's side: the caller's hello. A frame cut short, too long or malformed is the
/// caller's fault: the stream is refused.
pub(crate) async fn read_hello<S: AsyncRead + Unpin>(s: &mut S) -> Result<Hello, Error> {
    let bad = |e: io::Error| Error::new(Kind::BadRequest, format!("the caller's hello: {e}"));
    read_frame(s)
        .await
        .and_then(|body| parse_hello(&body))
        .map_err(bad)
}

/// The caller's side: say who calls.
pub(crate) async fn write_hello<S: AsyncWrite + Unpin>(s: &mut S, hello: &Hello) -> io::Result<()> {
    write_frame(s, &hello_frame(hello)).await
}

/// The callee's side: the stream follows (`None`), or `Some(failure)` and it does not.
pub(crate) async fn write_answer<S: AsyncWrite + Unpin>(
    s: &mut S,
    failure: Option<&Error>,
) -> io::Result<()> {
    let answer = match failure {
        None => Answer::Connected,
        Some(e) => Answer::Refused {
            class: e.class(),
            detail: e.to_string(),
        },
    };
    write_frame(s, &answer_frame(&answer)).await
}

/// The caller's side: the callee's answer. A frame that cannot be read, or a class not
/// known, is an I/O error of its kind (the stream cut, no answer in time, a broken answer).
pub(crate) async fn read_answer<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Answer> {
    parse_answer(&read_frame(s).await?)
}

#[cfg(test)]
mod tests;
