//! The kubectl-style commands: `apply`, `get`, `delete`, `describe`, `status`, `login`.

use std::{io::Read, path::Path};

use anyhow::{bail, Context, Result};
use hyper::Method;
use serde_json::Value;

use crate::client::{config_path, Api, Conn, Saved};

/// Output format of `get`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns.
    Table,
    /// Multi-document YAML (re-appliable).
    Yaml,
    /// JSON.
    Json,
}

/// The files `-f` names: a file, every `.yaml`/`.yml`/`.json` in a directory (sorted), or `-`.
fn read_inputs(f: &str) -> Result<Vec<(String, String)>> {
    if f == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        return Ok(vec![("stdin".into(), s)]);
    }
    let p = Path::new(f);
    if p.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(p)
            .with_context(|| f.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        return files
            .into_iter()
            .map(|p| {
                let s = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
                Ok((p.display().to_string(), s))
            })
            .collect();
    }
    let s = std::fs::read_to_string(p).with_context(|| format!("{f}: cannot read"))?;
    Ok(vec![(f.to_string(), s)])
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `trellis apply -f`: every document of all files in one atomic apply.
pub(crate) async fn apply(conn: &Conn, f: &str) -> Result<()> {
    let api = Api::new(conn)?;
    let inputs = read_inputs(f)?;
    if inputs.is_empty() {
        bail!("{f}: no .yaml, .yml or .json files");
    }
    // One file is sent as is, so that errors name its lines. Several files from a directory
    // are joined into one apply (all or nothing); errors then name lines of the joined text,
    // and the file name lists them all.
    let (name, text) = if inputs.len() == 1 {
        inputs.into_iter().next().expect("one")
    } else {
        let names: Vec<String> = inputs.iter().map(|(n, _)| n.clone()).collect();
        let text = inputs
            .into_iter()
            .map(|(_, t)| t.trim_end().trim_start_matches("---").to_string())
            .collect::<Vec<_>>()
            .join("\n---\n");
        (names.join("+"), text)
    };
    let v = api
        .call(
            Method::POST,
            &format!("/api/v1/apply?file={}", enc(&name)),
            Some(text),
        )
        .await?;
    for a in v["applied"].as_array().into_iter().flatten() {
        let what = format!(
            "{} {}/{}",
            a["kind"].as_str().unwrap_or_default().to_lowercase(),
            a["namespace"].as_str().unwrap_or_default(),
            a["name"].as_str().unwrap_or_default(),
        );
        println!("{what} {}", a["action"].as_str().unwrap_or_default());
        if let Some(w) = a["warning"].as_str() {
            eprintln!("warning: {what}: {w}");
        }
    }
    Ok(())
}

fn conditions_summary(doc: &Value) -> String {
    let conds = doc["status"]["conditions"].as_array();
    match conds {
        None => "-".into(),
        Some(cs) => {
            let bad: Vec<&str> = cs
                .iter()
                .filter(|c| c["status"] == "False")
                .filter_map(|c| c["type"].as_str())
                .collect();
            if bad.is_empty() {
                "Ready".into()
            } else {
                format!("Not{}", bad.join(",Not"))
            }
        }
    }
}

fn detail(doc: &Value) -> String {
    let spec = &doc["spec"];
    match doc["kind"].as_str().unwrap_or_default() {
        "Service" => {
            let ports = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("HTTP")))
                .collect::<Vec<_>>()
                .join(",");
            match spec["virtualIP"].as_str() {
                Some(ip) => format!("{ports} {ip}"),
                None => ports,
            }
        }
        "Workload" => format!(
            "{} {}{}",
            spec["address"].as_str().unwrap_or_default(),
            spec["environment"].as_str().unwrap_or("bare-metal"),
            // Set by its agent: say so only when it is down.
            if doc["status"]["health"]["healthy"] == false
                || (doc["status"]["health"].is_null() && spec["healthy"] == false)
            {
                " UNHEALTHY"
            } else {
                ""
            }
        ),
        "HTTPRoute" | "GRPCRoute" => {
            let backends: Vec<String> = spec["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r["backendRefs"].as_array().into_iter().flatten())
                .map(|b| {
                    format!(
                        "{}:{}={}",
                        b["name"].as_str().unwrap_or_default(),
                        b["port"],
                        b.get("weight").cloned().unwrap_or(Value::from(1))
                    )
                })
                .collect();
            backends.join(",")
        }
        _ => String::new(),
    }
}

/// Print rows with aligned columns.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_docs(items: &[Value], o: Output) -> Result<()> {
    match o {
        Output::Json => println!("{}", serde_json::to_string_pretty(items)?),
        Output::Yaml => {
            for (i, d) in items.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", serde_saphyr::to_string(d)?);
            }
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|d| {
                    vec![
                        d["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or_default()
                            .into(),
                        d["metadata"]["name"].as_str().unwrap_or_default().into(),
                        detail(d),
                        conditions_summary(d),
                        d["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or_default()
                            .into(),
                    ]
                })
                .collect();
            table(&["NAMESPACE", "NAME", "DETAIL", "STATUS", "VERSION"], &rows);
        }
    }
    Ok(())
}

/// The resource a command names: `KIND NAME`, `KIND/NAME`, and a namespace either by `-n`
/// or in front of the name (`shop/catalog`, as trellis itself prints names).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    kind: String,
    name: Option<String>,
    ns: Option<String>,
}

impl Target {
    /// Whether it names one resource (not a listing of its kind).
    pub(crate) fn names_one(&self) -> bool {
        self.name.is_some()
    }

    pub(crate) fn of(kind: &str, name: Option<&str>, ns: Option<&str>) -> Result<Self> {
        let (kind, name) = match (kind.split_once('/'), name) {
            (Some(_), Some(n)) => {
                bail!("the name is given twice ({kind:?} and {n:?}): write KIND NAME or KIND/NAME")
            }
            (Some((k, n)), None) => (k, Some(n)),
            (None, n) => (kind, n),
        };
        let (ns, name) = match name.map(|n| (n, n.split_once('/'))) {
            Some((n, Some((n_ns, _)))) if ns.is_some_and(|ns| ns != n_ns) => bail!(
                "the namespace is given twice (-n {} and {n:?})",
                ns.unwrap_or_default()
            ),
            Some((_, Some((n_ns, n)))) => (Some(n_ns), Some(n)),
            Some((n, None)) => (ns, Some(n)),
            None => (ns, None),
        };
        if kind.is_empty() || name.is_some_and(|n| n.is_empty() || n.contains('/')) {
            bail!("expected KIND NAME, KIND/NAME or KIND NAMESPACE/NAME");
        }
        Ok(Self {
            kind: kind.to_string(),
            name: name.map(str::to_string),
            ns: ns.map(str::to_string),
        })
    }

    /// The one resource named: its API path, and its name for messages.
    fn one(&self, verb: &str) -> Result<(String, &str)> {
        let Some(name) = self.name.as_deref() else {
            bail!(
                "which {}? `trellis {verb} {} NAME` (or {}/NAME)",
                self.kind,
                self.kind,
                self.kind
            );
        };
        let ns = self.ns.as_deref().unwrap_or("default");
        Ok((
            format!(
                "/api/v1/resources/{}/{}/{}",
                enc(&self.kind),
                enc(ns),
                enc(name)
            ),
            name,
        ))
    }
}

/// What the fleet's views (`stat`, `edges`, `tap`, `top`, `diagnose`) look at: `svc/NAME` or
/// `workload/NAME` (`wl/NAME`), the name possibly `NAMESPACE/NAME` as `get` takes it, or a
/// kind alone (`services`).
pub(crate) struct FleetTarget {
    /// As the API names it: `service` or `workload`.
    pub(crate) kind: &'static str,
    pub(crate) name: Option<String>,
    /// The namespace in the name, else the one given by `-n`.
    pub(crate) ns: Option<String>,
}

impl FleetTarget {
    pub(crate) fn of(target: &str, ns: Option<&str>) -> Result<Self> {
        let t = Target::of(target, None, ns)?;
        let kind = match t.kind.as_str() {
            "svc" | "service" | "services" => "service",
            "wl" | "workload" | "workloads" => "workload",
            k => bail!("{k:?}: give svc/NAME or workload/NAME (NAME may be NAMESPACE/NAME)"),
        };
        Ok(Self {
            kind,
            name: t.name,
            ns: t.ns,
        })
    }

    /// The same, where a name is needed.
    pub(crate) fn named(target: &str, ns: Option<&str>) -> Result<(Self, String)> {
        let t = Self::of(target, ns)?;
        let Some(name) = t.name.clone() else {
            bail!("{target:?}: give svc/NAME or workload/NAME (NAME may be NAMESPACE/NAME)");
        };
        Ok((t, name))
    }
}

/// `trellis get KIND [NAME]`.
pub(crate) async fn get(conn: &Conn, target: Target, o: Output) -> Result<()> {
    let api = Api::new(conn)?;
    let ns = target.ns.as_deref();
    let kind = enc(&target.kind);
    match target.name.as_deref() {
        Some(_) => {
            let (path, _) = target.one("get")?;
            let mut v = api.call(Method::GET, &path, None).await?;
            // The resource as `apply` takes it back: not what the API adds for `describe`
            // (the proxies using it, a Service's rollouts, a Workload's events).
            if let Some(obj) = v.as_object_mut() {
                for added in ["usedBy", "rollouts", "events"] {
                    obj.remove(added);
                }
            }
            // One named resource is one object, as kubectl prints it; a list is an array.
            if matches!(o, Output::Json) {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            print_docs(&[v], o)
        }
        None => {
            let path = match ns {
                Some(ns) => format!("/api/v1/resources/{kind}/{}", enc(ns)),
                None => format!("/api/v1/resources/{kind}"),
            };
            let v = api.call(Method::GET, &path, None).await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() && matches!(o, Output::Table) {
                eprintln!("No resources found.");
                return Ok(());
            }
            print_docs(&items, o)
        }
    }
}

/// `trellis delete KIND NAME`.
pub(crate) async fn delete(conn: &Conn, target: Target) -> Result<()> {
    let (path, name) = target.one("delete")?;
    let api = Api::new(conn)?;
    api.call(Method::DELETE, &path, None).await?;
    println!("{}/{name} deleted", target.kind.to_lowercase());
    Ok(())
}

/// `trellis describe KIND NAME`: the resource, its conditions, and which proxies use it.
pub(crate) async fn describe(conn: &Conn, target: Target) -> Result<()> {
    let (path, _) = target.one("describe")?;
    let api = Api::new(conn)?;
    let v = api.call(Method::GET, &path, None).await?;
    println!("Kind:       {}", v["kind"].as_str().unwrap_or_default());
    println!(
        "Name:       {}",
        v["metadata"]["name"].as_str().unwrap_or_default()
    );
    println!(
        "Namespace:  {}",
        v["metadata"]["namespace"].as_str().unwrap_or_default()
    );
    let labels: Vec<String> = v["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, l)| format!("{k}={}", l.as_str().unwrap_or_default()))
        .collect();
    println!("Labels:     {}", joined_or(&labels, "(none)"));
    println!(
        "Version:    {}",
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
    );
    println!("Spec:");
    for l in serde_saphyr::to_string(&v["spec"])?.lines() {
        println!("  {l}");
    }
    let health = &v["status"]["health"];
    if !health.is_null() {
        println!(
            "Health:     {} (reported by its agent; checks recovered {} times)",
            if health["healthy"] == true {
                "healthy"
            } else {
                "UNHEALTHY"
            },
            health["recoveries"].as_u64().unwrap_or(0)
        );
    }
    println!("Conditions:");
    match v["status"]["conditions"].as_array() {
        None => println!("  (none: this kind has no references to resolve)"),
        Some(cs) => {
            let rows: Vec<Vec<String>> = cs
                .iter()
                .map(|c| {
                    ["type", "status", "reason", "message"]
                        .iter()
                        .map(|k| c[*k].as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .collect();
            table(&["TYPE", "STATUS", "REASON", "MESSAGE"], &rows);
        }
    }
    if let Some(rs) = v["rollouts"].as_array() {
        println!("Rollouts:");
        let now = trellis_telemetry::now_ms();
        for r in rs {
            crate::shift::print_status(r, now);
        }
    }
    if let Some(es) = v["events"].as_array().filter(|es| !es.is_empty()) {
        println!("Events (the last hour):");
        let now = trellis_telemetry::now_ms();
        for e in es {
            println!(
                "  {:>8} ago  {}",
                trellis_telemetry::diagnose::ago(
                    now.saturating_sub(e["atMs"].as_u64().unwrap_or(now))
                ),
                event_text(e)
            );
        }
    }
    let used: Vec<&str> = v["usedBy"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    println!("Used by:    {}", joined_or(&used, "(no connected proxy)"));
    Ok(())
}

/// `items` joined with commas, or `none` when there are none.
fn joined_or<S: AsRef<str>>(items: &[S], none: &str) -> String {
    if items.is_empty() {
        none.to_string()
    } else {
        items
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One of a Workload's events as `describe` prints it: what happened, and for an ejection
/// who ejected which endpoint, for how long and after what.
fn event_text(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
    match s("event").as_str() {
        "ejected" => format!(
            "ejected by {}'s proxy: endpoint {} for {} s, after {} {} failures",
            s("by"),
            s("endpoint"),
            e["seconds"].as_u64().unwrap_or(0),
            e["failures"].as_u64().unwrap_or(0),
            s("class")
        ),
        "let back in" => format!(
            "let back in by {}'s proxy: endpoint {}",
            s("by"),
            s("endpoint")
        ),
        other => other.to_string(),
    }
}

/// `trellis status`: every connected proxy, like `istioctl proxy-status`.
pub(crate) async fn status(conn: &Conn, o: Output) -> Result<()> {
    let api = Api::new(conn)?;
    let v = api.call(Method::GET, "/api/v1/proxies", None).await?;
    if !matches!(o, Output::Table) {
        return print_docs(&[v], o);
    }
    let current = v["revision"].as_str().unwrap_or_default().to_string();
    let mut rows = Vec::new();
    for p in v["proxies"].as_array().into_iter().flatten() {
        let types = p["types"].as_object().cloned().unwrap_or_default();
        for (t, s) in types {
            let sent = s["sent"].as_str().unwrap_or_default().to_string();
            let acked = s["acked"].as_str().unwrap_or_default().to_string();
            let rejected = &s["rejected"];
            let silent = t == "document" && p["silentSince"].is_u64();
            let state = if !rejected.is_null() && rejected["version"].as_str() == Some(&sent) {
                "NACKED"
            } else if silent {
                // It left an update unanswered: neither ACK nor NACK.
                "NOT ANSWERING"
            } else if acked == sent && sent == current {
                "SYNCED"
            } else if acked == sent {
                "SYNCED (not latest)"
            } else {
                "STALE"
            };
            let reason = rejected["message"]
                .as_str()
                .map(|m| format!("v{}: {m}", rejected["version"].as_str().unwrap_or("?")))
                .unwrap_or_default();
            rows.push(vec![
                p["node"].as_str().unwrap_or_default().to_string(),
                p["workload"].as_str().unwrap_or("-").to_string(),
                t,
                sent,
                acked,
                state.to_string(),
                reason,
            ]);
        }
    }
    if rows.is_empty() {
        eprintln!("No connected proxies (store revision {current}).");
        return Ok(());
    }
    table(
        &[
            "NODE",
            "WORKLOAD",
            "TYPE",
            "SENT",
            "ACKED",
            "STATE",
            "LAST REJECTION",
        ],
        &rows,
    );
    Ok(())
}

/// `trellis login`: check the server and token, then save them (mode 0600).
pub(crate) async fn login(conn: &Conn) -> Result<()> {
    let api = Api::new(conn)?;
    api.call(Method::GET, "/api/v1/proxies", None)
        .await
        .context("login check failed")?;
    let saved = Saved {
        server: conn
            .server
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:7070".into()),
        token: conn.token.clone().context("--token is required")?,
        ca_hash: conn.ca_hash.clone(),
    };
    let p = config_path()?;
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| p.display().to_string())?;
    std::io::Write::write_all(&mut f, serde_json::to_string_pretty(&saved)?.as_bytes())?;
    println!("logged in to {}; saved in {}", saved.server, p.display());
    Ok(())
}

/// `trellis token create`: print the token (once) and what it allows.
pub(crate) async fn token_create(
    conn: &Conn,
    namespace: &str,
    identity: &str,
    ttl: std::time::Duration,
    uses: u32,
) -> Result<()> {
    let api = Api::new(conn)?;
    let body = serde_json::json!({
        "namespace": namespace,
        "identity": identity,
        "ttlSeconds": ttl.as_secs(),
        "uses": uses,
    });
    let v = api
        .call(Method::POST, "/api/v1/tokens", Some(body.to_string()))
        .await?;
    println!("{}", v["token"].as_str().unwrap_or_default());
    eprintln!(
        "for {}, {} use(s), valid for {}s; shown only now\nproxies reaching the control plane over TLS check it with --ca-hash {}",
        v["spiffeId"].as_str().unwrap_or_default(),
        uses,
        ttl.as_secs(),
        v["caHash"].as_str().unwrap_or_default()
    );
    Ok(())
}

/// `trellis token list`.
/// `trellis token read-only`: make a read-only token, print it once.
pub(crate) async fn read_only_create(conn: &Conn, name: &str) -> Result<()> {
    let api = Api::new(conn)?;
    let body = serde_json::json!({ "name": name }).to_string();
    let v = api
        .call(Method::POST, "/api/v1/viewer-tokens", Some(body))
        .await?;
    println!("{}", v["token"].as_str().unwrap_or_default());
    eprintln!(
        "read-only token {} ({name}): reads the mesh, changes nothing; shown once (trellis token read-only-revoke {} ends it)",
        v["id"].as_str().unwrap_or_default(),
        v["id"].as_str().unwrap_or_default()
    );
    Ok(())
}

/// `trellis token read-only-list`.
pub(crate) async fn read_only_list(conn: &Conn) -> Result<()> {
    let api = Api::new(conn)?;
    let v = api.call(Method::GET, "/api/v1/viewer-tokens", None).await?;
    let rows: Vec<Vec<String>> = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| {
            vec![
                t["id"].as_str().unwrap_or_default().into(),
                t["name"].as_str().unwrap_or_default().into(),
                t["createdAt"].to_string(),
            ]
        })
        .collect();
    table(&["ID", "NAME", "CREATED (UNIX)"], &rows);
    Ok(())
}

/// `trellis token read-only-revoke ID`.
pub(crate) async fn read_only_revoke(conn: &Conn, id: &str) -> Result<()> {
    let api = Api::new(conn)?;
    api.call(
        Method::DELETE,
        &format!("/api/v1/viewer-tokens/{}", crate::client::query_value(id)),
        None,
    )
    .await?;
    println!("revoked read-only token {id}");
    Ok(())
}

pub(crate) async fn token_list(conn: &Conn) -> Result<()> {
    let api = Api::new(conn)?;
    let v = api.call(Method::GET, "/api/v1/tokens", None).await?;
    let rows: Vec<Vec<String>> = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| {
            vec![
                t["id"].as_str().unwrap_or_default().into(),
                format!(
                    "{}/{}",
                    t["namespace"].as_str().unwrap_or_default(),
                    t["identity"].as_str().unwrap_or_default()
                ),
                t["usesLeft"].to_string(),
                t["expiresAt"].to_string(),
                t["state"].as_str().unwrap_or_default().into(),
            ]
        })
        .collect();
    table(
        &["ID", "IDENTITY", "USES LEFT", "EXPIRES (UNIX)", "STATE"],
        &rows,
    );
    Ok(())
}

/// `trellis token revoke ID`.
pub(crate) async fn token_revoke(conn: &Conn, id: &str) -> Result<()> {
    let api = Api::new(conn)?;
    let id = id.trim_start_matches("trellis-join.");
    let id = id.split('.').next().unwrap_or(id);
    api.call(Method::DELETE, &format!("/api/v1/tokens/{}", enc(id)), None)
        .await?;
    println!("join token {id} revoked");
    Ok(())
}

/// `trellis ca status`, and `trellis ca rotate PHASE` (which prints the status after).
pub(crate) async fn ca_status(conn: &Conn, rotate: Option<&str>, force: bool) -> Result<()> {
    let api = Api::new(conn)?;
    let v = match rotate {
        Some(phase) => {
            let body = serde_json::json!({ "phase": phase, "force": force });
            api.call(Method::POST, "/api/v1/ca/rotate", Some(body.to_string()))
                .await?
        }
        None => api.call(Method::GET, "/api/v1/ca", None).await?,
    };
    println!(
        "trust domain: {}\nsigning root: {} (for --ca-hash)\ncertificate lifetime: {} s\nphase: {}",
        v["trustDomain"].as_str().unwrap_or_default(),
        v["caHash"].as_str().unwrap_or_default(),
        v["svidTtlSeconds"],
        v["phase"].as_str().unwrap_or_default()
    );
    let rows: Vec<Vec<String>> = v["roots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                r["fingerprint"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(16)
                    .collect(),
                r["subject"].as_str().unwrap_or_default().into(),
                r["notAfter"].to_string(),
                if r["signing"] == true {
                    "signing"
                } else {
                    "trusted"
                }
                .into(),
            ]
        })
        .collect();
    table(&["SHA-256", "SUBJECT", "NOT AFTER (UNIX)", "ROLE"], &rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Target;

    fn t(
        kind: &str,
        name: Option<&str>,
        ns: Option<&str>,
    ) -> (String, Option<String>, Option<String>) {
        let t =
            Target::of(kind, name, ns).unwrap_or_else(|e| panic!("{kind} {name:?} {ns:?}: {e}"));
        (t.kind, t.name, t.ns)
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn a_resource_is_named_as_trellis_prints_it() {
        let want = ("service".to_string(), s("catalog"), s("shop"));
        assert_eq!(t("service", Some("catalog"), Some("shop")), want);
        assert_eq!(t("service/catalog", None, Some("shop")), want);
        assert_eq!(t("service", Some("shop/catalog"), None), want);
        assert_eq!(t("service", Some("shop/catalog"), Some("shop")), want);
        assert_eq!(t("service/shop/catalog", None, None), want);
        assert_eq!(t("svc", Some("a"), None), ("svc".into(), s("a"), None));
        assert_eq!(t("svc", None, Some("x")), ("svc".into(), None, s("x")));
        for (kind, name, ns) in [
            ("service", Some("shop/catalog"), Some("other")),
            ("svc/a", Some("b"), None),
            ("svc", Some("a/b/c"), None),
            ("svc/", None, None),
            ("/a", None, None),
            ("svc", Some("shop/"), None),
        ] {
            assert!(
                Target::of(kind, name, ns).is_err(),
                "{kind} {name:?} {ns:?}"
            );
        }
        let e = Target::of("svc", None, None)
            .unwrap()
            .one("describe")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "which svc? `trellis describe svc NAME` (or svc/NAME)"
        );
        let (path, name) = Target::of("service/shop/catalog", None, None)
            .unwrap()
            .one("get")
            .map(|(p, n)| (p, n.to_string()))
            .unwrap();
        assert_eq!(path, "/api/v1/resources/service/shop/catalog");
        assert_eq!(name, "catalog");
    }

    #[test]
    fn the_fleet_views_name_their_target_alike() {
        use super::FleetTarget;
        let f = |t: &str, ns| {
            FleetTarget::of(t, ns)
                .map(|f| (f.kind, f.name, f.ns))
                .map_err(|e| e.to_string())
        };
        let want = Ok(("service", s("catalog"), s("shop")));
        assert_eq!(f("svc/catalog", Some("shop")), want);
        assert_eq!(f("svc/shop/catalog", None), want);
        assert_eq!(f("service/shop/catalog", Some("shop")), want);
        assert_eq!(
            f("wl/shop/vm-1", None),
            Ok(("workload", s("vm-1"), s("shop")))
        );
        assert_eq!(f("services", None), Ok(("service", None, None)));
        assert!(f("svc/shop/catalog", Some("other")).is_err());
        assert!(f("route/catalog", None)
            .unwrap_err()
            .contains("give svc/NAME"));
        assert!(FleetTarget::named("services", Some("shop")).is_err());
    }
}
