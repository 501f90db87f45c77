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
