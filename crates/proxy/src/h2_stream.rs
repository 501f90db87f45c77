//! An opaque TCP stream carried as one stream of the HTTP/2 connection between two proxies
//! (the caller's side; the callee's is [`crate::pipe`]).
//!
//! A callee that agreed to [`crate::peer_stream::ALPN_TCP_STREAMS`] takes each request of
//! method [`crate::peer_stream::STREAM_METHOD`] on that connection as an opaque stream for the
//! service port the connection is for: the request body carries the caller's bytes, the
//! response body the callee's. One such connection per endpoint carries up to
//! [`crate::peer_stream::MAX_STREAMS`] streams, apart from the connection HTTP requests use.
//! A stream opens with the same hello and answer as a stream on a connection of its own
//! (`trellis-tcp/2`), so the callee's proxy admits it, connects to its application and
//! answers the same way; only the mutual-TLS handshake per stream is gone, as HBONE's
//! CONNECT streams do away with it.
//!
//! A reset travels as a reset: a stream dropped before its end is reset (`CANCEL`), and one
//! the peer reset reads as `ConnectionReset`, so that each proxy classes the other side's
//! failure as it would a TCP reset.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use h2::{client::ResponseFuture, RecvStream, SendStream};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most a write asks the peer's flow control for at once.
const MAX_RESERVE: usize = 64 * 1024;

/// The response's head, then its body.
enum Recv {
    Head(ResponseFuture),
    Body(RecvStream),
    /// The response ended (or failed; the error was returned).
    Done,
}

/// The caller's end of an opaque stream on an HTTP/2 connection to a peer's proxy.
pub(crate) struct Outgoing {
    send: SendStream<Bytes>,
    recv: Recv,
    /// Read from a DATA frame, not yet handed to the reader.
    buf: Bytes,
    /// The sending half was ended (cleanly) or reset.
    sent_end: bool,
    /// Counts the stream among its connection's while it lives.
    _open: OpenCount,
}

/// One stream counted among its connection's open ones, from its making to its drop.
pub(crate) struct OpenCount(Arc<AtomicUsize>);

impl OpenCount {
    /// Count one more in `open`.
    pub(crate) fn new(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        Self(open)
    }
}

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Outgoing {
    /// The stream `send` opened, whose response is `response`, counted by `open`.
    pub(crate) fn new(response: ResponseFuture, send: SendStream<Bytes>, open: OpenCount) -> Self {
        Self {
            send,
            recv: Recv::Head(response),
            buf: Bytes::new(),
            sent_end: false,
            _open: open,
        }
    }

    /// Wait for the response's head: `Ok` when the peer's proxy took the stream (the answer
    /// to the hello follows in the body); the HTTP/2 error otherwise (a draining peer's
    /// GOAWAY refusing it, say), or the status it answered with.
    pub(crate) async fn head(&mut self) -> Result<(), HeadError> {
        let Recv::Head(response) = &mut self.recv else {
            return Ok(());
        };
        let head = response.await;
        self.took(head)
    }

    /// The response's head as it came: its body to read next, else why not.
    fn took(
        &mut self,
        head: Result<http::Response<RecvStream>, h2::Error>,
    ) -> Result<(), HeadError> {
        self.recv = Recv::Done;
        let resp = head.map_err(HeadError::H2)?;
        if resp.status() != StatusCode::OK {
            return Err(HeadError::Status(resp.status()));
        }
        self.recv = Recv::Body(resp.into_body());
        Ok(())
    }
}

/// Why a stream's response head did not come.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The stream or the connection failed.
    H2(h2::Error),
    /// The peer's proxy answered with this status (not one of ours: a proxy in between).
    Status(StatusCode),
}

impl HeadError {
    /// The peer did not process the stream (RFC 9113, 8.7: a GOAWAY above it, or
    /// `REFUSED_STREAM`): another connection may take it.
    pub(crate) fn unprocessed(&self) -> bool {
        match self {
            Self::H2(e) => {
                (e.is_go_away() && e.is_remote()) || e.reason() == Some(h2::Reason::REFUSED_STREAM)
            }
            Self::Status(_) => false,
        }
    }
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::H2(e) => write!(f, "{e}"),
            Self::Status(s) => write!(f, "answered {s} to a stream"),
        }
    }
}

impl std::error::Error for HeadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::H2(e) => Some(e),
            Self::Status(_) => None,
        }
    }
}

/// An HTTP/2 error as the stream's I/O error: a reset by the peer reads as a TCP reset
/// would.
pub(crate) fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for Outgoing {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.buf.is_empty() {
            let recv = match &mut this.recv {
                Recv::Done => return Poll::Ready(Ok(())),
                Recv::Body(r) => r,
                // Read before the head was waited for: it is waited for here.
                Recv::Head(response) => {
                    let head = ready!(Pin::new(response).poll(cx));
                    match this.took(head) {
                        Ok(()) => continue,
                        Err(HeadError::H2(e)) => return Poll::Ready(Err(io_error(e))),
                        Err(e) => return Poll::Ready(Err(io::Error::other(e))),
                    }
                }
            };
            match ready!(recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    // Given back to the peer's flow control as the reader takes it.
                    this.buf = b;
                }
                Some(Err(e)) => {
                    this.recv = Recv::Done;
                    return Poll::Ready(Err(io_error(e)));
                }
                None => {
                    this.recv = Recv::Done;
                    return Poll::Ready(Ok(()));
                }
            }
        }
        let n = crate::net::read_held(&mut this.buf, out);
        if let Recv::Body(r) = &mut this.recv {
            let _ = r.flow_control().release_capacity(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Outgoing {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.sent_end {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        loop {
            let room = this.send.capacity();
            if room > 0 {
                let n = room.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io_error)?;
                return Poll::Ready(Ok(n));
            }
            // Asked for only when there is something to send: capacity reserved while idle
            // would hold the connection's window.
            this.send.reserve_capacity(buf.len().min(MAX_RESERVE));
            match this.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io_error(e))),
                Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Poll::Pending => {
                    // The peer may reset the stream while this side waits for room.
                    return match this.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => {
                            Poll::Ready(Err(io_error(h2::Error::from(reason))))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(io_error(e))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what the streams queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.sent_end {
            this.sent_end = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        // Not ended cleanly (this side's client failed, say): the peer sees a reset, not an
        // end, as its side of a TCP connection would.
        if !self.sent_end || !matches!(self.recv, Recv::Done) {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}

#[cfg(test)]
mod tests;
