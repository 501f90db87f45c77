//! `trellis check`: the mesh's own health, check by check, with a hint for each that is not
//! fine; the exit status is non-zero when one fails. `--proxy` checks the proxy on this host
//! through its admin address instead.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use http_body_util::{BodyExt, Empty};
use hyper::{body::Bytes, Method};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;

use crate::client::{Api, Conn};

mod host;

/// What `check` looks at.
#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    /// Check the proxy on this host through its admin address (default 127.0.0.1:15000)
    /// rather than the mesh.
    #[arg(long, num_args = 0..=1, default_missing_value = "127.0.0.1:15000", value_name = "ADMIN")]
    proxy: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// One line of the report.
pub(super) struct Line {
    outcome: &'static str,
    name: String,
    message: String,
    hint: String,
}

impl Line {
    /// A line; the hint is kept only when the check did not pass.
    fn new(outcome: &'static str, name: &str, message: String, hint: &str) -> Self {
        Line {
            outcome,
            name: name.into(),
            message,
            hint: if outcome == "pass" {
                String::new()
            } else {
                hint.into()
            },
        }
    }
}

fn print(lines: &[Line]) -> Result<()> {
    for l in lines {
        let mark = match l.outcome {
            "pass" => "✓",
            "warn" => "!",
            _ => "✗",
        };
        println!("{mark} {}: {}", l.name, l.message);
        if !l.hint.is_empty() {
            println!("    hint: {}", l.hint);
        }
    }
    let failed = lines.iter().filter(|l| l.outcome == "fail").count();
    let warned = lines.iter().filter(|l| l.outcome == "warn").count();
    println!();
    if failed > 0 {
        bail!("{failed} check(s) failed, {warned} warning(s)");
    }
    println!(
        "all checks passed{}",
        if warned > 0 {
            format!(" ({warned} warning(s))")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `trellis check`.
pub(crate) async fn run(a: &CheckArgs) -> Result<()> {
    if let Some(admin) = &a.proxy {
        return print(&proxy(admin).await);
    }
    let mut lines = Vec::new();
    let api = Api::new(&a.conn)?;
    match api.call(Method::GET, "/api/v1/check", None).await {
        Err(e) => lines.push(Line {
            outcome: "fail",
            name: "control plane".into(),
            message: format!("{e:#}"),
            hint:
                "is trellis control running, and are --server and --token (or trellis login) right?"
                    .into(),
        }),
        Ok(v) => {
            lines.push(Line {
                outcome: "pass",
                name: "control plane".into(),
                message: "reachable, token accepted".into(),
                hint: String::new(),
            });
            for c in v["checks"].as_array().into_iter().flatten() {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                lines.push(Line {
                    outcome: match c["outcome"].as_str() {
                        Some("pass") => "pass",
                        Some("warn") => "warn",
                        _ => "fail",
                    },
                    name: s("name"),
                    message: s("message"),
                    hint: s("hint"),
                });
            }
        }
    }
    print(&lines)
}

async fn get(admin: &str, path: &str) -> Result<(u16, Bytes), String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("http://{admin}{path}");
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.get(uri.parse().map_err(|e| format!("{e}"))?),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_string())?
    .map_err(|e| format!("{e}"))?;
    let status = r.status().as_u16();
    let body = r
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// The checks of the proxy whose admin listener is `admin`.
async fn proxy(admin: &str) -> Vec<Line> {
    let line = Line::new;
    let mut out = Vec::new();
    match get(admin, "/live").await {
        Ok((200, _)) => out.push(line(
            "pass",
            "proxy running",
            format!("admin at {admin} answers"),
            "",
        )),
        other => {
            out.push(line(
                "fail",
                "proxy running",
                format!("admin at {admin}: {}", match other { Ok((s, _)) => format!("HTTP {s}"), Err(e) => e }),
                "is trellis join (or trellis proxy) running on this host? Its admin address is --admin",
            ));
            return out;
        }
    }
    match get(admin, "/ready").await {
        Ok((200, _)) => out.push(line("pass", "proxy ready", "serving its config".into(), "")),
        Ok((_, b)) => out.push(line(
            "fail",
            "proxy ready",
            String::from_utf8_lossy(&b).trim().to_string(),
            "the proxy has no config yet: can it reach the control plane's xDS address?",
        )),
        Err(e) => out.push(line("fail", "proxy ready", e, "")),
    }
    let dump: Value = match get(admin, "/config_dump").await {
        Ok((200, b)) => serde_json::from_slice(&b).unwrap_or_default(),
        _ => Value::Null,
    };
    let xds = &dump["xds"];
    out.push(match (xds["rejected"].as_array(), xds["server"].as_str()) {
        (Some(r), _) if !r.is_empty() => line(
            "fail",
            "config accepted",
            format!(
                "refused version {}: {}",
                r[0].as_str().unwrap_or_default(),
                r.get(1).and_then(Value::as_str).unwrap_or_default()
            ),
            "fix what it names and apply again; the proxy serves its previous config meanwhile",
        ),
        (_, Some(server)) => line(
            "pass",
            "config accepted",
            format!(
                "version {} from {server}",
                xds["applied"].as_str().unwrap_or("-")
            ),
            "",
        ),
        _ => line(
            "pass",
            "config accepted",
            format!("from {}", dump["source"].as_str().unwrap_or("a file")),
            "",
        ),
    });
    // What the agent set up on this host beside the proxy.
    out.extend(host::checks(&dump).await);
    if let Some(id) = dump["identity"].as_object() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let end = id.get("notAfter").and_then(Value::as_u64).unwrap_or(0);
        let who = id
            .get("spiffeId")
            .and_then(Value::as_str)
            .unwrap_or_default();
        out.push(if end <= now {
            line(
                "fail",
                "certificate",
                format!("{who} expired"),
                "the proxy cannot renew: can it reach the control plane?",
            )
        } else if end - now < 3600 {
            line(
                "warn",
                "certificate",
                format!("{who} expires in {} min", (end - now) / 60),
                "check the proxy's log for renewal errors",
            )
        } else {
            line(
                "pass",
                "certificate",
                format!("{who}, {} h left", (end - now) / 3600),
                "",
            )
        });
    }
    out
}

/// `trellis dashboard`: a sign-in link to the single pane on the configured control plane
/// (good once, for 15 minutes), opened in a browser where one is at hand.
pub(crate) async fn dashboard(conn: &Conn, open: bool) -> Result<()> {
    let api = Api::new(conn)?;
    let v = api.call(Method::POST, "/api/v1/ui/links", None).await?;
    let path = v["path"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the control plane gave no link: {v}"))?;
    let url = format!("{}{path}", api.server());
    println!("{url}");
    eprintln!("the link signs you in once, within 15 minutes; then sign in with the admin token");
    if open {
        open_browser(&url);
    }
    Ok(())
}

/// Start the desktop's browser on `url`, when there is a desktop (`$BROWSER`, else
/// `xdg-open`); quietly nothing otherwise.
pub(crate) fn open_browser(url: &str) {
    let desktop =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let program = match std::env::var("BROWSER") {
        Ok(b) if !b.is_empty() => b,
        _ if desktop => "xdg-open".into(),
        _ => return,
    };
    let _ = std::process::Command::new(program)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}
