//! The proxy's side of the load exchange behind spill-over ([`trellis_telemetry::load`]):
//! every so often (as the control plane's last answer says: about a second while some
//! service has a spill-over policy, ten otherwise) tell it how loaded this workload is, and
//! take the spill-over shares it answers into every cluster of those services. On the
//! connection the proxy holds for xDS; without one, the shares last given stay.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use trellis_telemetry::load::{Answer, Beacon};

use crate::{
    control_link::{Control, Link},
    shared::Shared,
};

/// Until the control plane says otherwise.
const FIRST_EVERY: Duration = Duration::from_secs(1);
/// The bounds of what it may say.
const MIN_EVERY: Duration = Duration::from_millis(200);
const MAX_EVERY: Duration = Duration::from_secs(60);
/// How long one exchange may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Exchange loads for shares while the proxy runs.
pub(crate) async fn run(shared: Arc<Shared>, workload: String, link: Link) {
    let mut every = FIRST_EVERY;
    let (mut last, mut last_shed) = (Instant::now(), shared.adaptive.figures().2);
    loop {
        tokio::time::sleep(every).await;
        let Some(ctl) = link.borrow().clone() else {
            continue;
        };
        let now = Instant::now();
        let (limit, in_flight_now, shed) = shared.adaptive.figures();
        let enabled = shared
            .state
            .load()
            .inbound
            .iter()
            .any(|t| t.adaptive.enabled);
        let (busy, answered) = shared.adaptive.take_busy();
        let period = now.duration_since(last).as_secs_f64().max(0.001);
        let beacon = Beacon {
            workload: workload.clone(),
            limit: if enabled { limit } else { 0 },
            // Little's law counts requests as they end; those in flight now (stuck behind a
            // saturated application, say) count too.
            in_flight_milli: ((busy / period).max(f64::from(in_flight_now)) * 1000.0) as u64,
            shed: shed.saturating_sub(last_shed),
            answered,
        };
        (last, last_shed) = (now, shed);
        match exchange(&ctl, &beacon).await {
            Ok(a) => {
                every = Duration::from_millis(u64::from(a.every_ms)).clamp(MIN_EVERY, MAX_EVERY);
                apply(&shared, &a);
            }
            Err(e) => tracing::debug!(error = %e, "load exchange with the control plane failed"),
        }
    }
}

/// Set the shares of every cluster whose service has a spill-over policy (0 for a service
/// the answer does not name: the control plane has decided nothing for it).
fn apply(shared: &Shared, a: &Answer) {
    let snap = shared.state.load();
    for c in snap.clusters.values() {
        let Some(shares) = c.spill_shares() else {
            continue;
        };
        let service = c.cfg.service.to_string();
        let given = a.spill.iter().find(|s| s.service == service);
        shares.set(given.map_or(&[][..], |s| &s.permille));
    }
}

async fn exchange(ctl: &Control, beacon: &Beacon) -> Result<Answer, String> {
    let body = serde_json::to_vec(beacon).map_err(|e| e.to_string())?;
    let answer = ctl
        .post("/v1/load", "application/json", body, TIMEOUT)
        .await?;
    serde_json::from_slice(&answer).map_err(|e| format!("answer: {e}"))
}
