//! The proxy's own HTTP/1.1 server, driven byte by byte from the client side: pipelining,
//! HTTP/1.0 clients, `Expect: 100-continue`, refused framings, request bodies left unread,
//! HEAD, and bytes a client sends right behind an upgrade request.

mod common;

use std::time::Duration;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An upstream written byte by byte. `GET /x` answers with the path; `POST` echoes its
/// (content-length) body; `HEAD` announces 9 bytes; `/chunked` answers with chunks; an
/// upgrade request gets a 101 and then an echo of everything that follows.
async fn upstream() -> std::net::SocketAddr {
    upstream::tcp(|mut s| async move {
        let mut buf = Vec::new();
        while let Some(head) = read_head(&mut s, &mut buf).await {
            let mut parts = head.split(' ');
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if header(&head, "upgrade").is_some() {
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
                    .await;
                let _ = s.write_all(&buf).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                return;
            }
            let reply = match (method, path) {
                ("POST", _) => {
                    let n: usize = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
                    while buf.len() < n {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..n).collect();
                    let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n").into_bytes();
                    r.extend_from_slice(&body);
                    r
                }
                ("HEAD", _) => b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n".to_vec(),
                (_, "/chunked") => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec(),
                _ => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}", path.len()).into_bytes(),
            };
            if s.write_all(&reply).await.is_err() {
                return;
            }
        }
    })
    .await
}

fn proxy(up: std::net::SocketAddr) -> ProxyProcess {
    start(&docs(&[
        service("alpha", "HTTP", &[up]),
        client_workload(&[]),
    ]))
}

/// Read from `s` until `done` holds for what was read, or the connection ends.
async fn read_until(s: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if done(&String::from_utf8_lossy(&out)) {
                return;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("an answer within 10 s");
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the proxy closed `s` (EOF within 10 s).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// An absolute-form target with a query but no path goes upstream as `/?query`: on its own
/// `?query` is no valid request target (found by the `http1_request` fuzz target).
#[tokio::test]
async fn an_absolute_target_without_a_path_goes_upstream_with_one() {
    let p = proxy(upstream().await);
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"GET http://alpha.test?q=1 HTTP/1.1\r\nhost: alpha.test\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, |o| {
        o.ends_with("/?q=1") || o.contains("x-trellis-failure")
    })
    .await;
    assert!(
        out.starts_with("HTTP/1.1 200 OK") && out.ends_with("\r\n\r\n/?q=1"),
        "{out}"
    );
}

/// A request the next hop could not take once the mesh's headers are added is refused here,
/// 431: the proxy adds `traceparent` and `x-request-id`, the next hop up to three more, and
/// HTTP/1.1 servers take 100 (found by the `http1_request` fuzz target).
#[tokio::test]
async fn a_request_with_no_room_for_the_meshs_headers_is_refused_431() {
    let p = proxy(upstream().await);
    let with = |n: usize| {
        let mut r = String::from("GET /many HTTP/1.1\r\nhost: alpha.test\r\n");
        for i in 1..n {
            r.push_str(&format!("x-h{i}: v\r\n"));
        }
        r + "connection: close\r\n\r\n"
    };
    for (n, want) in [(90, "HTTP/1.1 200"), (96, "HTTP/1.1 431")] {
        let mut s = TcpStream::connect(p.outbound).await.unwrap();
        s.write_all(with(n).as_bytes()).await.unwrap();
        let out = read_until(&mut s, |o| o.contains("\r\n\r\n")).await;
        assert!(out.starts_with(want), "{n} headers: {out}");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let p = proxy(upstream().await);
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    let req = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: alpha.test\r\n\r\n");
    s.write_all(format!("{}{}{}", req("/one"), req("/two"), req("/three")).as_bytes())
        .await
        .unwrap();
    let out = read_until(&mut s, |o| o.ends_with("/three")).await;
    let bodies: Vec<&str> = out
        .split("HTTP/1.1 200 OK")
        .skip(1)
        .map(|r| r.rsplit("\r\n\r\n").next().unwrap())
        .collect();
    assert_eq!(bodies, ["/one", "/two", "/three"], "{out}");
    // The connection stays usable afterwards.
    s.write_all(req("/four").as_bytes()).await.unwrap();
    let out = read_until(&mut s, |o| o.ends_with("/four")).await;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(header(&out, "date").is_some(), "{out}");
}

#[tokio::test]
async fn http10_clients_get_keep_alive_only_when_they_ask() {
    let p = proxy(upstream().await);
    // Without keep-alive: the answer, then the close.
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"GET /a HTTP/1.0\r\nhost: alpha.test\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, |_| false).await;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(out.ends_with("\r\n\r\n/a"), "{out}");
    assert_eq!(header(&out, "connection"), Some("close"), "{out}");

    // With keep-alive: said so, and a second request on the same connection works. A body
    // of unknown length cannot be chunked for HTTP/1.0: it runs to the close.
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"GET /b HTTP/1.0\r\nhost: alpha.test\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, |o| o.ends_with("/b")).await;
    assert_eq!(header(&out, "connection"), Some("keep-alive"), "{out}");
    s.write_all(b"GET /chunked HTTP/1.0\r\nhost: alpha.test\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, |_| false).await;
    assert!(out.ends_with("\r\n\r\nhello world"), "{out}");
    assert_eq!(header(&out, "transfer-encoding"), None, "{out}");
    assert_eq!(header(&out, "connection"), Some("close"), "{out}");
}

#[tokio::test]
async fn expect_continue_is_answered_before_the_body_is_sent() {
    let p = proxy(upstream().await);
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nhost: alpha.test\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let out = read_until(&mut s, |o| o.contains("\r\n\r\n")).await;
    assert!(out.starts_with("HTTP/1.1 100 Continue\r\n\r\n"), "{out}");
    s.write_all(b"hello").await.unwrap();
    let out = read_until(&mut s, |o| o.ends_with("hello")).await;
    assert!(out.contains("HTTP/1.1 200 OK"), "{out}");
    assert_eq!(header(&out, "content-length"), Some("5"), "{out}");
}

#[tokio::test]
async fn ambiguous_or_unknown_framings_are_refused() {
    let p = proxy(upstream().await);
    for (req, status) in [
        // Both a length and a coding: how request smuggling starts.
        (
            "POST / HTTP/1.1\r\nhost: alpha.test\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            "400",
        ),
        (
            "POST / HTTP/1.1\r\nhost: alpha.test\r\ntransfer-encoding: gzip\r\n\r\n",
            "501",
        ),
        (
            "POST / HTTP/1.1\r\nhost: alpha.test\r\ncontent-length: 1x\r\n\r\n",
            "400",
        ),
    ] {
        let mut s = TcpStream::connect(p.outbound).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let out = read_until(&mut s, |_| false).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{req:?}: {out}");
        assert_eq!(header(&out, "x-trellis-failure"), Some("client_error"), "{out}");
        assert_eq!(header(&out, "connection"), Some("close"), "{out}");
    }
    // None of it reached the upstream, and the proxy serves on.
    let r = client::get(p.outbound, "alpha.test", "/still", &[])
        .await
        .unwrap();
    assert_eq!(r.0, 200);
}

#[tokio::test]
async fn a_request_body_left_unread_ends_the_connection() {
    let p = proxy(upstream().await);
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    // No route: the proxy answers without reading the body, so the bytes that follow the
    // head cannot be told from a next request, and the connection must close.
    s.write_all(b"POST / HTTP/1.1\r\nhost: nowhere.test\r\ncontent-length: 20\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, |o| o.contains("\r\n\r\n")).await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert_eq!(header(&out, "connection"), Some("close"), "{out}");
    assert!(closed(&mut s).await, "closed after the answer");
}

#[tokio::test]
async fn head_answers_keep_their_length_and_carry_no_body() {
    let p = proxy(upstream().await);
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"HEAD /h HTTP/1.1\r\nhost: alpha.test\r\n\r\nGET /after HTTP/1.1\r\nhost: alpha.test\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, |o| o.ends_with("/after")).await;
    let (head, rest) = out.split_once("\r\n\r\n").unwrap();
    assert_eq!(header(head, "content-length"), Some("9"), "{out}");
    assert!(
        rest.starts_with("HTTP/1.1 200 OK"),
        "no body after HEAD: {out}"
    );
}

#[tokio::test]
async fn bytes_sent_right_behind_an_upgrade_request_reach_the_upstream() {
    let p = proxy(upstream().await);
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    // The client does not wait for the 101 before it speaks the new protocol.
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: alpha.test\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nearly bytes",
    )
    .await
    .unwrap();
    let out = read_until(&mut s, |o| o.ends_with("early bytes")).await;
    assert!(out.starts_with("HTTP/1.1 101 Switching Protocols"), "{out}");
    assert_eq!(header(&out, "upgrade"), Some("echo"), "{out}");
    s.write_all(b" and later ones").await.unwrap();
    let out = read_until(&mut s, |o| o.ends_with("later ones")).await;
    assert_eq!(out, " and later ones");
}

#[tokio::test]
async fn kept_alive_connections_close_after_the_idle_timeout() {
    let up = upstream().await;
    let p = ProxyProcess::start(
        common::BIN,
        &docs(&[service("alpha", "HTTP", &[up]), client_workload(&[])]),
        &["--workload", "test/client", "--idle-timeout", "300ms"],
    );
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"GET /once HTTP/1.1\r\nhost: alpha.test\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, |o| o.ends_with("/once")).await;
    assert_eq!(header(&out, "connection"), None, "kept alive: {out}");
    assert!(closed(&mut s).await, "closed once idle past --idle-timeout");
}
