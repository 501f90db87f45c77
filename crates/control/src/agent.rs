//! The control plane's side of `trellis join`: agents register their Workload, report its
//! health in heartbeats, and deregister on a clean stop.
//!
//! `POST /v1/agent` (xDS address, beside `/v1/certificates`; also `/api/v1/agent`) takes
//! `{certificate, proof, request}`: `request` is a JSON string, `proof` (hex) the signature of
//! the certificate's key over it. The certificate names the agent's identity; the Workload it
//! registers is put in that identity's namespace with that identity, so an agent can speak
//! only for itself, and cannot take over a Workload of another identity. Requests older
//! than two minutes are refused.
//!
//! Health: a Workload registered by an agent starts with `spec.healthy: false`; heartbeats
//! carry the agent's verdict, and a change is written to the store (only a change: a
//! heartbeat that changes nothing costs no write). A replica that has had heartbeats from
//! an agent marks its Workload unhealthy when `MISSED` intervals pass without one. Every
//! proxy leaves unhealthy Workloads out of its endpoints.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{body::Bytes, extract::State as AxState, http::StatusCode, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_identity::join;
use trellis_store::{Expect, Key, Store, Write};

use crate::api::{Api, ApiError};

/// Heartbeat intervals an agent may miss before its Workload is marked unhealthy.
pub const MISSED: u32 = 3;
/// How old a request may be.
const MAX_AGE: u64 = 120;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Envelope {
    certificate: String,
    proof: String,
    request: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Request {
    op: Op,
    name: String,
    ts: u64,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    /// The Workload's spec (register).
    #[serde(default)]
    spec: Option<Value>,
    /// The agent's health verdict (heartbeat).
    #[serde(default)]
    healthy: bool,
    /// How often heartbeats come.
    #[serde(default = "default_interval")]
    interval_ms: u64,
}

fn default_interval() -> u64 {
    5_000
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Op {
    Register,
    Heartbeat,
    Deregister,
}

/// Agents this replica has heard from: when each must be heard from again.
#[derive(Clone, Default)]
pub struct Agents {
    inner: Arc<Mutex<HashMap<Key, Tracked>>>,
}

struct Tracked {
    deadline: Instant,
    interval: Duration,
    /// Already marked unhealthy for silence.
    lapsed: bool,
}

impl Agents {
    fn heard(&self, key: &Key, interval: Duration) {
        let mut m = self.inner.lock().expect("agents lock");
        m.insert(
            key.clone(),
            Tracked {
                deadline: Instant::now() + interval * MISSED,
                interval,
                lapsed: false,
            },
        );
    }

    fn forget(&self, key: &Key) {
        self.inner.lock().expect("agents lock").remove(key);
    }

    /// Workloads whose agent fell silent since the last sweep.
    fn lapsed(&self, now: Instant) -> Vec<(Key, Duration)> {
        let mut m = self.inner.lock().expect("agents lock");
        m.iter_mut()
            .filter(|(_, t)| !t.lapsed && t.deadline <= now)
            .map(|(k, t)| {
                t.lapsed = true;
                (k.clone(), t.interval)
            })
            .collect()
    }
}

fn bad(code: StatusCode, m: impl Into<String>) -> ApiError {
    ApiError(code, m.into())
}

/// `POST /v1/agent`.
pub(crate) async fn handle(
    AxState(api): AxState<Api>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let env: Envelope = serde_json::from_slice(&body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("body: {e}")))?;
    let proof =
        join::unhex(&env.proof).ok_or_else(|| bad(StatusCode::BAD_REQUEST, "proof: not hex"))?;
    let ca = api.identity().ca(api.store()).await?;
    let id = ca
        .verify_holder(&env.certificate, env.request.as_bytes(), &proof)
        .map_err(|e| {
            tracing::warn!(error = %e, "agent request refused");
            bad(StatusCode::UNAUTHORIZED, e.to_string())
        })?;
    let req: Request = serde_json::from_str(&env.request)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("request: {e}")))?;
    let now = join::unix(SystemTime::now());
    if req.ts.abs_diff(now) > MAX_AGE {
        return Err(bad(
            StatusCode::UNAUTHORIZED,
            "request too old (or the clocks differ by over two minutes)",
        ));
    }
    let key = Key::new("Workload", &id.namespace, &req.name);
    let interval = Duration::from_millis(req.interval_ms.clamp(100, 600_000));
    // What this replica follows of the store: a heartbeat costs no store read.
    let stored = api.followed(&key);
    // An agent speaks only for Workloads of its own identity.
    if let Some(o) = &stored {
        let owner = o["spec"]["identity"].as_str().unwrap_or_default();
        if owner != id.identity {
            return Err(bad(
                StatusCode::FORBIDDEN,
                format!(
                    "Workload {}/{} belongs to identity {owner:?}, not {id}",
                    id.namespace, req.name
                ),
            ));
        }
    }
    match req.op {
        Op::Register => {
            let mut spec = req.spec.clone().unwrap_or_else(|| json!({}));
            let obj = spec
                .as_object_mut()
                .ok_or_else(|| bad(StatusCode::BAD_REQUEST, "spec: not an object"))?;
            obj.insert("identity".into(), json!(id.identity));
            // Healthy once its checks pass; a re-registration keeps what is known.
            let was = stored
                .as_ref()
                .and_then(|o| o["spec"]["healthy"].as_bool())
                .unwrap_or(false);
            obj.insert("healthy".into(), json!(was));
            let doc = json!({
                "apiVersion": "trellis.dev/v1alpha1",
                "kind": "Workload",
                "metadata": {
                    "name": req.name,
                    "namespace": id.namespace,
                    "labels": req.labels,
                    "annotations": { "trellis.dev/agent": id.to_string() },
                },
                "spec": spec,
            });
            let yaml = serde_saphyr::to_string(&doc)
                .map_err(|e| bad(StatusCode::BAD_REQUEST, e.to_string()))?;
            let file = format!("agent:{}/{}", id.namespace, req.name);
            api.apply_text(&file, &yaml).await?;
            api.agents().heard(&key, interval);
            tracing::info!(workload = %key, %id, "agent registered its workload");
        }
        Op::Heartbeat => {
            let Some(o) = stored else {
                return Err(bad(
                    StatusCode::NOT_FOUND,
                    format!("Workload {}/{} is not registered", id.namespace, req.name),
                ));
            };
            api.agents().heard(&key, interval);
            if o["spec"]["healthy"].as_bool() != Some(req.healthy) {
                set_health(api.store(), &key, req.healthy, "agent").await?;
            }
        }
        Op::Deregister => {
            if stored.is_some() {
                api.store()
                    .write(vec![Write {
                        key: key.clone(),
                        doc: None,
                        expect: Expect::Any,
                    }])
                    .await?;
            }
            api.agents().forget(&key);
            tracing::info!(workload = %key, %id, "agent deregistered its workload");
        }
    }
    Ok(Json(json!({ "ok": true, "workload": key.to_string() })))
}

/// Write `spec.healthy` of a stored Workload (compare-and-swap on its version: a concurrent
/// change wins, and the next heartbeat tries again).
async fn set_health(store: &Store, key: &Key, healthy: bool, why: &str) -> Result<(), ApiError> {
    let Some(o) = store.get(key).await? else {
        return Ok(());
    };
    let mut doc = o.doc;
    doc["spec"]["healthy"] = json!(healthy);
    store
        .write(vec![Write {
            key: key.clone(),
            doc: Some(doc),
            expect: Expect::Version(o.version),
        }])
        .await?;
    tracing::info!(workload = %key, healthy, by = why, "workload health changed");
    Ok(())
}

/// Mark the Workloads of silent agents unhealthy, for as long as this replica runs.
pub async fn sweep(agents: Agents, store: Store) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        for (key, interval) in agents.lapsed(Instant::now()) {
            tracing::warn!(workload = %key, missed = MISSED, interval_ms = interval.as_millis() as u64, "agent silent: workload marked unhealthy");
            if let Err(e) = set_health(&store, &key, false, "missed heartbeats").await {
                tracing::warn!(workload = %key, error = %e.1, "could not mark the workload unhealthy");
            }
        }
    }
}
