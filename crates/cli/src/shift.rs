//! `trellis shift`: progressive delivery from the command line. `shift svc/NAME --to
//! BACKEND` applies a Rollout (the control plane runs it: steps, analysis, rollback), so
//! nothing depends on this command staying up; `shift status|pause|resume|abort|promote`
//! read and move it.

use anyhow::{bail, Result};
use hyper::Method;
use serde_json::Value;

use crate::client::{query_value as enc, Api, Conn};

/// `trellis shift`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ShiftArgs {
    #[command(subcommand)]
    action: Option<ShiftCmd>,
    #[command(flatten)]
    start: StartArgs,
}

/// What `shift svc/NAME --to BACKEND` takes.
#[derive(clap::Args)]
pub(crate) struct StartArgs {
    /// The Service whose traffic shifts: `svc/NAME`.
    target: Option<String>,
    /// The backend Service taking the traffic (the canary).
    #[arg(long)]
    to: Option<String>,
    /// The backend Service serving it now, which the canary replaces (default: the one
    /// backend with traffic in the Service's routes; with several, this is needed).
    #[arg(long)]
    from: Option<String>,
    /// The canary's percent of the stable backend's traffic at each step (a rule's other
    /// backends keep their share).
    #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
    steps: Vec<u32>,
    /// How long each step holds at least.
    #[arg(long, default_value = "30s")]
    interval: String,
    /// A dark stage first: this percent of the requests copied to the canary (its answers
    /// discarded) and judged as a step is, before any user reaches it. Writes (POST, PUT,
    /// DELETE…) are copied too: their side effects at the canary are not discarded.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    mirror: Option<u32>,
    /// Requests the canary must answer in a step before it can pass.
    #[arg(long, default_value_t = 100)]
    min_requests: u32,
    /// How far the canary's error rate may be above the stable's, in percentage points.
    #[arg(long, default_value_t = 1.0)]
    max_error_increase: f64,
    /// How many times the stable's p99 latency the canary's may be (plus 5 ms).
    #[arg(long, default_value_t = 1.5)]
    max_latency_ratio: f64,
    /// On a failed analysis: roll back (the default) or pause.
    #[arg(long, value_parser = ["rollback", "pause"], default_value = "rollback")]
    on_failure: String,
    /// Namespace (default: `default`).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// `trellis shift ACTION`.
#[derive(clap::Subcommand)]
pub(crate) enum ShiftCmd {
    /// Where rollouts are: phase, step, weight, the last analysis and what happened.
    Status(OneArgs),
    /// Hold the weights where they are.
    Pause(OneArgs),
    /// Go on from the step it was paused at (the step begins again).
    Resume(OneArgs),
    /// Send all the traffic back to the stable backend now.
    Abort(OneArgs),
    /// Send all the traffic to the canary now.
    Promote(OneArgs),
}

/// One rollout (all of them, for `status` without one).
#[derive(clap::Args)]
pub(crate) struct OneArgs {
    /// `svc/NAME` (a rollout is named after its Service).
    target: Option<String>,
    /// Namespace (default: `default`; `status` without one: every namespace).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// JSON, as the API gives it (`status`).
    #[arg(short = 'o', long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
    #[command(flatten)]
    conn: Conn,
}

/// The Service a rollout is about: `svc/NAME` (namespace by `-n`, else `default`) or
/// `svc/NAMESPACE/NAME`, as `get` and `describe` take it.
fn service(target: &str, ns: Option<&str>) -> Result<(String, String)> {
    let (t, name) = crate::ctl::FleetTarget::named(target, ns)?;
    if t.kind != "service" {
        bail!("{target:?}: give svc/NAME (or svc/NAMESPACE/NAME)");
    }
    Ok((t.ns.unwrap_or_else(|| "default".into()), name))
}

/// `trellis shift …`.
pub(crate) async fn run(a: &ShiftArgs) -> Result<()> {
    match &a.action {
        None => start(&a.start).await,
        Some(ShiftCmd::Status(o)) => status(o).await,
        Some(ShiftCmd::Pause(o)) => act(o, "pause").await,
        Some(ShiftCmd::Resume(o)) => act(o, "resume").await,
        Some(ShiftCmd::Abort(o)) => act(o, "abort").await,
        Some(ShiftCmd::Promote(o)) => act(o, "promote").await,
    }
}

async fn start(a: &StartArgs) -> Result<()> {
    let Some(target) = &a.target else {
        bail!("give svc/NAME --to BACKEND, or one of status, pause, resume, abort, promote");
    };
    let (ns, service) = service(target, a.namespace.as_deref())?;
    let (ns, service) = (ns.as_str(), service.as_str());
    let Some(canary) = &a.to else {
        bail!("--to BACKEND: the Service to shift {target}'s traffic to");
    };
    let api = Api::new(&a.conn)?;
    // A route's share for a Service that does not exist is answered 500: a typo here would
    // fail that share of the stable's traffic (the control plane holds such a rollout
    // unstarted, too).
    let (status, _) = api
        .call_raw(
            Method::GET,
            &format!("/api/v1/resources/Service/{}/{}", enc(ns), enc(canary)),
            None,
        )
        .await?;
    if status == hyper::StatusCode::NOT_FOUND {
        bail!("there is no Service {ns}/{canary} to shift to: create the canary's Service first (its selector picks the new version's workloads)");
    }
    let stable = match &a.from {
        Some(s) => s.clone(),
        None => stable_backend(&api, ns, service, canary).await?,
    };
    let steps: Vec<String> = a.steps.iter().map(u32::to_string).collect();
    let mirror = a
        .mirror
        .map(|p| format!("  mirror: {{ percent: {p} }}\n"))
        .unwrap_or_default();
    let yaml = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Rollout\nmetadata: {{ name: {service}, namespace: {ns} }}\nspec:\n  service: {service}\n  stable: {stable}\n  canary: {canary}\n  steps: [{}]\n  interval: {}\n{mirror}  analysis:\n    minRequests: {}\n    maxErrorRateIncrease: {}\n    maxLatencyRatio: {}\n  onFailure: {}\n",
        steps.join(", "),
        a.interval,
        a.min_requests,
        a.max_error_increase,
        a.max_latency_ratio,
        if a.on_failure == "pause" { "Pause" } else { "Rollback" },
    );
    api.call(
        Method::POST,
        &format!("/api/v1/apply?file={}", enc("trellis shift")),
        Some(yaml),
    )
    .await?;
    let dark = a
        .mirror
        .map(|p| format!(" after a dark stage ({p} % of the requests copied to it, writes included: their side effects at the canary are real)"))
        .unwrap_or_default();
    println!(
        "rollout {ns}/{service}: {stable} → {canary}{dark} in steps of {} %, each held {} and at least {} canary requests; the control plane runs it (follow with `trellis shift status svc/{service} -n {ns}`)",
        steps.join(", "),
        a.interval,
        a.min_requests
    );
    Ok(())
}

/// The stable backend of `service`'s routes, when they name one: [`stable_of`].
async fn stable_backend(api: &Api, ns: &str, service: &str, canary: &str) -> Result<String> {
    let mut routes = Vec::new();
    for kind in ["HTTPRoute", "GRPCRoute"] {
        let v = api
            .call(
                Method::GET,
                &format!("/api/v1/resources/{kind}/{}", enc(ns)),
                None,
            )
            .await?;
        if let Some(items) = v["items"].as_array() {
            routes.extend(items.iter().cloned());
        }
    }
    stable_of(&routes, ns, service, canary).map_err(|why| anyhow::anyhow!("{why}"))
}

/// The one backend (other than `canary`) with traffic in the routes whose parent is
/// `service`. Several: the operator names it with `--from` (taking the one with the most
/// weight would roll an `/admin` rule's backend, or a legacy pool, over to the canary).
fn stable_of(routes: &[Value], ns: &str, service: &str, canary: &str) -> Result<String, String> {
    let mut found: Vec<&str> = Vec::new();
    for r in routes {
        let parents = r["spec"]["parentRefs"].as_array().into_iter().flatten();
        if !parents.into_iter().any(|p| p["name"] == service) {
            continue;
        }
        for rule in r["spec"]["rules"].as_array().into_iter().flatten() {
            for b in rule["backendRefs"].as_array().into_iter().flatten() {
                let name = b["name"].as_str().unwrap_or_default();
                // A backend at weight 0 (a finished rollout's old version) gets nothing.
                let weight = b["weight"].as_u64().unwrap_or(1);
                if name != canary && weight > 0 && !found.contains(&name) {
                    found.push(name);
                }
            }
        }
    }
    match found.as_slice() {
        [one] => Ok((*one).to_string()),
        [] => Err(format!("no HTTPRoute or GRPCRoute in namespace {ns} sends svc/{service}'s traffic to a backend: write one (the stable backend), give --from, or name the namespace (-n NS or svc/NS/NAME)")),
        many => Err(format!(
            "svc/{service}'s routes send traffic to {}: name the stable backend, the one the canary replaces, with --from",
            many.join(", ")
        )),
    }
}

async fn act(o: &OneArgs, action: &str) -> Result<()> {
    let Some(target) = &o.target else {
        bail!("give svc/NAME");
    };
    let (ns, name) = service(target, o.namespace.as_deref())?;
    let (ns, name) = (ns.as_str(), name.as_str());
    let api = Api::new(&o.conn)?;
    let v = api
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{}/{}/{action}", enc(ns), enc(name)),
            None,
        )
        .await?;
    print_status(&v, trellis_telemetry::now_ms());
    Ok(())
}

async fn status(o: &OneArgs) -> Result<()> {
    let api = Api::new(&o.conn)?;
    let mut q = Vec::new();
    match &o.target {
        Some(t) => {
            let (ns, name) = service(t, o.namespace.as_deref())?;
            q.push(format!("namespace={}", enc(&ns)));
            q.push(format!("name={}", enc(&name)));
        }
        None => {
            if let Some(ns) = &o.namespace {
                q.push(format!("namespace={}", enc(ns)));
            }
        }
    }
    let v = api
        .call(
            Method::GET,
            &format!("/api/v1/rollouts?{}", q.join("&")),
            None,
        )
        .await?;
    if o.output == "json" {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let all = v.as_array().cloned().unwrap_or_default();
    if all.is_empty() {
        println!("No rollouts.");
    }
    let now = trellis_telemetry::now_ms();
    for r in &all {
        print_status(r, now);
    }
    Ok(())
}

/// One rollout as `shift status` (and `describe`) prints it.
pub(crate) fn print_status(r: &Value, now: u64) {
    let ago = |at: u64| trellis_telemetry::diagnose::ago(now.saturating_sub(at));
    let steps: Vec<String> = r["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s.to_string())
        .collect();
    let phase = r["phase"].as_str().unwrap_or("pending");
    let (ns, name, stable, canary) = (
        r["namespace"].as_str().unwrap_or_default(),
        r["name"].as_str().unwrap_or_default(),
        r["stable"].as_str().unwrap_or_default(),
        r["canary"].as_str().unwrap_or_default(),
    );
    if r["dark"] == true {
        println!(
            "{ns}/{name}: {stable} → {canary}: {phase}, dark stage: {} % of the requests copied to the canary, none of them answered by it (then steps of {} %)",
            r["mirror"],
            steps.join(", "),
        );
    } else {
        println!(
            "{ns}/{name}: {stable} → {canary}: {phase}, canary at {} % (step {} of {}: {} %)",
            r["weight"],
            r["step"].as_u64().unwrap_or(0) + 1,
            steps.len(),
            steps.join(", "),
        );
    }
    if let Some(reason) = r["reason"].as_str().filter(|s| !s.is_empty()) {
        println!("  why: {reason}");
    }
    if let Some(a) = r.get("analysis").filter(|a| !a.is_null()) {
        println!(
            "  analysis ({} ago): {}: {}",
            ago(a["at_ms"].as_u64().unwrap_or(now)),
            a["verdict"].as_str().unwrap_or_default(),
            a["message"].as_str().unwrap_or_default()
        );
    }
    for h in r["history"].as_array().into_iter().flatten() {
        println!(
            "  {} ago  {:<11} {:>3} %  {}",
            ago(h["at_ms"].as_u64().unwrap_or(now)),
            h["what"].as_str().unwrap_or_default(),
            h["weight"],
            h["detail"].as_str().unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{service, stable_of};
    use serde_json::json;

    #[test]
    fn the_stable_backend_is_the_one_backend_with_traffic_or_named_by_the_operator() {
        let route = |parent: &str, backends: serde_json::Value| json!({ "spec": { "parentRefs": [{ "name": parent }], "rules": [{ "backendRefs": backends }] } });
        let one = route("catalog", json!([{ "name": "catalog-v1", "port": 80 }]));
        let other = route("search", json!([{ "name": "search-v1", "port": 80 }]));
        assert_eq!(
            stable_of(
                &[other.clone(), one.clone()],
                "shop",
                "catalog",
                "catalog-v2"
            ),
            Ok("catalog-v1".into())
        );
        // A finished rollout: the old version at 0, the canary of then at 100.
        let done = route(
            "catalog",
            json!([{ "name": "catalog-v1", "port": 80, "weight": 0 },
                   { "name": "catalog-v2", "port": 80, "weight": 100 }]),
        );
        assert_eq!(
            stable_of(&[done], "shop", "catalog", "catalog-v3"),
            Ok("catalog-v2".into())
        );
        // Rolled back: the canary at 0 is not a candidate either way.
        let back = route(
            "catalog",
            json!([{ "name": "catalog-v1", "port": 80, "weight": 100 },
                   { "name": "catalog-v2", "port": 80, "weight": 0 }]),
        );
        assert_eq!(
            stable_of(&[back], "shop", "catalog", "catalog-v2"),
            Ok("catalog-v1".into())
        );
        // A legacy pool beside it, or an /admin rule's backend: the operator says which.
        let legacy = route(
            "catalog",
            json!([{ "name": "legacy", "port": 80, "weight": 3 }, { "name": "catalog-v1", "port": 80 }]),
        );
        let why = stable_of(&[legacy], "shop", "catalog", "catalog-v2").unwrap_err();
        assert!(
            why.contains("send traffic to legacy, catalog-v1") && why.contains("--from"),
            "{why}"
        );
        let admin = route("catalog", json!([{ "name": "admin", "port": 80 }]));
        assert!(stable_of(&[admin, one], "shop", "catalog", "catalog-v2").is_err());
        assert!(stable_of(&[other], "shop", "catalog", "catalog-v2")
            .unwrap_err()
            .contains("no HTTPRoute or GRPCRoute in namespace shop"));
    }

    #[test]
    fn a_rollout_names_its_service_as_get_does() {
        let s = |t, ns| service(t, ns).map_err(|e| e.to_string());
        let want = Ok(("shop".to_string(), "catalog".to_string()));
        assert_eq!(s("svc/catalog", Some("shop")), want);
        assert_eq!(s("svc/shop/catalog", None), want);
        assert_eq!(s("service/shop/catalog", Some("shop")), want);
        assert_eq!(
            s("svc/catalog", None),
            Ok(("default".into(), "catalog".into()))
        );
        assert!(s("svc/shop/catalog", Some("other"))
            .unwrap_err()
            .contains("given twice"));
        assert!(s("wl/catalog", None).unwrap_err().contains("give svc/NAME"));
        assert!(s("catalog", None).unwrap_err().contains("give svc/NAME"));
        assert!(s("route/catalog", None)
            .unwrap_err()
            .contains("give svc/NAME"));
        assert!(s("svc/", None).is_err());
    }
}
