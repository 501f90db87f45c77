//! Entry points for the fuzz targets (`fuzz/`), each asserting properties of what it parses,
//! not only that it does not panic. Built for `cargo fuzz` with the `fuzzing` feature, and in
//! the unit tests, which replay the committed corpus (`fuzz/corpus/TARGET`) through the same
//! functions on every `cargo test`.
//!
//! What is asserted (the request-smuggling classes of RFC 9112 §11.2 among them):
//! - HTTP/1.1 requests: a head is framed one way only (never both a length and a coding, never
//!   two different lengths, a coding only when `chunked` is last); parsing a head in pieces
//!   gives what parsing it whole gives; what the proxy forwards (head and body, re-framed)
//!   parses again to the same request, and to exactly one request; a chunked body decodes the
//!   same however the bytes are split, and a chunk-size line with control characters or a
//!   bare LF is refused.
//! - HTTP/1.1 responses: the same, with the body framings of responses.
//! - Headers: after hop-by-hop stripping, none remains (nor a header that `Connection` names);
//!   the `traceparent` sent on is always valid, and continues a valid incoming trace. The
//!   same bytes as the body of an opaque stream's hello and answer (`peer_stream`): read or
//!   refused, and what is read is written so that it reads back the same.
//! - xDS: an update of Trellis documents is applied whole or not at all.
//! - The frames of a connection between two proxies (`mux`): taken in or refused in any two
//!   reads, no stream past its window or the callee's stream limit, and answers whole frames.

use bytes::{BufMut, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method};

use crate::h1::codec::{self, Decoded, Decoder, ReqFraming, RespFraming};

/// Where `data` is cut into two reads: its first byte picks the place.
fn split_point(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((&b, rest)) if !rest.is_empty() => (usize::from(b) % rest.len(), rest),
        Some((_, rest)) => (0, rest),
        None => (0, data),
    }
}

/// A body decoded from `input` fed in two reads cut at `cut`: its bytes, its trailers and
/// the bytes left after it; `None` when it is refused or incomplete.
fn decode_body(
    framing: RespFraming,
    input: &[u8],
    cut: usize,
) -> Option<(Vec<u8>, Option<HeaderMap>, Vec<u8>)> {
    let mut dec = Decoder::new(framing);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut trailers = None;
    let cut = cut.min(input.len());
    let mut feeds = [&input[..cut], &input[cut..]].into_iter();
    while !dec.is_done() {
        match dec.decode(&mut buf).ok()? {
            Decoded::Data(d) => {
                assert!(!d.is_empty(), "an empty data frame");
                body.extend_from_slice(&d);
            }
            Decoded::Trailers(t) => {
                for name in [
                    header::CONTENT_LENGTH,
                    header::TRANSFER_ENCODING,
                    header::HOST,
                ] {
                    assert!(!t.contains_key(&name), "{name} read from a trailer section");
                }
                trailers = Some(t);
            }
            Decoded::End => break,
            Decoded::NeedMore => match feeds.next() {
                Some(next) => buf.put_slice(next),
                // A body up to the close ends here; any other is incomplete.
                None if dec.at_eof() => break,
                None => return None,
            },
        }
    }
    let mut rest = buf.to_vec();
    rest.extend(feeds.flatten());
    Some((body, trailers, rest))
}

fn req_as_resp(f: ReqFraming) -> RespFraming {
    match f {
        ReqFraming::None => RespFraming::Empty,
        ReqFraming::Length(n) => RespFraming::Length(n),
        ReqFraming::Chunked => RespFraming::Chunked,
    }
}

/// The values of `name`, as bytes.
fn values<'a>(h: &'a HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    h.get_all(name).iter().map(HeaderValue::as_bytes).collect()
}

/// Parse a request head (and body) from `data` and check that it is framed one way, that a
/// split read agrees, and that what the proxy sends on parses back to the same request.
pub fn http1_request(data: &[u8]) {
    let (cut, data) = split_point(data);
    // The head parser answers as httparse does (its rules are httparse's), with room for
    // every field and with too little.
    crate::h1::head::check_against_httparse(data, 100);
    crate::h1::head::check_against_httparse(data, cut % 4);
    let mut buf = BytesMut::from(data);
    let whole = codec::parse_request_head(&mut buf, codec::MAX_HEAD);
    // The same bytes in two reads: a prefix never yields a different head.
    let mut part = BytesMut::from(&data[..cut]);
    match (
        codec::parse_request_head(&mut part, codec::MAX_HEAD),
        &whole,
    ) {
        (Ok(None), _) => {}
        (Ok(Some(p)), Ok(Some(w))) => {
            assert_eq!(p.method, w.method);
            assert_eq!(p.uri, w.uri);
            assert_eq!(p.headers, w.headers);
            assert_eq!(p.framing, w.framing);
            assert_eq!(
                part.len() + (data.len() - cut),
                buf.len(),
                "consumed differently"
            );
        }
        (Err(_), Err(_)) => {}
        (p, w) => panic!("a prefix parsed as {p:?}, the whole as {w:?}"),
    }
    let Ok(Some(head)) = whole else { return };
    let cl = values(&head.headers, &header::CONTENT_LENGTH);
    let te = values(&head.headers, &header::TRANSFER_ENCODING);
    assert!(
        cl.is_empty() || te.is_empty(),
        "framed by a length and a coding"
    );
    match head.framing {
        ReqFraming::Chunked => {
            let last = te.last().expect("chunked without transfer-encoding");
            let last = std::str::from_utf8(last).expect("chunked read from text");
            let coding = last.rsplit(',').next().unwrap_or("").trim();
            assert!(coding.eq_ignore_ascii_case("chunked"));
        }
        ReqFraming::Length(n) => {
            assert!(n > 0);
            for v in &cl {
                for p in std::str::from_utf8(v).expect("a length is text").split(',') {
                    assert_eq!(p.trim().parse::<u64>().ok(), Some(n), "two lengths");
                }
            }
        }
        ReqFraming::None => assert!(te.is_empty(), "a coding but no body"),
    }
    // The body, read in two pieces.
    let rest = buf.to_vec();
    let body_cut = cut.min(rest.len());
    let Some((body, trailers, _next)) = decode_body(req_as_resp(head.framing), &rest, body_cut)
    else {
        return;
    };
    // What the proxy sends on: hop-by-hop headers out, the framing its own.
    let mut headers = head.headers.clone();
    crate::http::headers::strip_hop_by_hop(&mut headers);
    if headers.len() > crate::outbound::MAX_HEADERS_ON {
        // Refused at the outbound with 431.
        return;
    }
    let origin = crate::http::origin_form(&head.uri);
    let target = origin.as_str();
    let mut out = BytesMut::new();
    codec::encode_request_head(&head.method, target, &headers, head.framing, &mut out);
    match head.framing {
        ReqFraming::Chunked => {
            if !body.is_empty() {
                codec::encode_chunk_prefix(body.len(), &mut out);
                out.put_slice(&body);
                out.put_slice(b"\r\n");
            }
            codec::encode_chunked_end(trailers.as_ref(), &mut out);
        }
        ReqFraming::Length(_) => out.put_slice(&body),
        ReqFraming::None => {}
    }
    let sent = out.clone().freeze();
    let again = codec::parse_request_head(&mut out, codec::MAX_HEAD)
        .unwrap_or_else(|e| panic!("what the proxy sends does not parse: {e}: {sent:?}"))
        .unwrap_or_else(|| panic!("what the proxy sends is incomplete: {sent:?}"));
    assert_eq!(again.method, head.method);
    assert_eq!(again.uri, target, "the target changed on the way");
    assert_eq!(again.framing, head.framing);
    for (name, value) in &headers {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            assert!(
                again.headers.get_all(name).iter().any(|v| v == value),
                "{name} lost on the way: {sent:?}"
            );
        }
    }
    let rest = out.to_vec();
    let (body2, trailers2, left) = decode_body(req_as_resp(again.framing), &rest, rest.len() / 2)
        .unwrap_or_else(|| panic!("the body the proxy sends does not decode: {sent:?}"));
    assert_eq!(body2, body, "the body changed on the way");
    assert_eq!(trailers2.unwrap_or_default(), trailers.unwrap_or_default());
    assert!(
        left.is_empty(),
        "a second request behind the first: {sent:?}"
    );
}

/// Parse a response head (to GET or HEAD, the first byte says) and its body from `data`,
/// whole and in two reads, and check that both agree and the framing is one.
pub fn http1_response(data: &[u8]) {
    let (cut, data) = split_point(data);
    crate::h1::head::check_against_httparse(data, 100);
    let method = if cut % 2 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };
    let mut buf = BytesMut::from(data);
    let whole = codec::parse_response_head(&mut buf, &method);
    let mut part = BytesMut::from(&data[..cut]);
    match (codec::parse_response_head(&mut part, &method), &whole) {
        (Ok(None), _) => {}
        (Ok(Some(p)), Ok(Some(w))) => {
            assert_eq!(p.status, w.status);
            assert_eq!(p.headers.to_map(), w.headers.to_map());
            assert_eq!(p.framing, w.framing);
        }
        (Err(_), Err(_)) => {}
        (p, w) => panic!("a prefix parsed as {p:?}, the whole as {w:?}"),
    }
    let Ok(Some(head)) = whole else { return };
    head.headers.check_written_in_runs(cut);
    let map = head.headers.to_map();
    // Every line httparse accepted reads into a map, each name's values in their order:
    // `h1::raw` relies on its rules being `http`'s.
    assert_eq!(
        map.len(),
        head.headers.len(),
        "a line lost on its way into a map"
    );
    for (_, name, _) in head.headers.lines() {
        let sent: Vec<_> = head
            .headers
            .lines()
            .filter(|(_, n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, _, v)| v)
            .collect();
        let read: Vec<_> = map
            .get_all(
                std::str::from_utf8(name)
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
            )
            .iter()
            .map(http::HeaderValue::as_bytes)
            .collect();
        assert_eq!(sent, read, "a line changed on its way into a map");
    }
    let te = !values(&map, &header::TRANSFER_ENCODING).is_empty();
    let cl = !values(&map, &header::CONTENT_LENGTH).is_empty();
    // A body framed by a coding loses its length (a response without a body keeps it: it
    // describes the representation, and the coding is never sent on then).
    if te && head.framing != RespFraming::Empty {
        assert!(!cl, "a length passed on beside a coding");
    }
    if method == Method::HEAD {
        assert_eq!(head.framing, RespFraming::Empty, "a body after HEAD");
    }
    let rest = buf.to_vec();
    let one = decode_body(head.framing, &rest, rest.len());
    let two = decode_body(head.framing, &rest, cut.min(rest.len()));
    match (&one, &two) {
        (Some(a), Some(b)) => assert_eq!(a, b, "split reads decode differently"),
        // A body cut short in one read may still be short in two; a refusal must agree.
        (None, None) => {}
        (a, b) => {
            // Incomplete in one way only happens when the whole input is short of the end;
            // then both must be incomplete or refused.
            panic!("one read gives {a:?}, two give {b:?}")
        }
    }
}

/// Headers from `data` (`name: value` lines): the proxy's stripping and trace handling.
pub fn headers(data: &[u8]) {
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            h.append(n, v);
        }
    }
    let incoming = h
        .get(&crate::http::TRACEPARENT)
        .and_then(|v| crate::trace::traceparent_ids(v.as_bytes()));
    // Hop-by-hop stripping: none left, nor any header `Connection` names (but `te: trailers`).
    let mut stripped = h.clone();
    crate::http::headers::strip_hop_by_hop(&mut stripped);
    let named: Vec<Vec<u8>> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for (name, value) in &stripped {
        let n = name.as_str();
        assert!(
            !matches!(
                n,
                "connection"
                    | "keep-alive"
                    | "proxy-connection"
                    | "proxy-authenticate"
                    | "proxy-authorization"
                    | "transfer-encoding"
                    | "upgrade"
            ),
            "{n} passed on"
        );
        if n == "te" {
            assert_eq!(value, "trailers", "te passed on as {value:?}");
        } else {
            assert!(
                !named.iter().any(|t| t == n.as_bytes()),
                "{n} was named by Connection"
            );
        }
    }
    // Responses: `x-trellis-failure` only from a peer's proxy.
    let mut resp = h.clone();
    crate::http::headers::strip_response_headers(&mut resp, false);
    assert!(!resp.contains_key(&crate::http::X_TRELLIS_FAILURE));
    let mut r = http::Response::new(());
    *r.headers_mut() = h.clone();
    let _ = crate::stages::respond::peer_class(&r);
    let _ = crate::http::headers::grpc_status(&h);
    // The trace context sent on is valid, and continues a valid one that came in.
    let ids = crate::trace::prepare(&mut h, 0.5);
    let sent = h
        .get(&crate::http::TRACEPARENT)
        .expect("a traceparent is sent");
    let out = crate::trace::traceparent_ids(sent.as_bytes())
        .unwrap_or_else(|| panic!("an invalid traceparent sent: {sent:?}"));
    assert_eq!(out.0, ids.trace_id);
    if let Some((trace, _)) = incoming {
        assert_eq!(ids.trace_id, trace, "the caller's trace was not continued");
    }
    assert!(h.contains_key(&crate::http::X_REQUEST_ID));
    peer_stream_frames(data);
}

/// `data` as the body of an opaque stream's hello and of its answer: each read or refused
/// (never a panic), and what is read, written again, reads back the same (a caller's name
/// too long to fit is left out; a detail too long loses its tail).
fn peer_stream_frames(data: &[u8]) {
    use crate::peer_stream::{answer_frame, hello_frame, parse_answer, parse_hello, Answer};
    let body = &data[..data.len().min(crate::peer_stream::MAX_FRAME)];
    if let Ok(h) = parse_hello(body) {
        let again = hello_frame(&h);
        assert!(again.len() - 2 <= crate::peer_stream::MAX_FRAME);
        let back = parse_hello(&again[2..]).expect("a hello written is read");
        if back != h {
            assert!(
                back.peer.is_none(),
                "a hello read back as another: {back:?}"
            );
        }
    }
    if let Ok(a) = parse_answer(body) {
        let again = answer_frame(&a);
        assert!(again.len() - 2 <= crate::peer_stream::MAX_FRAME);
        let back = parse_answer(&again[2..]).expect("an answer written is read");
        match (&a, &back) {
            (
                Answer::Refused { class, detail },
                Answer::Refused {
                    class: c,
                    detail: d,
                },
            ) => {
                assert_eq!(class, c);
                assert!(
                    detail.starts_with(d.as_str()),
                    "{detail:?} read back as {d:?}"
                );
            }
            _ => assert_eq!(back, a, "an answer read back"),
        }
    }
}

/// A delta xDS response (protobuf) applied to an empty set of documents: whole or not at
/// all, and what is applied translates or is refused with a reason (no panic).
pub fn xds_update(data: &[u8]) {
    crate::xds::apply_for_fuzzing(data);
}

/// Bytes from a peer on a connection for HTTP/1.1 streams (`mux`), cut into two reads at
/// the place the first byte picks.
pub fn mux_frames(data: &[u8]) {
    let (cut, rest) = split_point(data);
    crate::mux::receive_for_fuzzing(rest, cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed corpus of `target`: (file, bytes).
    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.expect("corpus entry").path();
            out.push((
                p.display().to_string(),
                std::fs::read(&p).expect("corpus file"),
            ));
        }
        assert!(!out.is_empty(), "no corpus in {}", dir.display());
        out
    }

    fn replay(target: &str, f: fn(&[u8])) {
        for (name, data) in corpus(target) {
            if let Err(e) = std::panic::catch_unwind(|| f(&data)) {
                std::panic::resume_unwind(Box::new(format!("{name}: {e:?}")));
            }
        }
    }

    #[test]
    fn the_committed_corpora_hold_their_properties() {
        replay("http1_request", http1_request);
        replay("http1_response", http1_response);
        replay("headers", headers);
        replay("xds_update", xds_update);
        replay("mux_frames", mux_frames);
    }

    /// Seeds of `xds_update` from the committed resource seeds: each file's documents as the
    /// first response, and as the second a Workload moved or a document removed. Run by hand
    /// (`cargo test -p trellis-proxy --lib write_xds_seeds -- --ignored`).
    #[test]
    #[ignore = "writes the seed corpus"]
    fn write_xds_seeds() {
        use prost::Message;
        use trellis_xds::envoy_types::pb::envoy::service::discovery::v3::{
            DeltaDiscoveryResponse, Resource,
        };
        let doc = |name: &str, yaml: &str| Resource {
            name: name.to_string(),
            version: "1".into(),
            resource: Some(trellis_xds::envoy_types::util::pack_any(
                trellis_xds::Document {
                    yaml: yaml.to_string(),
                },
            )),
            ..Default::default()
        };
        let out =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/xds_update");
        for (file, text) in corpus("resources") {
            let docs: Vec<&str> = text_docs(&text);
            if docs.is_empty() || docs.len() > 40 {
                continue;
            }
            let first = DeltaDiscoveryResponse {
                resources: docs
                    .iter()
                    .enumerate()
                    .map(|(i, d)| doc(&format!("d{i}"), d))
                    .collect(),
                ..Default::default()
            }
            .encode_to_vec();
            let moved: Vec<Resource> = docs
                .iter()
                .enumerate()
                .filter(|(_, d)| d.contains("kind: Workload"))
                .map(|(i, d)| doc(&format!("d{i}"), &d.replace("127.0.0.1", "127.0.0.9")))
                .collect();
            let second = DeltaDiscoveryResponse {
                resources: moved,
                removed_resources: vec![format!("d{}", docs.len() - 1)],
                ..Default::default()
            }
            .encode_to_vec();
            let mut seed = vec![(first.len() >> 8) as u8, first.len() as u8];
            seed.extend(first);
            seed.extend(second);
            let name = std::path::Path::new(&file)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            std::fs::write(out.join(name), seed).unwrap();
        }
    }

    fn text_docs(text: &[u8]) -> Vec<&str> {
        std::str::from_utf8(text)
            .unwrap_or("")
            .split("\n---")
            .map(str::trim)
            .filter(|d| d.contains("kind:"))
            .collect()
    }
}
