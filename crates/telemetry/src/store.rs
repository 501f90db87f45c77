//! The control plane's memory of the fleet's reports: per series, 10 s slots for 15 minutes
//! and 1 minute slots for 24 hours (by default), merged from every proxy's reports.
//!
//! Memory is bounded whatever the traffic: at most [`Limits::series_per_reporter`] series per
//! proxy and [`Limits::series`] in all; a series beyond either cap is folded into its
//! reporter's `other` row (same direction, class and status, every other label `other`), and
//! [`Store::folded`] counts the folding. Each series holds at most `fine_slots +
//! coarse_slots` slots, each at most one histogram of [`crate::hist::MAX_BUCKETS`] buckets.
//!
//! Reports are numbered per proxy run: a report already merged (a resend after a lost answer)
//! is not merged again, and a gap (periods the proxy dropped, or a control plane that
//! restarted) is counted in [`Store::lost`].

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use trellis_taxonomy::FailureClass;

use crate::{
    hist::Histogram,
    key::{Direction, Key, Protocol, Stats},
    report::{Report, Series},
};

/// Sizes and caps.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Length of a fine slot, ms.
    pub fine_ms: u64,
    /// Fine slots kept.
    pub fine_slots: usize,
    /// Length of a coarse slot, ms (a multiple of `fine_ms`).
    pub coarse_ms: u64,
    /// Coarse slots kept.
    pub coarse_slots: usize,
    /// Series one proxy may have.
    pub series_per_reporter: usize,
    /// Series in all.
    pub series: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fine_ms: 10_000,
            fine_slots: 90,
            coarse_ms: 60_000,
            coarse_slots: 1440,
            series_per_reporter: 500,
            series: 100_000,
        }
    }
}

/// Why a report was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A field is not what it may be.
    #[error("report {seq}: {field}: {why}")]
    Invalid {
        /// The report's number.
        seq: u64,
        /// Field path.
        field: String,
        /// What is wrong.
        why: String,
    },
}

/// What the store knows of one reporting proxy.
#[derive(Clone, Debug)]
pub struct Reporter {
    /// Its run.
    pub run: u64,
    /// The highest report number merged in that run.
    pub acked: u64,
    /// Its node id.
    pub node: String,
    /// Its identity, when it reported over mutual TLS.
    pub identity: Option<String>,
    /// Its environment.
    pub environment: Arc<str>,
    /// Its locality.
    pub locality: Arc<str>,
    /// When its latest report was received (Unix ms, the control plane's clock).
    pub seen_ms: u64,
    /// Its series in the store.
    pub series: usize,
}

#[derive(Default)]
struct Slots {
    fine: VecDeque<(u64, Stats)>,
    coarse: VecDeque<(u64, Stats)>,
}

impl Slots {
    fn add(ring: &mut VecDeque<(u64, Stats)>, slot: u64, s: &Stats) {
        match ring.binary_search_by_key(&slot, |(k, _)| *k) {
            Ok(i) => ring[i].1.merge(s),
            Err(i) => ring.insert(i, (slot, s.clone())),
        }
    }

    fn is_empty(&self) -> bool {
        self.fine.is_empty() && self.coarse.is_empty()
    }
}

/// What `/metrics` exports: counters since the control plane started, by a coarser key
/// than a series (no route, endpoint, identity or status), so that a scrape stays small.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TotalKey {
    /// Direction.
    pub direction: Direction,
    /// Protocol.
    pub protocol: Protocol,
    /// Reporting workload.
    pub workload: Arc<str>,
    /// Its environment.
    pub environment: Arc<str>,
    /// Service.
    pub service: Arc<str>,
    /// Peer workload.
    pub peer_workload: Arc<str>,
    /// Failure class.
    pub class: FailureClass,
}

/// Counters of a [`TotalKey`].
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Requests.
    pub requests: u64,
    /// Attempts.
    pub attempts: u64,
    /// Latency at scale 0 (buckets at powers of two).
    pub latency: Histogram,
    /// TCP connections closed.
    pub tcp_closed: u64,
    /// TCP bytes, both ways.
    pub tcp_bytes: u64,
}

/// The fleet's series.
pub struct Store {
    limits: Limits,
    series: HashMap<Arc<Key>, Slots>,
    totals: HashMap<TotalKey, Totals>,
    reporters: HashMap<Arc<str>, Reporter>,
    strings: HashSet<Arc<str>>,
    folded: u64,
    lost: u64,
    duplicates: u64,
    compacted_ms: u64,
}

/// The label every folded series gets.
pub const OTHER: &str = "other";

impl Store {
    /// An empty store.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            series: HashMap::new(),
            totals: HashMap::new(),
            reporters: HashMap::new(),
            strings: HashSet::new(),
            folded: 0,
            lost: 0,
            duplicates: 0,
            compacted_ms: 0,
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        self.strings.insert(a.clone());
        a
    }

    /// The name a report is filed under: its workload, or its node for a proxy with none.
    pub fn reporter_name(r: &Report) -> String {
        if r.workload.is_empty() {
            format!("node:{}", r.node)
        } else {
            r.workload.clone()
        }
    }

    /// Merge `r` (received at `now_ms`), from a proxy of `identity`; the caller has checked
    /// that the identity may speak for the report's workload. Returns the number up to which
    /// the reporter's run is merged.
    pub fn ingest(
        &mut self,
        r: &Report,
        identity: Option<&str>,
        now_ms: u64,
    ) -> Result<u64, IngestError> {
        let invalid = |field: &str, why: String| IngestError::Invalid {
            seq: r.seq,
            field: field.to_string(),
            why,
        };
        if r.seq == 0 {
            return Err(invalid("seq", "numbers start at 1".into()));
        }
        // Check every series before merging any: a report is taken whole or not at all.
        let mut parsed = Vec::with_capacity(r.series.len());
        for (i, s) in r.series.iter().enumerate() {
            parsed.push(parse(s).map_err(|(f, why)| invalid(&format!("series[{i}].{f}"), why))?);
        }
        self.compact(now_ms);
        let name = self.intern(&Self::reporter_name(r));
        let environment = self.intern(&r.environment);
        let locality = self.intern(&r.locality);
        let rep = self
            .reporters
            .entry(name.clone())
            .or_insert_with(|| Reporter {
                run: r.run,
                acked: 0,
                node: r.node.clone(),
                identity: None,
                environment: environment.clone(),
                locality: locality.clone(),
                seen_ms: now_ms,
                series: 0,
            });
        rep.seen_ms = now_ms;
        rep.identity = identity.map(str::to_string);
        rep.node.clone_from(&r.node);
        rep.environment = environment.clone();
        rep.locality = locality.clone();
        if rep.run != r.run {
            // A new run of the proxy (a restart): its numbers start again.
            rep.run = r.run;
            rep.acked = 0;
        }
        if r.seq <= rep.acked {
            self.duplicates += 1;
            return Ok(rep.acked);
        }
        if rep.acked > 0 && r.seq > rep.acked + 1 {
            self.lost += r.seq - rep.acked - 1;
        }
        rep.acked = r.seq;
        let acked = rep.acked;
        self.folded += r.folded;
        // A period is filed by its start, no later than now (a proxy's clock may run ahead).
        let start = r.start_ms.min(now_ms);
        let oldest = now_ms.saturating_sub(self.limits.coarse_ms * self.limits.coarse_slots as u64);
        if start < oldest {
            return Ok(acked);
        }
        for (s, mut stats) in parsed {
            if let Some(open) = s.tcp_open {
                stats.tcp_open = Some((open, start));
            }
            let key = Key {
                direction: s.direction,
                protocol: s.protocol,
                workload: name.clone(),
                environment: environment.clone(),
                locality: locality.clone(),
                service: self.intern(&s.service),
                route: self.intern(&s.route),
                peer_workload: self.intern(&s.peer_workload),
                peer_identity: self.intern(&s.peer_identity),
                peer_environment: self.intern(&s.peer_environment),
                peer_locality: self.intern(&s.peer_locality),
                endpoint: self.intern(&s.endpoint),
                mtls: s.mtls,
                class: s.class,
                status_class: s.status_class,
            };
            let key = self.admit(key);
            let t = self
                .totals
                .entry(TotalKey {
                    direction: key.direction,
                    protocol: key.protocol,
                    workload: key.workload.clone(),
                    environment: key.environment.clone(),
                    service: key.service.clone(),
                    peer_workload: key.peer_workload.clone(),
                    class: key.class,
                })
                .or_insert_with(|| Totals {
                    latency: Histogram::new(0),
                    ..Totals::default()
                });
            t.requests += stats.requests;
            t.attempts += stats.attempts.max(stats.requests);
            t.latency.merge(&stats.latency);
            t.tcp_closed += stats.tcp_closed;
            t.tcp_bytes += stats.bytes_sent + stats.bytes_received;
            let fine = start / self.limits.fine_ms;
            let slots = self.series.entry(key).or_default();
            if start + self.limits.fine_ms * self.limits.fine_slots as u64 >= now_ms {
                Slots::add(&mut slots.fine, fine, &stats);
            } else {
                Slots::add(&mut slots.coarse, start / self.limits.coarse_ms, &stats);
            }
        }
        Ok(acked)
    }

    /// The key to file under: `key` itself, or its `other` row when a cap is reached.
    fn admit(&mut self, key: Key) -> Arc<Key> {
        if let Some((k, _)) = self.series.get_key_value(&key) {
            return k.clone();
        }
        let full = self
            .reporters
            .get(&key.workload)
            .is_some_and(|r| r.series >= self.limits.series_per_reporter)
            || self.series.len() >= self.limits.series;
        let key = if full {
            self.folded += 1;
            let other = self.intern(OTHER);
            let folded = Key {
                service: other.clone(),
                route: other.clone(),
                peer_workload: other.clone(),
                peer_identity: other.clone(),
                peer_environment: other.clone(),
                peer_locality: other.clone(),
                endpoint: other,
                mtls: false,
                ..key
            };
            if let Some((k, _)) = self.series.get_key_value(&folded) {
                return k.clone();
            }
            folded
        } else {
            key
        };
        // An `other` row is made even at the cap: at most one per reporter, direction,
        // protocol, class and status, so still bounded.
        if let Some(r) = self.reporters.get_mut(&key.workload) {
            r.series += 1;
        }
        Arc::new(key)
    }

    /// Move fine slots older than their retention into coarse ones, drop coarse slots older
    /// than theirs, and forget series left with nothing (at most once per fine slot).
    pub fn compact(&mut self, now_ms: u64) {
        if now_ms < self.compacted_ms + self.limits.fine_ms {
            return;
        }
        self.compacted_ms = now_ms;
        let l = &self.limits;
        let fine_from = now_ms.saturating_sub(l.fine_ms * l.fine_slots as u64) / l.fine_ms;
        let coarse_from = now_ms.saturating_sub(l.coarse_ms * l.coarse_slots as u64) / l.coarse_ms;
        let ratio = (l.coarse_ms / l.fine_ms).max(1);
        let reporters = &mut self.reporters;
        self.series.retain(|k, s| {
            while s.fine.front().is_some_and(|(slot, _)| *slot < fine_from) {
                let (slot, stats) = s.fine.pop_front().expect("checked");
                Slots::add(&mut s.coarse, slot / ratio, &stats);
            }
            while s
                .coarse
                .front()
                .is_some_and(|(slot, _)| *slot < coarse_from)
            {
                s.coarse.pop_front();
            }
            for (_, st) in s.coarse.iter_mut() {
                st.latency.shrink();
            }
            let keep = !s.is_empty();
            if !keep {
                if let Some(r) = reporters.get_mut(&k.workload) {
                    r.series = r.series.saturating_sub(1);
                }
            }
            keep
        });
        self.reporters
            .retain(|_, r| r.series > 0 || r.seen_ms >= coarse_from * l.coarse_ms);
        self.strings.retain(|s| Arc::strong_count(s) > 1);
    }

    /// Every series with what it adds up to over the `window_ms` before `now_ms`, among those
    /// `keep` selects.
    pub fn window(
        &self,
        now_ms: u64,
        window_ms: u64,
        keep: impl Fn(&Key) -> bool,
    ) -> Vec<(Arc<Key>, Stats)> {
        let from = now_ms.saturating_sub(window_ms);
        let l = &self.limits;
        let mut out = Vec::new();
        for (k, s) in &self.series {
            if !keep(k) {
                continue;
            }
            let mut total = Stats::default();
            let mut any = false;
            // A slot counts when it starts within the window.
            for (slot, st) in s.fine.iter().rev() {
                if slot * l.fine_ms < from {
                    break;
                }
                total.merge(st);
                any = true;
            }
            for (slot, st) in s.coarse.iter().rev() {
                if slot * l.coarse_ms < from {
                    break;
                }
                total.merge(st);
                any = true;
            }
            if any {
                out.push((k.clone(), total));
            }
        }
        out
    }

    /// Counters since the start, for `/metrics`.
    pub fn totals(&self) -> &HashMap<TotalKey, Totals> {
        &self.totals
    }

    /// The proxies heard from.
    pub fn reporters(&self) -> &HashMap<Arc<str>, Reporter> {
        &self.reporters
    }

    /// How many series.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Series folded into `other` rows, here and by proxies.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// Reports never received (gaps in a run's numbers).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Reports received again after they were merged.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// An estimate of the heap the series hold, bytes.
    pub fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(u64, Stats)>();
        self.series
            .values()
            .map(|s| {
                (s.fine.capacity() + s.coarse.capacity()) * slot
                    + s.fine
                        .iter()
                        .chain(&s.coarse)
                        .map(|(_, st)| st.heap_bytes())
                        .sum::<usize>()
                    + std::mem::size_of::<Key>()
                    + 64
            })
            .sum::<usize>()
            + self.strings.iter().map(|s| s.len() + 32).sum::<usize>()
    }
}

/// A series' key fields and figures, checked.
struct Parsed {
    direction: Direction,
    protocol: Protocol,
    service: String,
    route: String,
    peer_workload: String,
    peer_identity: String,
    peer_environment: String,
    peer_locality: String,
    endpoint: String,
    mtls: bool,
    class: FailureClass,
    status_class: u8,
    tcp_open: Option<u64>,
}

/// Longest label accepted.
const MAX_LABEL: usize = 512;

fn parse(s: &Series) -> Result<(Parsed, Stats), (&'static str, String)> {
    let direction = match s.direction {
        0 => Direction::Outbound,
        1 => Direction::Inbound,
        n => {
            return Err((
                "direction",
                format!("{n} is neither 0 (outbound) nor 1 (inbound)"),
            ))
        }
    };
    let protocol = match s.protocol {
        0 => Protocol::Http,
        1 => Protocol::Tcp,
        n => return Err(("protocol", format!("{n} is neither 0 (HTTP) nor 1 (TCP)"))),
    };
    let class: FailureClass = s
        .class
        .parse()
        .map_err(|_| ("class", format!("{:?} is not a failure class", s.class)))?;
    let status_class = match s.status_class {
        0..=5 => s.status_class as u8,
        n => return Err(("status_class", format!("{n} is not 0-5"))),
    };
    for (f, v) in [
        ("service", &s.service),
        ("route", &s.route),
        ("peer_workload", &s.peer_workload),
        ("peer_identity", &s.peer_identity),
        ("peer_environment", &s.peer_environment),
        ("peer_locality", &s.peer_locality),
        ("endpoint", &s.endpoint),
    ] {
        if v.len() > MAX_LABEL {
            return Err((f, format!("{} bytes, at most {MAX_LABEL}", v.len())));
        }
    }
    let latency = match &s.latency {
        Some(h) => Histogram::try_from(h).map_err(|e| ("latency", e))?,
        None => Histogram::default(),
    };
    let stats = Stats {
        requests: s.requests,
        attempts: s.attempts,
        latency,
        tcp_opened: s.tcp_opened,
        tcp_closed: s.tcp_closed,
        bytes_sent: s.bytes_sent,
        bytes_received: s.bytes_received,
        tcp_open: None,
    };
    let p = Parsed {
        direction,
        protocol,
        service: s.service.clone(),
        route: s.route.clone(),
        peer_workload: s.peer_workload.clone(),
        peer_identity: s.peer_identity.clone(),
        peer_environment: s.peer_environment.clone(),
        peer_locality: s.peer_locality.clone(),
        endpoint: s.endpoint.clone(),
        mtls: s.mtls,
        class,
        status_class,
        tcp_open: (protocol == Protocol::Tcp).then_some(s.tcp_open),
    };
    Ok((p, stats))
}

#[cfg(test)]
mod tests;
