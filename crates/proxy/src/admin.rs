//! The admin listener: `/metrics`, `/ready`, `/live`, `/config_dump`.

use std::{convert::Infallible, sync::Arc};

use http::{header, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::{
    http::{body::ProxyBody, server::text},
    shared::Shared,
};

/// Serve the admin endpoints until the proxy stops.
/// Serve until `stop` completes (a successor took the listener over).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<ProxyBody> {
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            if prometheus_client::encoding::text::encode(&mut out, &shared.registry).is_err() {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
            }
            // The adaptive concurrency limit, read now.
            let (limit, in_flight, shed) = shared.adaptive.figures();
            let adaptive = format!(
                "# HELP trellis_adaptive_concurrency_limit The inbound adaptive concurrency limit (requests in flight to the application).\n\
                 # TYPE trellis_adaptive_concurrency_limit gauge\n\
                 trellis_adaptive_concurrency_limit {limit}\n\
                 # HELP trellis_adaptive_concurrency_in_flight Inbound requests in flight under the limit.\n\
                 # TYPE trellis_adaptive_concurrency_in_flight gauge\n\
                 trellis_adaptive_concurrency_in_flight {in_flight}\n\
                 # HELP trellis_adaptive_concurrency_shed Inbound requests shed by the limit (503, overloaded).\n\
                 # TYPE trellis_adaptive_concurrency_shed counter\n\
                 trellis_adaptive_concurrency_shed_total {shed}\n"
            );
            match out.rfind("# EOF") {
                Some(i) => out.insert_str(i, &adaptive),
                None => out.push_str(&adaptive),
            }
            let mut r = text(StatusCode::OK, out);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if shared.drain.draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/ready" if !*shared.synced.borrow() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first config from the control plane\n",
        ),
        "/ready" => text(StatusCode::OK, "ready\n"),
        "/taps" => text(
            StatusCode::OK,
            serde_json::Value::Array(shared.telemetry.taps.specs()).to_string(),
        ),
        "/config_dump" => {
            let snap = shared.state.load_full();
            let endpoints: serde_json::Map<String, serde_json::Value> = snap
                .clusters
                .iter()
                .map(|(k, c)| {
                    let eps = c
                        .endpoints
                        .iter()
                        .map(|e| serde_json::json!({"addr": e.cfg.addr, "ejected": e.ejected(), "in_flight": e.in_flight()}))
                        .collect();
                    (k.clone(), serde_json::Value::Array(eps))
                })
                .collect();
            let dump = serde_json::json!({
                "version": snap.version,
                "source": shared.source,
                "xds": &*shared.xds_status.lock().unwrap_or_else(|p| p.into_inner()),
                "identity": shared.identity.as_ref().map(|c| {
                    let c = c.load();
                    serde_json::json!({
                        "spiffeId": c.info.id.to_string(),
                        "serial": c.info.serial,
                        "notAfter": trellis_identity::join::unix(c.info.not_after),
                        "trustedRoots": c.bundle_pem.matches("BEGIN CERTIFICATE").count(),
                    })
                }),
                "config": serde_json::to_value(&*snap.cfg)
                    .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
                "endpoint_health": endpoints,
                "on_demand": shared.demand.as_ref().map(|d| {
                    let mut v: Vec<String> = d.asked().iter().map(|id| id.to_string()).collect();
                    v.sort();
                    v
                }),
                "host": &*shared.host.lock().unwrap_or_else(|p| p.into_inner()),
            });
            let mut r = text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&dump).unwrap_or_default(),
            );
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /ready, /live, /config_dump\n",
        ),
    }
}
