use trellis_model::proxy::PeerIdentity;

use super::*;
use crate::{error::FailureClass, test_util::snapshot};

const MESH: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  selector: { app: db }
  ports:
    - { name: http, port: 80, targetPort: 8080, protocol: HTTP }
    - { name: sql, port: 5432, protocol: TCP }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: db-1, namespace: shop, labels: { app: db } }
spec: { address: 127.0.0.1, environment: vm, identity: db }
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: readers, namespace: shop }
spec:
  targetRefs: [{ name: db }]
  action: ALLOW
  rules:
    - from: [{ identities: [shop/api] }]
      to: [{ ports: [80], methods: [GET] }]
    - from: [{ identities: [shop/batch] }]
      to: [{ ports: [5432] }]
"#;

fn peer(name: &str) -> PeerIdentity {
    PeerIdentity {
        trust_domain: "trellis.local".into(),
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn verdict(
    snap: &Snapshot,
    port: u16,
    source: Option<&PeerIdentity>,
    http: Option<(&str, &str)>,
    strict: bool,
) -> Result<(), FailureClass> {
    let target = snap.inbound.iter().find(|t| t.port == port).unwrap();
    admit(snap, target, Inbound { source, http }, strict).map_err(|e| e.class())
}

#[test]
fn one_check_for_http_connect_and_tcp() {
    let snap = snapshot(MESH, Some("shop/db-1"));
    let (api, batch) = (peer("api"), peer("batch"));
    // HTTP: method and path count.
    assert_eq!(
        verdict(&snap, 80, Some(&api), Some(("GET", "/x")), true),
        Ok(())
    );
    assert_eq!(
        verdict(&snap, 80, Some(&api), Some(("POST", "/x")), true),
        Err(FailureClass::Denied)
    );
    // A CONNECT tunnel and a TCP stream are both checked as TCP (no method, no path): the
    // rule that names a method cannot allow them.
    assert_eq!(
        verdict(&snap, 80, Some(&api), None, true),
        Err(FailureClass::Denied)
    );
    assert_eq!(verdict(&snap, 5432, Some(&batch), None, true), Ok(()));
    assert_eq!(
        verdict(&snap, 5432, Some(&api), None, true),
        Err(FailureClass::Denied)
    );
}

#[test]
fn plaintext_is_refused_before_policy_under_strict() {
    let snap = snapshot(MESH, Some("shop/db-1"));
    let target = snap.inbound.iter().find(|t| t.port == 80).unwrap();
    let e = admit(
        &snap,
        target,
        Inbound {
            source: None,
            http: Some(("GET", "/")),
        },
        true,
    )
    .unwrap_err();
    assert_eq!(e.kind(), Kind::PlaintextRefused);
    assert_eq!(e.class(), FailureClass::Denied);
    assert!(e.to_string().contains("shop/db requires mutual TLS"), "{e}");
    // PERMISSIVE: the plaintext caller has no identity, so the identity rules deny it.
    let e = admit(
        &snap,
        target,
        Inbound {
            source: None,
            http: Some(("GET", "/")),
        },
        false,
    )
    .unwrap_err();
    assert_eq!(e.kind(), Kind::Denied);
    assert!(
        e.to_string().contains("no AuthorizationPolicy allows"),
        "{e}"
    );
}

#[test]
fn strict_follows_the_service_unless_the_flag_overrides_it() {
    let snap = snapshot(MESH, Some("shop/db-1"));
    let target = &snap.inbound[0];
    assert!(strict(true, None, target), "STRICT by default");
    assert!(
        !strict(false, None, target),
        "a proxy without identity cannot require mTLS"
    );
    assert!(!strict(true, Some(MtlsMode::Permissive), target));
}
