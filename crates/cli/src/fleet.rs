//! `trellis stat` and `trellis edges`: the fleet's figures, from the control plane's API
//! (`/api/v1/stat`, `/api/v1/edges`), which holds what every proxy reported.

use anyhow::Result;
use hyper::Method;
use trellis_telemetry::view::{EdgeRow, Failures, Figures, StatRow};

use crate::{
    client::{query_value, Api, Conn},
    ctl::{table, FleetTarget},
};

/// Output of `stat` and `edges`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum ViewOutput {
    /// Aligned columns.
    Table,
    /// More columns: whose view, attempts and their success, localities.
    Wide,
    /// JSON, as the API gives it.
    Json,
}

/// What `stat` and `edges` show.
#[derive(clap::Args)]
pub(crate) struct ViewArgs {
    /// `svc/NAME`, `workload/NAME` (or `wl/NAME`), or a kind alone (`services`,
    /// `workloads`); services by default.
    target: Option<String>,
    /// Only this namespace (all namespaces without it).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Every namespace (the default; kept for kubectl's habit).
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
    /// How far back: 10s to 24h.
    #[arg(long, default_value = "1m")]
    window: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: ViewOutput,
    #[command(flatten)]
    conn: Conn,
}

impl ViewArgs {
    fn query(&self) -> Result<String> {
        let mut q = vec![format!("window={}", self.window)];
        let (kind, name, ns) = self.target()?;
        if let Some(kind) = kind {
            q.push(format!("kind={kind}"));
        }
        if let Some(n) = name {
            q.push(format!("name={}", query_value(&n)));
        }
        if let Some(ns) = ns {
            q.push(format!("namespace={}", query_value(&ns)));
        }
        Ok(q.join("&"))
    }

    /// The target's kind, name and namespace (the one in its name, else `-n`).
    fn target(&self) -> Result<(Option<&'static str>, Option<String>, Option<String>)> {
        match &self.target {
            Some(t) => {
                let f = FleetTarget::of(t, self.namespace.as_deref())?;
                Ok((Some(f.kind), f.name, f.ns))
            }
            None => Ok((None, None, self.namespace.clone())),
        }
    }
}

impl ViewArgs {
    /// When the view named a service or workload that the control plane does not hold (a
    /// typo, or the wrong namespace), a sentence saying so, for a view that came back empty.
    /// None when it exists or cannot be told.
    async fn undefined(&self, api: &Api) -> Option<String> {
        let (Some(kind), Some(name), ns) = self.target().ok()? else {
            return None;
        };
        let (title, plural) = match kind {
            "workload" => ("Workload", "workloads"),
            _ => ("Service", "services"),
        };
        let (path, found) = match &ns {
            Some(ns) => (
                format!(
                    "/api/v1/resources/{kind}/{}/{}",
                    query_value(ns),
                    query_value(&name)
                ),
                None,
            ),
            None => (format!("/api/v1/resources/{kind}"), Some(&name)),
        };
        let (status, v) = api.call_raw(Method::GET, &path, None).await.ok()?;
        let exists = match found {
            // Without a namespace, the view looks in every one.
            Some(name) => v["items"]
                .as_array()?
                .iter()
                .any(|o| o["metadata"]["name"] == name.as_str()),
            None if status == hyper::StatusCode::NOT_FOUND => false,
            None if status.is_success() => true,
            None => return None,
        };
        if exists {
            return None;
        }
        Some(match ns {
            Some(ns) => format!(
                "{title} {ns}/{name} is not defined (`trellis get {plural} -n {ns}` lists those that are)"
            ),
            None => format!(
                "No {title} named {name} is defined in any namespace (`trellis get {plural}` lists those that are)"
            ),
        })
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0))
}

/// Whether a row carries only TCP: no requests, and TCP connections that ended. Its success
/// and rate are then its connections'.
fn tcp_only(f: &Figures) -> bool {
    f.requests == 0 && f.tcp_closed > 0
}

/// A row's success: its requests', or a TCP-only row's connections' ("99.00% of 120 conn").
fn success(f: &Figures) -> String {
    match tcp_only(f) {
        true => format!("{} of {} conn", pct(f.tcp_success), f.tcp_closed),
        false => pct(f.success),
    }
}

/// A row's rate: requests per second, or a TCP-only row's connections that ended per second.
fn rate(f: &Figures) -> String {
    match tcp_only(f) {
        true => format!("{:.1} conn/s", f.tcp_cps),
        false => format!("{:.1}", f.rps),
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}ms"),
        Some(v) => format!("{v:.0}ms"),
    }
}

/// The most frequent failure class of each category: `network: connect_refused 3 · ...`;
/// the client's errors last (listed, not counted against success).
fn failures(f: &Failures) -> String {
    let parts: Vec<String> = [
        ("network", &f.network),
        ("app", &f.application),
        ("policy", &f.policy),
        ("client", &f.client),
    ]
    .iter()
    .filter_map(|(name, v)| {
        let total: u64 = v.iter().map(|c| c.count).sum();
        let top = v.first()?;
        let more = if v.len() > 1 { " +" } else { "" };
        Some(format!(
            "{name} {total} ({} {}{more})",
            top.class.as_str(),
            top.count
        ))
    })
    .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" · ")
    }
}

fn figures(f: &Figures) -> Vec<String> {
    vec![
        success(f),
        rate(f),
        ms(f.latency_ms.p50),
        ms(f.latency_ms.p95),
        ms(f.latency_ms.p99),
        f.tcp_open.to_string(),
        failures(&f.failures),
    ]
}

fn seen(s: trellis_telemetry::view::Seen) -> &'static str {
    match s {
        trellis_telemetry::view::Seen::Callers => "callers",
        trellis_telemetry::view::Seen::Served => "served",
    }
}

/// `trellis stat`.
pub(crate) async fn stat(a: &ViewArgs) -> Result<()> {
    let api = Api::new(&a.conn)?;
    let query = a.query()?;
    let v = api
        .call(Method::GET, &format!("/api/v1/stat?{query}"), None)
        .await?;
    if matches!(a.output, ViewOutput::Json) {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<StatRow> = serde_json::from_value(v)?;
    if rows.is_empty() {
        match a.undefined(&api).await {
            Some(what) => eprintln!("{what}; no traffic to it in the last {}.", a.window),
            None => eprintln!(
                "No traffic in the last {} (proxies report every 10 s by default).",
                a.window
            ),
        }
        return Ok(());
    }
    print_stat(&rows, matches!(a.output, ViewOutput::Wide));
    if !query.contains("kind=workload") {
        // A control plane that predates spill-over has no such view: the table stands alone.
        if let Err(e) = print_spill(&api, a).await {
            tracing::debug!(error = %e, "no spill-over view");
        }
        if let Err(e) = print_mirrors(&api, &query).await {
            tracing::debug!(error = %e, "no mirrors view");
        }
    }
    Ok(())
}

/// Below the services: where traffic spills over from one pool to the next, and since when.
async fn print_spill(api: &Api, a: &ViewArgs) -> Result<()> {
    let mut q = Vec::new();
    let (_, name, ns) = a.target()?;
    if let Some(ns) = ns {
        q.push(format!("namespace={}", query_value(&ns)));
    }
    if let Some(n) = name {
        q.push(format!("name={}", query_value(&n)));
    }
    let v = api
        .call(Method::GET, &format!("/api/v1/spill?{}", q.join("&")), None)
        .await?;
    let states: Vec<trellis_telemetry::load::SpillState> = serde_json::from_value(v)?;
    let now = trellis_telemetry::now_ms();
    let lines: Vec<String> = states
        .iter()
        .flat_map(|s| {
            s.lines(|at| {
                format!(
                    "{} ({} ago)",
                    trellis_telemetry::load::clock(at),
                    trellis_telemetry::diagnose::ago(now.saturating_sub(at))
                )
            })
        })
        .collect();
    if !lines.is_empty() {
        println!();
        for l in lines {
            println!("{l}");
        }
    }
    Ok(())
}

/// Below the services: each route's mirror and how its answers compared with the primary's.
async fn print_mirrors(api: &Api, query: &str) -> Result<()> {
    let v = api
        .call(Method::GET, &format!("/api/v1/mirrors?{query}"), None)
        .await?;
    let rows: Vec<trellis_telemetry::view::MirrorRow> = serde_json::from_value(v)?;
    if !rows.is_empty() {
        println!();
        for r in rows {
            println!("{}", r.line());
        }
    }
    Ok(())
}

/// `rows` as `trellis stat` prints them.
pub(crate) fn print_stat(rows: &[StatRow], wide: bool) {
    let mut header = vec![
        "NAME",
        "ENVIRONMENT",
        "MESHED",
        "SUCCESS",
        "RPS",
        "P50",
        "P95",
        "P99",
        "TCP",
        "FAILURES",
    ];
    // Workloads' adaptive concurrency limits, when any reported one.
    let limits = rows.iter().any(|r| r.adaptive.is_some());
    if limits {
        header.push("LIMIT (IN FLIGHT)");
    }
    if wide {
        header.extend([
            "SEEN BY",
            "REQUESTS",
            "ATTEMPTS",
            "ACTUAL SUCCESS",
            "LOCALITY",
        ]);
    }
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut l = vec![
                r.name.clone(),
                if r.environments.is_empty() {
                    "-".into()
                } else {
                    r.environments.join(",")
                },
                if r.meshed { "yes" } else { "no" }.into(),
            ];
            l.extend(figures(&r.figures));
            if limits {
                l.push(
                    r.adaptive
                        .map_or("-".into(), |a| format!("{} ({})", a.limit, a.in_flight)),
                );
            }
            if wide {
                l.extend([
                    seen(r.seen).into(),
                    r.figures.requests.to_string(),
                    r.figures.attempts.to_string(),
                    pct(r.figures.actual_success),
                    if r.localities.is_empty() {
                        "-".into()
                    } else {
                        r.localities.join(",")
                    },
                ]);
            }
            l
        })
        .collect();
    table(&header, &lines);
}

/// `trellis edges`.
pub(crate) async fn edges(a: &ViewArgs) -> Result<()> {
    let api = Api::new(&a.conn)?;
    let v = api
        .call(Method::GET, &format!("/api/v1/edges?{}", a.query()?), None)
        .await?;
    if matches!(a.output, ViewOutput::Json) {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<EdgeRow> = serde_json::from_value(v)?;
    if rows.is_empty() {
        match a.undefined(&api).await {
            Some(what) => eprintln!("{what}; no traffic to or from it in the last {}.", a.window),
            None => eprintln!("No traffic between workloads in the last {}.", a.window),
        }
        return Ok(());
    }
    print_edges(&rows, matches!(a.output, ViewOutput::Wide));
    Ok(())
}

/// `rows` as `trellis edges` prints them.
pub(crate) fn print_edges(rows: &[EdgeRow], wide: bool) {
    let mut header = vec![
        "SRC", "SRC ENV", "DST", "DST ENV", "MTLS", "SUCCESS", "RPS", "P99", "FAILURES",
    ];
    if wide {
        header.extend([
            "SERVICES",
            "SRC IDENTITY",
            "DST IDENTITY",
            "SEEN BY",
            "RTT",
            "RETRANS",
        ]);
    }
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|e| {
            let f = &e.figures;
            let mut l = vec![
                e.src.clone(),
                e.src_environment.clone(),
                e.dst.clone(),
                e.dst_environment.clone(),
                if e.mtls { "yes" } else { "no" }.into(),
                success(f),
                rate(f),
                ms(f.latency_ms.p99),
                failures(&f.failures),
            ];
            if wide {
                let or_dash = |s: &str| {
                    if s.is_empty() {
                        "-".to_string()
                    } else {
                        s.to_string()
                    }
                };
                l.extend([
                    e.services.join(","),
                    or_dash(&e.src_identity),
                    or_dash(&e.dst_identity),
                    seen(e.seen).into(),
                    e.link
                        .as_ref()
                        .map_or("-".into(), |k| format!("{:.2}ms", k.rtt_ms)),
                    e.link
                        .as_ref()
                        .map_or("-".into(), |k| format!("{:.2}%", k.retransmitted * 100.0)),
                ]);
            }
            l
        })
        .collect();
    table(&header, &lines);
}

/// Output of `tap`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum TapOutput {
    /// One line a request.
    Text,
    /// One JSON object a line, as the API gives it.
    Json,
}

/// What `tap` shows.
#[derive(clap::Args)]
pub(crate) struct TapArgs {
    /// `svc/NAME` (requests to a service, as its callers' proxies see them) or
    /// `workload/NAME` (everything the workload's proxy records).
    target: String,
    /// Namespace of NAME (`default` unless given here or as svc/NAMESPACE/NAME).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Only this method.
    #[arg(long)]
    method: Option<String>,
    /// Only paths starting so.
    #[arg(long)]
    path_prefix: Option<String>,
    /// Only this authority.
    #[arg(long)]
    authority: Option<String>,
    /// Only this failure class (`connect_refused`, `app_error`, ...).
    #[arg(long)]
    failure_class: Option<String>,
    /// At most this many requests a second, over every proxy.
    #[arg(long, default_value_t = 100.0)]
    max_rps: f64,
    /// Stop after this many requests.
    #[arg(long)]
    max_events: Option<u64>,
    /// Show the requests' and responses' header values (never those of `authorization`,
    /// `proxy-authorization`, `cookie` or `set-cookie`).
    #[arg(long)]
    headers: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: TapOutput,
    #[command(flatten)]
    conn: Conn,
}

impl TapArgs {
    /// The API path of this tap.
    fn path(&self) -> Result<String> {
        let a = self;
        let (t, name) = FleetTarget::named(&a.target, a.namespace.as_deref())?;
        let mut q = vec![
            format!("kind={}", t.kind),
            format!(
                "namespace={}",
                query_value(t.ns.as_deref().unwrap_or("default"))
            ),
            format!("name={}", query_value(&name)),
            format!("max_rps={}", a.max_rps),
        ];
        if a.headers {
            q.push("headers=true".into());
        }
        for (k, v) in [
            ("method", &a.method),
            ("path_prefix", &a.path_prefix),
            ("authority", &a.authority),
            ("failure_class", &a.failure_class),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", query_value(v)));
            }
        }
        Ok(format!("/api/v1/tap?{}", q.join("&")))
    }

    /// Says so on stderr when no proxy connected to the control plane would copy the
    /// tap's requests (nothing would show until one connects).
    fn say_reach(&self, h: &hyper::HeaderMap) {
        let reach = h
            .get("x-trellis-tap-proxies")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if reach != Some(0) {
            return;
        }
        let Ok((t, name)) = FleetTarget::named(&self.target, self.namespace.as_deref()) else {
            return;
        };
        let ns = t.ns.as_deref().unwrap_or("default");
        if t.kind == "workload" {
            eprintln!(
                "Workload {ns}/{name}'s proxy is not connected to the control plane: its requests show once it is (Ctrl-C to stop)."
            );
        } else {
            eprintln!(
                "No proxy is connected to the control plane: {ns}/{name}'s requests show once its callers' proxies are (Ctrl-C to stop)."
            );
        }
    }
}

/// `trellis tap`.
pub(crate) async fn tap(a: &TapArgs) -> Result<()> {
    let path = a.path()?;
    let api = Api::new(&a.conn)?;
    let mut seen = 0u64;
    let json = matches!(a.output, TapOutput::Json);
    api.stream_lines(
        &path,
        |h| a.say_reach(h),
        |line| {
            if json {
                println!("{}", String::from_utf8_lossy(line));
            } else if let Ok(e) = serde_json::from_slice::<serde_json::Value>(line) {
                println!("{}", tap_line(&e));
            }
            seen += 1;
            a.max_events.is_none_or(|m| seen < m)
        },
    )
    .await
}

/// One tapped request as a line.
fn tap_line(e: &serde_json::Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
    let src = e["src_workload"]
        .as_str()
        .or(e["src_identity"].as_str())
        .unwrap_or(if e["direction"] == "outbound" {
            "(this proxy)"
        } else {
            "-"
        })
        .to_string();
    let grpc = e["grpc_status"]
        .as_u64()
        .map(|g| format!(" grpc-status={g}"))
        .unwrap_or_default();
    let trace = e["trace_id"]
        .as_str()
        .map(|t| format!(" trace={t}"))
        .unwrap_or_default();
    // Where it went: workload, environment, locality, those known.
    let at: Vec<&str> = ["dst_workload", "dst_environment", "dst_locality"]
        .iter()
        .filter_map(|k| e[*k].as_str().filter(|v| !v.is_empty()))
        .collect();
    format!(
        "{} {src} -> {} ({}) {} {}{} {}{grpc} {} ({}) {:.2}ms attempts={} endpoint={}{trace}",
        s("direction"),
        s("dst_service"),
        at.join(" "),
        s("method"),
        s("authority"),
        s("path"),
        e["status"],
        s("class"),
        s("category"),
        e["latency_ms"].as_f64().unwrap_or(0.0),
        e["attempts"],
        s("endpoint"),
    ) + &headers_lines(e)
}

/// A tapped request's headers, indented under its line (`>` sent, `<` received).
fn headers_lines(e: &serde_json::Value) -> String {
    let mut out = String::new();
    for (key, mark) in [("request_headers", '>'), ("response_headers", '<')] {
        if let Some(h) = e[key].as_object() {
            for (k, v) in h {
                out.push_str(&format!(
                    "\n  {mark} {k}: {}",
                    v.as_str().unwrap_or_default()
                ));
            }
        }
    }
    out
}

/// What `top` shows.
#[derive(clap::Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    tap: TapArgs,
    /// Stop after this long and print the table once (without it: refresh every second
    /// until interrupted).
    #[arg(long)]
    duration: Option<trellis_model::value::DurationValue>,
}

/// A row's source, destination, method and path.
type TopKey = (String, String, String, String);

/// One row of `top`: a source, destination, method and path.
#[derive(Default)]
struct TopRow {
    count: u64,
    failed: u64,
    best: f64,
    worst: f64,
    last: f64,
    classes: std::collections::BTreeMap<String, u64>,
}

/// `trellis top`: the tap's requests added up by source, destination, method and path.
pub(crate) async fn top(a: &TopArgs) -> Result<()> {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };
    let path = a.tap.path()?;
    let api = Api::new(&a.tap.conn)?;
    let rows: Arc<Mutex<HashMap<TopKey, TopRow>>> = Arc::default();
    let r = rows.clone();
    let tap = &a.tap;
    let stream = async move {
        api.stream_lines(
            &path,
            |h| tap.say_reach(h),
            |line| {
                let Ok(e) = serde_json::from_slice::<serde_json::Value>(line) else {
                    return true;
                };
                let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
                let src = e["src_workload"]
                    .as_str()
                    .or(e["src_identity"].as_str())
                    .unwrap_or("-")
                    .to_string();
                let dst = format!("{} ({})", s("dst_service"), s("dst_workload"));
                let key = (src, dst, s("method"), s("path"));
                let ms = e["latency_ms"].as_f64().unwrap_or(0.0);
                let class = s("class");
                let failed = !matches!(e["category"].as_str(), Some("ok" | "client"));
                let mut rows = r.lock().unwrap_or_else(|p| p.into_inner());
                let row = rows.entry(key).or_default();
                row.best = if row.count == 0 { ms } else { row.best.min(ms) };
                row.worst = row.worst.max(ms);
                row.last = ms;
                row.count += 1;
                if failed {
                    row.failed += 1;
                    *row.classes.entry(class).or_default() += 1;
                }
                true
            },
        )
        .await
    };
    let print = |final_: bool| {
        let rows = rows.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = rows.iter().collect();
        v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        let lines: Vec<Vec<String>> = v
            .iter()
            .map(|((src, dst, method, path), r)| {
                let top_class = r
                    .classes
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map_or("-".to_string(), |(c, n)| format!("{c} {n}"));
                vec![
                    src.clone(),
                    dst.clone(),
                    method.clone(),
                    path.clone(),
                    r.count.to_string(),
                    pct(Some((r.count - r.failed) as f64 / r.count as f64)),
                    ms(Some(r.best)),
                    ms(Some(r.worst)),
                    ms(Some(r.last)),
                    top_class,
                ]
            })
            .collect();
        if !final_ {
            // Clear the terminal and draw again.
            print!("\x1b[2J\x1b[H");
        }
        table(
            &[
                "SOURCE",
                "DESTINATION",
                "METHOD",
                "PATH",
                "COUNT",
                "SUCCESS",
                "BEST",
                "WORST",
                "LAST",
                "FAILURE",
            ],
            &lines,
        );
    };
    let refresh = std::io::IsTerminal::is_terminal(&std::io::stdout()) && a.duration.is_none();
    tokio::pin!(stream);
    let until = a
        .duration
        .as_ref()
        .map(|d| tokio::time::Instant::now() + d.0);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            r = &mut stream => {
                r?;
                break;
            }
            _ = tick.tick() => {
                if refresh {
                    print(false);
                }
                if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    print(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_with_only_tcp_shows_its_connections_success() {
        let http = Figures {
            requests: 10,
            success: Some(0.9),
            tcp_closed: 4,
            tcp_success: Some(0.5),
            ..Figures::default()
        };
        assert_eq!(success(&http), "90.00%");
        let tcp = Figures {
            tcp_closed: 5,
            tcp_success: Some(0.8),
            ..Figures::default()
        };
        assert_eq!(success(&tcp), "80.00% of 5 conn");
        assert_eq!(success(&Figures::default()), "-");
        // Its rate is of connections; a row with requests keeps its requests' rate.
        let tcp = Figures {
            tcp_cps: 0.25,
            ..tcp
        };
        assert_eq!(rate(&tcp), "0.2 conn/s");
        let http = Figures { rps: 3.0, ..http };
        assert_eq!(rate(&http), "3.0");
        assert_eq!(rate(&Figures::default()), "0.0");
    }
}
