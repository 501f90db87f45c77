//! Control-plane replicas find each other through the store, so that a fleet query on any
//! of them answers for the whole fleet.
//!
//! Each proxy reports to the replica it is connected to. Every replica on a shared store
//! (etcd) records itself (its id and the xDS address peers reach it at) in one store record,
//! refreshed every [`BEAT`]; a record not refreshed for [`STALE`] is left out, and one gone
//! for ten minutes is removed. A query gathers the other replicas' parts of the same window
//! ([`trellis_telemetry::shard::Shard`]) over their xDS address, with mutual TLS as the
//! control plane's own identity (each replica mints its client certificate from the mesh's
//! CA, which it holds), and merges them into its own: counts add and histograms merge
//! exactly. A replica that does not answer within [`ASK_TIMEOUT`] is named in the answer
//! (`x-trellis-partial`) rather than silently missing.
//!
//! Heartbeats change no resource: the store follower does not recompile for them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use prost::Message;
use serde::{Deserialize, Serialize};
use trellis_identity::{
    key_and_csr,
    tls::{client_config, control_plane_id, mesh_server_name, TlsCredentials},
};
use trellis_store::{Expect, Key, Store, StoreError, Write};
use trellis_telemetry::{load::Heard, shard::Shard};

use crate::{fleet::now_ms, identity::Identity};

/// How often a replica says it is alive.
pub(crate) const BEAT: Duration = Duration::from_secs(15);
/// A replica not heard from for this long is not asked.
const STALE: Duration = Duration::from_secs(45);
/// A replica not heard from for this long is removed from the record.
const GONE: Duration = Duration::from_secs(600);
/// How long a query waits for another replica's part.
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest part accepted from another replica.
const MAX_SHARD: usize = 256 << 20;
/// Largest list of loads accepted from another replica (100,000 workloads' beacons).
const MAX_LOADS: usize = 32 << 20;

/// The most of a refusal's body read, for its message.
const REFUSAL_READ: usize = 64 << 10;

/// How many proxies a tap session reaches (on a tap's answer, from a replica or the API).
pub(crate) const TAP_REACH: &str = "x-trellis-tap-proxies";

fn key() -> Key {
    Key::new("_Replicas", "trellis-system", "all")
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
struct Seen {
    /// `HOST:PORT` of its xDS listener.
    xds: String,
    /// When it last said it was alive (its clock, Unix ms).
    seen_ms: u64,
}

/// Another replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Peer {
    /// Its id.
    pub(crate) id: String,
    /// Its xDS address.
    pub(crate) xds: String,
}

/// Why another replica's part is missing.
#[derive(Debug, thiserror::Error)]
#[error("replica {id} at {xds}: {why}")]
pub(crate) struct Unreachable {
    id: String,
    xds: String,
    why: String,
}

/// This replica and how it reaches the others.
pub(crate) struct Replicas {
    id: String,
    xds: String,
    store: Store,
    identity: Arc<Identity>,
    /// The client configuration for other replicas, and when to mint a new certificate.
    tls: Mutex<Option<(Arc<rustls::ClientConfig>, Instant)>>,
    /// Connections to other replicas, by xDS address, kept for the asks made every second
    /// (loads for spill-over).
    conns: Mutex<BTreeMap<String, Sender>>,
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

impl Replicas {
    /// This replica, reached by the others at `xds`.
    pub(crate) fn new(store: Store, identity: Arc<Identity>, xds: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            id: format!("{:016x}", fastrand::u64(..)),
            xds: xds.to_string(),
            store,
            identity,
            tls: Mutex::new(None),
            conns: Mutex::new(BTreeMap::new()),
        })
    }

    /// Say this replica is alive, every [`BEAT`], until the process ends.
    pub(crate) async fn beat(self: Arc<Self>) {
        loop {
            if let Err(e) = self.register().await {
                tracing::warn!(error = %e, "cannot record this replica in the store; other replicas will not ask it");
            }
            tokio::time::sleep(BEAT).await;
        }
    }

    async fn read(&self) -> Result<(BTreeMap<String, Seen>, Expect), StoreError> {
        Ok(match self.store.get(&key()).await? {
            Some(o) => (
                serde_json::from_value(o.doc["replicas"].clone()).unwrap_or_default(),
                Expect::Version(o.version),
            ),
            None => (BTreeMap::new(), Expect::Absent),
        })
    }

    async fn register(&self) -> Result<(), StoreError> {
        // Replicas write the one record concurrently: read, change, write if unchanged.
        let mut tries = 0;
        loop {
            let (mut all, expect) = self.read().await?;
            let now = now_ms();
            all.retain(|_, s| now.saturating_sub(s.seen_ms) < GONE.as_millis() as u64);
            all.insert(
                self.id.clone(),
                Seen {
                    xds: self.xds.clone(),
                    seen_ms: now,
                },
            );
            let write = Write {
                key: key(),
                doc: Some(serde_json::json!({ "replicas": all })),
                expect,
            };
            match self.store.write(vec![write]).await {
                Err(StoreError::Conflict { .. }) if tries < 5 => tries += 1,
                r => return r.map(|_| ()),
            }
        }
    }

    /// The other replicas heard from lately.
    pub(crate) async fn peers(&self) -> Vec<Peer> {
        let all = match self.read().await {
            Ok((all, _)) => all,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the replicas from the store");
                return Vec::new();
            }
        };
        let now = now_ms();
        all.into_iter()
            .filter(|(id, s)| {
                *id != self.id && now.saturating_sub(s.seen_ms) < STALE.as_millis() as u64
            })
            .map(|(id, s)| Peer { id, xds: s.xds })
            .collect()
    }

    /// A client configuration as the control plane's identity, minted from the CA and kept
    /// for half the certificate's lifetime.
    async fn client_tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        if let Some((cfg, until)) = &*self.tls.lock().unwrap_or_else(|p| p.into_inner()) {
            if Instant::now() < *until {
                return Ok(cfg.clone());
            }
        }
        let ca = self
            .identity
            .ca(&self.store)
            .await
            .map_err(|e| e.to_string())?;
        let (key, csr) = key_and_csr().map_err(|e| e.to_string())?;
        let me = control_plane_id(&self.identity.trust_domain);
        let svid = ca
            .sign(&csr, &me, self.identity.svid_ttl)
            .map_err(|e| e.to_string())?;
        let creds = TlsCredentials::from_pem(&svid.chain_pem, &key, ca.trust_bundle())
            .map_err(|e| e.to_string())?;
        let cfg = client_config(&creds, vec![me], &[b"h2"]).map_err(|e| e.to_string())?;
        let until = Instant::now() + self.identity.svid_ttl / 2;
        *self.tls.lock().unwrap_or_else(|p| p.into_inner()) = Some((cfg.clone(), until));
        Ok(cfg)
    }

    /// A connection to `peer`: the one kept while it is open, else a new one (kept).
    async fn connect(&self, peer: &Peer) -> Result<Sender, String> {
        let kept = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer.xds)
            .cloned();
        if let Some(send) = kept.filter(|s| !s.is_closed()) {
            return Ok(send);
        }
        let cfg = self.client_tls().await?;
        let tcp = tokio::net::TcpStream::connect(&peer.xds)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(mesh_server_name(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(conn);
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|_, s| !s.is_closed());
        conns.insert(peer.xds.clone(), send.clone());
        Ok(send)
    }

    /// `GET path` (with its query) of `peer`'s xDS listener: the answer's body, at most
    /// `limit` bytes.
    async fn get(&self, peer: &Peer, path: &str, limit: usize) -> Result<Bytes, String> {
        let (_, body) = self.open(peer, path).await?;
        Ok(http_body_util::Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes())
    }

    /// `GET path` of `peer`'s xDS listener, answered with a stream: its headers and its body
    /// as it comes. A refusal is an error with its status and the start of its body.
    async fn open(
        &self,
        peer: &Peer,
        path: &str,
    ) -> Result<(http::HeaderMap, hyper::body::Incoming), String> {
        let mut send = self.connect(peer).await?;
        send.ready().await.map_err(|e| e.to_string())?;
        let req = http::Request::get(format!("https://{}{path}", peer.xds))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let (head, body) = resp.into_parts();
        if !status.is_success() {
            let body = http_body_util::Limited::new(body, REFUSAL_READ)
                .collect()
                .await
                .map_err(|e| format!("answered {status}; reading its body: {e}"))?
                .to_bytes();
            return Err(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ));
        }
        Ok((head.headers, body))
    }

    /// Every other replica's part of a tap session (`query`: the tap's query string): how
    /// many of its proxies would copy the session's requests, and its events as they come;
    /// those that did not answer in time, with why.
    pub(crate) async fn taps(
        &self,
        query: &str,
    ) -> (Vec<(usize, hyper::body::Incoming)>, Vec<Unreachable>) {
        let path = format!("/v1/fleet/tap?{query}");
        let peers = self.peers().await;
        self.ask_all(&peers, |p| {
            let path = &path;
            async move {
                let (headers, body) = self.open(p, path).await?;
                let reach = headers
                    .get(TAP_REACH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0);
                Ok((reach, body))
            }
        })
        .await
    }

    /// `ask` of each of `peers` at once, each within [`ASK_TIMEOUT`]: the answers, and the
    /// replicas that did not answer in time, with why.
    async fn ask_all<'a, T, F>(
        &self,
        peers: &'a [Peer],
        ask: impl Fn(&'a Peer) -> F,
    ) -> (Vec<T>, Vec<Unreachable>)
    where
        F: std::future::Future<Output = Result<T, String>> + 'a,
    {
        let asks = peers.iter().map(|p| {
            let f = ask(p);
            async move {
                let r = tokio::time::timeout(ASK_TIMEOUT, f)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {ASK_TIMEOUT:?}")));
                (p, r)
            }
        });
        let mut answers = Vec::new();
        let mut missing = Vec::new();
        for (p, r) in futures_util::future::join_all(asks).await {
            match r {
                Ok(a) => answers.push(a),
                Err(why) => missing.push(Unreachable {
                    id: p.id.clone(),
                    xds: p.xds.clone(),
                    why,
                }),
            }
        }
        (answers, missing)
    }

    /// `peer`'s part of a window (`query`: the shard endpoint's query string).
    async fn ask(&self, peer: &Peer, query: &str) -> Result<Shard, String> {
        let body = self
            .get(peer, &format!("/v1/fleet/shard?{query}"), MAX_SHARD)
            .await?;
        Shard::decode(body).map_err(|e| format!("a malformed answer: {e}"))
    }

    /// The loads every other replica heard itself lately (for spill-over); a replica that
    /// does not answer within `timeout` is left out (and logged).
    pub(crate) async fn loads(&self, timeout: Duration) -> Vec<Heard> {
        let peers = self.peers().await;
        let asks = peers.iter().map(|p| async move {
            let r = tokio::time::timeout(timeout, self.get(p, "/v1/fleet/loads", MAX_LOADS))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
                .and_then(|b| {
                    serde_json::from_slice::<Vec<Heard>>(&b)
                        .map_err(|e| format!("a malformed answer: {e}"))
                });
            (p, r)
        });
        let mut all = Vec::new();
        for (p, r) in futures_util::future::join_all(asks).await {
            match r {
                Ok(heard) => all.extend(heard),
                Err(why) => {
                    tracing::debug!(replica = %p.id, xds = %p.xds, %why, "another replica's loads missing")
                }
            }
        }
        all
    }

    /// How many proxies connected to the other replicas have not applied revision `rev`
    /// (those serving `workload` aside), each replica answering once its own are in step or
    /// `wait` passed; and how many replicas did not answer (each logged).
    pub(crate) async fn behind(&self, rev: u64, workload: &str, wait: Duration) -> (usize, usize) {
        let peers = self.peers().await;
        // A workload's namespace and name are DNS labels: nothing in them to escape.
        let path = format!(
            "/v1/fleet/behind?rev={rev}&workload={workload}&waitMs={}",
            wait.as_millis()
        );
        let asks = peers.iter().map(|p| {
            let path = &path;
            async move {
                let limit = wait + ASK_TIMEOUT;
                let r = tokio::time::timeout(limit, self.get(p, path, 1 << 10))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
                    .and_then(|b| {
                        serde_json::from_slice::<serde_json::Value>(&b)
                            .ok()
                            .and_then(|v| v["behind"].as_u64())
                            .ok_or_else(|| "a malformed answer".to_string())
                    });
                (p, r)
            }
        });
        let (mut behind, mut unreachable) = (0, 0);
        for (p, r) in futures_util::future::join_all(asks).await {
            match r {
                Ok(n) => behind += n as usize,
                Err(why) => {
                    unreachable += 1;
                    tracing::warn!(replica = %p.id, xds = %p.xds, %why, "another replica did not say whether its proxies took a deregistration");
                }
            }
        }
        (behind, unreachable)
    }

    /// Every other replica's part of a window, asked at once; those that did not answer in
    /// time, with why.
    pub(crate) async fn gather(&self, query: &str) -> (Vec<Shard>, Vec<Unreachable>) {
        let peers = self.peers().await;
        self.ask_all(&peers, |p| self.ask(p, query)).await
    }
}
