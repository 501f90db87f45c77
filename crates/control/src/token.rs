//! The admin token. One per mesh: the first control-plane replica to start creates it, keeps
//! it in `DATA_DIR/admin.token` (mode 0600), prints it once, and records its SHA-256 in the
//! store; every replica on the same store (etcd) accepts that token. The token itself is
//! never stored, only its digest.

use std::{io::Read, os::unix::fs::OpenOptionsExt, path::Path};

use serde_json::json;
use trellis_identity::join::{digest, hex, same};
use trellis_store::{Expect, Key, Store, StoreError, Write};

use crate::error::ControlError;

const FILE: &str = "admin.token";

/// Where the digest lives in the store. Not a resource kind: the catalog skips kinds that
/// start with `_`, and the API only serves the kinds it knows.
pub(crate) fn store_key() -> Key {
    Key::new("_AdminToken", "trellis-system", "admin")
}

/// 32 random bytes from the kernel, hex-encoded.
pub(crate) fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex(&bytes))
}

/// The mesh's admin token, as a digest to check bearer tokens against.
#[derive(Clone, Debug)]
pub(crate) struct AdminToken {
    sha256: String,
}

impl AdminToken {
    /// Whether `given` is the token (compared by digest, without an early exit).
    pub(crate) fn accepts(&self, given: &str) -> bool {
        same(&digest(given.trim()), &self.sha256)
    }
}

fn read_local(path: &Path) -> Result<Option<String>, ControlError> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ControlError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_local(path: &Path, token: &str) -> Result<(), ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

async fn stored(store: &Store) -> Result<Option<String>, ControlError> {
    Ok(store
        .get(&store_key())
        .await?
        .and_then(|o| o.doc["sha256"].as_str().map(str::to_string)))
}

/// The mesh's admin token: the one recorded in the store, or else this data dir's (created
/// when missing), which is then recorded. The second value is the token when this call
/// created it, so that the caller prints it once.
pub(crate) async fn establish(
    store: &Store,
    dir: &Path,
) -> Result<(AdminToken, Option<String>), ControlError> {
    let path = dir.join(FILE);
    let local = read_local(&path)?;
    if let Some(sha256) = stored(store).await? {
        match &local {
            Some(t) if digest(t) == sha256 => {}
            Some(_) => {
                tracing::warn!(file = %path.display(), "this file's token is not the mesh's admin token; use the token of the replica that first started on this store")
            }
            None => tracing::info!(
                "using the mesh's admin token, created by another replica; log in with that one"
            ),
        }
        return Ok((AdminToken { sha256 }, None));
    }
    let (token, new) = match local {
        Some(t) => (t, false),
        None => (
            generate().map_err(|source| ControlError::Io {
                path: path.clone(),
                source,
            })?,
            true,
        ),
    };
    let sha256 = digest(&token);
    let record = Write {
        key: store_key(),
        doc: Some(json!({ "sha256": sha256 })),
        expect: Expect::Absent,
    };
    match store.write(vec![record]).await {
        Ok(_) => {}
        // Another replica recorded its token first: that one is the mesh's.
        Err(StoreError::Conflict { .. }) => {
            if let Some(sha256) = stored(store).await? {
                tracing::info!("using the mesh's admin token, created by another replica; log in with that one");
                return Ok((AdminToken { sha256 }, None));
            }
        }
        Err(e) => return Err(e.into()),
    }
    if new {
        write_local(&path, &token)?;
    }
    Ok((AdminToken { sha256 }, new.then_some(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_token_per_mesh_whichever_replica_starts_first() {
        let base = std::env::temp_dir().join(format!("trellis-token-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let store = Store::open("embedded", &a).await.unwrap();

        let (tok_a, printed) = establish(&store, &a).await.unwrap();
        let t = printed.expect("created and shown once");
        assert_eq!(std::fs::read_to_string(a.join(FILE)).unwrap().trim(), t);
        assert!(tok_a.accepts(&t) && !tok_a.accepts("guess") && !tok_a.accepts(""));
        // Stored as a digest only.
        let rec = store.get(&store_key()).await.unwrap().unwrap();
        assert!(!rec.doc.to_string().contains(&t));

        // A restart keeps it and prints nothing.
        let (again, printed) = establish(&store, &a).await.unwrap();
        assert!(printed.is_none() && again.accepts(&t));

        // Another replica on the same store creates nothing and accepts the mesh's token,
        // even with a different token file of its own.
        std::fs::write(b.join(FILE), "not-the-mesh-token\n").unwrap();
        let (tok_b, printed) = establish(&store, &b).await.unwrap();
        assert!(printed.is_none());
        assert!(tok_b.accepts(&t) && !tok_b.accepts("not-the-mesh-token"));
        let _ = std::fs::remove_dir_all(&base);
    }
}

/// Where a read-only token's digest lives in the store.
fn viewer_key(id: &str) -> Key {
    Key::new("_ViewerToken", "trellis-system", id)
}

/// How stale this replica's copy of the read-only tokens may be (one made or revoked
/// through another replica counts after at most this).
const VIEWERS_STALE: std::time::Duration = std::time::Duration::from_secs(5);

/// Read-only tokens: they may read everything the admin token reads but the tokens
/// themselves, and change nothing. Each is kept in the store by its id, as its SHA-256
/// digest and a name; the token itself is shown once, when it is made.
#[derive(Default)]
pub(crate) struct Viewers {
    /// Digest → id, as last read from the store, and when.
    known: std::sync::Mutex<(
        std::collections::HashMap<String, String>,
        Option<std::time::Instant>,
    )>,
}

impl Viewers {
    /// The read-only tokens' records in the store.
    async fn stored(store: &Store) -> Result<Vec<trellis_store::Object>, StoreError> {
        let mut all = store.list().await?.objects;
        all.retain(|o| o.key.kind == "_ViewerToken");
        Ok(all)
    }

    async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let found = Self::stored(store)
            .await?
            .into_iter()
            .filter_map(|o| Some((o.doc["sha256"].as_str()?.to_string(), o.key.name)))
            .collect();
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) =
            (found, Some(std::time::Instant::now()));
        Ok(())
    }

    /// This replica's copy, read again when stale.
    async fn fresh(&self, store: &Store) {
        let stale = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .is_none_or(|at| at.elapsed() > VIEWERS_STALE);
        if stale {
            if let Err(e) = self.reload(store).await {
                tracing::warn!(error = %e, "cannot read the read-only tokens");
            }
        }
    }

    /// The id of the read-only token `given`, if it is one.
    pub(crate) async fn which(&self, store: &Store, given: &str) -> Option<String> {
        self.fresh(store).await;
        let d = digest(given.trim());
        // Looked up by digest: the lookup's timing says nothing of the token.
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(&d)
            .cloned()
    }

    /// Whether the read-only token `id` still stands (a session opened with it ends with
    /// it).
    pub(crate) async fn stands(&self, store: &Store, id: &str) -> bool {
        self.fresh(store).await;
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .values()
            .any(|v| v == id)
    }

    /// Make a read-only token named `name`: `{id, name, token}` (the token, once).
    pub(crate) async fn create(
        &self,
        store: &Store,
        name: &str,
    ) -> Result<serde_json::Value, ControlError> {
        let token = format!(
            "ro-{}",
            generate().map_err(|source| ControlError::Io {
                path: "/dev/urandom".into(),
                source,
            })?
        );
        let id = digest(&token)[..12].to_string();
        store
            .write(vec![Write {
                key: viewer_key(&id),
                doc: Some(json!({ "sha256": digest(&token), "name": name, "createdAt": trellis_identity::join::unix(std::time::SystemTime::now()) })),
                expect: Expect::Absent,
            }])
            .await?;
        self.reload(store).await?;
        tracing::info!(token_id = %id, name, "read-only token made");
        Ok(json!({ "id": id, "name": name, "token": token }))
    }

    /// The read-only tokens: ids and names.
    pub(crate) async fn list(&self, store: &Store) -> Result<serde_json::Value, StoreError> {
        let items: Vec<serde_json::Value> = Self::stored(store)
            .await?
            .into_iter()
            .map(|o| json!({ "id": o.key.name, "name": o.doc["name"], "createdAt": o.doc["createdAt"] }))
            .collect();
        Ok(json!({ "items": items }))
    }

    /// Revoke one.
    pub(crate) async fn revoke(
        &self,
        store: &Store,
        id: &str,
    ) -> Result<serde_json::Value, StoreError> {
        store
            .write(vec![Write {
                key: viewer_key(id),
                doc: None,
                expect: Expect::Any,
            }])
            .await?;
        self.reload(store).await?;
        tracing::info!(token_id = %id, "read-only token revoked");
        Ok(json!({ "revoked": id }))
    }
}
