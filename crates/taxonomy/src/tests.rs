use super::*;

#[test]
fn names_round_trip_and_are_unique() {
    let mut seen = std::collections::HashSet::new();
    for c in FailureClass::ALL {
        assert!(seen.insert(c.as_str()), "{c} twice");
        assert_eq!(c.as_str().parse::<FailureClass>(), Ok(c));
        assert_eq!(FailureClass::from_bytes(c.as_str().as_bytes()), Some(c));
        // serde uses the same names (the control plane reads them from reports).
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, format!("\"{}\"", c.as_str()));
        assert_eq!(serde_json::from_str::<FailureClass>(&json).unwrap(), c);
    }
    assert!("app-error".parse::<FailureClass>().is_err());
    assert_eq!(FailureClass::from_bytes(b""), None);
}

#[test]
fn categories_and_sides_follow_the_design() {
    use FailureClass as F;
    assert_eq!(F::Ok.category(), Category::Ok);
    assert_eq!(F::Ok.side(), None);
    for c in [F::AppError, F::AppGrpcError] {
        assert_eq!(c.category(), Category::Application);
        assert_eq!(c.side(), Some(Side::Upstream));
    }
    for c in [
        F::ConnectRefused,
        F::ConnectTimeout,
        F::ConnectionReset,
        F::TlsError,
        F::NoHealthyUpstream,
        F::UpstreamTimeout,
        F::ProtocolError,
    ] {
        assert_eq!(c.category(), Category::Network, "{c}");
    }
    for c in [F::Overloaded, F::Denied, F::NoRoute] {
        assert_eq!(c.category(), Category::Policy, "{c}");
        assert_eq!(c.side(), Some(Side::Proxy));
    }
    for c in [F::ClientError, F::ClientDisconnect] {
        assert_eq!(c.category(), Category::Client, "{c}");
        assert_eq!(c.side(), Some(Side::Downstream));
    }
}

#[test]
fn statuses_of_proxy_made_responses() {
    use FailureClass as F;
    assert_eq!(F::ConnectRefused.status(), 502);
    assert_eq!(F::NoHealthyUpstream.status(), 503);
    assert_eq!(F::Overloaded.status(), 503);
    assert_eq!(F::UpstreamTimeout.status(), 504);
    assert_eq!(F::Denied.status(), 403);
    assert_eq!(F::NoRoute.status(), 404);
    assert_eq!(F::UpstreamTimeout.grpc_status(), 4);
    assert_eq!(F::Denied.grpc_status(), 7);
    assert_eq!(F::from_status(503), F::AppError);
    assert_eq!(F::from_status(404), F::ClientError);
    assert_eq!(F::from_status(204), F::Ok);
    assert_eq!(F::from_grpc(14), F::AppGrpcError);
    assert_eq!(F::from_grpc(5), F::ClientError);
    assert!(F::ConnectRefused.retriable() && !F::NoHealthyUpstream.retriable());
    assert!(!F::AppError.retriable() && !F::Denied.retriable());
}
