//! The proxy's own HTTP/1.1: the upstream client here, the client-facing server in
//! [`server`], both over [`codec`] and driven inside the connection's or request's task.
//!
//! hyper's client runs each connection as a task of its own and talks to it through
//! channels: the request goes over one, the response head comes back over a oneshot and the
//! body over another channel, each hand-off a wake-up and a trip through the scheduler. For
//! HTTP/1.1, where a connection carries one exchange at a time, none of that is needed: the
//! task that handles the client's request writes the upstream request, reads the response
//! head, and its response body reads the rest straight from the socket, then puts the
//! connection back in the pool. Measured on the bench rig this took a third of the proxy's
//! instructions per request. HTTP/2 upstreams stay on hyper, whose multiplexing needs a
//! connection task anyway.

pub(crate) mod codec;
pub(crate) mod head;
mod names;
pub(crate) mod raw;
pub(crate) mod server;
#[cfg(test)]
mod tests;

use std::{
    future::{poll_fn, Future},
    io,
    pin::{pin, Pin},
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{Method, Request};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
    time::Sleep,
};

use self::codec::{Decoded, Decoder, Head, ParseError, ReqFraming};
use crate::{mux::MuxStream, slot::Slot};

/// A boxed body error (the client's body, read while it is sent upstream).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// First read size; doubled while reads fill it, up to [`MAX_READ`].
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Request bodies up to this size are written together with the head, in one write.
const COALESCE: u64 = 16 * 1024;

/// Why an HTTP/1.1 exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    /// Reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before the response was complete.
    #[error("connection closed by upstream before the response {}", if *.0 { "began" } else { "was complete" })]
    Closed(bool),
    /// The upstream does not speak HTTP/1.1 correctly.
    #[error("{0}")]
    Parse(#[from] ParseError),
    /// Reading the client's request body failed.
    #[error("reading the request body: {0}")]
    Body(BoxError),
    /// No response head within the exchange's wait.
    #[error("no response in time")]
    TimedOut,
}

/// How long an exchange may wait for its response head.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    /// As long as it takes.
    Forever,
    /// Until this instant, the request's sending included.
    Until(Instant),
    /// This long after the request was sent: silence from the upstream, not a slow client's
    /// upload, is what counts.
    Idle(Duration),
}

impl H1Error {
    /// Nothing came back on a pooled connection: the server most likely closed it while it
    /// sat idle, and the request may be sent again on a fresh one.
    pub(crate) fn is_stale(&self) -> bool {
        matches!(self, Self::Closed(true))
            || matches!(self, Self::Io(e) if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ))
    }
}

/// What an HTTP/1.1 connection runs over: a socket, or a stream of the connection to a
/// peer's proxy that carries many ([`crate::mux`]). Read and written through `&self`, so
/// that a body can be sent while the answer is read.
pub(crate) enum Link {
    Tcp(TcpStream),
    Mux(MuxStream),
}

impl Link {
    /// Read more into `rbuf`: `Ok(0)` at the peer's end.
    fn poll_fill(
        &self,
        rbuf: &mut BytesMut,
        read_size: &mut usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            Self::Tcp(s) => poll_fill(s, rbuf, read_size, cx),
            Self::Mux(s) => s.poll_read_into(cx, rbuf),
        }
    }

    /// Write all of `buf`.
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(io) => {
                while !buf.is_empty() {
                    match io.try_write(buf) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => buf = &buf[n..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable().await?,
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Self::Mux(s) => s.send_all(buf).await,
        }
    }

    /// Whether an idle connection still looks usable: not closed by the peer, and nothing
    /// unasked-for sent on it. Costs no system call while a socket is not readable.
    fn is_alive(&self) -> bool {
        match self {
            Self::Tcp(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Self::Mux(s) => s.is_usable(),
        }
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Mux(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Mux(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Mux(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Mux(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An upstream HTTP/1.1 connection.
pub(crate) struct Conn {
    io: Link,
    rbuf: BytesMut,
    wbuf: BytesMut,
    read_size: usize,
    /// It has carried an exchange before (and sat in the pool since).
    reused: bool,
    /// One timer for the connection's exchanges, armed at the first wait and moved only when
    /// it fires before the current exchange's deadline: most exchanges cost it nothing.
    timer: Option<Pin<Box<Sleep>>>,
    /// Its place in the cluster's connection bound (a stream to a peer's proxy has none: its
    /// connection holds it).
    _slot: Option<Slot>,
    /// When its current exchange began, for the idle list once its body has been read (kept
    /// here rather than in [`H1Body`], which then fits in the 128 bytes that a move copies
    /// inline rather than through a call to `memcpy`: a response body moves five times).
    began: Instant,
}

impl Conn {
    pub(crate) fn new(io: TcpStream, slot: Slot) -> Self {
        Self::with(Link::Tcp(io), Some(slot))
    }

    /// A stream to a peer's proxy, as a connection. It counts as reused: a stream that meets
    /// a connection the peer just closed (as it drained) before any answer came is stale as a
    /// pooled socket is, and its idempotent request is sent once more.
    pub(crate) fn over_mux(stream: MuxStream) -> Self {
        let mut c = Self::with(Link::Mux(stream), None);
        c.reused = true;
        c
    }

    fn with(io: Link, slot: Option<Slot>) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            read_size: MIN_READ,
            reused: false,
            timer: None,
            _slot: slot,
            began: Instant::now(),
        }
    }

    /// Whether an idle connection still looks usable: not closed by the peer, and nothing
    /// unasked-for sent on it.
    pub(crate) fn is_alive(&self) -> bool {
        self.io.is_alive()
    }

    pub(crate) fn mark_reused(&mut self) {
        self.reused = true;
    }

    /// Whether it came from the pool rather than a fresh connect.
    pub(crate) fn is_reused(&self) -> bool {
        self.reused
    }
}

/// Read more from `io` into `rbuf`: `Ok(0)` at EOF. `read_size` grows while reads
/// fill it.
fn poll_fill(
    io: &TcpStream,
    rbuf: &mut BytesMut,
    read_size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if rbuf.capacity() - rbuf.len() < *read_size / 2 {
        rbuf.reserve(*read_size);
    }
    loop {
        ready!(io.poll_read_ready(cx))?;
        let room = rbuf.capacity() - rbuf.len();
        let mut drained = None;
        // A read shorter than the room drained the socket. Saying "would block" to tokio
        // then clears its readiness flag (unless an event arrived meanwhile), so the next
        // wait, or the pool's liveness probe, goes by epoll instead of asking the kernel
        // once more just to hear EAGAIN: one system call fewer per request.
        let res = io.try_io(Interest::READABLE, || {
            let n = io.try_read_buf(rbuf)?;
            if n > 0 && n < room {
                drained = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (res, drained) {
            (_, Some(n)) => return Poll::Ready(Ok(n)),
            (Ok(n), None) => {
                if n == room && *read_size < MAX_READ {
                    *read_size *= 2;
                }
                return Poll::Ready(Ok(n));
            }
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (Err(e), None) => return Poll::Ready(Err(e)),
        }
    }
}

/// Whether `deadline` has passed, with the connection's `timer` (see [`Conn::timer`]).
fn poll_deadline(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if t.deadline() > deadline {
            t.as_mut().reset(deadline);
        }
        ready!(t.as_mut().poll(cx));
        if tokio::time::Instant::now() >= deadline {
            return Poll::Ready(());
        }
        t.as_mut().reset(deadline);
    }
}

/// Read until `rbuf` holds a final (or 101) response head, and take it.
fn poll_head(
    io: &Link,
    rbuf: &mut BytesMut,
    read_size: &mut usize,
    method: &Method,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, H1Error>> {
    loop {
        if let Some(head) = next_head(rbuf, method)? {
            return Poll::Ready(Ok(head));
        }
        let before = rbuf.len();
        match ready!(io.poll_fill(rbuf, read_size, cx)) {
            Ok(0) => return Poll::Ready(Err(H1Error::Closed(before == 0))),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(e.into())),
        }
    }
}

/// How a request's body goes on the wire.
fn request_framing<B: Body>(body: &B) -> ReqFraming {
    if body.is_end_stream() {
        return ReqFraming::None;
    }
    match body.size_hint().exact() {
        Some(0) => ReqFraming::None,
        Some(n) => ReqFraming::Length(n),
        None => ReqFraming::Chunked,
    }
}

/// Whether a request may be sent again after a pooled connection turned out to be closed
/// (RFC 9110 §9.2.2), given that its body can be sent again too.
pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Send `req` (its body is consumed) and read the response head. Informational responses
/// other than 101 are skipped. The request body is written while the head is awaited, so an
/// upstream that answers early (say 413) is heard, and the connection is then not reused.
///
/// `wait` bounds the wait for the head; `began` is when the try began (an idle wait counts
/// from it when the request goes out in one write).
pub(crate) async fn exchange<B>(
    conn: &mut Conn,
    req: &mut Request<B>,
    wait: Wait,
    began: Instant,
) -> Result<Head, H1Error>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let framing = request_framing(req.body());
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    conn.wbuf.clear();
    codec::encode_request_head(req.method(), target, req.headers(), framing, &mut conn.wbuf);
    let method = req.method().clone();
    let body = req.body_mut();
    let head = if framing == ReqFraming::None {
        conn.io.write_all(&conn.wbuf).await?;
        let deadline = match wait {
            Wait::Forever => None,
            Wait::Until(t) => Some(t),
            Wait::Idle(d) => Some(began + d),
        };
        let Conn {
            io,
            rbuf,
            read_size,
            timer,
            ..
        } = conn;
        poll_fn(|cx| match poll_head(io, rbuf, read_size, &method, cx) {
            Poll::Pending => match deadline {
                Some(d) if poll_deadline(timer, d.into(), cx).is_ready() => {
                    Poll::Ready(Err(H1Error::TimedOut))
                }
                _ => Poll::Pending,
            },
            done => done,
        })
        .await?
    } else {
        // Boxed: requests with bodies are the minority, and every request's future would
        // otherwise carry (and hyper would copy) this one's space.
        let (mut head, body_sent) =
            Box::pin(send_body_and_read_head(conn, body, framing, &method, wait)).await?;
        // An answer that came before the whole body was sent leaves the connection unusable.
        head.keep_alive &= body_sent;
        head
    };
    Ok(head)
}

async fn send_body_and_read_head<B>(
    conn: &mut Conn,
    body: &mut B,
    framing: ReqFraming,
    method: &Method,
    wait: Wait,
) -> Result<(Head, bool), H1Error>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let Conn {
        io,
        rbuf,
        wbuf,
        read_size,
        timer,
        ..
    } = conn;
    let mut deadline = match wait {
        Wait::Until(t) => Some(t),
        Wait::Forever | Wait::Idle(_) => None,
    };
    let (rd, wr) = (&*io, &*io);
    let mut write = pin!(async {
        let coalesce = matches!(framing, ReqFraming::Length(n) if n <= COALESCE);
        if !coalesce {
            wr.write_all(wbuf).await?;
            wbuf.clear();
        }
        let chunked = framing == ReqFraming::Chunked;
        let mut trailers = None;
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            let frame = frame.map_err(H1Error::Body)?;
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    if chunked {
                        codec::encode_chunk_prefix(data.len(), wbuf);
                    }
                    if coalesce {
                        wbuf.extend_from_slice(&data);
                    } else {
                        wr.write_all(wbuf).await?;
                        wbuf.clear();
                        wr.write_all(&data).await?;
                    }
                    if chunked {
                        wbuf.extend_from_slice(b"\r\n");
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        if chunked {
            codec::encode_chunked_end(trailers.as_ref(), wbuf);
        }
        wr.write_all(wbuf).await?;
        Ok::<_, H1Error>(())
    });
    let mut written: Option<Result<(), H1Error>> = None;
    poll_fn(|cx| {
        if written.is_none() {
            if let Poll::Ready(r) = write.as_mut().poll(cx) {
                // An idle wait starts once the request is out.
                if let Wait::Idle(d) = wait {
                    deadline = Some(Instant::now() + d);
                }
                written = Some(r);
            }
        }
        match poll_head(rd, rbuf, read_size, method, cx) {
            Poll::Ready(Ok(head)) => {
                Poll::Ready(Ok((head, matches!(written, Some(Ok(())))))) // early answers end reuse
            }
            // The write failed first (the server may have answered and closed): its error
            // explains more than the read's.
            Poll::Ready(Err(e)) => Poll::Ready(Err(match written.take() {
                Some(Err(w)) => w,
                _ => e,
            })),
            Poll::Pending => match &written {
                // A client body that cannot be read ends the exchange.
                Some(Err(H1Error::Body(_))) => {
                    let Some(Err(e)) = written.take() else {
                        unreachable!()
                    };
                    Poll::Ready(Err(e))
                }
                _ => match deadline {
                    Some(d) if poll_deadline(timer, d.into(), cx).is_ready() => {
                        Poll::Ready(Err(H1Error::TimedOut))
                    }
                    _ => Poll::Pending,
                },
            },
        }
    })
    .await
}

/// The next final (or 101) response head in `buf`, skipping 1xx interim responses.
fn next_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, H1Error> {
    loop {
        match codec::parse_response_head(buf, method)? {
            Some(h) if h.status.is_informational() && h.status.as_u16() != 101 => continue,
            other => return Ok(other),
        }
    }
}

/// Why a body could not be read from its connection.
#[derive(Debug)]
pub(crate) enum BodyRead {
    /// The peer closed the connection before the body ended.
    Closed,
    Io(io::Error),
    Parse(ParseError),
}

impl From<BodyRead> for H1Error {
    fn from(e: BodyRead) -> Self {
        match e {
            BodyRead::Closed => Self::Closed(false),
            BodyRead::Io(e) => Self::Io(e),
            BodyRead::Parse(e) => Self::Parse(e),
        }
    }
}

/// The next frame of a body framed by `decoder`, from `rbuf` and then from `io`: `None` at
/// its end (for a body that runs to the close, the close is its end). Shared by response
/// bodies read from upstreams and request bodies read from clients.
fn poll_body_frame(
    decoder: &mut Decoder,
    io: &Link,
    rbuf: &mut BytesMut,
    read_size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Frame<Bytes>>, BodyRead>> {
    loop {
        match decoder.decode(rbuf) {
            Ok(Decoded::Data(d)) => return Poll::Ready(Ok(Some(Frame::data(d)))),
            Ok(Decoded::Trailers(t)) => return Poll::Ready(Ok(Some(Frame::trailers(t)))),
            Ok(Decoded::End) => return Poll::Ready(Ok(None)),
            Ok(Decoded::NeedMore) => match ready!(io.poll_fill(rbuf, read_size, cx)) {
                Ok(0) if decoder.at_eof() => return Poll::Ready(Ok(None)),
                Ok(0) => return Poll::Ready(Err(BodyRead::Closed)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(BodyRead::Io(e))),
            },
            Err(e) => return Poll::Ready(Err(BodyRead::Parse(e))),
        }
    }
}

/// Idle HTTP/1.1 connections of one endpoint, most recently used last.
pub(crate) struct Idle {
    list: Mutex<Vec<(Instant, Box<Conn>)>>,
    timeout: Duration,
}

// Idle connections kept per endpoint.
const MAX_IDLE: usize = 256;

impl Idle {
    /// Connections idle longer than `timeout` are closed rather than reused.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            list: Mutex::new(Vec::new()),
            timeout,
        }
    }

    /// A connection that is still alive, if any; `now` is the caller's reading of the clock.
    pub(crate) fn pop(&self, now: Instant) -> Option<Box<Conn>> {
        let mut idle = self.list.lock().expect("idle lock");
        while let Some((since, c)) = idle.pop() {
            if now.saturating_duration_since(since) < self.timeout && c.is_alive() {
                return Some(c);
            }
        }
        None
    }

    /// How long a connection may sit unused before it is closed.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Close the connections idle past the timeout (they would not be reused), so that they
    /// give back their connection slots.
    pub(crate) fn prune(&self, now: Instant) {
        let mut idle = self.list.lock().expect("idle lock");
        idle.retain(|(since, _)| now.saturating_duration_since(*since) < self.timeout);
    }

    /// Return a connection whose exchange completed. `since` is when that exchange began:
    /// counting its duration as idle time errs towards closing sooner, and saves a clock read.
    pub(crate) fn checkin(&self, c: Box<Conn>, since: Instant) {
        let mut idle = self.list.lock().expect("idle lock");
        if idle.len() < MAX_IDLE {
            idle.push((since, c));
        }
    }
}

/// A response body read straight from the upstream connection. When it ends cleanly the
/// connection goes back to its endpoint's idle list; dropped early, the connection is closed.
pub(crate) struct H1Body {
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    keep_alive: bool,
    home: Arc<Idle>,
    /// The response's header lines, carried to the server that writes them ([`raw::Lines`]).
    lines: Option<Box<raw::RawHeaders>>,
}

impl H1Body {
    /// The body of `head`, read from `conn`.
    pub(crate) fn new(head: &Head, mut conn: Box<Conn>, home: Arc<Idle>, began: Instant) -> Self {
        conn.began = began;
        let mut b = Self {
            conn: Some(conn),
            decoder: Decoder::new(head.framing),
            keep_alive: head.keep_alive,
            home,
            lines: None,
        };
        if b.decoder.is_done() {
            b.release();
        }
        b
    }

    /// The body, carrying its response's header lines.
    pub(crate) fn with_lines(mut self, lines: Box<raw::RawHeaders>) -> Self {
        self.lines = Some(lines);
        self
    }

    /// The body is complete: pool the connection if it may carry another exchange.
    fn release(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if self.keep_alive && conn.rbuf.is_empty() {
                conn.mark_reused();
                let began = conn.began;
                self.home.checkin(conn, began);
            }
        }
    }
}

/// Its lines, if the response was relayed as they came, are kept for the next response
/// head this thread parses ([`raw::keep`]).
impl Drop for H1Body {
    fn drop(&mut self) {
        if let Some(lines) = self.lines.take() {
            raw::keep(lines);
        }
    }
}

impl raw::Lines for H1Body {
    fn lines(&self) -> Option<&raw::RawHeaders> {
        self.lines.lines()
    }

    fn slot(&mut self) -> Option<&mut Option<Box<raw::RawHeaders>>> {
        Some(&mut self.lines)
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let Conn {
            io,
            rbuf,
            read_size,
            ..
        } = &mut **conn;
        match ready!(poll_body_frame(&mut this.decoder, io, rbuf, read_size, cx)) {
            Ok(frame) => {
                // At the end (also the close that ends a close-delimited body, which left
                // the connection not reusable): pool the connection or close it.
                if this.decoder.is_done() {
                    this.release();
                }
                Poll::Ready(frame.map(Ok))
            }
            Err(e) => {
                this.conn = None;
                Poll::Ready(Some(Err(H1Error::from(e).into())))
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

/// An upgraded upstream connection: the socket, and what the server sent after its 101.
pub(crate) fn into_upgraded(conn: Conn) -> (Link, Bytes, Option<Slot>) {
    (conn.io, conn.rbuf.freeze(), conn._slot)
}
