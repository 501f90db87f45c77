//! The control plane's side of identity: the mesh's CA (kept in the store, so that every
//! replica signs with the same root), join tokens, and the certificate endpoint.
//!
//! - `POST /api/v1/tokens` (admin token): `{namespace, identity, ttlSeconds, uses}` →
//!   `{token, spiffeId, expiresAt, uses}`. The token is shown once; the store keeps a
//!   [`Grant`] with its digest under `_JoinToken/trellis-system/ID`.
//! - `POST /api/v1/certificates` (`Authorization: Bearer JOIN-TOKEN`): `{csr}` (PEM) →
//!   `{certificate, trustBundle, spiffeId, notAfter}`. A proxy renews without a token:
//!   `{csr, certificate, proof}`, the proof being its current key's signature over the CSR
//!   (so the new key is proven to come from the holder of the old one). The same endpoint is
//!   served on the xDS address as `/v1/certificates` (HTTP/2), so a proxy needs only the
//!   address it already has. The CA signs only the identity the
//!   token allows; a use is taken with a compare-and-swap on the grant, so two proxies racing
//!   for a single-use token cannot both win.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    body::Bytes,
    extract::State as AxState,
    http::{header, HeaderMap, StatusCode},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_identity::{
    join::{self, Grant, Refusal},
    Ca, CaError, SpiffeId,
};
use trellis_store::{Expect, Key, Store, StoreError, Write};

use crate::{
    api::{Api, ApiError},
    ControlError,
};

/// Lifetime of the root the control plane makes.
const ROOT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest a join token may live: a token is for joining, not a standing credential.
const TOKEN_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

fn ca_key() -> Key {
    Key::new("_CA", "trellis-system", "root")
}

fn grant_key(id: &str) -> Key {
    Key::new("_JoinToken", "trellis-system", id)
}

/// The CA and how long what it signs lives.
pub struct Identity {
    /// The mesh's CA.
    pub ca: Ca,
    /// Lifetime of an issued certificate.
    pub svid_ttl: Duration,
}

fn from_record(doc: &Value, trust_domain: &str) -> Result<Ca, ControlError> {
    let field = |k: &str| doc[k].as_str().unwrap_or_default().to_string();
    let stored = field("trustDomain");
    if stored != trust_domain {
        return Err(ControlError::Identity(format!(
            "the mesh's CA is for trust domain {stored:?}, not {trust_domain:?} (--trust-domain)"
        )));
    }
    Ok(Ca::from_pem(
        &stored,
        &field("certPem"),
        &field("keyPem"),
        None,
    )?)
}

/// An operator's CA, from files.
#[derive(Clone, Debug)]
pub struct CaFiles {
    /// The signing certificate (a root, or an intermediate).
    pub cert: std::path::PathBuf,
    /// Its key (PKCS#8 PEM).
    pub key: std::path::PathBuf,
    /// The roots proxies trust (default: `cert`, for a root).
    pub bundle: Option<std::path::PathBuf>,
}

/// The operator's CA. Its files stay where the operator keeps them; nothing goes into the
/// store (every replica is given the same files).
pub fn load_ca(f: &CaFiles, trust_domain: &str) -> Result<Ca, ControlError> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|source| ControlError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    if let Ok(m) = std::fs::metadata(&f.key) {
        if std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o077 != 0 {
            tracing::warn!(file = %f.key.display(), "the CA key is readable by other users; chmod 600 it");
        }
    }
    let (cert, key) = (read(&f.cert)?, read(&f.key)?);
    let bundle = f.bundle.as_deref().map(read).transpose()?;
    let ca = Ca::from_pem(trust_domain, &cert, &key, bundle.as_deref()).map_err(|e| {
        ControlError::Identity(format!("{} / {}: {e}", f.cert.display(), f.key.display()))
    })?;
    tracing::info!(cert = %f.cert.display(), %trust_domain, "using the operator's CA");
    Ok(ca)
}

/// The mesh's CA: the one in the store, or a new root recorded there (the first replica to
/// start makes it; a racing one adopts the winner's).
pub async fn establish_ca(store: &Store, trust_domain: &str) -> Result<Ca, ControlError> {
    if let Some(o) = store.get(&ca_key()).await? {
        return from_record(&o.doc, trust_domain);
    }
    let ca = Ca::generate(trust_domain, ROOT_LIFETIME)?;
    let record = Write {
        key: ca_key(),
        doc: Some(json!({
            "trustDomain": trust_domain,
            "certPem": ca.cert_pem(),
            "keyPem": ca.key_pem(),
        })),
        expect: Expect::Absent,
    };
    match store.write(vec![record]).await {
        Ok(_) => {
            tracing::info!(%trust_domain, "created the mesh's root CA");
            Ok(ca)
        }
        Err(StoreError::Conflict { .. }) => match store.get(&ca_key()).await? {
            Some(o) => from_record(&o.doc, trust_domain),
            None => Err(ControlError::Identity("the CA record vanished".into())),
        },
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct TokenRequest {
    namespace: String,
    identity: String,
    ttl_seconds: u64,
    #[serde(default)]
    uses: Option<u32>,
}

/// A JSON body, whatever its content type says (the CLI and proxies send JSON).
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("body: {e}")))
}

fn unprocessable(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, m.into())
}

pub(crate) async fn create_token(
    AxState(api): AxState<Api>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: TokenRequest = json_body(&body)?;
    let id = api.identity();
    let spiffe = SpiffeId::new(id.ca.trust_domain(), &req.namespace, &req.identity)
        .map_err(|e| unprocessable(e.to_string()))?;
    let ttl = Duration::from_secs(req.ttl_seconds);
    if ttl.is_zero() || ttl > TOKEN_MAX_TTL {
        return Err(unprocessable(
            "ttlSeconds: a join token lives from 1 s to 24 h",
        ));
    }
    let uses = req.uses.unwrap_or(1);
    if !(1..=10_000).contains(&uses) {
        return Err(unprocessable("uses: from 1 to 10000"));
    }
    let t = join::generate();
    let grant = Grant::new(
        &t,
        &req.namespace,
        &req.identity,
        ttl,
        uses,
        SystemTime::now(),
    );
    let doc = serde_json::to_value(&grant)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    api.store()
        .write(vec![Write {
            key: grant_key(&t.id),
            doc: Some(doc),
            expect: Expect::Absent,
        }])
        .await?;
    tracing::info!(token_id = %t.id, %spiffe, ttl_s = req.ttl_seconds, uses, "join token created");
    Ok(Json(json!({
        "token": t.token,
        "spiffeId": spiffe.to_string(),
        "expiresAt": grant.expires_at,
        "uses": uses,
    })))
}

/// `GET /api/v1/tokens`: every join token's grant, never a secret (none is stored).
pub(crate) async fn list_tokens(AxState(api): AxState<Api>) -> Result<Json<Value>, ApiError> {
    let now = join::unix(SystemTime::now());
    let items: Vec<Value> = api
        .store()
        .list()
        .await?
        .objects
        .into_iter()
        .filter(|o| o.key.kind == "_JoinToken")
        .filter_map(|o| {
            let g: Grant = serde_json::from_value(o.doc).ok()?;
            let state = if g.expires_at <= now {
                "expired"
            } else if g.uses_left == 0 {
                "used"
            } else {
                "active"
            };
            Some(json!({
                "id": o.key.name,
                "namespace": g.namespace,
                "identity": g.identity,
                "expiresAt": g.expires_at,
                "usesLeft": g.uses_left,
                "state": state,
            }))
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// `DELETE /api/v1/tokens/{id}`: revoke a join token (certificates it got stay valid).
pub(crate) async fn revoke_token(
    AxState(api): AxState<Api>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    api.store()
        .write(vec![Write {
            key: grant_key(&id),
            doc: None,
            expect: Expect::Any,
        }])
        .await?;
    tracing::info!(token_id = %id, "join token revoked");
    Ok(Json(json!({ "revoked": id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CsrRequest {
    csr: String,
    /// Renewal: the current certificate (PEM chain)...
    #[serde(default)]
    certificate: Option<String>,
    /// ...and its key's signature over `csr`, hex.
    #[serde(default)]
    proof: Option<String>,
}

fn issued(svid: &trellis_identity::Svid, ca: &Ca) -> Json<Value> {
    Json(json!({
        "certificate": svid.chain_pem,
        "trustBundle": ca.trust_bundle(),
        "spiffeId": svid.id.to_string(),
        "notAfter": join::unix(svid.not_after),
    }))
}

/// Renew with the current certificate and a proof of its key.
fn renew(
    id: &Identity,
    req: &CsrRequest,
    cert: &str,
    proof: &str,
) -> Result<Json<Value>, ApiError> {
    let proof = join::unhex(proof)
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "proof: not hex".into()))?;
    match id.ca.renew(&req.csr, cert, &proof, id.svid_ttl) {
        Ok(svid) => {
            tracing::info!(spiffe = %svid.id, "certificate renewed");
            Ok(issued(&svid, &id.ca))
        }
        Err(e @ (CaError::Untrusted(_) | CaError::Refused { .. })) => {
            tracing::warn!(error = %e, "renewal refused");
            Err(unauthorized(e.to_string()))
        }
        Err(e @ CaError::BadCsr(_)) => Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn unauthorized(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, m.into())
}

pub(crate) async fn sign(
    AxState(api): AxState<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: CsrRequest = json_body(&body)?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let id = api.identity();
    let Some((tid, secret)) = join::parse(token) else {
        if let (Some(cert), Some(proof)) = (&req.certificate, &req.proof) {
            return renew(id, &req, cert, proof);
        }
        return Err(unauthorized(
            "a join token (Authorization: Bearer trellis-join....) or the current certificate and a proof of its key is required",
        ));
    };
    // A few tries: another proxy using the same multi-use token moves the grant's version.
    for _ in 0..5 {
        let Some(obj) = api.store().get(&grant_key(tid)).await? else {
            tracing::warn!(token_id = %tid, "certificate refused: unknown join token");
            return Err(unauthorized(Refusal::Unknown.to_string()));
        };
        let grant: Grant = serde_json::from_value(obj.doc.clone()).map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("stored grant: {e}"),
            )
        })?;
        if let Err(r) = grant.check(secret, SystemTime::now()) {
            tracing::warn!(token_id = %tid, reason = %r, "certificate refused");
            return Err(unauthorized(r.to_string()));
        }
        let spiffe = SpiffeId::new(id.ca.trust_domain(), &grant.namespace, &grant.identity)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        // Sign first: a refused CSR does not use the token up.
        let svid = match id.ca.sign(&req.csr, &spiffe, id.svid_ttl) {
            Ok(s) => s,
            Err(e @ CaError::Refused { .. }) => {
                tracing::warn!(token_id = %tid, error = %e, "certificate refused: identity outside the token's scope");
                return Err(ApiError(StatusCode::FORBIDDEN, e.to_string()));
            }
            Err(e @ CaError::BadCsr(_)) => {
                return Err(ApiError(StatusCode::BAD_REQUEST, e.to_string()))
            }
            Err(e) => return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        };
        let used = Grant {
            uses_left: grant.uses_left - 1,
            ..grant
        };
        let write = Write {
            key: grant_key(tid),
            doc: Some(serde_json::to_value(&used).expect("a grant serializes")),
            expect: Expect::Version(obj.version),
        };
        match api.store().write(vec![write]).await {
            Ok(_) => {
                tracing::info!(token_id = %tid, %spiffe, uses_left = used.uses_left, "certificate issued");
                return Ok(issued(&svid, &id.ca));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the join token is in use by other requests; try again".into(),
    ))
}

/// Shared by the API.
pub type Shared = Arc<Identity>;
