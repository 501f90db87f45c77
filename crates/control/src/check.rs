//! `trellis check`: the mesh's own health as a list of checks, each pass, warn or fail with
//! what to do about it (`GET /api/v1/check`). The CLI adds the checks only it can make (the
//! control plane reachable, the token accepted) and exits non-zero when one fails.

use std::time::Duration;

use serde::Serialize;
use trellis_store::Key;
use trellis_telemetry::diagnose::ago;

use crate::{api::Api, fleet::now_ms};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    /// Fine.
    Pass,
    /// Worth a look.
    Warn,
    /// Broken.
    Fail,
}

/// One check.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Check {
    /// What is checked.
    pub(crate) name: &'static str,
    /// How it came out.
    pub(crate) outcome: Outcome,
    /// What was found.
    pub(crate) message: String,
    /// What to do (empty when it passed).
    pub(crate) hint: String,
}

fn check(name: &'static str, outcome: Outcome, message: String, hint: &str) -> Check {
    Check {
        name,
        outcome,
        message,
        hint: if outcome == Outcome::Pass {
            String::new()
        } else {
            hint.into()
        },
    }
}

/// Clock difference beyond which a proxy's clock is reported.
const SKEW: Duration = Duration::from_secs(5);
/// A root this close to its end is reported.
const ROOT_SOON: Duration = Duration::from_secs(30 * 24 * 3600);

fn list(v: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = v.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > SHOWN {
        s.push_str(&format!(" and {} more", v.len() - SHOWN));
    }
    s
}

/// Every check this replica can make.
pub(crate) async fn run(api: &Api) -> Vec<Check> {
    let mut out = Vec::new();
    // The store.
    out.push(
        match api
            .store()
            .get(&Key::new("_AdminToken", "trellis-system", "admin"))
            .await
        {
            Ok(_) => check(
                "store",
                Outcome::Pass,
                format!("{} store answers", api.store().describe()),
                "",
            ),
            Err(e) => check(
                "store",
                Outcome::Fail,
                format!("the store does not answer: {e}"),
                "is etcd up and reachable from the control plane (trellis control --store)?",
            ),
        },
    );

    // Proxies: connected, in step, nothing refused.
    let proxies = api.proxies().snapshot();
    let (mut refused, mut behind, mut silent) = (Vec::new(), Vec::new(), Vec::new());
    let now_s = now_ms() / 1000;
    for p in &proxies {
        let who = p.workload.clone().unwrap_or_else(|| p.node.clone());
        if let Some(since) = p.silent_since {
            let who = p
                .peer
                .as_ref()
                .map_or(who.clone(), |a| format!("{who} at {a}"));
            silent.push(format!(
                "{who} (for {})",
                ago(now_s.saturating_sub(since) * 1000)
            ));
            continue;
        }
        for (ty, st) in &p.types {
            if let Some(r) = st.rejected.as_ref().filter(|_| st.acked != st.sent) {
                refused.push(format!("{who} ({ty} {}: {})", r.version, r.message));
            } else if st.acked != st.sent {
                behind.push(format!("{who} ({ty})"));
            }
        }
    }
    out.push(if !refused.is_empty() {
        check(
            "proxies in sync",
            Outcome::Fail,
            format!("{} refused their config: {}", refused.len(), list(&refused)),
            "fix what the proxy names and apply again; trellis status shows every proxy",
        )
    } else if !silent.is_empty() {
        check(
            "proxies in sync",
            Outcome::Fail,
            format!("{} do not answer their updates: {}", silent.len(), list(&silent)),
            "a proxy that neither acknowledges nor refuses what it is sent is stuck (or not a proxy): restart it, or look at its log",
        )
    } else if !behind.is_empty() {
        check(
            "proxies in sync",
            Outcome::Warn,
            format!("not yet acknowledged: {}", list(&behind)),
            "a proxy that stays behind is slow or stuck: trellis status",
        )
    } else if proxies.is_empty() {
        check(
            "proxies in sync",
            Outcome::Warn,
            "no proxy is connected to this replica".into(),
            "start proxies with trellis join (or check other replicas)",
        )
    } else {
        check(
            "proxies in sync",
            Outcome::Pass,
            format!("{} proxies connected, all in sync", proxies.len()),
            "",
        )
    });

    // References: what the proxies answer 500 for, and what they go without.
    let state = api.writer().state();
    out.push(references(&state));

    // Certificates: each reporting proxy's, and the mesh's roots.
    let now = now_ms();
    let ttl_ms = api.identity().svid_ttl.as_millis() as u64;
    let reporters = api.fleet().reporters();
    let (mut expired, mut stale) = (Vec::new(), Vec::new());
    for r in &reporters {
        if r.cert_not_after_ms == 0 {
            continue;
        }
        if r.cert_not_after_ms <= now {
            expired.push(r.name.clone());
        } else if r.cert_not_after_ms - now < (ttl_ms / 4).min(24 * 3600 * 1000) {
            // Renewal happens at half the lifetime: a quarter left means it did not.
            stale.push(format!(
                "{} (in {})",
                r.name,
                ago(r.cert_not_after_ms - now)
            ));
        }
    }
    out.push(if !expired.is_empty() {
        check(
            "proxy certificates",
            Outcome::Fail,
            format!("expired: {}", list(&expired)),
            "the proxy could not renew: can it reach the control plane (its xDS address)?",
        )
    } else if !stale.is_empty() {
        check(
            "proxy certificates",
            Outcome::Warn,
            format!("not renewed and expiring soon: {}", list(&stale)),
            "the proxy renews at half its certificate's lifetime: check its log for renewal errors",
        )
    } else {
        check(
            "proxy certificates",
            Outcome::Pass,
            format!(
                "{} reporting proxies, none expiring unrenewed",
                reporters.len()
            ),
            "",
        )
    });
    match crate::identity::ca_status(api.identity(), api.store()).await {
        Ok(ca) => {
            let phase = ca["phase"].as_str().unwrap_or_default().to_string();
            out.push(if phase.starts_with("begun") || phase.starts_with("activated") {
                check(
                    "root rotation",
                    Outcome::Warn,
                    format!("a root rotation is half done: {phase}"),
                    "finish it once every proxy trusts the new root: trellis ca rotate --phase activate|finish",
                )
            } else {
                check("root rotation", Outcome::Pass, phase, "")
            });
            let soon: Vec<String> = ca["roots"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| {
                    let end = r["notAfter"].as_u64()? * 1000;
                    (end < now + ROOT_SOON.as_millis() as u64).then(|| {
                        format!(
                            "{} (in {})",
                            r["subject"].as_str().unwrap_or("root"),
                            ago(end.saturating_sub(now))
                        )
                    })
                })
                .collect();
            out.push(if soon.is_empty() {
                check(
                    "mesh roots",
                    Outcome::Pass,
                    "no root expires within 30 days".into(),
                    "",
                )
            } else {
                check(
                    "mesh roots",
                    Outcome::Warn,
                    format!("expiring within 30 days: {}", list(&soon)),
                    "rotate the root: trellis ca rotate --phase begin",
                )
            });
        }
        Err(e) => out.push(check(
            "mesh roots",
            Outcome::Fail,
            format!("the CA cannot be read: {e}"),
            "check the store and the control plane's log",
        )),
    }

    // Workloads and their agents.
    let unhealthy: Vec<String> = state
        .catalog
        .entries
        .iter()
        .filter(|(k, e)| k.kind == "Workload" && e.healthy() == Some(false))
        .map(|(k, _)| format!("{}/{}", k.namespace, k.name))
        .collect();
    out.push(if unhealthy.is_empty() {
        check(
            "workloads healthy",
            Outcome::Pass,
            "no workload is marked unhealthy".into(),
            "",
        )
    } else {
        check(
            "workloads healthy",
            Outcome::Warn,
            format!("unhealthy: {}", list(&unhealthy)),
            "trellis diagnose and the agent's health checks on those hosts say why",
        )
    });
    let silent: Vec<String> = api
        .agents()
        .silent()
        .into_iter()
        .map(|(k, d)| format!("{}/{} ({} s)", k.namespace, k.name, d.as_secs()))
        .collect();
    out.push(if silent.is_empty() {
        check(
            "agents",
            Outcome::Pass,
            "every agent heard from this replica heartbeats on time".into(),
            "",
        )
    } else {
        check(
            "agents",
            Outcome::Fail,
            format!("heartbeats stopped: {}", list(&silent)),
            "is trellis join still running on those hosts, and can it reach the control plane?",
        )
    });

    // Clocks.
    let skewed: Vec<String> = reporters
        .iter()
        .filter(|r| r.skew_ms.unsigned_abs() > SKEW.as_millis() as u64)
        .map(|r| format!("{} ({:+} s)", r.name, r.skew_ms / 1000))
        .collect();
    out.push(if skewed.is_empty() {
        check(
            "clocks",
            Outcome::Pass,
            format!("no reporting proxy's clock is off by more than {} s", SKEW.as_secs()),
            "",
        )
    } else {
        check(
            "clocks",
            Outcome::Warn,
            format!("clocks off from the control plane's: {}", list(&skewed)),
            "run NTP (chrony, systemd-timesyncd) on those hosts: certificates and telemetry windows depend on it",
        )
    });
    out
}

/// Routes served with a weighted backend that does not resolve fail that share of their
/// requests (500): a failure. Other references that do not resolve leave a part or the whole
/// of their resource out of what proxies get: a warning.
fn references(state: &crate::state::State) -> Check {
    let dangling: Vec<String> = state
        .compiled
        .dangling()
        .iter()
        .map(|d| format!("{} {} → {}", d.route.kind(), d.route.id(), d.backend))
        .collect();
    let mut unresolved: Vec<String> = state
        .compiled
        .conditions
        .iter()
        .filter(|(_, c)| c.iter().any(|c| c.status == "False"))
        .map(|(k, c)| {
            let served = c.iter().any(|c| c.kind == "Accepted" && c.status == "True");
            let how = if served {
                "served in part"
            } else {
                "not served"
            };
            format!("{} {}/{} ({how})", k.kind, k.namespace, k.name)
        })
        .collect();
    unresolved.sort();
    if !dangling.is_empty() {
        check(
            "references",
            Outcome::Fail,
            format!(
                "{} route {} not resolve, and {} share of the requests is answered 500: {}",
                dangling.len(),
                if dangling.len() == 1 { "backend does" } else { "backends do" },
                if dangling.len() == 1 { "its" } else { "their" },
                list(&dangling)
            ),
            "create the Service the route names, or take the backend out of the route; trellis describe on the route names the field",
        )
    } else if !unresolved.is_empty() {
        check(
            "references",
            Outcome::Warn,
            format!(
                "{} {} to what does not exist: {}",
                unresolved.len(),
                if unresolved.len() == 1 {
                    "resource refers"
                } else {
                    "resources refer"
                },
                list(&unresolved)
            ),
            "trellis describe KIND NAME names each field; create what it names, or correct it",
        )
    } else {
        check(
            "references",
            Outcome::Pass,
            "every reference resolves".into(),
            "",
        )
    }
}
