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

use serde::Deserialize;
use serde_json::{json, Value};
use trellis_identity::{join, SpiffeId};
use trellis_store::{Expect, Key, Store, StoreError, Write};

use crate::{
    apply::{ApplyError, Writer},
    catalog::{health_key, Health},
    error::ControlError,
    identity::Identity,
    registry::Registry,
    replicas::Replicas,
};

/// Heartbeat intervals an agent may miss before its Workload is marked unhealthy.
pub(crate) const MISSED: u32 = 3;
/// How old a request may be.
const MAX_AGE: u64 = 120;

/// A signed agent request, as it arrives.
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
    /// Checks that passed after failing, counted by the agent (heartbeat).
    #[serde(default)]
    recoveries: u64,
    /// How often heartbeats come.
    #[serde(default = "default_interval")]
    interval_ms: u64,
    /// Deregister: answer once the proxies connected here and to the other replicas have
    /// applied the removal, waiting at most this long (capped at [`MAX_LEAVE_WAIT`]).
    #[serde(default)]
    wait_ms: u64,
}

/// The longest a deregistration waits for the proxies to take it.
const MAX_LEAVE_WAIT: Duration = Duration::from_secs(10);

/// Wait until no proxy connected to this replica is behind revision `rev` (a proxy serving
/// the leaving Workload `workload`, `NAMESPACE/NAME`, itself aside, and any that stopped
/// answering), or `wait` passed; the count still behind.
pub(crate) async fn until_applied(
    proxies: &Registry,
    rev: u64,
    workload: &str,
    wait: Duration,
) -> usize {
    let deadline = Instant::now() + wait.min(MAX_LEAVE_WAIT);
    loop {
        let behind = proxies.behind(rev, workload);
        if behind == 0 || Instant::now() >= deadline {
            return behind;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Why an agent's request was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Its signature, certificate or age did not check out.
    #[error("{0}")]
    Unauthorized(String),
    /// It speaks for a Workload of another identity.
    #[error("{0}")]
    Forbidden(String),
    /// A heartbeat for a Workload the control plane does not have.
    #[error("{0}")]
    NotRegistered(String),
    /// The Workload it registers is not valid.
    #[error(transparent)]
    Invalid(#[from] ApplyError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA could not be read.
    #[error(transparent)]
    Setup(#[from] ControlError),
}

/// Agents this replica has heard from: when each must be heard from again; and the proofs
/// of the requests it took, so that none is taken twice.
#[derive(Clone, Default)]
pub(crate) struct Agents {
    inner: Arc<Mutex<HashMap<Key, Tracked>>>,
    proofs: Arc<Mutex<Proofs>>,
    /// Proof records this replica wrote to the store, with when (Unix seconds) each may go.
    recorded: Arc<Mutex<std::collections::VecDeque<(u64, Key)>>>,
}

/// The store records of register and deregister proofs, `_AgentProof/trellis-system/R`
/// (`R` the signature's r, hex): with replicas on a shared store, a request one of them took
/// is refused by every other. A heartbeat is remembered only by the replica that took it: a
/// replayed one restates a health verdict its agent's next heartbeat sets again, and a
/// store write per heartbeat (10,000 agents every 5 s) would cost every replica's watch.
const PROOF_KIND: &str = "_AgentProof";

/// Signatures of the requests taken within their age limit: a request sent again as it was
/// (replayed by whoever saw it) is refused. ECDSA signatures are randomized, so an agent's
/// own retry, signed again, is a new one.
#[derive(Default)]
struct Proofs {
    hasher: std::collections::hash_map::RandomState,
    seen: std::collections::HashSet<u64>,
    order: std::collections::VecDeque<(Instant, u64)>,
}

/// Most proofs remembered (8 bytes each, twice): a fleet of 10,000 agents sending every
/// second fills it in 100 s, more than the age limit's window at usual intervals.
const MAX_PROOFS: usize = 1_000_000;

impl Proofs {
    /// Whether `proof` is new (and remember it).
    fn first_use(&mut self, proof: &[u8], now: Instant) -> bool {
        use std::hash::BuildHasher;
        // A request is taken up to MAX_AGE on either side of its time stamp.
        let keep = Duration::from_secs(2 * MAX_AGE + 1);
        while let Some(&(at, h)) = self.order.front() {
            if now.duration_since(at) <= keep && self.order.len() < MAX_PROOFS {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&h);
        }
        let h = self.hasher.hash_one(proof);
        if !self.seen.insert(h) {
            return false;
        }
        self.order.push_back((now, h));
        true
    }
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

    /// Whether the request signed by `proof` was not taken before.
    fn first_use(&self, proof: &[u8]) -> bool {
        let mut p = self.proofs.lock().expect("proofs lock");
        p.first_use(proof, Instant::now())
    }

    /// Whether no replica on `store` took the request signed by `proof` (its r) before, time
    /// stamped `ts`; recorded if not. The record outlives the request's age limit and is then
    /// removed by this replica, with its next record (one left by a replica that stopped
    /// stays: a few bytes).
    async fn first_use_everywhere(
        &self,
        store: &Store,
        proof: &[u8],
        ts: u64,
    ) -> Result<bool, StoreError> {
        let now = join::unix(SystemTime::now());
        let key = Key::new(PROOF_KIND, "trellis-system", &join::hex(proof));
        let until = ts + MAX_AGE + 1;
        let record = Write {
            key: key.clone(),
            doc: Some(json!({ "until": until })),
            expect: Expect::Absent,
        };
        match store.write(vec![record]).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        // Those written before whose requests are now too old to be taken anywhere (in the
        // order written: one recorded for a later time stamp waits for the next round).
        let expired: Vec<Key> = {
            let mut r = self.recorded.lock().expect("recorded lock");
            let n = r.iter().take_while(|(u, _)| *u < now).count();
            let expired = r.drain(..n).map(|(_, k)| k).collect();
            r.push_back((until, key));
            expired
        };
        for k in expired {
            let gone = Write {
                key: k,
                doc: None,
                expect: Expect::Any,
            };
            if let Err(e) = store.write(vec![gone]).await {
                tracing::debug!(error = %e, "an agent proof record was not removed");
            }
        }
        Ok(true)
    }

    fn forget(&self, key: &Key) {
        self.inner.lock().expect("agents lock").remove(key);
    }

    /// Workloads whose agent is silent now, and for how long past its deadline.
    pub(crate) fn silent(&self) -> Vec<(Key, Duration)> {
        let now = Instant::now();
        let m = self.inner.lock().expect("agents lock");
        let mut v: Vec<(Key, Duration)> = m
            .iter()
            .filter(|(_, t)| t.deadline <= now)
            .map(|(k, t)| (k.clone(), now - t.deadline + t.interval * MISSED))
            .collect();
        v.sort();
        v
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

/// Verify a signed request and carry it out: its certificate, from the mesh's CA, names the
/// identity it speaks for.
pub(crate) async fn handle(
    writer: &Writer,
    identity: &Identity,
    agents: &Agents,
    proxies: &Registry,
    replicas: Option<&Replicas>,
    env: Envelope,
) -> Result<Value, AgentError> {
    let proof =
        join::unhex(&env.proof).ok_or_else(|| AgentError::BadRequest("proof: not hex".into()))?;
    let ca = identity.ca(writer.store()).await?;
    let id = ca
        .verify_holder(&env.certificate, env.request.as_bytes(), &proof)
        .map_err(|e| {
            tracing::warn!(error = %e, "agent request refused");
            AgentError::Unauthorized(e.to_string())
        })?;
    let req: Request = serde_json::from_str(&env.request)
        .map_err(|e| AgentError::BadRequest(format!("request: {e}")))?;
    let now = join::unix(SystemTime::now());
    if req.ts.abs_diff(now) > MAX_AGE {
        return Err(AgentError::Unauthorized(
            "request too old (or the clocks differ by over two minutes)".into(),
        ));
    }
    // By the signature's r: the same request with `s` replaced by `n − s` verifies as well
    // (ECDSA is malleable) and must count as the same.
    let proof_id = trellis_identity::proof_id(&proof).unwrap_or(&proof);
    if !agents.first_use(proof_id) {
        tracing::warn!(%id, "agent request replayed; refused");
        return Err(AgentError::Unauthorized(
            "replayed request: this signature was used before".into(),
        ));
    }
    if replicas.is_some() && req.op != Op::Heartbeat {
        let first = agents
            .first_use_everywhere(writer.store(), proof_id, req.ts)
            .await?;
        if !first {
            tracing::warn!(%id, "agent request replayed to another replica; refused");
            return Err(AgentError::Unauthorized(
                "replayed request: this signature was used before".into(),
            ));
        }
    }
    let key = Key::new("Workload", &id.namespace, &req.name);
    // What this replica follows of the store: a heartbeat costs no store read.
    let stored = writer.followed(&key);
    // An agent speaks only for Workloads of its own identity.
    if let Some(o) = &stored {
        let owner = o["spec"]["identity"].as_str().unwrap_or_default();
        if owner != id.identity {
            return Err(AgentError::Forbidden(format!(
                "Workload {}/{} belongs to identity {owner:?}, not {id}",
                id.namespace, req.name
            )));
        }
    }
    match req.op {
        Op::Register => register(writer, agents, &id, &req, &key).await?,
        Op::Heartbeat => {
            if stored.is_none() {
                return Err(AgentError::NotRegistered(format!(
                    "Workload {}/{} is not registered",
                    id.namespace, req.name
                )));
            }
            agents.heard(&key, interval(&req));
            let known = writer.followed_health(&key);
            let recoveries = known.map_or(0, |h| h.recoveries);
            if known.map(|h| h.healthy) != Some(req.healthy) || recoveries < req.recoveries {
                let health = Health {
                    healthy: req.healthy,
                    recoveries: req.recoveries.max(recoveries),
                };
                set_health(writer.store(), &key, health, "agent").await?;
            }
        }
        Op::Deregister => {
            let rev = match stored {
                Some(_) => Some(writer.delete(key.clone(), Expect::Any).await?),
                None => None,
            };
            // Its health record goes with it (after: callers stop at the Workload's removal).
            let forget = Write {
                key: health_key(&key),
                doc: None,
                expect: Expect::Any,
            };
            if let Err(e) = writer.store().write(vec![forget]).await {
                tracing::warn!(workload = %key, error = %e, "could not remove the health record");
            }
            agents.forget(&key);
            tracing::info!(workload = %key, %id, "agent deregistered its workload");
            if let Some(rev) = rev.filter(|_| req.wait_ms > 0) {
                // The proxies of every replica: callers connected to another one send to
                // the leaving workload as long as theirs have not taken the removal.
                let wait = Duration::from_millis(req.wait_ms).min(MAX_LEAVE_WAIT);
                let workload = format!("{}/{}", key.namespace, key.name);
                let elsewhere = async {
                    match replicas {
                        Some(r) => r.behind(rev, &workload, wait).await,
                        None => (0, 0),
                    }
                };
                let (here, (there, unreachable)) =
                    tokio::join!(until_applied(proxies, rev, &workload, wait), elsewhere);
                let mut out =
                    json!({ "ok": true, "workload": key.to_string(), "behind": here + there });
                if unreachable > 0 {
                    out["unreachableReplicas"] = unreachable.into();
                }
                return Ok(out);
            }
        }
    }
    Ok(json!({ "ok": true, "workload": key.to_string() }))
}

fn interval(req: &Request) -> Duration {
    Duration::from_millis(req.interval_ms.clamp(100, 600_000))
}

/// Register the agent's Workload: in its identity's namespace, with its identity, unhealthy
/// until its checks pass (a re-registration keeps the health known). The document is
/// checked and written as an apply of it would be, typed (no text round trip).
async fn register(
    writer: &Writer,
    agents: &Agents,
    id: &SpiffeId,
    req: &Request,
    key: &Key,
) -> Result<(), AgentError> {
    let mut spec = req.spec.clone().unwrap_or_else(|| json!({}));
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| AgentError::BadRequest("spec: not an object".into()))?;
    obj.insert("identity".into(), json!(id.identity));
    // Health is a record of its own, written before the Workload: unhealthy until its checks
    // pass, so that no caller is sent to it before; a re-registration keeps what is known.
    if writer.followed_health(key).is_none() {
        let first = Write {
            key: health_key(key),
            doc: Some(json!(Health {
                healthy: false,
                recoveries: 0
            })),
            expect: Expect::Absent,
        };
        match writer.store().write(vec![first]).await {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
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
    let file = format!("agent:{}/{}", id.namespace, req.name);
    let resource = trellis_model::resource_from_json(&file, &doc)
        .map_err(|e| AgentError::Invalid(e.into()))?;
    writer.apply_documents(&file, vec![(resource, doc)]).await?;
    agents.heard(key, interval(req));
    tracing::info!(workload = %key, %id, "agent registered its workload");
    Ok(())
}

/// Write Workload `key`'s health record (compare-and-swap on its version: a concurrent
/// change wins, and the next heartbeat tries again). The Workload itself is not written: a
/// health change is no change of the resource.
async fn set_health(store: &Store, key: &Key, h: Health, why: &str) -> Result<(), StoreError> {
    if store.get(key).await?.is_none() {
        return Ok(());
    }
    let hk = health_key(key);
    let old = store.get(&hk).await?;
    let known: Option<Health> = old
        .as_ref()
        .and_then(|o| serde_json::from_value(o.doc.clone()).ok());
    let healthy = h.healthy;
    // The count only grows: a replica that heard an older heartbeat cannot take it back.
    let next = Health {
        healthy,
        recoveries: h.recoveries.max(known.map_or(0, |k| k.recoveries)),
    };
    if known == Some(next) {
        return Ok(());
    }
    store
        .write(vec![Write {
            key: hk,
            doc: Some(json!(next)),
            expect: old.map_or(Expect::Absent, |o| Expect::Version(o.version)),
        }])
        .await?;
    tracing::info!(workload = %key, healthy, recoveries = h.recoveries, by = why, "workload health changed");
    Ok(())
}

/// Mark the Workloads of silent agents unhealthy, for as long as this replica runs.
pub(crate) async fn sweep(agents: Agents, store: Store) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        for (key, interval) in agents.lapsed(Instant::now()) {
            tracing::warn!(workload = %key, missed = MISSED, interval_ms = interval.as_millis() as u64, "agent silent: workload marked unhealthy");
            let h = Health {
                healthy: false,
                recoveries: 0,
            };
            if let Err(e) = set_health(&store, &key, h, "missed heartbeats").await {
                tracing::warn!(workload = %key, error = %e, "could not mark the workload unhealthy");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_is_taken_once_within_the_age_window() {
        let mut p = Proofs::default();
        let t0 = Instant::now();
        assert!(p.first_use(b"sig-1", t0));
        assert!(
            !p.first_use(b"sig-1", t0 + Duration::from_secs(200)),
            "replayed"
        );
        assert!(p.first_use(b"sig-2", t0 + Duration::from_secs(1)));
        // Past both sides of the age limit, a proof is forgotten (the request's time stamp
        // refuses it by then).
        let later = t0 + Duration::from_secs(2 * MAX_AGE + 5);
        assert!(p.first_use(b"sig-3", later));
        assert_eq!(p.order.len(), 1);
        assert!(p.seen.len() == 1);
    }
}
