//! A cluster: one service port's endpoints, with their load-balancer, outlier and pool state,
//! and the cluster-wide circuit breakers and retry budget.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use trellis_model::{
    proxy::{BackendPolicy, ClusterConfig, EndpointConfig},
    resource::{LbKind, Locality, LocalityMode},
};

use crate::{
    error::FailureClass,
    metrics::{ClusterLabels, EndpointLabels, Label, Metrics},
    pool::{ConnectCtx, Dialer, Pool},
};

mod budget;
pub(crate) use budget::RetryBudget;

/// One endpoint and everything the proxy learned about it.
pub(crate) struct Endpoint {
    /// Its config.
    pub(crate) cfg: EndpointConfig,
    /// Its workload's name, as a metric label.
    pub(crate) workload: Label,
    /// Its locality, `region/zone`, as a metric label.
    pub(crate) locality: Label,
    /// Its workload, `namespace/name` (for the control plane's summaries).
    pub(crate) workload_id: Label,
    /// The identity its proxy must present, `namespace/identity`, when reached through it.
    pub(crate) identity: Label,
    /// Its environment.
    pub(crate) environment: Label,
    /// The address this proxy connects to: the peer's proxy for a meshed endpoint (when this
    /// proxy has an identity), else the application.
    pub(crate) target: std::net::SocketAddr,
    /// Its connection pool.
    pub(crate) pool: Pool,
    in_flight: AtomicU32,
    /// The health-check recoveries last seen in the config (see [`Endpoint::recovered`]).
    recoveries: AtomicU64,
    /// Peak-EWMA latency estimate, nanoseconds, and when it was last updated.
    ewma: Mutex<(f64, Instant)>,
    /// Whether a latency sample has been taken.
    timed: std::sync::atomic::AtomicBool,
    outlier: Mutex<Outlier>,
}

#[derive(Default)]
struct Outlier {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Decrements an endpoint's in-flight count when dropped, so cancelled requests count too.
pub(crate) struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// EWMA decay window: latency samples older than this weigh less than 1/e.
const EWMA_DECAY: Duration = Duration::from_secs(10);
// Optimistic first guess so that new endpoints get traffic.
const EWMA_INITIAL_NS: f64 = 1_000_000.0;

/// `region/zone` (either part may be empty), or empty when neither is known.
pub(crate) fn locality_label(l: &Locality) -> String {
    match (&l.region, &l.zone) {
        (None, None) => String::new(),
        (r, z) => format!(
            "{}/{}",
            r.as_deref().unwrap_or_default(),
            z.as_deref().unwrap_or_default()
        ),
    }
}

/// Endpoints as the caller's locality sees them.
enum Tiers {
    /// No preference: every endpoint alike.
    Flat,
    /// By endpoint index: 0 the caller's zone, 1 its region, 2 elsewhere; a nearer tier
    /// keeps the traffic while its healthy share × `opf` % is at least 100 %.
    Failover { tier: Vec<u8>, opf: u32 },
    /// By endpoint index, the locality group it belongs to (an index into `weights`), if any.
    Weighted {
        group: Vec<Option<usize>>,
        weights: Vec<u32>,
    },
    /// Spill-over by load: by endpoint index, its pool; the shares the control plane gives
    /// (see [`SpillShares`]); health failover (`opf`, as [`Tiers::Failover`]) underneath.
    Spill {
        pool: Vec<u8>,
        shares: Arc<SpillShares>,
        opf: u32,
    },
}

/// Pools of a spill-over policy, with the one of endpoints matching none.
const POOLS: usize = trellis_model::proxy::MAX_POOLS + 1;

/// A service's spill-over shares, set by the load exchange with the control plane
/// ([`crate::spill_link`]) and read by every pick: by pool, thousandths of the traffic
/// reaching it that go on to the next pool with a usable endpoint.
#[derive(Default)]
pub(crate) struct SpillShares {
    permille: [AtomicU32; POOLS],
}

impl SpillShares {
    /// Take the control plane's shares (missing ones are 0; each at most 1,000).
    pub(crate) fn set(&self, permille: &[u32]) {
        for (i, s) in self.permille.iter().enumerate() {
            let v = permille.get(i).copied().unwrap_or(0).min(1000);
            s.store(v, Ordering::Relaxed);
        }
    }

    fn get(&self, i: usize) -> u32 {
        self.permille[i].load(Ordering::Relaxed)
    }
}

impl Tiers {
    /// `prev`: the shares of the cluster this one replaces (kept while its pools are the
    /// same, so a reload does not bring spilled traffic back for a second).
    fn new(cfg: &ClusterConfig, local: Option<&Locality>, prev: Option<&Tiers>) -> Self {
        let lb = &cfg.policy.locality;
        if let Some(sp) = &cfg.policy.spillover {
            let shares = match prev {
                Some(Tiers::Spill { shares, .. }) => shares.clone(),
                _ => Arc::default(),
            };
            return Self::Spill {
                pool: cfg
                    .endpoints
                    .iter()
                    .map(|e| sp.pool_of(e.environment, &e.locality) as u8)
                    .collect(),
                shares,
                opf: lb.overprovisioning,
            };
        }
        match lb.mode {
            LocalityMode::Disabled => Self::Flat,
            LocalityMode::Weighted => {
                let matches = |w: &trellis_model::resource::LocalityWeight, l: &Locality| {
                    w.region
                        .as_ref()
                        .is_none_or(|r| l.region.as_ref() == Some(r))
                        && w.zone.as_ref().is_none_or(|z| l.zone.as_ref() == Some(z))
                };
                let group = cfg
                    .endpoints
                    .iter()
                    .map(|e| lb.weights.iter().position(|w| matches(w, &e.locality)))
                    .collect();
                Self::Weighted {
                    group,
                    weights: lb.weights.iter().map(|w| w.weight).collect(),
                }
            }
            LocalityMode::Failover => {
                let Some(me) = local.filter(|l| l.region.is_some() || l.zone.is_some()) else {
                    return Self::Flat;
                };
                let tier: Vec<u8> = cfg
                    .endpoints
                    .iter()
                    .map(|e| {
                        let region = e.locality.region == me.region;
                        match (region, e.locality.zone == me.zone) {
                            (true, true) => 0,
                            (true, false) => 1,
                            _ => 2,
                        }
                    })
                    .collect();
                if tier.windows(2).all(|w| w[0] == w[1]) {
                    return Self::Flat;
                }
                Self::Failover {
                    tier,
                    opf: lb.overprovisioning,
                }
            }
        }
    }
}

impl Endpoint {
    /// This endpoint as the peer of a summary: reached through its proxy when `target` is
    /// not the application.
    pub(crate) fn peer_key(&self) -> crate::summary::PeerKey {
        crate::summary::PeerKey {
            workload: self.workload_id.clone(),
            identity: self.identity.clone(),
            environment: self.environment.clone(),
            locality: self.locality.clone(),
            endpoint: Some(self.target),
            mtls: self.via_peer_proxy(),
        }
    }

    fn new(cfg: EndpointConfig, idle_timeout: Duration, meshed: bool) -> Self {
        let target = match (&cfg.mesh, meshed) {
            (Some(m), true) => m.inbound,
            _ => cfg.addr,
        };
        let workload: Arc<str> = cfg.workload.to_string().into();
        let recoveries = cfg.recoveries;
        let identity = match (&cfg.mesh, target != cfg.addr) {
            (Some(m), true) => Label::from(m.identity.to_string().as_str()),
            _ => Label::default(),
        };
        Self {
            pool: Pool::new(cfg.addr, workload.clone(), cfg.mesh.clone(), idle_timeout),
            target,
            workload: cfg.workload.name.as_str().into(),
            locality: locality_label(&cfg.locality).as_str().into(),
            workload_id: Label::from(workload),
            identity,
            environment: cfg.environment.as_str().into(),
            cfg,
            in_flight: AtomicU32::new(0),
            recoveries: AtomicU64::new(recoveries),
            ewma: Mutex::new((EWMA_INITIAL_NS, Instant::now())),
            timed: std::sync::atomic::AtomicBool::new(false),
            outlier: Mutex::new(Outlier::default()),
        }
    }

    /// Whether it is reached at its workload's proxy (whose own answers say so), not at
    /// the application directly.
    pub(crate) fn via_peer_proxy(&self) -> bool {
        self.target != self.cfg.addr
    }

    /// Requests in flight.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Mark a request as started.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn cost(&self) -> f64 {
        let (ewma, _) = *self.ewma.lock().expect("ewma lock");
        ewma * f64::from(self.in_flight() + 1) / f64::from(self.cfg.weight)
    }

    /// Record a latency sample taken at `now`. Peak-sensitive: a slower sample replaces the
    /// estimate at once, a faster one decays it.
    pub(crate) fn observe_latency(&self, rtt: Duration, now: Instant) {
        if !self.timed.load(Ordering::Relaxed) {
            self.timed.store(true, Ordering::Relaxed);
        }
        let mut g = self.ewma.lock().expect("ewma lock");
        let sample = rtt.as_nanos() as f64;
        if sample > g.0 {
            g.0 = sample;
        } else {
            let dt = now.saturating_duration_since(g.1).as_secs_f64();
            let w = (-dt / EWMA_DECAY.as_secs_f64()).exp();
            g.0 = g.0 * w + sample * (1.0 - w);
        }
        g.1 = now;
    }

    fn is_ejected(&self, now: Instant) -> bool {
        let mut o = self.outlier.lock().expect("outlier lock");
        match o.ejected_until {
            Some(t) if t > now => true,
            Some(_) => {
                o.ejected_until = None;
                false
            }
            None => false,
        }
    }

    /// Whether the endpoint is currently ejected.
    pub(crate) fn ejected(&self) -> bool {
        self.is_ejected(Instant::now())
    }

    /// The config says its health check passed again (`recoveries` grew): an ejection by
    /// outlier detection is lifted, as Envoy does when an active health check passes. `true`
    /// when one was.
    fn recovered(&self, recoveries: u64) -> bool {
        if self.recoveries.fetch_max(recoveries, Ordering::AcqRel) >= recoveries {
            return false;
        }
        self.lift()
    }

    /// Lift an ejection by outlier detection and forget the failures counted; `true` when
    /// there was one.
    fn lift(&self) -> bool {
        let mut o = self.outlier.lock().expect("outlier lock");
        o.consecutive_failures = 0;
        o.ejected_until.take().is_some()
    }
}

/// A cluster and its runtime state.
pub(crate) struct Cluster {
    /// Its key, `namespace/service:port`.
    pub(crate) key: String,
    /// Its config.
    pub(crate) cfg: Arc<ClusterConfig>,
    /// Its service's `NAME.NAMESPACE`, as a metric label.
    pub(crate) service: Label,
    /// Endpoints.
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    /// Retry budget.
    pub(crate) budget: Arc<RetryBudget>,
    requests: Arc<Semaphore>,
    /// Connection slots (max connections).
    pub(crate) connections: Arc<Semaphore>,
    pending: AtomicUsize,
    rr: AtomicU64,
    metrics: Metrics,
    labels: ClusterLabels,
    tiers: Tiers,
}

/// Why a cluster could not take a request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdmitError {
    /// Circuit open.
    #[error("cluster {0}: circuit breaker open (max requests and max pending reached)")]
    Overloaded(String),
}

impl Cluster {
    /// Build a cluster, reusing endpoint state (pools, latency, ejections) and the retry
    /// budget from `prev` where the endpoint is unchanged, so that a reload is invisible.
    pub(crate) fn new(
        key: String,
        cfg: Arc<ClusterConfig>,
        prev: Option<&Cluster>,
        metrics: &Metrics,
        local: Option<&Locality>,
        meshed: bool,
    ) -> Self {
        let idle = cfg.policy.idle_timeout;
        let same_pools = prev.is_some_and(|p| p.cfg.policy.spillover == cfg.policy.spillover);
        let tiers = Tiers::new(&cfg, local, prev.filter(|_| same_pools).map(|p| &p.tiers));
        let mut lifted = 0;
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|e| {
                let old = prev.and_then(|p| {
                    p.endpoints.iter().find(|o| {
                        o.cfg.same_endpoint(e) && p.cfg.policy.idle_timeout == idle
                    })
                });
                match old {
                    Some(o) => {
                        // Lifted when its health check passed again, or when the policy
                        // now has outlier detection off (an operator turning it off wants
                        // the endpoints it ejected back, not after their time).
                        let why = if o.recovered(e.recoveries) {
                            Some("health check passed again")
                        } else if cfg.policy.consecutive_failures == 0 && o.lift() {
                            Some("outlier detection is off")
                        } else {
                            None
                        };
                        if let Some(why) = why {
                            lifted += 1;
                            tracing::info!(cluster = %key, endpoint = %o.target, workload = %e.workload, "{why}: ejection lifted");
                            metrics.note_ejection(trellis_telemetry::report::Ejection {
                                service: cfg.service.to_string(),
                                peer_workload: e.workload.to_string(),
                                endpoint: o.target.to_string(),
                                at_ms: crate::summary::now_ms(),
                                ..Default::default()
                            });
                        }
                        o.clone()
                    }
                    None => Arc::new(Endpoint::new(e.clone(), idle, meshed)),
                }
            })
            .collect::<Vec<_>>();
        warm_start(&endpoints);
        let p = &cfg.policy;
        let (budget, requests, connections) = match prev {
            Some(prev) if prev.cfg.policy == *p => (
                prev.budget.clone(),
                prev.requests.clone(),
                prev.connections.clone(),
            ),
            _ => (
                Arc::new(RetryBudget::new(
                    p.retry_budget_percent,
                    p.retry_min_per_second,
                )),
                Arc::new(Semaphore::new(p.max_requests as usize)),
                Arc::new(Semaphore::new(p.max_connections as usize)),
            ),
        };
        let c = Self {
            labels: ClusterLabels {
                cluster: key.clone(),
            },
            service: cfg.service.host().as_str().into(),
            key,
            cfg,
            endpoints,
            budget,
            requests,
            connections,
            pending: AtomicUsize::new(0),
            rr: AtomicU64::new(0),
            metrics: metrics.clone(),
            tiers,
        };
        if lifted > 0 {
            c.update_ejected_gauge();
        }
        c
    }

    /// Whether it is in use: a request within the retry budget's window (10 s), a request in
    /// flight or a connection open (connections unused past the idle timeout are closed
    /// first, HTTP/2 ones to peers' proxies included: they would not be reused).
    pub(crate) fn busy(&self, now: Instant) -> bool {
        let p = &self.cfg.policy;
        for e in &self.endpoints {
            e.pool.prune(now);
        }
        self.budget.recent(now)
            || self.requests.available_permits() < p.max_requests as usize
            || self.connections.available_permits() < p.max_connections as usize
    }

    /// The policy.
    pub(crate) fn policy(&self) -> &BackendPolicy {
        &self.cfg.policy
    }

    /// What an endpoint pool of this cluster needs to open a connection.
    /// Whether its protocol is HTTP/2 (gRPC included) end to end.
    pub(crate) fn http2(&self) -> bool {
        matches!(
            self.cfg.protocol,
            trellis_model::resource::Protocol::Http2 | trellis_model::resource::Protocol::Grpc
        )
    }

    pub(crate) fn connect_ctx<'a>(&'a self, dialer: &'a Dialer) -> ConnectCtx<'a> {
        ConnectCtx {
            timeout: self.cfg.policy.connect_timeout,
            slots: &self.connections,
            cluster: &self.key,
            metrics: &dialer.metrics,
            tls: dialer.tls.as_ref(),
            mtls: self.cfg.mtls,
            port: self.cfg.port,
            mark: dialer.mark,
        }
    }

    /// Admit a request: take an in-flight slot, waiting in the bounded pending queue for at
    /// most `wait` if none is free.
    pub(crate) async fn admit(&self, wait: Duration) -> Result<OwnedSemaphorePermit, AdmitError> {
        if let Ok(p) = self.requests.clone().try_acquire_owned() {
            return Ok(p);
        }
        let overloaded = || {
            self.metrics.overflows.get_or_create(&self.labels).inc();
            AdmitError::Overloaded(self.key.clone())
        };
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.cfg.policy.max_pending as usize {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(overloaded());
        }
        let r = tokio::time::timeout(wait, self.requests.clone().acquire_owned()).await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        match r {
            Ok(Ok(p)) => Ok(p),
            _ => Err(overloaded()),
        }
    }

    #[cfg(test)]
    /// Pick an endpoint, skipping those ejected at `now`. `None` when there is no healthy
    /// endpoint. (The caller passes the time it already read: clock reads cost in VMs.)
    pub(crate) fn pick(&self, now: Instant) -> Option<Arc<Endpoint>> {
        self.pick_avoiding(now, None)
    }

    /// Pick as [`Cluster::pick`] does, but not `avoid` (the endpoint a failed try went to)
    /// while another is usable: a retry goes elsewhere, as Envoy's `previous_hosts`.
    pub(crate) fn pick_avoiding(
        &self,
        now: Instant,
        avoid: Option<&Arc<Endpoint>>,
    ) -> Option<Arc<Endpoint>> {
        let usable =
            |e: &Arc<Endpoint>| !e.is_ejected(now) && !avoid.is_some_and(|a| Arc::ptr_eq(a, e));
        let picked = match &self.tiers {
            Tiers::Flat if avoid.is_none() && !self.endpoints.iter().any(|e| e.is_ejected(now)) => {
                // Usually nothing is ejected: choose among all endpoints without a list.
                return self.choose(&self.endpoints);
            }
            Tiers::Flat => {
                let healthy: Vec<Arc<Endpoint>> = self
                    .endpoints
                    .iter()
                    .filter(|e| usable(e))
                    .cloned()
                    .collect();
                self.choose(&healthy)
            }
            Tiers::Failover { tier, opf } => self.pick_failover(tier, *opf, &usable),
            Tiers::Weighted { group, weights } => self.pick_weighted(group, weights, &usable),
            Tiers::Spill { pool, shares, opf } => self.pick_spill(pool, shares, *opf, &usable),
        };
        match picked {
            // Nothing else is usable: the same endpoint again rather than none.
            None if avoid.is_some() => self.pick_avoiding(now, None),
            p => p,
        }
    }

    /// Envoy's priority load: the nearest tier takes min(100 %, healthy share × opf) of the
    /// traffic, the next one as much of the rest as its own health allows, and so on; when
    /// every tier is degraded the shares are scaled to the whole.
    fn pick_failover(
        &self,
        tier: &[u8],
        opf: u32,
        usable: &dyn Fn(&Arc<Endpoint>) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let (load, _) = self.priority_load::<3>(tier, opf, usable);
        let t = weighted_index(&load.map(|l| l as u32))?;
        self.choose(&self.tier_members(tier, t, usable))
    }

    /// Spill-over: each pool first takes what its health allows (as [`Tiers::Failover`]:
    /// min(100 %, healthy share × `opf`) of what is left), then passes its share of what it
    /// took on to the next pool with a usable endpoint (which may pass some on in turn).
    fn pick_spill(
        &self,
        pool: &[u8],
        shares: &SpillShares,
        opf: u32,
        usable: &dyn Fn(&Arc<Endpoint>) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let (mut load, healthy) = self.priority_load::<POOLS>(pool, opf, usable);
        for p in 0..POOLS {
            let Some(next) = (p + 1..POOLS).find(|&q| healthy[q] > 0) else {
                break;
            };
            let moved = load[p] * u64::from(shares.get(p)) / 1000;
            load[p] -= moved;
            load[next] += moved;
        }
        let p = weighted_index(&load.map(|l| l as u32))?;
        self.choose(&self.tier_members(pool, p, usable))
    }

    /// Envoy's priority load over the `N` tiers `tier` gives each endpoint (by index): in
    /// order, each takes min(100 %, its healthy share × `opf` %) of what the ones before it
    /// left, an empty tier nothing. In hundred-thousandths of the traffic, with each tier's
    /// usable endpoints.
    fn priority_load<const N: usize>(
        &self,
        tier: &[u8],
        opf: u32,
        usable: &dyn Fn(&Arc<Endpoint>) -> bool,
    ) -> ([u64; N], [u32; N]) {
        const WHOLE: u64 = 100_000;
        let (mut total, mut healthy) = ([0u32; N], [0u32; N]);
        for (e, &t) in self.endpoints.iter().zip(tier) {
            total[t as usize] += 1;
            if usable(e) {
                healthy[t as usize] += 1;
            }
        }
        let (mut load, mut left) = ([0u64; N], WHOLE);
        for t in 0..N {
            if let Some(share) =
                (u64::from(healthy[t]) * u64::from(opf)).checked_div(u64::from(total[t]))
            {
                load[t] = (share.min(100) * WHOLE / 100).min(left);
                left -= load[t];
            }
        }
        (load, healthy)
    }

    /// The usable endpoints of tier `t`.
    fn tier_members(
        &self,
        tier: &[u8],
        t: usize,
        usable: &dyn Fn(&Arc<Endpoint>) -> bool,
    ) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .iter()
            .zip(tier)
            .filter(|(e, &et)| et as usize == t && usable(e))
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// The spill-over shares of this cluster, if its service has a spill-over policy.
    pub(crate) fn spill_shares(&self) -> Option<&SpillShares> {
        match &self.tiers {
            Tiers::Spill { shares, .. } => Some(shares),
            _ => None,
        }
    }

    /// A locality group by its weight, among those with a healthy endpoint.
    fn pick_weighted(
        &self,
        group: &[Option<usize>],
        weights: &[u32],
        usable: &dyn Fn(&Arc<Endpoint>) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let mut live = vec![0u32; weights.len()];
        for (e, g) in self.endpoints.iter().zip(group) {
            if let Some(g) = g.filter(|_| usable(e)) {
                live[g] = weights[g];
            }
        }
        let g = weighted_index(&live)?;
        let members: Vec<Arc<Endpoint>> = self
            .endpoints
            .iter()
            .zip(group)
            .filter(|(e, eg)| **eg == Some(g) && usable(e))
            .map(|(e, _)| e.clone())
            .collect();
        self.choose(&members)
    }

    fn choose(&self, healthy: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        match healthy.len() {
            0 => None,
            1 => Some(healthy[0].clone()),
            _ => Some(
                match self.cfg.policy.lb {
                    LbKind::RoundRobin => self.round_robin(healthy),
                    LbKind::PeakEWMA => p2c(healthy, |e| e.cost()),
                    LbKind::LeastRequest => p2c(healthy, |e| {
                        f64::from(e.in_flight() + 1) / f64::from(e.cfg.weight)
                    }),
                }
                .clone(),
            ),
        }
    }

    fn round_robin<'a>(&self, healthy: &'a [Arc<Endpoint>]) -> &'a Arc<Endpoint> {
        let total: u64 = healthy.iter().map(|e| u64::from(e.cfg.weight)).sum();
        let mut n = self.rr.fetch_add(1, Ordering::Relaxed) % total;
        for e in healthy {
            let w = u64::from(e.cfg.weight);
            if n < w {
                return e;
            }
            n -= w;
        }
        &healthy[0]
    }

    /// Report the outcome of one try against `ep`, for outlier detection.
    pub(crate) fn report(&self, ep: &Endpoint, class: FailureClass) {
        let p = &self.cfg.policy;
        let failed = matches!(
            class,
            FailureClass::AppError
                | FailureClass::ConnectRefused
                | FailureClass::ConnectTimeout
                | FailureClass::ConnectionReset
                | FailureClass::UpstreamTimeout
                | FailureClass::ProtocolError
        );
        let mut o = ep.outlier.lock().expect("outlier lock");
        if !failed {
            o.consecutive_failures = 0;
            return;
        }
        o.consecutive_failures += 1;
        if p.consecutive_failures == 0
            || o.consecutive_failures < p.consecutive_failures
            || o.ejected_until.is_some()
        {
            return;
        }
        drop(o);
        // Cap the ejected share, but always allow one ejection (as Envoy does).
        let now = Instant::now();
        let ejected = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let n = self.endpoints.len();
        if ejected > 0 && (ejected + 1) * 100 > n * p.max_ejection_percent as usize {
            return;
        }
        let mut o = ep.outlier.lock().expect("outlier lock");
        let factor = 1u32 << o.ejections.min(16);
        let t = p.base_ejection.saturating_mul(factor).min(p.max_ejection);
        o.ejections += 1;
        o.consecutive_failures = 0;
        o.ejected_until = Some(now + t);
        drop(o);
        tracing::warn!(cluster = %self.key, endpoint = %ep.target, workload = %ep.cfg.workload, app = %ep.cfg.addr, ejection_secs = t.as_secs_f64(), "outlier detection ejected an endpoint");
        self.metrics
            .note_ejection(trellis_telemetry::report::Ejection {
                service: self.cfg.service.to_string(),
                peer_workload: ep.cfg.workload.to_string(),
                endpoint: ep.target.to_string(),
                at_ms: crate::summary::now_ms(),
                seconds: t.as_secs().max(1) as u32,
                class: class.as_str().into(),
                failures: p.consecutive_failures,
            });
        let labels = EndpointLabels {
            cluster: self.key.clone(),
            endpoint: ep.target.to_string(),
        };
        self.metrics.ejections.get_or_create(&labels).inc();
        self.update_ejected_gauge();
    }

    /// Refresh the ejected-endpoints gauge.
    pub(crate) fn update_ejected_gauge(&self) {
        let now = Instant::now();
        let n = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        self.metrics
            .ejected
            .get_or_create(&self.labels)
            .set(n as i64);
    }
}

/// Endpoints never timed (new, or back before they took a request) start at half the
/// fastest timed one's estimate, so that the next pick tries them and they compete on their
/// own numbers from then on. With the fixed initial estimate alone, an endpoint of a service
/// that answers faster than it was never picked while the others stayed fast: a scale-out
/// that took no traffic.
fn warm_start(endpoints: &[Arc<Endpoint>]) {
    let estimate = |e: &Endpoint| e.ewma.lock().expect("ewma lock").0;
    let fastest = endpoints
        .iter()
        .filter(|e| e.timed.load(Ordering::Relaxed))
        .map(|e| estimate(e))
        .min_by(f64::total_cmp);
    let Some(fastest) = fastest else {
        return;
    };
    for e in endpoints
        .iter()
        .filter(|e| !e.timed.load(Ordering::Relaxed))
    {
        let mut g = e.ewma.lock().expect("ewma lock");
        g.0 = g.0.min(fastest / 2.0);
    }
}

/// Power of two choices: two distinct random candidates (weighted by endpoint weight), keep
/// the cheaper.
fn p2c(healthy: &[Arc<Endpoint>], cost: impl Fn(&Endpoint) -> f64) -> &Arc<Endpoint> {
    let total: u64 = healthy.iter().map(|e| u64::from(e.cfg.weight)).sum();
    let weighted = |r: u64| {
        let mut n = r;
        for (i, e) in healthy.iter().enumerate() {
            let w = u64::from(e.cfg.weight);
            if n < w {
                return i;
            }
            n -= w;
        }
        0
    };
    let a = weighted(fastrand::u64(..total));
    let mut b = weighted(fastrand::u64(..total));
    if a == b {
        b = (a + 1 + fastrand::usize(..healthy.len() - 1)) % healthy.len();
    }
    if cost(&healthy[a]) <= cost(&healthy[b]) {
        &healthy[a]
    } else {
        &healthy[b]
    }
}

#[cfg(test)]
mod tests;

/// An index drawn with probability proportional to `weights`; `None` when all are zero.
fn weighted_index(weights: &[u32]) -> Option<usize> {
    let sum: u32 = weights.iter().sum();
    if sum == 0 {
        return None;
    }
    let mut r = fastrand::u32(0..sum);
    weights.iter().position(|&w| {
        if r < w {
            true
        } else {
            r -= w;
            false
        }
    })
}
