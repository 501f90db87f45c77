//! The outbound side: what the local application sends to the mesh. A request names a
//! service by its authority (or arrives on a service port's explicit bind, or captured on
//! its virtual IP); stage `route` picks the route and a backend; the attempt stage sends it.
//! CONNECT opens a TCP tunnel to the service; an Upgrade gets a connection of its own.

use std::net::SocketAddr;

use http::{header, Method, Request, Version};

use crate::{
    error::{Error, Kind},
    h1::codec::Noted,
    http::{
        body::ClientBody,
        headers::{edit_headers, strip_hop_by_hop},
        Listener,
    },
    snapshot::Snapshot,
    stages::{attempt::Plan, record::Record, respond::local_reply, route, Next},
};

/// Most header fields a request may carry on (counted with this proxy's `traceparent` and
/// `x-request-id`): the next hop gets up to three more (`x-trellis-peer`, the framing, `host`)
/// and must not count over the 100 an HTTP/1.1 server takes (this proxy's inbound, hyper's
/// default). Found by the `http1_request` fuzz target: a request of 100 headers was taken, and
/// its forwarded form was refused by the next hop.
pub(crate) const MAX_HEADERS_ON: usize = 97;

/// The mesh Service an authority names (`NAME.NAMESPACE[.mesh]`, or a bare `NAME` in the
/// local workload's namespace), when it could be one: labels of letters, digits and '-'.
fn mesh_name(host: &str, local_ns: &str) -> Option<trellis_model::NamespacedName> {
    let host = host.strip_suffix(".mesh").unwrap_or(host);
    let (name, ns) = host.split_once('.').unwrap_or((host, local_ns));
    let label = trellis_model::is_dns_label;
    (label(name) && label(ns)).then(|| trellis_model::NamespacedName {
        namespace: ns.to_string(),
        name: name.to_string(),
    })
}

/// Route an outbound request: a reply, or where it goes next. With `ask`, a request whose
/// authority names a Service the config does not hold is handed back to be asked for on
/// demand ([`Next::Discover`]).
pub(crate) fn route<'a>(
    snap: &'a Snapshot,
    listener: &Listener,
    req: &mut Request<ClientBody>,
    mut rec: Box<Record>,
    noted: &Noted,
    peer: SocketAddr,
    ask: bool,
) -> Next<'a> {
    // Read from the head as it came ([`crate::h1::codec::Noted`]).
    let authority = rec.authority.clone();
    let grpc = noted.grpc;
    rec.src_workload = snap.src_workload.clone();
    let target = match listener {
        Listener::Bind { cluster } => snap.clusters.get(cluster).and_then(|c| {
            let (id, svc) = snap.cfg.services.get_key_value(&c.cfg.service)?;
            let port = svc.ports.iter().find(|p| p.port == c.cfg.port)?;
            Some((id, svc, port))
        }),
        _ => authority
            .as_ref()
            .and_then(|a| route::service_port(snap, a)),
    };
    let Some((svc_id, svc, port)) = target else {
        if let (true, Listener::Outbound, Some(a)) = (ask, listener, &authority) {
            let local_ns = snap
                .cfg
                .local
                .as_ref()
                .map_or("default", |l| &l.id.namespace);
            if let Some(id) = mesh_name(a.host_port().0, local_ns) {
                if !snap.cfg.services.contains_key(&id) {
                    return Next::Discover(id, rec);
                }
            }
        }
        let detail = match &authority {
            Some(a) => format!(
                "no service matches authority {:?} (expected NAME.NAMESPACE[:PORT]); peer {peer}",
                a.as_str()
            ),
            None => "request has no Host header or absolute URI".to_string(),
        };
        return no_route(rec, detail, grpc);
    };
    rec.dst_service = svc.host.clone().into();
    if let Some(p) = svc.trace_sampling {
        let trace_id = rec.trace_id;
        crate::trace::resample(req.headers_mut(), trace_id, &mut rec.spans, p);
    }
    if req.method() == Method::CONNECT {
        let key = trellis_model::proxy::cluster_key(svc_id, port.port);
        return match snap.clusters.get(&key) {
            Some(c) => Next::Tunnel(c.clone(), rec),
            None => no_route(rec, format!("no cluster {key}"), false),
        };
    }
    let Some(r) = route::find(port, req) else {
        let detail = format!(
            "no route of {} matches {} {}",
            svc.host,
            rec.method,
            rec.uri.path()
        );
        return no_route(rec, detail, grpc);
    };
    rec.route = r.name.clone().into();
    let backend = route::pick_backend(&r.backends);
    if let Some(why) = &backend.unresolved {
        // The Gateway API's rule: the share of a backend that does not resolve is answered
        // 500 (gRPC: UNAVAILABLE); the route's other backends are served.
        let detail = format!("backend {} does not resolve: {why}", backend.cluster);
        let e = Error::new(Kind::UnresolvedBackend, detail);
        return Next::Reply(local_reply(rec, &e, grpc));
    }
    let Some(cluster) = snap.clusters.get(&backend.cluster).cloned() else {
        let detail = format!("no cluster {}", backend.cluster);
        return no_route(rec, detail, grpc);
    };
    // An upgrade as the head asked for it (the server then got ready to hand the connection
    // over): the route's edits may take the ask away, not make one.
    let mut upgrade = noted.upgrade;
    if !r.request_headers.is_empty() {
        edit_headers(req.headers_mut(), &r.request_headers);
        upgrade = upgrade && is_upgrade(req);
    }
    if upgrade {
        return Next::Upgrade(cluster, rec);
    }
    strip_hop_by_hop(req.headers_mut());
    if req.headers().len() > MAX_HEADERS_ON {
        let detail = format!(
            "{} header fields: more than {MAX_HEADERS_ON} leave the next hop no room for the mesh's own",
            req.headers().len()
        );
        let e = Error::new(Kind::BadRequest, detail).with_status(431);
        return Next::Reply(local_reply(rec, &e, grpc));
    }
    let plan = Plan {
        cluster,
        timeout: r.timeout,
        idle: r.idle_timeout,
        retry: r.retry.as_ref(),
        response_headers: (!r.response_headers.is_empty()).then_some(&r.response_headers),
        peer_header: snap.peer_header.as_ref(),
        faults: &r.faults,
        mirror_to: if r.mirrors.is_empty() {
            Vec::new()
        } else {
            crate::stages::mirror::roll(&r.mirrors, crate::stages::fault::draw)
                .filter_map(|m| snap.clusters.get(&m.cluster).cloned())
                .collect()
        },
    };
    Next::Forward(plan, rec)
}

fn no_route(rec: Box<Record>, detail: String, grpc: bool) -> Next<'static> {
    Next::Reply(local_reply(rec, &Error::new(Kind::NoRoute, detail), grpc))
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket).
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}
