//! The two ends of an opaque stream on an HTTP/2 connection, over an in-memory connection:
//! the caller's [`Outgoing`] against hyper's HTTP/2 server answering with the callee's
//! [`crate::pipe`], as the inbound listener does.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

use super::*;
use crate::{
    http::body::ProxyBody,
    pipe::{pipe, Duplex},
};

/// A callee whose every stream goes to `streams` (the test plays its application), and a
/// caller's connection to it, both set up as the proxies set up a connection for streams.
async fn connection() -> (
    h2::client::SendRequest<Bytes>,
    mpsc::UnboundedReceiver<Duplex>,
) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (tx, streams) = mpsc::unbounded_channel();
    let svc = service_fn(move |req: Request<Incoming>| {
        let (out, body) = pipe();
        tx.send(Duplex::new(req.into_body(), out)).unwrap();
        async move { Ok::<_, Infallible>(Response::new(ProxyBody::pipe(body))) }
    });
    tokio::spawn(async move {
        let _ = crate::http::server::for_streams(http2::Builder::new(TokioExecutor::new()))
            .serve_connection(TokioIo::new(b), svc)
            .await;
    });
    let windows = crate::h2_client::STREAMS;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .handshake(a)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, streams)
}

async fn open(send: &h2::client::SendRequest<Bytes>) -> Outgoing {
    let head = Request::builder()
        .method(crate::peer_stream::STREAM_METHOD)
        .uri("http://127.0.0.1:1/")
        .body(())
        .unwrap();
    let (response, tx) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(head, false)
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let mut s = Outgoing::new(response, tx, OpenCount::new(count));
    s.head().await.unwrap();
    s
}

/// `f`, which must finish within ten seconds.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), f)
        .await
        .expect("done within 10 s")
}

async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.map(|_| v)
}

/// Bytes both ways, more than either side's windows and the pipe's queue, each side's end
/// read as the other's end (TCP's half-close), and no reset when both ended cleanly.
#[tokio::test]
async fn bytes_go_both_ways_and_each_end_is_an_end() {
    let (send, mut streams) = connection().await;
    let mut caller = open(&send).await;
    let callee = streams.recv().await.unwrap();
    let up: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
    let down: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7) as u8).collect();
    let (up2, down2) = (up.clone(), down.clone());
    let callee_side = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(callee);
        let write = async {
            w.write_all(&down2).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let (got, ()) = tokio::join!(read_all(&mut r), write);
        assert_eq!(got.unwrap(), up2, "what the callee read");
    });
    let (mut r, mut w) = tokio::io::split(&mut caller);
    let write = async {
        w.write_all(&up).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let (got, ()) = within(async { tokio::join!(read_all(&mut r), write) }).await;
    assert_eq!(got.unwrap(), down, "what the caller read");
    callee_side.await.unwrap();
}

/// The callee's side failing (its application reset the connection: the stream dropped
/// before it shut down) reaches the caller as a reset. What was written just before may be
/// lost with it (the reset discards the stream's queued frames), as a TCP reset may discard
/// data not yet read.
#[tokio::test]
async fn a_failure_on_the_callees_side_reads_as_a_reset() {
    let (send, mut streams) = connection().await;
    let mut caller = open(&send).await;
    let mut callee = streams.recv().await.unwrap();
    callee.write_all(b"partial").await.unwrap();
    drop(callee);
    let mut got = Vec::new();
    let e = loop {
        let mut buf = [0u8; 16];
        match within(caller.read(&mut buf)).await {
            Ok(0) => panic!("an end, not a reset, after {got:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(b"partial".starts_with(&got), "{got:?}");
}

/// The caller's side going away before its end (its client reset the connection) reaches
/// the callee as a reset, and the callee's writes then fail.
#[tokio::test]
async fn a_caller_gone_before_its_end_reads_as_a_reset() {
    let (send, mut streams) = connection().await;
    let mut caller = open(&send).await;
    let mut callee = streams.recv().await.unwrap();
    caller.write_all(b"half").await.unwrap();
    let mut buf = [0u8; 4];
    callee.read_exact(&mut buf).await.unwrap();
    drop(caller);
    let e = within(read_all(&mut callee))
        .await
        .expect_err("a reset, not an end");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    // hyper drops the response body once the stream is reset: writes fail from then on.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::time::timeout_at(deadline, callee.write_all(b"late"))
        .await
        .expect("the callee's writes fail within 10 s")
        .is_ok()
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A stream whose callee does not read (its application stalled) takes no more than its own
/// window of the connection's: another stream on the same connection still goes both ways.
/// With hyper's default windows (1 MiB for the connection as for a stream) the first stream
/// would hold the whole connection.
#[tokio::test]
async fn a_stalled_stream_holds_up_no_other() {
    let (send, mut streams) = connection().await;
    let mut stalled = open(&send).await;
    let _unread = streams.recv().await.unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let count = written.clone();
    tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        loop {
            if stalled.write_all(&chunk).await.is_err() {
                return;
            }
            count.fetch_add(chunk.len(), Ordering::AcqRel);
        }
    });
    // Its writes stop once the peer's window for it is used up.
    let window = crate::peer_stream::STREAM_WINDOW as usize;
    crate::test_util::eventually_async(|| {
        let n = written.load(Ordering::Acquire);
        async move { n >= window }
    })
    .await;
    let mut other = open(&send).await;
    let mut callee = streams.recv().await.unwrap();
    // More than a stream's window, so the callee's reading must give the window back.
    let mut got = vec![0u8; 2 * window];
    let sent = vec![1u8; 2 * window];
    let (w, r) =
        within(async { tokio::join!(other.write_all(&sent), callee.read_exact(&mut got)) }).await;
    w.unwrap();
    r.unwrap();
    callee.write_all(b"back").await.unwrap();
    let mut back = [0u8; 4];
    within(other.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"back");
    assert!(
        written.load(Ordering::Acquire) < 4 * window,
        "the stalled stream kept writing: {}",
        written.load(Ordering::Acquire)
    );
}
