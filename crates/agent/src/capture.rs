//! Transparent capture: the iptables rules that send a workload's traffic through its proxy,
//! installed in the network namespace the agent runs in.
//!
//! - Outbound TCP is REDIRECTed to the proxy's outbound listener, except the proxy's own
//!   connections (they carry `SO_MARK`), traffic that stays on this host (`-o lo`) and the
//!   control planes' addresses (the agent's own calls to them are not marked).
//! - TCP to the workload's own ports from other hosts is REDIRECTed to the inbound listener,
//!   so that a caller cannot go around the proxy (and STRICT mutual TLS means it).
//! - DNS (UDP and TCP port 53) is REDIRECTed to the agent's resolver, except its own
//!   forwarded queries.
//!
//! The same rules go into ip6tables when the host has IPv6 (or a dual-stack application could
//! be reached, and could call out, around the proxy); the proxy and the resolver then listen
//! on `[::1]`/`[::]` at the same ports.
//!
//! Everything lives in chains named `TRELLIS_*` in the nat table, installed in one
//! `iptables-restore --noflush` batch per family (all or nothing: a failed IPv6 batch takes the
//! IPv4 one away again). Removal deletes exactly those chains and the jumps to them; it runs
//! before every install too, so the rules that a crashed agent left behind are replaced, never
//! doubled.

use std::{net::SocketAddr, process::Command};

/// What to capture.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// `SO_MARK` of the proxy's and resolver's own sockets, which the rules let pass.
    pub mark: u32,
    /// The application's ports, redirected to the inbound listener.
    pub app_ports: Vec<u16>,
    /// Where outbound TCP goes (the proxy's outbound listener port).
    pub outbound_port: u16,
    /// Where inbound TCP goes (the inbound listener port).
    pub inbound_port: u16,
    /// Where DNS queries go (the agent's resolver port), if it answers DNS.
    pub dns_port: Option<u16>,
    /// Destinations never captured: the control planes.
    pub exclude: Vec<SocketAddr>,
    /// The services' virtual IP range and the workload's address: when no route reaches
    /// the range (a host without a default route), one is added through the interface that
    /// holds the address, so that connections to virtual IPs leave the application at all,
    /// and removed again with the rules.
    pub route: Option<(String, std::net::IpAddr)>,
    /// Capture IPv6 as well (see [`ipv6_present`]); installing fails when ip6tables cannot.
    pub ipv6: bool,
}

/// Whether this network namespace has IPv6 (any address, `::1` included): then IPv6 is
/// captured too, or a dual-stack application could be reached around the proxy.
pub fn ipv6_present() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| !t.trim().is_empty())
}

/// Why capture could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// iptables is missing or failed.
    #[error("{command}: {detail}")]
    Iptables {
        /// What ran.
        command: String,
        /// Its error output, or why it could not run.
        detail: String,
    },
}

/// The routing protocol number the agent's own routes carry (`ip route … proto 217`), so
/// that a restarted agent recognises, and replaces, what a crashed one added.
const ROUTE_PROTO: &str = "217";

/// The chains the rules live in.
pub const CHAINS: [&str; 3] = ["TRELLIS_OUTPUT", "TRELLIS_INBOUND", "TRELLIS_DNS"];

impl CaptureOptions {
    /// The IPv4 rules, as `iptables-restore` input for the nat table.
    pub fn rules(&self) -> String {
        self.batch(false)
    }

    /// The IPv6 rules, as `ip6tables-restore` input for the nat table.
    pub fn rules_v6(&self) -> String {
        self.batch(true)
    }

    fn batch(&self, v6: bool) -> String {
        let mut r = String::from("*nat\n");
        for c in CHAINS {
            r += &format!(":{c} - [0:0]\n");
        }
        let mark = format!("-m mark --mark {:#x}", self.mark);
        r += &format!("-A TRELLIS_OUTPUT {mark} -j RETURN\n");
        r += "-A TRELLIS_OUTPUT -o lo -j RETURN\n";
        for a in &self.exclude {
            let (ip, port) = (a.ip(), a.port());
            match (ip.is_ipv6(), v6) {
                (false, false) => {
                    r += &format!("-A TRELLIS_OUTPUT -d {ip}/32 -p tcp --dport {port} -j RETURN\n")
                }
                (true, true) => {
                    r += &format!("-A TRELLIS_OUTPUT -d {ip}/128 -p tcp --dport {port} -j RETURN\n")
                }
                _ => {}
            }
        }
        r += &format!(
            "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports {}\n",
            self.outbound_port
        );
        for p in &self.app_ports {
            r += &format!(
                "-A TRELLIS_INBOUND -p tcp --dport {p} -j REDIRECT --to-ports {}\n",
                self.inbound_port
            );
        }
        if let Some(dns) = self.dns_port {
            r += &format!("-A TRELLIS_DNS {mark} -j RETURN\n");
            for proto in ["udp", "tcp"] {
                r +=
                    &format!("-A TRELLIS_DNS -p {proto} --dport 53 -j REDIRECT --to-ports {dns}\n");
            }
            // Before the TCP catch-all below, so that DNS over TCP reaches the resolver.
            r += "-A OUTPUT -p udp --dport 53 -j TRELLIS_DNS\n";
            r += "-A OUTPUT -p tcp --dport 53 -j TRELLIS_DNS\n";
        }
        r += "-A OUTPUT -p tcp -j TRELLIS_OUTPUT\n";
        r += "-A PREROUTING -p tcp -j TRELLIS_INBOUND\n";
        r += "COMMIT\n";
        r
    }

    /// Remove what an earlier run left, then install the rules in one batch per family.
    pub fn install(&self) -> Result<Installed, CaptureError> {
        remove()?;
        run("iptables-restore", &["--noflush"], Some(&self.rules()))?;
        if self.ipv6 {
            if let Err(e) = run("ip6tables-restore", &["--noflush"], Some(&self.rules_v6())) {
                // Nothing half-applied: the IPv4 rules go too.
                let _ = remove();
                return Err(e);
            }
        }
        tracing::info!(
            outbound = self.outbound_port,
            inbound = self.inbound_port,
            dns = ?self.dns_port,
            app_ports = ?self.app_ports,
            ipv6 = self.ipv6,
            "traffic capture installed"
        );
        let route = match &self.route {
            Some((range, address)) => add_route(range, *address)?,
            None => None,
        };
        Ok(Installed { route, armed: true })
    }
}

/// Installed rules (and the route added for them); dropping this removes them.
#[derive(Debug)]
pub struct Installed {
    route: Option<(String, String)>,
    armed: bool,
}

impl Installed {
    /// Take charge of the rules a predecessor installed (an upgrade in place: the listeners
    /// they send to are the same sockets), with the route it added (range, device).
    pub fn adopt(route: Option<(String, String)>) -> Self {
        tracing::info!(?route, "traffic capture taken over from the previous agent");
        Self { route, armed: true }
    }

    /// The route added for the services' virtual IPs (range, device).
    pub fn route(&self) -> Option<&(String, String)> {
        self.route.as_ref()
    }

    /// Leave the rules in place for a successor that took over.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match remove() {
            Ok(()) => tracing::info!("traffic capture removed"),
            Err(e) => tracing::error!(error = %e, "could not remove the capture rules"),
        }
        if let Some((range, dev)) = self.route.take() {
            let del = ["route", "del", &range, "dev", &dev, "proto", ROUTE_PROTO];
            if let Err(e) = run("ip", &del, None) {
                tracing::warn!(error = %e, "could not remove the virtual IP route");
            }
        }
    }
}

/// Add a route for `range` through the interface holding `address` when nothing routes it;
/// the route added, to remove later.
fn add_route(
    range: &str,
    address: std::net::IpAddr,
) -> Result<Option<(String, String)>, CaptureError> {
    // A route a crashed agent added goes first (it carries this agent's protocol number).
    let _ = run("ip", &["route", "del", range, "proto", ROUTE_PROTO], None);
    let first = range.split('/').next().unwrap_or(range);
    if run("ip", &["route", "get", first], None).is_ok() {
        return Ok(None);
    }
    // `ip -o addr show`: "2: eth0    inet 10.78.1.2/24 brd … scope global eth0 …".
    let listing = run("ip", &["-o", "addr", "show"], None)?;
    let want = address.to_string();
    let dev = listing.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let has = w.windows(2).any(|p| {
            (p[0] == "inet" || p[0] == "inet6") && p[1].split('/').next() == Some(want.as_str())
        });
        has.then(|| w.get(1).map(|d| d.trim_end_matches(':').to_string()))?
    });
    let Some(dev) = dev else {
        tracing::warn!(%address, "no interface holds the workload's address; virtual IPs have no route");
        return Ok(None);
    };
    run(
        "ip",
        &["route", "add", range, "dev", &dev, "proto", ROUTE_PROTO],
        None,
    )?;
    tracing::info!(%range, %dev, "route for the services' virtual IPs added");
    Ok(Some((range.to_string(), dev)))
}

/// Delete every `TRELLIS_*` chain of the nat tables (IPv4, and IPv6 where ip6tables works)
/// and every rule that jumps to one.
pub fn remove() -> Result<(), CaptureError> {
    remove_from("iptables")?;
    // A host without IPv6 (or without ip6tables' nat) has no IPv6 rules to remove.
    if run("ip6tables", &["-t", "nat", "-S"], None).is_ok() {
        remove_from("ip6tables")?;
    }
    Ok(())
}

fn remove_from(iptables: &str) -> Result<(), CaptureError> {
    let listing = run(iptables, &["-t", "nat", "-S"], None)?;
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let jumps = words
            .windows(2)
            .any(|w| w[0] == "-j" && w[1].starts_with("TRELLIS_"));
        let builtin = words.get(1).is_some_and(|c| !c.starts_with("TRELLIS_"));
        if words.first() == Some(&"-A") && jumps && builtin {
            let mut args = vec!["-t", "nat", "-D"];
            args.extend(&words[1..]);
            gone_is_fine(run(iptables, &args, None))?;
        }
    }
    for line in listing.lines() {
        if let Some(chain) = line
            .strip_prefix("-N ")
            .filter(|c| c.starts_with("TRELLIS_"))
        {
            gone_is_fine(run(iptables, &["-t", "nat", "-F", chain], None))?;
            gone_is_fine(run(iptables, &["-t", "nat", "-X", chain], None))?;
        }
    }
    Ok(())
}

/// A rule or chain that disappeared since the listing (another agent of this namespace,
/// stopping, removed it) is what removal wanted.
fn gone_is_fine(r: Result<String, CaptureError>) -> Result<(), CaptureError> {
    match r {
        Err(CaptureError::Iptables { detail, .. })
            if detail.contains("No chain/target/match")
                || detail.contains("does a matching rule exist") =>
        {
            Ok(())
        }
        r => r.map(drop),
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CaptureError> {
    use std::io::Write;
    let command = format!("{cmd} {}", args.join(" "));
    let err = |detail: String| CaptureError::Iptables {
        command: command.clone(),
        detail,
    };
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            err(format!(
                "{e} (is iptables installed? Debian: apt-get install iptables)"
            ))
        })?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workload on 8080 and 9090 with both families' control planes excluded.
    fn options() -> CaptureOptions {
        CaptureOptions {
            mark: 0x539,
            app_ports: vec![8080, 9090],
            outbound_port: 15001,
            inbound_port: 15006,
            dns_port: Some(15053),
            exclude: vec![
                "10.77.0.1:7071".parse().unwrap(),
                "[fd00::1]:7071".parse().unwrap(),
            ],
            route: None,
            ipv6: true,
        }
    }

    #[test]
    fn rules_exclude_the_proxy_loopback_and_control_planes_and_capture_the_rest() {
        let o = options();
        let r = o.rules();
        let lines: Vec<&str> = r.lines().collect();
        let pos = |s: &str| {
            lines
                .iter()
                .position(|l| *l == s)
                .unwrap_or_else(|| panic!("{s} in\n{r}"))
        };
        let redirect = pos("-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001");
        // Every exclusion comes before the catch-all redirect.
        assert!(pos("-A TRELLIS_OUTPUT -m mark --mark 0x539 -j RETURN") < redirect);
        assert!(pos("-A TRELLIS_OUTPUT -o lo -j RETURN") < redirect);
        assert!(pos("-A TRELLIS_OUTPUT -d 10.77.0.1/32 -p tcp --dport 7071 -j RETURN") < redirect);
        pos("-A TRELLIS_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006");
        pos("-A TRELLIS_INBOUND -p tcp --dport 9090 -j REDIRECT --to-ports 15006");
        assert!(
            pos("-A TRELLIS_DNS -m mark --mark 0x539 -j RETURN")
                < pos("-A TRELLIS_DNS -p udp --dport 53 -j REDIRECT --to-ports 15053")
        );
        assert!(
            pos("-A TRELLIS_DNS -m mark --mark 0x539 -j RETURN")
                < pos("-A TRELLIS_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053")
        );
        pos("-A OUTPUT -p udp --dport 53 -j TRELLIS_DNS");
        // DNS over TCP goes to the resolver, not to the outbound listener.
        assert!(
            pos("-A OUTPUT -p tcp --dport 53 -j TRELLIS_DNS")
                < pos("-A OUTPUT -p tcp -j TRELLIS_OUTPUT")
        );
        pos("-A PREROUTING -p tcp -j TRELLIS_INBOUND");
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        let no_dns = CaptureOptions {
            dns_port: None,
            ..o
        }
        .rules();
        assert!(!no_dns.contains("--dport 53"), "{no_dns}");
    }

    #[test]
    fn ipv6_rules_are_the_same_with_ipv6_exclusions() {
        let o = options();
        let (v4, v6) = (o.rules(), o.rules_v6());
        assert!(
            v4.contains("-d 10.77.0.1/32 -p tcp --dport 7071 -j RETURN"),
            "{v4}"
        );
        assert!(!v4.contains("fd00::1"), "{v4}");
        assert!(
            v6.contains("-d fd00::1/128 -p tcp --dport 7071 -j RETURN"),
            "{v6}"
        );
        assert!(!v6.contains("10.77.0.1"), "{v6}");
        let common = |r: &str| {
            r.lines()
                .filter(|l| !l.contains("7071"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(common(&v4), common(&v6));
    }
}
