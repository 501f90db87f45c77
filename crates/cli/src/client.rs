//! A small client for the control plane's HTTP API, and where the CLI finds the server and
//! token: `--server`/`--token`, then `TRELLIS_SERVER`/`TRELLIS_TOKEN` (clap reads both), then
//! the file `trellis login` wrote.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Method, Request, StatusCode};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Server and token, as flags give them.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct Conn {
    /// Control plane API URL.
    #[arg(long, env = "TRELLIS_SERVER", global = true)]
    pub(crate) server: Option<String>,
    /// API bearer token.
    #[arg(long, env = "TRELLIS_TOKEN", global = true, hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// For an `https://` server: the mesh's root, `sha256:HEX` (`trellis ca status` on the
    /// control plane's host prints it); the server must chain to it and be the control plane.
    #[arg(long = "api-ca-hash", env = "TRELLIS_API_CA_HASH", global = true)]
    pub(crate) ca_hash: Option<String>,
}

/// What `trellis login` saves.
#[derive(Serialize, Deserialize)]
pub(crate) struct Saved {
    /// API URL.
    pub(crate) server: String,
    /// Token.
    pub(crate) token: String,
    /// The pinned root, for an `https://` server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca_hash: Option<String>,
}

/// `$XDG_CONFIG_HOME/trellis/config.json`, or `~/.config/trellis/config.json`.
pub(crate) fn config_path() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".config"),
    };
    Ok(base.join("trellis").join("config.json"))
}

/// An API client.
pub(crate) struct Api {
    server: String,
    token: String,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// `https://`: the root to pin.
    tls: Option<[u8; 32]>,
}

impl Api {
    /// Resolve server and token from flags, environment, or the saved file.
    pub(crate) fn new(c: &Conn) -> Result<Self> {
        let saved: Option<Saved> = match config_path() {
            Ok(p) if p.exists() => Some(
                serde_json::from_slice(
                    &std::fs::read(&p).with_context(|| p.display().to_string())?,
                )
                .with_context(|| format!("{}: not a trellis login file", p.display()))?,
            ),
            _ => None,
        };
        let server = c
            .server
            .clone()
            .or_else(|| saved.as_ref().map(|s| s.server.clone()))
            .unwrap_or_else(|| "http://127.0.0.1:7070".into());
        let token = c
            .token
            .clone()
            .or_else(|| saved.as_ref().map(|s| s.token.clone()))
            .ok_or_else(|| {
                anyhow!("no API token: pass --token, set TRELLIS_TOKEN, or run `trellis login`")
            })?;
        let tls = if server.starts_with("https://") {
            let hash = c
                .ca_hash
                .clone()
                .or_else(|| saved.as_ref().and_then(|s| s.ca_hash.clone()))
                .ok_or_else(|| {
                    anyhow!("an https:// server is checked against the mesh's root: pass --api-ca-hash sha256:HEX (or set TRELLIS_API_CA_HASH, or save it with `trellis login`). The control plane prints it at every start (\"clients of the API pass --api-ca-hash sha256:...\", and ca_hash in its \"control plane ready\" line) and keeps it in DATA_DIR/ca-hash; `trellis token create` prints it too")
                })?;
            Some(
                trellis_proxy::identity::parse_ca_hash(&hash)
                    .ok_or_else(|| anyhow!("--api-ca-hash: expected sha256:HEX, got {hash:?}"))?,
            )
        } else if server.starts_with("http://") {
            None
        } else {
            bail!("--server must be an http:// or https:// URL, got {server:?}");
        };
        Ok(Self {
            server: server.trim_end_matches('/').to_string(),
            token,
            http: Client::builder(TokioExecutor::new()).build_http(),
            tls,
        })
    }

    /// Send a request; a non-2xx answer becomes an error with the server's message.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Value> {
        let (status, v) = self.call_raw(method.clone(), path, body).await?;
        if !status.is_success() {
            bail!(
                "{} (HTTP {})",
                error_text(&v, status, &method, path),
                status.as_u16()
            );
        }
        Ok(v)
    }

    /// Send a request; return status and JSON body.
    pub(crate) async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Value)> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, json_or_text(&bytes)))
    }

    /// Send a request with the token; an answer that lacks part of the fleet (another
    /// replica did not answer) says so on stderr.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let uri = format!("{}{path}", self.server);
        let req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/yaml")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = match self.tls {
            None => self.http.request(req).await.map_err(anyhow::Error::from),
            Some(pin) => send_tls(pin, req).await,
        }
        .with_context(|| format!("cannot reach the control plane at {}", self.server))?;
        if let Some(p) = resp.headers().get("x-trellis-partial") {
            eprintln!("warning: {}", String::from_utf8_lossy(p.as_bytes()));
        }
        Ok(resp)
    }
}

/// An answer's body as JSON, or as a JSON string when it is not JSON.
fn json_or_text(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

impl Api {
    /// The control plane's URL.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// GET `path`, hand the answer's headers to `head`, then each line of the answer to `f`
    /// as it comes, until `f` says stop or the server ends the answer.
    pub(crate) async fn stream_lines(
        &self,
        path: &str,
        head: impl FnOnce(&hyper::HeaderMap),
        mut f: impl FnMut(&[u8]) -> bool,
    ) -> Result<()> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        let (parts, mut body) = resp.into_parts();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            bail!(
                "{} (HTTP {})",
                error_text(&json_or_text(&bytes), status, &Method::GET, path),
                status.as_u16()
            );
        }
        head(&parts.headers);
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(n) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=n).collect();
                if !f(&line[..n]) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// `s` for a URL's query.
pub(crate) fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// One request over TLS to a control plane whose root has the SHA-256 `pin`.
async fn send_tls(
    pin: [u8; 32],
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    let authority = req
        .uri()
        .authority()
        .context("no host:port in the server URL")?
        .to_string();
    let tls = trellis_proxy::control_link::connect_control_as(&authority, pin, b"http/1.1")
        .await
        .map_err(|e| anyhow!(e))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(send.send_request(req).await?)
}

/// What a refused request says: the server's `error`, else its body, else (an empty answer,
/// as from a path the server does not serve) the request and the status's reason.
fn error_text(v: &Value, status: StatusCode, method: &Method, path: &str) -> String {
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return e.to_string();
    }
    match v {
        Value::String(s) if !s.trim().is_empty() => s.trim().to_string(),
        Value::String(_) | Value::Null => format!(
            "{method} {path}: {}",
            status.canonical_reason().unwrap_or("refused")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_without_a_message_names_the_request() {
        let not_found = StatusCode::NOT_FOUND;
        let path = "/api/v1/resources/service/default/x/y";
        assert_eq!(
            error_text(&Value::String(String::new()), not_found, &Method::GET, path),
            "GET /api/v1/resources/service/default/x/y: Not Found"
        );
        assert_eq!(
            error_text(&Value::Null, not_found, &Method::DELETE, "/p"),
            "DELETE /p: Not Found"
        );
        let said = serde_json::json!({ "error": "Service shop/x not found" });
        assert_eq!(
            error_text(&said, not_found, &Method::GET, "/p"),
            "Service shop/x not found"
        );
        assert_eq!(
            error_text(
                &Value::String("busy\n".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                &Method::GET,
                "/p"
            ),
            "busy"
        );
    }
}
