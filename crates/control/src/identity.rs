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

use serde::Deserialize;
use serde_json::{json, Value};
use trellis_identity::{
    join::{self, Grant, Refusal},
    Ca, CaError, SpiffeId,
};
use trellis_store::{Expect, Key, Store, StoreError, Write};

use trellis_model::proxy::MESH_NAMESPACE;

use crate::error::ControlError;

/// Why a request to the CA (a token, a certificate, a rotation) was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaRequestError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// A value is out of range.
    #[error("{0}")]
    Unprocessable(String),
    /// No valid token or proof of a current certificate.
    #[error("{0}")]
    Unauthorized(String),
    /// Outside what the token allows.
    #[error("{0}")]
    Forbidden(String),
    /// The CA is not in the state the request needs (a rotation phase).
    #[error("{0}")]
    Conflict(String),
    /// Contention; try again.
    #[error("{0}")]
    Busy(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA could not be read or used.
    #[error(transparent)]
    Setup(#[from] ControlError),
}

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
pub(crate) struct Identity {
    /// An operator's CA, from files; `None`: the built-in CA, read from the store on use so
    /// that every replica signs with the root a rotation made current.
    files: Option<Arc<Ca>>,
    /// The mesh's trust domain.
    pub(crate) trust_domain: String,
    /// Lifetime of an issued certificate.
    pub(crate) svid_ttl: Duration,
    /// The built-in CA as last read, and when: agents' heartbeats are verified against it
    /// many times a second in a large fleet, and a rotation is seen within [`CA_FRESH`].
    cached: std::sync::Mutex<Option<(std::time::Instant, Arc<Ca>)>>,
}

/// How long a read of the CA record is used.
const CA_FRESH: Duration = Duration::from_secs(1);

impl Identity {
    /// The operator's CA (`files`) or the built-in one in `store`.
    pub(crate) async fn new(
        store: &Store,
        files: Option<&CaFiles>,
        trust_domain: &str,
        svid_ttl: Duration,
    ) -> Result<Self, ControlError> {
        let files = match files {
            Some(f) => {
                let ca = load_ca(f, trust_domain)?;
                publish_bundle(store, &[ca.trust_bundle().to_string()]).await?;
                Some(Arc::new(ca))
            }
            None => {
                establish_ca(store, trust_domain).await?;
                None
            }
        };
        Ok(Self {
            files,
            trust_domain: trust_domain.to_string(),
            svid_ttl,
            cached: Default::default(),
        })
    }

    /// The CA to sign with now, its trust bundle holding every root being rotated.
    pub(crate) async fn ca(&self, store: &Store) -> Result<Arc<Ca>, ControlError> {
        if let Some(c) = &self.files {
            return Ok(c.clone());
        }
        if let Some((at, ca)) = self.cached.lock().expect("ca cache").as_ref() {
            if at.elapsed() < CA_FRESH {
                return Ok(ca.clone());
            }
        }
        let rec = read_record(store).await?;
        let ca = Arc::new(rec.ca(&self.trust_domain)?);
        *self.cached.lock().expect("ca cache") = Some((std::time::Instant::now(), ca.clone()));
        Ok(ca)
    }

    /// Forget the cached CA (after a rotation phase, so this replica signs with the new
    /// state at once).
    pub(crate) fn refresh(&self) {
        *self.cached.lock().expect("ca cache") = None;
    }
}

/// The built-in CA as stored: the signing root and key, every root proxies trust, and the
/// root a rotation is bringing in.
#[derive(Clone, Debug, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaRecord {
    trust_domain: String,
    cert_pem: String,
    key_pem: String,
    /// Trusted roots, the signing one among them (empty in records older than rotation:
    /// the signing root alone).
    #[serde(default)]
    roots: Vec<String>,
    /// Rotation, phase 1: the new root, trusted but not signing yet.
    #[serde(default)]
    next: Option<KeyPair>,
    /// Rotation, phase 2: when the new root began to sign (UNIX seconds).
    #[serde(default)]
    activated_at: Option<u64>,
}

#[derive(Clone, Debug, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyPair {
    cert_pem: String,
    key_pem: String,
}

impl CaRecord {
    fn roots(&self) -> Vec<String> {
        if self.roots.is_empty() {
            vec![self.cert_pem.clone()]
        } else {
            self.roots.clone()
        }
    }

    fn ca(&self, trust_domain: &str) -> Result<Ca, ControlError> {
        if self.trust_domain != trust_domain {
            return Err(ControlError::Identity(format!(
                "the mesh's CA is for trust domain {:?}, not {trust_domain:?} (--trust-domain)",
                self.trust_domain
            )));
        }
        let bundle = self.roots().concat();
        Ok(Ca::from_pem(
            &self.trust_domain,
            &self.cert_pem,
            &self.key_pem,
            Some(&bundle),
        )?)
    }
}

async fn read_record(store: &Store) -> Result<CaRecord, ControlError> {
    let o = store
        .get(&ca_key())
        .await?
        .ok_or_else(|| ControlError::Identity("the mesh's CA record is missing".into()))?;
    serde_json::from_value(o.doc)
        .map_err(|e| ControlError::Identity(format!("the mesh's CA record: {e}")))
}

/// The `TrustBundle` resource every proxy receives by xDS: the roots it must trust.
fn bundle_write(roots: &[String]) -> Write {
    Write {
        key: Key::new("TrustBundle", MESH_NAMESPACE, "mesh"),
        doc: Some(json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "TrustBundle",
            "metadata": { "name": "mesh", "namespace": MESH_NAMESPACE },
            "spec": { "roots": roots },
        })),
        expect: Expect::Any,
    }
}

/// Make the stored `TrustBundle` say `roots` (a store of an older version has none).
async fn publish_bundle(store: &Store, roots: &[String]) -> Result<(), ControlError> {
    let w = bundle_write(roots);
    if store.get(&w.key).await?.map(|o| o.doc) != w.doc {
        store.write(vec![w]).await?;
    }
    Ok(())
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
fn load_ca(f: &CaFiles, trust_domain: &str) -> Result<Ca, ControlError> {
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
/// start makes it; a racing one adopts the winner's). Its trust bundle is published too.
async fn establish_ca(store: &Store, trust_domain: &str) -> Result<(), ControlError> {
    if store.get(&ca_key()).await?.is_none() {
        let ca = Ca::generate(trust_domain, ROOT_LIFETIME)?;
        let rec = CaRecord {
            trust_domain: trust_domain.to_string(),
            cert_pem: ca.cert_pem().to_string(),
            key_pem: ca.key_pem().to_string(),
            roots: vec![ca.cert_pem().to_string()],
            next: None,
            activated_at: None,
        };
        let record = Write {
            key: ca_key(),
            doc: Some(serde_json::to_value(&rec).expect("a CA record serializes")),
            expect: Expect::Absent,
        };
        match store.write(vec![record, bundle_write(&rec.roots)]).await {
            Ok(_) => tracing::info!(%trust_domain, "created the mesh's root CA"),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let rec = read_record(store).await?;
    rec.ca(trust_domain)?;
    publish_bundle(store, &rec.roots()).await
}

/// `POST /api/v1/ca/rotate`'s body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RotateRequest {
    phase: String,
    #[serde(default)]
    force: bool,
}

/// `POST /api/v1/ca/rotate` (admin token): one phase of a root rotation.
///
/// 1. `begin`: a new root is made and added to the trust bundle; the old one still signs.
///    Proxies receive the bundle by xDS and trust both.
/// 2. `activate`: the new root signs; proxies move to it as they renew (at half their
///    lifetime), and those still on the old root are trusted all along.
/// 3. `finish`: the old root leaves the bundle; refused until every certificate it signed
///    has expired (one certificate lifetime after `activate`) unless `force`.
///
/// Each phase is one compare-and-swap of the CA record and the bundle together.
pub(crate) async fn rotate(
    id: &Identity,
    store: &Store,
    req: RotateRequest,
) -> Result<Value, CaRequestError> {
    if id.files.is_some() {
        return Err(CaRequestError::Conflict(
            "the mesh uses an operator's CA (--ca-cert): rotate it by giving every replica the new files, with both roots in --ca-bundle during the overlap".into(),
        ));
    }
    let obj = store
        .get(&ca_key())
        .await?
        .ok_or_else(|| ControlError::Identity("the mesh's CA record is missing".into()))?;
    let mut rec: CaRecord = serde_json::from_value(obj.doc)
        .map_err(|e| ControlError::Identity(format!("the mesh's CA record: {e}")))?;
    let conflict = CaRequestError::Conflict;
    let now = join::unix(SystemTime::now());
    match req.phase.as_str() {
        "begin" => {
            if rec.next.is_some() || rec.roots().len() > 1 {
                return Err(conflict(
                    "a rotation is already under way (see `trellis ca status`)".into(),
                ));
            }
            let ca = Ca::generate(&rec.trust_domain, ROOT_LIFETIME).map_err(ControlError::from)?;
            rec.roots = rec.roots();
            rec.roots.push(ca.cert_pem().to_string());
            rec.next = Some(KeyPair {
                cert_pem: ca.cert_pem().to_string(),
                key_pem: ca.key_pem().to_string(),
            });
        }
        "activate" => {
            let Some(next) = rec.next.take() else {
                return Err(conflict(
                    "no rotation to activate: run `trellis ca rotate begin` first".into(),
                ));
            };
            rec.cert_pem = next.cert_pem;
            rec.key_pem = next.key_pem;
            rec.activated_at = Some(now);
        }
        "finish" => {
            let Some(at) = rec.activated_at else {
                return Err(conflict("no activated rotation to finish".into()));
            };
            let wait = at + id.svid_ttl.as_secs();
            if now < wait && !req.force {
                return Err(conflict(format!(
                    "certificates signed by the old root may be valid for {} s more (until every proxy renewed or they expired); wait, or use --force",
                    wait - now
                )));
            }
            rec.roots = vec![rec.cert_pem.clone()];
            rec.activated_at = None;
        }
        other => {
            return Err(CaRequestError::Unprocessable(format!(
                "phase: {other:?} is not begin, activate or finish"
            )))
        }
    }
    let write = Write {
        key: ca_key(),
        doc: Some(serde_json::to_value(&rec).expect("a CA record serializes")),
        expect: Expect::Version(obj.version),
    };
    store.write(vec![write, bundle_write(&rec.roots())]).await?;
    id.refresh();
    tracing::info!(phase = %req.phase, roots = rec.roots().len(), "CA rotation");
    ca_status(id, store).await
}

/// `GET /api/v1/ca`: the trust domain, the roots (signing, trusted) and the rotation phase.
pub(crate) async fn ca_status(id: &Identity, store: &Store) -> Result<Value, CaRequestError> {
    let ca = id.ca(store).await?;
    let describe = |pem: &str, signing: bool| {
        let info = trellis_identity::ca::describe_ca(pem);
        json!({ "subject": info.0, "notAfter": info.1, "fingerprint": info.2, "signing": signing })
    };
    let signing = describe(ca.cert_pem(), true);
    let roots: Vec<Value> = x509_pems(ca.trust_bundle())
        .iter()
        .map(|p| {
            let d = describe(p, false);
            let s = d["fingerprint"] == signing["fingerprint"];
            json!({ "subject": d["subject"], "notAfter": d["notAfter"], "fingerprint": d["fingerprint"], "signing": s })
        })
        .collect();
    let phase = if id.files.is_some() {
        "operator CA"
    } else {
        let rec = read_record(store).await?;
        match (&rec.next, rec.activated_at) {
            (Some(_), _) => "begun: both roots trusted, the old one signs",
            (None, Some(_)) => "activated: the new root signs, the old one is still trusted",
            _ => "steady",
        }
    };
    Ok(json!({
        "caHash": trellis_identity::tls::ca_hash(ca.cert_pem()),
        "trustDomain": id.trust_domain,
        "svidTtlSeconds": id.svid_ttl.as_secs(),
        "signing": signing,
        "roots": roots,
        "phase": phase,
    }))
}

/// Each PEM certificate in `bundle`.
fn x509_pems(bundle: &str) -> Vec<String> {
    bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|p| p.starts_with("-----BEGIN CERTIFICATE-----"))
        .map(|p| format!("{p}\n"))
        .collect()
}

/// `POST /api/v1/tokens`'s body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct TokenRequest {
    namespace: String,
    identity: String,
    ttl_seconds: u64,
    #[serde(default)]
    uses: Option<u32>,
}

fn unprocessable(m: impl Into<String>) -> CaRequestError {
    CaRequestError::Unprocessable(m.into())
}

/// A join token for `req`'s identity (shown once; the store keeps only its digest).
pub(crate) async fn create_token(
    id: &Identity,
    store: &Store,
    req: TokenRequest,
) -> Result<Value, CaRequestError> {
    let spiffe = SpiffeId::new(&id.trust_domain, &req.namespace, &req.identity)
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
    let doc = serde_json::to_value(&grant).expect("a grant serializes");
    store
        .write(vec![Write {
            key: grant_key(&t.id),
            doc: Some(doc),
            expect: Expect::Absent,
        }])
        .await?;
    tracing::info!(token_id = %t.id, %spiffe, ttl_s = req.ttl_seconds, uses, "join token created");
    let ca = id.ca(store).await?;
    Ok(json!({
        "token": t.token,
        "caHash": trellis_identity::tls::ca_hash(ca.cert_pem()),
        "spiffeId": spiffe.to_string(),
        "expiresAt": grant.expires_at,
        "uses": uses,
    }))
}

/// Every join token's grant, never a secret (none is stored).
pub(crate) async fn list_tokens(store: &Store) -> Result<Value, StoreError> {
    let now = join::unix(SystemTime::now());
    let items: Vec<Value> = store
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
    Ok(json!({ "items": items }))
}

/// Revoke a join token (certificates it got stay valid).
pub(crate) async fn revoke_token(store: &Store, id: &str) -> Result<Value, StoreError> {
    store
        .write(vec![Write {
            key: grant_key(id),
            doc: None,
            expect: Expect::Any,
        }])
        .await?;
    tracing::info!(token_id = %id, "join token revoked");
    Ok(json!({ "revoked": id }))
}

/// `POST /v1/certificates`'s body.
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

fn issued(svid: &trellis_identity::Svid, ca: &Ca) -> Value {
    json!({
        "certificate": svid.chain_pem,
        "trustBundle": ca.trust_bundle(),
        "spiffeId": svid.id.to_string(),
        "notAfter": join::unix(svid.not_after),
    })
}

/// Renew with the current certificate and a proof of its key.
fn renew(
    id: &Identity,
    ca: &Ca,
    req: &CsrRequest,
    cert: &str,
    proof: &str,
) -> Result<Value, CaRequestError> {
    let proof =
        join::unhex(proof).ok_or_else(|| CaRequestError::BadRequest("proof: not hex".into()))?;
    match ca.renew(&req.csr, cert, &proof, id.svid_ttl) {
        Ok(svid) => {
            tracing::info!(spiffe = %svid.id, "certificate renewed");
            Ok(issued(&svid, ca))
        }
        Err(e @ (CaError::Untrusted(_) | CaError::Refused { .. })) => {
            tracing::warn!(error = %e, "renewal refused");
            Err(unauthorized(e.to_string()))
        }
        Err(e @ CaError::BadCsr(_)) => Err(CaRequestError::BadRequest(e.to_string())),
        Err(e) => Err(ControlError::from(e).into()),
    }
}

fn unauthorized(m: impl Into<String>) -> CaRequestError {
    CaRequestError::Unauthorized(m.into())
}

/// A certificate for a CSR: with a join token (`token`, from the bearer header), for the
/// identity it allows, using one of its uses; or a renewal proven by the current one.
pub(crate) async fn sign(
    id: &Identity,
    store: &Store,
    token: &str,
    req: CsrRequest,
) -> Result<Value, CaRequestError> {
    let ca = id.ca(store).await?;
    let Some((tid, secret)) = join::parse(token) else {
        if let (Some(cert), Some(proof)) = (&req.certificate, &req.proof) {
            return renew(id, &ca, &req, cert, proof);
        }
        // A bearer that is not shaped like a join token is named as such: "required" would
        // send its sender looking for a missing header.
        return Err(unauthorized(if token.trim().is_empty() {
            "a join token (Authorization: Bearer trellis-join....) or the current certificate and a proof of its key is required".to_string()
        } else {
            format!("not a join token: {}", join::SHAPE)
        }));
    };
    // A few tries: another proxy using the same multi-use token moves the grant's version.
    for _ in 0..5 {
        let Some(obj) = store.get(&grant_key(tid)).await? else {
            tracing::warn!(token_id = %tid, "certificate refused: unknown join token");
            return Err(unauthorized(Refusal::Unknown.to_string()));
        };
        let grant: Grant = serde_json::from_value(obj.doc.clone())
            .map_err(|e| ControlError::Identity(format!("stored grant: {e}")))?;
        if let Err(r) = grant.check(secret, SystemTime::now()) {
            tracing::warn!(token_id = %tid, reason = %r, "certificate refused");
            return Err(unauthorized(r.to_string()));
        }
        let spiffe = SpiffeId::new(&id.trust_domain, &grant.namespace, &grant.identity)
            .map_err(|e| ControlError::Identity(format!("stored grant: {e}")))?;
        // Sign first: a refused CSR does not use the token up.
        let svid = match ca.sign(&req.csr, &spiffe, id.svid_ttl) {
            Ok(s) => s,
            Err(e @ CaError::Refused { .. }) => {
                tracing::warn!(token_id = %tid, error = %e, "certificate refused: identity outside the token's scope");
                return Err(CaRequestError::Forbidden(e.to_string()));
            }
            Err(e @ CaError::BadCsr(_)) => return Err(CaRequestError::BadRequest(e.to_string())),
            Err(e) => return Err(ControlError::from(e).into()),
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
        match store.write(vec![write]).await {
            Ok(_) => {
                tracing::info!(token_id = %tid, %spiffe, uses_left = used.uses_left, "certificate issued");
                return Ok(issued(&svid, &ca));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CaRequestError::Busy(
        "the join token is in use by other requests; try again".into(),
    ))
}
