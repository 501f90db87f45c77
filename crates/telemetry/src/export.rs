//! The fleet in Prometheus's text format: one scrape of the control plane for the whole
//! mesh. Counters run from the control plane's start; latency buckets are fixed powers of
//! two (1 µs to 64 s), so that every series has the same `le` values and
//! `histogram_quantile` can aggregate them.

use std::fmt::Write;

use trellis_taxonomy::FailureClass;

use crate::{
    key::{Direction, Protocol},
    store::{Store, TotalKey},
};

/// Powers of two used as `le` bounds: 2^-20 s (about 1 µs) to 2^6 s.
const LE: std::ops::RangeInclusive<i32> = -20..=6;

fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

fn dir(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    }
}

fn labels(k: &TotalKey) -> String {
    format!(
        "direction=\"{}\",workload=\"{}\",environment=\"{}\",service=\"{}\",peer_workload=\"{}\"",
        dir(k.direction),
        escape(&k.workload),
        escape(&k.environment),
        escape(&k.service),
        escape(&k.peer_workload),
    )
}

fn class_labels(c: FailureClass) -> String {
    format!(
        "class=\"{}\",category=\"{}\",success=\"{}\"",
        c.as_str(),
        c.category().as_str(),
        !matches!(
            c.category(),
            trellis_taxonomy::Category::Network
                | trellis_taxonomy::Category::Application
                | trellis_taxonomy::Category::Policy
        )
    )
}

/// Render `store` for a scrape.
pub fn prometheus(store: &Store) -> String {
    let mut keys: Vec<_> = store.totals().iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    let mut o = String::new();
    let http = || keys.iter().filter(|(k, _)| k.protocol == Protocol::Http);
    let _ = writeln!(o, "# HELP trellis_fleet_requests_total Requests the fleet's proxies recorded, as the caller got them (outbound) or as served (inbound).\n# TYPE trellis_fleet_requests_total counter");
    for (k, t) in http() {
        let _ = writeln!(
            o,
            "trellis_fleet_requests_total{{{},{}}} {}",
            labels(k),
            class_labels(k.class),
            t.requests
        );
    }
    let _ = writeln!(o, "# HELP trellis_fleet_attempts_total Attempts made for those requests (retries included).\n# TYPE trellis_fleet_attempts_total counter");
    for (k, t) in http() {
        let _ = writeln!(
            o,
            "trellis_fleet_attempts_total{{{},{}}} {}",
            labels(k),
            class_labels(k.class),
            t.attempts
        );
    }
    // Latency by direction, workload, service and peer: classes merged.
    let lat: std::collections::BTreeMap<String, &crate::hist::Histogram> = store
        .latency_totals()
        .iter()
        .map(|(k, h)| {
            let l = format!(
                "direction=\"{}\",workload=\"{}\",service=\"{}\",peer_workload=\"{}\"",
                dir(k.direction),
                escape(&k.workload),
                escape(&k.service),
                escape(&k.peer_workload)
            );
            (l, h)
        })
        .collect();
    let _ = writeln!(o, "# HELP trellis_fleet_request_duration_seconds Request latency the fleet's proxies recorded.\n# TYPE trellis_fleet_request_duration_seconds histogram");
    for (l, h) in &lat {
        for k in LE {
            let le = f64::powi(2.0, k);
            // At scale 0 bucket i holds (2^i, 2^(i+1)]: values up to 2^k are buckets below k.
            let n = h.zero_count()
                + h.counts()
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| ((h.offset() + *j as i32) >> -i32::from(h.scale().min(0))) < k)
                    .map(|(_, c)| c)
                    .sum::<u64>();
            let _ = writeln!(
                o,
                "trellis_fleet_request_duration_seconds_bucket{{{l},le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "trellis_fleet_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
            h.count()
        );
        let _ = writeln!(
            o,
            "trellis_fleet_request_duration_seconds_sum{{{l}}} {}",
            h.sum()
        );
        let _ = writeln!(
            o,
            "trellis_fleet_request_duration_seconds_count{{{l}}} {}",
            h.count()
        );
    }
    let _ = writeln!(o, "# HELP trellis_fleet_tcp_connections_total TCP connections the fleet's proxies closed.\n# TYPE trellis_fleet_tcp_connections_total counter");
    for (k, t) in keys
        .iter()
        .filter(|(k, t)| k.protocol == Protocol::Tcp && t.tcp_closed > 0)
    {
        let _ = writeln!(
            o,
            "trellis_fleet_tcp_connections_total{{{},{}}} {}",
            labels(k),
            class_labels(k.class),
            t.tcp_closed
        );
    }
    let gauges = [
        (
            "trellis_fleet_store_bytes",
            "gauge",
            "Bytes the control plane's telemetry slots take, as it counts them.",
            store.bytes() as u64,
        ),
        (
            "trellis_fleet_held_from_seconds",
            "gauge",
            "Unix time from which every slot is still held (0: none dropped before its retention).",
            store.held_from_ms() / 1000,
        ),
        (
            "trellis_fleet_series",
            "gauge",
            "Series the control plane holds.",
            store.series_count() as u64,
        ),
        (
            "trellis_fleet_reporters",
            "gauge",
            "Proxies whose reports the control plane holds.",
            store.reporters().len() as u64,
        ),
        (
            "trellis_fleet_series_folded",
            "counter",
            "Series folded into `other` rows because a cap was reached.",
            store.folded(),
        ),
        (
            "trellis_fleet_reports_lost",
            "counter",
            "Reports never received (gaps in a proxy's numbers).",
            store.lost(),
        ),
        (
            "trellis_fleet_reports_duplicate",
            "counter",
            "Reports received again after they were merged.",
            store.duplicates(),
        ),
    ];
    for (name, kind, help, v) in gauges {
        let name = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_string()
        };
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    o
}
