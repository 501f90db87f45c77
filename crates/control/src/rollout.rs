//! Progressive delivery (`kind: Rollout`, `trellis shift`): the control plane moves a
//! Service's traffic from its stable backend to a canary step by step, and rolls it back on
//! its own.
//!
//! A Rollout's progress (its phase, step, the canary's weight now, when the step began, what
//! happened) is a record of the control plane's own in the store (`_Rollout/NS/NAME`), so it
//! survives the CLI exiting and the control plane restarting: a restarted replica resumes the
//! step where it was. Once a second each replica, for each progressing rollout:
//!
//! - reads the whole fleet's window since the step began (its own reports and the other
//!   replicas' parts) and judges the step ([`judge`]): the canary's workloads against the
//!   stable's, as their own proxies saw them answer;
//! - on a clear regression (error rate or median latency), at once: every route back to the
//!   stable backend in one write (or the weights held, with `onFailure: Pause`);
//! - with `spec.mirror`, a dark stage comes first: the canary's weight stays 0 and the
//!   rollout's rules copy that share of their requests to it (`RequestMirror`, answers
//!   discarded); the canary's proxy reports the copies it served as any request, so the
//!   stage is judged as a step is, and the canary answers no user before it passes;
//! - past the step's interval with the minimum sample and within the bounds: the next step's
//!   weight, or, after the last step, everything to the canary (succeeded);
//! - otherwise the step holds, saying why ("not enough traffic: …"): a step never passes
//!   without its sample, however long traffic stays away.
//!
//! Each transition writes the routes' weights and the record together, the record at the
//! version it was read at: of two replicas deciding at once, one writes and the other's
//! write is refused and forgotten. A rollout whose spec changes starts again from its first
//! step; one deleted leaves the weights as they are, but takes its dark stage's copies
//! away (a mirror nobody judges any more would go on loading the canary unseen).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_model::{
    resource::{NamespacedName, OnFailure, RolloutSpec, Spec},
    Resource,
};
use trellis_store::{Expect, Key, StoreError, Write};

use crate::{
    apply::{ApplyError, Writer},
    fleet::{now_ms, Fleet},
    replicas::Replicas,
    state::State,
};

mod judge;
pub(crate) use judge::{Side, Verdict};

/// How often rollouts are looked at.
const EVERY: Duration = Duration::from_secs(1);
/// Changes kept per rollout.
const HISTORY: usize = 50;

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Phase {
    /// Its steps are under way.
    Progressing,
    /// Held by an operator, or by a failed analysis with `onFailure: Pause`.
    Paused,
    /// The canary takes all the traffic.
    Succeeded,
    /// A failed analysis sent all the traffic back to the stable backend.
    RolledBack,
    /// An operator sent all the traffic back to the stable backend.
    Aborted,
}

/// A rollout's progress, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Progress {
    /// The spec it runs (a changed spec starts again).
    spec: Value,
    phase: Phase,
    step: usize,
    /// The canary's percent now.
    weight: u32,
    /// In the dark stage (before the first step): copies only.
    #[serde(default)]
    dark: bool,
    step_started_ms: u64,
    /// Why it is paused or ended.
    #[serde(default)]
    reason: String,
    #[serde(default)]
    history: Vec<Change>,
}

impl Progress {
    fn note(&mut self, what: &str, detail: String) {
        self.history.push(Change {
            at_ms: now_ms(),
            what: what.into(),
            weight: self.weight,
            detail,
        });
        if self.history.len() > HISTORY {
            self.history.remove(0);
        }
    }
}

/// One thing that happened to a rollout.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Change {
    at_ms: u64,
    /// `started`, `step` (the dark stage's end too), `succeeded`, `rolled back`, `paused`,
    /// `resumed`, `aborted`, `promoted`.
    what: String,
    /// The canary's percent after it.
    weight: u32,
    detail: String,
}

/// The last analysis of a rollout's step on this replica.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Analysis {
    at_ms: u64,
    /// The step it judged (an analysis of a step passed is not the next step's).
    step: usize,
    /// It judged the dark stage (step 0 before its weight), not the step after it.
    dark: bool,
    verdict: Verdict,
    message: String,
    canary: Side,
    stable: Side,
    /// Why the rollout has not started (no step judged): shown while it is pending.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    before_start: bool,
}

impl Analysis {
    /// It judged the step `p` is at now (not a step or stage already passed or ended).
    fn judges(&self, p: &Progress) -> bool {
        !self.before_start
            && p.phase == Phase::Progressing
            && p.step == self.step
            && p.dark == self.dark
    }
}

/// A rollout as `trellis shift status`, `describe` and the pane show it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Status {
    namespace: String,
    name: String,
    service: String,
    stable: String,
    canary: String,
    steps: Vec<u32>,
    /// The dark stage's percent of requests copied to the canary, if it has one.
    mirror: Option<u32>,
    interval_ms: u64,
    min_requests: u32,
    /// None until the controller has started it.
    phase: Option<Phase>,
    step: usize,
    weight: u32,
    /// In the dark stage: the canary gets copies, no user's request.
    dark: bool,
    step_started_ms: u64,
    reason: String,
    analysis: Option<Analysis>,
    history: Vec<Change>,
}

impl Status {
    /// Its name (its Service's, for those `trellis shift` makes).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The Service whose traffic it shifts.
    pub(crate) fn service(&self) -> &str {
        &self.service
    }
}

/// What an operator asks of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Hold the weights where they are.
    Pause,
    /// Go on with the step it was at (which begins again).
    Resume,
    /// Everything back to the stable backend.
    Abort,
    /// Everything to the canary now.
    Promote,
}

impl std::str::FromStr for Action {
    type Err = RolloutError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "abort" => Self::Abort,
            "promote" => Self::Promote,
            _ => {
                return Err(RolloutError::NotNow(format!(
                    "{s:?}: pause, resume, abort or promote"
                )))
            }
        })
    }
}

/// Why a rollout could not be moved.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RolloutError {
    /// No such Rollout.
    #[error("{0}")]
    NotFound(String),
    /// Not in a phase that allows it.
    #[error("{0}")]
    NotNow(String),
    /// The routes' new weights were refused.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The store failed, or another replica moved it first.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The rollouts' controller on this replica.
pub(crate) struct Rollouts {
    writer: Arc<Writer>,
    fleet: Arc<Fleet>,
    replicas: Option<Arc<Replicas>>,
    /// The last analysis of each rollout (`namespace/name`).
    analyses: Mutex<BTreeMap<String, Analysis>>,
    /// The rollouts seen at the last look, with their specs: one gone since has its record
    /// and its mirror removed.
    known: Mutex<HashMap<NamespacedName, RolloutSpec>>,
}

fn record_key(id: &NamespacedName) -> Key {
    Key::new("_Rollout", &id.namespace, &id.name)
}

/// The rollouts of `state`, with their specs as JSON (what a progress runs).
fn rollouts(state: &State) -> Vec<(NamespacedName, RolloutSpec, Value)> {
    state
        .catalog
        .entries
        .values()
        .filter_map(|e| match &e.resource.spec {
            Spec::Rollout(r) => Some((
                e.resource.id(),
                r.clone(),
                e.object
                    .doc()
                    .get_mut("spec")
                    .map(Value::take)
                    .unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

impl Rollouts {
    pub(crate) fn new(
        writer: Arc<Writer>,
        fleet: Arc<Fleet>,
        replicas: Option<Arc<Replicas>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            writer,
            fleet,
            replicas,
            analyses: Mutex::default(),
            known: Mutex::default(),
        })
    }

    /// Look at every rollout once a second, until the process ends.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.tick().await;
        }
    }

    async fn tick(&self) {
        let state = self.writer.state();
        let all = rollouts(&state);
        let now: HashMap<NamespacedName, RolloutSpec> = all
            .iter()
            .map(|(id, spec, _)| (id.clone(), spec.clone()))
            .collect();
        let gone: Vec<(NamespacedName, RolloutSpec)> = {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let was = std::mem::replace(&mut *known, now);
            was.into_iter()
                .filter(|(id, _)| !known.contains_key(id))
                .collect()
        };
        for (id, spec) in gone {
            if let Err(e) = self.forget(&state, &id, &spec).await {
                tracing::warn!(rollout = %id, error = %e, "cannot remove a deleted rollout's progress and copies");
            }
            self.lock_analyses().remove(&id.to_string());
        }
        for (id, spec, json) in all {
            if let Err(e) = self.step(&state, &id, &spec, &json).await {
                match e {
                    // Another replica moved it first: its decision stands.
                    RolloutError::Store(StoreError::Conflict { .. })
                    | RolloutError::Apply(ApplyError::Store(StoreError::Conflict { .. })) => {}
                    e => tracing::warn!(rollout = %id, error = %e, "rollout step failed"),
                }
            }
        }
    }

    fn lock_analyses(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Analysis>> {
        self.analyses.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored progress of `id`, with its version (None: not started, or started for
    /// another spec).
    async fn progress(
        &self,
        id: &NamespacedName,
        json: &Value,
    ) -> Result<(Option<Progress>, Expect), StoreError> {
        let stored = self.writer.store().get(&record_key(id)).await?;
        let expect = stored
            .as_ref()
            .map_or(Expect::Absent, |o| Expect::Version(o.version));
        let p = stored
            .and_then(|o| serde_json::from_value::<Progress>(o.doc).ok())
            .filter(|p| &p.spec == json);
        Ok((p, expect))
    }

    /// One look at one rollout.
    async fn step(
        &self,
        state: &State,
        id: &NamespacedName,
        spec: &RolloutSpec,
        json: &Value,
    ) -> Result<(), RolloutError> {
        let (p, expect) = self.progress(id, json).await?;
        let Some(mut p) = p else {
            if let Some(why) = waits_for(state, id, spec) {
                self.lock_analyses().insert(
                    id.to_string(),
                    Analysis {
                        at_ms: now_ms(),
                        step: 0,
                        dark: false,
                        verdict: Verdict::Hold,
                        message: why,
                        canary: Side::default(),
                        stable: Side::default(),
                        before_start: true,
                    },
                );
                return Ok(());
            }
            let dark = spec.mirror.is_some();
            let mut p = Progress {
                spec: json.clone(),
                phase: Phase::Progressing,
                step: 0,
                weight: if dark { 0 } else { spec.steps[0] },
                dark,
                step_started_ms: now_ms(),
                reason: String::new(),
                history: Vec::new(),
            };
            let how = match &spec.mirror {
                Some(m) => format!(
                    "dark stage, {} % of the requests copied to the canary",
                    m.percent
                ),
                None => format!("{} % to the canary", p.weight),
            };
            p.note(
                "started",
                format!("{} → {}: {how}", spec.stable, spec.canary),
            );
            tracing::info!(rollout = %id, weight = p.weight, "rollout started");
            return self.commit(state, id, spec, &p, expect).await;
        };
        if p.phase != Phase::Progressing {
            return Ok(());
        }
        let analysis = self.analyse(state, id, spec, &p).await;
        let verdict = analysis.verdict;
        let message = analysis.message.clone();
        self.lock_analyses().insert(id.to_string(), analysis);
        match verdict {
            Verdict::Hold => {
                // The rollout owns the weights while it progresses: a route applied over
                // them gets them back.
                if weights_differ(state, id, spec, &p) {
                    return self.commit(state, id, spec, &p, expect).await;
                }
                Ok(())
            }
            Verdict::Fail => {
                match spec.on_failure {
                    OnFailure::Rollback => {
                        p.phase = Phase::RolledBack;
                        p.weight = 0;
                        p.dark = false;
                        p.note("rolled back", message.clone());
                    }
                    OnFailure::Pause => {
                        p.phase = Phase::Paused;
                        p.note("paused", message.clone());
                    }
                }
                p.reason = message;
                tracing::warn!(rollout = %id, phase = ?p.phase, reason = %p.reason, "rollout analysis failed");
                self.commit(state, id, spec, &p, expect).await
            }
            Verdict::Pass if p.dark => {
                // Out of the dark: the copies stop, the first step's weight begins.
                p.dark = false;
                p.weight = spec.steps[0];
                p.step_started_ms = now_ms();
                p.note("step", format!("dark stage passed: {message}"));
                tracing::info!(rollout = %id, weight = p.weight, "rollout out of its dark stage");
                self.commit(state, id, spec, &p, expect).await
            }
            Verdict::Pass => {
                let next = p.step + 1;
                if next < spec.steps.len() && spec.steps[next] < 100 {
                    p.step = next;
                    p.weight = spec.steps[next];
                    p.step_started_ms = now_ms();
                    p.note("step", format!("passed: {message}"));
                } else {
                    p.step = spec.steps.len() - 1;
                    p.weight = 100;
                    p.phase = Phase::Succeeded;
                    p.note("succeeded", format!("passed: {message}"));
                }
                tracing::info!(rollout = %id, weight = p.weight, phase = ?p.phase, "rollout moved on");
                self.commit(state, id, spec, &p, expect).await
            }
        }
    }

    /// The fleet's figures since the step began, judged.
    async fn analyse(
        &self,
        state: &State,
        id: &NamespacedName,
        spec: &RolloutSpec,
        p: &Progress,
    ) -> Analysis {
        let at_ms = now_ms();
        let found = routes(state, id, spec);
        if found.is_empty() {
            return Analysis {
                at_ms,
                step: p.step,
                dark: p.dark,
                verdict: Verdict::Hold,
                message: format!(
                    "no HTTPRoute or GRPCRoute of {} has Service {} as a parent and {} among its backends: write one, or name it in spec.routes",
                    id.namespace, spec.service, spec.stable
                ),
                canary: Side::default(),
                stable: Side::default(),
                before_start: false,
            };
        }
        if canary_missing(state, id, spec) {
            // Its routes still name it, and their share for it is answered 500: no window
            // of figures is needed to fail the step.
            return Analysis {
                at_ms,
                step: p.step,
                dark: p.dark,
                verdict: Verdict::Fail,
                message: format!(
                    "the canary's Service {}/{} is gone: the requests the routes send it are answered 500",
                    id.namespace, spec.canary
                ),
                canary: Side::default(),
                stable: Side::default(),
                before_start: false,
            };
        }
        let window_ms = at_ms.saturating_sub(p.step_started_ms).max(1_000);
        let others = match &self.replicas {
            Some(r) => {
                r.gather(&format!("window={window_ms}ms&at={at_ms}"))
                    .await
                    .0
            }
            None => Vec::new(),
        };
        let pct = spec.analysis.latency_percentile;
        let (fleet, analysis, canary, stable, rules) = (
            self.fleet.clone(),
            spec.analysis.clone(),
            workloads_of(state, id, &spec.canary),
            workloads_of(state, id, &spec.stable),
            weighted_rules(&found, id, spec),
        );
        // The whole fleet's window is built and read off the runtime's threads, as the
        // API's fleet queries are.
        let figures = tokio::task::spawn_blocking(move || {
            let w = fleet
                .window(window_ms, at_ms, others)
                .map_err(|e| e.to_string())?;
            let stable = judge::side(&w, &stable, pct, None);
            let allowed = stable.latency_ms.map(|s| judge::allowed_ms(&analysis, s));
            Ok((
                judge::side(&w, &canary, pct, allowed),
                stable,
                judge::routed(&w, &rules, &canary),
            ))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let (canary, stable, routed) = match figures {
            Ok(sides) => sides,
            Err(e) => {
                return Analysis {
                    at_ms,
                    step: p.step,
                    dark: p.dark,
                    verdict: Verdict::Hold,
                    message: format!("no figures: {e}"),
                    canary: Side::default(),
                    stable: Side::default(),
                    before_start: false,
                }
            }
        };
        let held = window_ms >= spec.interval.0.as_millis() as u64;
        // In the dark stage the canary's share is the copies'.
        let mirrored = spec.mirror.as_ref().filter(|_| p.dark);
        let share = judge::Share {
            weight: mirrored.map_or(p.weight, |m| m.percent),
            copies: mirrored.is_some(),
            routed,
        };
        let (verdict, message) = judge::judge(&spec.analysis, &canary, &stable, &share, held);
        Analysis {
            at_ms,
            step: p.step,
            dark: p.dark,
            verdict,
            message,
            canary,
            stable,
            before_start: false,
        }
    }

    /// Rollout `id` (last seen as `spec`) was deleted: remove its record, and the copies its
    /// dark stage sends the canary, together. The weights stay as they are.
    async fn forget(
        &self,
        state: &State,
        id: &NamespacedName,
        spec: &RolloutSpec,
    ) -> Result<(), RolloutError> {
        let record = Write {
            key: record_key(id),
            doc: None,
            expect: Expect::Any,
        };
        // Only a rollout with a dark stage wrote a mirror (one without leaves the rules'
        // filters as they are).
        let docs = if spec.mirror.is_some() {
            rewritten_routes(state, id, spec, |doc| {
                without_mirror(doc, &id.namespace, spec)
            })?
        } else {
            Vec::new()
        };
        if docs.is_empty() {
            self.writer.store().write(vec![record]).await?;
        } else {
            self.writer
                .apply_with(&format!("rollout:{id}"), docs, vec![record])
                .await?;
        }
        Ok(())
    }

    /// Write the routes' weights for `p` and `p` itself, together (`p` at `expect`).
    async fn commit(
        &self,
        state: &State,
        id: &NamespacedName,
        spec: &RolloutSpec,
        p: &Progress,
        expect: Expect,
    ) -> Result<(), RolloutError> {
        let docs = weighted_routes(state, id, spec, p)?;
        let record = Write {
            key: record_key(id),
            doc: Some(serde_json::to_value(p).expect("progress serializes")),
            expect,
        };
        self.writer
            .apply_with(&format!("rollout:{id}"), docs, vec![record])
            .await?;
        Ok(())
    }

    /// Every rollout of `namespace` (all with None), or the one `name` names.
    pub(crate) async fn statuses(
        &self,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<Status>, StoreError> {
        let state = self.writer.state();
        let mut out = Vec::new();
        for (id, spec, json) in rollouts(&state) {
            if namespace.is_some_and(|n| n != id.namespace) || name.is_some_and(|n| n != id.name) {
                continue;
            }
            let (p, _) = self.progress(&id, &json).await?;
            let analysis = self.lock_analyses().get(&id.to_string()).cloned();
            out.push(Status {
                namespace: id.namespace.clone(),
                name: id.name.clone(),
                service: spec.service.clone(),
                stable: spec.stable.clone(),
                canary: spec.canary.clone(),
                steps: spec.steps.clone(),
                mirror: spec.mirror.as_ref().map(|m| m.percent),
                interval_ms: spec.interval.0.as_millis() as u64,
                min_requests: spec.analysis.min_requests,
                phase: p.as_ref().map(|p| p.phase),
                step: p.as_ref().map_or(0, |p| p.step),
                weight: p.as_ref().map_or(0, |p| p.weight),
                dark: p.as_ref().is_some_and(|p| p.dark),
                step_started_ms: p.as_ref().map_or(0, |p| p.step_started_ms),
                reason: p.as_ref().map(|p| p.reason.clone()).unwrap_or_default(),
                analysis: analysis.filter(|a| match &p {
                    Some(p) => a.judges(p),
                    None => a.before_start,
                }),
                history: p.map(|p| p.history).unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Do what an operator asks of rollout `id`.
    pub(crate) async fn act(
        &self,
        id: &NamespacedName,
        action: Action,
    ) -> Result<(), RolloutError> {
        let state = self.writer.state();
        let Some((_, spec, json)) = rollouts(&state).into_iter().find(|(i, _, _)| i == id) else {
            return Err(RolloutError::NotFound(format!("Rollout {id} not found")));
        };
        let (p, expect) = self.progress(id, &json).await?;
        let Some(mut p) = p else {
            return Err(RolloutError::NotNow(format!(
                "Rollout {id} has not started yet; try again in a second"
            )));
        };
        let who = "by an operator".to_string();
        match (action, p.phase) {
            (Action::Pause, Phase::Progressing) => {
                p.phase = Phase::Paused;
                p.reason = "paused by an operator".into();
                p.note("paused", who);
            }
            (Action::Resume, Phase::Paused) => {
                p.phase = Phase::Progressing;
                p.reason.clear();
                p.step_started_ms = now_ms();
                p.weight = if p.dark { 0 } else { spec.steps[p.step] };
                p.note("resumed", who);
            }
            (Action::Abort, Phase::Progressing | Phase::Paused) => {
                p.phase = Phase::Aborted;
                p.weight = 0;
                p.dark = false;
                p.reason = "aborted by an operator".into();
                p.note("aborted", who);
            }
            (Action::Promote, Phase::Progressing | Phase::Paused) => {
                p.phase = Phase::Succeeded;
                p.weight = 100;
                p.dark = false;
                p.step = spec.steps.len() - 1;
                p.reason = "promoted by an operator".into();
                p.note("promoted", who);
            }
            (a, phase) => {
                return Err(RolloutError::NotNow(format!(
                    "Rollout {id} is {phase:?}: cannot {a:?} it"
                )))
            }
        }
        self.commit(&state, id, &spec, &p, expect).await
    }
}

/// The workloads `service` (of `id`'s namespace) selects, as compiled.
fn workloads_of(state: &State, id: &NamespacedName, service: &str) -> HashSet<String> {
    let Ok(mesh) = state.compiled.mesh() else {
        return HashSet::new();
    };
    mesh.clusters
        .values()
        .filter(|c| c.service.namespace == id.namespace && c.service.name == service)
        .flat_map(|c| c.endpoints.iter().map(|e| e.workload.to_string()))
        .collect()
}

/// Why rollout `id` cannot start yet, if it cannot: its canary's Service is not in the mesh.
/// The routes it would write name the canary, and the share of a backend that does not
/// resolve is answered 500: a typo in `canary` would fail that share of the requests.
fn waits_for(state: &State, id: &NamespacedName, spec: &RolloutSpec) -> Option<String> {
    canary_missing(state, id, spec).then(|| {
        format!(
            "not started: there is no Service {}/{} (the canary); the routes would name it, and the requests they sent it would be answered 500. Create it, or correct spec.canary",
            id.namespace, spec.canary
        )
    })
}

/// Whether the canary's Service is missing from the store.
fn canary_missing(state: &State, id: &NamespacedName, spec: &RolloutSpec) -> bool {
    !state
        .catalog
        .entries
        .contains_key(&Key::new("Service", &id.namespace, &spec.canary))
}

/// The routes `spec` shifts: those it names, else every HTTPRoute and GRPCRoute of its
/// namespace with the Service as a parent and the stable backend among its backends.
fn routes(state: &State, id: &NamespacedName, spec: &RolloutSpec) -> Vec<(Key, Value)> {
    state
        .catalog
        .entries
        .iter()
        .filter(|(k, _)| {
            (k.kind == "HTTPRoute" || k.kind == "GRPCRoute") && k.namespace == id.namespace
        })
        .map(|(k, e)| (Key::clone(k), e.object.doc()))
        .filter(|(k, doc)| {
            if !spec.routes.is_empty() {
                return spec.routes.contains(&k.name);
            }
            let parents = doc["spec"]["parentRefs"].as_array();
            parents.is_some_and(|ps| {
                ps.iter().any(|p| {
                    p["name"] == spec.service.as_str()
                        && p["namespace"].as_str().is_none_or(|n| n == id.namespace)
                })
            }) && has_backend(doc, &id.namespace, &spec.stable)
        })
        .collect()
}

/// The rules the rollout weighs (those that send to the stable backend), by the names the
/// proxies report their traffic under ([`trellis_model::rule_name`]), each with the share of
/// its requests the stable backend and the canary have between them (1 in a rule with no
/// other backend; the rollout never changes it: [`with_weights`]).
fn weighted_rules(
    routes: &[(Key, Value)],
    id: &NamespacedName,
    spec: &RolloutSpec,
) -> HashMap<String, f64> {
    let mut names = HashMap::new();
    for (k, doc) in routes {
        let Some(rules) = doc["spec"]["rules"].as_array() else {
            continue;
        };
        let route = NamespacedName {
            namespace: k.namespace.to_string(),
            name: k.name.to_string(),
        };
        for (i, r) in rules.iter().enumerate() {
            let Some(bs) = r["backendRefs"].as_array() else {
                continue;
            };
            if !bs
                .iter()
                .any(|b| is_backend(b, &id.namespace, &spec.stable))
            {
                continue;
            }
            let total: u64 = bs.iter().map(weight_of).sum();
            let pool = pool_of(bs, &id.namespace, spec);
            let share = if total == 0 {
                0.0
            } else {
                pool as f64 / total as f64
            };
            names.insert(
                trellis_model::rule_name(&route, r["name"].as_str(), i, rules.len()),
                share,
            );
        }
    }
    names
}

/// A backendRef's weight as written (1 when absent, as the Gateway API says).
fn weight_of(b: &Value) -> u64 {
    b.get("weight").map_or(1, |w| w.as_u64().unwrap_or(0))
}

/// A backend the rollout weighs: the stable one or the canary.
fn is_ours(b: &Value, ns: &str, spec: &RolloutSpec) -> bool {
    is_backend(b, ns, &spec.stable) || is_backend(b, ns, &spec.canary)
}

/// The weight the stable backend and the canary have between them among a rule's backends.
fn pool_of(bs: &[Value], ns: &str, spec: &RolloutSpec) -> u64 {
    bs.iter()
        .filter(|b| is_ours(b, ns, spec))
        .map(weight_of)
        .sum()
}

/// The greatest weight a rollout writes (the Gateway API's bound): a rule's weights are
/// scaled by 100 for exact percents only while they stay under it.
const MAX_WEIGHT: u64 = 1_000_000;

fn is_backend(b: &Value, ns: &str, name: &str) -> bool {
    b["name"] == name && b["namespace"].as_str().is_none_or(|n| n == ns)
}

fn has_backend(doc: &Value, ns: &str, name: &str) -> bool {
    doc["spec"]["rules"].as_array().is_some_and(|rules| {
        rules.iter().any(|r| {
            r["backendRefs"]
                .as_array()
                .is_some_and(|bs| bs.iter().any(|b| is_backend(b, ns, name)))
        })
    })
}

/// What a rollout writes into its rules: the canary's weight, and the percent of requests
/// copied to it (its dark stage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Routing {
    weight: u32,
    mirror: Option<u32>,
}

impl Routing {
    fn of(spec: &RolloutSpec, p: &Progress) -> Self {
        Self {
            weight: p.weight,
            // Copies go while the dark stage runs or is paused, never after it.
            mirror: spec
                .mirror
                .as_ref()
                .filter(|_| p.dark && matches!(p.phase, Phase::Progressing | Phase::Paused))
                .map(|m| m.percent),
        }
    }
}

/// The `RequestMirror` filter a rollout writes: `percent` of the rule's requests to the
/// canary, on the stable backend's port.
fn canary_mirror(spec: &RolloutSpec, port: &Value, percent: u32) -> Value {
    serde_json::json!({
        "type": "RequestMirror",
        "requestMirror": {
            "backendRef": { "name": spec.canary, "port": port },
            "percent": percent,
        }
    })
}

/// Whether a route filter is a mirror to the canary (the rollout's own, which it removes when
/// the dark stage ends).
fn mirrors_to(f: &Value, ns: &str, canary: &str) -> bool {
    f["type"] == "RequestMirror" && is_backend(&f["requestMirror"]["backendRef"], ns, canary)
}

/// `doc` (a route) with the canary at `routing.weight` % and the stable backend at the rest
/// in each rule that sends to the stable backend (the canary added beside it where it is
/// missing), and `routing.mirror` % of those rules' requests copied to the canary (no
/// copies without it).
///
/// In a rule with other backends too, the percent is of the stable's share, and the others
/// keep theirs: the stable's and the canary's weights together stay what the stable's was
/// (every weight of the rule × 100 first, where that is needed for an exact percent).
fn with_weights(doc: &Value, ns: &str, spec: &RolloutSpec, routing: Routing) -> Value {
    let weight = routing.weight;
    let mut doc = doc.clone();
    let Some(rules) = doc["spec"]["rules"].as_array_mut() else {
        return doc;
    };
    for r in rules {
        let Some(bs) = r.get_mut("backendRefs").and_then(Value::as_array_mut) else {
            continue;
        };
        let Some(stable) = bs.iter().position(|b| is_backend(b, ns, &spec.stable)) else {
            continue;
        };
        if !bs.iter().any(|b| is_backend(b, ns, &spec.canary)) {
            let mut c = bs[stable].clone();
            c["name"] = Value::from(spec.canary.as_str());
            c["weight"] = Value::from(0);
            bs.push(c);
        }
        let (stable_w, canary_w) = if bs.iter().all(|b| is_ours(b, ns, spec)) {
            (100 - u64::from(weight), u64::from(weight))
        } else {
            let mut pool = pool_of(bs, ns, spec);
            let most = bs.iter().map(weight_of).max().unwrap_or(0);
            if !pool.is_multiple_of(100) && most * 100 <= MAX_WEIGHT {
                for b in bs.iter_mut() {
                    b["weight"] = Value::from(weight_of(b) * 100);
                }
                pool *= 100;
            }
            let canary = (pool * u64::from(weight) + 50) / 100;
            (pool - canary, canary)
        };
        for b in bs.iter_mut() {
            if is_backend(b, ns, &spec.stable) {
                b["weight"] = Value::from(stable_w);
            } else if is_backend(b, ns, &spec.canary) {
                b["weight"] = Value::from(canary_w);
            }
        }
        let mirror = routing
            .mirror
            .map(|percent| canary_mirror(spec, &bs[stable]["port"], percent));
        set_mirror(r, ns, &spec.canary, mirror);
    }
    doc
}

/// `doc` (a route) without the copies to the canary in the rules that send to the stable
/// backend: what a deleted rollout leaves (its weights stay).
fn without_mirror(doc: &Value, ns: &str, spec: &RolloutSpec) -> Value {
    let mut doc = doc.clone();
    let Some(rules) = doc["spec"]["rules"].as_array_mut() else {
        return doc;
    };
    for r in rules {
        let weighs = r["backendRefs"]
            .as_array()
            .is_some_and(|bs| bs.iter().any(|b| is_backend(b, ns, &spec.stable)));
        if weighs {
            set_mirror(r, ns, &spec.canary, None);
        }
    }
    doc
}

/// Rule `r`'s filters with `mirror` as its only mirror to the canary (none without it); its
/// other filters kept in their order.
fn set_mirror(r: &mut Value, ns: &str, canary: &str, mirror: Option<Value>) {
    let had = r
        .get("filters")
        .and_then(Value::as_array)
        .is_some_and(|fs| fs.iter().any(|f| mirrors_to(f, ns, canary)));
    if !had && mirror.is_none() {
        return;
    }
    let mut filters: Vec<Value> = r
        .get("filters")
        .and_then(Value::as_array)
        .map(|fs| {
            fs.iter()
                .filter(|f| !mirrors_to(f, ns, canary))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    filters.extend(mirror);
    if filters.is_empty() {
        if let Some(o) = r.as_object_mut() {
            o.remove("filters");
        }
    } else {
        r["filters"] = Value::from(filters);
    }
}

/// The routes of `spec` as `p` has them, typed for an apply (only those that change).
fn weighted_routes(
    state: &State,
    id: &NamespacedName,
    spec: &RolloutSpec,
    p: &Progress,
) -> Result<Vec<(Resource, Value)>, RolloutError> {
    let routing = Routing::of(spec, p);
    rewritten_routes(state, id, spec, |doc| {
        with_weights(doc, &id.namespace, spec, routing)
    })
}

/// The routes of `spec` that `rewrite` changes, rewritten and typed for an apply.
fn rewritten_routes(
    state: &State,
    id: &NamespacedName,
    spec: &RolloutSpec,
    rewrite: impl Fn(&Value) -> Value,
) -> Result<Vec<(Resource, Value)>, RolloutError> {
    let mut out = Vec::new();
    for (key, doc) in routes(state, id, spec) {
        let new = rewrite(&doc);
        if new == doc {
            continue;
        }
        let file = format!("rollout:{id}");
        let r = trellis_model::resource_from_json(&file, &new)
            .map_err(|e| RolloutError::Apply(ApplyError::Invalid(e)))?;
        tracing::debug!(route = %key, rollout = %id, "rollout rewrites a route");
        out.push((r, new));
    }
    Ok(out)
}

/// Some route of `spec` is not as `p` has it.
fn weights_differ(state: &State, id: &NamespacedName, spec: &RolloutSpec, p: &Progress) -> bool {
    let routing = Routing::of(spec, p);
    routes(state, id, spec)
        .into_iter()
        .any(|(_, doc)| with_weights(&doc, &id.namespace, spec, routing) != doc)
}

#[cfg(test)]
mod tests;
