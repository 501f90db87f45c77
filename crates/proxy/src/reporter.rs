//! The proxy's reports to the control plane: every period (10 s by default), what it
//! recorded (see [`crate::summary`]) as one numbered report, pushed as protobuf to
//! `POST /v1/telemetry` over the HTTP/2 connection it already holds for xDS (mutual TLS when
//! the control plane is `https://`, so the control plane knows who reports).
//!
//! Reports wait in a bounded queue until the control plane acknowledges them: a proxy cut off
//! from its control plane keeps serving and keeps the last [`PENDING`] periods, sent in order
//! when it reconnects; the control plane's acknowledgement names the highest number merged,
//! so a resent period is not counted twice. A period with nothing recorded is not sent (its
//! number is not used). At shutdown the last period is sent before the proxy exits.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use prost::Message;
use tokio::sync::oneshot;
use trellis_telemetry::report::{Ack, Batch, Report};

use crate::{
    control_link::{Control, Link},
    shared::Shared,
};

/// Periods held while the control plane does not acknowledge (15 minutes at 10 s).
pub(crate) const PENDING: usize = 90;
/// Series per report; beyond, the quietest fold into `other` rows.
pub(crate) const SERIES_CAP: usize = 500;
/// Reports per request.
const BATCH: usize = 30;
/// How long a push may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A request to send what is recorded now, answered when done (at shutdown).
pub(crate) type Flush = oneshot::Sender<()>;

/// Report every `every` until `flush` asks for a last one (or is dropped).
pub(crate) async fn run(
    shared: Arc<Shared>,
    every: Duration,
    node: String,
    mut link: Link,
    mut flush: tokio::sync::mpsc::Receiver<Flush>,
) {
    let mut r = Reporter {
        shared,
        node,
        run: fastrand::u64(1..),
        seq: 0,
        pending: VecDeque::new(),
        period_start: now_ms(),
        dropped: 0,
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let links = r.links().await;
                r.close_period(links);
            }
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            f = flush.recv() => {
                r.close_period(Vec::new());
                let ctl = link.borrow().clone();
                if let Some(ctl) = ctl {
                    r.send(&ctl).await;
                }
                if let Some(done) = f {
                    let _ = done.send(());
                }
                return;
            }
        }
        let ctl = link.borrow().clone();
        if let Some(ctl) = ctl {
            r.send(&ctl).await;
        }
    }
}

use crate::summary::now_ms;

/// What `m` holds, leaving it empty.
fn take<T: Default>(m: &std::sync::Mutex<T>) -> T {
    std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
}

struct Reporter {
    shared: Arc<Shared>,
    node: String,
    run: u64,
    seq: u64,
    pending: VecDeque<Report>,
    period_start: u64,
    dropped: u64,
}

impl Reporter {
    /// End the current period: its report joins the queue (if anything was recorded).
    /// The kernel's figures of the links to every endpoint this proxy may call (on a
    /// blocking thread: it runs `ss`).
    async fn links(&self) -> Vec<trellis_telemetry::report::Link> {
        let snap = self.shared.state.load();
        let peers: std::collections::HashMap<std::net::SocketAddr, String> = snap
            .clusters
            .values()
            .flat_map(|c| c.endpoints.iter())
            .map(|e| {
                (
                    e.target,
                    e.workload_id.get().unwrap_or_default().to_string(),
                )
            })
            .collect();
        tokio::task::spawn_blocking(move || crate::links::sample(&peers))
            .await
            .unwrap_or_default()
    }

    fn close_period(&mut self, links: Vec<trellis_telemetry::report::Link>) {
        let now = now_ms();
        let start = std::mem::replace(&mut self.period_start, now);
        let metrics = &self.shared.telemetry.metrics;
        let requests = metrics.take_periods();
        let period = {
            let mut tcp = metrics.tcp_summary.lock().expect("tcp summary lock");
            crate::summary::series(requests, &mut tcp, SERIES_CAP)
        };
        let (failed, slow) = (take(&metrics.failed), take(&metrics.slow));
        let ejections = take(&metrics.ejections_told);
        // An idle period is reported too, empty: that the proxy reports says that it, and its
        // host, are up (diagnose tells a cut link from a dead host by it), and its
        // certificate's expiry and clock stay current.
        let snap = self.shared.state.load();
        let local = snap.cfg.local.as_ref();
        self.seq += 1;
        self.pending.push_back(Report {
            workload: local.map(|l| l.id.to_string()).unwrap_or_default(),
            node: self.node.clone(),
            environment: local
                .map(|l| l.environment.as_str().to_string())
                .unwrap_or_default(),
            locality: local
                .map(|l| {
                    let l = &l.locality;
                    format!(
                        "{}/{}",
                        l.region.as_deref().unwrap_or_default(),
                        l.zone.as_deref().unwrap_or_default()
                    )
                })
                .filter(|l| l != "/")
                .unwrap_or_default(),
            run: self.run,
            seq: self.seq,
            start_ms: start,
            period_ms: now.saturating_sub(start).min(u64::from(u32::MAX)) as u32,
            series: period.series,
            latencies: period.latencies,
            folded: period.folded,
            cert_not_after_ms: self.shared.identity.as_ref().map_or(0, |c| {
                c.load()
                    .info
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            }),
            sent_ms: 0,
            adaptive: snap.inbound.iter().any(|t| t.adaptive.enabled).then(|| {
                let (limit, in_flight, _) = self.shared.adaptive.figures();
                trellis_telemetry::report::Adaptive { limit, in_flight }
            }),
            attempts_below: failed.below(),
            slow_below: slow.below(),
            slow: slow.items,
            ejections,
            mirrors: metrics.mirrors.take(),
            attempts: failed.items,
            attempts_dropped: failed.dropped,
            links,
        });
        while self.pending.len() > PENDING {
            self.pending.pop_front();
            self.dropped += 1;
            // Once, then every tenth: a long outage is one line a few minutes, not a flood.
            if self.dropped % 10 == 1 {
                tracing::warn!(
                    dropped = self.dropped,
                    "telemetry report dropped: the control plane has not taken reports for {PENDING} periods"
                );
            }
        }
    }

    /// Push what is queued, oldest first, until it is all acknowledged or a push fails.
    async fn send(&mut self, ctl: &Control) {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(BATCH);
            let sent_ms = now_ms();
            let batch = Batch {
                reports: self
                    .pending
                    .iter()
                    .take(n)
                    .map(|r| Report {
                        sent_ms,
                        ..r.clone()
                    })
                    .collect(),
            };
            match push(ctl, &batch).await {
                Ok(ack) if ack.run == self.run => {
                    self.pending.retain(|r| r.seq > ack.acked);
                    if ack.acked < batch.reports[n - 1].seq {
                        // Merged only in part: the rest is refused; try again next period.
                        return;
                    }
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::info!(error = %e, pending = self.pending.len(), "telemetry report not taken; kept for the next try");
                    return;
                }
            }
        }
    }
}

async fn push(ctl: &Control, batch: &Batch) -> Result<Ack, String> {
    let body = batch.encode_to_vec();
    let answer = ctl
        .post(
            "/v1/telemetry",
            "application/x-protobuf",
            body,
            SEND_TIMEOUT,
        )
        .await?;
    Ack::decode(answer).map_err(|e| format!("answer: {e}"))
}
