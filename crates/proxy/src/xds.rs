//! The proxy as an xDS client: one incremental (delta) ADS stream to one of several control
//! planes. A proxy that serves a workload subscribes to no name in particular and the control
//! plane sends what that workload needs; it subscribes to `Service/NAMESPACE/NAME` for a
//! Service asked for on demand ([`crate::demand`]) and unsubscribes to release it. A proxy
//! without a workload gets every document (wildcard).
//!
//! The client keeps the documents it was sent, parsed. After each response the whole set goes
//! to the proxy's run loop, which translates it with the same code as a static file and swaps
//! it in, or refuses it. The answer goes back as an ACK, or a NACK whose `error_detail` is the
//! refusal (file:line:field), while the previous config keeps serving. The refused documents
//! stay in the set, so that the change that fixes them applies on top. A large update (the
//! first sync in a big mesh) comes in parts: a part whose version ends with
//! [`PARTIAL_SUFFIX`] is kept and acknowledged, and the set is applied at the last part, so
//! the proxy never runs half of an update. When the stream
//! breaks, the proxy keeps its last good config and reconnects with jittered exponential
//! back-off, trying the next control plane each time, and tells the new one which document
//! versions it has, so that only differences are sent.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use trellis_model::{NamespacedName, Resource};

use crate::demand::{resource_name, service_of, Ask, Demand};
use trellis_xds::{
    envoy_types::pb::{
        envoy::service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
        },
        google::rpc::Status as RpcStatus,
    },
    Document, DOCUMENT_TYPE, PARTIAL_SUFFIX,
};

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct XdsOptions {
    /// Control planes' xDS URLs (`http://HOST:PORT`), tried in turn.
    pub servers: Vec<String>,
    /// Node id.
    pub node_id: String,
    /// `NAMESPACE/NAME` of the served workload.
    pub workload: Option<String>,
    /// This proxy's identity: required for `https://` servers, whose xDS is mutual TLS.
    pub identity: Option<Arc<arc_swap::ArcSwap<crate::credentials::Credentials>>>,
}

/// A resource set to apply; the run loop answers on `done`.
pub struct Update {
    /// The control plane's version.
    pub version: String,
    /// Every document the control plane sent, parsed (shared with the client's copy: the
    /// update costs the request thread no deep copy of the mesh).
    pub resources: Vec<Arc<Resource>>,
    /// When every document that changed since the previous update is a Workload: their
    /// names (changed, added or removed). `None` when anything else changed.
    pub workloads_only: Option<HashSet<NamespacedName>>,
    /// Which control plane sent it.
    pub server: String,
    /// `Ok` to ACK, `Err(reason)` to NACK.
    pub done: oneshot::Sender<Result<(), String>>,
}

const INVALID_ARGUMENT: i32 = 3;

/// On-demand discovery's side of the client: whom to tell of absent names, and what it asks.
pub(crate) type OnDemand = (Arc<Demand>, mpsc::UnboundedReceiver<Ask>);

/// Follow the control planes until `updates` is closed, publishing the connection of each
/// stream on `link` (the reporter pushes on it) while the stream is open.
pub(crate) async fn run(
    opts: XdsOptions,
    updates: mpsc::Sender<Update>,
    link: tokio::sync::watch::Sender<Option<crate::control_link::Control>>,
    mut demand: Option<OnDemand>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut docs = Docs::new();
    for i in 0usize.. {
        if updates.is_closed() {
            return;
        }
        let server = &opts.servers[i % opts.servers.len()];
        let r = session(&opts, server, &mut docs, &updates, &link, &mut demand).await;
        link.send_replace(None);
        match r {
            Ok(()) => return,
            Err((e, got_response)) => {
                if got_response {
                    backoff = Duration::from_millis(50);
                }
                tracing::warn!(%server, error = %e, retry_in_ms = backoff.as_millis() as u64, "xds stream lost; serving the last good config");
            }
        }
        // Full jitter keeps a fleet from reconnecting in lockstep.
        let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The documents held: name → (version, parsed resource).
type Docs = BTreeMap<String, (String, Arc<Resource>)>;

fn parse(
    name: &str,
    r: &trellis_xds::envoy_types::pb::envoy::service::discovery::v3::Resource,
) -> Result<Resource, String> {
    let any = r
        .resource
        .as_ref()
        .ok_or_else(|| format!("{name}: no resource"))?;
    if any.type_url != DOCUMENT_TYPE {
        return Err(format!("{name}: unexpected type {}", any.type_url));
    }
    let doc = Document::decode(any.value.as_slice()).map_err(|e| format!("{name}: {e}"))?;
    let mut rs = trellis_model::parse_documents(name, &doc.yaml).map_err(|e| e.to_string())?;
    match rs.len() {
        1 => Ok(rs.remove(0)),
        n => Err(format!("{name}: expected one document, got {n}")),
    }
}

/// What changed since the last update the proxy was given: Workloads by name, or anything.
#[derive(Default)]
struct Changes(Option<HashSet<NamespacedName>>);

impl Changes {
    fn none() -> Self {
        Self(Some(HashSet::new()))
    }

    fn note(&mut self, r: &Resource) {
        match (&mut self.0, r.kind()) {
            (Some(w), "Workload") => drop(w.insert(r.id())),
            _ => self.0 = None,
        }
    }
}

/// Apply one response to `docs`, noting what changed; the error says which document did not
/// parse (nothing is changed then).
fn merge(
    docs: &mut Docs,
    resp: &DeltaDiscoveryResponse,
    changes: &mut Changes,
) -> Result<(), String> {
    let mut parsed = Vec::with_capacity(resp.resources.len());
    for r in &resp.resources {
        parsed.push((
            r.name.clone(),
            r.version.clone(),
            Arc::new(parse(&r.name, r)?),
        ));
    }
    for n in &resp.removed_resources {
        // A name not held: one subscribed to that does not exist.
        if let Some((_, r)) = docs.remove(n) {
            changes.note(&r);
        }
    }
    for (n, v, r) in parsed {
        changes.note(&r);
        if let Some((_, old)) = docs.insert(n, (v, r)) {
            // A document that changed kind or name is not an endpoint update.
            changes.note(&old);
        }
    }
    Ok(())
}

/// One stream. `Ok` when the proxy is stopping; `Err((why, whether a response arrived))`.
async fn session(
    opts: &XdsOptions,
    server: &str,
    docs: &mut Docs,
    updates: &mpsc::Sender<Update>,
    link: &tokio::sync::watch::Sender<Option<crate::control_link::Control>>,
    demand: &mut Option<OnDemand>,
) -> Result<(), (String, bool)> {
    let fail = |e: String| (e, false);
    let uri: http::Uri = server
        .parse()
        .map_err(|e| fail(format!("bad xds URL: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| fail("bad xds URL: no host:port".into()))?
        .to_string();
    // The channel speaks HTTP/2 to http://AUTHORITY; for https:// the connector below puts
    // mutual TLS under it.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| fail(format!("bad xds URL: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = if uri.scheme_str() == Some("https") {
        let creds = opts.identity.clone().ok_or_else(|| {
            fail("xDS over TLS (https://) needs this proxy's identity: give --state-dir and --join-token".into())
        })?;
        endpoint
            .connect_with_connector(crate::control_link::ControlConnector {
                authority: authority.clone(),
                creds,
            })
            .await
    } else {
        endpoint.connect().await
    }
    .map_err(|e| fail(format!("connect: {e}")))?;
    link.send_replace(Some(crate::control_link::Control {
        channel: channel.clone(),
        authority,
    }));
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(4);
    let node = trellis_xds::node(&opts.node_id, opts.workload.as_deref());
    let first = DeltaDiscoveryRequest {
        node: Some(node),
        type_url: DOCUMENT_TYPE.into(),
        initial_resource_versions: docs
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect(),
        // What was asked for on demand, asked again of this control plane.
        resource_names_subscribe: demand
            .as_ref()
            .map(|(d, _)| d.asked().iter().map(resource_name).collect())
            .unwrap_or_default(),
        ..Default::default()
    };
    tx.send(first).await.map_err(|_| fail("closed".into()))?;
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| fail(format!("open stream: {e}")))?
        .into_inner();
    tracing::info!(%server, "xds stream open");
    let mut got = false;
    // A new stream may resend anything: its first update is applied whole.
    let mut changes = Changes::default();
    loop {
        let asked = async {
            match demand.as_mut() {
                Some((_, asks)) => asks.recv().await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            m = inbound.message() => m,
            Some(ask) = asked => {
                let (sub, unsub) = match ask {
                    Ask::Subscribe(id) => (vec![resource_name(&id)], Vec::new()),
                    Ask::Unsubscribe(id) => (Vec::new(), vec![resource_name(&id)]),
                };
                let req = DeltaDiscoveryRequest {
                    type_url: DOCUMENT_TYPE.into(),
                    resource_names_subscribe: sub,
                    resource_names_unsubscribe: unsub,
                    ..Default::default()
                };
                if tx.send(req).await.is_err() {
                    return Err(("request stream closed".into(), got));
                }
                continue;
            }
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Err(("closed by the control plane".into(), got)),
            Err(e) => return Err((format!("{e}"), got)),
        };
        got = true;
        if resp.type_url != DOCUMENT_TYPE {
            continue;
        }
        if let Some((d, _)) = demand.as_ref() {
            for id in resp.removed_resources.iter().filter_map(|n| service_of(n)) {
                d.absent(&id);
            }
        }
        let result = match merge(docs, &resp, &mut changes) {
            Ok(()) if resp.system_version_info.ends_with(PARTIAL_SUFFIX) => Ok(()),
            Ok(()) => {
                let (done, answer) = oneshot::channel();
                let update = Update {
                    version: resp.system_version_info.clone(),
                    resources: docs.values().map(|(_, r)| r.clone()).collect(),
                    workloads_only: std::mem::replace(&mut changes, Changes::none()).0,
                    server: server.to_string(),
                    done,
                };
                if updates.send(update).await.is_err() {
                    return Ok(());
                }
                answer.await.unwrap_or(Err("proxy stopping".into()))
            }
            Err(e) => Err(e),
        };
        let error_detail = match result {
            Ok(()) => None,
            Err(reason) => {
                tracing::warn!(%server, version = %resp.system_version_info, %reason, "config rejected (NACK); still serving the previous one");
                Some(RpcStatus {
                    code: INVALID_ARGUMENT,
                    message: reason,
                    details: Vec::new(),
                })
            }
        };
        let answer = DeltaDiscoveryRequest {
            type_url: DOCUMENT_TYPE.into(),
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        };
        if tx.send(answer).await.is_err() {
            return Err(("request stream closed".into(), got));
        }
    }
}

/// Two delta responses from `data` (the first two bytes: the first one's length), applied in
/// turn to an empty set, as the proxy applies them: each whole or not at all; and when the
/// second changes Workloads only, working out just their clusters gives what a full
/// translation gives.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn apply_for_fuzzing(data: &[u8]) {
    let json = |c: &trellis_model::ProxyConfig| serde_json::to_value(c).expect("serializes");
    let (first, second) = match data {
        [a, b, rest @ ..] => {
            rest.split_at((usize::from(*a) << 8 | usize::from(*b)).min(rest.len()))
        }
        _ => return,
    };
    let mut docs = Docs::new();
    let mut prev = None;
    for msg in [first, second] {
        let Ok(resp) = DeltaDiscoveryResponse::decode(msg) else {
            return;
        };
        let before: Vec<_> = docs
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect();
        let mut changes = Changes::none();
        if merge(&mut docs, &resp, &mut changes).is_err() {
            let after: Vec<_> = docs
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect();
            assert_eq!(before, after, "a refused update changed the documents");
            return;
        }
        let resources: Vec<Arc<Resource>> = docs.values().map(|(_, r)| r.clone()).collect();
        let full = trellis_model::translate("xds", &resources, None);
        if let (Some(prev), Some(changed)) = (&prev, &changes.0) {
            let part = trellis_model::update_workloads("xds", prev, &resources, changed);
            match (&part, &full) {
                (Ok((p, _)), Ok(f)) => {
                    assert_eq!(
                        json(p),
                        json(f),
                        "an endpoint update differs from a full one"
                    );
                }
                (Err(_), Err(_)) => {}
                (p, f) => panic!(
                    "an endpoint update gives {:?}, a full one {:?}",
                    p.as_ref().err(),
                    f.as_ref().err()
                ),
            }
        }
        let Ok(full) = full else { return };
        prev = Some(full);
    }
}
