//! Bodies: the request body sent upstream (possibly replayable for retries) and the response
//! body sent to the client, which records the exchange when it ends or is dropped.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub(crate) use crate::error::BoxError;
use crate::{
    error::{Error, Kind},
    h1::raw::{Lines, RawHeaders},
};

/// The client's request body: read by the proxy's own HTTP/1.1 server, or by hyper's
/// HTTP/2 one. Boxed, so that a request is 256 bytes at most: a request moves whole from
/// stage to stage several times (into each stage's future, out of routing's answer), and
/// glibc's `memcpy` copies up to 256 bytes without a loop. Unboxed (72 bytes) the request
/// was 296, and each move took the longer path. The box is one allocation for an HTTP/1.1
/// request that has a body (none for one without) and for every HTTP/2 request; those
/// still cost fewer instructions than before, as their moves shrank too.
pub(crate) enum ClientBody {
    /// No body.
    Empty,
    /// From an HTTP/1.1 connection.
    H1(Box<crate::h1::server::ReqBody>),
    /// From hyper (HTTP/2).
    Hyper(Box<Incoming>),
    /// Chunks held in memory (tests). Boxed too, so that a test build's sizes are the
    /// product's (`requests_and_responses_move_in_256_bytes_or_fewer`).
    #[cfg(test)]
    #[allow(clippy::box_collection)]
    Chunks(Box<std::collections::VecDeque<Bytes>>),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::H1(b) => Pin::new(b).poll_frame(cx),
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            #[cfg(test)]
            Self::Chunks(c) => Poll::Ready(c.pop_front().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::H1(b) => b.is_end_stream(),
            Self::Hyper(b) => b.is_end_stream(),
            #[cfg(test)]
            Self::Chunks(c) => c.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::H1(b) => b.size_hint(),
            Self::Hyper(b) => b.size_hint(),
            #[cfg(test)]
            Self::Chunks(c) => SizeHint::with_exact(c.iter().map(|b| b.len() as u64).sum()),
        }
    }
}

/// A request body on its way upstream.
pub(crate) enum UpBody {
    /// No body.
    Empty,
    /// The client's body, streamed once.
    Incoming(ClientBody),
    /// The client's body, recorded so that a retry can send it again.
    Replay(Replay),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Incoming(b) => Pin::new(b).poll_frame(cx),
            Self::Replay(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Incoming(b) => b.is_end_stream(),
            Self::Replay(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Incoming(b) => b.size_hint(),
            Self::Replay(b) => b.size_hint(),
        }
    }
}

struct ReplayState {
    rest: ClientBody,
    recorded: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    ended: bool,
    overflow: bool,
    size: usize,
    cap: usize,
}

/// A body that streams the client's body through while keeping a copy (up to `cap` bytes), so
/// that a later try can replay it. Tries run one after another, so one lock suffices; nothing
/// waits for the whole body before the first try starts, so streaming calls do not deadlock.
pub(crate) struct Replay {
    shared: Arc<Mutex<ReplayState>>,
    pos: usize,
    trailers_sent: bool,
}

impl Replay {
    /// Wrap `body`, recording at most `cap` bytes.
    pub(crate) fn new(body: ClientBody, cap: usize) -> Self {
        let ended = body.is_end_stream();
        let state = ReplayState {
            rest: body,
            recorded: Vec::new(),
            trailers: None,
            ended,
            overflow: false,
            size: 0,
            cap,
        };
        Self {
            shared: Arc::new(Mutex::new(state)),
            pos: 0,
            trailers_sent: false,
        }
    }

    /// Whether the body is still within the cap, so that a retry can resend it.
    pub(crate) fn can_replay(&self) -> bool {
        !self.shared.lock().expect("replay lock").overflow
    }

    /// Whether the whole body has been read and kept (a copy then needs nothing more from
    /// the client).
    pub(crate) fn complete(&self) -> bool {
        let s = self.shared.lock().expect("replay lock");
        s.ended && !s.overflow
    }

    /// A fresh copy for the next try, or `None` if the body outgrew the cap.
    pub(crate) fn replay(&self) -> Option<Self> {
        let s = self.shared.lock().expect("replay lock");
        (!s.overflow).then(|| Self {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
        })
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this.shared.lock().expect("replay lock");
        if this.pos < s.recorded.len() {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.recorded[this.pos - 1].clone()))));
        }
        if s.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut s.rest).poll_frame(cx)) {
            None => {
                s.ended = true;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflow {
                        s.size += data.len();
                        if s.size > s.cap {
                            s.overflow = true;
                        } else {
                            s.recorded.push(data.clone());
                            this.pos = s.recorded.len();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.ended = true;
                    this.trailers_sent = true;
                }
                if s.rest.is_end_stream() {
                    s.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock().expect("replay lock");
        s.ended && self.pos >= s.recorded.len() && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.shared.lock().expect("replay lock");
        if s.ended {
            let n: usize = s.recorded[self.pos.min(s.recorded.len())..]
                .iter()
                .map(Bytes::len)
                .sum();
            SizeHint::with_exact(n as u64)
        } else if self.pos == 0 && s.recorded.is_empty() {
            s.rest.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// What happens when a response body ends: implemented by the request's record.
pub(crate) trait OnEnd: Send + 'static {
    /// The body reached its end; `trailers` if any.
    fn trailers(&mut self, trailers: &HeaderMap);
    /// The stream ended cleanly.
    fn end(&mut self);
    /// Reading from upstream failed, or a timeout cut the body short.
    fn error(&mut self, err: &Error);
}

enum Inner {
    Full(Option<Bytes>),
    /// From an HTTP/2 upstream (the proxy's own client, `h2_client`).
    H2(H2Body),
    /// From an HTTP/1.1 upstream (the proxy's own client).
    H1(crate::h1::H1Body),
    /// From hyper's HTTP/1.1 client: a peer proxy's answer to a protocol switch it refused.
    Hyper(Incoming),
    /// An opaque stream's bytes back to a caller's proxy (`crate::pipe`).
    Pipe(crate::pipe::PipeBody),
}

/// A response body from upstream.
pub(crate) enum UpstreamBody {
    /// HTTP/2.
    H2(H2Body),
    /// HTTP/1.1.
    H1(crate::h1::H1Body),
    /// HTTP/1.1 read by hyper (a peer proxy's answer on a connection made for an upgrade).
    Hyper(Incoming),
}

/// A response body from an HTTP/2 upstream; what it reads is given back to the peer's flow
/// control at once (the proxy's own buffering is bounded by its client's).
pub(crate) struct H2Body {
    recv: h2::RecvStream,
    /// Still reading DATA frames (then the trailers).
    data: bool,
    /// What is left to read, when the head gave a `content-length`: the size hint that lets
    /// the HTTP/1.1 server answer its client with a length rather than chunks.
    remaining: Option<u64>,
}

impl H2Body {
    /// The body of a message whose head is `headers`.
    pub(crate) fn new(recv: h2::RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        Self {
            recv,
            data: true,
            remaining,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if self.data {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    if let Some(r) = self.remaining.as_mut() {
                        *r = r.saturating_sub(b.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data = false,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The response body sent to the client.
pub(crate) struct ProxyBody {
    inner: Inner,
    on_end: Option<Box<dyn OnEnd>>,
    limits: Limits,
}

/// Timeouts that still run while the body streams: the route's deadline for the whole
/// exchange, and the longest silence allowed between two frames.
#[derive(Default)]
pub(crate) struct Limits {
    /// The deadline, and the timeout it came from (for the message).
    pub(crate) deadline: Option<(Instant, Duration)>,
    /// Idle timeout.
    pub(crate) idle: Option<Duration>,
    /// Armed at the first wait: a body that is ready at once costs no timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame came since the timer was armed.
    progressed: bool,
}

impl Limits {
    /// The limits of a response whose exchange has `deadline` and `idle`.
    pub(crate) fn new(deadline: Option<(Instant, Duration)>, idle: Option<Duration>) -> Self {
        Self {
            deadline,
            idle,
            timer: None,
            progressed: false,
        }
    }

    fn is_none(&self) -> bool {
        self.deadline.is_none() && self.idle.is_none()
    }

    fn next(
        deadline: Option<(Instant, Duration)>,
        idle: Option<Duration>,
        now: Instant,
    ) -> Instant {
        let idle = idle.map(|i| now + i);
        match (deadline.map(|d| d.0), idle) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(now),
        }
    }

    /// While the body waits: the failure when a limit passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
        loop {
            let timer = match &mut self.timer {
                Some(t) => t,
                None => {
                    let at = Self::next(self.deadline, self.idle, Instant::now());
                    self.progressed = false;
                    self.timer.insert(Box::pin(tokio::time::sleep_until(at)))
                }
            };
            ready!(timer.as_mut().poll(cx));
            let now = Instant::now();
            if let Some((at, t)) = self.deadline {
                if now >= at {
                    return Poll::Ready(Error::new(
                        Kind::Timeout,
                        format!("the route's timeout of {t:?} passed while the response streamed"),
                    ));
                }
            }
            if self.progressed {
                self.progressed = false;
                let at = Self::next(self.deadline, self.idle, now);
                timer.as_mut().reset(at);
                continue;
            }
            let idle = self.idle.unwrap_or_default();
            return Poll::Ready(Error::new(
                Kind::Idle,
                format!("the upstream sent nothing for {idle:?} while the response streamed"),
            ));
        }
    }
}

/// An HTTP/1.1 upstream's body carries its response's header lines.
impl Lines for UpstreamBody {
    fn lines(&self) -> Option<&RawHeaders> {
        match self {
            Self::H1(b) => b.lines(),
            _ => None,
        }
    }

    fn slot(&mut self) -> Option<&mut Option<Box<RawHeaders>>> {
        match self {
            Self::H1(b) => b.slot(),
            _ => None,
        }
    }
}

/// And so does the body relayed from it.
impl Lines for ProxyBody {
    fn lines(&self) -> Option<&RawHeaders> {
        match &self.inner {
            Inner::H1(b) => b.lines(),
            _ => None,
        }
    }

    fn slot(&mut self) -> Option<&mut Option<Box<RawHeaders>>> {
        match &mut self.inner {
            Inner::H1(b) => b.slot(),
            _ => None,
        }
    }
}

impl ProxyBody {
    /// A complete body.
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Self {
            inner: Inner::Full((!b.is_empty()).then_some(b)),
            on_end: None,
            limits: Limits::default(),
        }
    }

    /// The bytes of an opaque stream, as they are written into `b`.
    pub(crate) fn pipe(b: crate::pipe::PipeBody) -> Self {
        Self {
            inner: Inner::Pipe(b),
            on_end: None,
            limits: Limits::default(),
        }
    }

    /// Stream an upstream body, within `limits`.
    pub(crate) fn upstream(b: UpstreamBody, limits: Limits) -> Self {
        Self {
            inner: match b {
                UpstreamBody::H2(b) => Inner::H2(b),
                UpstreamBody::H1(b) => Inner::H1(b),
                UpstreamBody::Hyper(b) => Inner::Hyper(b),
            },
            on_end: None,
            limits,
        }
    }

    /// Attach the record that is completed when the body ends (or is dropped early).
    pub(crate) fn with_on_end(mut self, r: Box<dyn OnEnd>) -> Self {
        if self.is_end_stream() {
            let mut r = r;
            r.end();
            return self;
        }
        self.on_end = Some(r);
        self
    }
}

impl ProxyBody {
    /// The body failed with `e`: recorded, then handed to the server, which cuts the
    /// response short for the client.
    fn failed(&mut self, e: Error) -> BoxError {
        if let Some(mut r) = self.on_end.take() {
            r.error(&e);
        }
        Box::new(e)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let res = match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::H2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Inner::H1(b) => Pin::new(b).poll_frame(cx),
            Inner::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Inner::Pipe(b) => Pin::new(b).poll_frame(cx),
        };
        let res = match res {
            Poll::Ready(r) => r,
            Poll::Pending if this.limits.is_none() => return Poll::Pending,
            Poll::Pending => {
                let e = ready!(this.limits.poll_expired(cx));
                // The upstream body is dropped with the body: its connection is closed.
                this.inner = Inner::Full(None);
                return Poll::Ready(Some(Err(this.failed(e))));
            }
        };
        this.limits.progressed = true;
        match res {
            Some(Ok(f)) => {
                if let (Some(t), Some(r)) = (f.trailers_ref(), this.on_end.as_mut()) {
                    r.trailers(t);
                }
                if this.is_end_stream() {
                    if let Some(mut r) = this.on_end.take() {
                        r.end();
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            Some(Err(e)) => {
                let e = Error::with_cause(Kind::ResponseBody, "reading the response body", e);
                Poll::Ready(Some(Err(this.failed(e))))
            }
            None => {
                if let Some(mut r) = this.on_end.take() {
                    r.end();
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::H2(b) => b.is_end_stream(),
            Inner::H1(b) => b.is_end_stream(),
            Inner::Hyper(b) => b.is_end_stream(),
            Inner::Pipe(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::H2(b) => b.size_hint(),
            Inner::H1(b) => b.size_hint(),
            Inner::Hyper(b) => b.size_hint(),
            Inner::Pipe(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;

    /// Requests and responses move whole from stage to stage (into each stage's future, out
    /// of routing's answer): 256 bytes is the most glibc's `memcpy` copies without a loop
    /// (see [`ClientBody`]). A field that grows one of them past it costs every move.
    #[test]
    fn requests_and_responses_move_in_256_bytes_or_fewer() {
        for (what, size) in [
            ("a client's request", size_of::<http::Request<ClientBody>>()),
            ("a request upstream", size_of::<http::Request<UpBody>>()),
            (
                "a response to a client",
                size_of::<http::Response<ProxyBody>>(),
            ),
            (
                "an upstream's response",
                size_of::<http::Response<UpstreamBody>>(),
            ),
        ] {
            assert!(size <= 256, "{what}: {size} bytes");
        }
    }

    /// A response body moves on its own too (five times a request, into and out of the
    /// stages' futures and the server's): up to 128 bytes the compiler copies it inline,
    /// past that through a call to `memcpy` (the `MOVES=1` counts of `bench/mtls.sh`).
    #[test]
    fn a_response_body_moves_in_128_bytes_or_fewer() {
        assert!(size_of::<ProxyBody>() <= 128, "{}", size_of::<ProxyBody>());
    }
}
