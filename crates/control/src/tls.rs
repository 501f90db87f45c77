//! TLS on the control plane's own listeners.
//!
//! Each replica holds a certificate from the mesh's CA for
//! `spiffe://TD/ns/trellis-system/sa/control-plane` (its own key, renewed at half its
//! lifetime) and presents it with the trust bundle's roots, so that a proxy on its first
//! contact can pin a root by hash. On the xDS address a connection's first byte chooses TLS
//! or plaintext; plaintext is served only when the listener is bound to a loopback address
//! (a proxy on the same host, tests, proxyless gRPC clients there). Over TLS a client
//! certificate is optional: a proxy that comes with a join token has none yet and may only
//! ask for one; ADS streams need it ([`Peer`] says who the connection is).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::server::TlsStream;
use trellis_identity::{
    key_and_csr,
    tls::{control_plane_id, peer_id, server_config_optional_client, TlsCredentials},
    SpiffeId,
};
use trellis_store::Store;

use crate::{error::ControlError, identity::Identity};

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// Time allowed from accept to a completed TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// This replica's serving configuration, renewed in place.
pub(crate) type Serving = Arc<ArcSwap<rustls::ServerConfig>>;

async fn issue(
    identity: &Identity,
    store: &Store,
    alpn: &[&[u8]],
) -> Result<(Arc<rustls::ServerConfig>, Duration), ControlError> {
    let ca = identity.ca(store).await?;
    let (key, csr) = key_and_csr()?;
    let svid = ca.sign(
        &csr,
        &control_plane_id(&identity.trust_domain),
        identity.svid_ttl,
    )?;
    // The roots follow the leaf, so that a proxy can find the one it pinned by hash.
    let chain = format!("{}{}", svid.chain_pem, ca.trust_bundle());
    let creds = TlsCredentials::from_pem(&chain, &key, ca.trust_bundle())
        .map_err(|e| ControlError::Identity(format!("serving certificate: {e}")))?;
    let cfg = server_config_optional_client(&creds, alpn)
        .map_err(|e| ControlError::Identity(format!("serving certificate: {e}")))?;
    Ok((cfg, identity.svid_ttl))
}

/// Get this replica's serving certificate, and keep renewing it at half its lifetime (so a
/// root rotation reaches it too).
pub(crate) async fn serving(
    identity: Arc<Identity>,
    store: Store,
    alpn: &'static [&'static [u8]],
) -> Result<Serving, ControlError> {
    let (cfg, ttl) = issue(&identity, &store, alpn).await?;
    let current = Arc::new(ArcSwap::new(cfg));
    let c = current.clone();
    tokio::spawn(async move {
        let mut wait = ttl / 2;
        loop {
            tokio::time::sleep(wait).await;
            match issue(&identity, &store, alpn).await {
                Ok((cfg, ttl)) => {
                    c.store(cfg);
                    wait = ttl / 2;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "serving certificate renewal failed; retrying");
                    wait = Duration::from_secs(5);
                }
            }
        }
    });
    Ok(current)
}

/// Who is at the other end of a connection (a request extension, set by tonic).
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    /// The client's address.
    pub(crate) addr: SocketAddr,
    /// The connection is TLS.
    pub(crate) tls: bool,
    /// The SPIFFE ID of the client's certificate, if it gave one.
    pub(crate) id: Option<SpiffeId>,
}

/// An accepted connection.
pub(crate) struct Conn {
    io: Io,
    peer: Peer,
}

/// Plaintext (loopback listeners only) or TLS.
type Io = trellis_identity::tls::MaybeTls<TlsStream<TcpStream>>;

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// Accept connections on `l`: TLS always, plaintext when `plaintext`. Handshakes run in
/// tasks of their own, so a slow client never holds up the others.
pub(crate) fn incoming(
    l: TcpListener,
    tls: Serving,
    plaintext: bool,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let (s, peer) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (tx, cfg) = (tx.clone(), tls.load_full());
            tokio::spawn(async move {
                if let Some(c) = handshake(s, peer, cfg, plaintext).await {
                    let _ = tx.send(Ok(c)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn handshake(
    s: TcpStream,
    peer: SocketAddr,
    cfg: Arc<rustls::ServerConfig>,
    plaintext: bool,
) -> Option<Conn> {
    let _ = s.set_nodelay(true);
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, s.peek(&mut first))
        .await
        .ok()?
        .ok()?;
    if n == 0 {
        return None;
    }
    if first[0] != TLS_HANDSHAKE {
        if plaintext {
            let peer = Peer {
                addr: peer,
                tls: false,
                id: None,
            };
            return Some(Conn {
                io: Io::Plain(s),
                peer,
            });
        }
        tracing::info!(%peer, "plaintext refused: this listener is not on loopback, so it takes TLS only");
        return None;
    }
    let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(s);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(t)) => {
            let id = t.get_ref().1.peer_certificates().and_then(peer_id);
            let peer = Peer {
                addr: peer,
                tls: true,
                id,
            };
            Some(Conn {
                io: Io::Tls(Box::new(t)),
                peer,
            })
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake refused");
            None
        }
        Err(_) => None,
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The client of an ADS stream: over TLS it must have presented a mesh certificate (a proxy
/// with only a join token may ask for a certificate, nothing else). `None` for connections
/// not accepted by [`incoming`] (in-process tests).
pub(crate) fn ads_peer<T>(req: &tonic::Request<T>) -> Result<Option<SocketAddr>, tonic::Status> {
    match req.extensions().get::<Peer>() {
        None => Ok(req.remote_addr()),
        Some(Peer { tls: true, id: None, .. }) => Err(tonic::Status::unauthenticated(
            "xDS over TLS needs the proxy's mesh certificate (get one first with a join token at /v1/certificates)",
        )),
        Some(p) => Ok(Some(p.addr)),
    }
}

/// The API's listener beyond loopback: TLS only (HTTP/1.1 or HTTP/2 by ALPN), for
/// `axum::serve`.
pub(crate) struct TlsListener {
    rx: tokio_stream::wrappers::ReceiverStream<io::Result<Conn>>,
    addr: SocketAddr,
}

impl TlsListener {
    /// Serve TLS on `l` with `tls`.
    pub(crate) fn new(l: TcpListener, tls: Serving) -> io::Result<Self> {
        let addr = l.local_addr()?;
        Ok(Self {
            rx: incoming(l, tls, false),
            addr,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        use futures_util::StreamExt;
        loop {
            match self.rx.next().await {
                Some(Ok(c)) => {
                    let a = c.peer.addr;
                    return (c, a);
                }
                Some(Err(_)) => continue,
                // The accept task never ends while the listener lives.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
