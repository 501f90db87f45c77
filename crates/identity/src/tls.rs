//! rustls configurations for mTLS between proxies: TLS 1.3 only, certificates chained to the
//! mesh's trust bundle, identities by SPIFFE ID rather than host name.
//!
//! - The server (a workload's inbound side) asks every client for a certificate that chains
//!   to the bundle and is valid for client authentication; [`peer_id`] then names the caller
//!   for logs, metrics and authorization.
//! - The client (the caller's proxy) accepts a server only if its certificate chains to the
//!   bundle, is valid for server authentication, and carries one of the SPIFFE IDs that the
//!   destination service may have. The TLS server name is ignored: mesh peers are named by
//!   identity, not by DNS.

use std::sync::Arc;

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{ParsedCertificate, WebPkiClientVerifier},
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::SpiffeId;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM block is missing or malformed.
    #[error("{what}: {why}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// A proxy's certificate chain and key, and the roots it trusts, parsed once.
#[derive(Clone, Debug)]
pub struct TlsCredentials {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl TlsCredentials {
    /// From the PEM a proxy keeps in its state directory.
    pub fn from_pem(chain_pem: &str, key_pem: &str, bundle_pem: &str) -> Result<Self, TlsError> {
        let pem = |what, e: rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            why: e.to_string(),
        };
        let chain: Vec<_> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| pem("certificate", e))?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "certificate",
                why: "no certificate".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem("key", e))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
            roots.add(c.map_err(|e| pem("trust bundle", e))?)?;
        }
        if roots.is_empty() {
            return Err(TlsError::Pem {
                what: "trust bundle",
                why: "no certificate".into(),
            });
        }
        Ok(Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The inbound side: client certificates required, TLS 1.3, `alpn` offered.
pub fn server_config(c: &TlsCredentials, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(c, alpn, true)
}

/// The control plane's side: a client certificate, if one is given, must chain to the
/// bundle; a proxy that has none yet (it comes with a join token) may connect too, and is
/// told apart by having no peer certificate.
pub fn server_config_optional_client(
    c: &TlsCredentials,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(c, alpn, false)
}

fn server_config_with(
    c: &TlsCredentials,
    alpn: &[&[u8]],
    client_required: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let mut builder = WebPkiClientVerifier::builder_with_provider(c.roots.clone(), p.clone());
    if !client_required {
        builder = builder.allow_unauthenticated();
    }
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(c.chain.clone(), c.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The outbound side: present our certificate; accept only a server with one of `allowed`.
pub fn client_config(
    c: &TlsCredentials,
    allowed: Vec<SpiffeId>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: c.roots.clone(),
        pin: None,
        allowed,
        provider: p.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(c.chain.clone(), c.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The control plane's own identity in trust domain `td`.
pub fn control_plane_id(td: &str) -> SpiffeId {
    SpiffeId {
        trust_domain: td.into(),
        namespace: "trellis-system".into(),
        identity: "control-plane".into(),
    }
}

/// A proxy's first contact with the control plane, before it has a certificate or a trust
/// bundle: no client certificate, and a server accepted only if the certificates it presents
/// include a root whose SHA-256 is `ca_hash` (given to the proxy with its join token, as
/// kubeadm's discovery hash), its certificate chains to that root and names the control plane
/// (of any trust domain: the root decides). A man in the middle never sees the token.
pub fn bootstrap_client_config(
    ca_hash: [u8; 32],
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: Arc::new(RootCertStore::empty()),
        pin: Some(ca_hash),
        allowed: vec![control_plane_id("")],
        provider: p.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// `sha256:HEX` of a PEM certificate's DER: what [`bootstrap_client_config`] pins.
pub fn ca_hash(pem: &str) -> Option<String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let d = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    Some(format!("sha256:{}", crate::join::hex(d.as_ref())))
}

/// Parse `sha256:HEX`.
pub fn parse_ca_hash(s: &str) -> Option<[u8; 32]> {
    let b = crate::join::unhex(s.strip_prefix("sha256:").unwrap_or(s))?;
    b.try_into().ok()
}

/// The name a client gives when connecting to a mesh peer (the verifier ignores it).
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::try_from("trellis.mesh").expect("a valid DNS name")
}

/// The server name a caller gives to reach service port `port` behind a peer's inbound
/// listener (`port-8080.trellis.mesh`): the callee learns the port for the whole connection,
/// so one listener serves every port, HTTP or opaque TCP, with no extra round trip.
pub fn inbound_server_name(port: u16) -> ServerName<'static> {
    ServerName::try_from(format!("port-{port}.trellis.mesh")).expect("a valid DNS name")
}

/// The service port named by [`inbound_server_name`].
pub fn inbound_port(server_name: &str) -> Option<u16> {
    server_name
        .strip_prefix("port-")?
        .strip_suffix(".trellis.mesh")?
        .parse()
        .ok()
}

/// A connection that is plain TCP, or TLS over it (`T`: tokio-rustls's client or server
/// stream). Mesh peers and the control plane accept both on one port, chosen by the first
/// byte; callers reach unmeshed endpoints in plaintext.
pub enum MaybeTls<T> {
    /// Plain TCP.
    Plain(tokio::net::TcpStream),
    /// TLS (boxed: its buffers are large, and the plain variant is common).
    Tls(Box<T>),
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// ALPN of an opaque TCP stream to a peer's inbound listener.
pub const ALPN_TCP: &[u8] = b"trellis-tcp";

/// The SPIFFE ID of a peer's leaf certificate.
pub fn peer_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    crate::ca::leaf_id(&cert).ok()
}

/// The server's SPIFFE ID is not one the destination may have. (rustls prints the cause
/// with `Debug`, so `Debug` says it in words.)
struct WrongIdentity {
    got: Option<SpiffeId>,
    allowed: Vec<SpiffeId>,
}

impl std::fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let allowed: Vec<String> = self.allowed.iter().map(ToString::to_string).collect();
        match &self.got {
            Some(id) => write!(f, "peer is {id}, expected one of [{}]", allowed.join(", ")),
            None => write!(f, "peer certificate has no SPIFFE ID"),
        }
    }
}

impl std::fmt::Debug for WrongIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for WrongIdentity {}

/// The server presented no root with the expected hash. (`Debug` says it in words: rustls
/// shows it that way.)
struct PinMismatch;

impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server's CA does not have the expected hash (--ca-hash): not this mesh's control plane")
    }
}

impl std::error::Error for PinMismatch {}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    /// First contact: the root is the presented certificate with this SHA-256, and
    /// `allowed` is matched without its trust domain.
    pin: Option<[u8; 32]>,
    allowed: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let pinned;
        let roots = match self.pin {
            None => &self.roots,
            Some(hash) => {
                let root = intermediates
                    .iter()
                    .find(|c| {
                        ring::digest::digest(&ring::digest::SHA256, c.as_ref()).as_ref() == hash
                    })
                    .ok_or_else(|| {
                        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                            Arc::new(PinMismatch),
                        )))
                    })?;
                let mut store = RootCertStore::empty();
                store.add(root.clone().into_owned())?;
                pinned = Arc::new(store);
                &pinned
            }
        };
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = peer_id(std::slice::from_ref(end_entity));
        let ok = |id: &SpiffeId| match self.pin {
            None => self.allowed.contains(id),
            Some(_) => self
                .allowed
                .iter()
                .any(|a| a.namespace == id.namespace && a.identity == id.identity),
        };
        match &got {
            Some(id) if ok(id) => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(WrongIdentity {
                    got,
                    allowed: self.allowed.clone(),
                })),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbound_server_name_carries_the_port() {
        for port in [1, 80, 8080, 65535] {
            let name = inbound_server_name(port);
            let ServerName::DnsName(d) = &name else {
                panic!("a DNS name")
            };
            assert_eq!(inbound_port(d.as_ref()), Some(port));
        }
        assert_eq!(inbound_port("trellis.mesh"), None);
        assert_eq!(inbound_port("port-99999.trellis.mesh"), None);
        assert_eq!(inbound_port("port-80.example.com"), None);
    }
}
