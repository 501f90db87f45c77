//! `trellis diagnose`: the control plane's verdicts (`/api/v1/diagnose`): what fails, whether
//! the network, the application, the mesh's policy or the configuration, where, the evidence
//! of both ends of each hop, and the next thing to check.

use std::collections::BTreeMap;

use anyhow::Result;
use hyper::Method;
use trellis_proxy::FailureClass;
use trellis_telemetry::diagnose::{Cause, End, Judged, Place, Verdict};

use crate::{
    client::{query_value, Api, Conn},
    ctl::FleetTarget,
};

/// Output of `diagnose`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Output {
    /// One block per problem.
    Text,
    /// JSON, as the API gives it.
    Json,
}

/// What `diagnose` looks at.
#[derive(clap::Args)]
pub(crate) struct DiagnoseArgs {
    /// `svc/NAME` or `workload/NAME` (the whole mesh, or the namespace, without it).
    target: Option<String>,
    /// Only this namespace.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// How far back: 10s to 24h.
    #[arg(long, default_value = "5m")]
    since: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    conn: Conn,
}

impl DiagnoseArgs {
    fn query(&self) -> Result<String> {
        let mut q = vec![format!("window={}", query_value(&self.since))];
        let mut ns = self.namespace.clone();
        if let Some(t) = &self.target {
            let (t, name) = FleetTarget::named(t, self.namespace.as_deref())?;
            q.push(format!("kind={}", t.kind));
            q.push(format!("name={}", query_value(&name)));
            ns = t.ns;
        }
        if let Some(ns) = &ns {
            q.push(format!("namespace={}", query_value(ns)));
        }
        Ok(q.join("&"))
    }
}

fn cause(c: Cause) -> &'static str {
    match c {
        Cause::Network => "NETWORK",
        Cause::Application => "APPLICATION",
        Cause::MeshPolicy => "MESH POLICY",
        Cause::Configuration => "CONFIGURATION",
        Cause::Client => "CLIENT",
    }
}

fn end(e: &End) -> String {
    let mut parts: Vec<&str> = Vec::new();
    if !e.environment.is_empty() && e.environment != "unknown" {
        parts.push(&e.environment);
    }
    if !e.locality.is_empty() {
        parts.push(&e.locality);
    }
    let who = if e.workload.is_empty() {
        "unmeshed callers"
    } else {
        &e.workload
    };
    if parts.is_empty() {
        who.to_string()
    } else {
        format!("{who} ({})", parts.join(", "))
    }
}

fn place(p: &Place) -> String {
    match p {
        Place::Workload { at } => format!("workload {}", end(at)),
        Place::Link { from, to } => format!("link {} -> {}", end(from), end(to)),
        Place::Service { name } => format!("service {name}"),
        Place::Resource { name } => name.clone(),
    }
}

fn counts(m: &BTreeMap<FailureClass, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One verdict as a block of text.
pub(crate) fn block(v: &Verdict) -> String {
    let mut out = format!("✗ {}: {}\n", cause(v.cause), v.problem);
    out.push_str(&format!("  where:       {}\n", place(&v.place)));
    if !v.services.is_empty() {
        out.push_str(&format!("  services:    {}\n", v.services.join(", ")));
    }
    if let (Some(first), Some(last)) = (v.first_ms, v.last_ms) {
        let now = trellis_telemetry::now_ms();
        out.push_str(&format!(
            "  seen:        first {} ago, last {} ago\n",
            trellis_telemetry::diagnose::ago(now.saturating_sub(first)),
            trellis_telemetry::diagnose::ago(now.saturating_sub(last))
        ));
    }
    out.push_str(&format!("  caller saw:  {}\n", counts(&v.caller_saw)));
    out.push_str(&format!("  callee saw:  {}\n", counts(&v.callee_saw)));
    out.push_str("  evidence:\n");
    for e in &v.evidence {
        out.push_str(&format!("    - {e}\n"));
    }
    if !v.traces.is_empty() {
        out.push_str(&format!("  traces:      {}\n", v.traces.join(", ")));
    }
    out.push_str(&format!("  next:        {}\n", v.next));
    out
}

/// What diagnose says when it found nothing, by what it had to judge.
fn nothing_found(since: &str, j: Judged, connected: usize) -> String {
    let count = |n: u64, one: &str, many: &str| match n {
        1 => format!("1 {one}"),
        n => format!("{n} {many}"),
    };
    let proxies = count(j.proxies as u64, "proxy", "proxies");
    if j.proxies == 0 && connected > 0 {
        format!(
            "No report yet from the {} connected: nothing to judge in the last {since} (proxies report every 10 s by default).",
            count(connected as u64, "proxy", "proxies")
        )
    } else if j.proxies == 0 {
        format!(
            "No proxy reported in the last {since}: nothing to judge (proxies report every 10 s; `trellis status` lists the connected ones)."
        )
    } else if j.requests == 0 && j.connections == 0 {
        format!("No traffic in the last {since}: {proxies} reported, none of it requests or connections, so nothing to judge.")
    } else {
        format!(
            "No problem found in the last {since}, in {} and {} that {proxies} reported (each hop counted at both ends).",
            count(j.requests, "request", "requests"),
            count(j.connections, "TCP connection", "TCP connections")
        )
    }
}

/// `trellis diagnose`.
pub(crate) async fn run(a: &DiagnoseArgs) -> Result<()> {
    let api = Api::new(&a.conn)?;
    let v = api
        .call(
            Method::GET,
            &format!("/api/v1/diagnose?{}", a.query()?),
            None,
        )
        .await?;
    if matches!(a.output, Output::Json) {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let verdicts: Vec<Verdict> = serde_json::from_value(v["verdicts"].clone())?;
    if verdicts.is_empty() {
        // Nothing failed, or nothing to judge: an answer from no report is not a clean bill.
        let judged: Judged = serde_json::from_value(v["judged"].clone()).unwrap_or_default();
        let connected = v["connected"].as_u64().unwrap_or(0) as usize;
        println!("{}", nothing_found(&a.since, judged, connected));
        return Ok(());
    }
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for x in &verdicts {
        *by.entry(cause(x.cause)).or_default() += 1;
    }
    let summary: Vec<String> = by
        .iter()
        .map(|(c, n)| format!("{} {n}", c.to_lowercase()))
        .collect();
    println!(
        "{} problem(s) in the last {}: {}\n",
        verdicts.len(),
        a.since,
        summary.join(", ")
    );
    for x in &verdicts {
        println!("{}", block(x));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no verdict, diagnose says whether nothing failed or there was nothing to judge.
    #[test]
    fn finding_nothing_says_what_was_judged() {
        let j = |proxies, requests, connections| Judged {
            proxies,
            requests,
            connections,
        };
        assert!(nothing_found("5m", j(0, 0, 0), 0)
            .starts_with("No proxy reported in the last 5m: nothing to judge"));
        // Connected and not reported yet (the first report comes after an interval).
        assert!(nothing_found("5m", j(0, 0, 0), 2)
            .starts_with("No report yet from the 2 proxies connected: nothing to judge"));
        assert!(nothing_found("5m", j(2, 0, 0), 2)
            .starts_with("No traffic in the last 5m: 2 proxies reported"));
        assert_eq!(
            nothing_found("1m", j(1, 40, 1), 1),
            "No problem found in the last 1m, in 40 requests and 1 TCP connection that 1 proxy reported (each hop counted at both ends)."
        );
    }
}
