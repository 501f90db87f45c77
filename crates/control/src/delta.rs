//! Incremental (delta) ADS for Trellis documents: each stream remembers which version of
//! which document it sent, and a change sends only the documents that changed and the names
//! of those removed. A stream that saw the previous compiled state only looks at that state's
//! list of changed names; one that skipped states compares everything.
//!
//! A stream has at most one response waiting for its answer (ACK or NACK); changes that
//! arrive meanwhile are sent together once it is answered, so a slow proxy gets fewer, larger
//! updates instead of a queue.
//!
//! An update larger than [`PART_BYTES`] encoded (the first sync of a proxy joining a big mesh)
//! goes in parts, each answered before the next is sent; all but the last carry
//! [`PARTIAL_SUFFIX`] and the proxy applies the set at the last. tonic keeps each stream's
//! encode buffer at the size of the largest message the stream ever sent, so whole-mesh
//! messages would cost a thousand proxies a thousand copies of the mesh for as long as they
//! stay connected. From its first part to the answer of its last, an update holds a permit of a
//! semaphore shared by all streams, which bounds the memory of mass (re)connections: only that
//! many streams hold a list of names still to send.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tonic::{Status, Streaming};
use trellis_xds::{
    envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    },
    DOCUMENT_TYPE, PARTIAL_SUFFIX,
};

use trellis_model::NamespacedName;

use crate::{
    catalog::{Compiled, Doc},
    registry::Registry,
    state::State,
};

/// A response on its way to the stream's encoder, boxed: the channel's first block of 32
/// slots is allocated with it, 6 KB of `DeltaDiscoveryResponse`s per stream unboxed.
pub(crate) type Out = Result<Box<DeltaDiscoveryResponse>, Status>;

/// What the client holds.
enum Have {
    /// Name → version: what it declared on reconnect, or after a change of subscription.
    Known(HashMap<Arc<str>, Arc<str>>),
    /// Exactly the wanted documents of this compiled state. Streams in step share the
    /// state instead of keeping a map each (a thousand proxies × ten thousand documents).
    At(Arc<State>),
}

struct Sub {
    wildcard: bool,
    /// A Trellis proxy that names its workload and subscribed to no name in particular gets
    /// what that workload needs ([`Compiled::scope`]) and the Services it subscribes to by
    /// name (`Service/NAMESPACE/NAME`, asked for on demand), each with what it needs.
    scoped: Option<NamespacedName>,
    names: BTreeSet<String>,
    /// A scoped stream's scope at the state last compared (`at`), and the Services in it.
    scope: HashSet<Arc<str>>,
    services: Vec<NamespacedName>,
    at: u64,
    /// Names subscribed to that do not exist, which the client has been told (as removed).
    absent: HashSet<String>,
    have: Have,
    nonce: String,
    /// The version of the update being sent, or last sent.
    version: String,
    /// The response waiting for its answer is not the update's last part.
    partial: bool,
}

impl Sub {
    fn wants(&self, name: &str) -> bool {
        if self.scoped.is_some() {
            return self.scope.contains(name) || self.names.contains(name);
        }
        self.wildcard || self.names.contains(name)
    }

    /// The Services subscribed to by name.
    fn services(&self) -> impl Iterator<Item = NamespacedName> + '_ {
        self.names
            .iter()
            .filter_map(|n| n.strip_prefix("Service/"))
            .filter_map(|n| n.parse().ok())
    }

    /// The held versions as a map (before the subscription changes).
    fn known(&mut self) -> &mut HashMap<Arc<str>, Arc<str>> {
        if let Have::At(st) = &self.have {
            let m = st
                .compiled
                .docs
                .iter()
                .filter(|(n, _)| self.wants(n))
                .map(|(n, d)| (n.clone(), d.version.clone()))
                .collect();
            self.have = Have::Known(m);
        }
        match &mut self.have {
            Have::Known(m) => m,
            Have::At(_) => unreachable!("converted above"),
        }
    }
}

/// Most names one stream may subscribe to by name.
const MAX_NAMES: usize = 4096;

/// How long an unanswered response blocks the next push to its stream.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an unanswered response holds its permit: a proxy answers in milliseconds; one
/// that does not must not hold up the other streams' updates for the whole
/// [`ANSWER_TIMEOUT`].
const PERMIT_HOLD: Duration = Duration::from_secs(1);

/// A response's encoded size at most (a larger document still goes, alone). tonic's encode
/// buffer starts at 8 KiB, doubles until a response fits, and keeps that size for the
/// stream's life: parts that fit 16 KiB keep it there (parts of 32 KiB of YAML, ~43 KB
/// encoded, grew it to 64 KiB on every stream that ever had a large update).
pub(crate) const PART_BYTES: usize = 15 << 10;

/// Permits for updates in flight: those of streams that answer, and a few of their own for
/// streams that stopped answering (one left a response unanswered past [`PERMIT_HOLD`]), so
/// that however many of those there are, each retry of theirs at the [`ANSWER_TIMEOUT`]
/// takes nothing from the streams that answer.
#[derive(Clone)]
pub(crate) struct Permits {
    answering: Arc<Semaphore>,
    silent: Arc<Semaphore>,
}

/// Updates in flight to streams that stopped answering, at most.
const SILENT_PUSHES: usize = 4;

impl Permits {
    /// `answering` updates in flight to streams that answer, at most.
    pub(crate) fn new(answering: usize) -> Self {
        Self {
            answering: Arc::new(Semaphore::new(answering)),
            silent: Arc::new(Semaphore::new(SILENT_PUSHES)),
        }
    }
}

/// What is left to send of an update.
struct Pending {
    /// The state the update brings the client to.
    state: Arc<State>,
    /// Documents not sent yet (names shared with the state: a proxy joining a big mesh
    /// lacks every document).
    names: VecDeque<Arc<str>>,
    /// Names to remove, sent with the last part.
    removed: Vec<String>,
}

pub(crate) struct DeltaTask {
    id: u64,
    state: watch::Receiver<Arc<State>>,
    proxies: Registry,
    permits: Permits,
    /// Held from an update's first part to the answer of its last, unless a part goes
    /// unanswered for [`PERMIT_HOLD`].
    permit: Option<OwnedSemaphorePermit>,
    /// The client left a response unanswered past [`PERMIT_HOLD`] and has not answered
    /// since: its updates take their permits from [`Permits::silent`].
    silent: bool,
    /// When an unanswered response gives its permit up to another stream's update.
    hold_until: Option<tokio::time::Instant>,
    /// A response waits for its answer until then.
    deadline: Option<tokio::time::Instant>,
    /// The rest of an update sent in parts.
    pending: Option<Pending>,
    /// A change arrived while waiting.
    dirty: bool,
    tx: mpsc::Sender<Out>,
    sub: Option<Sub>,
    nonce: u64,
}

fn resource(name: &str, d: &Doc) -> Resource {
    Resource {
        name: name.to_string(),
        version: d.version.to_string(),
        resource: Some(trellis_xds::envoy_types::util::pack_any(
            trellis_xds::Document {
                yaml: d.yaml.to_string(),
            },
        )),
        ..Default::default()
    }
}

impl DeltaTask {
    pub(crate) fn new(
        id: u64,
        state: watch::Receiver<Arc<State>>,
        proxies: Registry,
        permits: Permits,
        tx: mpsc::Sender<Out>,
    ) -> Self {
        Self {
            id,
            state,
            proxies,
            permits,
            permit: None,
            silent: false,
            hold_until: None,
            deadline: None,
            pending: None,
            dirty: false,
            tx,
            sub: None,
            nonce: 0,
        }
    }

    pub(crate) async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        loop {
            let deadline = self.deadline;
            let hold = self.hold_until.filter(|_| self.permit.is_some());
            let ok = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) => false,
                    Err(e) => {
                        tracing::debug!(stream = self.id, error = %e, "delta xds stream ended");
                        // A message that could not be read (over the size limit, say): the
                        // client learns why its stream ends.
                        let _ = self.tx.try_send(Err(e));
                        false
                    }
                },
                changed = self.state.changed() => changed.is_ok() && self.push().await,
                _ = tokio::time::sleep_until(hold.unwrap_or_else(tokio::time::Instant::now)), if hold.is_some() => {
                    self.went_silent();
                    true
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.answer_timed_out().await
                }
            };
            if !ok {
                break;
            }
        }
        self.proxies.disconnect(self.id);
    }

    /// The last response went unanswered for [`PERMIT_HOLD`]: still waiting for the answer,
    /// but no longer holding up other streams' updates; until the client answers, its
    /// updates take permits of the silent streams.
    fn went_silent(&mut self) {
        self.permit = None;
        self.hold_until = None;
        if !self.silent {
            self.silent = true;
            self.proxies.silent(self.id, true);
        }
    }

    /// The last response went unanswered for [`ANSWER_TIMEOUT`]: what changed since goes now,
    /// and anything that changes later when it does.
    async fn answer_timed_out(&mut self) -> bool {
        tracing::warn!(
            stream = self.id,
            "no answer to the last response; sending again when something changes"
        );
        self.deadline = None;
        self.permit = None;
        !std::mem::take(&mut self.dirty) || self.push().await
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> bool {
        if let Some(node) = &req.node {
            self.proxies.node(self.id, node);
        }
        if req.type_url != DOCUMENT_TYPE {
            tracing::warn!(stream = self.id, r#type = %req.type_url, "delta xDS serves only Trellis documents; use state of the world for Envoy types");
            return true;
        }
        let star = |v: &[String]| v.iter().any(|n| n == "*");
        let sub = self.sub.get_or_insert_with(|| Sub {
            // A first request that names nothing subscribes to everything (wildcard).
            wildcard: req.resource_names_subscribe.is_empty()
                || star(&req.resource_names_subscribe),
            // ... which for a proxy that serves a workload is what that workload needs; "*"
            // named explicitly is the whole mesh.
            scoped: req
                .node
                .as_ref()
                .and_then(trellis_xds::node_workload)
                .and_then(|w| w.parse().ok())
                .filter(|_| !star(&req.resource_names_subscribe)),
            names: BTreeSet::new(),
            scope: HashSet::new(),
            services: Vec::new(),
            at: 0,
            absent: HashSet::new(),
            have: Have::Known(
                req.initial_resource_versions
                    .iter()
                    .map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str())))
                    .collect(),
            ),
            nonce: String::new(),
            version: String::new(),
            partial: false,
        });
        let mut changed = false;
        if !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            sub.known();
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                changed |= !sub.wildcard;
                sub.wildcard = true;
            } else if sub.names.len() >= MAX_NAMES && !sub.names.contains(n) {
                // A proxy asks for at most 1,024 names on demand; a client asking for more
                // does not make the control plane hold them.
                tracing::warn!(stream = self.id, max = MAX_NAMES, name = %n, "too many names subscribed; ignored");
            } else {
                changed |= sub.names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                sub.wildcard = false;
                sub.scoped = None;
            } else {
                sub.names.remove(n);
                sub.absent.remove(n);
                // A scoped client is sent the removal of what no longer falls in its scope,
                // the unsubscribed Service with the rest.
                if sub.scoped.is_none() {
                    sub.known().remove(n.as_str());
                }
            }
            changed = true;
        }
        if !req.response_nonce.is_empty() {
            if req.response_nonce != sub.nonce {
                // Stale: answers an older response.
                return true;
            }
            let err = req.error_detail.as_ref().map(|e| e.message.clone());
            // A part's ACK says only that the proxy holds it; the last part's answer is the
            // update's.
            if !sub.partial {
                self.proxies
                    .answer(self.id, DOCUMENT_TYPE, sub.version.clone(), err);
            } else if err.is_some() {
                let v = format!("{}{PARTIAL_SUFFIX}", sub.version);
                self.proxies.answer(self.id, DOCUMENT_TYPE, v, err);
            }
            self.deadline = None;
            if std::mem::take(&mut self.silent) {
                self.proxies.silent(self.id, false);
            }
            if self.pending.is_none() && !changed && !std::mem::take(&mut self.dirty) {
                self.permit = None;
                return true;
            }
        }
        self.dirty |= changed;
        self.push().await
    }

    /// Send the next part of the update in progress, or what changed since the last update
    /// if anything did.
    async fn push(&mut self) -> bool {
        if self.sub.is_none() {
            return true;
        }
        if self.deadline.is_some() {
            self.dirty = true;
            return true;
        }
        if self.permit.is_none() {
            let pool = if self.silent {
                &self.permits.silent
            } else {
                &self.permits.answering
            };
            let Ok(permit) = pool.clone().acquire_owned().await else {
                return false;
            };
            self.permit = Some(permit);
        }
        if self.pending.is_none() {
            self.dirty = false;
            self.pending = self.diff();
            if self.pending.is_none() {
                self.permit = None;
                return true;
            }
        }
        self.send_part().await
    }

    /// What the client lacks of the current state; `None` when it has it all and has had a
    /// response before.
    fn diff(&mut self) -> Option<Pending> {
        let state = self.state.borrow_and_update().clone();
        let sub = self.sub.as_mut()?;
        let compiled = state.compiled.clone();
        let c = &*compiled;
        let mut names = VecDeque::new();
        let mut removed = Vec::new();
        // Subscribed names that do not exist are sent as removed, once: a proxy waiting for a
        // name asked for on demand learns at once that there is none.
        for n in &sub.names {
            if c.docs.contains_key(n.as_str()) {
                sub.absent.remove(n);
            } else if sub.absent.insert(n.clone()) {
                removed.push(n.clone());
            }
        }
        if let Some(local) = sub.scoped.clone() {
            // In step, and no change can concern this proxy: each is a document out of its
            // scope, not its own Workload, and not one that may now belong in its scope (a
            // Workload none of its Services selects, a route on none of them, a policy
            // targeting none of them): nothing to work out or send. A health flap elsewhere
            // or a route change elsewhere costs a stream a few lookups.
            let own = format!("Workload/{}/{}", local.namespace, local.name);
            let quiet = c.delta.as_ref().is_some_and(|(p, changed)| {
                *p == sub.at
                    && changed.iter().all(|n| {
                        !sub.scope.contains(n)
                            && **n != *own
                            && !sub.names.contains(&**n)
                            && !c.may_concern(n, &sub.services, &local)
                    })
            });
            sub.at = c.revision;
            if quiet {
                let count = match &sub.have {
                    Have::Known(m) => m.len(),
                    Have::At(_) => 0,
                };
                return self.finish(state, names, removed, count);
            }
            sub.scope = c.scope(&local, sub.services());
            sub.services = sub
                .scope
                .iter()
                .filter_map(|n| n.strip_prefix("Service/")?.parse().ok())
                .collect();
            let have = std::mem::replace(&mut sub.have, Have::Known(HashMap::new()));
            let Have::Known(had) = have else {
                unreachable!("a scoped subscription holds a map")
            };
            let now = scoped_diff(c, sub, had, &mut names, &mut removed);
            let count = now.len();
            sub.have = Have::Known(now);
            return self.finish(state, names, removed, count);
        }
        // Compare what the client has with `c` for one name.
        let mut consider =
            |name: &str, had: Option<&Arc<str>>, sub: &Sub| match c.docs.get_key_value(name) {
                Some((n, d)) if sub.wants(name) => {
                    if had != Some(&d.version) {
                        names.push_back(n.clone());
                    }
                }
                _ => {
                    if had.is_some() {
                        removed.push(name.to_string());
                    }
                }
            };
        match &sub.have {
            // In step with the previous state: only the names that changed since matter.
            Have::At(old)
                if c.delta
                    .as_ref()
                    .is_some_and(|(p, _)| *p == old.compiled.revision) =>
            {
                let changed = &c.delta.as_ref().expect("checked").1;
                for n in changed {
                    let had = old.compiled.docs.get(n).filter(|_| sub.wants(n));
                    consider(n, had.map(|d| &d.version), sub);
                }
            }
            Have::At(old) => {
                for (n, d) in &old.compiled.docs {
                    if !c.docs.contains_key(n) && sub.wants(n) {
                        consider(n, Some(&d.version), sub);
                    }
                }
                for n in c.docs.keys() {
                    let had = old.compiled.docs.get(n).filter(|_| sub.wants(n));
                    consider(n, had.map(|d| &d.version), sub);
                }
            }
            Have::Known(m) => {
                for (n, v) in m {
                    if !c.docs.contains_key(n) {
                        consider(n, Some(v), sub);
                    }
                }
                for n in c.docs.keys() {
                    consider(n, m.get(&**n), sub);
                }
            }
        }
        let count = if sub.wildcard {
            c.docs.len()
        } else {
            sub.names
                .iter()
                .filter(|n| c.docs.contains_key(n.as_str()))
                .count()
        };
        sub.have = Have::At(state.clone());
        self.finish(state, names, removed, count)
    }

    /// The update that sends `names` and removes `removed` (the client then holding `count`
    /// documents); `None` when there is nothing to send and the client has had a response
    /// before.
    fn finish(
        &mut self,
        state: Arc<State>,
        names: VecDeque<Arc<str>>,
        removed: Vec<String>,
        count: usize,
    ) -> Option<Pending> {
        let sub = self.sub.as_mut()?;
        if names.is_empty() && removed.is_empty() && !sub.nonce.is_empty() {
            // A scoped client that needs nothing of this state holds all it needs of it:
            // in step with it (for `check`, and for a deregistration waiting on proxies).
            if sub.scoped.is_some() && self.deadline.is_none() {
                let v = state.compiled.revision.to_string();
                self.proxies.current(self.id, DOCUMENT_TYPE, v);
            }
            return None;
        }
        sub.version = state.compiled.revision.to_string();
        self.proxies
            .sent(self.id, DOCUMENT_TYPE, sub.version.clone(), count);
        Some(Pending {
            state,
            names,
            removed,
        })
    }

    /// Send the next part of the pending update: documents up to [`PART_BYTES`] encoded, and
    /// with the last part the removals.
    async fn send_part(&mut self) -> bool {
        let (Some(sub), Some(p)) = (self.sub.as_mut(), self.pending.as_mut()) else {
            return true;
        };
        let mut resources = Vec::new();
        let mut bytes = 0;
        while let Some(n) = p.names.front() {
            if let Some(d) = p.state.compiled.docs.get(n) {
                let r = resource(n, d);
                // The resource and its field's tag and length.
                let len = prost::Message::encoded_len(&r) + 4;
                if !resources.is_empty() && bytes + len > PART_BYTES {
                    break;
                }
                bytes += len;
                resources.push(r);
            }
            p.names.pop_front();
        }
        sub.partial = !p.names.is_empty();
        let (system_version_info, removed_resources) = if sub.partial {
            (format!("{}{PARTIAL_SUFFIX}", sub.version), Vec::new())
        } else {
            let last = self.pending.take().expect("matched above");
            (sub.version.clone(), last.removed)
        };
        self.nonce += 1;
        sub.nonce = self.nonce.to_string();
        let resp = DeltaDiscoveryResponse {
            system_version_info,
            resources,
            type_url: DOCUMENT_TYPE.into(),
            removed_resources,
            nonce: sub.nonce.clone(),
            ..Default::default()
        };
        let now = tokio::time::Instant::now();
        self.deadline = Some(now + ANSWER_TIMEOUT);
        self.hold_until = Some(now + PERMIT_HOLD);
        self.tx.send(Ok(Box::new(resp))).await.is_ok()
    }
}

/// A scoped stream's difference: what of its scope (and its names) `c` holds at another
/// version than the client had, and what the client had that it no longer wants. Costs the
/// size of the scope, not of the mesh. Returns what the client holds after.
fn scoped_diff(
    c: &Compiled,
    sub: &Sub,
    had: HashMap<Arc<str>, Arc<str>>,
    names: &mut VecDeque<Arc<str>>,
    removed: &mut Vec<String>,
) -> HashMap<Arc<str>, Arc<str>> {
    let mut now = HashMap::with_capacity(sub.scope.len());
    let wanted = sub
        .scope
        .iter()
        .map(|n| &**n)
        .chain(sub.names.iter().map(|n| n.as_str()));
    for n in wanted {
        let Some((k, d)) = c.docs.get_key_value(n) else {
            continue;
        };
        if now.contains_key(n) {
            continue;
        }
        if had.get(n) != Some(&d.version) {
            names.push_back(k.clone());
        }
        now.insert(k.clone(), d.version.clone());
    }
    for n in had.into_keys() {
        if !now.contains_key(&n) {
            removed.push(n.to_string());
        }
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    fn hello(nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: DOCUMENT_TYPE.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    /// A stream that stopped answering retries at its answer timeout with permits of its
    /// own: with every permit of the answering streams taken (by their updates), its retry
    /// still goes, and takes none of theirs; once it answers, it is one of them again.
    #[tokio::test]
    async fn a_stream_that_stopped_answering_takes_no_permit_from_those_that_answer() {
        let catalog = Catalog::default();
        let compiled = Arc::new(catalog.compile());
        let (_state_tx, state) = watch::channel(Arc::new(State { catalog, compiled }));
        let proxies = Registry::default();
        proxies.connect(7, None);
        let permits = Permits::new(1);
        let (tx, mut rx) = mpsc::channel(4);
        let mut task = DeltaTask::new(7, state, proxies.clone(), permits.clone(), tx);

        // The first response holds the one permit until it is answered.
        assert!(task.on_request(hello("")).await);
        let first = rx.recv().await.expect("a response").expect("not an error");
        assert_eq!(permits.answering.available_permits(), 0);
        // Unanswered past the hold: the permit goes back, and the proxy is told silent.
        task.went_silent();
        assert_eq!(permits.answering.available_permits(), 1);
        assert!(proxies.snapshot()[0].silent_since.is_some());

        // Another stream's update takes the answering permit; a change is pending here when
        // the answer times out: the retry goes with a permit of the silent streams.
        let _other = permits.answering.clone().acquire_owned().await.unwrap();
        task.dirty = true;
        let retried = tokio::time::timeout(Duration::from_secs(10), task.answer_timed_out())
            .await
            .expect("a silent stream's retry waited for the answering streams' permits");
        assert!(retried);
        assert_eq!(permits.answering.available_permits(), 0);

        // It answers: no longer silent, and its next update takes an answering permit.
        assert!(task.on_request(hello(&first.nonce)).await);
        assert!(!task.silent);
        assert!(proxies.snapshot()[0].silent_since.is_none());
    }
}
