use http::{HeaderValue, Method};

use super::*;
use crate::test_util::snapshot;

const MESH: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  selector: { app: web }
  ports: [{ name: http, port: 80, protocol: HTTP }, { name: admin, port: 9000, protocol: HTTP }]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: solo, namespace: shop }
spec:
  selector: { app: solo }
  ports: [{ name: http, port: 8080, protocol: HTTP }]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: client, namespace: shop, labels: { app: client } }
spec: { address: 127.0.0.1, environment: vm }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: shop }
spec:
  parentRefs: [{ kind: Service, name: web, port: 80 }]
  rules:
    - name: regex
      matches: [{ path: { type: RegularExpression, value: "/api/.*" } }]
    - name: prefix
      matches: [{ path: { type: PathPrefix, value: /api } }]
    - name: longer-prefix
      matches: [{ path: { type: PathPrefix, value: /api/v2 } }]
    - name: exact
      matches: [{ path: { type: Exact, value: /api/v2/items } }]
    - name: post
      matches: [{ path: { type: PathPrefix, value: /api }, method: POST }]
    - name: header
      matches: [{ path: { type: PathPrefix, value: /api }, headers: [{ name: x-canary, value: "1" }] }]
"#;

fn req(method: Method, path: &str, headers: &[(&'static str, &'static str)]) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = method;
    *r.uri_mut() = path.parse().unwrap();
    for (k, v) in headers {
        r.headers_mut().insert(*k, HeaderValue::from_static(v));
    }
    r
}

fn route_of(snap: &Snapshot, r: &Request<()>) -> String {
    let auth = RequestAuthority::Host(HeaderValue::from_static("web.shop"));
    let (_, _, port) = service_port(snap, &auth).unwrap();
    find(port, r).unwrap().name.to_string()
}

#[test]
fn gateway_api_precedence() {
    let snap = snapshot(MESH, Some("shop/client"));
    let name =
        |m: Method, p: &str, h: &[(&'static str, &'static str)]| route_of(&snap, &req(m, p, h));
    assert_eq!(name(Method::GET, "/api/v2/items", &[]), "shop/web.exact");
    assert_eq!(
        name(Method::GET, "/api/v2/other", &[]),
        "shop/web.longer-prefix"
    );
    // Same prefix: a method match wins over none, then more header matches.
    assert_eq!(name(Method::POST, "/api/x", &[]), "shop/web.post");
    assert_eq!(
        name(Method::GET, "/api/x", &[("x-canary", "1")]),
        "shop/web.header"
    );
    assert_eq!(name(Method::GET, "/api/x", &[]), "shop/web.prefix");
    // A prefix matches whole segments only; the regex comes after every prefix.
    assert_eq!(name(Method::GET, "/apis", &[]), "default");
}

#[test]
fn the_authority_names_a_service_port() {
    let snap = snapshot(MESH, Some("shop/client"));
    let port = |a: &'static str| {
        let auth = RequestAuthority::Host(HeaderValue::from_static(a));
        service_port(&snap, &auth).map(|(id, _, p)| (id.to_string(), p.port))
    };
    assert_eq!(
        port("web.shop"),
        Some(("shop/web".into(), 80)),
        "no port: 80"
    );
    assert_eq!(port("web.shop:9000"), Some(("shop/web".into(), 9000)));
    assert_eq!(port("web.shop.mesh"), Some(("shop/web".into(), 80)));
    assert_eq!(
        port("web"),
        Some(("shop/web".into(), 80)),
        "bare name, own namespace"
    );
    assert_eq!(
        port("solo.shop"),
        Some(("shop/solo".into(), 8080)),
        "the only port"
    );
    assert_eq!(port("web.shop:81"), None);
    assert_eq!(port("nothing.shop"), None);
}

#[test]
fn backends_are_picked_by_weight() {
    use trellis_model::proxy::WeightedCluster;
    let b = |c: &str, w| WeightedCluster {
        cluster: c.into(),
        weight: w,
        unresolved: None,
    };
    let backends = [b("a", 1), b("zero", 0), b("c", 3)];
    let mut n = std::collections::HashMap::new();
    for _ in 0..4000 {
        *n.entry(pick_backend(&backends).cluster.clone())
            .or_insert(0) += 1;
    }
    assert!(!n.contains_key("zero"));
    let share = f64::from(n["c"]) / 4000.0;
    assert!((0.70..0.80).contains(&share), "{share}");
}
