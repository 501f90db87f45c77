//! The etcd backend. A document's version is its key's `mod_revision`; a batch is one etcd
//! transaction whose compares are the batch's preconditions; watches start at the listing's
//! revision + 1, so nothing between the two is lost.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::mpsc;

use crate::{check, Change, Event, Expect, Key, Listing, Object, StoreError, Watch, Write};

#[derive(Clone)]
pub(crate) struct Etcd {
    client: Client,
    prefix: String,
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// Whether `e` says the request never reached etcd: the member the client picked could not
/// be connected to (killed, or its host down). Sent again, it goes to another member; safe
/// for every request, transactions included, as nothing was sent.
fn unsent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// Whether `e` leaves a write's outcome unknown: the member took it, but its leader was lost
/// (`etcdserver: leader changed`) or the wait for it timed out. Such a write may still be
/// committed; a read once a leader is elected tells (see [`Etcd::applied`]). A read so
/// refused may simply be sent again.
fn unknown(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded))
}

/// How many times a request is sent again, and how long apart at first (doubling): about
/// 1.5 s in all, what a member's loss and a new election take.
const RESENDS: u32 = 5;
const RESEND_AFTER: Duration = Duration::from_millis(50);

/// Run `call` until it reaches etcd (see [`unsent`]), [`RESENDS`] more times at most; a
/// read (`read`) also while no leader answers for it ([`unknown`]).
async fn reaching<T, F>(read: bool, mut call: impl FnMut() -> F) -> Result<T, etcd_client::Error>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut wait = RESEND_AFTER;
    for _ in 0..RESENDS {
        match call().await {
            Err(e) if unsent(&e) || (read && unknown(&e)) => {
                tracing::warn!(error = %e, "an etcd request did not go through; sending it again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            done => return done,
        }
    }
    call().await
}

impl Etcd {
    pub(crate) async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(backend)?;
        let etcd = Self {
            client,
            prefix: prefix.into(),
        };
        // Fail now, not at the first request, when nothing answers.
        etcd.list().await?;
        Ok(etcd)
    }

    fn path(&self, key: &Key) -> String {
        format!("{}{}", self.prefix, key.encode())
    }

    fn object(&self, kv: &KeyValue) -> Result<Object, StoreError> {
        let k = kv.key_str().map_err(backend)?;
        let key = k
            .strip_prefix(&self.prefix)
            .and_then(Key::decode)
            .ok_or_else(|| StoreError::Backend(format!("bad key {k:?}")))?;
        Ok(Object {
            key,
            version: kv.mod_revision() as u64,
            doc: serde_json::from_slice(kv.value()).map_err(StoreError::backend)?,
        })
    }

    pub(crate) async fn list(&self) -> Result<Listing, StoreError> {
        let resp = reaching(true, || {
            let mut kv = self.client.kv_client();
            let opts = GetOptions::new().with_prefix();
            async move { kv.get(self.prefix.as_str(), Some(opts)).await }
        })
        .await
        .map_err(backend)?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0) as u64;
        let objects = resp
            .kvs()
            .iter()
            .map(|kv| self.object(kv))
            .collect::<Result<_, _>>()?;
        Ok(Listing { objects, revision })
    }

    pub(crate) async fn get(&self, key: &Key) -> Result<Option<Object>, StoreError> {
        Ok(self.get_at(key).await?.0)
    }

    /// `key`'s object and the store's revision when it was read (linearizable).
    async fn get_at(&self, key: &Key) -> Result<(Option<Object>, u64), StoreError> {
        let path = self.path(key);
        let resp = reaching(true, || {
            let (mut kv, path) = (self.client.kv_client(), path.clone());
            async move { kv.get(path, None).await }
        })
        .await
        .map_err(backend)?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0) as u64;
        let object = resp.kvs().first().map(|kv| self.object(kv)).transpose()?;
        Ok((object, revision))
    }

    /// Whether `writes` are in the store as written (every put's document there, every
    /// deleted key gone): the revision then. Read after a write's outcome was unknown: a
    /// linearizable read is served by a leader that committed an entry of its own term, so
    /// the lost leader's write is committed by then or never will be.
    async fn applied(&self, writes: &[Write]) -> Result<Option<u64>, StoreError> {
        let mut at = 0;
        for w in writes {
            let (found, revision) = self.get_at(&w.key).await?;
            let there = match (&w.doc, found) {
                (Some(doc), Some(o)) => o.doc == *doc,
                (None, None) => true,
                _ => false,
            };
            if !there {
                return Ok(None);
            }
            at = at.max(revision);
        }
        Ok(Some(at))
    }

    pub(crate) async fn write(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
        let mut compares = Vec::new();
        let mut ops = Vec::with_capacity(writes.len());
        for w in &writes {
            let path = self.path(&w.key);
            match w.expect {
                Expect::Any => {}
                Expect::Absent => {
                    compares.push(Compare::create_revision(path.clone(), CompareOp::Equal, 0))
                }
                Expect::Version(v) => compares.push(Compare::mod_revision(
                    path.clone(),
                    CompareOp::Equal,
                    v as i64,
                )),
            }
            match &w.doc {
                Some(doc) => {
                    let bytes = serde_json::to_vec(doc).map_err(StoreError::backend)?;
                    ops.push(TxnOp::put(path, bytes, None));
                }
                None => {
                    if w.expect == Expect::Any {
                        compares.push(Compare::create_revision(
                            path.clone(),
                            CompareOp::Greater,
                            0,
                        ));
                    }
                    ops.push(TxnOp::delete(path, None));
                }
            }
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let send = || {
            let (mut kv, txn) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        };
        let mut wait = RESEND_AFTER;
        let mut tries = 0;
        let resp = loop {
            match reaching(false, send).await {
                Ok(r) => break r,
                // Its leader lost: committed or not, a read tells; if not, it is sent again
                // (its preconditions still guard it).
                Err(e) if unknown(&e) && tries < RESENDS => {
                    tracing::warn!(error = %e, "an etcd write's outcome is unknown; reading it back");
                    tries += 1;
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    if let Some(revision) = self.applied(&writes).await? {
                        return Ok(revision);
                    }
                }
                Err(e) => return Err(backend(e)),
            }
        };
        if resp.succeeded() {
            return Ok(resp.header().map(|h| h.revision()).unwrap_or(0) as u64);
        }
        // Find which precondition failed, to say so. The answer can be stale by now; the
        // refusal itself was atomic.
        for w in &writes {
            let found = self.get(&w.key).await?.map(|o| o.version);
            check(&w.key, w.expect, found, w.doc.is_none())?;
        }
        Err(StoreError::Conflict {
            key: writes[0].key.clone(),
            expected: "the batch's preconditions".into(),
            found: "a concurrent change".into(),
        })
    }

    pub(crate) async fn list_and_watch(&self) -> Result<(Listing, Watch), StoreError> {
        let listing = self.list().await?;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(listing.revision as i64 + 1);
        let mut stream = reaching(true, || {
            let (mut w, opts) = (self.client.watch_client(), Some(opts.clone()));
            async move { w.watch(self.prefix.as_str(), opts).await }
        })
        .await
        .map_err(backend)?;
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) | Err(_) => break,
                };
                if resp.canceled() || resp.compact_revision() > 0 {
                    break;
                }
                // One response can hold several revisions; a watcher sees one batch each.
                let mut batch: Option<Change> = None;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let rev = kv.mod_revision() as u64;
                    let event = match ev.event_type() {
                        EventType::Put => match this.object(kv) {
                            Ok(o) => Event::Put(o),
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        },
                        EventType::Delete => {
                            match kv
                                .key_str()
                                .ok()
                                .and_then(|k| k.strip_prefix(&this.prefix))
                                .and_then(Key::decode)
                            {
                                Some(k) => Event::Delete(k),
                                None => continue,
                            }
                        }
                    };
                    match &mut batch {
                        Some(c) if c.revision == rev => c.events.push(event),
                        _ => {
                            if let Some(done) = batch.take() {
                                if tx.send(Ok(done)).await.is_err() {
                                    return;
                                }
                            }
                            batch = Some(Change {
                                revision: rev,
                                events: vec![event],
                            });
                        }
                    }
                }
                if let Some(done) = batch {
                    if tx.send(Ok(done)).await.is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(Err(StoreError::WatchLost)).await;
        });
        Ok((listing, Watch { rx }))
    }
}
