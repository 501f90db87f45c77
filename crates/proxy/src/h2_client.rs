//! The proxy's HTTP/2 client: the `h2` crate driven directly, for peers' proxies (over mutual
//! TLS) and HTTP/2 upstreams.
//!
//! hyper's HTTP/2 client hands each request to the connection's task through a channel,
//! spawns a task per request to wait for its response and another to stream its body, and
//! answers through a oneshot: measured on the mesh path, that machinery and the copies of the
//! futures it moves cost more per request than framing the request does. Here the request's
//! own task opens the stream and awaits the response; only a request with a body spawns a
//! task, to stream it while the response is awaited. The connection runs in its own task,
//! which also checks a peer's proxy with PINGs.

use std::{
    future::poll_fn,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    http::body::{H2Body, UpBody},
    slot::Slot,
};

/// Flow-control windows and limits: hyper's client defaults, which this client replaced.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A multiplexed connection's sending side; cheap to clone.
#[derive(Clone)]
pub(crate) struct H2Sender {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// A connection's flow-control windows: the most one stream, and the whole connection, may
/// have in flight unread.
#[derive(Clone, Copy)]
pub(crate) struct Windows {
    pub(crate) stream: u32,
    pub(crate) connection: u32,
}

/// Requests: hyper's client defaults, which this client replaced.
pub(crate) const REQUESTS: Windows = Windows {
    stream: STREAM_WINDOW,
    connection: CONN_WINDOW,
};

/// A connection for opaque streams ([`crate::peer_stream::ALPN_TCP_STREAMS`]).
pub(crate) const STREAMS: Windows = Windows {
    stream: crate::peer_stream::STREAM_WINDOW,
    connection: crate::peer_stream::STREAMS_CONNECTION_WINDOW,
};

/// A request that could not be sent: its error, and the request when it never left (the
/// connection was gone before a stream was opened for it).
pub(crate) struct SendError {
    pub(crate) error: h2::Error,
    pub(crate) unsent: Option<Request<UpBody>>,
}

/// Handshake over `io`, and drive the connection in a task of its own that holds `slot`
/// until the connection ends. With `keepalive`, the peer is sent a PING that often and the
/// connection is closed when one is not answered within the same time: requests on a
/// connection to a peer cut off fail then, not when the kernel gives up.
pub(crate) async fn handshake<T>(
    io: T,
    keepalive: Option<Duration>,
    slot: Slot,
) -> Result<H2Sender, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    handshake_with(io, keepalive, slot, REQUESTS).await
}

/// [`handshake`] with flow-control windows of `windows`.
pub(crate) async fn handshake_with<T>(
    io: T,
    keepalive: Option<Duration>,
    slot: Slot,
    windows: Windows,
) -> Result<H2Sender, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    let ping = keepalive.and_then(|every| Some((every, conn.ping_pong()?)));
    tokio::spawn(async move {
        match ping {
            None => {
                let _ = (&mut conn).await;
            }
            Some((every, mut ping)) => loop {
                tokio::select! {
                    biased;
                    _ = &mut conn => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let pong = tokio::time::timeout(every, ping.ping(h2::Ping::opaque()));
                tokio::select! {
                    biased;
                    _ = &mut conn => break,
                    r = pong => if !matches!(r, Ok(Ok(_))) {
                        tracing::info!(timeout = ?every, "an HTTP/2 peer did not answer a PING; closing the connection");
                        break;
                    }
                }
            },
        }
        done.store(true, Ordering::Release);
        drop(slot);
    });
    Ok(H2Sender { send, closed })
}

impl H2Sender {
    /// Whether the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Open a stream for `head` whose body the caller writes (an opaque TCP stream to a peer's
    /// proxy): the stream's sending half, and the response to come. `Err` with `true` when the
    /// connection was closed or going away before the stream opened (another connection may
    /// take it).
    pub(crate) async fn open(
        self,
        head: Request<()>,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), (h2::Error, bool)> {
        let mut send = match self.send.ready().await {
            Ok(s) => s,
            Err(error) => {
                self.closed.store(true, Ordering::Release);
                return Err((error, true));
            }
        };
        send.send_request(head, false).map_err(|e| (e, false))
    }

    /// Send `req` and wait for the response head.
    pub(crate) async fn send(
        self,
        req: Request<UpBody>,
    ) -> Result<Response<H2Body>, Box<SendError>> {
        let mut send = match self.send.ready().await {
            Ok(s) => s,
            Err(error) => {
                // Closed or going away (a GOAWAY): the pool opens a new connection for the
                // next request rather than handing this one out again.
                self.closed.store(true, Ordering::Release);
                return Err(Box::new(SendError {
                    error,
                    unsent: Some(req),
                }));
            }
        };
        // Hop-by-hop headers, which HTTP/2 forbids (RFC 9113, 8.2.2), were stripped when the
        // request was routed (`strip_hop_by_hop`, keeping only `te: trailers`).
        let (parts, body) = req.into_parts();
        let eos = body.is_end_stream();
        // A draining peer's GOAWAY refuses the streams above the last one it took (RFC 9113,
        // 6.8: not processed), such as one opened just before the GOAWAY came. Kept for that
        // case: an idempotent request without a body, sent again on another connection.
        let again = (eos && crate::h1::idempotent(&parts.method)).then(|| {
            let mut r = Request::new(UpBody::Empty);
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            r
        });
        let head = Request::from_parts(parts, ());
        let (response, stream) = send.send_request(head, eos).map_err(|error| {
            Box::new(SendError {
                error,
                unsent: None,
            })
        })?;
        if !eos {
            tokio::spawn(stream_body(body, stream));
        }
        let resp = response.await.map_err(|error| {
            // The peer's GOAWAY ended the stream (once the peer went away, the connection's
            // end reports the same error for any stream left open: only an idempotent request
            // is sent again, as RFC 9110, 9.2.2 allows).
            let refused = error.is_go_away() && error.is_remote();
            if refused {
                self.closed.store(true, Ordering::Release);
            }
            Box::new(SendError {
                error,
                unsent: again.filter(|_| refused),
            })
        })?;
        let (parts, recv) = resp.into_parts();
        let body = H2Body::new(recv, &parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// Stream a request body into its stream, as the peer's flow control allows; the stream is
/// reset when the body fails, and the copying stops when the peer resets the stream.
async fn stream_body(mut body: UpBody, mut tx: h2::SendStream<Bytes>) {
    loop {
        let next = poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let frame = match next {
            // Reset by the peer (it answered without reading the rest, say).
            None => return,
            Some(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(_))) => {
                tx.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Some(Ok(f))) => f,
        };
        let mut data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    let _ = tx.send_trailers(t);
                } else {
                    let _ = tx.send_data(Bytes::new(), true);
                }
                return;
            }
        };
        let eos = body.is_end_stream();
        if data.is_empty() {
            if eos {
                let _ = tx.send_data(data, true);
                return;
            }
            continue;
        }
        while !data.is_empty() {
            tx.reserve_capacity(data.len());
            let n = match poll_fn(|cx| tx.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                _ => return,
            };
            if n == 0 {
                continue;
            }
            let chunk = data.split_to(n.min(data.len()));
            if tx.send_data(chunk, eos && data.is_empty()).is_err() {
                return;
            }
        }
        if eos {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http::HeaderMap;
    use http_body_util::BodyExt;

    use super::*;
    use crate::http::body::ClientBody;

    /// A request body larger than the peer's window goes out whole as the peer's flow control
    /// allows, and the response's data and trailers come back, with what was read given back
    /// to the peer's flow control (the response is larger than the client's stream window).
    #[tokio::test]
    async fn a_body_larger_than_the_windows_goes_both_ways_with_trailers() {
        const CHUNK: usize = 100 << 10;
        let (client, server) = tokio::io::duplex(16 << 10);
        let peer = tokio::spawn(async move {
            // The server's default window: 64 KiB per stream.
            let mut conn = h2::server::handshake(server).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let mut got = 0;
            while let Some(b) = body.data().await {
                let b = b.unwrap();
                got += b.len();
                body.flow_control().release_capacity(b.len()).unwrap();
            }
            let mut head = Response::new(());
            let len = STREAM_WINDOW as usize + CHUNK;
            head.headers_mut().insert("content-length", len.into());
            let mut send = respond.send_response(head, false).unwrap();
            let reply = Bytes::from(vec![b'x'; STREAM_WINDOW as usize + CHUNK]);
            send.reserve_capacity(reply.len());
            send.send_data(reply, false).unwrap();
            let mut t = HeaderMap::new();
            t.insert("x-received", got.to_string().parse().unwrap());
            send.send_trailers(t).unwrap();
        });
        let send = handshake(client, None, crate::test_util::slot())
            .await
            .unwrap();
        let chunks: VecDeque<Bytes> = (0..3).map(|i| Bytes::from(vec![i; CHUNK])).collect();
        let mut req = Request::new(UpBody::Incoming(ClientBody::Chunks(Box::new(chunks))));
        *req.uri_mut() = "http://peer/upload".parse().unwrap();
        let exchange = async {
            let Ok(resp) = send.send(req).await else {
                panic!("no response")
            };
            // The length is known before the body comes: the HTTP/1.1 server that forwards it
            // answers with a content-length rather than chunks.
            let expected = STREAM_WINDOW as u64 + CHUNK as u64;
            assert_eq!(resp.body().size_hint().exact(), Some(expected));
            resp.into_body().collect().await.unwrap()
        };
        let body = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("a stalled window would stop the exchange");
        let trailers = body.trailers().cloned().expect("trailers");
        assert_eq!(body.to_bytes().len(), STREAM_WINDOW as usize + CHUNK);
        assert_eq!(trailers["x-received"], (3 * CHUNK).to_string().as_str());
        peer.await.unwrap();
    }

    /// A peer that goes away (a draining proxy's GOAWAY): a request after it comes back
    /// unsent, for a try elsewhere, and the connection is no longer handed out.
    #[tokio::test]
    async fn after_a_goaway_requests_come_back_unsent_and_the_connection_is_closed() {
        let (client, server) = tokio::io::duplex(16 << 10);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            respond.send_response(Response::new(()), true).unwrap();
            conn.graceful_shutdown();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let _ = respond.send_response(Response::new(()), true);
            }
        });
        let send = handshake(client, None, crate::test_util::slot())
            .await
            .unwrap();
        let req = || {
            let mut r = Request::new(UpBody::Empty);
            *r.uri_mut() = "http://peer/".parse().unwrap();
            r
        };
        assert!(send.clone().send(req()).await.is_ok());
        let unsent = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match send.clone().send(req()).await {
                    Ok(_) => tokio::task::yield_now().await,
                    Err(e) => break e.unsent.is_some(),
                }
            }
        })
        .await
        .expect("the GOAWAY ends the connection");
        assert!(unsent, "the request never left");
        assert!(send.is_closed());
    }

    /// A peer (raw frames) that refuses the first stream it sees with a GOAWAY whose last
    /// stream id is below it, as a draining peer does to a stream that crossed its GOAWAY,
    /// and keeps the connection open.
    async fn refusing_peer(mut io: tokio::io::DuplexStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let frame = |kind: u8, flags: u8, payload: &[u8]| {
            let len = (payload.len() as u32).to_be_bytes();
            let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
            f.extend_from_slice(payload);
            f
        };
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await.unwrap();
        io.write_all(&frame(4, 0, &[])).await.unwrap();
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            match (head[3], head[4]) {
                // SETTINGS: acknowledged.
                (4, 0) => io.write_all(&frame(4, 1, &[])).await.unwrap(),
                // HEADERS: refused (last stream id 0, NO_ERROR).
                (1, _) => {
                    io.write_all(&frame(7, 0, &[0; 8])).await.unwrap();
                    break;
                }
                _ => {}
            }
        }
        // Open, answering nothing more.
        let mut rest = Vec::new();
        let _ = io.read_to_end(&mut rest).await;
    }

    /// A stream a draining peer's GOAWAY refused (above its last stream id: not processed)
    /// comes back unsent when it is idempotent and has no body, to be sent again on another
    /// connection; a POST does not (it fails: the same error ends streams left open when the
    /// peer goes away after taking them).
    #[tokio::test]
    async fn a_stream_refused_by_a_goaway_comes_back_unsent_when_idempotent() {
        for (method, resent) in [(http::Method::GET, true), (http::Method::POST, false)] {
            let (client, server) = tokio::io::duplex(16 << 10);
            tokio::spawn(refusing_peer(server));
            let send = handshake(client, None, crate::test_util::slot())
                .await
                .unwrap();
            let mut req = Request::new(UpBody::Empty);
            *req.method_mut() = method.clone();
            *req.uri_mut() = "http://peer/item".parse().unwrap();
            req.headers_mut().insert("x-kept", "1".parse().unwrap());
            let sent = tokio::time::timeout(Duration::from_secs(10), send.clone().send(req))
                .await
                .expect("the GOAWAY ends the stream");
            let Err(e) = sent else {
                panic!("{method}: answered")
            };
            assert!(e.error.is_go_away(), "{method}: {}", e.error);
            assert_eq!(e.unsent.is_some(), resent, "{method}");
            if let Some(r) = e.unsent {
                assert_eq!((r.method(), r.uri().path()), (&method, "/item"));
                assert_eq!(r.headers()["x-kept"], "1");
            }
            assert!(send.is_closed(), "{method}: not handed out again");
        }
    }
}
