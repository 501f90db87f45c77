//! The callee's end of an opaque TCP stream carried on the HTTP/2 connection from a caller's
//! proxy (the caller's end is [`crate::h2_stream`]): the request body read as the stream's
//! bytes in, and a response body fed by the stream's writes.
//!
//! hyper sends the response body as it is polled, under the caller's flow control; the
//! writer waits while [`MAX_QUEUED`] bytes wait to be taken. A writer dropped before it shut
//! down (the application reset its connection, say) makes the body fail, which hyper sends as
//! a reset of the stream, so the caller's proxy sees a reset as it would on a TCP connection.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::BoxError;

/// How many bytes written and not yet sent the pipe holds before a write waits.
const MAX_QUEUED: usize = 64 * 1024;

#[derive(Default)]
struct State {
    chunks: VecDeque<Bytes>,
    queued: usize,
    /// The writer shut down: the body ends once the chunks are taken.
    closed: bool,
    /// The writer went away without shutting down: the body fails.
    broken: bool,
    /// The body was dropped (hyper's stream ended: the caller reset it, or the connection
    /// went).
    gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// A response body and the writer that feeds it.
pub(crate) fn pipe() -> (PipeWriter, PipeBody) {
    let s = Shared::default();
    (PipeWriter(s.clone()), PipeBody(s))
}

/// What the stream writes; see [`pipe`].
pub(crate) struct PipeWriter(Shared);

/// The response body a [`PipeWriter`] feeds.
pub(crate) struct PipeBody(Shared);

impl PipeWriter {
    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.0);
        if s.gone {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the caller's proxy reset the stream",
            )));
        }
        if s.queued >= MAX_QUEUED {
            s.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(MAX_QUEUED - s.queued);
        s.chunks.push_back(Bytes::copy_from_slice(&buf[..n]));
        s.queued += n;
        if let Some(w) = s.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn shutdown(&self) {
        let mut s = lock(&self.0);
        s.closed = true;
        if let Some(w) = s.reader.take() {
            w.wake();
        }
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        let mut s = lock(&self.0);
        if !s.closed {
            s.broken = true;
        }
        if let Some(w) = s.reader.take() {
            w.wake();
        }
    }
}

impl Drop for PipeBody {
    fn drop(&mut self) {
        let mut s = lock(&self.0);
        s.gone = true;
        if let Some(w) = s.writer.take() {
            w.wake();
        }
    }
}

impl Body for PipeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = lock(&self.0);
        if let Some(b) = s.chunks.pop_front() {
            s.queued -= b.len();
            if let Some(w) = s.writer.take() {
                w.wake();
            }
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if s.broken {
            return Poll::Ready(Some(Err("the stream's upstream side failed".into())));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.0);
        s.closed && s.chunks.is_empty()
    }
}

/// The callee's end of the stream: reads the request body, writes into the response body.
pub(crate) struct Duplex {
    body: hyper::body::Incoming,
    /// Read from a DATA frame, not yet handed to the reader.
    buf: Bytes,
    ended: bool,
    out: PipeWriter,
}

impl Duplex {
    /// The stream whose bytes in are `body` and whose bytes out go to `out`.
    pub(crate) fn new(body: hyper::body::Incoming, out: PipeWriter) -> Self {
        Self {
            body,
            buf: Bytes::new(),
            ended: false,
            out,
        }
    }
}

impl AsyncRead for Duplex {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.buf.is_empty() {
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(f)) => {
                    // Trailers carry nothing for a stream: skipped.
                    if let Ok(d) = f.into_data() {
                        this.buf = d;
                    }
                }
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, e)));
                }
                None => this.ended = true,
            }
        }
        crate::net::read_held(&mut this.buf, out);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Duplex {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.out.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.shutdown();
        Poll::Ready(Ok(()))
    }
}
