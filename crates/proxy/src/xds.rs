//! The proxy as an xDS client: one ADS stream (state of the world) to one of several control
//! planes, subscribed to the Trellis bundle.
//!
//! Each bundle goes to the proxy's run loop, which translates it with the same code as a static
//! file and swaps it in, or refuses it. The answer goes back as an ACK, or a NACK whose
//! `error_detail` is the refusal (file:line:field), while the previous config keeps serving.
//! When the stream breaks, the proxy keeps its last good config and reconnects with jittered
//! exponential back-off, trying the next control plane each time.

use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use trellis_xds::{
    envoy_types::pb::{
        envoy::service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DiscoveryRequest, DiscoveryResponse,
        },
        google::rpc::Status as RpcStatus,
    },
    ProxyBundle, BUNDLE_TYPE,
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
}

/// A bundle to apply; the run loop answers on `done`.
pub struct Update {
    /// The control plane's version.
    pub version: String,
    /// The bundle.
    pub bundle: ProxyBundle,
    /// Which control plane sent it.
    pub server: String,
    /// `Ok` to ACK, `Err(reason)` to NACK.
    pub done: oneshot::Sender<Result<(), String>>,
}

const INVALID_ARGUMENT: i32 = 3;

/// Follow the control planes until `updates` is closed.
pub async fn run(opts: XdsOptions, updates: mpsc::Sender<Update>) {
    let mut backoff = Duration::from_millis(50);
    let mut acked = String::new();
    for i in 0usize.. {
        if updates.is_closed() {
            return;
        }
        let server = &opts.servers[i % opts.servers.len()];
        match session(&opts, server, &mut acked, &updates).await {
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

/// One stream. `Ok` when the proxy is stopping; `Err((why, whether a response arrived))`.
async fn session(
    opts: &XdsOptions,
    server: &str,
    acked: &mut String,
    updates: &mpsc::Sender<Update>,
) -> Result<(), (String, bool)> {
    let fail = |e: String| (e, false);
    let endpoint = tonic::transport::Endpoint::from_shared(server.to_string())
        .map_err(|e| fail(format!("bad xds URL: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| fail(format!("connect: {e}")))?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(4);
    let node = trellis_xds::node(&opts.node_id, opts.workload.as_deref());
    let first = DiscoveryRequest {
        node: Some(node),
        type_url: BUNDLE_TYPE.into(),
        version_info: acked.clone(),
        ..Default::default()
    };
    tx.send(first).await.map_err(|_| fail("closed".into()))?;
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| fail(format!("open stream: {e}")))?
        .into_inner();
    tracing::info!(%server, "xds stream open");
    let mut got = false;
    loop {
        let resp: DiscoveryResponse = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(("closed by the control plane".into(), got)),
            Err(e) => return Err((format!("{e}"), got)),
        };
        got = true;
        if resp.type_url != BUNDLE_TYPE {
            continue;
        }
        let result = match resp.resources.as_slice() {
            [any] if any.type_url == BUNDLE_TYPE => ProxyBundle::decode(any.value.as_slice())
                .map_err(|e| format!("undecodable bundle: {e}")),
            other => Err(format!(
                "expected one bundle, got {} resources",
                other.len()
            )),
        };
        let result = match result {
            Ok(bundle) => {
                let (done, answer) = oneshot::channel();
                let update = Update {
                    version: resp.version_info.clone(),
                    bundle,
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
        let ack = match result {
            Ok(()) => {
                *acked = resp.version_info.clone();
                DiscoveryRequest {
                    type_url: BUNDLE_TYPE.into(),
                    version_info: acked.clone(),
                    response_nonce: resp.nonce,
                    ..Default::default()
                }
            }
            Err(reason) => {
                tracing::warn!(%server, version = %resp.version_info, %reason, "config rejected (NACK); still serving the previous one");
                DiscoveryRequest {
                    type_url: BUNDLE_TYPE.into(),
                    version_info: acked.clone(),
                    response_nonce: resp.nonce,
                    error_detail: Some(RpcStatus {
                        code: INVALID_ARGUMENT,
                        message: reason,
                        details: Vec::new(),
                    }),
                    ..Default::default()
                }
            }
        };
        if tx.send(ack).await.is_err() {
            return Err(("request stream closed".into(), got));
        }
    }
}
