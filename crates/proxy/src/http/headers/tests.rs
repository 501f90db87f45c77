use super::*;

fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

fn names(h: &HeaderMap) -> Vec<&str> {
    let mut v: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    v.sort_unstable();
    v
}

#[test]
fn hop_by_hop_index_agrees_with_the_list() {
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        assert_eq!(hop_by_hop_index(n.as_str()), Some(i), "{n}");
    }
    assert_eq!(hop_by_hop_index("content-length"), None);
    assert_eq!(hop_by_hop_index("x-trellis-failure"), Some(FAILURE_BIT));
}

#[test]
fn hop_by_hop_headers_are_stripped() {
    let mut h = map(&[("host", "a"), ("accept", "*/*")]);
    strip_hop_by_hop(&mut h);
    assert_eq!(names(&h), ["accept", "host"]);

    let mut h = map(&[
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("x", "1"),
    ]);
    strip_hop_by_hop(&mut h);
    assert_eq!(names(&h), ["x"]);

    let mut h = map(&[
        ("connection", "x-hop, Upgrade"),
        ("x-hop", "1"),
        ("upgrade", "ws"),
        ("y", "1"),
    ]);
    strip_hop_by_hop(&mut h);
    assert_eq!(names(&h), ["y"]);

    let mut h = map(&[("connection", "close"), ("close", "odd"), ("y", "1")]);
    strip_hop_by_hop(&mut h);
    assert_eq!(names(&h), ["y"]);

    let mut h = map(&[
        ("te", "trailers"),
        ("transfer-encoding", "chunked"),
        ("proxy-connection", "x"),
    ]);
    strip_hop_by_hop(&mut h);
    assert_eq!(names(&h), ["te"]);
    assert_eq!(h["te"], "trailers");

    // A Connection value with bytes beyond ASCII still names its headers.
    let mut h = map(&[("x-hop", "1"), ("y", "1")]);
    h.insert(
        "connection",
        http::HeaderValue::from_bytes(b"x-hop, \xff").unwrap(),
    );
    strip_hop_by_hop(&mut h);
    assert_eq!(names(&h), ["y"]);

    let mut h = map(&[("te", "gzip")]);
    strip_hop_by_hop(&mut h);
    assert!(h.is_empty());
}

#[test]
fn a_failure_header_is_kept_only_from_a_peer_proxy() {
    let from_app = || {
        map(&[
            ("x-trellis-failure", "denied"),
            ("connection", "close"),
            ("y", "1"),
        ])
    };
    let mut h = from_app();
    strip_response_headers(&mut h, false);
    assert_eq!(names(&h), ["y"], "an application cannot speak for the mesh");
    let mut h = from_app();
    strip_response_headers(&mut h, true);
    assert_eq!(names(&h), ["x-trellis-failure", "y"]);
    // Requests are not responses: the name means nothing there and is left alone.
    let mut h = from_app();
    strip_hop_by_hop(&mut h);
    assert_eq!(names(&h), ["x-trellis-failure", "y"]);
}
