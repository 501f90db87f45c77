//! Rate limits on a workload's inbound side (a RateLimitPolicy on its service): GCRA
//! (the generic cell rate algorithm) buckets, one per limit, in total and per caller (its
//! SPIFFE ID, an unmeshed caller by its source address).
//!
//! Fair: the caller's own buckets are asked first, then the total's, and a request takes
//! from them only if all allow; a caller over its share is refused without taking from the
//! total, so it drains nobody else's share. Memory is bounded: at most [`CALLERS`] callers
//! are kept; when full, those whose buckets are full again (nothing owed) are forgotten
//! (they are as new), and if none is, new callers share one overflow bucket set.
//!
//! A bucket is one number, its theoretical arrival time (TAT), in nanoseconds since the
//! limiter began: a request is allowed when `TAT − burst tolerance ≤ now`, and then moves the
//! TAT on by one emission interval (`per / requests`) from `max(TAT, now)`.

use std::{collections::HashMap, sync::Mutex, time::Instant};

use trellis_model::proxy::{Rate, RateLimit};

/// Callers kept at most.
pub(crate) const CALLERS: usize = 10_000;

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Over {
    /// Its caller's share.
    Caller,
    /// The total.
    Total,
}

/// What a limiter says of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Within every limit.
    Allow,
    /// Over a limit: `rate` of `scope`, free again after `retry_after_ns`.
    Limited {
        scope: Over,
        rate: Rate,
        retry_after_ns: u64,
    },
}

fn interval_ns(r: &Rate) -> u64 {
    (r.per.as_nanos() / u128::from(r.requests.max(1))).max(1) as u64
}

/// Whether one more request fits each of `rates` whose TATs are `tats` at `now`: `Ok`, or
/// the first limit over and when it frees. Nothing is changed.
fn ask(rates: &[Rate], tats: &[u64], now: u64) -> Result<(), (Rate, u64)> {
    for (r, tat) in rates.iter().zip(tats) {
        let tolerance = interval_ns(r).saturating_mul(u64::from(r.burst.max(1) - 1));
        let allowed_at = tat.saturating_sub(tolerance);
        if allowed_at > now {
            return Err((*r, allowed_at - now));
        }
    }
    Ok(())
}

/// Take one request from each of `rates` (after [`ask`] allowed it).
fn take(rates: &[Rate], tats: &mut [u64], now: u64) {
    for (r, tat) in rates.iter().zip(tats) {
        *tat = (*tat).max(now) + interval_ns(r);
    }
}

struct State {
    total: Vec<u64>,
    // The standard hasher: callers' keys come from outside (addresses), so not one an
    // attacker could collide.
    callers: HashMap<String, Vec<u64>>,
    /// Shared by the callers that came when the table was full of active ones.
    overflow: Vec<u64>,
}

/// One service's limits on this workload.
pub(crate) struct RateLimiter {
    pub(crate) cfg: RateLimit,
    start: Instant,
    state: Mutex<State>,
}

impl RateLimiter {
    pub(crate) fn new(cfg: RateLimit) -> Self {
        let state = State {
            total: vec![0; cfg.total.len()],
            callers: HashMap::default(),
            overflow: Vec::new(),
        };
        Self {
            cfg,
            start: Instant::now(),
            state: Mutex::new(state),
        }
    }

    /// The per-caller limits of `caller` (`namespace/identity`, or a SPIFFE ID
    /// `spiffe://…/ns/NAMESPACE/sa/IDENTITY`).
    fn rates_of(&self, caller: &str) -> &[Rate] {
        let named = |who: &str| match caller.strip_prefix("spiffe://") {
            Some(uri) => who.split_once('/').is_some_and(|(ns, id)| {
                uri.strip_suffix(id)
                    .and_then(|u| u.strip_suffix("/sa/"))
                    .and_then(|u| u.strip_suffix(ns))
                    .is_some_and(|u| u.ends_with("/ns/"))
            }),
            None => who == caller,
        };
        self.cfg
            .overrides
            .iter()
            .find(|(who, _)| named(who))
            .map_or(&self.cfg.per_caller[..], |(_, v)| &v[..])
    }

    /// Take a request of `caller` now.
    pub(crate) fn check(&self, caller: &str) -> Decision {
        let now = self.start.elapsed().as_nanos() as u64;
        self.check_at(caller, now)
    }

    fn check_at(&self, caller: &str, now: u64) -> Decision {
        let rates = self.rates_of(caller);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State {
            total,
            callers,
            overflow,
        } = &mut *s;
        if !rates.is_empty() && !callers.contains_key(caller) && callers.len() >= CALLERS {
            // Forget the callers that owe nothing: they are as new.
            callers.retain(|_, tats| tats.iter().any(|t| *t > now));
        }
        if !rates.is_empty() && !callers.contains_key(caller) {
            if callers.len() < CALLERS {
                callers.insert(caller.to_string(), vec![0; rates.len()]);
            } else if overflow.len() != rates.len() {
                *overflow = vec![0; rates.len()];
            }
        }
        let mine: &mut Vec<u64> = match callers.get_mut(caller) {
            Some(v) if !rates.is_empty() => v,
            // No per-caller limit (nothing is taken from it), or the table is full.
            _ => overflow,
        };
        if mine.len() != rates.len() {
            *mine = vec![0; rates.len()];
        }
        if let Err((rate, after)) = ask(rates, mine, now) {
            return Decision::Limited {
                scope: Over::Caller,
                rate,
                retry_after_ns: after,
            };
        }
        if let Err((rate, after)) = ask(&self.cfg.total, total, now) {
            return Decision::Limited {
                scope: Over::Total,
                rate,
                retry_after_ns: after,
            };
        }
        take(rates, mine, now);
        take(&self.cfg.total, total, now);
        Decision::Allow
    }

    /// Callers held now.
    #[cfg(test)]
    pub(crate) fn callers(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .callers
            .len()
    }
}

#[cfg(test)]
mod tests;
