//! The record of one request: access-log line and metrics, written exactly once, when the
//! response ends, fails, or is dropped (a dropped record means the client went away).

use std::{
    io::Write,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderMap, HeaderValue, Method, Uri};
use serde::Serialize;

use crate::{
    cluster::{Cluster, Endpoint, InFlight},
    http::{body::OnEnd, route::RequestAuthority},
    metrics::{Direction, Label, Metrics, RequestLabels},
    FailureClass,
};

/// Where access-log lines go.
#[derive(Clone)]
pub struct AccessLog {
    enabled: bool,
}

impl AccessLog {
    /// Log to stdout when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }

    /// Whether lines are written at all (callers skip building them when not).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Write one JSON line.
    pub fn write(&self, line: &impl Serialize) {
        if !self.enabled {
            return;
        }
        let mut buf = serde_json::to_vec(line).unwrap_or_default();
        buf.push(b'\n');
        // One write per line, so lines from concurrent requests never interleave.
        let _ = std::io::stdout().lock().write_all(&buf);
    }
}

/// Everything known about a request, filled in as it progresses. Built on every request, so
/// its fields are cheap to fill: shared labels, and `http` types that clone by reference count.
pub struct Record {
    /// Start.
    pub start: Instant,
    /// Direction.
    pub direction: Direction,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'static str,
    /// Method.
    pub method: Method,
    /// Request URI as received.
    pub uri: Uri,
    /// Authority the request named.
    pub authority: Option<RequestAuthority>,
    /// Source service.
    pub src_service: Label,
    /// Destination service.
    pub dst_service: Label,
    /// Destination workload.
    pub dst_workload: Label,
    /// Destination environment.
    pub dst_environment: &'static str,
    /// Destination locality, `region/zone`.
    pub dst_locality: Label,
    /// Route.
    pub route: Label,
    /// Upstream endpoint.
    pub upstream: Option<SocketAddr>,
    /// Tries made.
    pub attempts: u32,
    /// Time spent connecting (last try).
    pub connect: Option<Duration>,
    /// Time to response headers.
    pub first_byte: Option<Duration>,
    /// Status sent to the client.
    pub status: u16,
    /// gRPC status, if any.
    pub grpc_status: Option<u32>,
    /// Class so far.
    pub class: FailureClass,
    /// Error detail for the log.
    pub detail: Option<String>,
    /// Trace id.
    pub trace_id: u128,
    /// Request id.
    pub request_id: Option<HeaderValue>,
    /// The caller's SPIFFE ID, when it came over mutual TLS (one shared value per identity,
    /// as every label).
    pub source_identity: Label,
    /// Held until the response ends: in-flight count and admission slot.
    pub guards: Option<(InFlight, tokio::sync::OwnedSemaphorePermit)>,
    /// The cluster and endpoint told the final class (outlier detection). Held directly
    /// rather than as a boxed callback: one allocation fewer per request.
    pub report_to: Option<(Arc<Cluster>, Arc<Endpoint>)>,
    metrics: Metrics,
    log: AccessLog,
    done: bool,
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    kind: &'static str,
    direction: &'static str,
    protocol: &'a str,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<u32>,
    failure_class: &'static str,
    failure_category: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_identity: Option<&'a str>,
    src_service: &'a str,
    dst_service: &'a str,
    dst_workload: &'a str,
    dst_environment: &'a str,
    dst_locality: &'a str,
    route: &'a str,
    upstream: Option<String>,
    attempts: u32,
    connect_ms: Option<f64>,
    first_byte_ms: Option<f64>,
    total_ms: f64,
    trace_id: String,
    request_id: &'a str,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Record {
    /// A new record.
    pub fn new(
        direction: Direction,
        protocol: &'static str,
        metrics: Metrics,
        log: AccessLog,
        src_service: Label,
    ) -> Box<Self> {
        // Boxed from the start: it ends as the response body's `OnEnd`, and moving a
        // pointer through the request path is cheaper than moving the record.
        Box::new(Self {
            start: Instant::now(),
            direction,
            protocol,
            method: Method::GET,
            uri: Uri::default(),
            authority: None,
            src_service,
            dst_service: Label::default(),
            dst_workload: Label::default(),
            dst_environment: "unknown",
            dst_locality: Label::default(),
            route: Label::default(),
            upstream: None,
            attempts: 0,
            connect: None,
            first_byte: None,
            status: 0,
            grpc_status: None,
            class: FailureClass::Ok,
            detail: None,
            trace_id: 0,
            request_id: None,
            source_identity: Label::default(),
            guards: None,
            report_to: None,
            metrics,
            log,
            done: false,
        })
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some((cluster, ep)) = self.report_to.take() {
            cluster.report(&ep, self.class);
        }
        self.guards = None;
        let total = self.start.elapsed();
        let labels = RequestLabels {
            direction: self.direction,
            src_service: self.src_service.clone(),
            source_identity: self.source_identity.clone(),
            dst_service: self.dst_service.clone(),
            dst_workload: self.dst_workload.clone(),
            dst_environment: self.dst_environment,
            dst_locality: self.dst_locality.clone(),
            route: self.route.clone(),
            status_code: self.status,
            grpc_status: self.grpc_status,
            failure_class: self.class,
        };
        self.metrics.record_request(labels, total.as_secs_f64());
        if !self.log.enabled() {
            return;
        }
        self.log.write(&Line {
            // The start in wall-clock time, worked out only when a line is written.
            ts: rfc3339(SystemTime::now() - total),
            kind: "http",
            direction: self.direction.as_str(),
            protocol: self.protocol,
            method: self.method.as_str(),
            authority: self.authority.as_ref().map_or("", RequestAuthority::as_str),
            path: self.uri.path(),
            status: self.status,
            grpc_status: self.grpc_status,
            failure_class: self.class.as_str(),
            failure_category: self.class.category(),
            detail: self.detail.as_deref(),
            source_identity: self.source_identity.get(),
            src_service: self.src_service.as_str(),
            dst_service: self.dst_service.as_str(),
            dst_workload: self.dst_workload.as_str(),
            dst_environment: self.dst_environment,
            dst_locality: self.dst_locality.as_str(),
            route: self.route.as_str(),
            upstream: self.upstream.map(|a| a.to_string()),
            attempts: self.attempts,
            connect_ms: self.connect.map(ms),
            first_byte_ms: self.first_byte.map(ms),
            total_ms: ms(total),
            trace_id: crate::trace::trace_id_hex(self.trace_id),
            request_id: self
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        });
    }

    /// Note the endpoint a try went to.
    pub fn set_endpoint(&mut self, ep: &Endpoint) {
        self.upstream = Some(ep.cfg.addr);
        self.dst_workload = ep.workload.clone();
        self.dst_environment = ep.cfg.environment.as_str();
        self.dst_locality = ep.locality.clone();
    }

    /// Look at a gRPC status in response headers or trailers.
    pub fn grpc(&mut self, headers: &HeaderMap) {
        if let Some(code) = crate::failure::grpc_status(headers) {
            self.grpc_status = Some(code);
            if self.class == FailureClass::Ok {
                self.class = FailureClass::from_grpc(code);
            }
        }
    }
}

impl OnEnd for Record {
    fn trailers(&mut self, t: &HeaderMap) {
        self.grpc(t);
    }

    fn end(&mut self) {
        self.finish();
    }

    fn error(&mut self, err: &(dyn std::error::Error + 'static)) {
        self.class = crate::failure::classify(err);
        self.detail = Some(format!("response body: {err}"));
        self.finish();
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.done {
            // Dropped before the response ended: the client went away (or the connection
            // was torn down under it).
            if self.class == FailureClass::Ok || self.class == FailureClass::AppError {
                self.class = FailureClass::ClientDisconnect;
            }
            self.finish();
        }
    }
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_192_394_123);
        assert_eq!(super::rfc3339(t), "2025-11-26T21:26:34.123Z");
    }
}
