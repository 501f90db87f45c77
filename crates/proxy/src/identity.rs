//! The proxy's identity: its own key (which never leaves it), a certificate from the mesh's
//! CA, kept in a state directory and renewed at half its lifetime.
//!
//! At start the proxy reuses a stored certificate that is still valid (a reboot needs no new
//! token); otherwise it makes a key, sends a CSR with its join token to the control plane's
//! certificate endpoint (`/v1/certificates` on the xDS address, HTTP/2), and stores key,
//! certificate and trust bundle with mode 0600. Renewal makes a new key and proves it with
//! the current one; no token is needed after the first time.

use std::{
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use trellis_identity::{inspect, key_and_csr, prove};

pub use crate::credentials::Credentials;

pub use trellis_identity::tls::parse_ca_hash;

/// Where the proxy keeps its identity, and its first credential.
#[derive(Clone, Debug)]
pub struct IdentityOptions {
    /// State directory (created with mode 0700).
    pub state_dir: PathBuf,
    /// Join token, needed only when no valid certificate is stored.
    pub join_token: Option<String>,
    /// SHA-256 of the mesh's root: how a proxy with nothing stored verifies a control plane
    /// reached over TLS before it sends its token.
    pub ca_hash: Option<[u8; 32]>,
}

/// Why the proxy has no identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The state directory or a file in it.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Nothing stored and no token.
    #[error(
        "no valid certificate in {0} and no join token to get one (`trellis token create` makes one: give it to `trellis proxy --join-token`, `trellis join --token`, or either in TRELLIS_JOIN_TOKEN)"
    )]
    NoCredential(PathBuf),
    /// Every control plane refused or was unreachable.
    #[error("no certificate from the control plane: {0}")]
    Refused(String),
    /// A certificate or key could not be made or read.
    #[error(transparent)]
    Ca(#[from] trellis_identity::CaError),
}

const KEY: &str = "key.pem";
const CERT: &str = "cert.pem";
const BUNDLE: &str = "bundle.pem";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `text` to `dir/name` with mode 0600, replacing it atomically.
fn write_private(dir: &Path, name: &str, text: &str) -> Result<(), IdentityError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

fn stored(dir: &Path) -> Option<Credentials> {
    let read = |n| std::fs::read_to_string(dir.join(n)).ok();
    let (chain_pem, key_pem, bundle_pem) = (read(CERT)?, read(KEY)?, read(BUNDLE)?);
    let info = inspect(&chain_pem).ok()?;
    Some(Credentials {
        info,
        chain_pem,
        key_pem,
        bundle_pem,
        obtained: SystemTime::now(),
    })
}

fn save(dir: &Path, c: &Credentials) -> Result<(), IdentityError> {
    write_private(dir, KEY, &c.key_pem)?;
    write_private(dir, BUNDLE, &c.bundle_pem)?;
    // The certificate last: a crash between writes leaves a key that matches no stored
    // certificate, which the next start treats as nothing stored.
    write_private(dir, CERT, &c.chain_pem)
}

/// POST `body` to `/v1/certificates` of each control plane in turn (HTTP/2).
/// How this proxy proves itself to, and checks, a control plane reached over TLS.
struct ControlAuth<'a> {
    creds: Option<&'a Credentials>,
    pin: Option<[u8; 32]>,
}

async fn request(
    servers: &[String],
    token: Option<&str>,
    body: serde_json::Value,
    auth: &ControlAuth<'_>,
) -> Result<serde_json::Value, IdentityError> {
    call(servers, "/v1/certificates", token, body, auth).await
}

/// POST `request` (JSON), signed with this proxy's key, to `path` of the first control plane
/// that answers: `{certificate, proof, request}`, as agents talk to `/v1/agent`.
pub async fn signed_call(
    servers: &[String],
    path: &str,
    creds: &Credentials,
    request: &serde_json::Value,
) -> Result<serde_json::Value, IdentityError> {
    let text = request.to_string();
    let proof = trellis_identity::join::hex(&prove(&creds.key_pem, &text)?);
    let body =
        serde_json::json!({ "certificate": creds.chain_pem, "proof": proof, "request": text });
    let auth = ControlAuth {
        creds: Some(creds),
        pin: None,
    };
    call(servers, path, None, body, &auth).await
}

async fn call(
    servers: &[String],
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
    auth: &ControlAuth<'_>,
) -> Result<serde_json::Value, IdentityError> {
    let mut why = Vec::new();
    for s in servers {
        match request_one(s, path, token, &body, auth).await {
            Ok(v) => return Ok(v),
            Err(e) => why.push(format!("{s}: {e}")),
        }
    }
    Err(IdentityError::Refused(why.join("; ")))
}

async fn request_one(
    server: &str,
    path: &str,
    token: Option<&str>,
    body: &serde_json::Value,
    auth: &ControlAuth<'_>,
) -> Result<serde_json::Value, String> {
    let uri: ::http::Uri = server.parse().map_err(|e| format!("bad URL: {e}"))?;
    let authority = uri.authority().ok_or("no host:port")?.to_string();
    let mut send = if uri.scheme_str() == Some("https") {
        let tls = crate::control_link::connect_control(&authority, auth.creds, auth.pin).await?;
        h2(hyper_util::rt::TokioIo::new(tls)).await?
    } else {
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&authority),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        h2(hyper_util::rt::TokioIo::new(stream)).await?
    };
    let mut req = ::http::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        return Err(format!(
            "HTTP {}: {}",
            status.as_u16(),
            v["error"].as_str().unwrap_or_default()
        ));
    }
    Ok(v)
}

async fn h2<T>(io: T) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

fn from_response(v: &serde_json::Value, key_pem: String) -> Result<Credentials, IdentityError> {
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| IdentityError::Refused(format!("the answer has no {k}")))
    };
    let chain_pem = field("certificate")?;
    let info = inspect(&chain_pem)?;
    Ok(Credentials {
        info,
        chain_pem,
        key_pem,
        bundle_pem: field("trustBundle")?,
        obtained: SystemTime::now(),
    })
}

/// The stored identity if still valid, else a new one from the join token.
pub async fn bootstrap(
    opts: &IdentityOptions,
    servers: &[String],
) -> Result<Credentials, IdentityError> {
    let dir = &opts.state_dir;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    if let Some(c) = stored(dir) {
        if c.info.not_after > SystemTime::now() + Duration::from_secs(5) {
            tracing::info!(spiffe = %c.info.id, serial = %c.info.serial, "reusing the stored certificate");
            return Ok(c);
        }
        tracing::info!(spiffe = %c.info.id, "the stored certificate expired");
    }
    let token = opts
        .join_token
        .as_deref()
        .ok_or_else(|| IdentityError::NoCredential(dir.clone()))?;
    let (key_pem, csr) = key_and_csr()?;
    let auth = ControlAuth {
        creds: None,
        pin: opts.ca_hash,
    };
    let v = request(
        servers,
        Some(token),
        serde_json::json!({ "csr": csr }),
        &auth,
    )
    .await?;
    let c = from_response(&v, key_pem)?;
    save(dir, &c)?;
    tracing::info!(spiffe = %c.info.id, serial = %c.info.serial, "certificate obtained with the join token");
    Ok(c)
}

/// Trust the roots of the mesh's TrustBundle from now on, if they differ from the current
/// ones and still trust this proxy's own certificate (a bundle that would cut this proxy off
/// from its peers is refused, and the current roots kept). `Ok(true)`: taken.
pub fn adopt_bundle(
    dir: &Path,
    current: &arc_swap::ArcSwap<Credentials>,
    bundle: &str,
) -> Result<bool, IdentityError> {
    let c = current.load_full();
    if c.bundle_pem == bundle {
        return Ok(false);
    }
    if !trellis_identity::chains_to(&c.chain_pem, bundle) {
        return Err(IdentityError::Refused(
            "the mesh's TrustBundle lacks the root that signed this proxy's certificate; keeping the current roots".into(),
        ));
    }
    trellis_identity::tls::TlsCredentials::from_pem(&c.chain_pem, &c.key_pem, bundle)
        .map_err(|e| IdentityError::Refused(format!("the mesh's TrustBundle: {e}")))?;
    write_private(dir, BUNDLE, bundle)?;
    current.store(Arc::new(Credentials {
        bundle_pem: bundle.to_string(),
        ..(*c).clone()
    }));
    Ok(true)
}

/// When to renew: halfway from when it was obtained to its end, and not sooner than a
/// second from `now` (a certificate that is already past that point renews at once, but a
/// failing CA is never hammered).
fn renew_at(c: &Credentials, now: SystemTime) -> SystemTime {
    let left = c
        .info
        .not_after
        .duration_since(c.obtained)
        .unwrap_or_default();
    (c.obtained + left / 2).max(now + Duration::from_secs(1))
}

/// Renew at half of each certificate's lifetime, forever; publish each new one.
pub async fn keep_renewed(
    opts: IdentityOptions,
    servers: Vec<String>,
    current: Arc<arc_swap::ArcSwap<Credentials>>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let c = current.load_full();
        let now = SystemTime::now();
        let wait = renew_at(&c, now).duration_since(now).unwrap_or_default();
        tokio::time::sleep(wait).await;
        match renew(&opts.state_dir, &servers, &c).await {
            Ok(n) => {
                tracing::info!(spiffe = %n.info.id, serial = %n.info.serial, "certificate renewed");
                current.store(Arc::new(n));
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "certificate renewal failed; keeping the current one");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn renew(
    dir: &Path,
    servers: &[String],
    old: &Credentials,
) -> Result<Credentials, IdentityError> {
    let (key_pem, csr) = key_and_csr()?;
    let proof = trellis_identity::join::hex(&prove(&old.key_pem, &csr)?);
    let body = serde_json::json!({ "csr": csr, "certificate": old.chain_pem, "proof": proof });
    let auth = ControlAuth {
        creds: Some(old),
        pin: None,
    };
    let v = request(servers, None, body, &auth).await?;
    let c = from_response(&v, key_pem)?;
    save(dir, &c)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::CertInfo;

    #[test]
    fn renewal_is_halfway_from_receipt_not_from_the_backdated_start() {
        let now = SystemTime::now();
        let c = Credentials {
            info: CertInfo {
                id: "spiffe://t/ns/a/sa/b".parse().unwrap(),
                // Backdated by five minutes, as the CA does.
                not_before: now - Duration::from_secs(300),
                not_after: now + Duration::from_secs(20),
                serial: String::new(),
            },
            chain_pem: String::new(),
            key_pem: String::new(),
            bundle_pem: String::new(),
            obtained: now,
        };
        assert_eq!(renew_at(&c, now), now + Duration::from_secs(10));
        // Past the point already: soon, but not in a loop.
        let late = now + Duration::from_secs(15);
        assert_eq!(renew_at(&c, late), late + Duration::from_secs(1));
    }
}
