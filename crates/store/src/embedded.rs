//! The embedded backend: one redb file. redb commits are durable (fsync) and atomic; the
//! revision counter lives in the same transaction as the documents it versions.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use crate::{check, Change, Event, Key, Listing, Object, StoreError, Watch, Write};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u64,
    doc: Value,
}

#[derive(Clone)]
pub(crate) struct Embedded {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Held from commit to broadcast, so that watchers see batches in revision order.
    write_lock: Mutex<()>,
    changes: broadcast::Sender<Change>,
}

fn decode(k: &str, v: &[u8]) -> Result<Object, StoreError> {
    let key = Key::decode(k).ok_or_else(|| StoreError::Backend(format!("bad key {k:?}")))?;
    let s: Stored = serde_json::from_slice(v).map_err(StoreError::backend)?;
    Ok(Object {
        key,
        version: s.version,
        doc: s.doc,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StoreError::backend)?
}

/// The store's own page cache (reads and writes), in bytes.
const CACHE_BYTES: usize = 4 << 20;

impl Embedded {
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(StoreError::backend)?;
        }
        // redb caches up to 1 GiB of pages by default: every page written stays in memory.
        // The catalog holds what the control plane reads; the file's pages stay in the OS's
        // cache.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        // Create the tables so that readers never see them missing.
        let txn = db.begin_write().map_err(StoreError::backend)?;
        {
            txn.open_table(OBJECTS).map_err(StoreError::backend)?;
            txn.open_table(META).map_err(StoreError::backend)?;
        }
        txn.commit().map_err(StoreError::backend)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                write_lock: Mutex::new(()),
                changes: broadcast::channel(1024).0,
            }),
        })
    }

    fn list_sync(inner: &Inner) -> Result<Listing, StoreError> {
        let txn = inner.db.begin_read().map_err(StoreError::backend)?;
        let meta = txn.open_table(META).map_err(StoreError::backend)?;
        let revision = meta
            .get(REVISION)
            .map_err(StoreError::backend)?
            .map(|g| g.value())
            .unwrap_or(0);
        let table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
        let mut objects = Vec::new();
        for row in table.iter().map_err(StoreError::backend)? {
            let (k, v) = row.map_err(StoreError::backend)?;
            objects.push(decode(k.value(), v.value())?);
        }
        Ok(Listing { objects, revision })
    }

    pub(crate) async fn list(&self) -> Result<Listing, StoreError> {
        let inner = self.inner.clone();
        blocking(move || Self::list_sync(&inner)).await
    }

    pub(crate) async fn get(&self, key: &Key) -> Result<Option<Object>, StoreError> {
        let inner = self.inner.clone();
        let k = key.encode();
        blocking(move || {
            let txn = inner.db.begin_read().map_err(StoreError::backend)?;
            let table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
            let v = table.get(k.as_str()).map_err(StoreError::backend)?;
            v.map(|v| decode(&k, v.value())).transpose()
        })
        .await
    }

    pub(crate) async fn write(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
        let inner = self.inner.clone();
        blocking(move || {
            let _order = inner.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let txn = inner.db.begin_write().map_err(StoreError::backend)?;
            let revision;
            let mut events = Vec::with_capacity(writes.len());
            {
                let mut meta = txn.open_table(META).map_err(StoreError::backend)?;
                let mut table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
                revision = meta
                    .get(REVISION)
                    .map_err(StoreError::backend)?
                    .map(|g| g.value())
                    .unwrap_or(0)
                    + 1;
                for w in writes {
                    let k = w.key.encode();
                    let found = match table.get(k.as_str()).map_err(StoreError::backend)? {
                        Some(v) => Some(decode(&k, v.value())?.version),
                        None => None,
                    };
                    // Dropping `txn` without commit aborts the whole batch.
                    check(&w.key, w.expect, found, w.doc.is_none())?;
                    match w.doc {
                        Some(doc) => {
                            let stored = Stored {
                                version: revision,
                                doc,
                            };
                            let bytes = serde_json::to_vec(&stored).map_err(StoreError::backend)?;
                            table
                                .insert(k.as_str(), bytes.as_slice())
                                .map_err(StoreError::backend)?;
                            events.push(Event::Put(Object {
                                key: w.key,
                                version: revision,
                                doc: stored.doc,
                            }));
                        }
                        None => {
                            table.remove(k.as_str()).map_err(StoreError::backend)?;
                            events.push(Event::Delete(w.key));
                        }
                    }
                }
                meta.insert(REVISION, revision)
                    .map_err(StoreError::backend)?;
            }
            txn.commit().map_err(StoreError::backend)?;
            // No receiver is not an error.
            let _ = inner.changes.send(Change { revision, events });
            Ok(revision)
        })
        .await
    }

    pub(crate) async fn list_and_watch(&self) -> Result<(Listing, Watch), StoreError> {
        // Subscribe first: every batch committed after this point is delivered, and batches
        // already in the listing are skipped by revision.
        let mut sub = self.inner.changes.subscribe();
        let listing = self.list().await?;
        let after = listing.revision;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let item = match sub.recv().await {
                    Ok(c) if c.revision <= after => continue,
                    Ok(c) => Ok(c),
                    Err(broadcast::error::RecvError::Lagged(_)) => Err(StoreError::WatchLost),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok((listing, Watch { rx }))
    }
}
