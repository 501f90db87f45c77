//! TLS to the control plane: as this proxy's identity once it has one (the server must be
//! the mesh's control plane by the trust bundle), or, on first contact, with no certificate
//! and the control plane's root pinned by hash. Used for xDS, the certificate endpoint and
//! the CLI's `https://` API.

use std::{
    io,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use trellis_identity::tls::{client_config, TlsCredentials};

use crate::credentials::Credentials;

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

/// The connection to the control plane, while there is one.
#[derive(Clone)]
pub(crate) struct Control {
    /// The xDS channel (HTTP/2, mutual TLS for `https://`).
    pub(crate) channel: tonic::transport::Channel,
    /// `HOST:PORT`.
    pub(crate) authority: String,
}

impl Control {
    /// `POST path` with `body` (of `content_type`) on the xDS connection, within `timeout`:
    /// the answer's body, or why there is none (a refusal with the start of its body).
    pub(crate) async fn post(
        &self,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
        timeout: std::time::Duration,
    ) -> Result<bytes::Bytes, String> {
        use http_body_util::BodyExt;
        use tonic::codegen::Service;
        let req = http::Request::post(format!("http://{}{path}", self.authority))
            .header(http::header::CONTENT_TYPE, content_type)
            .body(tonic::body::Body::new(http_body_util::Full::new(
                bytes::Bytes::from(body),
            )))
            .map_err(|e| e.to_string())?;
        let mut ch = self.channel.clone();
        let call = async {
            std::future::poll_fn(|cx| ch.poll_ready(cx))
                .await
                .map_err(|e| e.to_string())?;
            let resp = ch.call(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                ));
            }
            Ok(bytes)
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| "timed out".to_string())?
    }
}

/// Set by the xDS client as streams open and close.
pub(crate) type Link = tokio::sync::watch::Receiver<Option<Control>>;
