//! The ADS server (xDS v3, state of the world) and the record of every proxy's ACKs and NACKs.
//!
//! One task per stream. It answers each subscription with the current resources, pushes again
//! when the compiled state changes (and only when a type's resources really changed), and
//! follows the protocol's nonce rules: a request whose `response_nonce` is not the last one
//! sent is stale and ignored; with the last nonce it is an ACK, or a NACK when it carries
//! `error_detail`. A NACK is recorded with its reason and the previous config stays current at
//! the proxy; the next change is pushed as usual.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};
use trellis_store::Key;
use trellis_xds::{
    envoy_types::pb::{
        envoy::service::discovery::v3::{
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
        google::protobuf::Any,
    },
    node_workload, Document, DOCUMENT_TYPE,
};

use crate::{catalog::Doc, State};

fn document(d: &Doc) -> Any {
    trellis_xds::envoy_types::util::pack_any(Document {
        yaml: d.yaml.to_string(),
    })
}

/// ACK/NACK state of one resource type at one proxy.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Version last sent.
    pub sent: String,
    /// Version last acknowledged.
    pub acked: String,
    /// The last rejection, if the proxy has rejected anything since connecting.
    pub rejected: Option<Rejection>,
    /// Resources sent in the last response.
    pub resources: usize,
}

/// A NACK.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// The version the proxy refused.
    pub version: String,
    /// Its reason, as the proxy gave it.
    pub message: String,
    /// When (seconds since the epoch).
    pub at: u64,
}

/// One connected proxy.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// Node id.
    pub node: String,
    /// `NAMESPACE/NAME` of the workload it serves, if it said.
    pub workload: Option<String>,
    /// Its address as the control plane sees it.
    pub peer: Option<String>,
    /// When it connected (seconds since the epoch).
    pub connected_at: u64,
    /// Per resource type (short name: `document`, `listener`, `route`, `cluster`, `endpoint`).
    pub types: BTreeMap<String, TypeStatus>,
}

/// Every connected proxy. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<BTreeMap<u64, ProxyStatus>>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn short(type_url: &str) -> String {
    let t = type_url.rsplit('.').next().unwrap_or(type_url);
    match t {
        "Document" => "document",
        "Listener" => "listener",
        "RouteConfiguration" => "route",
        "Cluster" => "cluster",
        "ClusterLoadAssignment" => "endpoint",
        other => other,
    }
    .to_string()
}

impl Registry {
    pub(crate) fn connect(&self, id: u64, peer: Option<SocketAddr>) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(
            id,
            ProxyStatus {
                node: String::new(),
                workload: None,
                peer: peer.map(|p| p.to_string()),
                connected_at: now(),
                types: BTreeMap::new(),
            },
        );
    }

    pub(crate) fn disconnect(&self, id: u64) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&id);
    }

    /// Note what a request says about its node.
    pub(crate) fn node(
        &self,
        id: u64,
        node: &trellis_xds::envoy_types::pb::envoy::config::core::v3::Node,
    ) {
        let (nid, wl) = (node.id.clone(), node_workload(node).map(str::to_string));
        self.update(id, |p| {
            p.node = nid;
            if wl.is_some() {
                p.workload = wl;
            }
        });
    }

    /// Record an ACK (`error` is `None`) or a NACK of `version` of `type_url`.
    pub(crate) fn answer(&self, id: u64, type_url: &str, version: String, error: Option<String>) {
        let t = short(type_url);
        match error {
            Some(message) => {
                tracing::warn!(stream = id, r#type = %t, %version, reason = %message, "proxy rejected config");
                let rejected = Rejection {
                    version,
                    message,
                    at: now(),
                };
                self.update(id, |p| {
                    p.types.entry(t).or_default().rejected = Some(rejected);
                });
            }
            None => self.update(id, |p| p.types.entry(t).or_default().acked = version),
        }
    }

    /// Record a response sent.
    pub(crate) fn sent(&self, id: u64, type_url: &str, version: String, count: usize) {
        self.update(id, |p| {
            let ts = p.types.entry(short(type_url)).or_default();
            ts.sent = version;
            ts.resources = count;
        });
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyStatus)) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = m.get_mut(&id) {
            f(p);
        }
    }

    /// Every connected proxy, ordered by connection.
    pub fn snapshot(&self) -> Vec<ProxyStatus> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.values().cloned().collect()
    }

    /// Node ids of the proxies that use `key`: for a Workload, those serving it; for any
    /// other kind, every proxy that takes Trellis documents (each gets the whole mesh).
    pub fn using(&self, key: &Key) -> Vec<String> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let wl = format!("{}/{}", key.namespace, key.name);
        m.values()
            .filter(|p| {
                if key.kind == "Workload" {
                    p.workload.as_deref() == Some(wl.as_str())
                } else {
                    p.types.contains_key("document")
                }
            })
            .map(|p| p.node.clone())
            .collect()
    }
}

/// Serve ADS on `l`, and `extra` (plain HTTP/2 routes) next to it.
pub async fn serve(
    state: watch::Receiver<Arc<State>>,
    proxies: Registry,
    l: TcpListener,
    extra: axum::Router,
    tls: crate::tls::Serving,
) {
    let ads = Ads {
        state,
        proxies,
        pushes: Arc::new(tokio::sync::Semaphore::new(PUSHES_IN_FLIGHT)),
        next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
    };
    // Plaintext only from this host: elsewhere, proxies must come over TLS.
    let plaintext = l.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let incoming = crate::tls::incoming(l, tls, plaintext);
    let routes = tonic::service::Routes::from(extra).add_service(
        AggregatedDiscoveryServiceServer::new(ads).max_decoding_message_size(16 << 20),
    );
    let r = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming(incoming)
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "xds server failed");
    }
}

/// Delta updates in progress, over all streams. An update holds its permit from its first part
/// until the client answers its last (or a timeout), so a thousand proxies connecting at once
/// are synced a bounded number at a time, each holding the names still to send and one part
/// of at most `delta::PART_BYTES`, instead of all holding a copy of the mesh together.
const PUSHES_IN_FLIGHT: usize = 128;

struct Ads {
    state: watch::Receiver<Arc<State>>,
    proxies: Registry,
    pushes: Arc<tokio::sync::Semaphore>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

type Out = Result<DiscoveryResponse, Status>;

impl Ads {
    /// A new stream's id, registered as a connected proxy.
    fn open(&self, peer: Option<SocketAddr>) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.proxies.connect(id, peer);
        id
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Pin<Box<dyn Stream<Item = Out> + Send>>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let id = self.open(crate::tls::ads_peer(&req)?);
        let inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let stream = StreamTask {
            id,
            tx,
            state: self.state.clone(),
            proxies: self.proxies.clone(),
            subs: HashMap::new(),
            nonce: 0,
            workload: None,
        };
        tokio::spawn(stream.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let id = self.open(crate::tls::ads_peer(&req)?);
        let inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let stream = crate::delta::DeltaTask::new(
            id,
            self.state.clone(),
            self.proxies.clone(),
            self.pushes.clone(),
            tx,
        );
        tokio::spawn(stream.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Sub {
    names: Vec<String>,
    nonce: String,
    version: String,
    /// Hash of the last resources sent, to push only real changes.
    content: Option<u64>,
}

struct StreamTask {
    id: u64,
    tx: tokio::sync::mpsc::Sender<Out>,
    state: watch::Receiver<Arc<State>>,
    proxies: Registry,
    subs: HashMap<String, Sub>,
    nonce: u64,
    /// The workload the node serves (an Envoy sidecar), from its metadata.
    workload: Option<trellis_model::resource::NamespacedName>,
}

/// The resources of `type_url` for this stream's subscription; a sidecar (a node serving
/// `workload`) also gets the socket listeners of its workload's upstreams.
fn resources(
    state: &State,
    type_url: &str,
    names: &[String],
    workload: Option<&trellis_model::resource::NamespacedName>,
) -> Result<Vec<Any>, String> {
    if type_url == DOCUMENT_TYPE {
        return Ok(state
            .compiled
            .docs
            .iter()
            .filter(|(n, _)| {
                names.is_empty() || names.iter().any(|x| x == "*" || x.as_str() == &***n)
            })
            .map(|(_, d)| document(d))
            .collect());
    }
    let mut out = match state.compiled.mesh() {
        Ok(mesh) => crate::envoy::resources(mesh, type_url, names)?,
        Err(e) => return Err(format!("the stored resources do not translate: {e}")),
    };
    if let Some(w) = workload.filter(|_| type_url == trellis_xds::LISTENER_TYPE) {
        if state.compiled.workloads.contains_key(w) {
            let cfg = trellis_model::translate("store", &state.compiled.effective, Some(w))
                .map_err(|e| format!("workload {w} does not translate: {e}"))?;
            out.extend(crate::envoy::sidecar_listeners(&cfg, names));
        }
    }
    Ok(out)
}

impl StreamTask {
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>) {
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if self.on_request(req).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(stream = self.id, error = %e, "xds stream ended");
                        break;
                    }
                },
                changed = self.state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let types: Vec<String> = self.subs.keys().cloned().collect();
                    let mut failed = false;
                    for t in types {
                        if self.push(&t, false).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break;
                    }
                }
            }
        }
        self.proxies.disconnect(self.id);
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), ()> {
        if let Some(node) = &req.node {
            self.proxies.node(self.id, node);
            self.workload = node_workload(node).and_then(|w| w.parse().ok());
        }
        let t = req.type_url.clone();
        match self.subs.get_mut(&t) {
            None => {
                self.subs.insert(
                    t.clone(),
                    Sub {
                        names: req.resource_names.clone(),
                        nonce: String::new(),
                        version: String::new(),
                        content: None,
                    },
                );
                return self.push(&t, true).await;
            }
            Some(sub) if !req.response_nonce.is_empty() && req.response_nonce != sub.nonce => {
                // Stale: an answer to an older response. The newer one is on its way.
                return Ok(());
            }
            Some(sub) => {
                if !req.response_nonce.is_empty() {
                    let err = req.error_detail.as_ref().map(|e| e.message.clone());
                    self.proxies.answer(self.id, &t, sub.version.clone(), err);
                }
                if sub.names != req.resource_names {
                    sub.names = req.resource_names.clone();
                    return self.push(&t, true).await;
                }
            }
        }
        Ok(())
    }

    /// Send the current resources of `t`, unless they are what was last sent (and `force` is
    /// off).
    async fn push(&mut self, t: &str, force: bool) -> Result<(), ()> {
        let state = self.state.borrow_and_update().clone();
        let Some(sub) = self.subs.get_mut(t) else {
            return Ok(());
        };
        let res = match resources(&state, t, &sub.names, self.workload.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(r#type = t, error = %e, "cannot build resources; keeping the last ones");
                return Ok(());
            }
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for a in &res {
            a.type_url.hash(&mut h);
            a.value.hash(&mut h);
        }
        let content = h.finish();
        if !force && sub.content == Some(content) {
            return Ok(());
        }
        self.nonce += 1;
        sub.nonce = self.nonce.to_string();
        sub.version = state.compiled.revision.to_string();
        sub.content = Some(content);
        let (version, nonce, count) = (sub.version.clone(), sub.nonce.clone(), res.len());
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            resources: res,
            type_url: t.to_string(),
            nonce,
            ..Default::default()
        };
        self.proxies.sent(self.id, t, version, count);
        self.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}
