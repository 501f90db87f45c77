//! A replica's share of a window, as another replica asks for it.
//!
//! With several control-plane replicas, each proxy reports to the one it is connected to, so
//! each replica's store holds part of the fleet. A query on any replica gathers the others'
//! [`Shard`]s of the same window and merges them into its own ([`Window::merge`]) before the
//! view is computed: counts add, and the histograms merge exactly, so the answer is the one
//! a single store holding every report would give.

use std::{collections::HashMap, sync::Arc};

use trellis_taxonomy::FailureClass;

use crate::{
    hist,
    key::{Counts, Direction, Key, LatKey, Protocol},
    report::Histogram,
    store::{FailedAttempt, Window},
};

/// A replica's window, on the wire (protobuf).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Shard {
    /// Where the window starts (Unix ms), whole slots.
    #[prost(uint64, tag = "1")]
    pub from_ms: u64,
    /// Series with their counts.
    #[prost(message, repeated, tag = "2")]
    pub series: Vec<ShardSeries>,
    /// Latency groups with their histograms.
    #[prost(message, repeated, tag = "3")]
    pub latency: Vec<ShardLatency>,
    /// The identity each reporting workload proved (for `edges`).
    #[prost(message, repeated, tag = "4")]
    pub identities: Vec<ShardIdentity>,
    /// Failed requests listed one by one.
    #[prost(message, repeated, tag = "5")]
    pub attempts: Vec<ShardAttempt>,
    /// Reporters' latest link figures.
    #[prost(message, repeated, tag = "6")]
    pub links: Vec<ShardLink>,
    /// The reporters heard from in the window.
    #[prost(message, repeated, tag = "7")]
    pub reporting: Vec<ShardSeen>,
    /// Ejections the reporters told.
    #[prost(message, repeated, tag = "8")]
    pub ejections: Vec<ShardEjection>,
    /// Slow requests listed one by one.
    #[prost(message, repeated, tag = "9")]
    pub slow: Vec<ShardAttempt>,
    /// The reporters' adaptive concurrency limits.
    #[prost(message, repeated, tag = "10")]
    pub adaptive: Vec<ShardAdaptive>,
    /// Mirrored requests' figures.
    #[prost(message, repeated, tag = "11")]
    pub mirrors: Vec<ShardMirror>,
}

/// Mirror figures of a shard, with who told them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardMirror {
    /// The reporting workload.
    #[prost(string, tag = "1")]
    pub reporter: String,
    /// When that replica received them (Unix ms).
    #[prost(uint64, tag = "2")]
    pub received_ms: u64,
    /// What the proxy said.
    #[prost(message, optional, tag = "3")]
    pub figures: Option<crate::report::Mirrored>,
}

/// A reporter's adaptive concurrency limit.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardAdaptive {
    /// The reporting workload.
    #[prost(string, tag = "1")]
    pub reporter: String,
    /// Its figures.
    #[prost(message, optional, tag = "2")]
    pub figures: Option<crate::report::Adaptive>,
}

/// An ejection of a shard, with who told it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardEjection {
    /// The reporting workload.
    #[prost(string, tag = "1")]
    pub reporter: String,
    /// When that replica received it (Unix ms).
    #[prost(uint64, tag = "2")]
    pub received_ms: u64,
    /// What the proxy said.
    #[prost(message, optional, tag = "3")]
    pub ejection: Option<crate::report::Ejection>,
}

/// A reporter heard from, and when last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardSeen {
    /// The reporting workload.
    #[prost(string, tag = "1")]
    pub reporter: String,
    /// When it was last heard from (Unix ms).
    #[prost(uint64, tag = "2")]
    pub seen_ms: u64,
}

/// A reporter's link figures.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardLink {
    /// The reporting workload.
    #[prost(string, tag = "1")]
    pub reporter: String,
    /// Its figures.
    #[prost(message, optional, tag = "2")]
    pub link: Option<crate::report::Link>,
}

/// A failed request of a shard, with who listed it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardAttempt {
    /// The reporting workload.
    #[prost(string, tag = "1")]
    pub reporter: String,
    /// When that replica received it (Unix ms).
    #[prost(uint64, tag = "2")]
    pub received_ms: u64,
    /// What the proxy said.
    #[prost(message, optional, tag = "3")]
    pub attempt: Option<crate::report::Attempt>,
    /// Its period's list is whole up to this id.
    #[prost(fixed64, tag = "4")]
    pub listed_below: u64,
}

/// A series of a shard: its key and counts.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardSeries {
    /// 0 outbound, 1 inbound.
    #[prost(uint32, tag = "1")]
    pub direction: u32,
    /// 0 HTTP, 1 TCP.
    #[prost(uint32, tag = "2")]
    pub protocol: u32,
    /// The reporting workload.
    #[prost(string, tag = "3")]
    pub workload: String,
    /// Its environment.
    #[prost(string, tag = "4")]
    pub environment: String,
    /// Its locality.
    #[prost(string, tag = "5")]
    pub locality: String,
    /// Service.
    #[prost(string, tag = "6")]
    pub service: String,
    /// Route.
    #[prost(string, tag = "7")]
    pub route: String,
    /// The peer's workload.
    #[prost(string, tag = "8")]
    pub peer_workload: String,
    /// The peer's identity.
    #[prost(string, tag = "9")]
    pub peer_identity: String,
    /// The peer's environment.
    #[prost(string, tag = "10")]
    pub peer_environment: String,
    /// The peer's locality.
    #[prost(string, tag = "11")]
    pub peer_locality: String,
    /// The address connected to.
    #[prost(string, tag = "12")]
    pub endpoint: String,
    /// Mutual TLS.
    #[prost(bool, tag = "13")]
    pub mtls: bool,
    /// Failure class.
    #[prost(string, tag = "14")]
    pub class: String,
    /// Status hundreds.
    #[prost(uint32, tag = "15")]
    pub status_class: u32,
    /// Requests.
    #[prost(uint64, tag = "16")]
    pub requests: u64,
    /// Attempts.
    #[prost(uint64, tag = "17")]
    pub attempts: u64,
    /// TCP connections opened.
    #[prost(uint32, tag = "18")]
    pub tcp_opened: u32,
    /// TCP connections closed.
    #[prost(uint32, tag = "19")]
    pub tcp_closed: u32,
    /// TCP bytes.
    #[prost(uint64, tag = "20")]
    pub tcp_bytes: u64,
    /// TCP connections open at the latest period.
    #[prost(uint32, tag = "21")]
    pub tcp_open: u32,
    /// That period's slot.
    #[prost(uint32, tag = "22")]
    pub tcp_open_at: u32,
}

/// A latency group of a shard.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardLatency {
    /// 0 outbound, 1 inbound.
    #[prost(uint32, tag = "1")]
    pub direction: u32,
    /// The reporting workload.
    #[prost(string, tag = "2")]
    pub workload: String,
    /// Service.
    #[prost(string, tag = "3")]
    pub service: String,
    /// The peer's workload.
    #[prost(string, tag = "4")]
    pub peer_workload: String,
    /// The histogram.
    #[prost(message, optional, tag = "5")]
    pub histogram: Option<Histogram>,
}

/// A reporting workload and the identity it proved.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardIdentity {
    /// `namespace/name`.
    #[prost(string, tag = "1")]
    pub workload: String,
    /// SPIFFE ID.
    #[prost(string, tag = "2")]
    pub identity: String,
}

fn direction_num(d: Direction) -> u32 {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

fn direction_of(n: u32) -> Result<Direction, String> {
    match n {
        0 => Ok(Direction::Outbound),
        1 => Ok(Direction::Inbound),
        _ => Err(format!("direction {n}")),
    }
}

impl Shard {
    /// `w`, with the identities its reporters proved.
    pub fn of(w: &Window, identities: &HashMap<String, String>) -> Self {
        let series = w
            .series
            .iter()
            .map(|(k, c)| ShardSeries {
                direction: direction_num(k.direction),
                protocol: match k.protocol {
                    Protocol::Http => 0,
                    Protocol::Tcp => 1,
                },
                workload: k.workload.to_string(),
                environment: k.environment.to_string(),
                locality: k.locality.to_string(),
                service: k.service.to_string(),
                route: k.route.to_string(),
                peer_workload: k.peer_workload.to_string(),
                peer_identity: k.peer_identity.to_string(),
                peer_environment: k.peer_environment.to_string(),
                peer_locality: k.peer_locality.to_string(),
                endpoint: k.endpoint.to_string(),
                mtls: k.mtls,
                class: k.class.as_str().into(),
                status_class: u32::from(k.status_class),
                requests: c.requests,
                attempts: c.attempts,
                tcp_opened: c.tcp_opened,
                tcp_closed: c.tcp_closed,
                tcp_bytes: c.tcp_bytes,
                tcp_open: c.tcp_open,
                tcp_open_at: c.tcp_open_at,
            })
            .collect();
        let latency = w
            .latency
            .iter()
            .map(|(k, h)| ShardLatency {
                direction: direction_num(k.direction),
                workload: k.workload.to_string(),
                service: k.service.to_string(),
                peer_workload: k.peer_workload.to_string(),
                histogram: Some(h.into()),
            })
            .collect();
        let mut identities: Vec<ShardIdentity> = identities
            .iter()
            .map(|(w, i)| ShardIdentity {
                workload: w.clone(),
                identity: i.clone(),
            })
            .collect();
        identities.sort_by(|a, b| a.workload.cmp(&b.workload));
        let listed = |v: &[Arc<FailedAttempt>]| -> Vec<ShardAttempt> {
            v.iter()
                .map(|a| ShardAttempt {
                    reporter: a.reporter.to_string(),
                    received_ms: a.received_ms,
                    attempt: Some(a.attempt.clone()),
                    listed_below: a.listed_below,
                })
                .collect()
        };
        let attempts = listed(&w.attempts);
        let slow = listed(&w.slow);
        let links = w
            .links
            .iter()
            .map(|(r, l)| ShardLink {
                reporter: r.to_string(),
                link: Some(l.clone()),
            })
            .collect();
        let reporting = w
            .reporting
            .iter()
            .map(|(r, at)| ShardSeen {
                reporter: r.to_string(),
                seen_ms: *at,
            })
            .collect();
        let ejections = w
            .ejections
            .iter()
            .map(|e| ShardEjection {
                reporter: e.reporter.to_string(),
                received_ms: e.received_ms,
                ejection: Some(e.ejection.clone()),
            })
            .collect();
        Self {
            from_ms: w.from_ms,
            series,
            latency,
            identities,
            attempts,
            links,
            reporting,
            ejections,
            slow,
            mirrors: w
                .mirrors
                .iter()
                .map(|m| ShardMirror {
                    reporter: m.reporter.to_string(),
                    received_ms: m.received_ms,
                    figures: Some(m.figures.clone()),
                })
                .collect(),
            adaptive: w
                .adaptive
                .iter()
                .map(|(r, a)| ShardAdaptive {
                    reporter: r.to_string(),
                    figures: Some(*a),
                })
                .collect(),
        }
    }

    /// Back into a window and its identities; refused whole if any part is not valid.
    pub fn into_window(self) -> Result<(Window, HashMap<String, String>), String> {
        let s = |v: String| -> Arc<str> { v.into() };
        let mut series = Vec::with_capacity(self.series.len());
        for x in self.series {
            let class: FailureClass = x.class.parse().map_err(|e| format!("{e}"))?;
            let key = Key {
                direction: direction_of(x.direction)?,
                protocol: match x.protocol {
                    0 => Protocol::Http,
                    1 => Protocol::Tcp,
                    p => return Err(format!("protocol {p}")),
                },
                workload: s(x.workload),
                environment: s(x.environment),
                locality: s(x.locality),
                service: s(x.service),
                route: s(x.route),
                peer_workload: s(x.peer_workload),
                peer_identity: s(x.peer_identity),
                peer_environment: s(x.peer_environment),
                peer_locality: s(x.peer_locality),
                endpoint: s(x.endpoint),
                mtls: x.mtls,
                class,
                status_class: u8::try_from(x.status_class)
                    .map_err(|_| format!("status class {}", x.status_class))?,
            };
            let counts = Counts {
                requests: x.requests,
                attempts: x.attempts,
                tcp_opened: x.tcp_opened,
                tcp_closed: x.tcp_closed,
                tcp_bytes: x.tcp_bytes,
                tcp_open: x.tcp_open,
                tcp_open_at: x.tcp_open_at,
            };
            series.push((Arc::new(key), counts));
        }
        let mut latency = Vec::with_capacity(self.latency.len());
        for x in self.latency {
            let key = LatKey {
                direction: direction_of(x.direction)?,
                workload: s(x.workload),
                service: s(x.service),
                peer_workload: s(x.peer_workload),
            };
            let h = x
                .histogram
                .as_ref()
                .ok_or("a latency group without histogram")?;
            latency.push((Arc::new(key), hist::Histogram::try_from(h)?));
        }
        let identities = self
            .identities
            .into_iter()
            .map(|i| (i.workload, i.identity))
            .collect();
        let listed = |v: Vec<ShardAttempt>| -> Vec<Arc<FailedAttempt>> {
            v.into_iter()
                .filter_map(|a| {
                    Some(Arc::new(FailedAttempt {
                        reporter: a.reporter.into(),
                        received_ms: a.received_ms,
                        attempt: a.attempt?,
                        listed_below: a.listed_below,
                    }))
                })
                .collect()
        };
        let attempts = listed(self.attempts);
        let slow = listed(self.slow);
        Ok((
            Window {
                series,
                latency,
                from_ms: self.from_ms,
                attempts,
                slow,
                adaptive: self
                    .adaptive
                    .into_iter()
                    .filter_map(|a| Some((Arc::<str>::from(a.reporter), a.figures?)))
                    .collect(),
                links: self
                    .links
                    .into_iter()
                    .filter_map(|l| Some((Arc::<str>::from(l.reporter), l.link?)))
                    .collect(),
                reporting: self
                    .reporting
                    .into_iter()
                    .map(|r| (Arc::<str>::from(r.reporter), r.seen_ms))
                    .collect(),
                ejections: self
                    .ejections
                    .into_iter()
                    .filter_map(|e| {
                        Some(Arc::new(crate::store::Ejected {
                            reporter: e.reporter.into(),
                            received_ms: e.received_ms,
                            ejection: e.ejection?,
                        }))
                    })
                    .collect(),
                mirrors: self
                    .mirrors
                    .into_iter()
                    .filter_map(|m| {
                        Some(Arc::new(crate::store::MirrorFigures {
                            reporter: m.reporter.into(),
                            received_ms: m.received_ms,
                            figures: m.figures?,
                        }))
                    })
                    .collect(),
            },
            identities,
        ))
    }
}

impl Window {
    /// Add `other` (another replica's part of the same window): equal keys add their
    /// counts and merge their histograms; the window starts where the earlier of the two
    /// does.
    pub fn merge(&mut self, other: Window) {
        let mut series: HashMap<Arc<Key>, Counts> = self.series.drain(..).collect();
        for (k, c) in other.series {
            series.entry(k).or_default().merge(&c);
        }
        let mut latency: HashMap<Arc<LatKey>, hist::Histogram> = self.latency.drain(..).collect();
        for (k, h) in other.latency {
            match latency.entry(k) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().merge(&h),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(h);
                }
            }
        }
        self.series = series.into_iter().collect();
        self.series.sort_by(|a, b| a.0.cmp(&b.0));
        self.latency = latency.into_iter().collect();
        self.latency.sort_by(|a, b| a.0.cmp(&b.0));
        self.attempts.extend(other.attempts);
        self.links.extend(other.links);
        self.reporting.extend(other.reporting);
        self.ejections.extend(other.ejections);
        self.mirrors.extend(other.mirrors);
        self.mirrors.sort_by_key(|m| m.received_ms);
        self.slow.extend(other.slow);
        self.adaptive.extend(other.adaptive);
        self.slow.sort_by_key(|a| a.received_ms);
        self.ejections.sort_by_key(|e| e.received_ms);
        self.attempts.sort_by_key(|a| a.received_ms);
        if self.from_ms == 0 || (other.from_ms != 0 && other.from_ms < self.from_ms) {
            self.from_ms = other.from_ms;
        }
    }
}
