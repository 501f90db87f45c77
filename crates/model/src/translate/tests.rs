use super::*;
use crate::{parse_documents, ConfigError};

const EXAMPLE: &str = include_str!("../../../../examples/quickstart.yaml");

fn nn(s: &str) -> NamespacedName {
    s.parse().unwrap()
}

fn err(text: &str) -> ConfigError {
    match parse_documents("t.yaml", text) {
        Err(e) => e,
        Ok(res) => translate("t.yaml", &res, Some(&nn("shop/frontend-1"))).unwrap_err(),
    }
}

#[test]
fn example_translates() {
    let res = parse_documents("ex.yaml", EXAMPLE).unwrap();
    let cfg = translate("ex.yaml", &res, Some(&nn("shop/frontend-1"))).unwrap();
    let catalog = &cfg.services[&nn("shop/catalog")].ports[0];
    assert_eq!(catalog.routes.len(), 2, "route plus default");
    assert_eq!(catalog.routes[0].backends.len(), 2);
    assert_eq!(catalog.routes[0].backends[0].cluster, "shop/catalog-v1:80");
    assert_eq!(catalog.routes[0].timeout, Some(Duration::from_secs(2)));
    let v2 = &cfg.clusters["shop/catalog-v2:80"];
    assert_eq!(v2.endpoints.len(), 1);
    assert_eq!(v2.endpoints[0].addr, "127.0.0.1:8082".parse().unwrap());
    assert_eq!(v2.policy.max_pending, 128);
    assert_eq!(cfg.tcp_binds[0].cluster, "shop/catalog:80");
    assert!(cfg.local.is_some());
    // The proxy's /config_dump renders it as JSON, whose map keys must be strings.
    let json = serde_json::to_value(&cfg).expect("renders as JSON");
    assert!(json["services"]["shop/catalog"].is_object(), "{json}");
}

#[test]
fn unknown_field_names_line_and_field() {
    let text = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: a }\nspec:\n  ports: [{ port: 80 }]\n  selecter: { app: a }\n";
    let e = err(text).to_string();
    assert!(e.starts_with("t.yaml:6:"), "{e}");
    assert!(e.contains("selecter"), "{e}");
}

#[test]
fn bad_values_are_located() {
    let text = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: r }\nspec:\n  parentRefs: [{ name: a }]\n  rules:\n    - timeouts: { request: 2 seconds }\n";
    let e = err(text).to_string();
    assert!(e.starts_with("t.yaml:7:"), "{e}");
    assert!(e.contains("invalid duration"), "{e}");
}

#[test]
fn missing_backend_is_refused_with_line() {
    let text = format!(
        "{EXAMPLE}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: r2, namespace: shop }}\nspec:\n  parentRefs: [{{ name: catalog }}]\n  rules:\n    - backendRefs:\n        - name: nope\n          port: 80\n"
    );
    let e = err(&text);
    let ConfigError::Invalid { line, field, .. } = &e else {
        panic!("{e}")
    };
    let expected = text.lines().position(|l| l.contains("name: nope")).unwrap() as u64 + 1;
    assert_eq!(*line, expected, "{e}");
    assert!(field.contains("backendRefs[0].name"), "{e}");
}

#[test]
fn duplicates_and_kinds() {
    let e = err(&format!(
        "{EXAMPLE}\n---\n{}",
        EXAMPLE.split("---").next().unwrap()
    ));
    assert!(e.to_string().contains("defined twice"), "{e}");
    let e = err("apiVersion: trellis.dev/v1alpha1\nkind: Gizmo\nmetadata: { name: a }\nspec: {}\n");
    assert!(e.to_string().contains("unknown kind"), "{e}");
}

#[test]
fn precedence_exact_before_prefix() {
    let text = format!(
        "{EXAMPLE}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: r2, namespace: shop }}\nspec:\n  parentRefs: [{{ name: catalog }}]\n  rules:\n    - matches: [{{ path: {{ type: PathPrefix, value: /api }} }}, {{ path: {{ type: Exact, value: /api/x }} }}]\n      backendRefs: [{{ name: catalog-v2, port: 80 }}]\n"
    );
    let res = parse_documents("t.yaml", &text).unwrap();
    let cfg = translate("t.yaml", &res, None).unwrap();
    let routes = &cfg.services[&nn("shop/catalog")].ports[0].routes;
    assert!(matches!(
        routes[0].matches[0].path,
        Some(PathMatchConfig::Exact(_))
    ));
    assert!(matches!(&routes[1].matches[0].path, Some(PathMatchConfig::Prefix(p)) if p == "/api"));
}

const GRPC_BASE: &str = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: cat, namespace: shop }\nspec:\n  selector: { app: cat }\n  ports: [{ name: grpc, port: 80, targetPort: 9000, protocol: GRPC }]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: frontend-1, namespace: shop }\nspec: { address: 127.0.0.1 }\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: { name: g, namespace: shop }\nspec:\n  parentRefs: [{ name: cat, port: 80 }]\n  rules:\n";

#[test]
fn grpc_routes_become_path_matches() {
    let text = format!(
        "{GRPC_BASE}    - matches: [{{ method: {{ service: shop.Catalog, method: Get }} }}]\n    - matches: [{{ method: {{ service: shop.Catalog }} }}]\n    - matches: [{{ method: {{ method: List }} }}]\n    - matches: [{{ method: {{ type: RegularExpression, service: 'shop\\..*', method: 'Get.*' }}, headers: [{{ name: x-tenant, value: a }}] }}]\n"
    );
    let res = parse_documents("g.yaml", &text).unwrap();
    let cfg = translate("g.yaml", &res, Some(&nn("shop/frontend-1"))).unwrap();
    let routes = &cfg.services[&nn("shop/cat")].ports[0].routes;
    let paths: Vec<String> = routes
        .iter()
        .flat_map(|r| r.matches.iter())
        .map(|m| format!("{:?}", m.path))
        .collect();
    let all = paths.join(" ");
    assert!(all.contains("Exact(\"/shop.Catalog/Get\")"), "{all}");
    assert!(all.contains("Prefix(\"/shop.Catalog\")"), "{all}");
    assert!(all.contains("/[^/]+/List"), "{all}");
    assert!(all.contains("/(?:shop\\\\..*)/(?:Get.*)"), "{all}");
    // The exact method outranks the service prefix, which outranks the expressions.
    assert!(paths[0].contains("Exact"), "{paths:?}");
}

#[test]
fn bad_grpc_matches_name_the_field() {
    for (rule, field) in [
        (
            "{ method: { service: 'shop/Catalog' } }",
            "matches[0].method.service",
        ),
        (
            "{ method: { service: a, method: 'Get.Item' } }",
            "matches[0].method.method",
        ),
        (
            "{ method: { type: RegularExpression, method: '(' } }",
            "matches[0].method.method",
        ),
        ("{ method: {} }", "matches[0].method.service"),
    ] {
        let text = format!("{GRPC_BASE}    - matches: [{rule}]\n");
        let e = err(&text);
        let ConfigError::Invalid { line, field: f, .. } = &e else {
            panic!("{e}")
        };
        assert!(
            f.starts_with("GRPCRoute shop/g: spec.rules[0].") && f.ends_with(field),
            "{e}"
        );
        let kind_line = text.lines().position(|l| l == "kind: GRPCRoute").unwrap() as u64 + 1;
        assert_eq!(*line, kind_line, "{e}");
    }
}

#[test]
fn selectors_match_every_label_within_the_namespace() {
    let svc = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: api, namespace: a }\nspec:\n  selector: { app: api, track: stable }\n  ports: [{ port: 80 }]\n";
    let wl = |name: &str, ns: &str, labels: &str, ip: &str| {
        format!("---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: {ns}, labels: {{ {labels} }} }}\nspec:\n  address: {ip}\n")
    };
    let text = [
        svc.to_string(),
        wl(
            "z-both",
            "a",
            "app: api, track: stable, extra: x",
            "127.0.0.3",
        ),
        wl("b-both", "a", "app: api, track: stable", "127.0.0.2"),
        wl("only-app", "a", "app: api", "127.0.0.4"),
        wl("only-track", "a", "track: stable", "127.0.0.5"),
        wl("other-ns", "b", "app: api, track: stable", "127.0.0.6"),
        wl("wrong-value", "a", "app: api, track: canary", "127.0.0.7"),
    ]
    .concat();
    let res = parse_documents("t.yaml", &text).unwrap();
    let cfg = translate("t.yaml", &res, None).unwrap();
    let eps: Vec<String> = cfg.clusters["a/api:80"]
        .endpoints
        .iter()
        .map(|e| e.workload.to_string())
        .collect();
    assert_eq!(
        eps,
        ["a/b-both", "a/z-both"],
        "both labels, same namespace, in name order"
    );
}

const AUTHZ_MESH: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog, namespace: shop }
spec:
  selector: { app: catalog }
  ports: [{ name: http, port: 80 }, { name: db, port: 5432, protocol: TCP }]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: admin, namespace: ops }
spec:
  selector: { app: admin }
  ports: [{ port: 80 }]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: catalog-readers, namespace: shop }
spec:
  targetRefs: [{ name: catalog }]
  action: ALLOW
  rules:
    - from: [{ identities: [shop/frontend, "spiffe://trellis.local/ns/shop/sa/search"] }]
      to: [{ ports: [80], methods: [GET], paths: [{ prefix: /items }] }]
    - from: [{ namespaces: [batch] }]
      to: [{ ports: [5432] }]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: no-internal, namespace: shop }
spec:
  action: DENY
  rules:
    - to: [{ ports: [80], paths: [{ prefix: /internal }] }]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow-nothing, namespace: ops }
spec:
  action: ALLOW
"#;

#[test]
fn authorization_policies_allow_deny_matrix() {
    use crate::proxy::{authorize, AuthzRequest, PeerIdentity};
    let res = parse_documents("authz.yaml", AUTHZ_MESH).unwrap();
    let cfg = translate("authz.yaml", &res, None).unwrap();
    let peer = |ns: &str, name: &str| PeerIdentity {
        trust_domain: "trellis.local".into(),
        namespace: ns.into(),
        name: name.into(),
    };
    let (catalog, admin, other) = (nn("shop/catalog"), nn("ops/admin"), nn("shop/other"));
    let (frontend, search, cron, evil) = (
        peer("shop", "frontend"),
        peer("shop", "search"),
        peer("batch", "cron"),
        peer("shop", "evil"),
    );
    let foreign_search = PeerIdentity {
        trust_domain: "other.example".into(),
        ..search.clone()
    };
    let ask = |source: Option<&PeerIdentity>, service: &NamespacedName, port, http| {
        let d = authorize(
            &cfg.authz,
            &AuthzRequest {
                source,
                service,
                port,
                http,
            },
        );
        (d.allowed, d.policy.map(|p| p.to_string()))
    };
    let allow = |p: &str| (true, Some(p.to_string()));
    let no_allow = (false, None);
    let cases = [
        // (source, service, port, http) → (allowed, deciding policy)
        (
            ask(Some(&frontend), &catalog, 80, Some(("GET", "/items/7"))),
            allow("shop/catalog-readers"),
        ),
        (
            ask(Some(&search), &catalog, 80, Some(("GET", "/items"))),
            allow("shop/catalog-readers"),
        ),
        (
            ask(Some(&foreign_search), &catalog, 80, Some(("GET", "/items"))),
            no_allow.clone(),
        ),
        (
            ask(Some(&frontend), &catalog, 80, Some(("POST", "/items/7"))),
            no_allow.clone(),
        ),
        (
            ask(Some(&frontend), &catalog, 80, Some(("GET", "/itemsx"))),
            no_allow.clone(),
        ),
        (
            ask(Some(&evil), &catalog, 80, Some(("GET", "/items"))),
            no_allow.clone(),
        ),
        (
            ask(None, &catalog, 80, Some(("GET", "/items"))),
            no_allow.clone(),
        ),
        // DENY wins, even for an allowed caller; query strings do not hide a path.
        (
            ask(
                Some(&frontend),
                &catalog,
                80,
                Some(("GET", "/internal/x?a=b")),
            ),
            (false, Some("shop/no-internal".into())),
        ),
        // TCP: the namespace rule allows the database port; HTTP-only ALLOW rules never
        // match a connection, HTTP-only DENY rules always do (fail closed).
        (
            ask(Some(&cron), &catalog, 5432, None),
            allow("shop/catalog-readers"),
        ),
        (ask(Some(&evil), &catalog, 5432, None), no_allow.clone()),
        (
            ask(Some(&frontend), &catalog, 80, None),
            (false, Some("shop/no-internal".into())),
        ),
        // A namespace-wide ALLOW without rules: nothing is allowed there.
        (
            ask(Some(&frontend), &admin, 80, Some(("GET", "/"))),
            no_allow.clone(),
        ),
        // No ALLOW policy guards shop/other: allowed unless denied.
        (ask(None, &other, 80, Some(("GET", "/"))), (true, None)),
        (
            ask(None, &other, 80, Some(("GET", "/internal"))),
            (false, Some("shop/no-internal".into())),
        ),
    ];
    for (i, (got, want)) in cases.iter().enumerate() {
        assert_eq!(got, want, "case {i}");
    }
}

/// The error translating `text` (which must parse).
fn authz_error(text: &str) -> String {
    let res = parse_documents("authz.yaml", text).unwrap();
    translate("authz.yaml", &res, None).unwrap_err().to_string()
}

#[test]
fn authorization_policy_errors_name_line_and_field() {
    let bad = AUTHZ_MESH.replace("shop/frontend,", "frontend,");
    let e = authz_error(&bad);
    assert!(
        e.contains("authz.yaml:") && e.contains("identities[0]"),
        "{e}"
    );
    let line: u64 = e.split(':').nth(1).unwrap().parse().unwrap();
    assert!(
        bad.lines()
            .nth(line as usize - 1)
            .unwrap()
            .contains("frontend"),
        "{e}"
    );
    let bad = AUTHZ_MESH.replace("methods: [GET]", "methods: [get]");
    let e = authz_error(&bad);
    assert!(e.contains("methods") && e.contains("\"get\""), "{e}");
    let bad = AUTHZ_MESH.replace(
        "targetRefs: [{ name: catalog }]",
        "targetRefs: [{ name: katalog }]",
    );
    let e = authz_error(&bad);
    assert!(
        e.contains("targetRefs[0].name") && e.contains("shop/katalog not found"),
        "{e}"
    );
    let bad = AUTHZ_MESH.replace("action: DENY", "action: REJECT");
    assert!(parse_documents("authz.yaml", &bad).is_err());
}

const MTLS_MESH: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: a, namespace: shop }
spec: { selector: { app: a }, ports: [{ name: http, port: 80, targetPort: 8080 }] }
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: b, namespace: shop }
spec: { selector: { app: b }, ports: [{ name: http, port: 80, targetPort: 8080 }] }
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: c, namespace: other }
spec: { selector: { app: c }, ports: [{ name: tcp, port: 5432, protocol: TCP }] }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: a-1, namespace: shop, labels: { app: a } }
spec: { address: 10.0.0.1, identity: alpha, inboundPort: 16006 }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: b-1, namespace: shop, labels: { app: b } }
spec: { address: 10.0.0.2, identity: beta }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: c-1, namespace: other, labels: { app: c } }
spec: { address: 10.0.0.3 }
"#;

fn mtls_modes(extra: &str) -> Vec<(String, MtlsMode)> {
    let text = format!("{MTLS_MESH}{extra}");
    let res = parse_documents("t.yaml", &text).unwrap();
    let cfg = translate("t.yaml", &res, Some(&nn("shop/a-1"))).unwrap();
    let mut v: Vec<_> = cfg
        .clusters
        .iter()
        .map(|(k, c)| (k.clone(), c.mtls))
        .collect();
    v.sort();
    v
}

#[test]
fn workloads_with_an_identity_are_reached_at_their_proxy() {
    let res = parse_documents("t.yaml", MTLS_MESH).unwrap();
    let cfg = translate("t.yaml", &res, Some(&nn("shop/a-1"))).unwrap();
    let a = &cfg.clusters["shop/a:80"].endpoints[0];
    assert_eq!(a.addr, "10.0.0.1:8080".parse().unwrap(), "the application");
    let m = a.mesh.as_ref().expect("meshed");
    assert_eq!(
        m.inbound,
        "10.0.0.1:16006".parse().unwrap(),
        "spec.inboundPort"
    );
    assert_eq!(m.identity, nn("shop/alpha"));
    let b = &cfg.clusters["shop/b:80"].endpoints[0];
    assert_eq!(
        b.mesh.as_ref().unwrap().inbound.port(),
        15006,
        "the default"
    );
    assert!(
        cfg.clusters["other/c:5432"].endpoints[0].mesh.is_none(),
        "no identity: no proxy"
    );
}

#[test]
fn peer_authentication_most_specific_wins_and_strict_by_default() {
    use MtlsMode::{Permissive as P, Strict as S};
    let pa = |ns: &str, name: &str, targets: &str, mode: &str| {
        format!("---\napiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec:\n  targetRefs: [{targets}]\n  mtls: {{ mode: {mode} }}\n")
    };
    let all = |m| {
        vec![
            ("other/c:5432".to_string(), m),
            ("shop/a:80".to_string(), m),
            ("shop/b:80".to_string(), m),
        ]
    };
    assert_eq!(mtls_modes(""), all(S), "no policy: STRICT");
    let mesh = pa("trellis-system", "m", "", "PERMISSIVE");
    assert_eq!(mtls_modes(&mesh), all(P), "mesh-wide");
    let shop = pa("shop", "s", "", "STRICT");
    assert_eq!(
        mtls_modes(&format!("{mesh}{shop}")),
        vec![
            ("other/c:5432".to_string(), P),
            ("shop/a:80".to_string(), S),
            ("shop/b:80".to_string(), S)
        ],
        "the namespace over the mesh"
    );
    let b = pa("shop", "b", "{ name: b }", "PERMISSIVE");
    let m = mtls_modes(&format!("{mesh}{shop}{b}"));
    assert_eq!(
        m[2],
        ("shop/b:80".to_string(), P),
        "the service over its namespace"
    );
    assert_eq!(m[1], ("shop/a:80".to_string(), S));
    // At one level, STRICT wins whatever the order.
    let b2 = pa("shop", "b2", "{ name: b }", "STRICT");
    assert_eq!(mtls_modes(&format!("{b}{b2}"))[2].1, S);
    assert_eq!(mtls_modes(&format!("{b2}{b}"))[2].1, S);
    // The local workload's inbound ports carry the mode of their service.
    let text = format!("{MTLS_MESH}{b}");
    let res = parse_documents("t.yaml", &text).unwrap();
    let cfg = translate("t.yaml", &res, Some(&nn("shop/b-1"))).unwrap();
    assert_eq!(cfg.local.unwrap().inbound_ports[0].mtls, P);
}

#[test]
fn peer_authentication_errors_name_line_and_field() {
    let bad = "---\napiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: x, namespace: shop }\nspec:\n  targetRefs: [{ name: nope }]\n  mtls: { mode: STRICT }\n";
    let text = format!("{MTLS_MESH}{bad}");
    let res = parse_documents("t.yaml", &text).unwrap();
    let e = translate("t.yaml", &res, None).unwrap_err().to_string();
    assert!(
        e.contains("PeerAuthentication shop/x: spec.targetRefs[0].name"),
        "{e}"
    );
    assert!(e.contains("Service shop/nope not found"), "{e}");
    let lines = text.lines().count();
    assert!(e.starts_with(&format!("t.yaml:{}:", lines - 1)), "{e}");
    let typo = "apiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: x }\nspec:\n  mtls: { mode: strict }\n";
    let e = parse_documents("t.yaml", typo).unwrap_err().to_string();
    assert!(e.starts_with("t.yaml:5:"), "{e}");
    assert!(e.contains("STRICT"), "{e}");
}

#[test]
fn spillover_policies_reach_the_clusters_and_bad_ones_are_named() {
    let base = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: web, namespace: shop }\nspec: { selector: { app: web }, ports: [{ port: 80 }] }\n---\napiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: { name: web, namespace: shop }\nspec:\n  targetRefs: [{ name: web }]\n";
    let case = |spill: &str| err(&format!("{base}  spillover: {spill}\n")).to_string();
    let e = case("{ pools: [] }");
    assert!(
        e.contains("spec.spillover.pools") && e.contains("from 1 to 8"),
        "{e}"
    );
    let e = case("{ pools: [{}] }");
    assert!(e.contains("spec.spillover.pools[0]"), "{e}");
    let e = case("{ pools: [{ environment: vm }], lowLoad: 80 }");
    assert!(
        e.contains("spec.spillover.lowLoad") && e.contains("below highLoad"),
        "{e}"
    );
    let e = case("{ pools: [{ environment: vm }], highLoad: 150 }");
    assert!(e.contains("spec.spillover.highLoad"), "{e}");
    let e = case("{ pools: [{ environment: vm }], hold: 500ms }");
    assert!(e.contains("spec.spillover.hold"), "{e}");
    let e = case("{ pools: [{ environment: moon }] }");
    assert!(e.contains("moon"), "{e}");
    // The line is the policy's.
    assert!(e.starts_with("t.yaml:"), "{e}");
    let text = format!(
        "{base}  spillover: {{ pools: [{{ environment: vm, zone: z1 }}, {{ environment: container }}], highLoad: 70 }}\n"
    );
    let res = parse_documents("t.yaml", &text).unwrap();
    let cfg = translate("t.yaml", &res, None).unwrap();
    let sp = cfg.clusters["shop/web:80"]
        .policy
        .spillover
        .clone()
        .unwrap();
    assert_eq!((sp.high, sp.low, sp.hold), (70, 50, Duration::from_secs(3)));
    assert_eq!(sp.pool_name(0), "vm z1");
    assert_eq!(sp.pool_name(2), "other");
    use crate::resource::{Environment, Locality};
    let (vm, ct) = (Environment::Vm, Environment::Container);
    let z1 = Locality {
        zone: Some("z1".into()),
        ..Default::default()
    };
    assert_eq!(sp.pool_of(vm, &z1), 0);
    assert_eq!(sp.pool_of(vm, &Locality::default()), 2);
    assert_eq!(sp.pool_of(ct, &Locality::default()), 1);
}

#[test]
fn locality_policies_are_checked_by_field() {
    let base = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: web, namespace: shop }\nspec: { selector: { app: web }, ports: [{ port: 80 }] }\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: frontend-1, namespace: shop }\nspec: { address: 127.0.0.1, locality: { region: r1, zone: z1 } }\n---\napiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: { name: web, namespace: shop }\nspec:\n  targetRefs: [{ name: web }]\n";
    let case = |locality: &str| err(&format!("{base}  locality: {locality}\n")).to_string();
    let e = case("{ overprovisioningFactor: 50 }");
    assert!(e.contains("spec.locality.overprovisioningFactor"), "{e}");
    let e = case("{ mode: Weighted }");
    assert!(
        e.contains("spec.locality.weights") && e.contains("needs weights"),
        "{e}"
    );
    let e = case("{ mode: Weighted, weights: [{ weight: 1 }] }");
    assert!(e.contains("spec.locality.weights[0]"), "{e}");
    let e = case("{ weights: [{ region: r1, weight: 1 }] }");
    assert!(e.contains("only to mode Weighted"), "{e}");
    let e = case("{ mode: Nearest }");
    assert!(e.contains("Nearest"), "{e}");
    // A good one, and the caller's locality reaches the local workload.
    let text =
        format!("{base}  locality: {{ mode: Weighted, weights: [{{ region: r1, weight: 3 }}] }}\n");
    let res = parse_documents("t.yaml", &text).unwrap();
    let cfg = translate("t.yaml", &res, Some(&nn("shop/frontend-1"))).unwrap();
    assert_eq!(
        cfg.clusters["shop/web:80"].policy.locality.weights[0].weight,
        3
    );
    assert_eq!(cfg.local.unwrap().locality.zone.as_deref(), Some("z1"));
}

/// Workload documents for `update_workloads`: `(name, labels, extra spec)`.
fn workload_doc(name: &str, labels: &str, spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: shop, labels: {{ {labels} }} }}\nspec: {{ address: 10.0.0.{}, environment: vm{spec} }}\n",
        name.len()
    )
}

#[test]
fn an_endpoint_update_gives_what_a_full_translation_gives() {
    let base = EXAMPLE.to_string();
    let frontend = nn("shop/frontend-1");
    let before_docs = [
        base.clone(),
        workload_doc("extra-a", "app: catalog, version: v1", ""),
        workload_doc("extra-b", "app: catalog, version: v2", ", weight: 3"),
    ]
    .join("---\n");
    // Each change touches Workloads only: health, labels that move it between versions, a
    // new one, a removed one, weight, recoveries.
    let changes: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["extra-a"],
            vec![workload_doc(
                "extra-a",
                "app: catalog, version: v1",
                ", healthy: false",
            )],
        ),
        (
            vec!["extra-a"],
            vec![workload_doc("extra-a", "app: catalog, version: v2", "")],
        ),
        (
            vec!["extra-c"],
            vec![workload_doc("extra-c", "app: catalog, version: v1", "")],
        ),
        (vec!["extra-b"], vec![]),
        (
            vec!["extra-b"],
            vec![workload_doc(
                "extra-b",
                "app: catalog, version: v2",
                ", weight: 7",
            )],
        ),
        (
            vec!["extra-a"],
            vec![workload_doc(
                "extra-a",
                "app: catalog, version: v1",
                ", healthRecoveries: 2",
            )],
        ),
        (
            vec!["extra-a", "extra-b"],
            vec![workload_doc("extra-a", "app: other", "")],
        ),
    ];
    let before_res = parse_documents("b.yaml", &before_docs).unwrap();
    let before = translate("b.yaml", &before_res, Some(&frontend)).unwrap();
    for (names, new_docs) in changes {
        let changed: HashSet<NamespacedName> =
            names.iter().map(|n| nn(&format!("shop/{n}"))).collect();
        let mut after_res: Vec<Resource> = before_res
            .iter()
            .filter(|r| !(r.kind() == "Workload" && changed.contains(&r.id())))
            .cloned()
            .collect();
        for d in &new_docs {
            after_res.extend(parse_documents("c.yaml", d).unwrap());
        }
        let full = translate("a.yaml", &after_res, Some(&frontend)).unwrap();
        let (quick, redone) = update_workloads("a.yaml", &before, &after_res, &changed).unwrap();
        let json = |c: &ProxyConfig| serde_json::to_value(&c.clusters).unwrap();
        assert_eq!(json(&quick), json(&full), "{names:?}");
        // Only what could change was worked out again; the rest is shared.
        for (k, c) in &quick.clusters {
            if !redone.contains(k) {
                assert!(Arc::ptr_eq(c, &before.clusters[k]), "{k} shared");
            }
        }
        assert!(
            !redone.is_empty() || names == ["extra-c"],
            "{names:?}: {redone:?}"
        );
    }
    // A change that makes a workload invalid is refused like a translation would refuse it.
    let changed: HashSet<NamespacedName> = [nn("shop/extra-a")].into();
    let mut bad = before_res.clone();
    bad.retain(|r| r.id() != nn("shop/extra-a"));
    bad.extend(
        parse_documents(
            "c.yaml",
            &workload_doc("extra-a", "app: catalog, version: v1", ", weight: 0"),
        )
        .unwrap(),
    );
    let e = update_workloads("a.yaml", &before, &bad, &changed).unwrap_err();
    assert!(e.to_string().contains("spec.weight"), "{e}");
    // So is a second document of the same Workload (found looking for an xds_update fuzz
    // crash that did not come again: the endpoint update took both as endpoints).
    let mut twice = before_res.clone();
    twice.extend(
        parse_documents(
            "c.yaml",
            &workload_doc("extra-a", "app: catalog, version: v1", ""),
        )
        .unwrap(),
    );
    assert!(translate("a.yaml", &twice, Some(&frontend)).is_err());
    let e = update_workloads("a.yaml", &before, &twice, &changed).unwrap_err();
    assert!(e.to_string().contains("defined twice"), "{e}");
}

#[test]
fn a_services_trace_sampling_is_a_percentage() {
    let svc = |p: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: a, namespace: shop }}\nspec:\n  selector: {{ app: a }}\n  ports: [{{ port: 80 }}]\n  tracing:\n    samplingPercent: {p}\n")
    };
    let res = parse_documents("t.yaml", &svc("2.5")).unwrap();
    let cfg = translate("t.yaml", &res, None).unwrap();
    assert_eq!(cfg.services[&nn("shop/a")].trace_sampling, Some(0.025));
    for bad in ["150", "-1", "often"] {
        let e = err(&svc(bad)).to_string();
        assert!(e.starts_with("t.yaml:8:"), "{bad}: {e}");
        assert!(e.contains("samplingPercent"), "{bad}: {e}");
    }
}

const RATE_LIMIT: &str = "apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: { name: busy, namespace: shop }
spec:
  targetRefs: [{ name: catalog }]
  perCaller: [{ requests: 5, per: 1m }, { requests: 1, per: 1s, burst: 2 }]
  total: [{ requests: 100, per: 1s }]
  overrides: [{ identity: shop/reports, perCaller: [{ requests: 50, per: 1m }] }]
";

#[test]
fn a_rate_limit_policy_reaches_its_services_inbound_and_bad_ones_are_named() {
    // On the workload's inbound port of the service it targets, filled in.
    let text = format!("{EXAMPLE}---\n{RATE_LIMIT}");
    let res = parse_documents("rl.yaml", &text).unwrap();
    let cfg = translate("rl.yaml", &res, Some(&nn("shop/catalog-vm-1"))).unwrap();
    let local = cfg.local.expect("a local workload");
    let rl = local
        .inbound_ports
        .iter()
        .find_map(|p| p.rate_limits.first().cloned());
    // catalog-vm-1 is selected by catalog (and catalog-v1): the policy is on catalog's port.
    let rl = rl.expect("the policy on the inbound port");
    assert_eq!(rl.policy, "shop/busy");
    assert_eq!(rl.per_caller.len(), 2);
    assert_eq!(rl.per_caller[0].burst, 5, "burst defaults to requests");
    assert_eq!(rl.per_caller[1].burst, 2);
    assert_eq!(rl.overrides["shop/reports"][0].requests, 50);
    assert!(!rl.shadow);
    assert!(rl.matches.is_empty() && rl.route.is_none(), "every request");
    // A policy on a route: first, with the route's matches, on the workloads of its parent
    // and its backends; the service's policy after it.
    let on_route = "apiVersion: trellis.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: { name: a-route, namespace: shop }\nspec:\n  targetRefs: [{ kind: HTTPRoute, name: catalog }]\n  total: [{ requests: 7, per: 1s }]\n";
    let text = format!("{EXAMPLE}---\n{RATE_LIMIT}---\n{on_route}");
    let res = parse_documents("rl.yaml", &text).unwrap();
    assert!(crate::refs::resolve(&res).is_empty());
    let cfg = translate("rl.yaml", &res, Some(&nn("shop/catalog-vm-1"))).unwrap();
    let ports = &cfg.local.unwrap().inbound_ports;
    let catalog = ports
        .iter()
        .find(|p| p.service == nn("shop/catalog"))
        .unwrap();
    let names: Vec<&str> = catalog
        .rate_limits
        .iter()
        .map(|l| l.policy.as_str())
        .collect();
    assert_eq!(names, ["shop/a-route", "shop/busy"]);
    let r = &catalog.rate_limits[0];
    assert_eq!(r.route.as_deref(), Some("shop/catalog"));
    assert_eq!(r.matches.len(), 1);
    assert!(
        matches!(&r.matches[0].path, Some(crate::proxy::PathMatchConfig::Prefix(p)) if p == "/" || p.is_empty())
    );
    // catalog-v1, a backend of the route: the route's policy alone.
    let v1 = ports
        .iter()
        .find(|p| p.service == nn("shop/catalog-v1"))
        .unwrap();
    let names: Vec<&str> = v1.rate_limits.iter().map(|l| l.policy.as_str()).collect();
    assert_eq!(names, ["shop/a-route"]);
    // A route that does not exist is an unresolved reference.
    let missing = on_route.replace("name: catalog }", "name: nope }");
    let res = parse_documents("rl.yaml", &format!("{EXAMPLE}---\n{missing}")).unwrap();
    let u = crate::refs::resolve(&res);
    assert!(
        u.iter()
            .any(|u| u.message.contains("HTTPRoute shop/nope not found")),
        "{u:?}"
    );
    // Refused whole, naming the file, line and field.
    for (from, to, field) in [
        (
            "requests: 5, per: 1m",
            "requests: 0, per: 1m",
            "spec.perCaller[0].requests",
        ),
        (
            "requests: 100, per: 1s",
            "requests: 100, per: 2h",
            "spec.total[0].per",
        ),
        (
            "identity: shop/reports",
            "identity: reports",
            "spec.overrides[0].identity",
        ),
        (
            "{ requests: 1, per: 1s, burst: 2 }",
            "{ requests: 1, per: 1m }",
            "spec.perCaller[1].per",
        ),
    ] {
        let bad = RATE_LIMIT.replace(from, to);
        let res =
            parse_documents("rl.yaml", &bad).and_then(|r| translate("rl.yaml", &r, None).map(drop));
        let e = res.unwrap_err().to_string();
        assert!(e.contains("rl.yaml:") && e.contains(field), "{field}: {e}");
    }
}

#[test]
fn fault_filters_translate_in_order_and_bad_ones_name_their_field() {
    let mesh = |fault: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: a, namespace: shop }}\nspec:\n  ports: [{{ port: 80 }}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: r, namespace: shop }}\nspec:\n  parentRefs: [{{ name: a, port: 80 }}]\n  rules:\n    - backendRefs: [{{ name: a, port: 80 }}]\n      filters:\n        - type: trellis.dev/Fault\n          fault:\n{fault}")
    };
    let ok = mesh("            - delay: { percent: 12.5, duration: 20ms }\n            - abort: { percent: 1, grpcStatus: 8 }\n");
    let res = parse_documents("t.yaml", &ok).unwrap();
    let cfg = translate("t.yaml", &res, None).unwrap();
    let r = &cfg.services[&nn("shop/a")].ports[0].routes[0];
    assert_eq!(
        r.faults,
        [
            crate::proxy::FaultConfig::Delay {
                per_million: 125_000,
                duration: Duration::from_millis(20)
            },
            crate::proxy::FaultConfig::Abort {
                per_million: 10_000,
                status: 503,
                grpc_status: 8
            }
        ]
    );
    for (fault, field, why) in [
        (
            "            - abort: { percent: 150 }\n",
            "spec.rules[0].filters[0].fault[0].abort.percent",
            "from 0 to 100",
        ),
        (
            "            - delay: { percent: 5, duration: 1s }\n              abort: { percent: 5 }\n",
            "spec.rules[0].filters[0].fault[0]",
            "either delay or abort",
        ),
        (
            "            - abort: { percent: 5, httpStatus: 99 }\n",
            "spec.rules[0].filters[0].fault[0].abort.httpStatus",
            "from 200 to 599",
        ),
    ] {
        let e = err(&mesh(fault)).to_string();
        assert!(e.contains(&format!("HTTPRoute shop/r: {field}")), "{e}");
        assert!(e.contains(why), "{e}");
    }
    let e = err(&mesh("            - drop: { percent: 5 }\n")).to_string();
    assert!(e.contains("unknown field `drop`"), "{e}");
}

#[test]
fn mirrors_take_percent_or_fraction_and_name_their_field() {
    let mesh = |mirror: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: a, namespace: shop }}\nspec:\n  ports: [{{ port: 80 }}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: b, namespace: shop }}\nspec:\n  ports: [{{ port: 80 }}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: r, namespace: shop }}\nspec:\n  parentRefs: [{{ name: a, port: 80 }}]\n  rules:\n    - backendRefs: [{{ name: a, port: 80 }}]\n      filters:\n        - type: RequestMirror\n          requestMirror:\n{mirror}")
    };
    let per_million = |m: &str| {
        let res = parse_documents("t.yaml", &mesh(m)).unwrap();
        let cfg = translate("t.yaml", &res, None).unwrap();
        let r = &cfg.services[&nn("shop/a")].ports[0].routes[0];
        assert_eq!(r.mirrors[0].cluster, "shop/b:80");
        r.mirrors[0].per_million
    };
    let to_b = "            backendRef: { name: b, port: 80 }\n";
    assert_eq!(
        per_million(&format!("{to_b}            percent: 10\n")),
        100_000
    );
    assert_eq!(
        per_million(&format!(
            "{to_b}            fraction: {{ numerator: 1, denominator: 3 }}\n"
        )),
        333_333
    );
    assert_eq!(
        per_million(&format!("{to_b}            fraction: {{ numerator: 5 }}\n")),
        50_000
    );
    assert_eq!(per_million(to_b), 1_000_000);
    for (m, field, why) in [
        (
            format!("{to_b}            fraction: {{ numerator: 3, denominator: 2 }}\n"),
            "requestMirror.fraction",
            "numerator",
        ),
        (
            format!("{to_b}            percent: 101\n"),
            "requestMirror.percent",
            "from 0 to 100",
        ),
        (
            "            backendRef: { name: c, port: 80 }\n".to_string(),
            "requestMirror.backendRef.name",
            "Service shop/c not found",
        ),
    ] {
        let e = err(&mesh(&m)).to_string();
        assert!(
            e.contains(&format!(
                "HTTPRoute shop/r: spec.rules[0].filters[0].{field}"
            )),
            "{e}"
        );
        assert!(e.contains(why), "{e}");
    }
}

#[test]
fn a_rollouts_dark_stage_copies_from_1_to_100_percent() {
    let rollout = |mirror: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Rollout\nmetadata: {{ name: catalog, namespace: shop }}\nspec:\n  service: catalog\n  stable: catalog-v1\n  canary: catalog-v2\n{mirror}")
    };
    let check = |text: &str| {
        let r = parse_documents("t.yaml", text).unwrap();
        check_standalone("t.yaml", &r[0])
    };
    assert!(check(&rollout("")).is_ok());
    assert!(check(&rollout("  mirror: { percent: 10 }\n")).is_ok());
    for bad in [0, 101] {
        let e = check(&rollout(&format!("  mirror: {{ percent: {bad} }}\n")))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t.yaml:2:")
                && e.contains("spec.mirror.percent")
                && e.contains("from 1 to 100"),
            "{e}"
        );
    }
    // Only `percent`: a misspelt field is refused where it stands.
    let e = parse_documents("t.yaml", &rollout("  mirror: { precent: 10 }\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("precent"), "{e}");
}

/// A backend the control plane marked `unresolved` becomes a backend the proxy answers for
/// (its weight kept, its reason carried), where an unmarked missing one refuses the file;
/// the marker in an applied document is refused, with its line and field.
#[test]
fn a_backend_marked_unresolved_keeps_its_weight_and_is_refused_in_an_apply() {
    let route = |marker: &str| {
        format!(
            "{EXAMPLE}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: r2, namespace: shop }}\nspec:\n  parentRefs: [{{ name: catalog }}]\n  rules:\n    - matches: [{{ path: {{ type: PathPrefix, value: /two }} }}]\n      backendRefs:\n        - {{ name: catalog-v1, port: 80, weight: 3 }}\n        - name: nope\n          port: 80\n          {marker}\n"
        )
    };
    let text = route("unresolved: Service shop/nope not found");
    let res = parse_documents("t.yaml", &text).unwrap();
    let cfg = translate("t.yaml", &res, Some(&nn("shop/frontend-1"))).unwrap();
    let rule = cfg.services[&nn("shop/catalog")].ports[0]
        .routes
        .iter()
        .find(|r| r.name.contains("r2"))
        .expect("the route is served");
    let got: Vec<_> = rule
        .backends
        .iter()
        .map(|b| (b.cluster.as_str(), b.weight, b.unresolved.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("shop/catalog-v1:80", 3, None),
            ("shop/nope:80", 1, Some("Service shop/nope not found")),
        ]
    );
    assert!(!cfg.clusters.contains_key("shop/nope:80"));
    // Without the marker the same file is refused.
    assert!(err(&route("weight: 1"))
        .to_string()
        .contains("Service shop/nope not found"));
    // An apply checks each document alone first: the marker is the control plane's.
    let r2 = res.iter().find(|r| r.metadata.name == "r2").unwrap();
    let e = check_standalone("t.yaml", r2).unwrap_err().to_string();
    let line = text.lines().position(|l| l.contains("name: nope")).unwrap() + 1;
    assert!(
        e.starts_with(&format!("t.yaml:{line}:"))
            && e.contains("HTTPRoute shop/r2: spec.rules[0].backendRefs[1].unresolved"),
        "{e}"
    );
}
