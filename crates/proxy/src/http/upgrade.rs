//! The client's side of a protocol switch (WebSocket's 101, or a CONNECT tunnel), whichever
//! server read the request: the proxy's own HTTP/1.1 one or hyper's HTTP/2 one.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::Request;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::h1::server;

/// The connection to come, once the response has been sent.
pub(crate) enum OnUpgrade {
    H1(Option<tokio::sync::oneshot::Receiver<server::Switched>>),
    Hyper(hyper::upgrade::OnUpgrade),
}

/// Take the pending upgrade out of `req`: before the request is consumed.
pub(crate) fn on<B>(req: &mut Request<B>) -> OnUpgrade {
    match req.extensions_mut().remove::<server::OnUpgrade>() {
        Some(on) => OnUpgrade::H1(on.into_receiver()),
        None => OnUpgrade::Hyper(hyper::upgrade::on(req)),
    }
}

impl OnUpgrade {
    /// Wait for the switch.
    pub(crate) async fn wait(self) -> io::Result<Upgraded> {
        let gone = || io::Error::new(io::ErrorKind::NotConnected, "the client connection ended");
        match self {
            Self::H1(rx) => {
                let server::Switched { io, early } =
                    rx.ok_or_else(gone)?.await.map_err(|_| gone())?;
                Ok(Upgraded::H1 { io, early })
            }
            Self::Hyper(on) => Ok(Upgraded::Hyper(TokioIo::new(
                on.await.map_err(io::Error::other)?,
            ))),
        }
    }
}

/// The client's connection after the switch.
pub(crate) enum Upgraded {
    /// The socket, and what the client sent right after its request head (read first).
    H1 {
        io: TcpStream,
        early: Bytes,
    },
    Hyper(TokioIo<hyper::upgrade::Upgraded>),
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H1 { early, .. } if !early.is_empty() => {
                crate::net::read_held(early, buf);
                Poll::Ready(Ok(()))
            }
            Self::H1 { io, .. } => Pin::new(io).poll_read(cx, buf),
            Self::Hyper(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::H1 { io, .. } => Pin::new(io).poll_write(cx, buf),
            Self::Hyper(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H1 { io, .. } => Pin::new(io).poll_flush(cx),
            Self::Hyper(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H1 { io, .. } => Pin::new(io).poll_shutdown(cx),
            Self::Hyper(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
