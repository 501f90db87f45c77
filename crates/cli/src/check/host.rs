//! `trellis check --proxy`, the host's part: what the agent set up beside the proxy (it
//! says so in the proxy's `/config_dump`, as `host`) is still in place. The capture rules
//! are read back from the kernel (`iptables-save`), and the mesh resolver is asked a mesh
//! name, directly and, when DNS is captured, through port 53 as an application would.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;

use super::Line;

/// The host's checks, from the proxy's config dump.
pub(super) async fn checks(dump: &Value) -> Vec<Line> {
    let host = &dump["host"];
    let mut out = Vec::new();
    let capture = host.get("capture").filter(|c| c.is_object());
    if let Some(c) = capture {
        out.push(capture_rules(c, false));
        if c["ipv6"].as_bool() == Some(true) {
            out.push(capture_rules(c, true));
        }
    }
    if let Some(addr) = host["resolver"].as_str().and_then(|a| a.parse().ok()) {
        let name = mesh_name(dump);
        let direct = ask(addr, &name).await;
        out.push(match &direct {
            Ok(r) => Line::new(
                "pass",
                "mesh resolver",
                format!("{addr} answers {name}: {}", r.summary()),
                "",
            ),
            Err(e) => Line::new(
                "fail",
                "mesh resolver",
                format!("{addr}, asked {name}: {e}"),
                "the agent's resolver is not answering: is trellis join running, with --dns?",
            ),
        });
        if let (Ok(direct), Some(_)) = (&direct, capture.and_then(|c| c["dnsPort"].as_u64())) {
            // An application asks port 53: the rules must bring it to the resolver.
            let port53 = SocketAddr::from(([127, 0, 0, 1], 53));
            out.push(match ask(port53, &name).await {
                Ok(r) if r.same_answer(direct) => Line::new(
                    "pass",
                    "DNS capture",
                    format!("a query to {port53} is answered by the mesh resolver"),
                    "",
                ),
                Ok(r) => Line::new(
                    "fail",
                    "DNS capture",
                    format!("{port53} answered {name} otherwise ({}): another resolver answers the applications", r.summary()),
                    "the TRELLIS_DNS rules are missing or come after another DNS redirect: restart trellis join --capture",
                ),
                Err(e) => Line::new(
                    "fail",
                    "DNS capture",
                    format!("{port53}, asked {name}: {e}"),
                    "the TRELLIS_DNS rules are missing: restart trellis join --capture",
                ),
            });
        }
    }
    out
}

/// A name the resolver knows: the first service of the proxy's config, else one it
/// answers as unknown.
fn mesh_name(dump: &Value) -> String {
    dump["endpoint_health"]
        .as_object()
        .and_then(|m| m.keys().next().cloned())
        .and_then(|k| {
            let svc = k.split(':').next()?.to_string();
            let (ns, name) = svc.split_once('/')?;
            Some(format!("{name}.{ns}.mesh"))
        })
        .unwrap_or_else(|| "trellis-check.trellis-system.mesh".into())
}

/// Whether the rules `capture` describes are in the nat table (`v6`: ip6tables).
fn capture_rules(capture: &Value, v6: bool) -> Line {
    let (tool, name) = if v6 {
        ("ip6tables-save", "capture rules (IPv6)")
    } else {
        ("iptables-save", "capture rules")
    };
    let saved = std::process::Command::new(tool)
        .args(["-t", "nat"])
        .output();
    let text = match saved {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return Line::new(
                "warn",
                name,
                format!(
                    "{tool} -t nat: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                "run trellis check --proxy as root to read the rules",
            )
        }
        Err(e) => {
            return Line::new(
                "warn",
                name,
                format!("{tool}: {e}"),
                "install iptables, or run where it is",
            )
        }
    };
    let port = |k: &str| capture[k].as_u64().unwrap_or(0);
    let has = |chain: &str, parts: &[String]| {
        text.lines().any(|l| {
            l.starts_with(&format!("-A {chain} ")) && parts.iter().all(|p| l.contains(p.as_str()))
        })
    };
    let mut missing = Vec::new();
    let mut want = |what: String, chain: &str, parts: Vec<String>| {
        if !has(chain, &parts) {
            missing.push(what);
        }
    };
    want(
        "OUTPUT → TRELLIS_OUTPUT".into(),
        "OUTPUT",
        vec!["-p tcp".into(), "-j TRELLIS_OUTPUT".into()],
    );
    want(
        format!("outbound TCP → :{}", port("outboundPort")),
        "TRELLIS_OUTPUT",
        vec![format!("--to-ports {}", port("outboundPort"))],
    );
    want(
        "PREROUTING → TRELLIS_INBOUND".into(),
        "PREROUTING",
        vec!["-p tcp".into(), "-j TRELLIS_INBOUND".into()],
    );
    for p in capture["appPorts"].as_array().into_iter().flatten() {
        let p = p.as_u64().unwrap_or(0);
        want(
            format!("inbound :{p} → :{}", port("inboundPort")),
            "TRELLIS_INBOUND",
            vec![
                format!("--dport {p} "),
                format!("--to-ports {}", port("inboundPort")),
            ],
        );
    }
    if let Some(dns) = capture["dnsPort"].as_u64() {
        want(
            "OUTPUT (udp/53) → TRELLIS_DNS".into(),
            "OUTPUT",
            vec!["-p udp".into(), "-j TRELLIS_DNS".into()],
        );
        want(
            format!("DNS → :{dns}"),
            "TRELLIS_DNS",
            vec![format!("--to-ports {dns}")],
        );
    }
    if missing.is_empty() {
        Line::new(
            "pass",
            name,
            format!(
                "outbound TCP → :{}, inbound → :{}{}",
                port("outboundPort"),
                port("inboundPort"),
                capture["dnsPort"]
                    .as_u64()
                    .map(|d| format!(", DNS → :{d}"))
                    .unwrap_or_default()
            ),
            "",
        )
    } else {
        Line::new(
            "fail",
            name,
            format!("missing: {}", missing.join("; ")),
            "traffic goes around the proxy: restart trellis join --capture (it installs them); did a firewall manager flush the nat table?",
        )
    }
}

/// A DNS answer, past its id.
struct Answer {
    bytes: Vec<u8>,
}

impl Answer {
    fn rcode(&self) -> u8 {
        self.bytes.get(3).map_or(0, |b| b & 0x0f)
    }

    fn answers(&self) -> u16 {
        u16::from_be_bytes([
            self.bytes.get(6).copied().unwrap_or(0),
            self.bytes.get(7).copied().unwrap_or(0),
        ])
    }

    fn summary(&self) -> String {
        match (self.rcode(), self.answers()) {
            (0, n) => format!("{n} record(s)"),
            (3, _) => "no such name".into(),
            (r, _) => format!("rcode {r}"),
        }
    }

    /// The same flags, question and records (the id aside).
    fn same_answer(&self, o: &Answer) -> bool {
        self.bytes[2..] == o.bytes[2..]
    }
}

/// Ask `server` for the A records of `name` over UDP (2 s).
async fn ask(server: SocketAddr, name: &str) -> Result<Answer, String> {
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u16)
        ^ std::process::id() as u16;
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let any: std::net::IpAddr = if server.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let sock = tokio::net::UdpSocket::bind(SocketAddr::new(any, 0))
        .await
        .map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(&q).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .map_err(|_| "no answer within 2 s".to_string())?
        .map_err(|e| e.to_string())?;
    buf.truncate(n);
    if n < 12 || buf[..2] != id.to_be_bytes() || buf[2] & 0x80 == 0 {
        return Err(format!("not an answer to the query ({n} bytes)"));
    }
    Ok(Answer { bytes: buf })
}
