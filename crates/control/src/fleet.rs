//! The fleet's telemetry as the control plane keeps it: proxies' reports checked against who
//! sends them and merged into the store of `trellis_telemetry` (ring buffers, bounded), and
//! the views the API answers with.
//!
//! A report says which workload it is for. Over mutual TLS (every proxy beyond loopback), the
//! certificate must be that workload's identity: the Workload must exist in the identity's
//! namespace with that identity, as for an agent's heartbeat; a report for another workload
//! is refused whole. Over plaintext, which the xDS listener takes only on loopback, the
//! report is believed as the xDS stream is.

use std::sync::Mutex;

use trellis_identity::SpiffeId;
use trellis_store::Key;
use trellis_telemetry::{
    diagnose::{self, Facts, Verdict},
    report::{Ack, Batch},
    shard::Shard,
    store::{Limits, Store, Window},
    view::{self, EdgeRow, Selector, StatRow},
};

/// What the pane shows: stat rows, edges, verdicts.
pub(crate) type Figures = (
    Vec<StatRow>,
    Vec<EdgeRow>,
    (Vec<Verdict>, diagnose::Judged),
    Vec<view::MirrorRow>,
);

/// The identity each reporting workload proved.
type Ids = std::collections::HashMap<String, String>;

use crate::apply::Writer;

/// Why reports were refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FleetError {
    /// Not a batch of reports of one proxy run.
    #[error("{0}")]
    BadReport(String),
    /// The sender may not speak for the workload it names.
    #[error("{0}")]
    Forbidden(String),
}

/// A reporting proxy as `trellis check` sees it.
pub(crate) struct ReporterInfo {
    /// Its workload (or node).
    pub(crate) name: String,
    /// When its certificate expires (Unix ms; 0: unknown).
    pub(crate) cert_not_after_ms: u64,
    /// Its clock minus the control plane's, ms.
    pub(crate) skew_ms: i64,
}

/// The fleet's telemetry.
pub(crate) struct Fleet {
    store: Mutex<Store>,
    trust_domain: String,
}

pub(crate) use trellis_telemetry::now_ms;

/// The seconds a window really covers (whole slots), for rates.
fn covered_s(now_ms: u64, w: &trellis_telemetry::store::Window) -> f64 {
    (now_ms.saturating_sub(w.from_ms) as f64 / 1000.0).max(1.0)
}

/// Longest window a query may ask for: what the coarse ring holds.
pub(crate) fn max_window_ms(l: &Limits) -> u64 {
    l.coarse_ms * l.coarse_slots as u64
}

/// The verdicts of the fleet's window `w` whose place or services `sel` names, and what it
/// held of that selection to judge (`trellis diagnose`, and the pane's figures).
fn judge(w: &Window, facts: &Facts, sel: &Selector) -> (Vec<Verdict>, diagnose::Judged) {
    let pick = diagnose::selector(sel.namespace.as_deref(), sel.name.as_deref());
    (
        diagnose::diagnose(w, facts, &pick),
        diagnose::judged(w, &pick),
    )
}

impl Fleet {
    /// An empty store with `limits`, for a mesh of `trust_domain`.
    pub(crate) fn new(limits: Limits, trust_domain: &str) -> Self {
        Self {
            store: Mutex::new(Store::new(limits)),
            trust_domain: trust_domain.to_string(),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merge a proxy's `batch`, sent by `peer` (its certificate's identity, over mutual TLS).
    pub(crate) fn ingest(
        &self,
        writer: &Writer,
        batch: Batch,
        peer: Option<&SpiffeId>,
    ) -> Result<Ack, FleetError> {
        let Some(first) = batch.reports.first() else {
            return Err(FleetError::BadReport("no reports".into()));
        };
        let (run, workload) = (first.run, first.workload.clone());
        if batch
            .reports
            .iter()
            .any(|r| r.run != run || r.workload != workload)
        {
            return Err(FleetError::BadReport(
                "the reports of one batch must be of one proxy run and one workload".into(),
            ));
        }
        if let Some(id) = peer {
            self.check_owner(writer, &workload, id)?;
        }
        let now = now_ms();
        let identity = peer.map(ToString::to_string);
        let mut store = self.store();
        let mut acked = 0;
        for r in &batch.reports {
            match store.ingest(r, identity.as_deref(), now) {
                Ok(a) => acked = a,
                // Those before it are merged: say so, and refuse the rest.
                Err(e) if acked > 0 => {
                    tracing::warn!(%workload, error = %e, "telemetry report refused");
                    break;
                }
                Err(e) => return Err(FleetError::BadReport(e.to_string())),
            }
        }
        Ok(Ack { run, acked })
    }

    /// A report (or a tap) for `workload` from `id` is that workload's own.
    pub(crate) fn check_owner(
        &self,
        writer: &Writer,
        workload: &str,
        id: &SpiffeId,
    ) -> Result<(), FleetError> {
        if workload.is_empty() {
            return Ok(());
        }
        let forbidden = |why: String| {
            FleetError::Forbidden(format!("a report for {workload} from {id}: {why}"))
        };
        let (ns, name) = workload.split_once('/').ok_or_else(|| {
            FleetError::BadReport(format!("workload {workload:?} is not NAMESPACE/NAME"))
        })?;
        if ns != id.namespace {
            return Err(forbidden(format!(
                "the identity is of namespace {}",
                id.namespace
            )));
        }
        let stored = writer
            .followed(&Key::new("Workload", ns, name))
            .ok_or_else(|| forbidden("no such Workload".into()))?;
        let owner = stored["spec"]["identity"].as_str().unwrap_or_default();
        if owner != id.identity {
            return Err(forbidden(format!(
                "the Workload belongs to identity {owner:?}"
            )));
        }
        Ok(())
    }

    /// This replica's part of the window of `window_ms` before `at_ms`, with the identities
    /// its reporters proved: what another replica merges into its answer.
    fn local(
        &self,
        sel: &Selector,
        window_ms: u64,
        at_ms: u64,
    ) -> Result<(Window, Ids), FleetError> {
        let store = self.store();
        self.covers(&store, window_ms)?;
        let w = store.window(at_ms, window_ms, |_| true, |k| view::wants_latency(sel, k));
        let ids = store
            .reporters()
            .iter()
            .filter_map(|(k, r)| Some((k.to_string(), r.identity.clone()?)))
            .collect();
        Ok((w, ids))
    }

    /// This replica's part of a window, for another replica.
    pub(crate) fn shard(
        &self,
        sel: &Selector,
        window_ms: u64,
        at_ms: u64,
    ) -> Result<Shard, FleetError> {
        let (w, ids) = self.local(sel, window_ms, at_ms)?;
        Ok(Shard::of(&w, &ids))
    }

    /// The whole fleet's window: this replica's, with `others`' parts merged in.
    fn merged(
        &self,
        sel: &Selector,
        window_ms: u64,
        at_ms: u64,
        others: Vec<Shard>,
    ) -> Result<(Window, Ids), FleetError> {
        let (mut w, mut ids) = self.local(sel, window_ms, at_ms)?;
        for s in others {
            match s.into_window() {
                Ok((o, o_ids)) => {
                    w.merge(o);
                    ids.extend(o_ids);
                }
                Err(e) => tracing::warn!(error = %e, "another replica's part refused"),
            }
        }
        Ok((w, ids))
    }

    /// The whole fleet's window of `window_ms` before `at_ms` (every series), with other
    /// replicas' parts: what a rollout's analysis reads.
    pub(crate) fn window(
        &self,
        window_ms: u64,
        at_ms: u64,
        others: Vec<Shard>,
    ) -> Result<Window, FleetError> {
        let window_ms = window_ms.clamp(1_000, self.max_window_ms());
        Ok(self
            .merged(&Selector::default(), window_ms, at_ms, others)?
            .0)
    }

    /// `trellis stat` over the `window_ms` before `at_ms`, with other replicas' parts.
    pub(crate) fn stat(
        &self,
        sel: &Selector,
        window_ms: u64,
        at_ms: u64,
        others: Vec<Shard>,
    ) -> Result<Vec<StatRow>, FleetError> {
        let (w, _) = self.merged(sel, window_ms, at_ms, others)?;
        Ok(view::stat(&w, sel, covered_s(at_ms, &w)))
    }

    /// `service`'s timeline over the `window_ms` before `at_ms`, from the reports this
    /// replica received.
    pub(crate) fn timeline(
        &self,
        service: &str,
        window_ms: u64,
        at_ms: u64,
    ) -> trellis_telemetry::store::Timeline {
        self.store().timeline(at_ms, window_ms, service)
    }

    /// A window the store holds whole, or why not.
    fn covers(&self, store: &Store, window_ms: u64) -> Result<(), FleetError> {
        let held = store.held_from_ms();
        if held > 0 && now_ms().saturating_sub(window_ms) < held {
            return Err(FleetError::BadReport(format!(
                "window: the control plane holds only the last {} s (its telemetry memory, --telemetry-memory, is full); ask for less",
                now_ms().saturating_sub(held) / 1000
            )));
        }
        Ok(())
    }

    /// `trellis diagnose` over the `window_ms` before `at_ms`, with other replicas' parts:
    /// the verdicts whose place or services `sel` names, and what the fleet's window held to
    /// judge.
    pub(crate) fn diagnose(
        &self,
        sel: &Selector,
        window_ms: u64,
        at_ms: u64,
        others: Vec<Shard>,
        facts: &Facts,
    ) -> Result<(Vec<Verdict>, diagnose::Judged), FleetError> {
        let (w, _) = self.merged(&Selector::default(), window_ms, at_ms, others)?;
        Ok(judge(&w, facts, sel))
    }

    /// `trellis edges` over the `window_ms` before `at_ms`, with other replicas' parts.
    pub(crate) fn edges(
        &self,
        sel: &Selector,
        window_ms: u64,
        at_ms: u64,
        others: Vec<Shard>,
    ) -> Result<Vec<EdgeRow>, FleetError> {
        let (w, ids) = self.merged(sel, window_ms, at_ms, others)?;
        Ok(self.edge_rows(&w, &ids, sel, at_ms))
    }

    /// The edges of a merged window.
    fn edge_rows(&self, w: &Window, ids: &Ids, sel: &Selector, at_ms: u64) -> Vec<EdgeRow> {
        let mut rows = view::edges(w, sel, covered_s(at_ms, w), |wl| ids.get(wl).cloned());
        // Callers name the identity their callee must present `namespace/identity`: shown as
        // SPIFFE IDs, like the callers' own.
        for r in &mut rows {
            if !r.dst_identity.is_empty() && !r.dst_identity.starts_with("spiffe://") {
                if let Some((ns, sa)) = r.dst_identity.split_once('/') {
                    r.dst_identity = format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain);
                }
            }
        }
        rows
    }

    /// What the pane shows at once: stat (by `sel`), edges (by workload) and diagnose, from
    /// one merged window (the store read and the other replicas' parts decoded once).
    pub(crate) fn figures(
        &self,
        sel: &Selector,
        window_ms: u64,
        at_ms: u64,
        others: Vec<Shard>,
        facts: &Facts,
    ) -> Result<Figures, FleetError> {
        let (w, ids) = self.merged(&Selector::default(), window_ms, at_ms, others)?;
        let stat = view::stat(&w, sel, covered_s(at_ms, &w));
        let by_workload = Selector {
            kind: Some(view::Kind::Workload),
            ..sel.clone()
        };
        let edges = self.edge_rows(&w, &ids, &by_workload, at_ms);
        Ok((stat, edges, judge(&w, facts, sel), view::mirrors(&w, sel)))
    }

    /// Mirrors over the `window_ms` before `at_ms`, with other replicas' parts.
    pub(crate) fn mirrors(
        &self,
        sel: &Selector,
        window_ms: u64,
        at_ms: u64,
        others: Vec<Shard>,
    ) -> Result<Vec<view::MirrorRow>, FleetError> {
        let (w, _) = self.merged(&Selector::default(), window_ms, at_ms, others)?;
        Ok(view::mirrors(&w, sel))
    }

    /// What each reporting proxy last said of itself, for `trellis check`.
    pub(crate) fn reporters(&self) -> Vec<ReporterInfo> {
        let mut v: Vec<ReporterInfo> = self
            .store()
            .reporters()
            .iter()
            .map(|(name, r)| ReporterInfo {
                name: name.to_string(),
                cert_not_after_ms: r.cert_not_after_ms,
                skew_ms: r.skew_ms,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// What the proxies reporting to this replica said of `workload`'s endpoints since
    /// `from_ms`: ejected by outlier detection, or let back in.
    pub(crate) fn ejections_of(
        &self,
        workload: &str,
        from_ms: u64,
    ) -> Vec<std::sync::Arc<trellis_telemetry::store::Ejected>> {
        self.store().ejections_of(workload, from_ms)
    }

    /// The longest window a query may ask for.
    pub(crate) fn max_window_ms(&self) -> u64 {
        max_window_ms(self.store().limits())
    }

    /// The fleet for a Prometheus scrape.
    pub(crate) fn prometheus(&self) -> String {
        trellis_telemetry::export::prometheus(&self.store())
    }
}
