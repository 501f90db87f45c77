use std::sync::{Arc, Mutex};

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
        start: SystemTime::UNIX_EPOCH,
        total: Duration::from_millis(1),
        direction: Direction::outbound,
        dst_service: Label::from("svc.ns"),
        dst_workload: Label::default(),
        upstream: None,
        source_identity: Label::default(),
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
