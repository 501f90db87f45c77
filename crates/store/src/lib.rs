//! The control plane's resource store: JSON documents under `kind/namespace/name`, each with a
//! resource version, written in atomic batches with optimistic concurrency, and watched.
//!
//! Two backends share one contract (tests/conformance.rs runs the same suite on both):
//! - [`Store::open_embedded`]: one redb file in the data directory; one control plane.
//! - [`Store::connect_etcd`]: etcd, so that several control-plane replicas serve one mesh.
//!
//! Versions are store revisions, as in etcd: every committed batch gets the next revision and
//! each object remembers the revision that last wrote it. [`Store::list_and_watch`] returns a
//! listing at revision R and every change after R, with no gap and no repeat.

use std::fmt;

use serde_json::Value;

mod embedded;
#[cfg(feature = "etcd")]
mod etcd;

/// Where a document lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// Resource kind, as written in YAML (`Service`, `HTTPRoute`...).
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl Key {
    /// A key from its parts.
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn encode(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }

    fn decode(s: &str) -> Option<Self> {
        let mut it = s.splitn(3, '/');
        let (kind, ns, name) = (it.next()?, it.next()?, it.next()?);
        Some(Self::new(kind, ns, name))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A stored document and the revision that last wrote it.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Where it lives.
    pub key: Key,
    /// Resource version: the store revision of its last write.
    pub version: u64,
    /// The document (JSON).
    pub doc: Value,
}

/// What a write expects to find, for optimistic concurrency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Anything (last writer wins).
    Any,
    /// The key does not exist yet.
    Absent,
    /// The key exists at exactly this version.
    Version(u64),
}

/// One change of a batch.
#[derive(Clone, Debug)]
pub struct Write {
    /// Which document.
    pub key: Key,
    /// The new document, or `None` to delete.
    pub doc: Option<Value>,
    /// Precondition.
    pub expect: Expect,
}

/// One change as a watcher sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Created or updated.
    Put(Object),
    /// Deleted.
    Delete(Key),
}

/// Every change of one committed batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The batch's revision.
    pub revision: u64,
    /// Its changes, in batch order.
    pub events: Vec<Event>,
}

/// Every object at one revision.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Objects, sorted by key.
    pub objects: Vec<Object>,
    /// The store revision the listing reflects.
    pub revision: u64,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition did not hold; nothing of the batch was written.
    #[error("{key}: conflict: expected {expected}, found {found}")]
    Conflict {
        /// The key whose precondition failed.
        key: Key,
        /// What the write expected.
        expected: String,
        /// What the store holds.
        found: String,
    },
    /// A delete named a key that does not exist.
    #[error("{0}: not found")]
    NotFound(Key),
    /// A watcher fell too far behind; list again.
    #[error("watch lost its place; list again")]
    WatchLost,
    /// The store URL is not understood.
    #[error("bad store URL {0:?}: expected `embedded` or etcd://HOST:PORT[,HOST:PORT...]")]
    BadUrl(String),
    /// The backend failed (I/O, corrupt data, unreachable etcd).
    #[error("store backend: {0}")]
    Backend(String),
}

impl StoreError {
    fn backend(e: impl fmt::Display) -> Self {
        Self::Backend(e.to_string())
    }
}

fn describe(v: Option<u64>) -> String {
    match v {
        Some(v) => format!("version {v}"),
        None => "no object".into(),
    }
}

fn check(key: &Key, expect: Expect, found: Option<u64>, delete: bool) -> Result<(), StoreError> {
    if delete && found.is_none() {
        return Err(StoreError::NotFound(key.clone()));
    }
    let ok = match expect {
        Expect::Any => true,
        Expect::Absent => found.is_none(),
        Expect::Version(v) => found == Some(v),
    };
    if ok {
        return Ok(());
    }
    Err(StoreError::Conflict {
        key: key.clone(),
        expected: match expect {
            Expect::Any => "anything".into(),
            Expect::Absent => "no object".into(),
            Expect::Version(v) => format!("version {v}"),
        },
        found: describe(found),
    })
}

/// A handle on the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Embedded(embedded::Embedded),
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd::Etcd>),
}

/// Changes after a listing. Ends with [`StoreError::WatchLost`] when the watcher fell behind
/// or the backend went away: the caller lists and watches again.
pub struct Watch {
    rx: tokio::sync::mpsc::Receiver<Result<Change, StoreError>>,
}

impl Watch {
    /// The next committed batch.
    pub async fn next(&mut self) -> Result<Change, StoreError> {
        self.rx.recv().await.unwrap_or(Err(StoreError::WatchLost))
    }

    /// The next batch if one is already waiting (to coalesce a burst of batches).
    pub fn try_next(&mut self) -> Option<Result<Change, StoreError>> {
        match self.rx.try_recv() {
            Ok(c) => Some(c),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => None,
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                Some(Err(StoreError::WatchLost))
            }
        }
    }
}

impl Store {
    /// Open (or create) the embedded store in `path`.
    pub fn open_embedded(path: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Embedded(embedded::Embedded::open(path)?),
        })
    }

    /// Connect to etcd at `endpoints` (`host:port`); every key lives under `prefix`.
    #[cfg(feature = "etcd")]
    pub async fn connect_etcd(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Etcd(Box::new(etcd::Etcd::connect(endpoints, prefix).await?)),
        })
    }

    /// Open the store a `--store` URL names: `embedded` (a redb file under `data_dir`) or
    /// `etcd://HOST:PORT[,HOST:PORT...]`.
    pub async fn open(url: &str, data_dir: &std::path::Path) -> Result<Self, StoreError> {
        if url == "embedded" || url.is_empty() {
            return Self::open_embedded(&data_dir.join("store.redb"));
        }
        #[cfg(feature = "etcd")]
        if let Some(rest) = url.strip_prefix("etcd://") {
            let endpoints: Vec<String> = rest
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| format!("http://{s}"))
                .collect();
            if endpoints.is_empty() {
                return Err(StoreError::BadUrl(url.into()));
            }
            return Self::connect_etcd(&endpoints, "/trellis/v1/").await;
        }
        Err(StoreError::BadUrl(url.into()))
    }

    /// Which backend, for logs.
    pub fn describe(&self) -> &'static str {
        match &self.backend {
            Backend::Embedded(_) => "embedded",
            #[cfg(feature = "etcd")]
            Backend::Etcd(_) => "etcd",
        }
    }

    /// Every object, at one revision.
    pub async fn list(&self) -> Result<Listing, StoreError> {
        match &self.backend {
            Backend::Embedded(b) => b.list().await,
            #[cfg(feature = "etcd")]
            Backend::Etcd(b) => b.list().await,
        }
    }

    /// One object.
    pub async fn get(&self, key: &Key) -> Result<Option<Object>, StoreError> {
        match &self.backend {
            Backend::Embedded(b) => b.get(key).await,
            #[cfg(feature = "etcd")]
            Backend::Etcd(b) => b.get(key).await,
        }
    }

    /// Commit `writes` atomically: every precondition holds and all are written at one new
    /// revision (returned), or nothing is written.
    pub async fn write(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
        if writes.is_empty() {
            return Ok(self.list().await?.revision);
        }
        match &self.backend {
            Backend::Embedded(b) => b.write(writes).await,
            #[cfg(feature = "etcd")]
            Backend::Etcd(b) => b.write(writes).await,
        }
    }

    /// A listing and every change after it.
    pub async fn list_and_watch(&self) -> Result<(Listing, Watch), StoreError> {
        match &self.backend {
            Backend::Embedded(b) => b.list_and_watch().await,
            #[cfg(feature = "etcd")]
            Backend::Etcd(b) => b.list_and_watch().await,
        }
    }
}
