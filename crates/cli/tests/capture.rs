//! Transparent capture and mesh DNS on real hosts: two network namespaces on a bridge, a
//! control plane reached over TLS on the bridge, an agent with `--capture` in each. An
//! unchanged client (curl) calls `http://catalog.test.mesh/` and is meshed by mutual TLS; a
//! caller that goes around the proxy is refused; other destinations pass through; the same
//! holds over IPv6 (the bed is dual-stack), and DNS over UDP and TCP is answered; packet loss
//! on the link (iptables `statistic` on the server's host) is named by `trellis diagnose` from
//! the kernel's TCP figures the client's proxy reports; the rules go
//! with the agent, and a killed agent's rules are replaced (not doubled) when it restarts
//! with its stored identity and no token. Needs root (CI runs as root); without root it says
//! so and does nothing, unless CI is set.

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use trellis_test_support::{netbed::NetBed, sum_metric, Logs, Temp};

// Dual stack (IPv4 callers appear as ::ffff:a.b.c.d, shown without the prefix), so that
// going around the proxy over IPv6 is tried too.
const APP: &str = r#"
import http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        peer = self.client_address[0].removeprefix("::ffff:")
        body = ("catalog-app saw " + peer).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
S(("::", int(sys.argv[1])), H).serve_forever()
"#;

/// curl inside `ns`: (exit code, body).
fn curl(bed: &NetBed, ns: &str, url: &str) -> (i32, String) {
    let out = bed
        .cmd(ns, &["curl", "-sS", "--max-time", "5", url])
        .output()
        .expect("curl");
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        eprintln!(
            "curl {url} in {ns}: exit {code}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn metrics(bed: &NetBed, ns: &str) -> String {
    curl(bed, ns, "http://127.0.0.1:15000/metrics").1
}

/// A call from the root namespace (not captured) straight to the server's application port
/// at `url`: the server's capture sends it to the inbound listener, which refuses plaintext.
fn around_the_proxy(bed: &NetBed, server: &str, url: &str) {
    let refusals = || {
        sum_metric(
            &metrics(bed, server),
            "trellis_inbound_tls_refusals_total",
            &[],
        )
    };
    let before = refusals();
    let direct = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "-g", url])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&direct.stdout).contains("catalog-app"),
        "{url}: {direct:?}"
    );
    let after = refusals();
    assert!(after > before, "{url}: refusals {before} -> {after}");
}

/// The nat rules of `ns`, IPv4 then IPv6.
fn rules(bed: &NetBed, ns: &str) -> String {
    let v4 = bed.run(ns, &["iptables", "-t", "nat", "-S"]).1;
    let v6 = bed.run(ns, &["ip6tables", "-t", "nat", "-S"]).1;
    format!("{v4}{v6}")
}

// Several threads: curl blocks one while the pass-through server answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_clients_reach_services_by_mesh_name_over_mtls_and_rules_go_with_the_agent() {
    let Some(mut bed) = root_bed("capture") else {
        return;
    };
    let (client, server) = (bed.host(2), bed.host(3));
    let logs = Logs::new("capture-logs");
    let (cp, xds) = control_on_bridge(&bed);
    apply_ok(&cp, CATALOG.to_string()).await;

    // The server host: the application on :8080, and its agent.
    let app = bed.cmd(&server, &["python3", "-c", APP, "8080"]);
    bed.spawn(app, &logs.path("app.log"));
    let server_state = Temp::dir("capture-server");
    let join = Join {
        cp: &cp,
        xds: xds.clone(),
        state: server_state.0.clone(),
        name: "catalog-1",
        app: "catalog",
        address: bed.addr(3).to_string(),
    };
    let t = token(&cp, "test", "catalog", "10m", "1");
    let mut c = join.cmd(&bed, &server, Some(&t));
    c.args(["--port", "http=8080", "--check", "http:/"]);
    bed.spawn(c, &logs.path("server-agent.log"));

    // The client host: only an agent; curl plays the unchanged application. It has no route
    // to the virtual IPs: the agent adds one (and removes it when it stops).
    assert!(bed.run(&client, &["ip", "route", "del", "10.96.0.0/16"]).0);
    let vip_route = |bed: &NetBed| bed.run(&client, &["ip", "route", "show", "10.96.0.0/16"]).1;
    let client_state = Temp::dir("capture-client");
    let cjoin = Join::shopper(&cp, xds, client_state.0.clone(), &bed);
    let t = token(&cp, "test", "shopper", "10m", "1");
    let mut c = cjoin.cmd(&bed, &client, Some(&t));
    c.args(["--check", "none"]);
    let agent = bed.spawn(c, &logs.path("client-agent.log"));

    let (code, body) = eventually(
        "curl reaches catalog.test.mesh",
        Duration::from_secs(30),
        async || {
            let (code, body) = curl(&bed, &client, "http://catalog.test.mesh/");
            (code == 0 && body.starts_with("catalog-app")).then_some((code, body))
        },
    )
    .await;
    assert!(vip_route(&bed).contains("proto 217"), "{}", vip_route(&bed));
    // The server's proxy delivered it, from loopback: the request went proxy to proxy.
    assert_eq!((code, body.as_str()), (0, "catalog-app saw 127.0.0.1"));
    let m = metrics(&bed, &client);
    let out = [
        ("direction", "outbound"),
        ("dst_service", "catalog.test"),
        ("failure_class", "ok"),
    ];
    assert!(
        sum_metric(&m, "trellis_http_requests_total", &out) >= 1.0,
        "{m}"
    );
    let m = metrics(&bed, &server);
    let inb = [("direction", "inbound"), ("failure_class", "ok")];
    assert!(
        sum_metric(&m, "trellis_http_requests_total", &inb) >= 1.0,
        "{m}"
    );
    let (st, w) = cp
        .call(
            Method::GET,
            "/api/v1/resources/Service/test/catalog",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200);
    let vip = w["spec"]["virtualIP"].as_str().unwrap().to_string();
    // The address itself is captured too (no DNS involved).
    let (code, body) = curl(&bed, &client, &format!("http://{vip}/"));
    assert_eq!((code, body.as_str()), (0, "catalog-app saw 127.0.0.1"));
    // DNS over TCP to the host's nameserver (the bridge's gateway, where nothing answers) is
    // captured into the agent's resolver as well, as UDP is.
    let (ok, out, err) = bed.run(
        &client,
        &[
            "dig",
            "+tcp",
            "+tries=1",
            "+time=3",
            "+short",
            "catalog.test.mesh",
        ],
    );
    assert_eq!((ok, out.trim()), (true, vip.as_str()), "{err}");

    // `trellis check --proxy` on the client host: the capture rules and the resolver the
    // agent set up are in place, and port 53 reaches the resolver.
    let check = |bed: &NetBed| {
        let o = bed
            .cmd(&client, &[BIN, "check", "--proxy"])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (ok, out) = check(&bed);
    assert!(ok, "{out}");
    for want in ["✓ capture rules:", "✓ mesh resolver:", "✓ DNS capture:"] {
        assert!(out.contains(want), "{want}: {out}");
    }
    // A rule removed behind the agent's back is found, and named.
    let jump = |op: &'static str| {
        [
            "iptables",
            "-t",
            "nat",
            op,
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "TRELLIS_OUTPUT",
        ]
    };
    assert!(bed.run(&client, &jump("-D")).0);
    let (ok, out) = check(&bed);
    assert!(
        !ok && out.contains("✗ capture rules: missing: OUTPUT → TRELLIS_OUTPUT"),
        "{out}"
    );
    assert!(bed.run(&client, &jump("-A")).0);

    // Packet loss on the link: one segment in ten from the client's host dropped on arrival
    // at the server's (loss beyond the sender's host: the sender's kernel retransmits, which
    // a drop on its own OUTPUT would not show). Requests still succeed; the kernel's figures
    // of the client proxy's connection show the retransmissions, and `diagnose` names the link.
    let client_ip = bed.addr(2).to_string();
    let loss = |op: &str| {
        let rule = [
            "iptables",
            op,
            "INPUT",
            "-s",
            &client_ip,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.1",
            "-j",
            "DROP",
        ];
        assert!(bed.run(&server, &rule).0, "{rule:?}");
    };
    loss("-I");
    let verdict = eventually(
        "diagnose names loss on the link to the server",
        Duration::from_secs(60),
        async || {
            for _ in 0..40 {
                curl(&bed, &client, "http://catalog.test.mesh/");
            }
            let (_, v) = cp
                .call(
                    Method::GET,
                    "/api/v1/diagnose?namespace=test&window=1m",
                    "",
                    None,
                )
                .await;
            v["verdicts"]
                .as_array()?
                .iter()
                .find(|x| {
                    x["cause"] == "network"
                        && x["problem"].as_str().unwrap_or_default().contains("lost")
                })
                .cloned()
        },
    )
    .await;
    loss("-D");
    eprintln!("loss on the link: {}", verdict["evidence"][0]);
    assert_eq!(verdict["place"]["kind"], "link", "{verdict:#}");
    assert_eq!(
        (
            verdict["place"]["from"]["workload"].as_str(),
            verdict["place"]["to"]["workload"].as_str()
        ),
        (Some("test/shopper-1"), Some("test/catalog-1")),
        "{verdict:#}"
    );

    // Going around the proxy: the application's port is captured into the inbound listener,
    // which refuses plaintext (STRICT by default). The root namespace is not captured.
    around_the_proxy(&bed, &server, &format!("http://{}:8080/", bed.addr(3)));

    // A destination that is no service passes through as addressed, and is counted so.
    let other = tokio::net::TcpListener::bind((bed.gateway(), 0))
        .await
        .unwrap();
    let other_addr = other.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = other.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nplain",
                )
                .await;
        }
    });
    let (code, body) = curl(&bed, &client, &format!("http://{other_addr}/"));
    assert_eq!((code, body.as_str()), (0, "plain"));
    let m = metrics(&bed, &client);
    let pass = [("dst_service", "passthrough"), ("failure_class", "ok")];
    assert!(
        sum_metric(&m, "trellis_tcp_connections_total", &pass) >= 1.0,
        "{m}"
    );

    // IPv6 is captured alike. Around the proxy to the (dual-stack) application: refused.
    around_the_proxy(&bed, &server, &format!("http://[{}]:8080/", bed.addr6(3)));
    // Out to an IPv6 address: through the proxy, as addressed.
    let passed = |bed: &NetBed| {
        sum_metric(
            &metrics(bed, &client),
            "trellis_tcp_connections_total",
            &pass,
        )
    };
    let passed_before = passed(&bed);
    let other6 = std::net::TcpListener::bind((bed.addr6(1), 0)).unwrap();
    let other6_addr = other6.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        while let Ok((mut s, _)) = other6.accept() {
            let _ = s.read(&mut [0u8; 1024]);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nsix");
        }
    });
    let (code, body) = curl(&bed, &client, &format!("http://{other6_addr}/"));
    assert_eq!((code, body.as_str()), (0, "six"));
    assert!(
        passed(&bed) > passed_before,
        "the IPv6 call went around the proxy"
    );
    // DNS to an IPv6 nameserver (where nothing answers), over UDP and TCP.
    let server6 = format!("@{}", bed.addr6(1));
    for transport in ["+notcp", "+tcp"] {
        let (ok, out, err) = bed.run(
            &client,
            &[
                "dig",
                &server6,
                transport,
                "+tries=1",
                "+time=3",
                "+short",
                "catalog.test.mesh",
            ],
        );
        assert_eq!((ok, out.trim()), (true, vip.as_str()), "{transport}: {err}");
    }

    // A killed agent leaves its rules; the restarted one (no token: the stored identity)
    // replaces them, so they are there once, and traffic flows again.
    assert!(rules(&bed, &client).contains("TRELLIS_OUTPUT"));
    bed.signal(agent, "-KILL");
    bed.wait_exit(agent, Duration::from_secs(5)).await;
    // Once per family.
    let jumps = |r: &str| {
        r.lines()
            .filter(|l| *l == "-A OUTPUT -p tcp -j TRELLIS_OUTPUT")
            .count()
    };
    assert_eq!(jumps(&rules(&bed, &client)), 2, "left behind by the crash");
    let mut c = cjoin.cmd(&bed, &client, None);
    c.args(["--check", "none"]);
    let agent = bed.spawn(c, &logs.path("client-agent-2.log"));
    eventually(
        "the restarted agent serves again",
        Duration::from_secs(30),
        async || {
            let (code, body) = curl(&bed, &client, "http://catalog.test.mesh/");
            (code == 0 && body.starts_with("catalog-app")).then_some(())
        },
    )
    .await;
    assert_eq!(jumps(&rules(&bed, &client)), 2, "{}", rules(&bed, &client));
    assert!(logs
        .read("client-agent-2.log")
        .contains("traffic capture installed"));

    // An upgrade in place: the same command started again takes over the running agent's
    // listeners and resolver sockets (through STATE_DIR/handoff.sock) and keeps its rules
    // and route; the old agent exits without removing them. Captured clients, by mesh name,
    // are served throughout.
    let mut c = cjoin.cmd(&bed, &client, None);
    c.args(["--check", "none"]);
    let upgraded = bed.spawn(c, &logs.path("client-agent-3.log"));
    let (mut served, mut failed) = (0, Vec::new());
    while !bed.exited(agent) {
        let (code, body) = curl(&bed, &client, "http://catalog.test.mesh/");
        if code == 0 && body.starts_with("catalog-app") {
            served += 1;
        } else {
            failed.push((code, body));
        }
        assert!(served + failed.len() < 2000, "the old agent did not leave");
    }
    assert_eq!(
        bed.wait_exit(agent, Duration::from_secs(1)).await,
        Some(0),
        "{}",
        logs.read("client-agent-2.log")
    );
    eprintln!("upgrade in place: {served} captured requests served, failed: {failed:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert!(logs
        .read("client-agent-3.log")
        .contains("traffic capture taken over"));
    assert!(logs
        .read("client-agent-2.log")
        .contains("a new agent took over"));
    assert_eq!(jumps(&rules(&bed, &client)), 2, "{}", rules(&bed, &client));
    assert!(vip_route(&bed).contains("proto 217"), "{}", vip_route(&bed));
    let (code, body) = curl(&bed, &client, "http://catalog.test.mesh/");
    assert_eq!((code, body.as_str()), (0, "catalog-app saw 127.0.0.1"));
    let agent = upgraded;

    // A clean stop removes every rule it made.
    bed.signal(agent, "-TERM");
    assert_eq!(
        bed.wait_exit(agent, Duration::from_secs(40)).await,
        Some(0),
        "{}",
        logs.read("client-agent-3.log")
    );
    let left = rules(&bed, &client);
    assert!(!left.contains("TRELLIS"), "{left}");
    assert_eq!(
        vip_route(&bed),
        "",
        "the agent's route to the virtual IPs is gone"
    );
}
