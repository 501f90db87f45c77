//! Service virtual IPs and the agent's resolver, without root: a real control plane assigns
//! the addresses, a real agent answers `dig` for `NAME.NAMESPACE.mesh` and forwards other
//! names to a real dnsmasq standing in for the host's resolver. Also what `--capture --dry-run`
//! would install. (Capture itself needs root and network namespaces: tests/capture.rs.)

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use http::Method;
use trellis_test_support::{control::ControlProcess, need, Temp};

/// A real dnsmasq on 127.0.0.1 that answers `upstream.example` with 127.0.0.9, and its port.
/// dnsmasq takes no port 0, so a free one is chosen; it also listens on TCP there, where a
/// port can be busy (or in TIME_WAIT) while free for UDP, so a start that fails is retried
/// on another port.
async fn dnsmasq() -> (Proc, u16) {
    let logs = Temp::dir("dnsmasq");
    let mut errors = String::new();
    for _ in 0..5 {
        // dnsmasq listens on the port over UDP and TCP: a port free for both (a port taken
        // only for TCP, one of the many connections the other tests make, failed it with
        // "Address already in use").
        let port = free_udp_and_tcp_port();
        let err = logs.join(format!("stderr-{port}"));
        let mut p = Proc(
            Command::new("dnsmasq")
                .args(["--keep-in-foreground", "--no-resolv", "--no-hosts"])
                .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
                .arg(format!("--port={port}"))
                .args(["--address=/upstream.example/127.0.0.9", "--pid-file="])
                .arg("--log-facility=-")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&err).unwrap())
                .spawn()
                .expect("spawn dnsmasq"),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = p.0.try_wait() {
                break;
            }
            if dig(port, "upstream.example").0 == "NOERROR" {
                return (p, port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        errors += &format!(
            "port {port}: {}\n",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
    }
    panic!("dnsmasq never answered:\n{errors}");
}

/// A port of 127.0.0.1 that was free for UDP and for TCP alike just now.
fn free_udp_and_tcp_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("tcp address").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `dig` against the agent over UDP: (status, answers).
fn dig(port: u16, name: &str) -> (String, Vec<String>) {
    dig_with(port, &[name, "A"])
}

/// `dig` against the agent with `args` (names, types, options): (first status, answers).
fn dig_with(port: u16, args: &[&str]) -> (String, Vec<String>) {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .args(["+tries=1", "+time=3", "+noall", "+comments", "+answer"])
        .output()
        .expect("run dig");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_string();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    (status, answers)
}

async fn vip(cp: &ControlProcess, name: &str) -> String {
    let (st, v) = cp
        .call(
            Method::GET,
            &format!("/api/v1/resources/Service/test/{name}"),
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    v["spec"]["virtualIP"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn service(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: {name} }}\n  ports: [{{ name: http, port: 80, targetPort: 8080 }}]\n{extra}"
    )
}

#[tokio::test]
async fn services_get_stable_virtual_ips_and_the_agent_resolves_mesh_names() {
    need("dig", "bind9-dnsutils");
    need("dnsmasq", "dnsmasq-base");
    let cp = ControlProcess::start(BIN, &[]);

    // Assigned from 10.96.0.0/16, one per service, kept when the service is applied again.
    apply_ok(
        &cp,
        docs(&[service("catalog", ""), service("payments", "")]),
    )
    .await;
    let (catalog, payments) = (vip(&cp, "catalog").await, vip(&cp, "payments").await);
    assert!(catalog.starts_with("10.96."), "{catalog}");
    assert!(payments.starts_with("10.96."), "{payments}");
    assert_ne!(catalog, payments);
    // The operator sees them in `trellis get`.
    let table = ok(cli(&cp, &["get", "svc", "-n", "test"]));
    assert!(
        table.contains(&catalog) && table.contains(&payments),
        "{table}"
    );
    let (st, v) = cp
        .call(Method::POST, "/api/v1/apply", &service("catalog", ""), None)
        .await;
    assert_eq!(
        (st, v["applied"][0]["action"].as_str()),
        (200, Some("unchanged")),
        "{v}"
    );
    assert_eq!(vip(&cp, "catalog").await, catalog);
    // An address already taken is refused, naming the field; nothing is written.
    let taken = service("orders", &format!("  virtualIP: {catalog}\n"));
    let (st, v) = cp.call(Method::POST, "/api/v1/apply", &taken, None).await;
    assert_eq!(st, 422, "{v}");
    let msg = v.to_string();
    assert!(
        msg.contains("spec.virtualIP") && msg.contains("already"),
        "{msg}"
    );
    let (st, _) = cp
        .call(
            Method::GET,
            "/api/v1/resources/Service/test/orders",
            "",
            None,
        )
        .await;
    assert_eq!(st, 404);
    // A chosen one is kept as given.
    apply_ok(&cp, service("orders", "  virtualIP: 10.96.200.7\n")).await;
    assert_eq!(vip(&cp, "orders").await, "10.96.200.7");

    // The host's resolver: a real dnsmasq that knows one name.
    let (_dnsmasq, upstream_port) = dnsmasq().await;

    // A joined agent with a resolver on loopback (no capture: no root needed).
    let state = Temp::dir("dns-agent");
    let agent_log = Temp::dir("dns-agent-log");
    let t = token(&cp, "test", "client", "10m", "1");
    let _agent = Proc(
        Command::new(BIN)
            .args(["join", "--control-plane", &cp.xds_url(), "--token", &t])
            .args(["--state-dir", state.0.to_str().unwrap()])
            .args(["--name", "client-1", "--address", "127.0.0.1"])
            .args(["--check", "none", "--no-access-log"])
            .args(["--admin", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
            .args(["--inbound", "127.0.0.1:0"])
            .args(["--dns", "127.0.0.1:0"])
            .args(["--dns-upstream", &format!("127.0.0.1:{upstream_port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(agent_log.join("stderr")).unwrap())
            .spawn()
            .expect("spawn trellis join"),
    );
    // The resolver's port, as the agent logged it.
    let dns_port = eventually(
        "the agent's resolver listens",
        Duration::from_secs(20),
        async || {
            let text = std::fs::read_to_string(agent_log.join("stderr")).ok()?;
            text.lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                let listen: std::net::SocketAddr = v["listen"].as_str()?.parse().ok()?;
                (v["message"] == "answering DNS for .mesh").then_some(listen.port())
            })
        },
    )
    .await;
    let answer = eventually("the agent answers", Duration::from_secs(20), async || {
        let (status, a) = dig(dns_port, "catalog.test.mesh");
        (status == "NOERROR" && !a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(answer, vec![catalog.clone()]);
    assert_eq!(dig(dns_port, "PAYMENTS.test.mesh.").1, vec![payments]);
    // Unknown mesh names do not leak to the host's resolver: NXDOMAIN from the agent.
    assert_eq!(dig(dns_port, "nothing.test.mesh").0, "NXDOMAIN");
    // Other names go to the host's resolver, whose answer comes back unchanged.
    let (status, a) = dig(dns_port, "upstream.example");
    assert_eq!(
        (status.as_str(), a),
        ("NOERROR", vec!["127.0.0.9".to_string()])
    );
    // The same over TCP, as a client asks after a truncated answer: mesh names answered,
    // unknown ones NXDOMAIN, others forwarded (over TCP); two queries on one connection.
    let tcp = |args: &[&str]| dig_with(dns_port, &[&["+tcp"], args].concat());
    assert_eq!(
        tcp(&[
            "+keepopen",
            "catalog.test.mesh",
            "A",
            "upstream.example",
            "A"
        ])
        .1,
        vec![catalog.clone(), "127.0.0.9".to_string()]
    );
    assert_eq!(tcp(&["nothing.test.mesh", "A"]).0, "NXDOMAIN");
    // Garbage over TCP (a message that is no query; a length with half its bytes) closes
    // that connection and nothing else.
    for junk in [&[0u8, 3, 1, 2, 3][..], &[0, 40, 1, 2]] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", dns_port))
            .await
            .unwrap();
        s.write_all(junk).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest));
        let n = read.await.expect("the resolver closes it").expect("read");
        assert_eq!((n, rest), (0, vec![]), "{junk:?}");
    }
    assert_eq!(tcp(&["catalog.test.mesh", "A"]).1, vec![catalog.clone()]);

    // The resolver follows the mesh: a new service resolves, a deleted one stops resolving.
    apply_ok(&cp, service("reviews", "")).await;
    let reviews = vip(&cp, "reviews").await;
    eventually(
        "a new service resolves",
        Duration::from_secs(10),
        async || (dig(dns_port, "reviews.test.mesh").1 == vec![reviews.clone()]).then_some(()),
    )
    .await;
    let (st, v) = cp
        .call(
            Method::DELETE,
            "/api/v1/resources/Service/test/reviews",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    eventually(
        "a deleted service stops resolving",
        Duration::from_secs(10),
        async || (dig(dns_port, "reviews.test.mesh").0 == "NXDOMAIN").then_some(()),
    )
    .await;
    // Its address was freed with it: made again, it gets the same one back.
    apply_ok(&cp, service("reviews", "")).await;
    assert_eq!(vip(&cp, "reviews").await, reviews);
}

#[test]
fn capture_dry_run_prints_the_rules_it_would_install() {
    let out = Command::new(BIN)
        .args(["join", "--capture", "--dry-run"])
        .args([
            "--control-plane",
            "https://127.0.0.1:7071",
            "--state-dir",
            "/nonexistent",
        ])
        .args([
            "--name",
            "web-1",
            "--address",
            "10.77.0.2",
            "--port",
            "http=8080",
        ])
        .args([
            "--outbound",
            "127.0.0.1:15001",
            "--inbound",
            "0.0.0.0:15006",
        ])
        .output()
        .expect("run trellis join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "-A TRELLIS_OUTPUT -m mark --mark 0x539 -j RETURN",
        "-A TRELLIS_OUTPUT -o lo -j RETURN",
        "-A TRELLIS_OUTPUT -d 127.0.0.1/32 -p tcp --dport 7071 -j RETURN",
        "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "-A TRELLIS_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006",
        "-A TRELLIS_DNS -p udp --dport 53 -j REDIRECT --to-ports 15053",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
    // A host with IPv6 gets the same rules for ip6tables.
    let has_v6 = std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| !t.trim().is_empty());
    assert_eq!(
        text.lines()
            .filter(|l| *l == "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001")
            .count(),
        if has_v6 { 2 } else { 1 },
        "{text}"
    );
    assert_eq!(
        text.contains("# ip6tables-restore --noflush"),
        has_v6,
        "{text}"
    );
    // Unless told to leave IPv6 alone.
    let out = Command::new(BIN)
        .args(["join", "--capture", "--dry-run", "--no-ipv6-capture"])
        .args(["--control-plane", "https://127.0.0.1:7071"])
        .args(["--state-dir", "/nonexistent", "--name", "web-1"])
        .args(["--address", "10.77.0.2", "--port", "http=8080"])
        .output()
        .expect("run trellis join");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("--to-ports 15001"), "{text}");
    assert!(!text.contains("ip6tables"), "{text}");
    // Nothing was installed: the dry run needs no root and touches no state.
    assert!(!std::path::Path::new("/nonexistent").exists());
}
