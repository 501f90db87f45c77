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

use crate::{
    error::{FailureClass, Side},
    http::authority::RequestAuthority,
    metrics::{Direction, Label},
    trace::SpanIds,
};

/// How often the writer wakes to write what is queued.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Records queued at most; beyond, they are dropped and counted.
pub(crate) const QUEUE_CAP: usize = 8192;

/// A request, as its log line says it (filled in by its record as it progresses).
#[derive(Clone)]
pub(crate) struct HttpLine {
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
    /// The caller's environment (inbound, from its proxy).
    pub(crate) src_environment: Label,
    /// The caller's locality (inbound, from its proxy).
    pub(crate) src_locality: Label,
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
    /// This proxy's spans of the request (exported only when sampled or failed).
    pub(crate) spans: SpanIds,
    /// When the last try began, from the start.
    pub(crate) try_start: Duration,
    /// The identity the last try's endpoint proved (`namespace/identity`), through its proxy.
    pub(crate) dst_identity: Label,
    /// `x-request-id`.
    pub(crate) request_id: Option<HeaderValue>,
    /// The request's and the response's headers, kept only while a tap that shows headers
    /// is on (never written to the log).
    pub(crate) tap_headers: Option<Box<[http::HeaderMap; 2]>>,
}

/// A destination workload (`name`, as a metric label has it) as `namespace/name`, as the CLI
/// and the pane name it: a service selects workloads of its own namespace only, so the
/// namespace is the service's (`service`: `name.namespace`).
pub(crate) fn workload_id(service: &Label, name: &Label) -> Option<String> {
    let name = name.get()?;
    Some(match service.get().and_then(|h| h.split_once('.')) {
        Some((_, ns)) if !name.contains('/') => format!("{ns}/{name}"),
        _ => name.to_string(),
    })
}

impl HttpLine {
    /// What a record holds once its line has gone to the log (and what a new record starts
    /// from): nothing that costs.
    #[inline]
    pub(crate) fn taken() -> Self {
        Self {
            direction: Direction::outbound,
            protocol: "",
            method: Method::GET,
            authority: None,
            uri: Uri::default(),
            status: 0,
            grpc_status: None,
            class: FailureClass::Ok,
            side: None,
            detail: None,
            client_gone: false,
            source_identity: Label::default(),
            src_service: Label::default(),
            src_workload: Label::default(),
            src_environment: Label::default(),
            src_locality: Label::default(),
            dst_service: Label::default(),
            dst_workload: Label::default(),
            dst_environment: "unknown",
            dst_locality: Label::default(),
            route: Label::default(),
            upstream: None,
            upstream_app: None,
            attempts: 0,
            connect: None,
            first_byte: None,
            trace_id: 0,
            spans: SpanIds {
                span: 0,
                parent: 0,
                attempt: 0,
                sampled: false,
                started: false,
            },
            try_start: Duration::ZERO,
            dst_identity: Label::default(),
            request_id: None,
            tap_headers: None,
        }
    }
}

/// A finished TCP connection (its access log line, and its span's facts).
#[derive(Clone, Debug)]
pub(crate) struct TcpLine {
    /// When it began (wall clock).
    pub(crate) at: SystemTime,
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
    /// The caller's workload (`namespace/name`), when its proxy said (inbound).
    pub(crate) src_workload: Label,
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
    /// An HTTP request: its line, when it began (wall clock) and how long it took.
    Http(HttpLine, SystemTime, Duration),
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
    let mut clock = Clock::default();
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
            format(&e, &mut clock, &mut buf);
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
                format(e, &mut clock, &mut buf);
            }
            let _ = out.write_all(&buf).and_then(|()| out.flush());
            return;
        }
    }
}

/// A JSON line under construction: fields written straight into the batch's buffer, with no
/// `fmt` machinery, no allocation and no float formatting. Keys are constants (`,"status":`)
/// whose copies the compiler inlines; the line's room is reserved once. A line costs about
/// 2,300 instructions (`bench/instructions.sh` with `ACCESS_LOG=1`, 2026-12-06), not the
/// fourteen thousand serde and `Display` took.
struct Line<'a> {
    buf: &'a mut Vec<u8>,
}

/// `,"NAME":` as a constant.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}

impl<'a> Line<'a> {
    /// A line whose first field is `ts`.
    fn new(buf: &'a mut Vec<u8>) -> Self {
        buf.reserve(1024);
        buf.extend_from_slice(b"{\"ts\":");
        Self { buf }
    }

    #[inline(always)]
    fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    #[inline(always)]
    fn str(&mut self, key: &[u8], v: &str) {
        self.raw(key);
        escaped(self.buf, v.as_bytes());
    }

    /// A value that is an HTTP token (a method) or a name of the mesh's own (an environment):
    /// nothing in it JSON escapes.
    #[inline(always)]
    fn token(&mut self, key: &[u8], v: &str) {
        debug_assert!(!any_escape(v.as_bytes()), "{v:?}");
        self.raw(key);
        self.buf.push(b'"');
        self.raw(v.as_bytes());
        self.buf.push(b'"');
    }

    #[inline(always)]
    fn opt_str(&mut self, key: &[u8], v: Option<&str>) {
        if let Some(v) = v {
            self.str(key, v);
        }
    }

    #[inline(always)]
    fn num(&mut self, key: &[u8], n: u64) {
        self.raw(key);
        decimal(self.buf, n);
    }

    /// Milliseconds with microsecond precision (`1.234`), or null.
    #[inline(always)]
    fn ms(&mut self, key: &[u8], d: Option<Duration>) {
        self.raw(key);
        let Some(d) = d else {
            return self.raw(b"null");
        };
        let us = d.as_micros() as u64;
        decimal(self.buf, us / 1000);
        let frac = us % 1000;
        self.raw(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    fn addr(&mut self, key: &[u8], a: Option<SocketAddr>) {
        self.raw(key);
        let Some(a) = a else {
            return self.raw(b"null");
        };
        self.buf.push(b'"');
        match a {
            SocketAddr::V4(v4) => {
                let [a, b, c, d] = v4.ip().octets();
                decimal(self.buf, u64::from(a));
                for o in [b, c, d] {
                    self.buf.push(b'.');
                    decimal(self.buf, u64::from(o));
                }
                self.buf.push(b':');
                decimal(self.buf, u64::from(v4.port()));
            }
            // Rare here: worth no hand-written form.
            v6 => {
                use std::io::Write as _;
                let _ = write!(self.buf, "{v6}");
            }
        }
        self.buf.push(b'"');
    }

    /// Class, category and side: names of the taxonomy, nothing to escape.
    #[inline(always)]
    fn outcome(&mut self, class: FailureClass, side: Option<Side>) {
        self.raw(br#","failure_class":""#);
        self.raw(class.as_str().as_bytes());
        self.raw(br#"","failure_category":""#);
        self.raw(class.category().as_str().as_bytes());
        self.raw(b"\"");
        if let Some(side) = side {
            self.raw(br#","failure_side":""#);
            self.raw(side.as_str().as_bytes());
            self.raw(b"\"");
        }
    }

    fn end(mut self) {
        self.raw(b"}\n");
    }
}

/// `n` in decimal (a single digit, as an address's octets mostly are, pushed at once).
#[inline]
fn decimal(buf: &mut Vec<u8>, n: u64) {
    if n < 10 {
        return buf.push(b'0' + n as u8);
    }
    buf.extend_from_slice(crate::decimal::Decimal::new(n).as_bytes());
}

/// Bytes a JSON string must escape: control characters, `"` and `\\`.
const ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// A JSON string: quotes, backslashes and control characters escaped; the rest (UTF-8
/// included) as it is. Most strings need nothing: they are looked at a word at a time
/// ([`any_escape`]) and copied at once (inlined: a line has a dozen strings).
#[inline(always)]
fn escaped(buf: &mut Vec<u8>, s: &[u8]) {
    buf.reserve(s.len() + 2);
    buf.push(b'"');
    if any_escape(s) {
        escape_into(buf, s);
    } else {
        buf.extend_from_slice(s);
    }
    buf.push(b'"');
}

/// Whether any byte of `s` is one [`ESCAPE`] names, eight bytes at a time. What is left
/// after the whole words is read again as the last eight bytes (overlapping), and a string
/// shorter than eight as words that cover every byte, padded with spaces (which need no
/// escape): no byte at a time.
#[inline]
fn any_escape(s: &[u8]) -> bool {
    let n = s.len();
    let word = |at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("eight bytes"));
    let half = |at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("four bytes"));
    match n {
        0 => false,
        1..4 => needs_escape(u64::from_le_bytes([
            s[0],
            s[n / 2],
            s[n - 1],
            b' ',
            b' ',
            b' ',
            b' ',
            b' ',
        ])),
        4..8 => needs_escape(u64::from(half(0)) | u64::from(half(n - 4)) << 32),
        _ => {
            let mut at = 0;
            while at + 8 <= n {
                if needs_escape(word(at)) {
                    return true;
                }
                at += 8;
            }
            at < n && needs_escape(word(n - 8))
        }
    }
}

/// `s` escaped, with no quotes: what needs no escape copied in runs.
#[inline(never)]
fn escape_into(buf: &mut Vec<u8>, s: &[u8]) {
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        if let Some(w) = s.get(i..i + 8) {
            if !needs_escape(u64::from_le_bytes(w.try_into().expect("eight bytes"))) {
                i += 8;
                continue;
            }
        }
        let b = s[i];
        i += 1;
        if !ESCAPE[b as usize] {
            continue;
        }
        buf.extend_from_slice(&s[start..i - 1]);
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            c => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                buf.extend_from_slice(b"\\u00");
                buf.push(HEX[(c >> 4) as usize]);
                buf.push(HEX[(c & 0xf) as usize]);
            }
        }
        start = i;
    }
    buf.extend_from_slice(&s[start..]);
}

/// Whether any of the eight bytes of `w` is one [`ESCAPE`] names: below 0x20, `"` or `\`.
/// (The classic test for a zero byte, `(v - 0x01..) & !v & 0x80..`, exact as to whether
/// there is one; bytes from 0x80 up, UTF-8, never match.)
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))) != 0
}

/// The formatter's memory: the last second's `YYYY-MM-DDTHH:MM:SS` (lines of one batch
/// mostly share it).
#[derive(Default)]
struct Clock {
    secs: u64,
    text: [u8; 19],
}

impl Clock {
    /// `t` as RFC 3339 UTC with milliseconds, a JSON string.
    fn write(&mut self, t: SystemTime, buf: &mut Vec<u8>) {
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        if d.as_secs() != self.secs || self.text[0] == 0 {
            self.secs = d.as_secs();
            self.text.copy_from_slice(&rfc3339(t).as_bytes()[..19]);
        }
        let ms = d.subsec_millis();
        let mut out = [0u8; 27];
        out[0] = b'"';
        out[1..20].copy_from_slice(&self.text);
        out[20..].copy_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
            b'"',
            0,
        ]);
        buf.extend_from_slice(&out[..26]);
    }
}

fn format(e: &Entry, clock: &mut Clock, buf: &mut Vec<u8>) {
    match e {
        Entry::Http(l, at, total) => {
            let mut j = Line::new(buf);
            clock.write(*at, j.buf);
            j.raw(br#","kind":"http","direction":""#);
            j.raw(l.direction.as_str().as_bytes());
            j.raw(br#"","protocol":""#);
            j.raw(l.protocol.as_bytes());
            j.raw(b"\"");
            j.token(key!("method"), l.method.as_str());
            j.str(
                key!("authority"),
                l.authority.as_ref().map_or("", RequestAuthority::as_str),
            );
            j.str(key!("path"), l.uri.path());
            j.num(key!("status"), u64::from(l.status));
            if let Some(g) = l.grpc_status {
                j.num(key!("grpc_status"), u64::from(g));
            }
            j.outcome(l.class, l.side);
            j.opt_str(key!("detail"), l.detail.as_deref());
            if l.client_gone {
                j.raw(br#","client_disconnected":true"#);
            }
            j.opt_str(key!("source_identity"), l.source_identity.get());
            j.str(key!("src_service"), l.src_service.as_str());
            j.opt_str(key!("src_workload"), l.src_workload.get());
            j.str(key!("dst_service"), l.dst_service.as_str());
            j.str(key!("dst_workload"), l.dst_workload.as_str());
            j.token(key!("dst_environment"), l.dst_environment);
            j.str(key!("dst_locality"), l.dst_locality.as_str());
            j.str(key!("route"), l.route.as_str());
            j.addr(key!("upstream"), l.upstream);
            if l.upstream_app.is_some() {
                j.addr(key!("upstream_app"), l.upstream_app);
            }
            j.num(key!("attempts"), u64::from(l.attempts));
            j.ms(key!("connect_ms"), l.connect);
            j.ms(key!("first_byte_ms"), l.first_byte);
            j.ms(key!("total_ms"), Some(*total));
            let mut hex = *br#","trace_id":"00000000000000000000000000000000""#;
            hex[13..45].copy_from_slice(&crate::trace::hex32(l.trace_id));
            j.raw(&hex);
            j.str(
                key!("request_id"),
                l.request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            );
            j.end();
        }
        Entry::Tcp(l) => {
            let mut j = Line::new(buf);
            clock.write(l.at, j.buf);
            j.raw(br#","kind":"tcp","direction":""#);
            j.raw(l.direction.as_str().as_bytes());
            j.raw(b"\"");
            j.str(key!("dst_service"), l.dst_service.as_str());
            j.str(key!("dst_workload"), l.dst_workload.as_str());
            j.addr(key!("upstream"), l.upstream);
            j.str(key!("source_identity"), l.source_identity.as_str());
            j.opt_str(key!("src_workload"), l.src_workload.get());
            j.outcome(l.class, l.side);
            match &l.detail {
                Some(d) => j.str(key!("detail"), d),
                None => j.raw(br#","detail":null"#),
            }
            j.num(key!("bytes_sent"), l.sent);
            j.num(key!("bytes_received"), l.received);
            j.ms(key!("total_ms"), Some(l.total));
            j.end();
        }
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
