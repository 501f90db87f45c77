//! Where records go: the proxy's metrics and its access log, shared by every request.

use crate::{access_log::AccessLog, metrics::Metrics};

/// The sinks of every record.
pub(crate) struct Telemetry {
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// Access log.
    pub(crate) log: AccessLog,
}
