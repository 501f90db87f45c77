//! Adaptive concurrency on a workload's inbound side, in the style of Netflix's Gradient2:
//! the limit on requests in flight to the application follows its latency. A long-term
//! average of the application's time (the baseline, learnt while the workload is neither
//! busy nor slower than tolerated, and only very slowly otherwise) is compared with the last
//! window's average; while they agree the limit grows by about half its square root a
//! window, and when the window is slower than the baseline (by more than [`TOLERANCE`]) it
//! shrinks in proportion, by at most half. It never grows while the workload is far below
//! its limit (app-limited), but comes down there too when the application clearly queues
//! (see [`QUEUEING`], [`SLOW_RUN`]); there is no probe window that pins concurrency, and it
//! stays between the policy's minimum and maximum. A request over the limit is shed at
//! once: 503 (gRPC UNAVAILABLE), class `overloaded`, `Proxy-Status: …;
//! error=connection_limit_reached`, which a caller's retry takes to another endpoint.
//!
//! Per request: two atomic adds and a load to admit, a load to see the policy's bounds
//! unchanged, and a short lock to add the sample;
//! the limit is worked out once a window ([`WINDOW`] and at least [`WINDOW_SAMPLES`]).

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// A window lasts at least this long...
const WINDOW: Duration = Duration::from_millis(100);
/// ... and holds at least this many samples.
const WINDOW_SAMPLES: u32 = 10;
/// Windows the baseline averages over while the workload is not busy (an exponential
/// moving average).
const LONG_WINDOWS: f64 = 60.0;
/// ... and while it is busy at its limit: much slower, or the baseline would learn the
/// queueing it is there to detect and the limit would creep up; not frozen, so that an
/// application that really became slower is followed, over minutes (under a flood that
/// never lets up, the limit creeps up by about a tenth a minute for the same reason).
const BUSY_WINDOWS: f64 = 6000.0;
/// Windows before the baseline counts (until then it is their plain average).
const WARMUP_WINDOWS: u32 = 10;
/// How much slower than the baseline a window may be before the limit shrinks.
const TOLERANCE: f64 = 1.25;
/// How much slower than tolerated a window must be for the limit to come down while the
/// workload is far below it (a clear queue, not jitter)...
const QUEUEING: f64 = 2.0;
/// ... or how many windows in a row slower than tolerated (a queue that stays).
const SLOW_RUN: u32 = 3;
/// How much of a new estimate the limit takes at once.
const SMOOTHING: f64 = 0.2;
/// Times below this count as this: sub-millisecond jitter is not queueing.
const FLOOR_S: f64 = 0.001;
/// The limit a workload starts with (then follows its latency).
const INITIAL: u32 = 100;

struct State {
    /// The estimate (the limit is its integer part).
    estimate: f64,
    /// The baseline time, seconds (None until the first window).
    long_s: Option<f64>,
    windows: u32,
    /// This window: sum of times, samples, the most in flight seen, its start.
    sum_s: f64,
    samples: u32,
    peak: u32,
    start: Instant,
    min: u32,
    max: u32,
    /// Seconds the requests that ended took, summed, since [`Adaptive::take_busy`] last
    /// read it: over the time between two reads, the average in flight (Little's law).
    busy_s: f64,
    /// Requests answered since then.
    answered: u64,
    /// Windows in a row slower than the baseline tolerates.
    slow_run: u32,
}

/// One workload's limit.
pub(crate) struct Adaptive {
    limit: AtomicU32,
    /// The bounds last given (`bound` takes the lock only when they change).
    bounds: AtomicU64,
    in_flight: AtomicU32,
    shed: AtomicU64,
    state: Mutex<State>,
}

impl Default for Adaptive {
    fn default() -> Self {
        let d = trellis_model::proxy::AdaptiveLimit::default();
        let start = INITIAL.clamp(d.min, d.max);
        Self {
            limit: AtomicU32::new(start),
            bounds: AtomicU64::new(u64::from(d.min) << 32 | u64::from(d.max)),
            in_flight: AtomicU32::new(0),
            shed: AtomicU64::new(0),
            state: Mutex::new(State {
                estimate: f64::from(start),
                long_s: None,
                windows: 0,
                sum_s: 0.0,
                samples: 0,
                peak: 0,
                start: Instant::now(),
                min: d.min,
                max: d.max,
                busy_s: 0.0,
                answered: 0,
                slow_run: 0,
            }),
        }
    }
}

/// A request let in: it counts as in flight until dropped; [`Permit::done`] adds its time.
pub(crate) struct Permit {
    of: Arc<Adaptive>,
    in_flight: u32,
}

impl Permit {
    /// The request ended at `now`, after `took`; `answered`: the application answered it
    /// (its time says something of its load; a reset or a client gone does not). `now` is
    /// the caller's clock read: one fewer on every request.
    pub(crate) fn done(self, took: Duration, answered: bool, now: Instant) {
        if answered {
            self.of.sample(took, self.in_flight, now);
        } else {
            // Not a sample of the application's time, but it was in flight all along: the
            // load exchange counts it (a workload whose requests time out is loaded).
            let mut s = self.of.state.lock().unwrap_or_else(|p| p.into_inner());
            s.busy_s += took.as_secs_f64();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.of.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Adaptive {
    /// Let a request in, or `None`: shed it.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Permit> {
        let n = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.limit.load(Ordering::Relaxed) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.shed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Permit {
            of: self.clone(),
            in_flight: n,
        })
    }

    /// The policy's bounds (from the config: cheap when unchanged).
    pub(crate) fn bound(&self, min: u32, max: u32) {
        let packed = u64::from(min) << 32 | u64::from(max);
        // Read, not swapped: every request passes here, and a write would bounce the cache
        // line between the cores.
        if self.bounds.load(Ordering::Relaxed) == packed {
            return;
        }
        self.bounds.store(packed, Ordering::Relaxed);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if (s.min, s.max) == (min, max) {
            return;
        }
        (s.min, s.max) = (min, max.max(min));
        s.estimate = s.estimate.clamp(f64::from(s.min), f64::from(s.max));
        self.limit.store(s.estimate as u32, Ordering::Relaxed);
    }

    /// Now: the limit, requests in flight, requests shed so far.
    pub(crate) fn figures(&self) -> (u32, u32, u64) {
        (
            self.limit.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed),
            self.shed.load(Ordering::Relaxed),
        )
    }

    /// Since the last call: the seconds answered requests took, summed (see `busy_s`), and
    /// how many they were.
    pub(crate) fn take_busy(&self) -> (f64, u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (
            std::mem::take(&mut s.busy_s),
            std::mem::take(&mut s.answered),
        )
    }

    fn sample(&self, took: Duration, in_flight: u32, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.busy_s += took.as_secs_f64();
        s.answered += 1;
        s.sum_s += took.as_secs_f64().max(FLOOR_S);
        s.samples += 1;
        s.peak = s.peak.max(in_flight);
        if s.samples < WINDOW_SAMPLES || now.saturating_duration_since(s.start) < WINDOW {
            return;
        }
        let short = s.sum_s / f64::from(s.samples);
        let limit = step(&mut s, short);
        (s.sum_s, s.samples, s.peak, s.start) = (0.0, 0, 0, now);
        self.limit.store(limit, Ordering::Relaxed);
    }
}

/// One window's update of `s`, whose average time was `short` seconds: the new limit.
fn step(s: &mut State, short: f64) -> u32 {
    s.windows += 1;
    // Busy: at least half the limit in flight. Otherwise the application is not the limit
    // (app-limited): the window says what its time is without a queue.
    let busy = f64::from(s.peak) >= s.estimate / 2.0;
    // Slower than tolerated, and queueing: clearly slower (past the warm-up), whatever the
    // limit. A slow window is learnt as slowly as a busy one: a queue building under a limit
    // the workload is still far below (at exactly its capacity, say) is not its normal time.
    let warm = s.windows > WARMUP_WINDOWS;
    let slow = warm && s.long_s.is_some_and(|l| short > TOLERANCE * l);
    s.slow_run = if slow { s.slow_run + 1 } else { 0 };
    let queueing = warm
        && (s.slow_run >= SLOW_RUN || s.long_s.is_some_and(|l| short > QUEUEING * TOLERANCE * l));
    let long = match s.long_s {
        None => short,
        Some(l) if s.windows <= WARMUP_WINDOWS => l + (short - l) / f64::from(s.windows),
        Some(l) if busy || slow => l + (short - l) * 2.0 / (BUSY_WINDOWS + 1.0),
        Some(l) => l + (short - l) * 2.0 / (LONG_WINDOWS + 1.0),
    };
    // After a long overload the baseline may have drifted up: let it come down faster.
    let long = if long / short > 2.0 { long * 0.9 } else { long };
    s.long_s = Some(long);
    let gradient = (TOLERANCE * long / short).clamp(0.5, 1.0);
    if !busy {
        // App-limited: no growth. But an application that queues at fewer requests than
        // half the limit (a small VM under a limit still at its start) is past its
        // capacity: the limit comes down to what it had in flight, and Gradient2 goes on
        // from there (Netflix's leaves it where it is, and the queue grows under it).
        if queueing {
            let peak = f64::from(s.peak);
            let wanted = peak * gradient + (peak.sqrt() / 2.0).max(1.0);
            s.estimate = wanted
                .min(s.estimate)
                .clamp(f64::from(s.min), f64::from(s.max));
        }
        return s.estimate as u32;
    }
    let queue = (s.estimate.sqrt() / 2.0).max(1.0);
    let wanted = s.estimate * gradient + queue;
    let next = s.estimate * (1.0 - SMOOTHING) + wanted * SMOOTHING;
    s.estimate = next.clamp(f64::from(s.min), f64::from(s.max));
    s.estimate as u32
}

#[cfg(test)]
mod tests;
