//! Many byte streams over one connection between two proxies (ALPN [`ALPN_MUX`]): the
//! transport that carries HTTP/1.1 from a caller's proxy to a callee's over one mutual-TLS
//! session, each stream one pooled HTTP/1.1 connection of the caller's
//! ([`crate::h1`]'s client on one end, its server on the other).
//!
//! Why not HTTP/2 for these requests: over HTTP/2 each request is HPACK-coded into a
//! header block and decoded into a header map again on the callee, and `h2` keeps a state
//! machine per stream, together ~30k instructions a request over the two proxies (see
//! docs/benchmarks.md). Why not HTTP/1.1 on connections of their own: each request is then
//! one write and one read per side on the connection between the proxies, where HTTP/2
//! puts ten or more requests in one (measured: a third fewer instructions, a quarter more
//! CPU). Here the HTTP/1.1 bytes are framed as they are, and the frames of every stream
//! ready at once go out in one write: a stream's write appends its frame to the
//! connection's buffer and wakes the connection's task, which runs after the tasks woken
//! with it and writes what they all appended.
//!
//! Frames, each a 9-byte header (24-bit length, type, flags, 32-bit stream id) and a
//! payload, as HTTP/2's:
//! - `DATA`: bytes of a stream. `SYN` on the first opens it (only the caller opens
//!   streams), `FIN` on the last ends that direction;
//! - `WINDOW`: the reader consumed that many more bytes. Each direction of a stream may
//!   have at most [`WINDOW`] bytes unread, so a stream whose reader stalls holds up no other;
//! - `RESET`: the stream ended before both directions did (its handle dropped);
//! - `GOAWAY`: the callee takes no more streams (it drains). The caller answers with its own
//!   and opens no more; streams that arrive before that answer are still served, so none
//!   is lost to the race, and the connection closes once the last stream ends.
//!
//! A reset, and the connection's end, read as `ConnectionReset` (or the connection's
//! error) once the bytes that came before them are read; a clean end (`FIN`) reads as the
//! end of the stream.

#[cfg(test)]
mod tests;

use std::{
    collections::VecDeque,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::fasthash::FastMap;

/// The ALPN protocol a caller asks for the connection carrying streams.
pub(crate) const ALPN_MUX: &[u8] = b"trellis-mux/1";

/// Bytes a stream may have sent and its reader not yet consumed, each way.
pub(crate) const WINDOW: u32 = 256 * 1024;
/// Streams a connection carries at once at most: the caller opens no more on it, the
/// callee refuses more (a reset). Unread bytes per connection are thus bounded by
/// `MAX_STREAMS * WINDOW` (64 MiB; each stream's reader drains its own).
pub(crate) const MAX_STREAMS: usize = 256;

const HEADER: usize = 9;
/// The largest payload a `DATA` frame carries.
const MAX_FRAME: usize = 64 * 1024;
/// What the connection reads at once at least.
const READ_SIZE: usize = 64 * 1024;

const DATA: u8 = 0;
const WINDOW_UPDATE: u8 = 1;
const RESET: u8 = 2;
const GOAWAY: u8 = 3;

const SYN: u8 = 1;
const FIN: u8 = 2;

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// Opens streams.
    Caller,
    /// Accepts them.
    Callee,
}

/// One stream's state, kept by the connection.
struct Stream {
    /// Bytes received, not yet read.
    recv: VecDeque<Bytes>,
    buffered: usize,
    /// The peer ended its direction.
    recv_fin: bool,
    /// The peer reset the stream (or broke its window).
    reset: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// Who waits to hear that the peer is gone ([`MuxStream::poll_gone`]): a task other
    /// than the reader's, possibly.
    watcher: Option<Waker>,
    /// Bytes this side may still send.
    send_window: u32,
    /// Bytes read since the last `WINDOW` frame.
    consumed: u32,
    /// The first frame (with `SYN`) was sent.
    opened: bool,
    /// This side ended its direction.
    fin_sent: bool,
}

impl Stream {
    fn new(opened: bool) -> Self {
        Self {
            recv: VecDeque::new(),
            buffered: 0,
            recv_fin: false,
            reset: false,
            reader: None,
            writer: None,
            watcher: None,
            send_window: WINDOW,
            consumed: 0,
            opened,
            fin_sent: false,
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        if let Some(w) = self.watcher.take() {
            w.wake();
        }
    }
}

struct State {
    side: Side,
    streams: FastMap<u32, Stream>,
    /// Frames for the connection's task to write.
    out: BytesMut,
    driver: Option<Waker>,
    /// The caller's next stream id.
    next_id: u32,
    /// Why the connection ended, once it has: every stream then fails with it.
    ended: Option<io::ErrorKind>,
    /// The callee sent (or, at the caller, the caller read) `GOAWAY`.
    going_away: bool,
    /// Callee: the caller answered the `GOAWAY` with its own: every stream it opened came
    /// before, so the connection may close once they end.
    goaway_acked: bool,
    /// Callee: streams opened and not yet accepted.
    accepted: VecDeque<u32>,
    acceptor: Option<Waker>,
    /// Callee: the acceptor is gone, so new streams are refused.
    accept_closed: bool,
    /// Caller: live [`Mux`] handles; at none with no stream, the connection closes.
    handles: usize,
}

impl State {
    /// Queue a frame's header (its payload follows), waking the connection's task when it
    /// had nothing to write.
    fn frame(&mut self, kind: u8, flags: u8, id: u32, len: usize) {
        if self.out.is_empty() {
            self.wake_driver();
        }
        let len = u32::try_from(len).expect("a frame's length fits 24 bits");
        self.out.reserve(HEADER + len as usize);
        self.out.put_slice(&len.to_be_bytes()[1..]);
        self.out.put_u8(kind);
        self.out.put_u8(flags);
        self.out.put_u32(id);
    }

    fn wake_driver(&self) {
        if let Some(w) = &self.driver {
            w.wake_by_ref();
        }
    }

    /// Whether the connection has nothing more to do: the caller's with no handle and no
    /// stream left, the callee's going away (or not accepting) with no stream left.
    fn finished(&self) -> bool {
        self.streams.is_empty()
            && self.accepted.is_empty()
            && match self.side {
                Side::Caller => self.handles == 0 || self.going_away,
                Side::Callee => (self.going_away && self.goaway_acked) || self.accept_closed,
            }
    }

    /// The connection ended with `kind`: every stream and the acceptor learn it.
    fn end(&mut self, kind: io::ErrorKind) {
        if self.ended.is_none() {
            self.ended = Some(kind);
        }
        for s in self.streams.values_mut() {
            s.wake();
        }
        if let Some(w) = self.acceptor.take() {
            w.wake();
        }
    }

    /// Take in the frames at the front of `buf` (whole ones only).
    fn receive(&mut self, buf: &mut BytesMut) -> Result<(), io::ErrorKind> {
        while buf.len() >= HEADER {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < HEADER + len {
                break;
            }
            let kind = buf[3];
            let flags = buf[4];
            let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
            buf.advance(HEADER);
            let payload = buf.split_to(len).freeze();
            match kind {
                DATA => self.data(id, flags, payload)?,
                WINDOW_UPDATE if payload.len() == 4 => {
                    let n = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.send_window = s.send_window.saturating_add(n);
                        if let Some(w) = s.writer.take() {
                            w.wake();
                        }
                    }
                }
                RESET => {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.reset = true;
                        s.wake();
                    }
                }
                GOAWAY => match self.side {
                    // Answered, so that the callee knows no stream is on its way.
                    Side::Caller if !self.going_away => {
                        self.going_away = true;
                        self.frame(GOAWAY, 0, 0, 0);
                    }
                    Side::Caller => {}
                    Side::Callee => {
                        self.goaway_acked = true;
                        if let Some(w) = self.acceptor.take() {
                            w.wake();
                        }
                    }
                },
                WINDOW_UPDATE => return Err(io::ErrorKind::InvalidData),
                // Unknown frames are skipped: a later version may send more kinds.
                _ => {}
            }
        }
        Ok(())
    }

    fn data(&mut self, id: u32, flags: u8, payload: Bytes) -> Result<(), io::ErrorKind> {
        if flags & SYN != 0 && self.side == Side::Callee && !self.streams.contains_key(&id) {
            if self.accept_closed || self.streams.len() >= MAX_STREAMS {
                self.frame(RESET, 0, id, 0);
                return Ok(());
            }
            self.streams.insert(id, Stream::new(true));
            self.accepted.push_back(id);
            if let Some(w) = self.acceptor.take() {
                w.wake();
            }
        }
        // Frames of a stream already gone (reset, or dropped here) are dropped.
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if s.reset || s.recv_fin {
            return Ok(());
        }
        if s.buffered + payload.len() > WINDOW as usize {
            // The peer sent past the window it was given: the stream is reset.
            s.reset = true;
            s.wake();
            self.frame(RESET, 0, id, 0);
            return Ok(());
        }
        if !payload.is_empty() {
            s.buffered += payload.len();
            s.recv.push_back(payload);
        }
        if flags & FIN != 0 {
            s.recv_fin = true;
        }
        if let Some(w) = s.reader.take() {
            w.wake();
        }
        Ok(())
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn new(side: Side) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                side,
                streams: FastMap::default(),
                out: BytesMut::new(),
                driver: None,
                next_id: 1,
                ended: None,
                going_away: false,
                goaway_acked: false,
                accepted: VecDeque::new(),
                acceptor: None,
                accept_closed: false,
                handles: usize::from(side == Side::Caller),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The caller's handle on a connection: opens streams. The connection closes once every
/// handle and stream is gone.
pub(crate) struct Mux {
    shared: Arc<Shared>,
}

impl Clone for Mux {
    fn clone(&self) -> Self {
        self.shared.lock().handles += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.handles -= 1;
        if st.finished() {
            st.wake_driver();
        }
    }
}

impl Mux {
    /// The caller's end of a connection over `io`, and the task that drives it.
    pub(crate) fn client<T>(io: T) -> (Self, Connection<T>) {
        let shared = Shared::new(Side::Caller);
        let conn = Connection::new(io, shared.clone());
        (Self { shared }, conn)
    }

    /// A new stream, or none when the connection is closed, going away or full. Nothing
    /// goes on the wire until its first write.
    pub(crate) fn open(&self) -> Option<MuxStream> {
        let mut st = self.shared.lock();
        if !Self::usable(&st) {
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        if st.next_id >= u32::MAX / 2 {
            // Ids are not used twice: a connection that ran out goes away.
            st.going_away = true;
        }
        st.streams.insert(id, Stream::new(false));
        drop(st);
        Some(MuxStream {
            shared: self.shared.clone(),
            id,
        })
    }

    /// Whether a stream may still be opened on it.
    pub(crate) fn is_usable(&self) -> bool {
        Self::usable(&self.shared.lock())
    }

    fn usable(st: &State) -> bool {
        st.ended.is_none() && !st.going_away && st.streams.len() < MAX_STREAMS
    }

    /// Streams open on it.
    pub(crate) fn open_streams(&self) -> usize {
        self.shared.lock().streams.len()
    }
}

/// The callee's end of a connection: takes the streams the caller opens.
pub(crate) struct Acceptor {
    shared: Arc<Shared>,
}

impl Acceptor {
    /// The callee's end of a connection over `io`, and the task that drives it.
    pub(crate) fn server<T>(io: T) -> (Self, Connection<T>) {
        let shared = Shared::new(Side::Callee);
        let conn = Connection::new(io, shared.clone());
        (Self { shared }, conn)
    }

    /// The next stream the caller opened; `None` once the connection ended, or went away
    /// with no stream left.
    pub(crate) fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<MuxStream>> {
        let mut st = self.shared.lock();
        if let Some(id) = st.accepted.pop_front() {
            return Poll::Ready(Some(MuxStream {
                shared: self.shared.clone(),
                id,
            }));
        }
        if st.ended.is_some() || st.finished() {
            return Poll::Ready(None);
        }
        st.acceptor = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next stream the caller opened (see [`Self::poll_accept`]).
    pub(crate) async fn accept(&mut self) -> Option<MuxStream> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Tell the caller to open no more streams (this proxy drains). The connection closes
    /// once the streams still open end.
    pub(crate) fn go_away(&self) {
        let mut st = self.shared.lock();
        if !st.going_away {
            st.going_away = true;
            // The frame wakes the connection's task, which then also sees whether it is
            // done.
            st.frame(GOAWAY, 0, 0, 0);
            if let Some(w) = st.acceptor.take() {
                w.wake();
            }
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.accept_closed = true;
        // Streams opened and never taken are reset.
        while let Some(id) = st.accepted.pop_front() {
            st.streams.remove(&id);
            st.frame(RESET, 0, id, 0);
        }
        st.wake_driver();
    }
}

/// One stream: read and written through `&self`, so that a reader and a writer can use it
/// at once. Dropped before both directions ended, it is reset.
pub(crate) struct MuxStream {
    shared: Arc<Shared>,
    id: u32,
}

impl MuxStream {
    /// Read what arrived into `buf`'s spare room (all of it, however much): `Ok(0)` at the
    /// peer's clean end.
    pub(crate) fn poll_read_into(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        self.poll_read_with(cx, |chunks| {
            let mut n = 0;
            while let Some(c) = chunks.pop_front() {
                n += c.len();
                buf.extend_from_slice(&c);
            }
            n
        })
    }

    /// Read into `dst` (as much as fits).
    fn poll_read_buf(&self, cx: &mut Context<'_>, dst: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.poll_read_with(cx, |chunks| {
            let mut n = 0;
            while dst.remaining() > 0 {
                let Some(c) = chunks.front_mut() else { break };
                let take = c.len().min(dst.remaining());
                dst.put_slice(&c[..take]);
                c.advance(take);
                n += take;
                if c.is_empty() {
                    chunks.pop_front();
                }
            }
            n
        })
        .map_ok(|_| ())
    }

    fn poll_read_with(
        &self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&mut VecDeque<Bytes>) -> usize,
    ) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let ended = st.ended;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        };
        if !s.recv.is_empty() {
            let n = take(&mut s.recv);
            s.buffered -= n;
            s.consumed += n as u32;
            // The peer hears of room once a quarter of the window is free again, not at
            // every read: small exchanges send no WINDOW frame at all for a long while.
            if s.consumed >= WINDOW / 4 && !s.recv_fin && !s.reset {
                let n = std::mem::take(&mut s.consumed);
                st.frame(WINDOW_UPDATE, 0, self.id, 4);
                st.out.put_u32(n);
            }
            return Poll::Ready(Ok(n));
        }
        if s.recv_fin {
            return Poll::Ready(Ok(0));
        }
        if s.reset {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if let Some(kind) = ended {
            return Poll::Ready(Err(kind.into()));
        }
        if !s.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Write as much of `buf` as the peer's window allows (one frame).
    pub(crate) fn poll_send(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut st = self.shared.lock();
        let st = &mut *st;
        if let Some(kind) = st.ended {
            return Poll::Ready(Err(kind.into()));
        }
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        };
        if s.reset {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if s.fin_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(s.send_window as usize).min(MAX_FRAME);
        if n == 0 {
            s.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        s.send_window -= n as u32;
        let flags = if s.opened { 0 } else { SYN };
        s.opened = true;
        st.frame(DATA, flags, self.id, n);
        st.out.put_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    /// Write all of `buf`.
    pub(crate) async fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_send(cx, buf)).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// End this side's direction (the peer reads its end). Done at once: the frame is
    /// queued behind the bytes written before it.
    pub(crate) fn finish(&self) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return;
        };
        if s.fin_sent || s.reset {
            return;
        }
        s.fin_sent = true;
        let flags = if s.opened { FIN } else { SYN | FIN };
        s.opened = true;
        st.frame(DATA, flags, self.id, 0);
    }

    /// Whether an idle stream may carry another exchange: nothing unasked-for arrived, the
    /// peer did not end or reset it, and its connection is open and not going away.
    pub(crate) fn is_usable(&self) -> bool {
        let st = self.shared.lock();
        st.ended.is_none()
            && !st.going_away
            && st
                .streams
                .get(&self.id)
                .is_some_and(|s| s.recv.is_empty() && !s.recv_fin && !s.reset && !s.fin_sent)
    }

    /// Whether the peer is gone: it reset the stream or the connection ended. Otherwise
    /// `cx` is woken when it is.
    pub(crate) fn poll_gone(&self, cx: &mut Context<'_>) -> bool {
        let mut st = self.shared.lock();
        let ended = st.ended.is_some();
        match st.streams.get_mut(&self.id) {
            Some(s) if !s.reset && !ended => {
                if !s.watcher.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.watcher = Some(cx.waker().clone());
                }
                false
            }
            _ => true,
        }
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.remove(&self.id) else {
            return;
        };
        // A stream whose both directions ended leaves quietly; any other is reset, so the
        // peer stops sending and reads the reset.
        if s.opened && !s.reset && !(s.fin_sent && s.recv_fin) {
            st.frame(RESET, 0, self.id, 0);
        }
        if st.finished() {
            st.wake_driver();
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_read_buf(cx, buf)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what was queued without being asked.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

/// The task of one connection: writes what the streams queued, reads and hands out what
/// arrives. Ends when the connection closes or has nothing more to do.
pub(crate) struct Connection<T> {
    io: T,
    shared: Arc<Shared>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// What was written is not flushed yet.
    unflushed: bool,
    /// The write side was shut (the connection is done).
    shutting: bool,
}

impl<T> Connection<T> {
    fn new(io: T, shared: Arc<Shared>) -> Self {
        Self {
            io,
            shared,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            unflushed: false,
            shutting: false,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Connection<T> {
    /// Write `wbuf` out and flush; `Ready(Ok)` once all is out.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
            self.unflushed = true;
        }
        if self.unflushed {
            std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    fn fail(&self, kind: io::ErrorKind) -> Poll<io::Result<()>> {
        self.shared.lock().end(kind);
        Poll::Ready(Err(kind.into()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for Connection<T> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // What the streams queued since the last write.
            let finished = {
                let mut st = this.shared.lock();
                if !st.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.driver = Some(cx.waker().clone());
                }
                if this.wbuf.is_empty() {
                    this.wbuf.clear();
                    std::mem::swap(&mut st.out, &mut this.wbuf);
                }
                st.out.is_empty() && st.finished()
            };
            match this.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return this.fail(e.kind()),
                Poll::Pending => {}
            }
            if finished && this.wbuf.is_empty() && !this.unflushed {
                // Nothing left to carry: close (TLS's close_notify) and end.
                this.shutting = true;
                let done = Pin::new(&mut this.io).poll_shutdown(cx);
                if done.is_ready() {
                    this.shared.lock().end(io::ErrorKind::ConnectionAborted);
                    return Poll::Ready(Ok(()));
                }
            }
            if this.rbuf.capacity() - this.rbuf.len() < READ_SIZE / 4 {
                this.rbuf.reserve(READ_SIZE);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.rbuf) {
                Poll::Ready(Ok(0)) => {
                    let kind = if this.shutting {
                        io::ErrorKind::ConnectionAborted
                    } else {
                        io::ErrorKind::ConnectionReset
                    };
                    this.shared.lock().end(kind);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {
                    // This task loops on anyway: the frames it queues (answers, windows) do
                    // not wake it.
                    let r = {
                        let mut st = this.shared.lock();
                        let me = st.driver.take();
                        let r = st.receive(&mut this.rbuf);
                        st.driver = me;
                        r
                    };
                    if let Err(kind) = r {
                        return this.fail(kind);
                    }
                }
                Poll::Ready(Err(e)) => return this.fail(e.kind()),
                Poll::Pending => {
                    // Whatever the streams queued while this ran goes out before waiting.
                    if this.wbuf.is_empty() && !this.shared.lock().out.is_empty() {
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// For the fuzz target `mux_frames`: `data`, as a peer sent it, taken in by the callee's
/// end and by the caller's (with stream 1 open), in two reads cut at `cut`. Whatever the
/// bytes, nothing panics, no stream holds more than its window or lies about what it holds,
/// the callee holds no more than [`MAX_STREAMS`], and what either end queued in answer is
/// whole frames of the kinds it sends.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn receive_for_fuzzing(data: &[u8], cut: usize) {
    for side in [Side::Callee, Side::Caller] {
        let shared = Shared::new(side);
        let mut st = shared.lock();
        if side == Side::Caller {
            st.streams.insert(1, Stream::new(true));
            st.next_id = 2;
        }
        let cut = cut.min(data.len());
        let mut buf = BytesMut::new();
        for part in [&data[..cut], &data[cut..]] {
            buf.extend_from_slice(part);
            if st.receive(&mut buf).is_err() {
                break;
            }
            assert!(
                st.streams.len() <= MAX_STREAMS + 1,
                "streams past the limit"
            );
            for s in st.streams.values() {
                assert!(s.buffered <= WINDOW as usize, "past the window");
                assert_eq!(s.buffered, s.recv.iter().map(Bytes::len).sum::<usize>());
            }
            assert!(buf.len() < HEADER || buf.len() < HEADER + frame_len(&buf));
        }
        let mut out = &st.out[..];
        while !out.is_empty() {
            assert!(out.len() >= HEADER, "a cut frame header");
            let len = frame_len(out);
            assert!(out.len() >= HEADER + len, "a cut frame");
            assert!(
                matches!(out[3], WINDOW_UPDATE | RESET | GOAWAY),
                "an answer of kind {}",
                out[3]
            );
            out = &out[HEADER + len..];
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
fn frame_len(b: &[u8]) -> usize {
    u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize
}
