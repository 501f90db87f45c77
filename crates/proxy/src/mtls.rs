//! Mutual TLS to mesh peers, on the caller's side: the client configurations (one per
//! expected peer identity and purpose, rebuilt when this proxy's certificate is renewed) and
//! the handshake. The callee's side is in [`crate::http::server`].
//!
//! A caller reaches a meshed endpoint at its proxy's inbound listener, names the service port
//! in the TLS server name ([`trellis_identity::tls::inbound_server_name`]) and asks by ALPN
//! for streams of HTTP/1.1 ([`crate::mux::ALPN_MUX`]: requests to an HTTP/1.1 service, one
//! connection per peer), HTTP/2 (requests to an HTTP/2 or gRPC service, and all of them to
//! a peer's proxy older than the streams: one multiplexed connection per peer), for HTTP/2 that carries opaque TCP streams ([`ALPN_TCP_STREAMS`]: one
//! more connection per peer, [`crate::h2_stream`]), or for one opaque TCP stream on a
//! connection of its own ([`ALPN_TCP_HELLO`], which opens with a hello and an answer:
//! [`crate::peer_stream`]; or [`ALPN_TCP`], the bare stream a proxy older than that speaks).

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;
use trellis_identity::{
    tls::{client_config, inbound_server_name, TlsCredentials, TlsError},
    SpiffeId,
};
use trellis_model::proxy::MeshPeer;

use crate::{
    credentials::Credentials,
    fasthash::FastMap,
    h2_stream::Outgoing,
    peer_stream::{ALPN_TCP_HELLO, ALPN_TCP_STREAMS},
};

pub(crate) use trellis_identity::tls::ALPN_TCP;

/// What a connection to a peer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Purpose {
    /// HTTP/1.1 exchanges, each pooled connection a stream of one connection.
    Http1Streams,
    /// HTTP/2.
    Http2,
    /// Opaque TCP, a connection per stream.
    Tcp,
    /// Opaque TCP streams, many on one HTTP/2 connection.
    TcpStreams,
    /// An HTTP/1.1 request that asks to switch protocols (WebSocket), on a connection of its
    /// own: the peer's proxy carries it to its application as it came.
    Http1Upgrade,
}

impl Purpose {
    /// The protocols offered, preferred first.
    fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Self::Http1Streams => &[crate::mux::ALPN_MUX],
            Self::Http2 => &[b"h2"],
            Self::TcpStreams => &[ALPN_TCP_STREAMS],
            Self::Tcp => &[ALPN_TCP_HELLO, ALPN_TCP],
            Self::Http1Upgrade => &[b"http/1.1"],
        }
    }
}

/// Client configurations by (expected peer, purpose), each with the credentials (certificate
/// and trust bundle) it was built from.
type Configs = FastMap<(String, Purpose), (Arc<Credentials>, Arc<rustls::ClientConfig>)>;

/// This proxy's credentials as a TLS client.
pub(crate) struct MeshTls {
    creds: Arc<ArcSwap<Credentials>>,
    configs: Mutex<Configs>,
}

impl MeshTls {
    /// Client side of `creds` (renewed in place).
    pub(crate) fn new(creds: Arc<ArcSwap<Credentials>>) -> Self {
        Self {
            creds,
            configs: Mutex::new(FastMap::default()),
        }
    }

    /// The configuration for `peer`: cached while the certificate and trust bundle stay the
    /// same, so that session tickets are kept and the chain is parsed once.
    fn config(
        &self,
        peer: &MeshPeer,
        purpose: Purpose,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let creds = self.creds.load_full();
        let key = (peer.identity.to_string(), purpose);
        if let Some((built, cfg)) = self.configs.lock().expect("tls lock").get(&key) {
            if Arc::ptr_eq(built, &creds) {
                return Ok(cfg.clone());
            }
        }
        // The peer is in this proxy's trust domain: the CA signs for one domain.
        let expected = SpiffeId::new(
            &creds.info.id.trust_domain,
            &peer.identity.namespace,
            &peer.identity.name,
        )
        .map_err(|e| TlsError::Pem {
            what: "expected peer identity",
            why: e.to_string(),
        })?;
        let own = TlsCredentials::from_pem(&creds.chain_pem, &creds.key_pem, &creds.bundle_pem)?;
        let cfg = client_config(&own, vec![expected], purpose.alpn())?;
        let mut configs = self.configs.lock().expect("tls lock");
        // Peers come and go: a bound on the cache, cleared rather than tracked.
        if configs.len() >= 4096 {
            configs.clear();
        }
        configs.insert(key, (creds, cfg.clone()));
        Ok(cfg)
    }

    /// Handshake with `peer` over `tcp`, for service port `port`; the peer agreed to one of
    /// the purpose's protocols (its ALPN says which).
    pub(crate) async fn connect(
        &self,
        tcp: TcpStream,
        peer: &MeshPeer,
        port: u16,
        purpose: Purpose,
    ) -> Result<TlsStream<TcpStream>, TlsFailed> {
        let cfg = self
            .config(peer, purpose)
            .map_err(|e| TlsFailed::new(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(inbound_server_name(port), tcp)
            .await
            .map_err(|e| TlsFailed {
                no_protocol: no_protocol(&e),
                detail: describe(&e, peer),
            })?;
        let agreed = tls.get_ref().1.alpn_protocol();
        if !agreed.is_some_and(|a| purpose.alpn().contains(&a)) {
            return Err(TlsFailed {
                detail: format!(
                    "the proxy of {} at {} did not agree to {}",
                    peer.identity,
                    peer.inbound,
                    String::from_utf8_lossy(purpose.alpn()[0])
                ),
                no_protocol: true,
            });
        }
        Ok(tls)
    }
}

/// A handshake with a peer that failed.
pub(crate) struct TlsFailed {
    /// What failed, said for an operator.
    pub(crate) detail: String,
    /// The peer agreed to none of the protocols offered: it speaks others (a proxy older or
    /// newer than this one), not that it refused this proxy.
    pub(crate) no_protocol: bool,
}

impl TlsFailed {
    fn new(detail: String) -> Self {
        Self {
            detail,
            no_protocol: false,
        }
    }
}

/// Whether the handshake failed because the peer took none of the protocols offered.
fn no_protocol(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        ))
    )
}

/// A handshake failure, said so that an operator knows where to look.
fn describe(e: &io::Error, peer: &MeshPeer) -> String {
    let at = format!("mTLS handshake with {} at {}", peer.identity, peer.inbound);
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match (tls, e.kind()) {
        (Some(rustls::Error::InvalidCertificate(_)), _) => {
            format!("{at}: its certificate was refused: {e}")
        }
        (Some(rustls::Error::InvalidMessage(_)), _) | (None, io::ErrorKind::InvalidData) => {
            format!(
                "{at} failed: {e} (a peer that answers in plaintext has no identity or is not \
                 a Trellis proxy)"
            )
        }
        (_, io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => format!(
            "{at}: the peer closed the connection (is its proxy running with an identity, and \
             does it trust this proxy's CA?)"
        ),
        _ => format!("{at} failed: {e}"),
    }
}

/// A stream to an upstream: plain TCP, mutual TLS to a peer's proxy on a connection of its
/// own, or a stream of the HTTP/2 connection for streams to a peer's proxy.
pub(crate) enum UpStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mutual TLS (boxed: its buffers are large).
    Tls(Box<TlsStream<TcpStream>>),
    /// A stream of the HTTP/2 connection for streams to the peer's proxy.
    OnH2(Box<Outgoing>),
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::OnH2(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, b),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
            Self::OnH2(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::OnH2(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::OnH2(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
