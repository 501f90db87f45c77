//! Stage `record`: every request and every TCP connection ends in exactly one record, an
//! access-log line and its metrics, with its failure class, the side that failed and the
//! detail.
//!
//! A [`Record`] is filled in as the request progresses and written once: when the response
//! ends, fails, or is dropped. A dropped record means the client went away; a request whose
//! outcome was already known (an application error, say) keeps its class, and the log notes
//! the disconnect beside it, so that the attribution the mesh exists to give is never erased.
//! A [`ConnRecord`] does the same for a TCP connection, through a drop guard, so that a
//! cancelled task still counts.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use http::HeaderMap;

use crate::{
    access_log::{Entry, HttpLine, TcpLine},
    cluster::{Cluster, Endpoint, InFlight},
    error::{Error, FailureClass, Side},
    http::body::OnEnd,
    metrics::{Direction, Label, RequestLabels, ServiceLabels, TcpLabels},
    otlp::{ConnFinished, Finished, TrySpan},
    summary::PeerKey,
    telemetry::Telemetry,
    trace::ConnTrace,
};

/// Everything known about a request, filled in as it progresses: the line it ends as
/// (reached through `Deref`: `rec.status`, `rec.class`), and what must be let go of when it
/// ends. Built on every request, so its fields are cheap to fill: shared labels, and `http`
/// types that clone by reference count.
pub(crate) struct Record {
    line: HttpLine,
    /// Start.
    pub(crate) start: Instant,
    /// Held until the response ends: in-flight count and admission slot.
    pub(crate) guards: Option<(InFlight, tokio::sync::OwnedSemaphorePermit)>,
    /// Inbound: the place the adaptive concurrency limit gave it, given back (with its
    /// time) when the response ends.
    pub(crate) adaptive: Option<crate::adaptive::Permit>,
    /// The cluster and endpoint told the final class (outlier detection). Held directly
    /// rather than as a boxed callback: one allocation fewer per request.
    pub(crate) report_to: Option<(Arc<Cluster>, Arc<Endpoint>)>,
    /// The endpoint of the last try (the peer of an outbound request's summary).
    endpoint: Option<Arc<Endpoint>>,
    /// Tries before the last one, kept for their spans (only when spans are exported).
    earlier: Vec<TrySpan>,
    telemetry: Arc<Telemetry>,
    done: bool,
    /// Delays a route's fault filter injected: the mesh's doing on purpose, left out of the
    /// latency reported for diagnosis and analysis (the access log keeps the whole time).
    pub(crate) injected: std::time::Duration,
}

impl std::ops::Deref for Record {
    type Target = HttpLine;
    fn deref(&self) -> &HttpLine {
        &self.line
    }
}

impl std::ops::DerefMut for Record {
    fn deref_mut(&mut self) -> &mut HttpLine {
        &mut self.line
    }
}

impl Record {
    /// A new record.
    #[inline]
    pub(crate) fn new(
        telemetry: Arc<Telemetry>,
        direction: Direction,
        protocol: &'static str,
        src_service: Label,
    ) -> Box<Self> {
        // Boxed from the start: it ends as the response body's `OnEnd`, and moving a
        // pointer through the request path is cheaper than moving the record. The box is
        // made first and the record written into it: `Box::new` of the record built it on
        // the stack and copied it (two copies of its 752 bytes a request).
        Box::write(
            Box::new_uninit(),
            Self {
                line: HttpLine {
                    direction,
                    protocol,
                    src_service,
                    ..HttpLine::taken()
                },
                start: Instant::now(),
                guards: None,
                adaptive: None,
                report_to: None,
                endpoint: None,
                earlier: Vec::new(),
                telemetry,
                done: false,
                injected: std::time::Duration::ZERO,
            },
        )
    }

    /// The request failed with `e`.
    pub(crate) fn fail(&mut self, e: &Error) {
        self.class = e.class();
        self.side = Some(e.side());
        self.detail = Some(e.to_string());
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some((cluster, ep)) = self.report_to.take() {
            cluster.report(&ep, self.class);
        }
        self.guards = None;
        let now = Instant::now();
        let total = now.saturating_duration_since(self.start);
        if let Some(p) = self.adaptive.take() {
            // The application's own answers say how loaded it is; a reset or a client gone
            // says nothing.
            p.done(
                total,
                matches!(self.class, FailureClass::Ok | FailureClass::AppError),
                now,
            );
        }
        if self.side.is_none() && self.class != FailureClass::Ok {
            self.side = self.class.side();
        }
        let l = &self.line;
        let labels = labels(l, l.status, l.class);
        // The peer is a summary's key only: nothing to build when none is kept.
        let peer = match l.direction {
            _ if !self.telemetry.metrics.summaries => PeerKey::default(),
            Direction::outbound => self
                .endpoint
                .take()
                .map(|ep| ep.peer_key())
                .unwrap_or_default(),
            Direction::inbound => PeerKey::caller(
                &l.src_workload,
                &l.source_identity,
                &l.src_environment,
                &l.src_locality,
            ),
        };
        let t = &self.telemetry;
        let measured = total.saturating_sub(self.injected);
        // Reported, a request counts its last try; the earlier ones were recorded as they
        // failed (`end_try`), each by its own endpoint.
        let attempts = if t.metrics.summaries {
            note_failed(t, l, &peer, measured);
            1
        } else {
            l.attempts
        };
        t.metrics
            .record_request(labels, peer, measured.as_secs_f64(), attempts);
        t.taps.offer(l, total);
        let spans = t
            .spans
            .as_ref()
            .filter(|_| l.spans.sampled || crate::otlp::always_exported(l.class));
        if spans.is_none() && !t.log.enabled() {
            return;
        }
        // The start in wall-clock time, worked out only when a line is written.
        let at = SystemTime::now() - total;
        if let Some(spans) = spans {
            spans.offer(Finished {
                line: l.clone(),
                at,
                total,
                earlier: std::mem::take(&mut self.earlier),
            });
        }
        if !t.log.enabled() {
            return;
        }
        let line = std::mem::replace(&mut self.line, HttpLine::taken());
        self.telemetry.log.push(Entry::Http(line, at, total));
    }

    /// The current try ended `at` (from the request's start) with `class` and the status it
    /// got (0 for none), and another follows: its span is kept for export.
    pub(crate) fn end_try(&mut self, at: std::time::Duration, class: FailureClass, status: u16) {
        if self.telemetry.metrics.summaries {
            // Reported by the endpoint it went to and how it failed, and listed with its
            // id: the control plane sees a failed endpoint even when the retry saved the
            // request.
            let peer = self
                .endpoint
                .as_ref()
                .map(|ep| ep.peer_key())
                .unwrap_or_default();
            let t = &self.telemetry;
            let took = at.saturating_sub(self.try_start);
            list_failed(t, &self.line, &peer, class, status, took);
            t.metrics
                .record_try(labels(&self.line, status, class), peer);
        }
        if self.telemetry.spans.is_some() {
            let done = TrySpan {
                span: self.spans.attempt,
                start: self.try_start,
                took: at.saturating_sub(self.try_start),
                endpoint: self.upstream,
                workload: self.dst_workload.clone(),
                identity: self.dst_identity.clone(),
                class,
                status,
            };
            self.earlier.push(done);
        }
    }

    /// A new try begins `at` (from the request's start): it gets a span of its own, whose id
    /// the returned `traceparent` carries to the next hop.
    pub(crate) fn begin_try(&mut self, at: std::time::Duration) -> http::HeaderValue {
        self.line.spans.attempt = fastrand::u64(1..);
        self.line.try_start = at;
        crate::trace::traceparent(self.trace_id, self.spans.attempt, self.spans.sampled)
    }

    /// Note the endpoint a try went to.
    pub(crate) fn set_endpoint(&mut self, ep: &Arc<Endpoint>) {
        if self.telemetry.metrics.summaries {
            self.endpoint = Some(ep.clone());
        }
        self.upstream = Some(ep.target);
        self.upstream_app = ep.via_peer_proxy().then_some(ep.cfg.addr);
        self.dst_workload = ep.workload.clone();
        self.dst_identity = ep.identity.clone();
        self.dst_environment = ep.cfg.environment.as_str();
        self.dst_locality = ep.locality.clone();
    }

    /// Look at a gRPC status in response headers or trailers.
    pub(crate) fn grpc(&mut self, headers: &HeaderMap) {
        if let Some(code) = crate::http::headers::grpc_status(headers) {
            self.grpc_status = Some(code);
            if self.class == FailureClass::Ok {
                self.class = FailureClass::from_grpc(code);
            }
        }
    }
}

/// The labels of a request's metrics, with the status and class it ended with (or one of
/// its tries did).
fn labels(l: &HttpLine, status: u16, class: FailureClass) -> RequestLabels {
    RequestLabels {
        direction: l.direction,
        src_service: l.src_service.clone(),
        source_identity: l.source_identity.clone(),
        dst_service: l.dst_service.clone(),
        dst_workload: l.dst_workload.clone(),
        dst_environment: l.dst_environment,
        dst_locality: l.dst_locality.clone(),
        route: l.route.clone(),
        status_code: status,
        grpc_status: l.grpc_status,
        failure_class: class,
    }
}

/// A failed request (or, inbound, one its caller gave up on) joins the period's list, with
/// the id of its attempt: the control plane joins the caller's entry with the callee's. One
/// that did not fail but took [`SLOW_MS`] or more (outbound: its last try; inbound: this
/// proxy's own time) joins the list of slow ones, to be joined the same way.
///
/// [`SLOW_MS`]: trellis_telemetry::report::SLOW_MS
fn note_failed(t: &Telemetry, l: &HttpLine, peer: &PeerKey, total: std::time::Duration) {
    let gave_up = l.direction == Direction::inbound && l.class == FailureClass::ClientDisconnect;
    let failed = !matches!(
        l.class,
        FailureClass::Ok | FailureClass::ClientError | FailureClass::ClientDisconnect
    );
    if failed || gave_up {
        list_failed(t, l, peer, l.class, l.status, total);
        return;
    }
    let took = match l.direction {
        Direction::outbound => total.saturating_sub(l.try_start),
        Direction::inbound => total,
    };
    if took.as_millis() >= u128::from(trellis_telemetry::report::SLOW_MS) {
        list(&t.metrics.slow, l, peer, l.class, l.status, took);
    }
}

/// Put the current try (outbound) or the caller's (inbound) on the period's list of failed
/// attempts, as ending with `class` and `status` after `took`.
fn list_failed(
    t: &Telemetry,
    l: &HttpLine,
    peer: &PeerKey,
    class: FailureClass,
    status: u16,
    took: std::time::Duration,
) {
    list(&t.metrics.failed, l, peer, class, status, took);
}

/// Put the current try (outbound) or the caller's (inbound) on `to`.
fn list(
    to: &std::sync::Mutex<crate::summary::FailedAttempts>,
    l: &HttpLine,
    peer: &PeerKey,
    class: FailureClass,
    status: u16,
    took: std::time::Duration,
) {
    let (direction, id) = match l.direction {
        Direction::outbound => (0, l.spans.attempt),
        Direction::inbound => (1, l.spans.parent),
    };
    let a = trellis_telemetry::report::Attempt {
        direction,
        id,
        trace_id: format!("{:032x}", l.trace_id),
        service: crate::summary::host_to_id(&l.dst_service),
        peer_workload: peer.workload.get().unwrap_or_default().to_string(),
        class: class.as_str().into(),
        status: u32::from(status),
        at_ms: SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        latency_ms: took.as_millis().min(u128::from(u32::MAX)) as u32,
    };
    to.lock().unwrap_or_else(|p| p.into_inner()).push(a);
}

impl OnEnd for Record {
    fn trailers(&mut self, t: &HeaderMap) {
        self.grpc(t);
    }

    fn end(&mut self) {
        self.finish();
    }

    fn error(&mut self, e: &Error) {
        self.fail(e);
        self.finish();
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.done {
            // Dropped before the response ended: the client went away (or the connection
            // was torn down under it). An outcome already known stays: an application
            // error whose client then left is still the application's.
            if self.class == FailureClass::Ok {
                self.class = FailureClass::ClientDisconnect;
                self.side = Some(Side::Downstream);
            } else {
                self.client_gone = true;
            }
            self.finish();
        }
    }
}

/// The record of one TCP connection: counted as open while alive, its outcome recorded when
/// dropped.
pub(crate) struct ConnRecord {
    telemetry: Arc<Telemetry>,
    direction: Direction,
    /// Destination service.
    pub(crate) service: Label,
    /// Destination workload.
    pub(crate) workload: Label,
    /// The address connected to.
    pub(crate) upstream: Option<SocketAddr>,
    /// The caller's SPIFFE ID, on the inbound side of mutual TLS.
    pub(crate) source: Label,
    /// The caller's workload, environment and locality, from its proxy's hello (inbound,
    /// over mutual TLS).
    pub(crate) src_workload: Label,
    pub(crate) src_environment: Label,
    pub(crate) src_locality: Label,
    /// The endpoint connected to (outbound).
    pub(crate) endpoint: Option<Arc<Endpoint>>,
    /// How it ended (so far).
    pub(crate) class: FailureClass,
    side: Option<Side>,
    /// What went wrong.
    pub(crate) detail: Option<String>,
    /// Bytes from the client.
    pub(crate) sent: u64,
    /// Bytes to the client.
    pub(crate) received: u64,
    /// Its span: a trace that starts here, or a child of the span its caller's proxy named in
    /// the stream's hello (inbound), or of its CONNECT's try (a tunnel).
    pub(crate) trace: ConnTrace,
    start: Instant,
    wall: SystemTime,
}

impl ConnRecord {
    /// A connection of `direction` to `service`, open from now.
    pub(crate) fn new(telemetry: Arc<Telemetry>, direction: Direction, service: Label) -> Self {
        let labels = ServiceLabels {
            direction,
            dst_service: service.clone(),
        };
        telemetry.metrics.tcp_open.get_or_create(&labels).inc();
        if telemetry.metrics.summaries {
            telemetry
                .metrics
                .tcp_summary
                .lock()
                .expect("tcp summary lock")
                .opened(direction, &service);
        }
        Self {
            direction,
            service,
            workload: Label::default(),
            upstream: None,
            source: Label::default(),
            src_workload: Label::default(),
            src_environment: Label::default(),
            src_locality: Label::default(),
            endpoint: None,
            class: FailureClass::Ok,
            side: None,
            detail: None,
            sent: 0,
            received: 0,
            trace: ConnTrace::start(telemetry.trace_sampling),
            start: Instant::now(),
            wall: SystemTime::now(),
            telemetry,
        }
    }

    /// Outbound or inbound.
    pub(crate) fn direction(&self) -> Direction {
        self.direction
    }

    /// The connection went (or tried to go) to `ep`.
    pub(crate) fn set_endpoint(&mut self, ep: Arc<Endpoint>) {
        self.upstream = Some(ep.target);
        self.workload = ep.workload.clone();
        self.endpoint = Some(ep);
    }

    /// The connection failed with `e`.
    pub(crate) fn fail(&mut self, e: &Error) {
        self.class = e.class();
        self.side = Some(e.side());
        self.detail = Some(e.to_string());
    }

    /// The connection ended with `class` (a spliced stream's I/O error, say).
    pub(crate) fn end_with(&mut self, class: FailureClass, detail: String) {
        self.class = class;
        self.side = class.side();
        self.detail = Some(detail);
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        let m = &self.telemetry.metrics;
        let sl = ServiceLabels {
            direction: self.direction,
            dst_service: self.service.clone(),
        };
        m.tcp_open.get_or_create(&sl).dec();
        m.tcp_sent.get_or_create(&sl).inc_by(self.sent);
        m.tcp_received.get_or_create(&sl).inc_by(self.received);
        let tl = TcpLabels {
            direction: self.direction,
            dst_service: self.service.clone(),
            dst_workload: self.workload.clone(),
            failure_class: self.class,
        };
        m.tcp_connections.get_or_create(&tl).inc();
        let total = self.start.elapsed();
        if m.summaries {
            let peer = match (self.direction, &self.endpoint) {
                (Direction::outbound, Some(ep)) => ep.peer_key(),
                _ => PeerKey::caller(
                    &self.src_workload,
                    &self.source,
                    &self.src_environment,
                    &self.src_locality,
                ),
            };
            m.tcp_summary.lock().expect("tcp summary lock").closed(
                self.direction,
                &self.service,
                self.class,
                peer,
                self.sent,
                self.received,
            );
        }
        let line = TcpLine {
            at: self.wall,
            total,
            direction: self.direction,
            dst_service: std::mem::take(&mut self.service),
            dst_workload: std::mem::take(&mut self.workload),
            upstream: self.upstream,
            source_identity: std::mem::take(&mut self.source),
            src_workload: std::mem::take(&mut self.src_workload),
            class: self.class,
            side: self.side,
            detail: self.detail.take(),
            sent: self.sent,
            received: self.received,
        };
        if let Some(spans) = &self.telemetry.spans {
            if self.trace.ctx.sampled || crate::otlp::always_exported(line.class) {
                spans.offer_conn(ConnFinished {
                    line: line.clone(),
                    dst_identity: self
                        .endpoint
                        .as_ref()
                        .map(|e| e.identity.clone())
                        .unwrap_or_default(),
                    trace: self.trace,
                });
            }
        }
        self.telemetry.log.push(Entry::Tcp(line));
    }
}
