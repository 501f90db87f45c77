//! The HTTP/1.1 codec, byte by byte: every framing rule, every split of the input.

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};

use super::codec::{
    encode_chunk_prefix, encode_chunked_end, encode_request_head, encode_response_head, http_date,
    parse_request_head, parse_response_head, BodyOut, Decoded, Decoder, ParseError, ReqFraming,
    RequestError, RequestHead, RespFraming, MAX_HEAD,
};

fn head(bytes: &[u8], method: &Method) -> Result<Option<super::codec::Head>, ParseError> {
    parse_response_head(&mut BytesMut::from(bytes), method)
}

fn framing_of(bytes: &str) -> (RespFraming, bool) {
    let h = head(bytes.as_bytes(), &Method::GET).unwrap().unwrap();
    (h.framing, h.keep_alive)
}

#[test]
fn request_heads_carry_the_body_framing() {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("catalog.shop"));
    h.insert("content-length", HeaderValue::from_static("999"));
    h.insert("transfer-encoding", HeaderValue::from_static("gzip"));
    let enc = |m: Method, f: ReqFraming| {
        let mut out = BytesMut::new();
        encode_request_head(&m, "/a?b=c", &h, f, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    };
    assert_eq!(
        enc(Method::GET, ReqFraming::None),
        "GET /a?b=c HTTP/1.1\r\nhost: catalog.shop\r\n\r\n"
    );
    assert_eq!(
        enc(Method::POST, ReqFraming::None),
        "POST /a?b=c HTTP/1.1\r\nhost: catalog.shop\r\ncontent-length: 0\r\n\r\n"
    );
    assert_eq!(
        enc(Method::PUT, ReqFraming::Length(1234567890123)),
        "PUT /a?b=c HTTP/1.1\r\nhost: catalog.shop\r\ncontent-length: 1234567890123\r\n\r\n"
    );
    assert_eq!(
        enc(Method::POST, ReqFraming::Chunked),
        "POST /a?b=c HTTP/1.1\r\nhost: catalog.shop\r\ntransfer-encoding: chunked\r\n\r\n"
    );
}

#[test]
fn chunked_request_bodies_are_framed() {
    let mut out = BytesMut::new();
    encode_chunk_prefix(0x1a2b, &mut out);
    encode_chunk_prefix(1, &mut out);
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    encode_chunked_end(Some(&t), &mut out);
    assert_eq!(&out[..], b"1a2b\r\n1\r\n0\r\ngrpc-status: 0\r\n\r\n");
}

#[test]
fn a_head_is_parsed_only_when_complete_at_any_split() {
    let wire = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\nX-Multi: a\r\nX-Multi: b\r\n\r\nokHTTP/1.1";
    let end = wire.len() - b"okHTTP/1.1".len();
    for cut in 0..end {
        let mut buf = BytesMut::from(&wire[..cut]);
        assert!(
            parse_response_head(&mut buf, &Method::GET)
                .unwrap()
                .is_none(),
            "cut {cut}"
        );
        assert_eq!(buf.len(), cut, "nothing consumed while incomplete");
    }
    let mut buf = BytesMut::from(&wire[..]);
    let h = parse_response_head(&mut buf, &Method::GET)
        .unwrap()
        .unwrap();
    assert_eq!(h.status, StatusCode::OK);
    let map = h.headers.to_map();
    assert_eq!(map["server"], "x");
    let multi: Vec<_> = map.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    assert_eq!((h.framing, h.keep_alive), (RespFraming::Length(2), true));
    // The body and whatever follows stay in the buffer.
    assert_eq!(&buf[..], b"okHTTP/1.1");
}

#[test]
fn response_framing_follows_rfc_9112() {
    let ok = "HTTP/1.1 200 OK\r\n";
    assert_eq!(
        framing_of(&format!("{ok}content-length: 0\r\n\r\n")),
        (RespFraming::Empty, true)
    );
    assert_eq!(
        framing_of(&format!("{ok}content-length: 7, 7\r\n\r\n")),
        (RespFraming::Length(7), true)
    );
    assert_eq!(
        framing_of(&format!("{ok}transfer-encoding: gzip, chunked\r\n\r\n")),
        (RespFraming::Chunked, true)
    );
    // A coding other than chunked last: the body runs to the close.
    assert_eq!(
        framing_of(&format!("{ok}transfer-encoding: chunked, gzip\r\n\r\n")),
        (RespFraming::Eof, false)
    );
    // Neither: to the close, and the connection cannot be reused.
    assert_eq!(framing_of(&format!("{ok}\r\n")), (RespFraming::Eof, false));
    assert_eq!(
        framing_of(&format!(
            "{ok}connection: keep-alive, close\r\ncontent-length: 1\r\n\r\n"
        )),
        (RespFraming::Length(1), false)
    );
    // HTTP/1.0 keeps the connection only when asked to.
    assert_eq!(
        framing_of("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
        (RespFraming::Length(1), false)
    );
    assert_eq!(
        framing_of("HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n"),
        (RespFraming::Length(1), true)
    );
    for status in [
        "204 No Content",
        "304 Not Modified",
        "100 Continue",
        "101 Switching Protocols",
    ] {
        let h = format!("HTTP/1.1 {status}\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(framing_of(&h).0, RespFraming::Empty, "{status}");
    }
    let h = head(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        &Method::HEAD,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.framing, RespFraming::Empty);
    assert_eq!(
        h.headers.to_map()["content-length"],
        "5",
        "HEAD keeps its length header"
    );
    // Transfer-Encoding wins over Content-Length, which is dropped so it cannot mislead the
    // next hop.
    let h = head(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        &Method::GET,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.framing, RespFraming::Chunked);
    assert!(!h.headers.to_map().contains_key("content-length"));
    assert!(h.headers.get("content-length").is_none());
}

#[test]
fn bad_heads_are_refused() {
    for bad in [
        &b"HTTP/1.1 abc\r\n\r\n"[..],
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
    ] {
        assert!(
            head(bad, &Method::GET).is_err(),
            "{:?} should be refused",
            String::from_utf8_lossy(bad)
        );
    }
    // A head that never ends is refused once it outgrows the limit, complete or not.
    let mut huge = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
    huge.resize(MAX_HEAD + 10, b'a');
    assert!(matches!(
        head(&huge, &Method::GET),
        Err(ParseError::TooLarge)
    ));
    huge.extend_from_slice(b"\r\n\r\n");
    assert!(matches!(
        head(&huge, &Method::GET),
        Err(ParseError::TooLarge)
    ));
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert!(head(&many, &Method::GET).is_err(), "more than 100 headers");
}

/// Body data, trailers, and the bytes left after the body.
type Body = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

/// Decode `wire` fed in pieces of `step` bytes; returns data, trailers and what is left over.
fn decode_in_steps(framing: RespFraming, wire: &[u8], step: usize) -> Result<Body, ParseError> {
    let mut d = Decoder::new(framing);
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), None);
    let mut fed = 0;
    loop {
        match d.decode(&mut buf)? {
            Decoded::Data(b) => data.extend_from_slice(&b),
            Decoded::Trailers(t) => trailers = Some(t),
            Decoded::End => break,
            Decoded::NeedMore if fed < wire.len() => {
                let n = step.min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
            Decoded::NeedMore => {
                assert!(d.at_eof(), "input ended in the middle of the body");
                break;
            }
        }
        if d.is_done() {
            break;
        }
    }
    buf.extend_from_slice(&wire[fed..]);
    Ok((data, trailers, buf.to_vec()))
}

#[test]
fn chunked_bodies_decode_the_same_at_every_split() {
    let wire = b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\n10\r\n0123456789abcdef\r\n0\r\nx-sum: 27\r\nx-two: 2\r\n\r\nNEXT";
    for step in 1..wire.len() {
        let (data, trailers, rest) = decode_in_steps(RespFraming::Chunked, wire, step).unwrap();
        assert_eq!(data, b"hello world0123456789abcdef", "step {step}");
        let t = trailers.expect("trailers");
        assert_eq!(
            (t["x-sum"].as_bytes(), t["x-two"].as_bytes()),
            (&b"27"[..], &b"2"[..]),
            "step {step}"
        );
        assert_eq!(
            rest, b"NEXT",
            "step {step}: the next response is left alone"
        );
    }
    // Without trailers.
    let (data, trailers, rest) =
        decode_in_steps(RespFraming::Chunked, b"2\r\nok\r\n0\r\n\r\n", 3).unwrap();
    assert_eq!(
        (&data[..], trailers.is_none(), rest.len()),
        (&b"ok"[..], true, 0)
    );
}

#[test]
fn framing_fields_in_a_trailer_section_are_dropped() {
    let wire = b"2\r\nok\r\n0\r\ncontent-length: 5\r\nTransfer-Encoding: chunked\r\nhost: evil\r\nx-sum: 1\r\n\r\n";
    let (data, trailers, _) = decode_in_steps(RespFraming::Chunked, wire, 4).unwrap();
    let t = trailers.expect("trailers");
    assert_eq!(data, b"ok");
    assert_eq!(t.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-sum"]);
}

#[test]
fn broken_chunked_bodies_are_refused() {
    for bad in [
        &b"zz\r\nhello\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"5 junk\r\nhello\r\n",
        b"\r\n",
        b"fffffffffffffffff\r\n",
        b"5\nhello\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        // A bare CR or another control character hidden in a chunk extension.
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",
        b"5;a\x00\r\nhello\r\n0\r\n\r\n",
    ] {
        assert!(
            decode_in_steps(RespFraming::Chunked, bad, bad.len()).is_err(),
            "{:?} should be refused",
            String::from_utf8_lossy(bad)
        );
    }
    let long_line = [b'1'; 5000];
    assert!(decode_in_steps(RespFraming::Chunked, &long_line, 5000).is_err());
}

#[test]
fn length_and_close_delimited_bodies() {
    for step in 1..12 {
        let (data, _, rest) =
            decode_in_steps(RespFraming::Length(5), b"helloHTTP/1.1", step).unwrap();
        assert_eq!((&data[..], &rest[..]), (&b"hello"[..], &b"HTTP/1.1"[..]));
        let (data, _, rest) = decode_in_steps(RespFraming::Eof, b"all of it", step).unwrap();
        assert_eq!((&data[..], rest.len()), (&b"all of it"[..], 0));
    }
    // A length-delimited body cut short is not complete.
    let mut d = Decoder::new(RespFraming::Length(5));
    let mut buf = BytesMut::from(&b"hel"[..]);
    assert_eq!(d.decode(&mut buf).unwrap(), Decoded::Data("hel".into()));
    assert_eq!(d.remaining(), Some(2));
    assert!(!d.at_eof());
    assert!(Decoder::new(RespFraming::Empty).is_done());
}

/// Mutations of valid responses (bytes flipped, inserted, dropped, cut) fed to the head parser
/// and every body decoder: whatever an upstream sends, the codec returns a value or an error
/// and never panics, and what it accepts obeys the framing rules.
/// One to three random edits: a byte changed, a framing-relevant byte inserted, a byte
/// removed, or the input cut short.
fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>) {
    for _ in 0..rng.usize(1..4) {
        let at = rng.usize(..=input.len());
        match rng.u8(..4) {
            0 if at < input.len() => input[at] = rng.u8(..),
            1 => input.insert(at, *b"\r\n:; 0f\x00\x7f".get(rng.usize(..9)).unwrap()),
            2 if at < input.len() => {
                input.remove(at);
            }
            _ => input.truncate(at),
        }
    }
}

#[test]
fn mutated_responses_never_panic() {
    let seeds: [&[u8]; 5] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
        b"HTTP/1.0 404 Not Found\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    ];
    let mut rng = fastrand::Rng::with_seed(0x7e11_1500);
    for round in 0..20_000 {
        let mut input = seeds[round % seeds.len()].to_vec();
        mutate(&mut rng, &mut input);
        let mut buf = BytesMut::from(&input[..]);
        let Ok(Some(h)) = parse_response_head(&mut buf, &Method::GET) else {
            continue;
        };
        if h.framing == RespFraming::Chunked {
            assert!(h.headers.get("content-length").is_none(), "{input:?}");
        }
        if !matches!(
            h.framing,
            RespFraming::Length(_) | RespFraming::Chunked | RespFraming::Empty
        ) {
            assert!(
                !h.keep_alive,
                "a close-delimited body cannot keep the connection"
            );
        }
        let mut d = Decoder::new(h.framing);
        let mut total = 0usize;
        for _ in 0..1000 {
            match d.decode(&mut buf) {
                Ok(Decoded::Data(b)) => total += b.len(),
                Ok(Decoded::NeedMore) | Ok(Decoded::End) | Err(_) => break,
                Ok(Decoded::Trailers(_)) => {}
            }
        }
        assert!(total <= input.len(), "decoded more than was sent");
    }
}

fn request(bytes: &str) -> Result<Option<RequestHead>, RequestError> {
    parse_request_head(&mut BytesMut::from(bytes.as_bytes()), 64 * 1024)
}

#[test]
fn request_heads_parse_at_every_split_and_leave_the_rest() {
    let text = "\r\nPOST http://catalog.shop/items?x=1 HTTP/1.1\r\nHost: catalog.shop\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhelloGET";
    let end = text.find("hello").unwrap();
    for split in 0..text.len() {
        let mut buf = BytesMut::from(&text.as_bytes()[..split]);
        let first = parse_request_head(&mut buf, 64 * 1024).unwrap();
        if split < end {
            assert!(first.is_none(), "split {split}");
            buf.extend_from_slice(&text.as_bytes()[split..]);
        } else {
            assert!(first.is_some(), "split {split}");
            continue;
        }
        let h = parse_request_head(&mut buf, 64 * 1024).unwrap().unwrap();
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.uri.host(), Some("catalog.shop"));
        assert_eq!(h.uri.path_and_query().unwrap().as_str(), "/items?x=1");
        assert_eq!(h.framing, ReqFraming::Length(5));
        assert!(h.keep_alive && !h.upgrade && !h.expect_continue);
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"helloGET", "the body and what follows stay");
    }
}

#[test]
fn request_framing_and_connection_rules() {
    let h = |s: &str| request(s).unwrap().unwrap();
    let g = h("GET / HTTP/1.1\r\n\r\n");
    assert_eq!(g.framing, ReqFraming::None);
    assert!(g.keep_alive);
    assert!(!h("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive);
    assert!(!h("GET / HTTP/1.0\r\n\r\n").keep_alive);
    assert!(h("GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").keep_alive);
    assert_eq!(
        h("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n").framing,
        ReqFraming::Chunked
    );
    assert_eq!(
        h("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n").framing,
        ReqFraming::None
    );
    assert_eq!(
        h("POST / HTTP/1.1\r\ncontent-length: 7, 7\r\n\r\n").framing,
        ReqFraming::Length(7)
    );
    assert!(
        h("POST / HTTP/1.1\r\ncontent-length: 1\r\nexpect: 100-Continue\r\n\r\n").expect_continue
    );
    // Without a body there is nothing to continue to.
    assert!(!h("GET / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n").expect_continue);
    assert!(
        h("GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: keep-alive, Upgrade\r\n\r\n")
            .upgrade
    );
    assert!(!h("GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n").upgrade);
    let c = h("CONNECT db.shop:5432 HTTP/1.1\r\n\r\n");
    assert!(c.upgrade);
    assert_eq!(c.uri.authority().unwrap().as_str(), "db.shop:5432");
    assert!(h("GET / HTTP/1.1\r\nte: trailers\r\n\r\n").trailers);
}

#[test]
fn bad_requests_get_the_fitting_status() {
    let status = |s: &str| request(s).unwrap_err().status().as_u16();
    assert_eq!(
        status("GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"),
        400
    );
    assert_eq!(
        status("POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n"),
        501
    );
    assert_eq!(
        status("POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"),
        400
    );
    assert_eq!(status("POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n"), 400);
    assert_eq!(status("GET / HTTP/1.1\r\nbad header\r\n\r\n"), 400);
    assert_eq!(status("G@T / HTTP/1.1\r\n\r\n"), 400);
    assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 400);
    let many: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
    assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    // A head that does not end within the limit, complete or not.
    let long = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(2000));
    let mut buf = BytesMut::from(long.as_bytes());
    assert_eq!(
        parse_request_head(&mut buf, 1024)
            .unwrap_err()
            .status()
            .as_u16(),
        431
    );
    let mut buf = BytesMut::from(&long.as_bytes()[..1500]);
    assert_eq!(
        parse_request_head(&mut buf, 1024)
            .unwrap_err()
            .status()
            .as_u16(),
        431
    );
}

/// The proxy's `Proxy-Status` entry kept beside an upstream's lines (no map for one field)
/// goes out after the lines and before the map's fields, and reads into a map in that order.
#[test]
fn the_proxys_status_entry_follows_the_lines_and_precedes_the_map() {
    let wire = b"HTTP/1.1 200 OK\r\nProxy-Status: upstream\r\nServer: x\r\n\r\n";
    let mut raw = parse_response_head(&mut BytesMut::from(&wire[..]), &Method::HEAD)
        .unwrap()
        .unwrap()
        .headers;
    raw.append_status(HeaderValue::from_static("trellis; received-status=200"));
    let mut map = HeaderMap::new();
    map.insert("x-added", HeaderValue::from_static("1"));
    let mut out = BytesMut::new();
    encode_response_head(
        StatusCode::OK,
        Some(&raw),
        &map,
        BodyOut::Length(0),
        None,
        &mut out,
    );
    let text = String::from_utf8(out.to_vec()).unwrap();
    let at = |f: &str| text.find(f).unwrap_or_else(|| panic!("no {f:?} in {text}"));
    assert!(
        at("Proxy-Status: upstream\r\n") < at("Server: x\r\n"),
        "{text}"
    );
    assert!(
        at("Server: x\r\n") < at("proxy-status: trellis; received-status=200\r\n"),
        "{text}"
    );
    assert!(at("received-status=200") < at("x-added: 1\r\n"), "{text}");
    // One field read finds the upstream's entry first; the map holds both, in order.
    assert_eq!(raw.get("proxy-status"), Some(&b"upstream"[..]));
    assert_eq!(raw.len(), 3);
    let all = raw.into_map(map);
    let entries: Vec<_> = all.get_all("proxy-status").iter().collect();
    assert_eq!(entries, ["upstream", "trellis; received-status=200"]);
    assert_eq!(all.keys().last().map(|k| k.as_str()), Some("x-added"));
}

#[test]
fn response_heads_carry_the_proxys_framing_and_connection_headers() {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("text/plain"));
    h.insert("content-length", HeaderValue::from_static("9"));
    h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(
        "date",
        HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
    );
    // The same fields as the lines an upstream sent, not read into a map: written alike.
    let wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\
        transfer-encoding: chunked\r\nconnection: upgrade\r\nkeep-alive: timeout=5\r\n\
        date: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n";
    let raw = parse_response_head(&mut BytesMut::from(&wire[..]), &Method::HEAD)
        .unwrap()
        .unwrap()
        .headers;
    let enc = |status: u16, body: BodyOut, conn: Option<&'static str>| {
        let status = StatusCode::from_u16(status).unwrap();
        let (mut out, mut from_raw) = (BytesMut::new(), BytesMut::new());
        encode_response_head(status, None, &h, body, conn, &mut out);
        let none = HeaderMap::new();
        encode_response_head(status, Some(&raw), &none, body, conn, &mut from_raw);
        assert_eq!(out, from_raw, "the lines as sent are written as the map is");
        String::from_utf8(out.to_vec()).unwrap()
    };
    let date = "date: Thu, 01 Jan 1970 00:00:00 GMT\r\n";
    assert_eq!(
        enc(200, BodyOut::Length(3), None),
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{date}content-length: 3\r\n\r\n")
    );
    assert_eq!(
        enc(200, BodyOut::Chunked, Some("close")),
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{date}transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
    );
    // HEAD and 304 keep the length of the representation; 204 and the like drop it.
    assert!(enc(200, BodyOut::None, None).contains("content-length: 9\r\n"));
    assert!(!enc(204, BodyOut::Never, None).contains("content-length"));
    assert_eq!(
        enc(200, BodyOut::Eof, Some("close")),
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{date}connection: close\r\n\r\n")
    );
    // A 101 keeps its connection header (the handshake's), and gets no other.
    let up = enc(101, BodyOut::Never, Some("close"));
    assert!(
        up.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{up}"
    );
    assert!(
        up.contains("connection: upgrade\r\n") && !up.contains("close"),
        "{up}"
    );
    // A response without a date gets one.
    let mut out = BytesMut::new();
    encode_response_head(
        StatusCode::NOT_FOUND,
        None,
        &HeaderMap::new(),
        BodyOut::Length(0),
        None,
        &mut out,
    );
    let text = String::from_utf8(out.to_vec()).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\ndate: "),
        "{text}"
    );
    assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
}

#[test]
fn http_dates_are_formatted_as_rfc_9110_says() {
    let d = |s| String::from_utf8(http_date(s).to_vec()).unwrap();
    assert_eq!(d(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(d(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(d(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    assert_eq!(d(4_102_444_799), "Thu, 31 Dec 2099 23:59:59 GMT");
}

#[test]
fn mutated_requests_never_panic_and_never_frame_ambiguously() {
    let seeds: [&[u8]; 5] = [
        b"GET /a?b HTTP/1.1\r\nhost: catalog.shop\r\nx-a: b\r\n\r\n",
        b"POST http://catalog.shop/ HTTP/1.1\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\nhello",
        b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"CONNECT db.shop:5432 HTTP/1.1\r\nhost: db.shop:5432\r\n\r\n",
        b"GET / HTTP/1.0\r\nconnection: keep-alive, upgrade\r\nupgrade: websocket\r\n\r\n",
    ];
    let mut rng = fastrand::Rng::with_seed(0x7e11_1501);
    for round in 0..20_000 {
        let mut input = seeds[round % seeds.len()].to_vec();
        mutate(&mut rng, &mut input);
        let mut buf = BytesMut::from(&input[..]);
        let Ok(Some(h)) = parse_request_head(&mut buf, 64 * 1024) else {
            continue;
        };
        let has = |n: &str| h.headers.contains_key(n);
        assert!(
            !(has("content-length") && has("transfer-encoding")),
            "{input:?}"
        );
        if h.framing == ReqFraming::None {
            assert!(!has("transfer-encoding"), "{input:?}");
        }
    }
}

/// What the parser notes of a request head is what looking it up in a map of every field
/// finds: the first `Host`, `x-request-id`, `x-trellis-peer` and `traceparent`, whether the
/// first `content-type` is gRPC's, whether an HTTP/1.1 upgrade is asked for. And neither
/// `x-trellis-peer` nor `traceparent` is left in the headers. Over mutated heads with the
/// fields repeated, in any case.
#[test]
fn what_the_parser_notes_is_what_a_lookup_finds() {
    let seeds: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: a.shop\r\nx-request-id: r1\r\nx-trellis-peer: p1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nTraceParent: t2\r\n\r\n",
        b"POST /s HTTP/1.1\r\nhost: b\r\nHOST: c\r\ncontent-type: application/grpc+proto\r\ncontent-type: text/plain\r\nX-Trellis-Peer: p1\r\nx-trellis-peer: p2\r\ncontent-length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\ncontent-type: text/plain\r\nContent-Type: application/grpc\r\nX-Request-Id: \r\nx-request-id: r2\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nhost: w\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\n\r\n",
        b"GET /ws HTTP/1.0\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    ];
    let mut rng = fastrand::Rng::with_seed(0x0407_ed11);
    let mut checked = 0;
    for round in 0..20_000 {
        let mut input = seeds[round % seeds.len()].to_vec();
        if round >= seeds.len() {
            mutate(&mut rng, &mut input);
        }
        let mut buf = BytesMut::from(&input[..]);
        let mut n = super::codec::Noted::default();
        let Ok(Some(h)) = super::codec::parse_request_head_noting(&mut buf, 64 * 1024, &mut n)
        else {
            continue;
        };
        // The reference: every field of the same head, in a map, looked up.
        let mut raw = [httparse::EMPTY_HEADER; 100];
        let mut r = httparse::Request::new(&mut raw);
        assert!(r.parse(&input).unwrap().is_complete(), "{input:?}");
        let mut all = HeaderMap::new();
        for f in r.headers.iter() {
            all.append(
                http::HeaderName::from_bytes(f.name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(f.value).unwrap(),
            );
        }
        assert_eq!(n.host.as_ref(), all.get("host"), "{input:?}");
        assert_eq!(n.request_id.as_ref(), all.get("x-request-id"), "{input:?}");
        let peer = all.get("x-trellis-peer").map(http::HeaderValue::as_bytes);
        assert_eq!(n.peer.as_ref().map(|p| p.as_bytes()), peer, "{input:?}");
        assert!(!h.headers.contains_key("x-trellis-peer"), "{input:?}");
        let tp = all.get("traceparent").map(http::HeaderValue::as_bytes);
        assert_eq!(n.traceparent.as_deref(), tp, "{input:?}");
        assert!(!h.headers.contains_key("traceparent"), "{input:?}");
        let grpc = all
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        assert_eq!(n.grpc, grpc, "{input:?}");
        let upgrade = h.version == Version::HTTP_11
            && all.contains_key("upgrade")
            && looked_up_token(&all, "upgrade");
        assert_eq!(n.upgrade, upgrade, "{input:?}");
        // Every other field is in the map as it came.
        all.remove("x-trellis-peer");
        all.remove("traceparent");
        assert_eq!(h.headers, all, "{input:?}");
        checked += 1;
    }
    assert!(checked > 2_000, "only {checked} heads parsed");
}

/// The rules the codec applied by looking the fields up again in the parsed map (before
/// they were read while the map was built): the content-length, and whether a
/// `Connection` field names a token.
fn looked_up_length(h: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut length = None;
    for v in h.get_all("content-length") {
        for part in v.to_str().map_err(|_| ())?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n: u64 = part.parse().map_err(|_| ())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    Ok(length)
}

fn looked_up_token(h: &HeaderMap, token: &str) -> bool {
    h.get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[test]
fn lengths_and_connection_tokens_read_while_parsing_follow_the_lookup_rules() {
    let lengths: &[&[u8]] = &[
        b"0",
        b"7",
        b" 7 ",
        b"\t7\t",
        b"7, 7",
        b"7,7",
        b"7, 8",
        b"+1",
        b"",
        b" ",
        b"1 2",
        b"5,",
        b",5",
        b"0x5",
        b"007",
        b"18446744073709551615",
        b"18446744073709551616",
        b"99999999999999999999999",
        b"7\x80",
        b"\x80",
    ];
    let tokens: &[&[u8]] = &[
        b"close",
        b"Close",
        b" close ",
        b"keep-alive",
        b"Keep-Alive, close",
        b"upgrade",
        b"x, Upgrade",
        b"closed",
        b"close\x80",
        b"",
        b",",
        b"keep-alive,,close",
        b"\tclose",
        b"close keep-alive",
    ];
    let mut cases = 0;
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        for (i, a) in lengths.iter().enumerate() {
            for b in std::iter::once(None).chain(lengths[i..].iter().map(Some)) {
                for c in std::iter::once(None).chain(tokens.iter().map(Some)) {
                    for d in std::iter::once(None).chain(tokens.iter().take(6).map(Some)) {
                        let mut fields = Vec::new();
                        for (name, v) in [("content-length", Some(a)), ("Content-Length", b)]
                            .into_iter()
                            .chain([("connection", c), ("Connection", d)])
                        {
                            if let Some(v) = v {
                                fields.extend_from_slice(name.as_bytes());
                                fields.extend_from_slice(b": ");
                                fields.extend_from_slice(v);
                                fields.extend_from_slice(b"\r\n");
                            }
                        }
                        let mut res = format!("{version} 200 OK\r\n").into_bytes();
                        res.extend_from_slice(&fields);
                        res.extend_from_slice(b"\r\n");
                        let mut req = format!("GET / {version}\r\nupgrade: x\r\n").into_bytes();
                        req.extend_from_slice(&fields);
                        req.extend_from_slice(b"\r\n");
                        // The reference reads the map the parser built; a head the parser
                        // refuses for another reason (a bad field value) is skipped.
                        let Ok(Some(parsed)) =
                            parse_request_head(&mut BytesMut::from(&req[..]), MAX_HEAD)
                        else {
                            let err = parse_request_head(&mut BytesMut::from(&req[..]), MAX_HEAD);
                            assert!(
                                matches!(err, Err(RequestError::ContentLength)),
                                "{:?}: {err:?}",
                                String::from_utf8_lossy(&req)
                            );
                            // Refused for its length: the reference must refuse it too, and
                            // so must the response parser.
                            let mut h = HeaderMap::new();
                            for (name, v) in [("content-length", Some(a)), ("content-length", b)] {
                                if let Some(v) = v {
                                    h.append(name, HeaderValue::from_bytes(v).unwrap());
                                }
                            }
                            assert_eq!(
                                looked_up_length(&h),
                                Err(()),
                                "{:?}",
                                String::from_utf8_lossy(&req)
                            );
                            assert!(matches!(
                                head(&res, &Method::GET),
                                Err(ParseError::ContentLength)
                            ));
                            cases += 1;
                            continue;
                        };
                        let h = &parsed.headers;
                        let http10 = version == "HTTP/1.0";
                        let keep_alive = if http10 {
                            looked_up_token(h, "keep-alive")
                        } else {
                            !looked_up_token(h, "close")
                        };
                        let length = looked_up_length(h).expect("accepted, so a valid length");
                        let at = String::from_utf8_lossy(&req);
                        assert_eq!(parsed.keep_alive, keep_alive, "{at:?}");
                        assert_eq!(parsed.upgrade, looked_up_token(h, "upgrade"), "{at:?}");
                        assert_eq!(
                            parsed.framing,
                            match length {
                                None | Some(0) => ReqFraming::None,
                                Some(n) => ReqFraming::Length(n),
                            },
                            "{at:?}"
                        );
                        let r = head(&res, &Method::GET).unwrap().unwrap();
                        assert_eq!(
                            (r.framing, r.keep_alive),
                            match length {
                                None => (RespFraming::Eof, false),
                                Some(0) => (RespFraming::Empty, keep_alive),
                                Some(n) => (RespFraming::Length(n), keep_alive),
                            },
                            "{:?}",
                            String::from_utf8_lossy(&res)
                        );
                        cases += 1;
                    }
                }
            }
        }
    }
    assert!(cases > 20_000, "{cases}");
}
