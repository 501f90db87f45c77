use std::{io, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Acceptor, Mux, MuxStream, MAX_STREAMS, WINDOW};

/// A caller and a callee over an in-memory connection, their tasks spawned.
fn pair() -> (
    Mux,
    Acceptor,
    tokio::task::JoinHandle<io::Result<()>>,
    tokio::task::JoinHandle<io::Result<()>>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (mux, caller) = Mux::client(a);
    let (acceptor, callee) = Acceptor::server(b);
    (mux, acceptor, tokio::spawn(caller), tokio::spawn(callee))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Echo every stream back, reversed in no way: what comes in goes out, then the end.
fn echo(mut acceptor: Acceptor) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(mut s) = acceptor.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    })
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("done in time")
}

/// A connection's task ends, and without an error (a clean close), in time.
async fn closed_cleanly(task: tokio::task::JoinHandle<io::Result<()>>) {
    within(task)
        .await
        .expect("the connection's task")
        .expect("closed cleanly");
}

#[tokio::test]
async fn many_streams_carry_their_own_bytes_both_ways() {
    let (mux, acceptor, _c, _s) = pair();
    let _echo = echo(acceptor);
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let s = mux.open().expect("a stream");
        tasks.push(tokio::spawn(async move {
            // More than a window each way: the echo only writes what it read, so the
            // windows must open again as each side reads.
            let data = pattern(i, 700 * 1024);
            let (mut rd, mut wr) = tokio::io::split(s);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                for c in sent.chunks(10_000) {
                    wr.write_all(c).await.expect("write");
                }
                wr.shutdown().await.expect("finish");
                wr
            });
            let mut back = Vec::new();
            rd.read_to_end(&mut back).await.expect("read to the end");
            let _wr = writer.await.expect("writer");
            assert_eq!(back.len(), data.len());
            assert!(back == data, "stream {i} got its own bytes back");
        }));
    }
    within(async {
        for t in tasks {
            t.await.expect("stream task");
        }
    })
    .await;
    assert_eq!(mux.open_streams(), 0, "ended streams are forgotten");
}

#[tokio::test]
async fn a_stalled_stream_holds_up_no_other() {
    let (mux, mut acceptor, _c, _s) = pair();
    // The stalled stream: its callee never reads.
    let stalled = mux.open().expect("a stream");
    stalled.send_all(b"first").await.expect("first bytes");
    let held = within(acceptor.accept()).await.expect("accepted");
    assert_eq!(within(read_some(&held)).await, b"first");
    let writer = tokio::spawn(async move {
        // Past the window: this write waits for room that never comes.
        let big = vec![7u8; 2 * WINDOW as usize];
        let r = stalled.send_all(&big).await;
        (stalled, r)
    });
    // Meanwhile another stream goes through.
    let other = mux.open().expect("another stream");
    other.send_all(b"hello").await.expect("write");
    other.finish();
    let mut got = within(acceptor.accept()).await.expect("accepted");
    let mut back = Vec::new();
    within(got.read_to_end(&mut back)).await.expect("read");
    assert_eq!(back, b"hello");
    assert!(
        !writer.is_finished(),
        "the stalled stream waits for its window"
    );
    // The stalled reader reads: the writer goes on.
    let mut rest = Vec::new();
    let reader = tokio::spawn(async move {
        let mut held = held;
        held.read_to_end(&mut rest).await.map(|_| rest)
    });
    let (stalled, r) = within(writer).await.expect("writer");
    r.expect("the rest sent");
    stalled.finish();
    let rest = within(reader).await.expect("reader").expect("read");
    assert_eq!(rest.len(), 2 * WINDOW as usize);
}

/// What has arrived on `s` (at least a byte).
async fn read_some(s: &MuxStream) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    std::future::poll_fn(|cx| s.poll_read_into(cx, &mut b))
        .await
        .expect("read");
    b.to_vec()
}

#[tokio::test]
async fn a_dropped_stream_reads_as_a_reset_after_its_bytes() {
    let (mux, mut acceptor, _c, _s) = pair();
    let s = mux.open().expect("a stream");
    s.send_all(b"partial").await.expect("write");
    drop(s);
    let mut got = within(acceptor.accept()).await.expect("accepted");
    let mut buf = Vec::new();
    let err = within(got.read_to_end(&mut buf))
        .await
        .expect_err("a reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(buf, b"partial", "what came before the reset is read");
    // Its writes fail too.
    let e = got.write_all(b"x").await.expect_err("written into a reset");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn a_lost_connection_fails_its_streams() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (mux, caller) = Mux::client(a);
    let _caller = tokio::spawn(caller);
    let (mut acceptor, callee) = Acceptor::server(b);
    let callee = tokio::spawn(callee);
    let s = mux.open().expect("a stream");
    s.send_all(b"ping").await.expect("write");
    let _got = within(acceptor.accept()).await.expect("accepted");
    // The callee's side of the connection goes away (its task and socket).
    callee.abort();
    let _ = callee.await;
    let mut s = s;
    let mut buf = Vec::new();
    let err = within(s.read_to_end(&mut buf)).await.expect_err("failed");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(!mux.is_usable(), "no more streams on a lost connection");
    assert!(mux.open().is_none());
}

#[tokio::test]
async fn going_away_serves_the_streams_sent_before_the_answer_then_closes() {
    let (mux, mut acceptor, caller, callee) = pair();
    let open = mux.open().expect("a stream");
    open.send_all(b"before").await.expect("write");
    let first = within(acceptor.accept()).await.expect("accepted");
    acceptor.go_away();
    // Opened before the caller read the GOAWAY (nothing ran in between): still served.
    let late = mux.open().expect("not known to go away yet");
    late.send_all(b"late").await.expect("write");
    late.finish();
    let mut got = within(acceptor.accept())
        .await
        .expect("the late stream is served");
    let mut buf = Vec::new();
    within(got.read_to_end(&mut buf)).await.expect("read");
    assert_eq!(buf, b"late");
    got.finish();
    let mut back = Vec::new();
    let mut late = late;
    within(late.read_to_end(&mut back)).await.expect("its end");
    drop(late);
    drop(got);
    // The caller read the GOAWAY: no new streams.
    within(async {
        while mux.is_usable() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(mux.open().is_none());
    // The first stream still works both ways.
    first
        .send_all(b"answer")
        .await
        .expect("the callee still writes");
    first.finish();
    let mut open = open;
    open.finish();
    let mut back = Vec::new();
    within(open.read_to_end(&mut back)).await.expect("read");
    assert_eq!(back, b"answer");
    drop(open);
    drop(first);
    // With the last stream gone, the connection closes, and the acceptor says so.
    assert!(within(acceptor.accept()).await.is_none());
    closed_cleanly(callee).await;
    closed_cleanly(caller).await;
}

#[tokio::test]
async fn the_callee_refuses_streams_past_its_limit() {
    let (mux, mut acceptor, _c, _s) = pair();
    let mut open = Vec::new();
    for _ in 0..MAX_STREAMS {
        let s = mux.open().expect("a stream");
        s.send_all(b"x").await.expect("write");
        open.push(s);
    }
    assert!(
        mux.open().is_none(),
        "the caller opens no more than the limit"
    );
    let mut taken = Vec::new();
    for _ in 0..MAX_STREAMS {
        taken.push(within(acceptor.accept()).await.expect("accepted"));
    }
    // A caller that does not keep to it (made here by hand) is refused.
    let rogue = MuxStream {
        shared: mux.shared.clone(),
        id: 1_000_000,
    };
    mux.shared
        .lock()
        .streams
        .insert(1_000_000, super::Stream::new(false));
    rogue.send_all(b"one too many").await.expect("queued");
    let mut rogue = rogue;
    let mut buf = Vec::new();
    let err = within(rogue.read_to_end(&mut buf))
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn the_connection_closes_when_the_caller_lets_go() {
    let (mux, acceptor, caller, callee) = pair();
    let _echo = echo(acceptor);
    let mut s = mux.open().expect("a stream");
    s.write_all(b"hi").await.expect("write");
    s.shutdown().await.expect("finish");
    let mut back = Vec::new();
    within(s.read_to_end(&mut back)).await.expect("read");
    assert_eq!(back, b"hi");
    drop(s);
    assert!(!caller.is_finished(), "a handle keeps the connection");
    drop(mux);
    closed_cleanly(caller).await;
    closed_cleanly(callee).await;
}

#[tokio::test]
async fn a_stream_opened_as_the_callee_goes_away_is_served() {
    let (mux, mut acceptor, _caller, callee) = pair();
    // No stream open: the callee could close at once, but waits for the caller's answer.
    acceptor.go_away();
    // The caller has not read the GOAWAY yet (nothing ran in between): it opens a stream.
    let late = mux.open().expect("not known to go away yet");
    late.send_all(b"late").await.expect("write");
    late.finish();
    let mut got = within(acceptor.accept())
        .await
        .expect("the stream sent before the answer is served");
    let mut buf = Vec::new();
    within(got.read_to_end(&mut buf)).await.expect("read");
    assert_eq!(buf, b"late");
    got.write_all(b"served").await.expect("answer");
    got.finish();
    let mut late = late;
    let mut back = Vec::new();
    within(late.read_to_end(&mut back))
        .await
        .expect("its answer");
    assert_eq!(back, b"served");
    drop((late, got));
    assert!(within(acceptor.accept()).await.is_none());
    closed_cleanly(callee).await;
}
