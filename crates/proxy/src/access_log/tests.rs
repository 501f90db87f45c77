use std::sync::{Arc, Mutex};

use http::HeaderValue;

use super::*;

#[test]
fn timestamps() {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(1_764_192_394_123);
    assert_eq!(rfc3339(t), "2025-11-26T21:26:34.123Z");
}

/// A writer the test can read, and make slow; it says when a write begins.
#[derive(Clone, Default)]
struct Sink {
    out: Arc<Mutex<Vec<u8>>>,
    gate: Arc<Mutex<()>>,
    writing: Option<std::sync::mpsc::Sender<()>>,
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(tx) = &self.writing {
            let _ = tx.send(());
        }
        let _held = self.gate.lock().unwrap();
        self.out.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn tcp_line(n: u64) -> Entry {
    Entry::Tcp(TcpLine {
        at: SystemTime::UNIX_EPOCH,
        total: Duration::from_millis(1),
        direction: Direction::outbound,
        dst_service: Label::from("svc.ns"),
        dst_workload: Label::default(),
        upstream: None,
        source_identity: Label::default(),
        src_workload: Label::default(),
        class: FailureClass::ConnectRefused,
        side: Some(Side::Upstream),
        detail: None,
        sent: n,
        received: 0,
    })
}

fn lines(s: &Sink) -> Vec<serde_json::Value> {
    String::from_utf8(s.out.lock().unwrap().clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_queued_line_is_written_once_in_order() {
    let sink = Sink::default();
    let log = AccessLog::to(Some(Box::new(sink.clone())), Counter::default());
    for n in 0..1000 {
        log.push(tcp_line(n));
    }
    log.close();
    let got = lines(&sink);
    assert_eq!(got.len(), 1000);
    for (n, l) in got.iter().enumerate() {
        assert_eq!(l["bytes_sent"], n as u64);
        assert_eq!(l["failure_class"], "connect_refused");
        assert_eq!(l["failure_side"], "upstream");
        assert_eq!(l["failure_category"], "network");
    }
}

#[test]
fn a_stuck_writer_drops_and_counts_instead_of_blocking() {
    let (tx, writing) = std::sync::mpsc::channel();
    let sink = Sink {
        writing: Some(tx),
        ..Sink::default()
    };
    let dropped = Counter::default();
    let log = AccessLog::to(Some(Box::new(sink.clone())), dropped.clone());
    // The writer is stuck on its output: pushes must still return at once.
    let gate = sink.gate.lock().unwrap();
    log.push(tcp_line(0));
    // The writer took the first line and is blocked writing it.
    writing
        .recv_timeout(Duration::from_secs(10))
        .expect("the writer writes");
    assert_eq!(log.queued(), 0);
    let extra = 100;
    for n in 1..=(QUEUE_CAP as u64 + extra) {
        log.push(tcp_line(n));
    }
    assert_eq!(dropped.get(), extra, "what did not fit was counted");
    drop(gate);
    log.close();
    let got = lines(&sink);
    assert_eq!(got.len(), 1 + QUEUE_CAP, "everything queued was written");
}

fn http_line(path: &str, detail: Option<String>, upstream: SocketAddr) -> Entry {
    Entry::Http(
        HttpLine {
            direction: Direction::inbound,
            protocol: "HTTP/2",
            method: http::Method::POST,
            authority: Some(crate::http::authority::RequestAuthority::Host(
                HeaderValue::from_static("shop.test:80"),
            )),
            uri: path.parse().unwrap(),
            status: 503,
            grpc_status: Some(14),
            class: FailureClass::AppError,
            side: Some(Side::Upstream),
            detail,
            client_gone: true,
            source_identity: Label::from("spiffe://trellis.local/ns/shop/sa/web"),
            src_service: Label::from("web.shop"),
            src_workload: Label::default(),
            src_environment: Label::default(),
            src_locality: Label::default(),
            dst_service: Label::from("api.shop"),
            dst_workload: Label::from("api-1"),
            dst_environment: "vm",
            dst_locality: Label::from("eu/eu-1"),
            route: Label::from("shop/api"),
            upstream: Some(upstream),
            upstream_app: Some("10.0.0.5:8080".parse().unwrap()),
            attempts: 2,
            connect: None,
            first_byte: Some(Duration::from_micros(1_500)),
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            spans: Default::default(),
            try_start: Duration::ZERO,
            dst_identity: Label::default(),
            request_id: Some(HeaderValue::from_static("req-1")),
            tap_headers: None,
        },
        std::time::UNIX_EPOCH + Duration::from_millis(1_764_192_394_123),
        Duration::from_micros(12_345_678),
    )
}

#[test]
fn lines_are_json_whatever_the_strings_hold() {
    let sink = Sink::default();
    let log = AccessLog::to(Some(Box::new(sink.clone())), Counter::default());
    let nasty = "a \"quoted\" back\\slash\nnew\tline \u{1} été 💥";
    log.push(http_line(
        "/p%20ath",
        Some(nasty.to_string()),
        "10.0.0.9:15006".parse().unwrap(),
    ));
    log.push(http_line("/", None, "[fd00::1]:15006".parse().unwrap()));
    log.close();
    let got = lines(&sink);
    assert_eq!(got.len(), 2);
    let l = &got[0];
    assert_eq!(l["ts"], "2025-11-26T21:26:34.123Z");
    assert_eq!(l["detail"], nasty, "escaped and read back the same");
    assert_eq!(l["path"], "/p%20ath");
    assert_eq!(l["authority"], "shop.test:80");
    assert_eq!(l["status"], 503);
    assert_eq!(l["grpc_status"], 14);
    assert_eq!(l["failure_class"], "app_error");
    assert_eq!(l["failure_category"], "application");
    assert_eq!(l["failure_side"], "upstream");
    assert_eq!(l["client_disconnected"], true);
    assert_eq!(l["upstream"], "10.0.0.9:15006");
    assert_eq!(l["upstream_app"], "10.0.0.5:8080");
    assert_eq!(l["connect_ms"], serde_json::Value::Null);
    assert_eq!(l["first_byte_ms"], 1.5);
    assert_eq!(l["total_ms"], 12345.678);
    assert_eq!(l["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(l["request_id"], "req-1");
    assert_eq!(l["src_service"], "web.shop");
    assert!(l.get("src_workload").is_none(), "unknown: left out");
    assert_eq!(got[1]["upstream"], "[fd00::1]:15006");
    assert!(got[1].get("detail").is_none());
}

#[test]
fn every_byte_that_json_needs_escaped_is() {
    for b in 0u8..=255 {
        assert_eq!(
            ESCAPE[b as usize],
            b < 0x20 || b == b'"' || b == b'\\',
            "byte {b:#x}"
        );
    }
    let mut out = Vec::new();
    escaped(&mut out, "0123456789\"abcdefgh\\x\u{7f}é\u{1f}".as_bytes());
    let s = String::from_utf8(out).unwrap();
    assert_eq!(s, "\"0123456789\\\"abcdefgh\\\\x\u{7f}é\\u001f\"");
    assert_eq!(
        serde_json::from_str::<String>(&s).unwrap(),
        "0123456789\"abcdefgh\\x\u{7f}é\u{1f}"
    );
}

/// The byte-at-a-time escaping `escaped` must agree with.
fn escaped_bytewise(s: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c if c < 0x20 => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            c => out.push(c),
        }
    }
    out.push(b'"');
    out
}

/// Eight bytes looked at together find what one at a time finds: every byte value at every
/// place of strings of every length up to two words and more (shorter than a word, whole
/// words, a word and a part read overlapped), then random strings rich in what needs
/// escaping (and in bytes from 0x80 up, which borrow differently).
#[test]
fn escaping_a_word_at_a_time_agrees_with_a_byte_at_a_time() {
    let check = |s: &[u8]| {
        let mut out = Vec::new();
        escaped(&mut out, s);
        assert_eq!(out, escaped_bytewise(s), "{s:?}");
    };
    check(b"");
    for len in 1..=19 {
        for b in 0u8..=255 {
            for at in 0..len {
                let mut s = vec![b'a'; len];
                s[at] = b;
                check(&s);
                s.iter_mut().filter(|c| **c == b'a').for_each(|c| *c = 0xc3);
                check(&s);
            }
        }
    }
    let alphabet = [
        0u8, 0x1f, 0x20, b'"', b'\\', b'\n', 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xff, b'a',
    ];
    let mut rng = fastrand::Rng::with_seed(22);
    for _ in 0..20_000 {
        let n = rng.usize(0..40);
        let s: Vec<u8> = (0..n)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect();
        check(&s);
    }
}
