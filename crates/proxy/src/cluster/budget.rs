//! Retry budget: retries may be at most a share of recent requests, plus a small floor, so
//! that a failing upstream is not hit by a retry storm.

use std::{sync::Mutex, time::Instant};

const WINDOW_SECS: usize = 10;

/// A sliding ten-second window of requests and retries.
pub(crate) struct RetryBudget {
    percent: u32,
    min_per_second: u32,
    state: Mutex<Window>,
}

struct Window {
    start: Instant,
    /// (second index, requests, retries) per slot.
    slots: [(u64, u32, u32); WINDOW_SECS],
}

impl RetryBudget {
    /// `percent` of requests may be retried, plus `min_per_second` retries per second.
    pub(crate) fn new(percent: u32, min_per_second: u32) -> Self {
        Self {
            percent,
            min_per_second,
            state: Mutex::new(Window {
                start: Instant::now(),
                slots: [(0, 0, 0); WINDOW_SECS],
            }),
        }
    }

    fn with_slot<R>(&self, now: Instant, f: impl FnOnce(&mut (u64, u32, u32), u32, u32) -> R) -> R {
        let mut w = self.state.lock().expect("budget lock");
        let sec = now.saturating_duration_since(w.start).as_secs();
        let idx = (sec as usize) % WINDOW_SECS;
        if w.slots[idx].0 != sec {
            w.slots[idx] = (sec, 0, 0);
        }
        let (reqs, retries) = w
            .slots
            .iter()
            .filter(|s| sec.saturating_sub(s.0) < WINDOW_SECS as u64)
            .fold((0u32, 0u32), |(a, b), s| (a + s.1, b + s.2));
        f(&mut w.slots[idx], reqs, retries)
    }

    /// Whether a request was counted in the window up to `now`.
    pub(crate) fn recent(&self, now: Instant) -> bool {
        let w = self.state.lock().expect("budget lock");
        let sec = now.saturating_duration_since(w.start).as_secs();
        w.slots
            .iter()
            .any(|s| s.1 > 0 && sec.saturating_sub(s.0) < WINDOW_SECS as u64)
    }

    /// Count an original request, made at `now`.
    pub(crate) fn deposit(&self, now: Instant) {
        self.with_slot(now, |s, _, _| s.1 += 1);
    }

    /// Try to spend one retry; false when the budget is exhausted.
    pub(crate) fn withdraw(&self, now: Instant) -> bool {
        let (pct, floor) = (
            u64::from(self.percent),
            u64::from(self.min_per_second) * WINDOW_SECS as u64,
        );
        self.with_slot(now, |s, reqs, retries| {
            let allowed = u64::from(reqs) * pct / 100 + floor;
            if u64::from(retries) < allowed {
                s.2 += 1;
                true
            } else {
                false
            }
        })
    }
}
