//! The control plane's memory of the fleet's reports: per series, counts in 10 s slots for
//! 15 minutes and 1 minute slots for 24 hours (by default); per direction, service and peer
//! workload, latency histograms in the same slots (a quantile within 1.1 % in the fine
//! slots, 4.4 % in the coarse ones, which are kept at a lower scale).
//!
//! Memory is bounded whatever the traffic, twice:
//! - at most [`Limits::series_per_reporter`] series per proxy and [`Limits::series`] in all:
//!   a series beyond either cap is folded into its reporter's `other` row (same direction,
//!   class and status, every other label `other`), and [`Store::folded`] counts the folding;
//! - at most [`Limits::memory`] bytes of slots (the store counts them as it goes): beyond, the
//!   oldest coarse slots go first, then the oldest fine ones, and [`Store::held_from_ms`]
//!   says from when the store still holds everything, so a query over a longer window says
//!   so instead of answering short.
//!
//! Reports are numbered per proxy run: a report already merged (a resend after a lost answer)
//! is not merged again, and a gap (periods the proxy dropped, or a control plane that
//! restarted) is counted in [`Store::lost`].

use std::{collections::VecDeque, sync::Arc};

use trellis_taxonomy::FailureClass;

use crate::{
    fx::{FxMap, FxSet},
    hist::Histogram,
    key::{Counts, Direction, Key, LatKey, Protocol},
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
    /// Bytes the slots may take.
    pub memory: usize,
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
            memory: 512 << 20,
        }
    }
}

/// The scale of histograms in coarse slots (buckets 2^(1/8) wide: a quantile within 4.4 %).
pub const COARSE_SCALE: i8 = 3;

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
    /// When its certificate expires (Unix ms; 0: unknown or none).
    pub cert_not_after_ms: u64,
    /// Its clock minus the control plane's, at its latest report (ms; the network's delay
    /// included, so a few ms are noise).
    pub skew_ms: i64,
    /// The kernel's figures of its upstream links, at its latest report that had any.
    pub links: Vec<crate::report::Link>,
    /// Its adaptive concurrency limit, as last reported.
    pub adaptive: Option<crate::report::Adaptive>,
    /// When those came (Unix ms).
    pub links_ms: u64,
}

/// Slots by index, oldest first.
type Ring<T> = VecDeque<(u32, T)>;

/// Bytes a slot of counts takes.
const COUNTS_BYTES: usize = std::mem::size_of::<(u32, Counts)>();
/// Bytes a key takes (its map entry, its `Arc`, its shared strings' pointers).
const KEY_BYTES: usize = std::mem::size_of::<Key>() + 64;

fn hist_bytes(h: &Histogram) -> usize {
    std::mem::size_of::<(u32, Histogram)>() + h.counts().len() * 8
}

/// Add `v` at `slot` of `ring`; the bytes it took.
fn add_counts(ring: &mut Ring<Counts>, slot: u32, v: &Counts) -> usize {
    match ring.binary_search_by_key(&slot, |(k, _)| *k) {
        Ok(i) => {
            ring[i].1.merge(v);
            0
        }
        Err(i) => {
            ring.insert(i, (slot, *v));
            COUNTS_BYTES
        }
    }
}

/// Add `h` at `slot` of `ring` (at most `scale`); the change in bytes.
fn add_hist(ring: &mut Ring<Histogram>, slot: u32, h: &Histogram, scale: i8) -> isize {
    match ring.binary_search_by_key(&slot, |(k, _)| *k) {
        Ok(i) => {
            let before = hist_bytes(&ring[i].1);
            ring[i].1.merge(h);
            hist_bytes(&ring[i].1) as isize - before as isize
        }
        Err(i) => {
            let mut h = h.clone();
            h.downscale(h.scale() - scale);
            h.shrink();
            let b = hist_bytes(&h);
            ring.insert(i, (slot, h));
            b as isize
        }
    }
}

#[derive(Default)]
struct Slots<T> {
    fine: Ring<T>,
    coarse: Ring<T>,
}

impl<T> Slots<T> {
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
    /// TCP connections closed.
    pub tcp_closed: u64,
    /// TCP bytes, both ways.
    pub tcp_bytes: u64,
}

/// A failed request as a proxy listed it, with who listed it.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedAttempt {
    /// The reporting workload.
    pub reporter: Arc<str>,
    /// When the control plane received it (Unix ms).
    pub received_ms: u64,
    /// What the proxy said.
    pub attempt: crate::report::Attempt,
    /// Its period's list holds every failed attempt with an id up to this one
    /// (`u64::MAX`: every one of the period).
    pub listed_below: u64,
}

/// Failed requests kept one by one, the newest at most.
pub const ATTEMPTS_KEPT: usize = 20_000;
/// Slow requests kept one by one, the newest at most.
pub const SLOW_KEPT: usize = 10_000;
/// Slow requests taken from one report at most (a proxy lists 64).
const SLOW_PER_REPORT: usize = 64;
/// Ejections kept, the newest at most.
pub const EJECTIONS_KEPT: usize = 5_000;
/// Ejections taken from one report at most (a proxy lists 64).
const EJECTIONS_PER_REPORT: usize = 64;

/// Mirror figures kept at most (per period and route of each proxy).
pub const MIRRORS_KEPT: usize = 5_000;
/// Mirror figures taken from one report at most.
const MIRRORS_PER_REPORT: usize = 64;

/// A period's mirror figures as a proxy told them, with who told them.
#[derive(Clone, Debug, PartialEq)]
pub struct MirrorFigures {
    /// The reporting workload (the caller whose proxy mirrored).
    pub reporter: Arc<str>,
    /// When the control plane received them (Unix ms).
    pub received_ms: u64,
    /// What the proxy said.
    pub figures: crate::report::Mirrored,
}

impl Received for MirrorFigures {
    fn received_ms(&self) -> u64 {
        self.received_ms
    }
}

/// An ejection as a proxy told it, with who told it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ejected {
    /// The reporting workload (the caller whose outlier detection ejected).
    pub reporter: Arc<str>,
    /// When the control plane received it (Unix ms).
    pub received_ms: u64,
    /// What the proxy said.
    pub ejection: crate::report::Ejection,
}

/// What the control plane keeps one by one, by when it received it.
trait Received {
    fn received_ms(&self) -> u64;
}

impl Received for FailedAttempt {
    fn received_ms(&self) -> u64 {
        self.received_ms
    }
}

impl Received for Ejected {
    fn received_ms(&self) -> u64 {
        self.received_ms
    }
}

/// The newest `cap` items received, oldest first.
struct Kept<T> {
    items: std::collections::VecDeque<Arc<T>>,
    cap: usize,
}

impl<T: Received> Kept<T> {
    fn new(cap: usize) -> Self {
        Self {
            items: Default::default(),
            cap,
        }
    }

    /// Keep `item`; whether the oldest had to go for it.
    fn push(&mut self, item: T) -> bool {
        let full = self.items.len() == self.cap;
        if full {
            self.items.pop_front();
        }
        self.items.push_back(Arc::new(item));
        full
    }

    /// Those received since `from_ms`, oldest first.
    fn since(&self, from_ms: u64) -> impl Iterator<Item = &Arc<T>> {
        let from = self
            .items
            .iter()
            .rposition(|x| x.received_ms() < from_ms)
            .map_or(0, |i| i + 1);
        self.items.range(from..)
    }
}

/// A report's `…_below` bound as kept: 0 (the list is whole) as `u64::MAX`.
fn whole_if_zero(below: u64) -> u64 {
    match below {
        0 => u64::MAX,
        t => t,
    }
}

/// A window of the store: every series and latency group with what it adds up to.
#[derive(Default)]
pub struct Window {
    /// Failed requests listed one by one in the window (newest last).
    pub attempts: Vec<Arc<FailedAttempt>>,
    /// Each reporter's latest link figures, if they came in the window.
    pub links: Vec<(Arc<str>, crate::report::Link)>,
    /// The reporters heard from in the window, with when last (Unix ms): their proxies,
    /// and so their hosts, were up then.
    pub reporting: Vec<(Arc<str>, u64)>,
    /// Their adaptive concurrency limits, as last reported in the window.
    pub adaptive: Vec<(Arc<str>, crate::report::Adaptive)>,
    /// Endpoints ejected (or let back in) by the proxies' outlier detection in the window,
    /// oldest first.
    pub ejections: Vec<Arc<Ejected>>,
    /// Slow requests (not failed) listed one by one in the window (newest last).
    pub slow: Vec<Arc<FailedAttempt>>,
    /// Mirrored requests' figures received in the window, oldest first.
    pub mirrors: Vec<Arc<MirrorFigures>>,
    /// Series and their counts.
    pub series: Vec<(Arc<Key>, Counts)>,
    /// Latency groups and their histograms.
    pub latency: Vec<(Arc<LatKey>, Histogram)>,
    /// Where the window really starts (Unix ms): a window covers whole slots, the one
    /// holding its start included, so it reaches back to that slot's start.
    pub from_ms: u64,
}

/// The fleet's series.
pub struct Store {
    limits: Limits,
    attempts: Kept<FailedAttempt>,
    attempts_dropped: u64,
    ejections: Kept<Ejected>,
    mirrors: Kept<MirrorFigures>,
    slow: Kept<FailedAttempt>,
    series: FxMap<Arc<Key>, Slots<Counts>>,
    latency: FxMap<Arc<LatKey>, Slots<Histogram>>,
    totals: FxMap<TotalKey, Totals>,
    latency_totals: FxMap<LatKey, Histogram>,
    reporters: FxMap<Arc<str>, Reporter>,
    strings: FxSet<Arc<str>>,
    bytes: usize,
    held_from_ms: u64,
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
            series: FxMap::default(),
            latency: FxMap::default(),
            totals: FxMap::default(),
            latency_totals: FxMap::default(),
            reporters: FxMap::default(),
            attempts: Kept::new(ATTEMPTS_KEPT),
            attempts_dropped: 0,
            ejections: Kept::new(EJECTIONS_KEPT),
            mirrors: Kept::new(MIRRORS_KEPT),
            slow: Kept::new(SLOW_KEPT),
            strings: FxSet::default(),
            bytes: 0,
            held_from_ms: 0,
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
        // Check everything before merging anything: a report is taken whole or not at all.
        let mut parsed = Vec::with_capacity(r.series.len());
        for (i, s) in r.series.iter().enumerate() {
            parsed.push(parse(s).map_err(|(f, why)| invalid(&format!("series[{i}].{f}"), why))?);
        }
        let mut lats = Vec::with_capacity(r.latencies.len());
        for (i, l) in r.latencies.iter().enumerate() {
            let at = |f: &str| format!("latencies[{i}].{f}");
            let direction = direction(l.direction).map_err(|why| invalid(&at("direction"), why))?;
            for (f, v) in [("service", &l.service), ("peer_workload", &l.peer_workload)] {
                label(v).map_err(|why| invalid(&at(f), why))?;
            }
            let h = match &l.histogram {
                Some(h) => Histogram::try_from(h).map_err(|why| invalid(&at("histogram"), why))?,
                None => continue,
            };
            lats.push((direction, l, h));
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
                node: String::new(),
                identity: None,
                environment: environment.clone(),
                locality: locality.clone(),
                seen_ms: now_ms,
                series: 0,
                cert_not_after_ms: 0,
                skew_ms: 0,
                links: Vec::new(),
                links_ms: 0,
                adaptive: None,
            });
        rep.seen_ms = now_ms;
        rep.adaptive = r.adaptive;
        if r.cert_not_after_ms > 0 {
            rep.cert_not_after_ms = r.cert_not_after_ms;
        }
        if r.sent_ms > 0 {
            rep.skew_ms = r.sent_ms as i64 - now_ms as i64;
        }
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
        if !r.links.is_empty() {
            rep.links.clone_from(&r.links);
            rep.links_ms = now_ms;
        }
        self.attempts_dropped += r.attempts_dropped;
        let listed_below = whole_if_zero(r.attempts_below);
        for a in &r.attempts {
            let evicted = self.attempts.push(FailedAttempt {
                reporter: name.clone(),
                received_ms: now_ms,
                attempt: a.clone(),
                listed_below,
            });
            self.attempts_dropped += u64::from(evicted);
        }
        let slow_below = whole_if_zero(r.slow_below);
        for a in r.slow.iter().take(SLOW_PER_REPORT) {
            self.slow.push(FailedAttempt {
                reporter: name.clone(),
                received_ms: now_ms,
                attempt: a.clone(),
                listed_below: slow_below,
            });
        }
        for e in r.ejections.iter().take(EJECTIONS_PER_REPORT) {
            self.ejections.push(Ejected {
                reporter: name.clone(),
                received_ms: now_ms,
                ejection: e.clone(),
            });
        }
        for m in r.mirrors.iter().take(MIRRORS_PER_REPORT) {
            self.mirrors.push(MirrorFigures {
                reporter: name.clone(),
                received_ms: now_ms,
                figures: m.clone(),
            });
        }
        self.folded += r.folded;
        // A period is filed by its start, no later than now (a proxy's clock may run ahead).
        let start = r.start_ms.min(now_ms);
        let l = &self.limits;
        let fine = start + l.fine_ms * l.fine_slots as u64 >= now_ms;
        let slot = if fine {
            (start / l.fine_ms) as u32
        } else {
            (start / l.coarse_ms) as u32
        };
        let too_old = start < now_ms.saturating_sub(l.coarse_ms * l.coarse_slots as u64)
            || start < self.held_from_ms;
        for (s, counts) in parsed {
            let key = Key {
                direction: s.direction,
                protocol: s.protocol,
                workload: name.clone(),
                environment: environment.clone(),
                locality: locality.clone(),
                service: self.intern(s.service),
                route: self.intern(s.route),
                peer_workload: self.intern(s.peer_workload),
                peer_identity: self.intern(s.peer_identity),
                peer_environment: self.intern(s.peer_environment),
                peer_locality: self.intern(s.peer_locality),
                endpoint: self.intern(s.endpoint),
                mtls: s.mtls,
                class: s.class,
                status_class: s.status_class,
            };
            let key = self.admit(key);
            let mut tk = TotalKey {
                direction: key.direction,
                protocol: key.protocol,
                workload: key.workload.clone(),
                environment: key.environment.clone(),
                service: key.service.clone(),
                peer_workload: key.peer_workload.clone(),
                class: key.class,
            };
            // Totals are bounded as series are.
            if self.totals.len() >= self.limits.series && !self.totals.contains_key(&tk) {
                let other = self.intern(OTHER);
                tk.service = other.clone();
                tk.peer_workload = other;
            }
            let t = self.totals.entry(tk).or_default();
            t.requests += counts.requests;
            t.attempts += counts.attempts;
            t.tcp_closed += u64::from(counts.tcp_closed);
            t.tcp_bytes += counts.tcp_bytes;
            if too_old {
                continue;
            }
            let mut counts = counts;
            if s.tcp_open.is_some() {
                counts.tcp_open = s.tcp_open.unwrap_or(0);
                counts.tcp_open_at = (start / self.limits.fine_ms) as u32;
            }
            let reporters = &mut self.reporters;
            let slots = self.series.entry(key).or_insert_with_key(|k| {
                // Counted against its reporter's cap once it is kept.
                if let Some(r) = reporters.get_mut(&k.workload) {
                    r.series += 1;
                }
                self.bytes += KEY_BYTES;
                Slots::default()
            });
            let ring = if fine {
                &mut slots.fine
            } else {
                &mut slots.coarse
            };
            self.bytes += add_counts(ring, slot, &counts);
        }
        for (direction, l, h) in lats {
            let key = LatKey {
                direction,
                workload: name.clone(),
                service: self.intern(&l.service),
                peer_workload: self.intern(&l.peer_workload),
            };
            self.latency_totals
                .entry(key.clone())
                .or_insert_with(|| Histogram::new(0))
                .merge(&h);
            if too_old {
                continue;
            }
            let key = match self.latency.get_key_value(&key) {
                Some((k, _)) => k.clone(),
                // Latency groups are coarser than series: bounded by the series caps.
                None if self.latency.len() >= self.limits.series => continue,
                None => Arc::new(key),
            };
            let slots = self.latency.entry(key).or_insert_with(|| {
                self.bytes += KEY_BYTES;
                Slots::default()
            });
            let (ring, scale) = if fine {
                (&mut slots.fine, h.scale())
            } else {
                (&mut slots.coarse, COARSE_SCALE)
            };
            let d = add_hist(ring, slot, &h, scale);
            self.bytes = self.bytes.saturating_add_signed(d);
        }
        if self.bytes > self.limits.memory {
            self.compacted_ms = 0;
            self.compact(now_ms);
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
        // protocol, class and status, so still bounded. It counts against its reporter once
        // kept (a period too old to keep is not).
        Arc::new(key)
    }

    /// Move fine slots older than their retention into coarse ones, drop coarse slots older
    /// than theirs, keep within the memory budget, and forget keys left with nothing (at
    /// most once per fine slot, unless over budget).
    pub fn compact(&mut self, now_ms: u64) {
        if now_ms < self.compacted_ms + self.limits.fine_ms {
            return;
        }
        self.compacted_ms = now_ms;
        let l = self.limits.clone();
        let fine_from = (now_ms.saturating_sub(l.fine_ms * l.fine_slots as u64) / l.fine_ms) as u32;
        let coarse_from =
            (now_ms.saturating_sub(l.coarse_ms * l.coarse_slots as u64) / l.coarse_ms) as u32;
        let ratio = (l.coarse_ms / l.fine_ms).max(1) as u32;
        let mut bytes = 0usize;
        for s in self.series.values_mut() {
            while s.fine.front().is_some_and(|(slot, _)| *slot < fine_from) {
                let (slot, c) = s.fine.pop_front().expect("checked");
                add_counts(&mut s.coarse, slot / ratio, &c);
            }
            while s
                .coarse
                .front()
                .is_some_and(|(slot, _)| *slot < coarse_from)
            {
                s.coarse.pop_front();
            }
            bytes += KEY_BYTES + (s.fine.len() + s.coarse.len()) * COUNTS_BYTES;
        }
        for s in self.latency.values_mut() {
            while s.fine.front().is_some_and(|(slot, _)| *slot < fine_from) {
                let (slot, h) = s.fine.pop_front().expect("checked");
                add_hist(&mut s.coarse, slot / ratio, &h, COARSE_SCALE);
            }
            while s
                .coarse
                .front()
                .is_some_and(|(slot, _)| *slot < coarse_from)
            {
                s.coarse.pop_front();
            }
            bytes += KEY_BYTES;
            bytes += s
                .fine
                .iter()
                .chain(&s.coarse)
                .map(|(_, h)| hist_bytes(h))
                .sum::<usize>();
        }
        self.bytes = bytes;
        if self.bytes > l.memory {
            self.evict(now_ms);
        }
        let reporters = &mut self.reporters;
        self.series.retain(|k, s| {
            let keep = !s.is_empty();
            if !keep {
                if let Some(r) = reporters.get_mut(&k.workload) {
                    r.series = r.series.saturating_sub(1);
                }
            }
            keep
        });
        self.latency.retain(|_, s| !s.is_empty());
        let seen_from = now_ms.saturating_sub(l.coarse_ms * l.coarse_slots as u64);
        self.reporters
            .retain(|_, r| r.series > 0 || r.seen_ms >= seen_from);
        self.strings.retain(|s| Arc::strong_count(s) > 1);
    }

    /// Drop the oldest slots until the store is within its memory budget: coarse ones first,
    /// a whole minute at a time across every key, then fine ones.
    fn evict(&mut self, now_ms: u64) {
        let l = self.limits.clone();
        // Bytes by the time a slot starts (ms), coarse and fine alike.
        let mut by_time: std::collections::BTreeMap<u64, usize> = Default::default();
        for s in self.series.values() {
            for (slot, _) in &s.coarse {
                *by_time.entry(u64::from(*slot) * l.coarse_ms).or_default() += COUNTS_BYTES;
            }
            for (slot, _) in &s.fine {
                *by_time.entry(u64::from(*slot) * l.fine_ms).or_default() += COUNTS_BYTES;
            }
        }
        for s in self.latency.values() {
            for (slot, h) in &s.coarse {
                *by_time.entry(u64::from(*slot) * l.coarse_ms).or_default() += hist_bytes(h);
            }
            for (slot, h) in &s.fine {
                *by_time.entry(u64::from(*slot) * l.fine_ms).or_default() += hist_bytes(h);
            }
        }
        // Keep a tenth of the budget free, so that eviction does not run at every report.
        let target = l.memory - l.memory / 10;
        let mut over = self.bytes.saturating_sub(target);
        let mut cut = 0;
        for (t, b) in by_time {
            if over == 0 {
                break;
            }
            over = over.saturating_sub(b);
            cut = t + 1;
        }
        // Never the current minute: a store too small for one period keeps that period.
        let cut = cut.min(now_ms.saturating_sub(l.coarse_ms));
        self.held_from_ms = self.held_from_ms.max(cut);
        let (coarse_cut, fine_cut) = (
            cut.div_ceil(l.coarse_ms) as u32,
            cut.div_ceil(l.fine_ms) as u32,
        );
        let mut bytes = 0;
        for s in self.series.values_mut() {
            s.coarse.retain(|(slot, _)| *slot >= coarse_cut);
            s.fine.retain(|(slot, _)| *slot >= fine_cut);
            bytes += KEY_BYTES + (s.fine.len() + s.coarse.len()) * COUNTS_BYTES;
        }
        for s in self.latency.values_mut() {
            s.coarse.retain(|(slot, _)| *slot >= coarse_cut);
            s.fine.retain(|(slot, _)| *slot >= fine_cut);
            bytes += KEY_BYTES
                + s.fine
                    .iter()
                    .chain(&s.coarse)
                    .map(|(_, h)| hist_bytes(h))
                    .sum::<usize>();
        }
        self.bytes = bytes;
    }

    /// Every series and latency group with what it adds up to over the `window_ms` before
    /// `now_ms`, among the series `keep` selects (and the latency groups `keep_latency`).
    pub fn window(
        &self,
        now_ms: u64,
        window_ms: u64,
        keep: impl Fn(&Key) -> bool,
        keep_latency: impl Fn(&LatKey) -> bool,
    ) -> Window {
        let from = now_ms.saturating_sub(window_ms);
        let l = &self.limits;
        // Whole slots: the one that holds the window's start counts.
        let (fine_from, coarse_from) = (from / l.fine_ms, from / l.coarse_ms);
        let mut out = Window {
            from_ms: if from + l.fine_ms * l.fine_slots as u64 >= now_ms {
                fine_from * l.fine_ms
            } else {
                coarse_from * l.coarse_ms
            },
            ..Window::default()
        };
        for (k, s) in &self.series {
            if !keep(k) {
                continue;
            }
            let mut total = Counts::default();
            let mut any = false;
            // A slot counts when it holds part of the window.
            for (_, c) in s
                .fine
                .iter()
                .rev()
                .take_while(|(slot, _)| u64::from(*slot) >= fine_from)
            {
                total.merge(c);
                any = true;
            }
            for (_, c) in s
                .coarse
                .iter()
                .rev()
                .take_while(|(slot, _)| u64::from(*slot) >= coarse_from)
            {
                total.merge(c);
                any = true;
            }
            if any {
                out.series.push((k.clone(), total));
            }
        }
        out.attempts = self.attempts.since(out.from_ms).cloned().collect();
        out.slow = self.slow.since(out.from_ms).cloned().collect();
        out.ejections = self.ejections.since(out.from_ms).cloned().collect();
        out.mirrors = self.mirrors.since(out.from_ms).cloned().collect();
        for (name, r) in &self.reporters {
            if r.seen_ms >= out.from_ms {
                out.reporting.push((name.clone(), r.seen_ms));
                if let Some(a) = r.adaptive {
                    out.adaptive.push((name.clone(), a));
                }
            }
            if r.links_ms >= out.from_ms {
                out.links
                    .extend(r.links.iter().map(|l| (name.clone(), l.clone())));
            }
        }
        for (k, s) in &self.latency {
            if !keep_latency(k) {
                continue;
            }
            let mut total: Option<Histogram> = None;
            let slots = s
                .fine
                .iter()
                .rev()
                .take_while(|(slot, _)| u64::from(*slot) >= fine_from)
                .chain(
                    s.coarse
                        .iter()
                        .rev()
                        .take_while(|(slot, _)| u64::from(*slot) >= coarse_from),
                );
            for (_, h) in slots {
                match &mut total {
                    Some(t) => t.merge(h),
                    None => total = Some(h.clone()),
                }
            }
            if let Some(t) = total {
                out.latency.push((k.clone(), t));
            }
        }
        out
    }

    /// What the proxies said of `workload`'s endpoints since `from_ms` (received), oldest
    /// first.
    pub fn ejections_of(&self, workload: &str, from_ms: u64) -> Vec<Arc<Ejected>> {
        self.ejections
            .since(from_ms)
            .filter(|e| e.ejection.peer_workload == workload)
            .cloned()
            .collect()
    }

    /// From when (Unix ms) the store still holds every slot: 0 unless the memory budget
    /// made it drop some before their retention.
    pub fn held_from_ms(&self) -> u64 {
        self.held_from_ms
    }

    /// Counters since the start, for `/metrics`.
    pub fn totals(&self) -> &FxMap<TotalKey, Totals> {
        &self.totals
    }

    /// Latency since the start (scale 0), for `/metrics`.
    pub fn latency_totals(&self) -> &FxMap<LatKey, Histogram> {
        &self.latency_totals
    }

    /// The proxies heard from.
    pub fn reporters(&self) -> &FxMap<Arc<str>, Reporter> {
        &self.reporters
    }

    /// How many series.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Failed requests not kept one by one: beyond a proxy's bound per period, or pushed out
    /// of the store's.
    pub fn attempts_dropped(&self) -> u64 {
        self.attempts_dropped
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

    /// The bytes the slots and keys take, as the store counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A series' key fields and counts, checked.
struct Parsed<'a> {
    direction: Direction,
    protocol: Protocol,
    service: &'a str,
    route: &'a str,
    peer_workload: &'a str,
    peer_identity: &'a str,
    peer_environment: &'a str,
    peer_locality: &'a str,
    endpoint: &'a str,
    mtls: bool,
    class: FailureClass,
    status_class: u8,
    tcp_open: Option<u32>,
}

/// Longest label accepted.
const MAX_LABEL: usize = 512;

fn label(v: &str) -> Result<(), String> {
    if v.len() > MAX_LABEL {
        return Err(format!("{} bytes, at most {MAX_LABEL}", v.len()));
    }
    Ok(())
}

fn direction(d: u32) -> Result<Direction, String> {
    match d {
        0 => Ok(Direction::Outbound),
        1 => Ok(Direction::Inbound),
        n => Err(format!("{n} is neither 0 (outbound) nor 1 (inbound)")),
    }
}

fn parse(s: &Series) -> Result<(Parsed<'_>, Counts), (&'static str, String)> {
    let direction = direction(s.direction).map_err(|e| ("direction", e))?;
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
        label(v).map_err(|e| (f, e))?;
    }
    let small = |f: &'static str, v: u64| {
        u32::try_from(v).map_err(|_| (f, format!("{v} is more than a period can hold")))
    };
    let counts = Counts {
        requests: s.requests,
        attempts: s.attempts.max(s.requests),
        tcp_opened: small("tcp_opened", s.tcp_opened)?,
        tcp_closed: small("tcp_closed", s.tcp_closed)?,
        tcp_bytes: s.bytes_sent.saturating_add(s.bytes_received),
        tcp_open: 0,
        tcp_open_at: 0,
    };
    let p = Parsed {
        direction,
        protocol,
        service: &s.service,
        route: &s.route,
        peer_workload: &s.peer_workload,
        peer_identity: &s.peer_identity,
        peer_environment: &s.peer_environment,
        peer_locality: &s.peer_locality,
        endpoint: &s.endpoint,
        mtls: s.mtls,
        class,
        status_class,
        tcp_open: (protocol == Protocol::Tcp)
            .then(|| small("tcp_open", s.tcp_open))
            .transpose()?,
    };
    Ok((p, counts))
}

mod timeline;
pub use timeline::{Point, Timeline};

#[cfg(test)]
mod tests;
