//! The proxy's own HTTP/1.1 client, against upstreams written byte by byte: connection reuse,
//! every response framing, stale pooled connections, early answers to a request body, chunked
//! request bodies and malformed responses.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// An upstream running `conn` for each accepted connection, and the number accepted.
async fn counted<F, Fut>(conn: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    let addr = upstream::tcp(move |s| {
        seen.fetch_add(1, Ordering::SeqCst);
        conn(s)
    })
    .await;
    (addr, n)
}

fn path_of(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

fn proxy_for(up: std::net::SocketAddr) -> ProxyProcess {
    start(&docs(&[
        service("alpha", "HTTP", &[up]),
        client_workload(&[]),
    ]))
}

/// Send raw bytes on a new connection to the proxy and read until it closes.
async fn raw(p: &ProxyProcess, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("reply within 10 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn keep_alive_reuses_one_upstream_connection() {
    let (up, conns) = counted(|mut s| async move {
        let mut buf = Vec::new();
        while let Some(head) = read_head(&mut s, &mut buf).await {
            let body = path_of(&head).to_string();
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let p = proxy_for(up);
    let mut c = client::Conn::h1(p.outbound).await;
    for i in 0..20 {
        let r = c.get("alpha.test", &format!("/r{i}")).await.unwrap();
        assert_eq!(
            (r.status.as_u16(), &r.body[..]),
            (200, format!("/r{i}").as_bytes())
        );
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "one upstream connection for 20 requests"
    );
}

#[tokio::test]
async fn every_response_framing_is_relayed() {
    let up = upstream::tcp(|mut s| async move {
        let mut buf = Vec::new();
        while let Some(head) = read_head(&mut s, &mut buf).await {
            let reply: &[u8] = match path_of(&head) {
                // Chunk extensions, several chunks, a trailer section.
                "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
                // A length next to chunked: the coding wins and the length is dropped.
                "/both" => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                "/204" => b"HTTP/1.1 204 No Content\r\n\r\n",
                "/304" => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                // Interim response before the final one.
                "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                // HEAD: a length but no body.
                "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                _ => b"",
            };
            if path_of(&head) == "/close" {
                // No length: the body runs to the close.
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
                return;
            }
            if path_of(&head) == "/drip" {
                // The head and body in many small writes.
                for b in b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndrip" {
                    if s.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    s.flush().await.unwrap();
                }
                continue;
            }
            if s.write_all(reply).await.is_err() {
                return;
            }
        }
    })
    .await;
    let p = proxy_for(up);
    let mut c = client::Conn::h1(p.outbound).await;
    let r = c.get("alpha.test", "/chunked").await.unwrap();
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello world"[..]));
    let r = c.get("alpha.test", "/both").await.unwrap();
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"ok"[..]));
    assert!(!r.headers.contains_key("content-length"), "{:?}", r.headers);
    let r = c.get("alpha.test", "/204").await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.len()), (204, 0));
    let r = c.get("alpha.test", "/304").await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.len()), (304, 0));
    let r = c.get("alpha.test", "/continue").await.unwrap();
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"ok"[..]));
    let r = c.get("alpha.test", "/drip").await.unwrap();
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"drip"[..]));
    let r = c.get("alpha.test", "/close").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), &r.body[..]),
        (200, &b"until the end"[..])
    );
    // The closed connection is not reused: the next request still works.
    let r = c.get("alpha.test", "/chunked").await.unwrap();
    assert_eq!(&r.body[..], b"hello world");
    let out = raw(
        &p,
        b"HEAD /head HTTP/1.1\r\nHost: alpha.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("content-length: 5"),
        "{out}"
    );
    assert!(
        out.ends_with("\r\n\r\n"),
        "no body after a HEAD response: {out:?}"
    );
}

#[tokio::test]
async fn a_stale_pooled_connection_is_retried_only_for_idempotent_requests() {
    // Each connection answers its first request, then closes on the second without a word:
    // the race of a server closing an idle keep-alive connection just as it is reused.
    let (up, conns) = counted(|mut s| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
        let _ = read_head(&mut s, &mut buf).await;
    })
    .await;
    let p = proxy_for(up);
    let mut c = client::Conn::h1(p.outbound).await;
    assert_eq!(c.get("alpha.test", "/1").await.unwrap().status, 200);
    // A GET on the now-stale connection is sent again on a fresh one.
    let r = c.get("alpha.test", "/2").await.unwrap();
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"ok"[..]));
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    // A POST is not: the server may have acted on it.
    let out = raw(
        &p,
        b"POST /3 HTTP/1.1\r\nHost: alpha.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(out.contains("x-trellis-failure: connection_reset"), "{out}");
}

#[tokio::test]
async fn an_early_answer_to_a_request_body_is_relayed() {
    // The upstream refuses the upload from its head alone and never reads the body.
    let up = upstream::tcp(|mut s| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbig!")
                .await;
            // Drain whatever comes, as servers do before closing.
            let mut sink = [0u8; 65536];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    let p = proxy_for(up);
    // The client sends a tenth of its body, then waits for an answer: a proxy that writes
    // the whole body before reading the response would never give one.
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: alpha.test\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[b'x'; 10000]).await.unwrap();
    let mut got = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&chunk[..n]);
            if got.windows(4).any(|w| w == b"big!") {
                break String::from_utf8_lossy(&got).into_owned();
            }
        }
    })
    .await
    .expect("the 413 arrives while the body is still being sent");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

#[tokio::test]
async fn a_body_of_unknown_length_goes_upstream_chunked() {
    let up = upstream::tcp(|mut s| async move {
        let mut buf = Vec::new();
        let Some(head) = read_head(&mut s, &mut buf).await else {
            return;
        };
        // Read to the last chunk and answer with what arrived.
        while !buf.windows(5).any(|w| w == b"0\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = format!(
            "chunked={chunked} raw={}",
            String::from_utf8_lossy(&buf).escape_debug()
        );
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(reply.as_bytes()).await;
    })
    .await;
    let p = proxy_for(up);
    let out = raw(
        &p,
        b"POST /c HTTP/1.1\r\nHost: alpha.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("chunked=true"), "{out}");
    // The chunks may be regrouped, but the data and the framing must be intact.
    let raw_body = out.split("raw=").nth(1).unwrap();
    let decoded: String = raw_body
        .split("\\r\\n")
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(decoded, "abcde", "{raw_body}");
}

#[tokio::test]
async fn malformed_upstream_responses_are_protocol_errors() {
    let up = upstream::tcp(|mut s| async move {
        let mut buf = Vec::new();
        if let Some(head) = read_head(&mut s, &mut buf).await {
            let reply: &[u8] = match path_of(&head) {
                "/garbage" => b"HTTP/1.1 abc\r\n\r\n",
                "/lengths" => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"
                }
                _ => b"NOT HTTP AT ALL\r\n\r\n",
            };
            let _ = s.write_all(reply).await;
        }
    })
    .await;
    let p = proxy_for(up);
    for path in ["/garbage", "/lengths", "/other"] {
        let r = client::get_full(p.outbound, "alpha.test", path, &[])
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 502, "{path}");
        assert_eq!(r.headers["x-trellis-failure"], "protocol_error", "{path}");
    }
    let log = p
        .wait_log("protocol error line", |l| l["path"] == "/lengths")
        .await;
    assert_eq!(log["failure_class"], "protocol_error");
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_upstream_is_not_used() {
    // Each connection answers one request, then the server closes it (without saying
    // `connection: close`), as servers do when their keep-alive timeout expires.
    let closed = Arc::new(AtomicUsize::new(0));
    let c = closed.clone();
    let up = upstream::tcp(move |mut s| {
        let c = c.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_some() {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
            drop(s);
            c.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let p = proxy_for(up);
    let mut requests = 0;
    for i in 0..5 {
        let r = client::get_full(p.outbound, "alpha.test", "/", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        requests += 1;
        eventually("the upstream closed", Duration::from_secs(5), async || {
            (closed.load(Ordering::SeqCst) >= requests).then_some(())
        })
        .await;
        // A POST may not be resent, so it only succeeds if the proxy noticed the close
        // (the pool's liveness probe) and opened a fresh connection.
        let out = raw(
            &p,
            b"POST /p HTTP/1.1\r\nHost: alpha.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "round {i}: {out}");
        requests += 1;
    }
}
