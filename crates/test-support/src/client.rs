//! Minimal real HTTP clients (hyper) for tests.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A response, fully read.
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// One HTTP/1.1 request on a new connection.
pub async fn send1(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
    let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    let (mut s, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    read_reply(s.send_request(req).await?).await
}

/// Read a whole response.
async fn read_reply(resp: http::Response<hyper::body::Incoming>) -> Result<Reply, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// GET `path` with `Host: host` over HTTP/1.1.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Bytes), hyper::Error> {
    let r = get_full(addr, host, path, headers).await?;
    Ok((r.status, r.body))
}

/// GET with the whole reply.
pub async fn get_full(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, hyper::Error> {
    let mut b = Request::get(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send1(addr, b.body(Full::new(Bytes::new())).unwrap()).await
}

/// A keep-alive HTTP/1.1 or HTTP/2 (prior knowledge) client on one connection.
pub struct Conn {
    h1: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    h2: Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
}

impl Conn {
    /// Connect with HTTP/1.1.
    pub async fn h1(addr: SocketAddr) -> Self {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let (s, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        Self {
            h1: Some(s),
            h2: None,
        }
    }

    /// Connect with HTTP/2 prior knowledge (h2c).
    pub async fn h2(addr: SocketAddr) -> Self {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        Self {
            h1: None,
            h2: Some(s),
        }
    }

    /// GET `path` at `authority`.
    pub async fn get(&mut self, authority: &str, path: &str) -> Result<Reply, hyper::Error> {
        self.send(http::Method::GET, authority, path, Bytes::new())
            .await
    }

    /// POST `body` to `path` at `authority`.
    pub async fn post(
        &mut self,
        authority: &str,
        path: &str,
        body: Bytes,
    ) -> Result<Reply, hyper::Error> {
        self.send(http::Method::POST, authority, path, body).await
    }

    async fn send(
        &mut self,
        method: http::Method,
        authority: &str,
        path: &str,
        body: Bytes,
    ) -> Result<Reply, hyper::Error> {
        let resp = if let Some(s) = self.h1.as_mut() {
            s.ready().await?;
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", authority)
                .body(Full::new(body))
                .unwrap();
            s.send_request(req).await?
        } else {
            let s = self.h2.as_mut().unwrap();
            s.ready().await?;
            let req = Request::builder()
                .method(method)
                .uri(format!("http://{authority}{path}"))
                .body(Full::new(body))
                .unwrap();
            s.send_request(req).await?
        };
        read_reply(resp).await
    }
}
