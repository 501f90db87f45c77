//! What a proxy pushes to the control plane every period (protobuf, `POST /v1/telemetry` on
//! the connection it has for xDS): one [`Report`] per period, numbered, with one [`Series`]
//! per distinct key of what it recorded in that period.
//!
//! A report is a delta: the requests, attempts, bytes and latencies of its period only, so
//! that the control plane adds reports up, and a reconnect that resends a period is caught
//! by its number (`run`, `seq`) rather than counted twice.

/// Several reports in one request: the periods a proxy held while it could not send.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    /// Oldest first.
    #[prost(message, repeated, tag = "1")]
    pub reports: Vec<Report>,
}

/// The control plane's answer to a [`Batch`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// The proxy's run the answer is for.
    #[prost(fixed64, tag = "1")]
    pub run: u64,
    /// Every report of that run up to this number is merged (or was before): the proxy may
    /// let them go.
    #[prost(uint64, tag = "2")]
    pub acked: u64,
}

/// One period of one proxy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Report {
    /// The workload the proxy serves, `namespace/name` (empty for a proxy with none).
    #[prost(string, tag = "1")]
    pub workload: String,
    /// The proxy's node id.
    #[prost(string, tag = "2")]
    pub node: String,
    /// The workload's environment.
    #[prost(string, tag = "3")]
    pub environment: String,
    /// The workload's locality, `region/zone`.
    #[prost(string, tag = "4")]
    pub locality: String,
    /// A random number chosen when the proxy started: sequence numbers count within it.
    #[prost(fixed64, tag = "5")]
    pub run: u64,
    /// The period's number in this run, from 1, without gaps.
    #[prost(uint64, tag = "6")]
    pub seq: u64,
    /// Start of the period, Unix milliseconds (the proxy's clock).
    #[prost(uint64, tag = "7")]
    pub start_ms: u64,
    /// Length of the period, milliseconds.
    #[prost(uint32, tag = "8")]
    pub period_ms: u32,
    /// What was recorded, by key.
    #[prost(message, repeated, tag = "9")]
    pub series: Vec<Series>,
    /// Series this proxy folded into `other` rows because it held too many.
    #[prost(uint64, tag = "10")]
    pub folded: u64,
    /// Request latency by direction, service and peer workload (what `stat` and `edges`
    /// show quantiles of): far fewer than series, which carry counts only.
    #[prost(message, repeated, tag = "11")]
    pub latencies: Vec<Latency>,
    /// When the proxy's certificate expires (Unix ms; 0: no identity), for `trellis check`.
    #[prost(uint64, tag = "12")]
    pub cert_not_after_ms: u64,
    /// When the proxy sent this report, by its clock (Unix ms): the control plane compares
    /// it with its own to see a skewed clock.
    #[prost(uint64, tag = "13")]
    pub sent_ms: u64,
    /// Requests of the period that failed (or that the caller gave up on), one by one with
    /// the id of the attempt they were (bounded: see `attempts_dropped`), so that the control
    /// plane can join a caller's failed attempt with what the callee's proxy saw of it.
    #[prost(message, repeated, tag = "14")]
    pub attempts: Vec<Attempt>,
    /// Failed requests of the period beyond the bound, not listed.
    #[prost(uint64, tag = "15")]
    pub attempts_dropped: u64,
    /// When some were not listed: the largest attempt id listed. The list holds those with
    /// the smallest ids, every one up to this, so that the caller's and the callee's
    /// proxies list the same attempts (ids are random) and stay joinable; 0 when the list
    /// is whole.
    #[prost(fixed64, tag = "17")]
    pub attempts_below: u64,
    /// Endpoints this proxy's outlier detection ejected in the period, or let back in.
    #[prost(message, repeated, tag = "18")]
    pub ejections: Vec<Ejection>,
    /// Requests of the period that did not fail but took [`SLOW_MS`] or more (outbound:
    /// their last try; inbound: this proxy's own time), one by one with their attempt id,
    /// sampled as `attempts` are.
    #[prost(message, repeated, tag = "19")]
    pub slow: Vec<Attempt>,
    /// As `attempts_below`, for `slow`.
    #[prost(fixed64, tag = "20")]
    pub slow_below: u64,
    /// The inbound adaptive concurrency limit at the period's end, if on.
    #[prost(message, optional, tag = "21")]
    pub adaptive: Option<Adaptive>,
    /// Mirrored requests of the period, by route and mirror, compared with the primary's.
    #[prost(message, repeated, tag = "22")]
    pub mirrors: Vec<Mirrored>,
    /// The kernel's TCP figures of this proxy's upstream links at the period's end (its
    /// connections to each endpoint), so that loss or latency shows even when no request
    /// fails.
    #[prost(message, repeated, tag = "16")]
    pub links: Vec<Link>,
}

/// The kernel's figures (`TCP_INFO`, read through `ss`) of a proxy's open connections to
/// one endpoint. Counts are over the connections' lifetimes.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Link {
    /// The address connected to.
    #[prost(string, tag = "1")]
    pub endpoint: String,
    /// The endpoint's workload.
    #[prost(string, tag = "2")]
    pub peer_workload: String,
    /// Open connections.
    #[prost(uint32, tag = "3")]
    pub sockets: u32,
    /// Mean smoothed round-trip time, microseconds.
    #[prost(uint32, tag = "4")]
    pub rtt_us: u32,
    /// Segments sent.
    #[prost(uint64, tag = "5")]
    pub segs_out: u64,
    /// Segments retransmitted.
    #[prost(uint64, tag = "6")]
    pub retrans: u64,
}

/// One failed request, by the id of its (last) attempt: the span id the caller's proxy sent
/// upstream in `traceparent`, which the callee's proxy reads as its parent.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Attempt {
    /// 0 outbound (the id is this proxy's try), 1 inbound (the id is the caller's try).
    #[prost(uint32, tag = "1")]
    pub direction: u32,
    /// The attempt's id.
    #[prost(fixed64, tag = "2")]
    pub id: u64,
    /// The trace it belongs to, 32 hex digits.
    #[prost(string, tag = "3")]
    pub trace_id: String,
    /// The service, `namespace/name`.
    #[prost(string, tag = "4")]
    pub service: String,
    /// The peer's workload (the callee outbound, the caller inbound).
    #[prost(string, tag = "5")]
    pub peer_workload: String,
    /// The failure class.
    #[prost(string, tag = "6")]
    pub class: String,
    /// The status sent back, 0 for none.
    #[prost(uint32, tag = "7")]
    pub status: u32,
    /// When it ended (Unix ms, the proxy's clock).
    #[prost(uint64, tag = "8")]
    pub at_ms: u64,
    /// How long it took, ms.
    #[prost(uint32, tag = "9")]
    pub latency_ms: u32,
}

/// A workload's adaptive concurrency limit, as its proxy last reported it.
#[derive(Clone, Copy, PartialEq, prost::Message, serde::Serialize, serde::Deserialize)]
pub struct Adaptive {
    /// The limit (requests in flight to the application).
    #[prost(uint32, tag = "1")]
    pub limit: u32,
    /// In flight at the period's end.
    #[prost(uint32, tag = "2")]
    pub in_flight: u32,
}

/// A request this long (ms) or longer is listed as slow, at both ends of a hop alike (so
/// that the two lists join: a slow request only the caller listed lost its time between
/// the two proxies).
pub const SLOW_MS: u32 = 1_000;

/// An endpoint a proxy's outlier detection ejected, or let back in before its time (its
/// health check passed again). One that is simply let back when its time is up is not
/// told: `at_ms + seconds` says when.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ejection {
    /// The service, `namespace/name`.
    #[prost(string, tag = "1")]
    pub service: String,
    /// The endpoint's workload.
    #[prost(string, tag = "2")]
    pub peer_workload: String,
    /// The address connected to.
    #[prost(string, tag = "3")]
    pub endpoint: String,
    /// When (Unix ms, the proxy's clock).
    #[prost(uint64, tag = "4")]
    pub at_ms: u64,
    /// For how long, seconds; 0: let back in.
    #[prost(uint32, tag = "5")]
    pub seconds: u32,
    /// The failure class of the try that tipped it.
    #[prost(string, tag = "6")]
    pub class: String,
    /// Failures in a row that tipped it.
    #[prost(uint32, tag = "7")]
    pub failures: u32,
}

/// A route's requests mirrored to one backend in a period, and how the mirror's answers
/// compared with the primary's.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mirrored {
    /// The route, `namespace/route[.rule]`.
    #[prost(string, tag = "1")]
    pub route: String,
    /// The service called, `namespace/name`.
    #[prost(string, tag = "2")]
    pub service: String,
    /// The mirror's cluster, `namespace/name:port`.
    #[prost(string, tag = "3")]
    pub mirror: String,
    /// Copies sent.
    #[prost(uint64, tag = "4")]
    pub sent: u64,
    /// Copies not sent: the body over the cap, unfinished, or too many mirrored at once.
    #[prost(uint64, tag = "5")]
    pub skipped: u64,
    /// Copies whose answer was compared with the primary's.
    #[prost(uint64, tag = "6")]
    pub compared: u64,
    /// Of them, those whose status class (2xx, 3xx, 4xx, 5xx, or none) agreed.
    #[prost(uint64, tag = "7")]
    pub agreed: u64,
    /// The mirror's time to its answer's head minus the primary's, summed, ms.
    #[prost(sint64, tag = "8")]
    pub latency_diff_ms: i64,
    /// The mirror's failures by class.
    #[prost(map = "string, uint64", tag = "9")]
    pub failures: std::collections::HashMap<String, u64>,
}

/// The latency of the requests of one direction, service and peer workload in a period.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Latency {
    /// 0 outbound, 1 inbound.
    #[prost(uint32, tag = "1")]
    pub direction: u32,
    /// The service, `namespace/name`.
    #[prost(string, tag = "2")]
    pub service: String,
    /// The peer's workload (empty when unknown).
    #[prost(string, tag = "3")]
    pub peer_workload: String,
    /// Request latency to the end of the response, seconds.
    #[prost(message, optional, tag = "4")]
    pub histogram: Option<Histogram>,
}

/// One key's figures for the period. For outbound series the peer is the callee (workload,
/// identity it must present, environment, locality, the address connected to); for inbound
/// ones the caller (from its proxy's `x-trellis-peer` and its certificate).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Series {
    /// 0 outbound, 1 inbound.
    #[prost(uint32, tag = "1")]
    pub direction: u32,
    /// 0 HTTP (and gRPC), 1 TCP.
    #[prost(uint32, tag = "2")]
    pub protocol: u32,
    /// The service, `namespace/name`.
    #[prost(string, tag = "3")]
    pub service: String,
    /// The route's name.
    #[prost(string, tag = "4")]
    pub route: String,
    /// The peer's workload, `namespace/name` (empty when unknown: an unmeshed caller).
    #[prost(string, tag = "5")]
    pub peer_workload: String,
    /// The peer's SPIFFE ID (empty when not mutual TLS).
    #[prost(string, tag = "6")]
    pub peer_identity: String,
    /// The peer's environment.
    #[prost(string, tag = "7")]
    pub peer_environment: String,
    /// The peer's locality.
    #[prost(string, tag = "8")]
    pub peer_locality: String,
    /// The address connected to (outbound).
    #[prost(string, tag = "9")]
    pub endpoint: String,
    /// Whether the hop was mutual TLS.
    #[prost(bool, tag = "10")]
    pub mtls: bool,
    /// The failure class (`ok`, `app_error`, ...).
    #[prost(string, tag = "11")]
    pub class: String,
    /// The status's hundreds (2 for 2xx), 0 when no status was sent.
    #[prost(uint32, tag = "12")]
    pub status_class: u32,
    /// Requests as the caller got them (after retries).
    #[prost(uint64, tag = "13")]
    pub requests: u64,
    /// Every attempt made for them (each but the last of a request failed).
    #[prost(uint64, tag = "14")]
    pub attempts: u64,
    /// TCP connections opened.
    #[prost(uint64, tag = "16")]
    pub tcp_opened: u64,
    /// TCP connections closed.
    #[prost(uint64, tag = "17")]
    pub tcp_closed: u64,
    /// TCP bytes from the client.
    #[prost(uint64, tag = "18")]
    pub bytes_sent: u64,
    /// TCP bytes to the client.
    #[prost(uint64, tag = "19")]
    pub bytes_received: u64,
    /// TCP connections open at the period's end.
    #[prost(uint64, tag = "20")]
    pub tcp_open: u64,
}

/// [`crate::hist::Histogram`] on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Histogram {
    /// Scale.
    #[prost(sint32, tag = "1")]
    pub scale: i32,
    /// Values in the zero bucket.
    #[prost(uint64, tag = "2")]
    pub zero: u64,
    /// Index of the first count.
    #[prost(sint32, tag = "3")]
    pub offset: i32,
    /// Counts by bucket from `offset`.
    #[prost(uint64, repeated, tag = "4")]
    pub counts: Vec<u64>,
    /// Sum of the values.
    #[prost(double, tag = "5")]
    pub sum: f64,
    /// Least value.
    #[prost(double, tag = "6")]
    pub min: f64,
    /// Greatest value.
    #[prost(double, tag = "7")]
    pub max: f64,
}

impl From<&crate::hist::Histogram> for Histogram {
    fn from(h: &crate::hist::Histogram) -> Self {
        Self {
            scale: i32::from(h.scale()),
            zero: h.zero_count(),
            offset: h.offset(),
            counts: h.counts().to_vec(),
            sum: h.sum(),
            min: h.min().unwrap_or(0.0),
            max: h.max().unwrap_or(0.0),
        }
    }
}

impl TryFrom<&Histogram> for crate::hist::Histogram {
    type Error = String;
    fn try_from(h: &Histogram) -> Result<Self, String> {
        let scale = i8::try_from(h.scale).map_err(|_| format!("scale {}", h.scale))?;
        crate::hist::Histogram::from_parts(
            scale,
            h.zero,
            h.offset,
            h.counts.clone(),
            h.sum,
            h.min,
            h.max,
        )
    }
}
