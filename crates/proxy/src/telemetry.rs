//! Where records go: the proxy's metrics (with the period's summaries for the control
//! plane), its access log and live taps, shared by every request.

use crate::{access_log::AccessLog, metrics::Metrics, otlp::Spans, tap::Taps};

/// The sinks of every record.
pub(crate) struct Telemetry {
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// Access log.
    pub(crate) log: AccessLog,
    /// Live taps the control plane asked for.
    pub(crate) taps: Taps,
    /// Spans for an OTLP collector, when one is configured.
    pub(crate) spans: Option<Spans>,
    /// The probability that a trace this proxy starts is sampled (a service may say its own).
    pub(crate) trace_sampling: f64,
}
