//! Fake upstreams, each misbehaving in one precise way.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Listen on an ephemeral loopback port and run `conn` on a task of its own for each
/// accepted connection.
pub async fn tcp<F, Fut>(conn: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(conn(s));
        }
    });
    addr
}

/// Serve HTTP/1.1 and h2c with `f` on an ephemeral loopback port.
pub async fn http<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let f = Arc::new(f);
    tcp(move |s| {
        let f = f.clone();
        async move {
            let svc = service_fn(move |req| {
                let fut = f(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                .await;
        }
    })
    .await
}

fn reply(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// Answers 200 with body `name`, echoing some request headers back as `x-seen-*`.
pub async fn named(name: &'static str) -> SocketAddr {
    http(move |req| async move {
        let mut r = reply(200, name.to_string());
        for h in [
            "traceparent",
            "x-request-id",
            "host",
            "x-added",
            "x-removed",
        ] {
            if let Some(v) = req.headers().get(h) {
                r.headers_mut().insert(
                    http::HeaderName::from_bytes(format!("x-seen-{h}").as_bytes()).unwrap(),
                    v.clone(),
                );
            }
        }
        r.headers_mut()
            .insert("x-upstream-secret", http::HeaderValue::from_static("1"));
        r
    })
    .await
}

/// Answers `status` always; counts hits.
pub async fn status(code: u16, hits: Arc<AtomicUsize>) -> SocketAddr {
    http(move |_| {
        hits.fetch_add(1, Ordering::Relaxed);
        async move { reply(code, format!("status {code}")) }
    })
    .await
}

/// Fails 3 of every 10 requests with 503 (deterministically); counts hits.
pub async fn flaky(hits: Arc<AtomicUsize>) -> SocketAddr {
    http(move |_| {
        let n = hits.fetch_add(1, Ordering::Relaxed);
        async move {
            if n % 10 < 3 {
                reply(503, "flaky".into())
            } else {
                reply(200, "ok".into())
            }
        }
    })
    .await
}

/// Answers 200 after `delay`.
pub async fn slow(delay: Duration) -> SocketAddr {
    http(move |_| async move {
        tokio::time::sleep(delay).await;
        reply(200, "slow".into())
    })
    .await
}

/// Accepts connections and never answers.
pub async fn hang() -> SocketAddr {
    tcp(|s| async move {
        std::future::pending::<()>().await;
        drop(s);
    })
    .await
}

/// Reads a request, sends the head and part of the body, then resets the connection.
pub async fn reset_mid_response() -> SocketAddr {
    tcp(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial")
            .await;
        let _ = s.flush().await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    })
    .await
}

/// An address where nothing listens: a port free now on a random `127.0.0.X` (see
/// [`spare_addr`]). A port of 127.0.0.1 given back could be taken by another test's
/// listener in the meantime (an admin server answered a test's "refused" requests 404 so).
pub async fn closed_port() -> SocketAddr {
    spare_addr().await
}

/// An address that refuses connections for as long as the returned socket lives: its port
/// is bound but not listening, so no other test's listener can take it in the meantime (as
/// it can a port [`closed_port`] gave back).
pub fn refusing() -> (SocketAddr, socket2::Socket) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    (addr, sock)
}

/// An address to listen on later (a process started after something that must know it):
/// a port free now on a random `127.0.0.X` (X from 2 to 254). Other tests' connections to
/// 127.0.0.1 take their own ephemeral ports on 127.0.0.1, so none of them can take this
/// one in the meantime, as they could a port of 127.0.0.1's given back by
/// [`closed_port`].
pub async fn spare_addr() -> SocketAddr {
    let l = TcpListener::bind((spare_ip(), 0)).await.unwrap();
    l.local_addr().unwrap()
}

/// A random `127.0.0.X` (X from 2 to 254), where no other test's outgoing connection takes
/// an ephemeral port (theirs are on 127.0.0.1).
pub fn spare_ip() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 0, fastrand::u8(2..=254))
}

/// A listener whose accept queue is full, so that new SYNs are dropped: connects time out.
/// Keep the returned value alive for as long as the address must stay that way.
pub async fn full_backlog() -> (SocketAddr, Vec<TcpStream>, socket2::Socket) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fill.push(s),
            _ => return (addr, fill, sock),
        }
    }
    panic!("could not fill the listen backlog of {addr}");
}

/// Echoes TCP bytes back.
pub async fn tcp_echo() -> SocketAddr {
    tcp(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// Counter handle.
pub fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}
