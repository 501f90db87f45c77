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

use std::{collections::HashMap, net::IpAddr, sync::Mutex, time::Instant};

use trellis_model::proxy::{Rate, RateLimit};

/// Callers kept at most.
pub(crate) const CALLERS: usize = 10_000;

/// Who asks: a meshed caller by its SPIFFE ID, an unmeshed one by its address (looked up
/// without building a key: a request pays no allocation here).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Caller<'a> {
    /// `spiffe://…/ns/NAMESPACE/sa/IDENTITY` (or `namespace/identity`).
    Id(&'a str),
    /// Its source address.
    Ip(IpAddr),
}

impl std::fmt::Display for Caller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Id(id) => f.write_str(id),
            Caller::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

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
    by_id: HashMap<String, Vec<u64>>,
    by_ip: HashMap<IpAddr, Vec<u64>>,
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
            by_id: HashMap::new(),
            by_ip: HashMap::new(),
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
    fn rates_of(&self, caller: Caller<'_>) -> &[Rate] {
        let Caller::Id(caller) = caller else {
            return &self.cfg.per_caller;
        };
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
    pub(crate) fn check(&self, caller: Caller<'_>) -> Decision {
        let now = self.start.elapsed().as_nanos() as u64;
        self.check_at(caller, now)
    }

    fn check_at(&self, caller: Caller<'_>, now: u64) -> Decision {
        let rates = self.rates_of(caller);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State {
            total,
            by_id,
            by_ip,
            overflow,
        } = &mut *s;
        let known = match caller {
            Caller::Id(id) => by_id.contains_key(id),
            Caller::Ip(ip) => by_ip.contains_key(&ip),
        };
        if !rates.is_empty() && !known {
            if by_id.len() + by_ip.len() >= CALLERS {
                // Forget the callers that owe nothing: they are as new.
                by_id.retain(|_, tats| tats.iter().any(|t| *t > now));
                by_ip.retain(|_, tats| tats.iter().any(|t| *t > now));
            }
            if by_id.len() + by_ip.len() < CALLERS {
                let fresh = vec![0; rates.len()];
                match caller {
                    Caller::Id(id) => drop(by_id.insert(id.to_string(), fresh)),
                    Caller::Ip(ip) => drop(by_ip.insert(ip, fresh)),
                }
            } else if overflow.len() != rates.len() {
                *overflow = vec![0; rates.len()];
            }
        }
        let held = match caller {
            Caller::Id(id) => by_id.get_mut(id),
            Caller::Ip(ip) => by_ip.get_mut(&ip),
        };
        let mine: &mut Vec<u64> = match held {
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
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.by_id.len() + s.by_ip.len()
    }
}

#[cfg(test)]
mod tests;
