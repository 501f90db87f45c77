//! Mutual TLS to mesh peers, on the caller's side: the client configurations (one per
//! expected peer identity and purpose, rebuilt when this proxy's certificate is renewed) and
//! the handshake. The callee's side is in [`crate::http::server`].
//!
//! A caller reaches a meshed endpoint at its proxy's inbound listener, names the service port
//! in the TLS server name ([`trellis_identity::tls::inbound_server_name`]) and asks by ALPN
//! for HTTP/2 (every HTTP request, whatever the application speaks: one multiplexed
//! connection per peer) or for an opaque TCP stream ([`ALPN_TCP`]).

use std::{
    io,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use trellis_identity::{
    tls::{client_config, inbound_server_name, TlsCredentials, TlsError},
    SpiffeId,
};
use trellis_model::proxy::MeshPeer;

use crate::{fasthash::FastMap, identity::Credentials};

pub use trellis_identity::tls::ALPN_TCP;

/// What a connection to a peer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// HTTP/2.
    Http2,
    /// Opaque TCP.
    Tcp,
}

impl Purpose {
    fn alpn(self) -> &'static [u8] {
        match self {
            Self::Http2 => b"h2",
            Self::Tcp => ALPN_TCP,
        }
    }
}

/// Client configurations by (expected peer, purpose), each with the credentials (certificate
/// and trust bundle) it was built from.
type Configs = FastMap<(String, Purpose), (Arc<Credentials>, Arc<rustls::ClientConfig>)>;

/// This proxy's credentials as a TLS client.
pub struct MeshTls {
    creds: Arc<ArcSwap<Credentials>>,
    configs: Mutex<Configs>,
}

impl MeshTls {
    /// Client side of `creds` (renewed in place).
    pub fn new(creds: Arc<ArcSwap<Credentials>>) -> Self {
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
        let cfg = client_config(&own, vec![expected], &[purpose.alpn()])?;
        let mut configs = self.configs.lock().expect("tls lock");
        // Peers come and go: a bound on the cache, cleared rather than tracked.
        if configs.len() >= 4096 {
            configs.clear();
        }
        configs.insert(key, (creds, cfg.clone()));
        Ok(cfg)
    }

    /// Handshake with `peer` over `tcp`, for service port `port`.
    pub async fn connect(
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
        if tls.get_ref().1.alpn_protocol() != Some(purpose.alpn()) {
            return Err(format!(
                "the proxy of {} at {} did not agree to {}",
                peer.identity,
                peer.inbound,
                String::from_utf8_lossy(purpose.alpn())
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
pub type UpStream = trellis_identity::tls::MaybeTls<TlsStream<TcpStream>>;

/// A TLS connection to a control plane at `authority` (`HOST:PORT`): as this proxy's
/// identity when it has one (the server must be the mesh's control plane by its bundle), or,
/// on first contact, with no certificate and the control plane's root pinned by hash.
pub async fn connect_control(
    authority: &str,
    creds: Option<&Credentials>,
    pin: Option<[u8; 32]>,
) -> Result<TlsStream<TcpStream>, String> {
    use trellis_identity::tls::{bootstrap_client_config, control_plane_id};
    let cfg = match (creds, pin) {
        (Some(c), _) => {
            let own = TlsCredentials::from_pem(&c.chain_pem, &c.key_pem, &c.bundle_pem)
                .map_err(|e| e.to_string())?;
            client_config(&own, vec![control_plane_id(&c.info.id.trust_domain)], &[b"h2"])
        }
        (None, Some(hash)) => bootstrap_client_config(hash, &[b"h2"]),
        (None, None) => {
            return Err("a control plane over TLS (https://) is verified by its CA: give --ca-hash (printed by `trellis token create`)".into())
        }
    }
    .map_err(|e| e.to_string())?;
    handshake_control(authority, cfg).await
}

/// A TLS connection to a control plane whose root has the SHA-256 `pin`, with no client
/// certificate, speaking `alpn` (the CLI uses this for an `https://` API).
pub async fn connect_control_as(
    authority: &str,
    pin: [u8; 32],
    alpn: &[u8],
) -> Result<TlsStream<TcpStream>, String> {
    let cfg =
        trellis_identity::tls::bootstrap_client_config(pin, &[alpn]).map_err(|e| e.to_string())?;
    handshake_control(authority, cfg).await
}

async fn handshake_control(
    authority: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    use trellis_identity::tls::mesh_server_name;
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        TcpStream::connect(authority),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    tokio_rustls::TlsConnector::from(cfg)
        .connect(mesh_server_name(), tcp)
        .await
        .map_err(|e| format!("TLS with the control plane: {e}"))
}

/// tonic's connector for an xDS channel over TLS: each (re)connect handshakes with the
/// certificate this proxy holds at that moment.
#[derive(Clone)]
pub struct ControlConnector {
    /// `HOST:PORT`.
    pub authority: String,
    /// This proxy's credentials.
    pub creds: Arc<ArcSwap<Credentials>>,
}

impl tonic::codegen::Service<http::Uri> for ControlConnector {
    type Response = hyper_util::rt::TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (authority, creds) = (self.authority.clone(), self.creds.load_full());
        Box::pin(async move {
            connect_control(&authority, Some(&creds), None)
                .await
                .map(hyper_util::rt::TokioIo::new)
                .map_err(io::Error::other)
        })
    }
}
