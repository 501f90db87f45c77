//! The access log: one JSON line per request or TCP connection, on stdout.
//!
//! A request only queues its finished record (a move into a vector under an uncontended
//! lock; no formatting, no system call); a writer thread formats the queued records and writes
//! them in one `write` per batch, every [`FLUSH_EVERY`] or sooner when the queue fills up.
//! The queue is bounded: when the writer falls behind, records are dropped and counted
//! (`trellis_access_log_dropped_total`), and no request ever waits for the log.

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, SystemTime},
};

use http::{HeaderValue, Method, Uri};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::{
    error::{FailureClass, Side},
    http::authority::RequestAuthority,
    metrics::{Direction, Label},
};

/// How often the writer wakes to write what is queued.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Records queued at most; beyond, they are dropped and counted.
pub(crate) const QUEUE_CAP: usize = 8192;

/// A finished request, as the log line says it.
pub(crate) struct HttpLine {
    /// When it began (wall clock).
    pub(crate) start: SystemTime,
    /// How long it took, to the end of the response.
    pub(crate) total: Duration,
    /// Direction.
    pub(crate) direction: Direction,
    /// `HTTP/1.1`, `HTTP/2`.
    pub(crate) protocol: &'static str,
    /// Method.
    pub(crate) method: Method,
    /// The authority the request named.
    pub(crate) authority: Option<RequestAuthority>,
    /// The request URI.
    pub(crate) uri: Uri,
    /// Status sent to the client.
    pub(crate) status: u16,
    /// gRPC status, if any.
    pub(crate) grpc_status: Option<u32>,
    /// How it ended.
    pub(crate) class: FailureClass,
    /// Who caused a failure.
    pub(crate) side: Option<Side>,
    /// What went wrong.
    pub(crate) detail: Option<String>,
    /// The client went away after the outcome was known (the class is kept).
    pub(crate) client_gone: bool,
    /// The caller's SPIFFE ID (inbound, mutual TLS).
    pub(crate) source_identity: Label,
    /// The caller's service.
    pub(crate) src_service: Label,
    /// The caller's workload.
    pub(crate) src_workload: Label,
    /// Destination service.
    pub(crate) dst_service: Label,
    /// Destination workload.
    pub(crate) dst_workload: Label,
    /// Destination environment.
    pub(crate) dst_environment: &'static str,
    /// Destination locality.
    pub(crate) dst_locality: Label,
    /// Route.
    pub(crate) route: Label,
    /// The address the last try connected to (a peer's proxy, or the application).
    pub(crate) upstream: Option<SocketAddr>,
    /// The application's own address, when it differs from `upstream`.
    pub(crate) upstream_app: Option<SocketAddr>,
    /// Tries made.
    pub(crate) attempts: u32,
    /// Time spent connecting (last try).
    pub(crate) connect: Option<Duration>,
    /// Time to the response head.
    pub(crate) first_byte: Option<Duration>,
    /// Trace id.
    pub(crate) trace_id: u128,
    /// `x-request-id`.
    pub(crate) request_id: Option<HeaderValue>,
}

/// A finished TCP connection.
pub(crate) struct TcpLine {
    /// When it began (wall clock).
    pub(crate) start: SystemTime,
    /// How long it lasted.
    pub(crate) total: Duration,
    /// Direction.
    pub(crate) direction: Direction,
    /// Destination service.
    pub(crate) dst_service: Label,
    /// Destination workload.
    pub(crate) dst_workload: Label,
    /// The address connected to.
    pub(crate) upstream: Option<SocketAddr>,
    /// The caller's SPIFFE ID.
    pub(crate) source_identity: Label,
    /// How it ended.
    pub(crate) class: FailureClass,
    /// Who caused a failure.
    pub(crate) side: Option<Side>,
    /// What went wrong.
    pub(crate) detail: Option<String>,
    /// Bytes from the client.
    pub(crate) sent: u64,
    /// Bytes to the client.
    pub(crate) received: u64,
}

/// One queued record. Held by value: queueing a record moves it, and costs no allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Entry {
    /// An HTTP request.
    Http(HttpLine),
    /// A TCP connection.
    Tcp(TcpLine),
}

struct Queue {
    entries: Vec<Entry>,
    stop: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    wake: Condvar,
    dropped: Counter,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
}

/// Where access-log lines go. Cloning shares the queue.
#[derive(Clone)]
pub(crate) struct AccessLog {
    inner: Option<Arc<Inner>>,
}

impl AccessLog {
    /// A log on stdout when `enabled`; `dropped` counts what a full queue refused.
    pub(crate) fn new(enabled: bool, dropped: Counter) -> Self {
        Self::to(
            enabled.then(|| Box::new(std::io::stdout()) as Box<dyn Write + Send>),
            dropped,
        )
    }

    /// A log into `out` (tests).
    pub(crate) fn to(out: Option<Box<dyn Write + Send>>, dropped: Counter) -> Self {
        let Some(out) = out else {
            return Self { inner: None };
        };
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue {
                entries: Vec::with_capacity(256),
                stop: false,
            }),
            wake: Condvar::new(),
            dropped,
            writer: Mutex::new(None),
        });
        let w = inner.clone();
        let handle = thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&w, out))
            .ok();
        if handle.is_none() {
            tracing::error!("cannot start the access-log thread; access log off");
            return Self { inner: None };
        }
        *inner.writer.lock().expect("writer lock") = handle;
        Self { inner: Some(inner) }
    }

    /// Whether lines are written at all (callers skip building them when not).
    pub(crate) fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queue a record; never blocks on the writer. A full queue drops it and counts it.
    pub(crate) fn push(&self, e: Entry) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut q = inner.queue.lock().expect("access log lock");
        if q.entries.len() >= QUEUE_CAP {
            drop(q);
            inner.dropped.inc();
            return;
        }
        q.entries.push(e);
        // Half full: wake the writer now rather than at its next tick.
        let wake = q.entries.len() == QUEUE_CAP / 2;
        drop(q);
        if wake {
            inner.wake.notify_one();
        }
    }

    /// Write everything queued and stop the writer (at the proxy's exit). Later records are
    /// dropped.
    pub(crate) fn close(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        inner.queue.lock().expect("access log lock").stop = true;
        inner.wake.notify_one();
        if let Some(h) = inner.writer.lock().expect("writer lock").take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
impl AccessLog {
    /// Records waiting for the writer.
    fn queued(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| {
            i.queue.lock().expect("access log lock").entries.len()
        })
    }
}

fn write_loop(inner: &Inner, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::with_capacity(256);
    let mut buf = Vec::with_capacity(64 << 10);
    loop {
        let stop = {
            let mut q = inner.queue.lock().expect("access log lock");
            if q.entries.is_empty() && !q.stop {
                q = inner
                    .wake
                    .wait_timeout(q, FLUSH_EVERY)
                    .expect("access log lock")
                    .0;
            }
            std::mem::swap(&mut q.entries, &mut batch);
            q.stop
        };
        for e in batch.drain(..) {
            format(&e, &mut buf);
        }
        if !buf.is_empty() {
            // One write per batch; a reader that went away (closed pipe) is not an error
            // worth more than dropping the lines.
            let _ = out.write_all(&buf).and_then(|()| out.flush());
            buf.clear();
        }
        if stop {
            let rest = std::mem::take(&mut inner.queue.lock().expect("access log lock").entries);
            for e in &rest {
                format(e, &mut buf);
            }
            let _ = out.write_all(&buf).and_then(|()| out.flush());
            return;
        }
    }
}

#[derive(Serialize)]
struct HttpJson<'a> {
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
    failure_side: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    client_disconnected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_identity: Option<&'a str>,
    src_service: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    src_workload: Option<&'a str>,
    dst_service: &'a str,
    dst_workload: &'a str,
    dst_environment: &'a str,
    dst_locality: &'a str,
    route: &'a str,
    upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_app: Option<String>,
    attempts: u32,
    connect_ms: Option<f64>,
    first_byte_ms: Option<f64>,
    total_ms: f64,
    trace_id: String,
    request_id: &'a str,
}

#[derive(Serialize)]
struct TcpJson<'a> {
    ts: String,
    kind: &'static str,
    direction: &'static str,
    dst_service: &'a str,
    dst_workload: &'a str,
    upstream: Option<String>,
    source_identity: &'a str,
    failure_class: &'static str,
    failure_category: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_side: Option<&'static str>,
    detail: Option<&'a str>,
    bytes_sent: u64,
    bytes_received: u64,
    total_ms: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn format(e: &Entry, buf: &mut Vec<u8>) {
    let res = match e {
        Entry::Http(l) => serde_json::to_writer(
            &mut *buf,
            &HttpJson {
                ts: rfc3339(l.start),
                kind: "http",
                direction: l.direction.as_str(),
                protocol: l.protocol,
                method: l.method.as_str(),
                authority: l.authority.as_ref().map_or("", RequestAuthority::as_str),
                path: l.uri.path(),
                status: l.status,
                grpc_status: l.grpc_status,
                failure_class: l.class.as_str(),
                failure_category: l.class.category().as_str(),
                failure_side: l.side.map(Side::as_str),
                detail: l.detail.as_deref(),
                client_disconnected: l.client_gone,
                source_identity: l.source_identity.get(),
                src_service: l.src_service.as_str(),
                src_workload: l.src_workload.get(),
                dst_service: l.dst_service.as_str(),
                dst_workload: l.dst_workload.as_str(),
                dst_environment: l.dst_environment,
                dst_locality: l.dst_locality.as_str(),
                route: l.route.as_str(),
                upstream: l.upstream.map(|a| a.to_string()),
                upstream_app: l.upstream_app.map(|a| a.to_string()),
                attempts: l.attempts,
                connect_ms: l.connect.map(ms),
                first_byte_ms: l.first_byte.map(ms),
                total_ms: ms(l.total),
                trace_id: crate::trace::trace_id_hex(l.trace_id),
                request_id: l
                    .request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            },
        ),
        Entry::Tcp(l) => serde_json::to_writer(
            &mut *buf,
            &TcpJson {
                ts: rfc3339(l.start),
                kind: "tcp",
                direction: l.direction.as_str(),
                dst_service: l.dst_service.as_str(),
                dst_workload: l.dst_workload.as_str(),
                upstream: l.upstream.map(|a| a.to_string()),
                source_identity: l.source_identity.as_str(),
                failure_class: l.class.as_str(),
                failure_category: l.class.category().as_str(),
                failure_side: l.side.map(Side::as_str),
                detail: l.detail.as_deref(),
                bytes_sent: l.sent,
                bytes_received: l.received,
                total_ms: ms(l.total),
            },
        ),
    };
    if res.is_ok() {
        buf.push(b'\n');
    }
}

/// RFC 3339 UTC timestamp with milliseconds.
pub(crate) fn rfc3339(t: SystemTime) -> String {
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
mod tests;
