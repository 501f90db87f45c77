//! The HTTP/1.1 codec, byte by byte: every framing rule, every split of the input.

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::codec::{
    encode_chunk_prefix, encode_chunked_end, encode_request_head, parse_response_head, Decoded,
    Decoder, ParseError, ReqFraming, RespFraming, MAX_HEAD,
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
    assert_eq!(h.headers["server"], "x");
    let multi: Vec<_> = h.headers.get_all("x-multi").iter().collect();
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
        h.headers["content-length"], "5",
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
    assert!(!h.headers.contains_key("content-length"));
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
fn broken_chunked_bodies_are_refused() {
    for bad in [
        &b"zz\r\nhello\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"5 junk\r\nhello\r\n",
        b"\r\n",
        b"fffffffffffffffff\r\n",
        b"5\nhello\r\n",
        b"0\r\nbad trailer\r\n\r\n",
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
        let mut buf = BytesMut::from(&input[..]);
        let Ok(Some(h)) = parse_response_head(&mut buf, &Method::GET) else {
            continue;
        };
        if h.framing == RespFraming::Chunked {
            assert!(!h.headers.contains_key("content-length"), "{input:?}");
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
