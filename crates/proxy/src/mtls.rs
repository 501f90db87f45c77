//! Mutual TLS to mesh peers, on the caller's side: the client configurations (one per
//! expected peer identity and purpose, rebuilt when this proxy's certificate is renewed) and
//! the handshake. The callee's side is in [`crate::http::server`].
//!
//! A caller reaches a meshed endpoint at its proxy's inbound listener, names the service port
//! in the TLS server name ([`trellis_identity::tls::inbound_server_name`]) and asks by ALPN
//! for HTTP/2 (every HTTP request, whatever the application speaks: one multiplexed
//! connection per peer) or for an opaque TCP stream ([`ALPN_TCP_HELLO`], which opens with a
//! hello and an answer: [`crate::peer_stream`]; or [`ALPN_TCP`], the bare stream a proxy older
//! than that speaks).

use std::{
    io,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use trellis_identity::{
    tls::{client_config, inbound_server_name, TlsCredentials, TlsError},
    SpiffeId,
};
use trellis_model::proxy::MeshPeer;

use crate::{credentials::Credentials, fasthash::FastMap, peer_stream::ALPN_TCP_HELLO};

pub(crate) use trellis_identity::tls::ALPN_TCP;

/// What a connection to a peer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Purpose {
    /// HTTP/2.
    Http2,
    /// Opaque TCP.
    Tcp,
    /// An HTTP/1.1 request that asks to switch protocols (WebSocket), on a connection of its
    /// own: the peer's proxy carries it to its application as it came.
    Http1Upgrade,
}

impl Purpose {
    /// The protocols offered, preferred first.
    fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Self::Http2 => &[b"h2"],
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
    ) -> Result<TlsStream<TcpStream>, String> {
        let cfg = self.config(peer, purpose).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(inbound_server_name(port), tcp)
            .await
            .map_err(|e| describe(&e, peer))?;
        let agreed = tls.get_ref().1.alpn_protocol();
        if !agreed.is_some_and(|a| purpose.alpn().contains(&a)) {
            return Err(format!(
                "the proxy of {} at {} did not agree to {}",
                peer.identity,
                peer.inbound,
                String::from_utf8_lossy(purpose.alpn()[0])
            ));
        }
        Ok(tls)
    }
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

/// A stream to an upstream: plain TCP, or mutual TLS to a peer's proxy.
pub(crate) type UpStream = trellis_identity::tls::MaybeTls<TlsStream<TcpStream>>;
