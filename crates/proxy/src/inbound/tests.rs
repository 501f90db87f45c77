use trellis_model::proxy::PeerIdentity;

use super::PeerId;
use crate::labels::Label;

fn caller(namespace: &str) -> PeerId {
    let id = PeerIdentity {
        trust_domain: "trellis.local".into(),
        namespace: namespace.into(),
        name: "orders".into(),
    };
    PeerId::new(
        Some(5432),
        id,
        Label::from("spiffe://trellis.local/ns/shop/sa/orders"),
    )
}

/// A caller's own workload, in its certificate's namespace, is recorded; a workload of
/// another namespace is a claim the certificate does not back, and nothing of it is.
#[test]
fn a_caller_is_believed_only_for_its_certificates_namespace() {
    let p = caller("shop");
    let s = p.source(b"orders.shop,shop/orders-1,vm,eu/eu-1a");
    assert_eq!(s.workload.as_str(), "shop/orders-1");
    assert_eq!(s.service.as_str(), "orders.shop");
    assert_eq!(s.environment.as_str(), "vm");
    assert_eq!(s.locality.as_str(), "eu/eu-1a");
    // The same connection claiming another namespace's workload (the value changed).
    let none = Label::default();
    let s = p.source(b"pay.bank,bank/pay-1,vm,eu/eu-1a");
    assert_eq!(s.workload.as_str(), none.as_str());
    assert_eq!(s.service.as_str(), none.as_str());
    assert_eq!(s.environment.as_str(), none.as_str());
    // No namespace at all is no backed claim either.
    let s = caller("shop").source(b"orders.shop,orders-1,vm,/");
    assert_eq!(s.workload.as_str(), none.as_str());
}

/// The value is read as the head's bytes (`codec::PeerValue`), not as a checked header
/// value: one that is not all visible ASCII (UTF-8 text here, which `str` would take) names
/// nobody, as `HeaderValue::to_str` had it; the next request's plain value is read again.
#[test]
fn a_value_that_is_not_visible_ascii_names_nobody() {
    let p = caller("shop");
    let s = p.source("orders.shop,shop/orders-1,vé,eu/eu-1a".as_bytes());
    assert_eq!(s.workload.as_str(), Label::default().as_str());
    assert_eq!(s.environment.as_str(), Label::default().as_str());
    let s = p.source(b"orders.shop,shop/orders-1,vm,eu/eu-1a");
    assert_eq!(s.workload.as_str(), "shop/orders-1");
}
