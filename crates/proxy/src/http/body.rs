//! Bodies: the request body sent upstream (possibly replayable for retries) and the response
//! body sent to the client, which records the exchange when it ends or is dropped.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Boxed body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body: read by the proxy's own HTTP/1.1 server, or by hyper's
/// HTTP/2 one.
pub enum ClientBody {
    /// No body.
    Empty,
    /// From an HTTP/1.1 connection.
    H1(crate::h1::server::ReqBody),
    /// From hyper (HTTP/2).
    Hyper(Incoming),
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::H1(b) => b.is_end_stream(),
            Self::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::H1(b) => b.size_hint(),
            Self::Hyper(b) => b.size_hint(),
        }
    }
}

/// A request body on its way upstream.
pub enum UpBody {
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
pub struct Replay {
    shared: Arc<Mutex<ReplayState>>,
    pos: usize,
    trailers_sent: bool,
}

impl Replay {
    /// Wrap `body`, recording at most `cap` bytes.
    pub fn new(body: ClientBody, cap: usize) -> Self {
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
    pub fn can_replay(&self) -> bool {
        !self.shared.lock().expect("replay lock").overflow
    }

    /// A fresh copy for the next try, or `None` if the body outgrew the cap.
    pub fn replay(&self) -> Option<Self> {
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
pub trait OnEnd: Send + 'static {
    /// The body reached its end; `trailers` if any.
    fn trailers(&mut self, trailers: &HeaderMap);
    /// The stream ended cleanly.
    fn end(&mut self);
    /// Reading from upstream failed.
    fn error(&mut self, err: &(dyn std::error::Error + 'static));
}

enum Inner {
    Full(Option<Bytes>),
    /// From an HTTP/2 upstream (hyper's client).
    H2(Incoming),
    /// From an HTTP/1.1 upstream (the proxy's own client).
    H1(crate::h1::H1Body),
}

/// A response body from upstream.
pub enum UpstreamBody {
    /// HTTP/2.
    H2(Incoming),
    /// HTTP/1.1.
    H1(crate::h1::H1Body),
}

/// The response body sent to the client.
pub struct ProxyBody {
    inner: Inner,
    on_end: Option<Box<dyn OnEnd>>,
}

impl ProxyBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Self {
            inner: Inner::Full((!b.is_empty()).then_some(b)),
            on_end: None,
        }
    }

    /// Stream an upstream body.
    pub fn upstream(b: UpstreamBody) -> Self {
        Self {
            inner: match b {
                UpstreamBody::H2(b) => Inner::H2(b),
                UpstreamBody::H1(b) => Inner::H1(b),
            },
            on_end: None,
        }
    }

    /// Attach the record that is completed when the body ends (or is dropped early).
    pub fn with_on_end(mut self, r: Box<dyn OnEnd>) -> Self {
        if self.is_end_stream() {
            let mut r = r;
            r.end();
            return self;
        }
        self.on_end = Some(r);
        self
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
        };
        let res = ready!(res);
        match &res {
            Some(Ok(f)) => {
                if let (Some(t), Some(r)) = (f.trailers_ref(), this.on_end.as_mut()) {
                    r.trailers(t);
                }
                if this.is_end_stream() {
                    if let Some(mut r) = this.on_end.take() {
                        r.end();
                    }
                }
            }
            Some(Err(e)) => {
                if let Some(mut r) = this.on_end.take() {
                    r.error(e.as_ref());
                }
            }
            None => {
                if let Some(mut r) = this.on_end.take() {
                    r.end();
                }
            }
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::H2(b) => b.is_end_stream(),
            Inner::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::H2(b) => b.size_hint(),
            Inner::H1(b) => b.size_hint(),
        }
    }
}
