//! Stage `mirror`: a copy of a share of a route's requests goes to another backend
//! (Gateway API's `RequestMirror`, `percent` or `fraction`); its answer is discarded, and
//! compared with the primary's: whether their status classes agree, how much slower or
//! faster the mirror answered, the mirror's failures by class (reported per route, shown by
//! `trellis stat` and the pane).
//!
//! A copy is sent once the primary's answer head has come (the request body, if any, then
//! recorded whole, whether its length was told or it came chunked), on a task of its own:
//! it never delays the primary. It is marked (`x-trellis-mirror: 1`), has a cap of its own
//! on requests in flight ([`crate::mirrors::IN_FLIGHT`]) and on body size ([`BODY_CAP`])
//! (beyond either, or a body not ended when the primary answered, it is skipped and
//! counted), and counts
//! neither in the caller's metrics and reports nor in the cluster's retry budget. Cost on a
//! route without mirrors: one emptiness check per request.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::BodyExt as _;
use trellis_model::proxy::MirrorConfig;

use crate::{cluster::Cluster, error::FailureClass, http::body::UpBody, pool::Dialer};

/// Largest request body mirrored; a bigger one is skipped.
pub(crate) const BODY_CAP: usize = 64 * 1024;
/// How long a mirror may take to answer (and to send its body).
const TIMEOUT: Duration = Duration::from_secs(10);

/// `x-trellis-mirror`.
pub(crate) static X_TRELLIS_MIRROR: HeaderName = HeaderName::from_static("x-trellis-mirror");

/// The mirrors of `mirrors` that come up for one request, with `draw` giving numbers below a
/// million.
pub(crate) fn roll(
    mirrors: &[MirrorConfig],
    mut draw: impl FnMut() -> u32,
) -> impl Iterator<Item = &MirrorConfig> {
    mirrors
        .iter()
        .filter(move |m| m.per_million >= 1_000_000 || draw() < m.per_million)
}

/// What a copy is made of: the request's head, taken before the primary's tries.
pub(crate) struct Head {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
}

/// How the primary's try ended, to compare the mirror's with.
#[derive(Clone, Copy)]
pub(crate) struct Primary {
    pub(crate) status: u16,
    pub(crate) first_byte: Duration,
}

/// Send a copy of `head` and `body` to `cluster` on a task of its own, and compare its
/// answer with `primary`'s; skipped (and counted) when the mirrors' slots are full.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send(
    dialer: &Arc<Dialer>,
    cluster: Arc<Cluster>,
    route: Arc<str>,
    service: String,
    head: &Head,
    body: UpBody,
    peer_header: Option<HeaderValue>,
    primary: Primary,
) {
    let mirrors = dialer.metrics.mirrors.clone();
    let Ok(slot) = mirrors.slot() else {
        mirrors.skipped(&route, &service, &cluster.key);
        return;
    };
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.headers_mut() = head.headers.clone();
    req.headers_mut()
        .insert(X_TRELLIS_MIRROR.clone(), HeaderValue::from_static("1"));
    let dialer = dialer.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let start = Instant::now();
        let (status, class, first_byte) = exchange(&dialer, &cluster, req, peer_header).await;
        let diff = first_byte.as_millis() as i64 - primary.first_byte.as_millis() as i64;
        mirrors.with(&route, &service, &cluster.key, |m| {
            m.sent += 1;
            m.compared += 1;
            if status / 100 == primary.status / 100 {
                m.agreed += 1;
            }
            m.latency_diff_ms += diff;
            if class != FailureClass::Ok && class != FailureClass::ClientError {
                *m.failures.entry(class.as_str().into()).or_default() += 1;
            }
        });
        tracing::trace!(cluster = %cluster.key, status, took = ?start.elapsed(), "mirrored");
    });
}

/// One try of the copy (no retries): its status (0 for none), class and time to its head;
/// its body read and dropped.
async fn exchange(
    dialer: &Dialer,
    cluster: &Arc<Cluster>,
    req: Request<UpBody>,
    peer_header: Option<HeaderValue>,
) -> (u16, FailureClass, Duration) {
    let start = Instant::now();
    let ep = match super::balance::pick(cluster, start, None) {
        Ok(ep) => ep,
        Err(e) => return (0, e.class(), start.elapsed()),
    };
    let ctx = cluster.connect_ctx(dialer);
    let h2 = cluster.http2();
    let mut from = req;
    let body = std::mem::replace(from.body_mut(), UpBody::Empty);
    let mut req = super::exchange::upstream_request(&mut from, body, h2, true);
    if let (true, Some(v)) = (ep.via_peer_proxy(), peer_header) {
        req.headers_mut()
            .insert(crate::http::X_TRELLIS_PEER.clone(), v);
    }
    let _in_flight = ep.start();
    let mut connect = None;
    let outcome = super::exchange::send_once(
        &ctx,
        &ep,
        &mut req,
        h2,
        &mut connect,
        start,
        Some((TIMEOUT, crate::error::Kind::Timeout)),
    )
    .await;
    let took = start.elapsed();
    match outcome {
        Ok(super::exchange::Try::Failed(e)) | Err(super::exchange::Unsent { error: e }) => {
            (0, e.class(), took)
        }
        Ok(super::exchange::Try::Response(r)) => {
            let status = r.status().as_u16();
            let class = super::exchange::peer_answer(&ep, &r)
                .unwrap_or_else(|| FailureClass::from_status(status));
            // Read to the end (a pooled connection is reused only then), within the time.
            let body = crate::http::body::ProxyBody::upstream(
                r.into_body(),
                crate::http::body::Limits::default(),
            );
            let _ = tokio::time::timeout(TIMEOUT, body.collect()).await;
            (status, class, took)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mirror_is_rolled_on_its_own() {
        let m = |per_million| MirrorConfig {
            cluster: "x".into(),
            per_million,
        };
        let all = [m(1_000_000), m(0), m(250_000)];
        let mut picked = [0u32; 3];
        for _ in 0..40_000 {
            for r in roll(&all, super::super::fault::draw) {
                let i = all.iter().position(|x| std::ptr::eq(x, r)).unwrap();
                picked[i] += 1;
            }
        }
        assert_eq!(picked[0], 40_000);
        assert_eq!(picked[1], 0);
        assert!((9_400..10_600).contains(&picked[2]), "{picked:?}");
    }
}
