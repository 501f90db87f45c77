//! The client-facing HTTP/1.1 server, driven in the connection's own task.
//!
//! hyper's server dispatcher parses into its own buffers, keeps a per-request header-read
//! timer, and moves every request's service future (several KiB here) into place. The
//! proxy's request path already owns an HTTP/1.1 codec for its upstream side, so the client
//! side uses it too: one loop reads a request head, hands the request to the proxy, and
//! writes the response, with the head and a small body in one write. HTTP/2, and the rare
//! connection whose first bytes do not decide the protocol, stay on hyper.
//!
//! A request body is read from the same socket by whoever holds it (the upstream exchange,
//! possibly after the response has begun); the read buffer comes back to the connection
//! when the body ends, and the connection is kept alive only if it did.

use std::{
    future::{poll_fn, Future},
    io,
    pin::{pin, Pin},
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    net::TcpStream,
    sync::oneshot,
    time::{Instant, Sleep},
};

use super::{
    codec::{self, BodyOut, Decoder, ParseError, ReqFraming, RequestError, RespFraming},
    poll_body_frame,
    raw::Lines,
    BodyRead, BoxError, Link, COALESCE, MIN_READ,
};
use crate::mux::MuxStream;

/// Limits of a client connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Time from a request's first byte (or the connection's) to the end of its head.
    pub(crate) header_read_timeout: Duration,
    /// Largest request head.
    pub(crate) max_head: usize,
    /// Time a kept-alive connection may wait for its next request to begin.
    pub(crate) idle_timeout: Duration,
}

/// The read side of a connection: bytes read but not yet consumed.
struct Reader {
    rbuf: BytesMut,
    read_size: usize,
}

/// Where a request body returns the read side when it ends.
type Home = Arc<Mutex<Option<Reader>>>;

/// What writing the response needs to know about its request.
struct Current {
    head: bool,
    connect: bool,
    http10: bool,
    keep_alive: bool,
    trailers: bool,
    upgrade: Option<oneshot::Sender<Switched>>,
}

/// One client connection speaking HTTP/1.1.
pub(crate) struct ServerConn {
    io: Arc<Link>,
    reader: Option<Reader>,
    home: Option<Home>,
    wbuf: BytesMut,
    limits: Limits,
    timer: Pin<Box<Sleep>>,
    drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    current: Option<Current>,
    /// A response switched protocols: the socket goes to the tunnel.
    upgrade: Option<oneshot::Sender<Switched>>,
    served: bool,
}

/// Why no request came.
enum Stop {
    Closed,
    TimedOut,
    Bad(RequestError),
}

/// What the connection read next. Short-lived, on the stack: boxing the request would cost an
/// allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Incoming {
    /// A request; its body, if any, is read from the connection by whoever holds it.
    Request(Request<Option<Box<ReqBody>>>),
    /// A malformed request: answer it with [`ServerConn::reject`], then the connection ends.
    Malformed(RequestError),
    /// A request head began but did not end within the header-read timeout (the connection
    /// ends; answer with [`ServerConn::reject`]).
    HeadTimeout,
    /// Nothing more: closed by the client, idle past its timeout, draining, or unusable.
    Done,
}

impl ServerConn {
    /// Serve `io`; `drained` completes when the proxy starts draining.
    pub(crate) fn new(
        io: TcpStream,
        limits: Limits,
        drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Self {
        Self::with(Link::Tcp(io), limits, drained)
    }

    /// Serve a stream of a peer proxy's connection ([`crate::mux`]) as a connection.
    pub(crate) fn over_mux(
        stream: MuxStream,
        limits: Limits,
        drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Self {
        Self::with(Link::Mux(stream), limits, drained)
    }

    fn with(io: Link, limits: Limits, drained: Pin<Box<dyn Future<Output = ()> + Send>>) -> Self {
        Self {
            io: Arc::new(io),
            reader: Some(Reader {
                rbuf: BytesMut::new(),
                read_size: MIN_READ,
            }),
            home: None,
            wbuf: BytesMut::new(),
            limits,
            timer: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            drained,
            current: None,
            upgrade: None,
            served: false,
        }
    }

    /// What the client sends next: a request, a malformed one, a head that did not come
    /// in time, or nothing more (closed by the client, idle past its timeout, draining, or
    /// unusable after an unfinished request body). What the request path reads of the
    /// request's head goes to `noted`.
    pub(crate) async fn next_request(&mut self, noted: &mut codec::Noted) -> Incoming {
        let rd = match self.reader.take() {
            Some(rd) => Some(rd),
            None => self
                .home
                .as_ref()
                .and_then(|h| h.lock().expect("home lock").take()),
        };
        let Some(mut rd) = rd else {
            return Incoming::Done;
        };
        let mut idle = self.served && rd.rbuf.is_empty();
        // Set when the first wait begins: a head that is whole when it is first read (the
        // usual one) costs no clock read.
        let mut deadline = None;
        let head = poll_fn(|cx| self.poll_head(&mut rd, &mut idle, &mut deadline, noted, cx)).await;
        let head = match head {
            Ok(h) => h,
            Err(Stop::Closed) => return Incoming::Done,
            // An idle connection that timed out is no request; a head begun and not
            // finished is.
            Err(Stop::TimedOut) if idle || rd.rbuf.is_empty() => return Incoming::Done,
            Err(Stop::TimedOut) => return Incoming::HeadTimeout,
            Err(Stop::Bad(e)) => return Incoming::Malformed(e),
        };
        self.served = true;
        let codec::RequestHead {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            expect_continue,
            upgrade,
            trailers,
        } = head;
        let body = match framing {
            ReqFraming::None => {
                self.reader = Some(rd);
                None
            }
            framing => {
                if expect_continue
                    && self
                        .io
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await
                        .is_err()
                {
                    return Incoming::Done;
                }
                let home = self.home.get_or_insert_with(Home::default).clone();
                Some(Box::new(ReqBody::new(self.io.clone(), rd, framing, home)))
            }
        };
        let mut req = Request::new(body);
        let tx = upgrade.then(|| {
            let (tx, rx) = oneshot::channel();
            req.extensions_mut()
                .insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
            tx
        });
        self.current = Some(Current {
            head: method == Method::HEAD,
            connect: method == Method::CONNECT,
            http10: version == Version::HTTP_10,
            keep_alive,
            trailers,
            upgrade: tx,
        });
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        Incoming::Request(req)
    }

    fn poll_head(
        &mut self,
        rd: &mut Reader,
        idle: &mut bool,
        deadline: &mut Option<Instant>,
        noted: &mut codec::Noted,
        cx: &mut Context<'_>,
    ) -> Poll<Result<codec::RequestHead, Stop>> {
        loop {
            if !rd.rbuf.is_empty() {
                if *idle {
                    // The next request began: its head has the header-read timeout, from
                    // the first wait for the rest of it.
                    *idle = false;
                    *deadline = None;
                }
                match codec::parse_request_head_noting(&mut rd.rbuf, self.limits.max_head, noted) {
                    Ok(Some(h)) => return Poll::Ready(Ok(h)),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(Stop::Bad(e))),
                }
            }
            match self.io.poll_fill(&mut rd.rbuf, &mut rd.read_size, cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(Stop::Closed)),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => break,
            }
        }
        // Waiting: an idle connection closes when the proxy drains.
        if rd.rbuf.is_empty() && self.drained.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Stop::Closed));
        }
        // One timer per connection, moved only when it fires before the current deadline
        // (or must fire sooner): most requests cost it nothing.
        let deadline = *deadline.get_or_insert_with(|| {
            Instant::now()
                + if *idle {
                    self.limits.idle_timeout
                } else {
                    self.limits.header_read_timeout
                }
        });
        loop {
            if self.timer.deadline() > deadline {
                self.timer.as_mut().reset(deadline);
            }
            ready!(self.timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(Err(Stop::TimedOut));
            }
            self.timer.as_mut().reset(deadline);
        }
    }

    /// Whether the connection is a stream of a peer proxy's connection ([`crate::mux`]),
    /// whose reset [`Self::while_connected`] watches for.
    pub(crate) fn is_stream(&self) -> bool {
        matches!(*self.io, Link::Mux(_))
    }

    /// Run `f` (the request's handling) while the client is there: a stream of a peer
    /// proxy's connection that the peer resets (its caller gave up, say at its timeout)
    /// drops `f`, as HTTP/2 drops a reset stream's request, so that the request is
    /// recorded as the client's disconnect and its upstream exchange ends. `None` then. A
    /// socket's client is not watched (that would cost a readiness check per request): its
    /// close is noticed when the response is written. `f` is pinned where it was made: the
    /// request path's future is several KiB, and moving it costs a copy per request.
    pub(crate) fn while_connected<'a, F: Future + 'a>(
        &'a self,
        mut f: Pin<&'a mut F>,
    ) -> impl Future<Output = Option<F::Output>> + 'a {
        // Only the link is borrowed across the wait: the connection is not `Sync`.
        let io: &Link = &self.io;
        poll_fn(move |cx| {
            if let Poll::Ready(out) = f.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            match io {
                Link::Mux(s) if s.poll_gone(cx) => Poll::Ready(None),
                _ => Poll::Pending,
            }
        })
    }

    /// Answer a request that ends the connection (malformed, or its head too slow), and
    /// close, letting the client read the answer.
    pub(crate) async fn reject<B>(&mut self, resp: Response<B>)
    where
        B: Body<Data = Bytes, Error = BoxError> + Lines,
    {
        let (parts, body) = resp.into_parts();
        self.wbuf.clear();
        let len = body.size_hint().exact().unwrap_or(0);
        codec::encode_response_head(
            parts.status,
            body.lines(),
            &parts.headers,
            BodyOut::Length(len),
            Some("close"),
            &mut self.wbuf,
        );
        if self.write_body(body, BodyOut::Length(len), false).await {
            linger(&self.io).await;
        }
    }

    /// Write the response to the request last returned. `false`: the connection is done.
    pub(crate) async fn respond<B>(&mut self, resp: Response<B>, draining: bool) -> bool
    where
        B: Body<Data = Bytes, Error = BoxError> + Lines,
    {
        let Some(cur) = self.current.take() else {
            return false;
        };
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        let tunnel = cur.connect && status.is_success();
        let upgraded =
            cur.upgrade.is_some() && (status == StatusCode::SWITCHING_PROTOCOLS || tunnel);
        let out = if status.is_informational() || status == StatusCode::NO_CONTENT || tunnel {
            BodyOut::Never
        } else if cur.head || status == StatusCode::NOT_MODIFIED {
            BodyOut::None
        } else if let Some(n) = body.size_hint().exact() {
            BodyOut::Length(n)
        } else if cur.http10 {
            BodyOut::Eof
        } else {
            BodyOut::Chunked
        };
        // Another request can follow only once this one's body has been read to its end.
        let body_read = self.reader.is_some()
            || self
                .home
                .as_ref()
                .is_some_and(|h| h.lock().expect("home lock").is_some());
        // A refused CONNECT closes too: what the client sends next was meant for the tunnel.
        let refused_tunnel = cur.connect && !status.is_success();
        let close = !upgraded
            && (!cur.keep_alive || draining || out == BodyOut::Eof || !body_read || refused_tunnel);
        let connection = match (close, cur.http10) {
            (true, _) => Some("close"),
            (false, true) => Some("keep-alive"),
            (false, false) => None,
        };
        self.wbuf.clear();
        codec::encode_response_head(
            status,
            body.lines(),
            &parts.headers,
            out,
            connection,
            &mut self.wbuf,
        );
        if !self.write_body(body, out, cur.trailers).await {
            return false;
        }
        if upgraded {
            self.upgrade = cur.upgrade;
            return false;
        }
        !close
    }

    /// Write the buffered head and the body. `false`: the body failed or did not match its
    /// length, and the connection must close so that the client sees it incomplete.
    async fn write_body<B>(&mut self, body: B, out: BodyOut, trailers_ok: bool) -> bool
    where
        B: Body<Data = Bytes, Error = BoxError>,
    {
        let mut body = pin!(body);
        let chunked = out == BodyOut::Chunked;
        let mut remaining = match out {
            BodyOut::Length(n) => Some(n),
            _ => None,
        };
        let mut trailers = None;
        if !matches!(out, BodyOut::None | BodyOut::Never) {
            // While the body is awaited, a client that closes its connection is noticed (its
            // response is dropped, and its request's record says so), unless it already sent
            // more (a pipelined request), which is then left for later.
            let mut watch = true;
            loop {
                // A frame that is not ready yet: first send what is buffered (the head).
                let step = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                    Poll::Pending if !self.wbuf.is_empty() => Poll::Ready(None),
                    Poll::Pending if watch && closed(&self.io, &mut watch, cx) => {
                        Poll::Ready(Some(Some(Err(BoxError::from("client closed")))))
                    }
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(f) => Poll::Ready(Some(f)),
                })
                .await;
                let frame = match step {
                    None => {
                        if self.io.write_all(&self.wbuf).await.is_err() {
                            return false;
                        }
                        self.wbuf.clear();
                        continue;
                    }
                    Some(None) => break,
                    Some(Some(Err(_))) => return false,
                    Some(Some(Ok(f))) => f,
                };
                match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        if let Some(r) = remaining.as_mut() {
                            if data.len() as u64 > *r {
                                return false;
                            }
                            *r -= data.len() as u64;
                        }
                        if chunked {
                            codec::encode_chunk_prefix(data.len(), &mut self.wbuf);
                        }
                        if self.wbuf.len() + data.len() <= COALESCE as usize {
                            self.wbuf.extend_from_slice(&data);
                        } else {
                            if self.io.write_all(&self.wbuf).await.is_err()
                                || self.io.write_all(&data).await.is_err()
                            {
                                return false;
                            }
                            self.wbuf.clear();
                        }
                        if chunked {
                            self.wbuf.extend_from_slice(b"\r\n");
                        }
                    }
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
            if chunked {
                codec::encode_chunked_end(
                    trailers.as_ref().filter(|_| trailers_ok),
                    &mut self.wbuf,
                );
            }
            if remaining.is_some_and(|r| r > 0) {
                let _ = self.io.write_all(&self.wbuf).await;
                return false;
            }
        }
        let ok = self.io.write_all(&self.wbuf).await.is_ok();
        self.wbuf.clear();
        ok
    }

    /// The connection is done: an upgraded one goes to its tunnel, any other closes.
    pub(crate) fn finish(self) {
        let Some(tx) = self.upgrade else {
            return;
        };
        let rd = match self.reader {
            Some(rd) => Some(rd),
            None => self.home.and_then(|h| h.lock().expect("home lock").take()),
        };
        // A stream of a peer's connection is not switched: callers send upgrades to peers on
        // connections of their own.
        if let (Some(rd), Ok(Link::Tcp(io))) = (rd, Arc::try_unwrap(self.io)) {
            let _ = tx.send(Switched {
                io,
                early: rd.rbuf.freeze(),
            });
        }
    }
}

/// Whether the client closed its connection (or it failed); registers for readiness when it
/// cannot tell yet. Data waiting to be read ends the watch (`watch` set to false).
fn closed(io: &Link, watch: &mut bool, cx: &mut Context<'_>) -> bool {
    let io = match io {
        Link::Tcp(s) => s,
        // A stream: the peer reset it, or its connection ended.
        Link::Mux(s) => return s.poll_gone(cx),
    };
    let mut probe = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut probe);
    match io.poll_peek(cx, &mut buf) {
        Poll::Pending => false,
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => true,
        Poll::Ready(Ok(_)) => {
            *watch = false;
            false
        }
    }
}

/// Before closing after an error answer: stop sending, and read (and drop) what the client
/// still sends for a moment, so that the close does not reset the connection and destroy
/// the answer before the client reads it.
async fn linger(io: &Link) {
    let io = match io {
        Link::Tcp(s) => s,
        // A stream ends cleanly, its answer queued before the end.
        Link::Mux(s) => return s.finish(),
    };
    let _ = socket2::SockRef::from(io).shutdown(std::net::Shutdown::Write);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
            if io.readable().await.is_err() {
                return;
            }
            match io.try_read(&mut sink) {
                Ok(0) => return,
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// A request body read from the client's connection.
pub(crate) struct ReqBody {
    io: Arc<Link>,
    reader: Option<Reader>,
    decoder: Decoder,
    home: Home,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The client closed the connection before the body ended.
    #[error("client closed the connection before the request body ended")]
    Closed,
    /// Reading the socket failed.
    #[error("reading the request body: {0}")]
    Io(io::Error),
    /// The chunked encoding is broken.
    #[error("{0}")]
    Parse(ParseError),
}

impl From<BodyRead> for BodyError {
    fn from(e: BodyRead) -> Self {
        match e {
            BodyRead::Closed => Self::Closed,
            BodyRead::Io(e) => Self::Io(e),
            BodyRead::Parse(e) => Self::Parse(e),
        }
    }
}

impl ReqBody {
    fn new(io: Arc<Link>, rd: Reader, framing: ReqFraming, home: Home) -> Self {
        let decoder = Decoder::new(match framing {
            ReqFraming::None => RespFraming::Empty,
            ReqFraming::Length(n) => RespFraming::Length(n),
            ReqFraming::Chunked => RespFraming::Chunked,
        });
        let mut b = Self {
            io,
            reader: Some(rd),
            decoder,
            home,
        };
        if b.decoder.is_done() {
            b.go_home();
        }
        b
    }

    /// The body ended: the connection may read the next request.
    fn go_home(&mut self) {
        if let Some(rd) = self.reader.take() {
            *self.home.lock().expect("home lock") = Some(rd);
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(rd) = this.reader.as_mut() else {
            return Poll::Ready(None);
        };
        let res = ready!(poll_body_frame(
            &mut this.decoder,
            &this.io,
            &mut rd.rbuf,
            &mut rd.read_size,
            cx
        ));
        match res {
            Ok(frame) => {
                if this.decoder.is_done() {
                    this.go_home();
                }
                Poll::Ready(frame.map(Ok))
            }
            Err(e) => {
                this.reader = None;
                Poll::Ready(Some(Err(BodyError::from(e).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// In a request's extensions: the connection, once the response has switched protocols
/// (101, or 2xx to CONNECT).
#[derive(Clone)]
pub(crate) struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Switched>>>>);

impl OnUpgrade {
    /// The receiver, unless a clone of this took it already.
    pub(crate) fn into_receiver(self) -> Option<oneshot::Receiver<Switched>> {
        self.0.lock().expect("upgrade lock").take()
    }
}

/// A client connection after a protocol switch, and what the client sent after its
/// request head (to be read before the socket).
pub(crate) struct Switched {
    pub(crate) io: TcpStream,
    pub(crate) early: Bytes,
}
