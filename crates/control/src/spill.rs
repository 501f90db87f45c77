//! Spill-over by load, decided by the control plane from the whole fleet's loads.
//!
//! Every proxy tells this replica about once a second how loaded its workload is
//! ([`trellis_telemetry::load::Beacon`]: its adaptive concurrency limit, the average number
//! of requests it had in flight, what it shed), and gets back, for every service with a
//! spill-over policy, the share of each pool's traffic that goes on to the next pool. Once a
//! second, for each such service, each pool's load is its workloads' requests in flight over
//! their limits (their learnt capacity), and each pool's share moves:
//!
//! - up while the load has stayed at or above the policy's high mark (or the pool shed
//!   requests) for its `hold`: each second by [`UP`], or, when the pool sheds a fraction
//!   `e` of what reaches it, by half of `e` × what it still keeps (moving `e` of it would
//!   shed nothing; half, because what the proxies do now shows in the loads a second or
//!   two later);
//! - down by [`DOWN`] a second while it has stayed below the low mark for its `hold`, or
//!   while the pool it spills to has stayed overloaded and it has not;
//! - when both are overloaded, by [`DOWN`] towards the one that sheds the smaller fraction
//!   (evened out, they serve the most they can together);
//! - not at all in between, nor while nothing is heard from the pool (its timers stand: a
//!   proxy too busy to tell on time breaks no hold): the band and the hold are the
//!   hysteresis, so a load that wanders inside the band never moves traffic.
//!
//! Rising fast and falling slowly: a surge is absorbed within seconds, and traffic comes
//! back over about twenty. Health stays underneath: proxies skip pools with no usable
//! endpoint whatever the shares say.
//!
//! On a shared store, each replica decides from the whole fleet's loads: once a second it
//! asks the others for the beacons they heard themselves ([`Spill::own`], served as
//! `GET /v1/fleet/loads`) and keeps the freshest for each workload, so a caller connected
//! to one replica follows the loads of callees connected to another. Replicas that see the
//! same loads move the same shares, within a tick of each other.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use trellis_model::{
    proxy::{ProxyConfig, Spillover},
    resource::NamespacedName,
};
use trellis_telemetry::load::{
    Answer, Beacon, Heard, PoolState, Shares, SpillChange, SpillState, HISTORY,
};

use crate::fleet::now_ms;

/// How much a share rises a second while its pool is overloaded (thousandths).
const UP: u32 = 100;
/// How much it falls a second while its pool is light.
const DOWN: u32 = 50;
/// Two overloaded pools shedding fractions this far apart move traffic to even them out.
const BALANCE: f64 = 0.05;
/// A load heard longer ago than this does not count.
const FRESH: Duration = Duration::from_secs(3);
/// A workload not heard from for this long is forgotten.
const FORGET: Duration = Duration::from_secs(60);
/// Workloads whose loads are kept at most.
const MAX_LOADS: usize = 100_000;
/// How often proxies exchange loads while some service has a spill-over policy...
const EVERY_ACTIVE_MS: u32 = 1000;
/// ... and otherwise (to learn that one came).
const EVERY_IDLE_MS: u32 = 10_000;

/// One workload's load, as last heard.
struct Load {
    limit: u32,
    in_flight: f64,
    shed: u64,
    answered: u64,
    at: Instant,
    /// Heard by this replica itself (not passed on by another).
    own: bool,
}

impl Load {
    fn of(b: &Beacon, at: Instant, own: bool) -> Self {
        Self {
            limit: b.limit,
            in_flight: b.in_flight_milli as f64 / 1000.0,
            shed: b.shed,
            answered: b.answered,
            at,
            own,
        }
    }
}

/// One pool's controller.
#[derive(Default)]
struct Pool {
    /// Thousandths of its traffic that go on to the next pool.
    permille: u32,
    /// Since when its load has been at or above the high mark / below the low mark.
    above: Option<Instant>,
    below: Option<Instant>,
    /// When its share last moved.
    moved: Option<Instant>,
    /// Since when it spills (Unix ms).
    since_ms: Option<u64>,
    /// What the last tick saw.
    load: Option<f64>,
    shed: u64,
    answered: u64,
    workloads: u32,
    /// It has endpoints (and so may take spilled traffic).
    populated: bool,
}

/// One service's controller.
struct Service {
    policy: Spillover,
    pools: Vec<Pool>,
    history: Vec<SpillChange>,
}

#[derive(Default)]
struct Inner {
    loads: HashMap<String, Load>,
    services: BTreeMap<NamespacedName, Service>,
}

impl Inner {
    /// Keep `workload`'s load (at most [`MAX_LOADS`] workloads: the stale ones go first).
    fn keep(&mut self, workload: &str, load: Load, now: Instant) {
        if self.loads.len() >= MAX_LOADS && !self.loads.contains_key(workload) {
            self.loads.retain(|_, l| now.duration_since(l.at) < FORGET);
        }
        if self.loads.len() < MAX_LOADS || self.loads.contains_key(workload) {
            self.loads.insert(workload.to_string(), load);
        }
    }
}

/// This replica's spill-over decisions.
#[derive(Default)]
pub(crate) struct Spill {
    inner: Mutex<Inner>,
}

impl Spill {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a proxy's beacon (its workload already checked to be its own), and answer the
    /// shares.
    pub(crate) fn beacon(&self, b: &Beacon, now: Instant) -> Answer {
        let mut g = self.lock();
        if !b.workload.is_empty() {
            g.keep(&b.workload, Load::of(b, now, true), now);
        }
        Answer {
            every_ms: if g.services.is_empty() {
                EVERY_IDLE_MS
            } else {
                EVERY_ACTIVE_MS
            },
            spill: g
                .services
                .iter()
                .filter(|(_, s)| s.pools.iter().any(|p| p.permille > 0))
                .map(|(n, s)| Shares {
                    service: n.to_string(),
                    permille: s.pools.iter().map(|p| p.permille).collect(),
                })
                .collect(),
        }
    }

    /// Some service has a spill-over policy.
    pub(crate) fn active(&self) -> bool {
        !self.lock().services.is_empty()
    }

    /// The beacons this replica heard itself lately, for the other replicas.
    pub(crate) fn own(&self, now: Instant) -> Vec<Heard> {
        let g = self.lock();
        g.loads
            .iter()
            .filter(|(_, l)| l.own && now.duration_since(l.at) <= FRESH)
            .map(|(w, l)| Heard {
                beacon: Beacon {
                    workload: w.clone(),
                    limit: l.limit,
                    in_flight_milli: (l.in_flight * 1000.0) as u64,
                    shed: l.shed,
                    answered: l.answered,
                },
                age_ms: now.duration_since(l.at).as_millis() as u64,
            })
            .collect()
    }

    /// Take what another replica heard (where it is fresher than what this one holds).
    pub(crate) fn merge(&self, heard: &[Heard], now: Instant) {
        let mut g = self.lock();
        for h in heard {
            let age = Duration::from_millis(h.age_ms);
            if h.beacon.workload.is_empty() || age > FRESH {
                continue;
            }
            let at = now.checked_sub(age).unwrap_or(now);
            if g.loads.get(&h.beacon.workload).is_some_and(|l| l.at >= at) {
                continue;
            }
            g.keep(&h.beacon.workload, Load::of(&h.beacon, at, false), now);
        }
    }

    /// One step of every service's controller, with the mesh as compiled now.
    pub(crate) fn tick(&self, mesh: &ProxyConfig, now: Instant) {
        let mut g = self.lock();
        let Inner { loads, services } = &mut *g;
        loads.retain(|_, l| now.duration_since(l.at) < FORGET);
        // Each service's policy and the workloads of each of its pools (a service's ports
        // are clusters of the same workloads).
        let mut wanted: BTreeMap<&NamespacedName, (&Spillover, Vec<HashSet<String>>)> =
            BTreeMap::new();
        for c in mesh.clusters.values() {
            let Some(sp) = &c.policy.spillover else {
                continue;
            };
            let (_, pools) = wanted
                .entry(&c.service)
                .or_insert_with(|| (sp, vec![HashSet::new(); sp.pools.len() + 1]));
            for e in &c.endpoints {
                pools[sp.pool_of(e.environment, &e.locality)].insert(e.workload.to_string());
            }
        }
        services.retain(|n, s| wanted.get(n).is_some_and(|(p, _)| **p == s.policy));
        for (name, (policy, members)) in wanted {
            let s = services.entry(name.clone()).or_insert_with(|| Service {
                policy: policy.clone(),
                pools: (0..members.len()).map(|_| Pool::default()).collect(),
                history: Vec::new(),
            });
            for (pool, ws) in s.pools.iter_mut().zip(&members) {
                let heard: Vec<&Load> = ws
                    .iter()
                    .filter_map(|w| loads.get(w))
                    .filter(|l| now.duration_since(l.at) <= FRESH && l.limit > 0)
                    .collect();
                let limit: f64 = heard.iter().map(|l| f64::from(l.limit)).sum();
                let in_flight: f64 = heard.iter().map(|l| l.in_flight).sum();
                pool.load = (limit > 0.0).then(|| 100.0 * in_flight / limit);
                pool.shed = heard.iter().map(|l| l.shed).sum();
                pool.answered = heard.iter().map(|l| l.answered).sum();
                pool.workloads = heard.len() as u32;
                pool.populated = !ws.is_empty();
            }
            step(name, s, now);
        }
    }

    /// Every service with a spill-over policy, as it stands.
    pub(crate) fn states(&self) -> Vec<SpillState> {
        let g = self.lock();
        g.services
            .iter()
            .map(|(n, s)| {
                let last = s.pools.len() - 1;
                SpillState {
                    service: n.to_string(),
                    pools: s
                        .pools
                        .iter()
                        .enumerate()
                        .filter(|(i, p)| *i < last || p.populated)
                        .map(|(i, p)| PoolState {
                            name: s.policy.pool_name(i),
                            workloads: p.workloads,
                            load_percent: p.load,
                            shed: p.shed,
                            spilled_percent: f64::from(p.permille) / 10.0,
                            since_ms: p.since_ms,
                            to: next_populated(&s.pools, i).map(|j| s.policy.pool_name(j)),
                        })
                        .collect(),
                    history: s.history.clone(),
                }
            })
            .collect()
    }
}

fn next_populated(pools: &[Pool], i: usize) -> Option<usize> {
    (i + 1..pools.len()).find(|&j| pools[j].populated)
}

/// Move each pool's share by its load (see the module's rules).
fn step(service: &NamespacedName, s: &mut Service, now: Instant) {
    let (high, low, hold) = (
        f64::from(s.policy.high),
        f64::from(s.policy.low),
        s.policy.hold,
    );
    // First every pool's condition, held or not; then the moves, which look at the pool the
    // spilled traffic goes to.
    for p in &mut s.pools {
        if p.workloads == 0 {
            // Nothing heard lately (a proxy too busy to tell, say): no evidence either way,
            // the timers stand.
            continue;
        }
        let overloaded = p.shed > 0 || p.load.is_some_and(|l| l >= high);
        let light = !overloaded && p.load.is_some_and(|l| l < low);
        p.above = if overloaded {
            p.above.or(Some(now))
        } else {
            None
        };
        p.below = if light { p.below.or(Some(now)) } else { None };
    }
    let held = |since: Option<Instant>| since.is_some_and(|t| now.duration_since(t) >= hold);
    let shed_fraction = |p: &Pool| p.shed as f64 / (p.shed + p.answered).max(1) as f64;
    for i in 0..s.pools.len() {
        let next = next_populated(&s.pools, i);
        let (next_overloaded, next_shed) = next.map_or((false, 0.0), |j| {
            let n = &s.pools[j];
            (held(n.above), shed_fraction(n))
        });
        let name = s.policy.pool_name(i);
        let p = &mut s.pools[i];
        // At most one move a second, however often the tick runs.
        let may_move = p
            .moved
            .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(950));
        let before = p.permille;
        let shed = shed_fraction(p);
        if next.is_none() {
            p.permille = 0;
        } else if !may_move || p.workloads == 0 {
        } else if held(p.above) && !next_overloaded {
            let kept = f64::from(1000 - p.permille);
            let up = UP.max((kept * shed / 2.0) as u32);
            p.permille = (p.permille + up).min(1000);
        } else if held(p.above) {
            // Both overloaded: even out what they shed (the most either can serve).
            if shed > next_shed + BALANCE {
                p.permille = (p.permille + DOWN).min(1000);
            } else if next_shed > shed + BALANCE {
                p.permille = p.permille.saturating_sub(DOWN);
            }
        } else if held(p.below) || next_overloaded {
            // Light, or the next pool is overloaded while this one is not: bring traffic
            // back.
            p.permille = p.permille.saturating_sub(DOWN);
        }
        if p.permille == before {
            continue;
        }
        p.moved = Some(now);
        let what = match (before, p.permille) {
            (0, _) => "started",
            (_, 0) => "ended",
            _ => continue,
        };
        p.since_ms = (p.permille > 0).then(now_ms);
        tracing::info!(%service, pool = %name, load = ?p.load, shed = p.shed, "spill-over {what}");
        s.history.push(SpillChange {
            at_ms: now_ms(),
            pool: name,
            what: what.into(),
            load_percent: p.load,
        });
        if s.history.len() > HISTORY {
            s.history.remove(0);
        }
    }
}

/// How long a tick waits for the other replicas' loads.
const ASK_LOADS: Duration = Duration::from_millis(700);

/// Tick every second, with the mesh this replica follows and, on a shared store, the loads
/// the other replicas heard.
pub(crate) async fn run(
    spill: std::sync::Arc<Spill>,
    state: tokio::sync::watch::Receiver<std::sync::Arc<crate::state::State>>,
    replicas: Option<std::sync::Arc<crate::replicas::Replicas>>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Some(r) = replicas.as_ref().filter(|_| spill.active()) {
            let heard = r.loads(ASK_LOADS).await;
            spill.merge(&heard, Instant::now());
        }
        let st = state.borrow().clone();
        tick_with(&spill, &st.compiled, Instant::now());
    }
}

/// Tick with the mesh of `compiled`: its whole-mesh translation only when some
/// BackendTrafficPolicy asks for spill-over (that translation costs tens of milliseconds at
/// 10,000 workloads, made again after every change of the mesh); without, the services'
/// states are let go.
fn tick_with(spill: &Spill, compiled: &crate::catalog::Compiled, now: Instant) {
    let spills = compiled.effective.iter().any(|r| {
        matches!(&r.spec, trellis_model::resource::Spec::BackendPolicy(p) if p.spillover.is_some())
    });
    if !spills {
        spill.tick(&ProxyConfig::default(), now);
    } else if let Ok(mesh) = compiled.mesh() {
        spill.tick(mesh, now);
    }
}

#[cfg(test)]
mod tests;
