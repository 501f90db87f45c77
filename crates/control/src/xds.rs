//! The ADS server (xDS v3, state of the world) and the record of every proxy's ACKs and NACKs.
//!
//! One task per stream. It answers each subscription with the current resources, pushes again
//! when the compiled state changes (and only when a type's resources really changed), and
//! follows the protocol's nonce rules: a request whose `response_nonce` is not the last one
//! sent is stale and ignored; with the last nonce it is an ACK, or a NACK when it carries
//! `error_detail`. A NACK is recorded with its reason and the previous config stays current at
//! the proxy; the next change is pushed as usual.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
};

use tokio::{net::TcpListener, sync::watch};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use trellis_xds::{
    envoy_types::pb::{
        envoy::service::discovery::v3::{
            aggregated_discovery_service_server::AggregatedDiscoveryService, DeltaDiscoveryRequest,
            DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
        google::protobuf::Any,
    },
    node_workload, Document, DOCUMENT_TYPE,
};

use crate::{catalog::Doc, registry::Registry, state::State};

mod small_buffers;

use small_buffers::AdsService;

fn document(d: &Doc) -> Any {
    trellis_xds::envoy_types::util::pack_any(Document {
        yaml: d.yaml.to_string(),
    })
}

/// Serve ADS on `l`, and `extra` (plain HTTP/2 routes) next to it.
pub(crate) async fn serve(
    state: watch::Receiver<Arc<State>>,
    proxies: Registry,
    l: TcpListener,
    extra: axum::Router,
    tls: crate::tls::Serving,
) {
    let ads = Ads {
        state,
        proxies,
        pushes: crate::delta::Permits::new(PUSHES_IN_FLIGHT),
        next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
    };
    // Plaintext only from this host: elsewhere, proxies must come over TLS.
    let plaintext = l.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let incoming = crate::tls::incoming(l, tls, plaintext);
    let routes = tonic::service::Routes::from(extra).add_service(AdsService::new(ads));
    let r = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming(incoming)
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "xds server failed");
    }
}

/// Delta updates in progress, over all streams. An update's part holds a permit until the
/// client answers it (or a second passes: a client that never answers does not hold up the
/// others, `delta::PERMIT_HOLD`), so a thousand proxies connecting at once
/// are synced a bounded number at a time, each holding the names still to send and one part
/// of at most `delta::PART_BYTES`, instead of all holding a copy of the mesh together.
const PUSHES_IN_FLIGHT: usize = 128;

struct Ads {
    state: watch::Receiver<Arc<State>>,
    proxies: Registry,
    pushes: crate::delta::Permits,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

type Out = Result<DiscoveryResponse, Status>;

/// A response on its way to the encoder, boxed (as `delta::Out`): small channel slots.
type Queued = Result<Box<DiscoveryResponse>, Status>;

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
        let out = ReceiverStream::new(rx).map(|r| r.map(|b| *b));
        Ok(Response::new(Box::pin(out)))
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
        let out = ReceiverStream::new(rx).map(|r| r.map(|b| *b));
        Ok(Response::new(Box::pin(out)))
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
    tx: tokio::sync::mpsc::Sender<Queued>,
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
        if state.compiled.serves_workload(w) {
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
                        // The client learns why (a message over the size limit, say).
                        let _ = self.tx.try_send(Err(e));
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
        self.tx.send(Ok(Box::new(resp))).await.map_err(|_| ())
    }
}
