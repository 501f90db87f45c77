//! The client's side of a protocol switch (WebSocket's 101, or a CONNECT tunnel), whichever
//! server read the request: the proxy's own HTTP/1.1 one or hyper's HTTP/2 one.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use http::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::h1::server;

/// The connection to come, once the response has been sent.
pub(crate) enum OnUpgrade {
    H1(Option<tokio::sync::oneshot::Receiver<server::Upgraded>>),
    Hyper(hyper::upgrade::OnUpgrade),
}

/// Take the pending upgrade out of `req`: before the request is consumed.
pub(crate) fn on<B>(req: &mut Request<B>) -> OnUpgrade {
    if req.extensions().get::<server::OnUpgrade>().is_some() {
        return OnUpgrade::H1(server::OnUpgrade::take(req));
    }
    OnUpgrade::Hyper(hyper::upgrade::on(req))
}

impl OnUpgrade {
    /// Wait for the switch.
    pub(crate) async fn wait(self) -> io::Result<Upgraded> {
        let gone = || io::Error::new(io::ErrorKind::NotConnected, "the client connection ended");
        match self {
            Self::H1(rx) => Ok(Upgraded::H1(
                rx.ok_or_else(gone)?.await.map_err(|_| gone())?,
            )),
            Self::Hyper(on) => Ok(Upgraded::Hyper(TokioIo::new(
                on.await.map_err(io::Error::other)?,
            ))),
        }
    }
}

/// The client's connection after the switch.
pub(crate) enum Upgraded {
    H1(server::Upgraded),
    Hyper(TokioIo<hyper::upgrade::Upgraded>),
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H1(io) => Pin::new(io).poll_read(cx, buf),
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
            Self::H1(io) => Pin::new(io).poll_write(cx, buf),
            Self::Hyper(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H1(io) => Pin::new(io).poll_flush(cx),
            Self::Hyper(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H1(io) => Pin::new(io).poll_shutdown(cx),
            Self::Hyper(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
