//! The load exchange behind spill-over: every proxy tells the control plane, about once a
//! second, how loaded its workload is (`POST /v1/load`, JSON, on the connection it holds for
//! xDS), and the answer carries the shares the control plane decided from the whole fleet's
//! loads: for each service with a spill-over policy, which share of each pool's traffic goes
//! on to the next pool. A caller with little traffic of its own so follows the same shares as
//! the busy ones.

use serde::{Deserialize, Serialize};

/// What a proxy tells of its workload's load over the last period.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Beacon {
    /// `namespace/name`, or empty for a proxy without a workload.
    pub workload: String,
    /// Its inbound adaptive concurrency limit now (0: none, the limit is off).
    pub limit: u32,
    /// Requests in flight to the application on average over the period (the time they
    /// took, summed, over the period's length: Little's law), in thousandths.
    pub in_flight_milli: u64,
    /// Requests shed by the limit during the period.
    pub shed: u64,
    /// Requests the application answered during the period.
    #[serde(default)]
    pub answered: u64,
}

/// A beacon one replica heard itself, `age_ms` ago, as it passes it to the others
/// (`GET /v1/fleet/loads`), so that every replica decides from the whole fleet's loads
/// whichever replica each proxy is connected to. An age, not a time: the replicas' clocks
/// need not agree.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Heard {
    /// The beacon.
    pub beacon: Beacon,
    /// How long ago it came.
    pub age_ms: u64,
}

/// The control plane's answer.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// When to send the next beacon, milliseconds (often while a service spills over, or
    /// could; rarely otherwise).
    pub every_ms: u32,
    /// Spill-over shares, by service.
    pub spill: Vec<Shares>,
}

/// One service's shares.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Shares {
    /// `namespace/name`.
    pub service: String,
    /// By pool of its spill-over policy, in order: thousandths of the traffic reaching
    /// that pool that go on to the next pool with a healthy endpoint.
    pub permille: Vec<u32>,
}

/// Where a service spills over, for `stat`, `describe` and the pane.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct SpillState {
    /// `namespace/name`.
    pub service: String,
    /// Its pools in order, with their load now.
    pub pools: Vec<PoolState>,
    /// What moved lately (newest last, at most [`HISTORY`]).
    pub history: Vec<SpillChange>,
}

/// One pool's state.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PoolState {
    /// Its name ("vm", "container z1", "other").
    pub name: String,
    /// Workloads in it with a load heard lately.
    pub workloads: u32,
    /// Percent of its capacity in flight (None: no load heard).
    pub load_percent: Option<f64>,
    /// Requests its workloads shed in the last beacon periods.
    pub shed: u64,
    /// Percent of the traffic reaching it that goes on to the next pool.
    pub spilled_percent: f64,
    /// Since when it spills (Unix ms), while it does.
    pub since_ms: Option<u64>,
    /// The pool its spilled traffic goes to.
    pub to: Option<String>,
}

/// Changes kept per service.
pub const HISTORY: usize = 20;

/// A change of a pool's share.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct SpillChange {
    /// When (Unix ms).
    pub at_ms: u64,
    /// The pool.
    pub pool: String,
    /// `started`, `ended`.
    pub what: String,
    /// Its load then, percent.
    pub load_percent: Option<f64>,
}

impl SpillState {
    /// One line per pool that spills: "catalog: 23 % spilled vm → container since …"
    /// (`since` formats the time).
    pub fn lines(&self, since: impl Fn(u64) -> String) -> Vec<String> {
        self.pools
            .iter()
            .filter(|p| p.spilled_percent > 0.0)
            .map(|p| {
                format!(
                    "{}: {:.0} % spilled {} → {}{}",
                    self.service,
                    p.spilled_percent,
                    p.name,
                    p.to.as_deref().unwrap_or("?"),
                    p.since_ms
                        .map(|s| format!(" since {}", since(s)))
                        .unwrap_or_default()
                )
            })
            .collect()
    }
}

/// `ms` (Unix) as a UTC time of day, `14:02:05 UTC`.
pub fn clock(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}
