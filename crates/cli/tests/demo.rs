//! `trellis demo`, the README's first command: it tells its story (steady traffic, an
//! application failing on the VM, a cut link to the container's host, the mend, a canary),
//! each step with what `diagnose` or `stat` says, prints a working sign-in link to the pane,
//! and exits cleanly.

mod common;

use std::{
    io::{BufRead, Read, Write},
    process::{Command, Stdio},
    time::Duration,
};

use common::BIN;

/// The text of step `n` of the story: from its heading to the next one.
fn step(so: &str, n: u32) -> &str {
    let from = so
        .find(&format!("step {n}/5:"))
        .unwrap_or_else(|| panic!("step {n}: {so}"));
    let rest = &so[from..];
    let end = rest[1..]
        .find("--- t=")
        .or_else(|| rest.find("what the control plane saw"))
        .map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

fn served(part: &str, who: &str) -> bool {
    part.lines()
        .any(|l| l.starts_with("t=") && l.contains("served by:") && l.contains(who))
}

/// GET `path` from `addr` (`host:port`) over plain HTTP/1.1: the response head.
fn get_head(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split("\r\n\r\n").next().unwrap_or_default().to_string()
}

#[test]
fn the_demo_tells_its_story_and_each_step_shows_in_diagnose_and_stat() {
    // Ended by Ctrl-C (SIGINT) once the story is over, as a user ends it.
    let mut child = Command::new(BIN)
        .args(["demo", "--step", "4s", "--rate", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run trellis demo");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut so = String::new();
    // The sign-in link works while the demo runs: once, with a session cookie.
    let mut link_checked = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        so.push_str(&line);
        so.push('\n');
        if let Some(url) = line.split("signs you in once): ").nth(1) {
            let rest = url.trim().strip_prefix("http://").expect("an http link");
            let (addr, path) = rest.split_at(rest.find('/').unwrap());
            assert!(path.starts_with("/ui/enter?code="), "{line}");
            let head = get_head(addr, path);
            assert!(head.starts_with("HTTP/1.1 303"), "{head}");
            assert!(head.contains("set-cookie: trellis_session="), "{head}");
            assert!(get_head(addr, path).starts_with("HTTP/1.1 401"), "once");
            link_checked = true;
        }
        if line.starts_with("--- the story is over") {
            let sent = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
        }
    }
    let out = child.wait_with_output().unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{so}\n{se}");
    assert!(link_checked, "the demo prints a sign-in link: {so}");
    // Ctrl-C stops the traffic before the proxies: no request fails from then on.
    let t = |l: &str, after: &str| -> f64 {
        l.split(after)
            .nth(1)
            .unwrap()
            .trim_start()
            .split('s')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let ctrl_c = so
        .lines()
        .find(|l| l.starts_with("(Ctrl-C at t="))
        .map(|l| t(l, "t="))
        .unwrap_or_else(|| panic!("the demo saw Ctrl-C: {so}"));
    for l in se.lines().filter(|l| l.contains("request failed")) {
        assert!(
            t(l, "t=") < ctrl_c,
            "failed at Ctrl-C ({ctrl_c} s): {l}\n{se}"
        );
    }
    for env in [
        "catalog-vm          as vm",
        "catalog-container   as container",
        "catalog-bare-metal  as bare-metal",
        "catalog-v2          as container",
    ] {
        assert!(so.contains(env), "{so}");
    }

    // 1. Steady: the caller's own zone serves, from the VM.
    let s1 = step(&so, 1);
    assert!(served(s1, "catalog-vm"), "{so}");
    assert!(!served(s1, "catalog-container"), "{so}");
    // 2. The VM's application fails: the container in the next zone serves, and diagnose
    //    says it is the application, on the VM.
    let s2 = step(&so, 2);
    assert!(served(s2, "catalog-container"), "{so}");
    let verdict = s2
        .split("$ trellis diagnose")
        .nth(1)
        .expect("diagnose's output");
    assert!(
        verdict.contains("✗ APPLICATION: the application of shop/catalog-vm answers errors"),
        "{so}"
    );
    assert!(
        verdict.contains("where:       workload shop/catalog-vm (vm"),
        "{so}"
    );
    // 3. The link to the container's host is cut: the bare-metal host in the other region
    //    serves, and diagnose names the network, that link.
    let s3 = step(&so, 3);
    assert!(served(s3, "catalog-bare-metal"), "{so}");
    let verdict = s3
        .split("$ trellis diagnose")
        .nth(1)
        .expect("diagnose's output");
    assert!(verdict.contains("✗ NETWORK:"), "{so}");
    assert!(
        verdict.contains("where:       link shop/shopper (")
            && verdict.contains("-> shop/catalog-container (container"),
        "{so}"
    );
    assert!(!verdict.contains("APPLICATION"), "the app is fine: {so}");
    // 4. Mended: back to the caller's zone.
    let s4 = step(&so, 4);
    let last_lines: Vec<&str> = s4.lines().filter(|l| l.starts_with("t=")).collect();
    assert!(
        last_lines.last().is_some_and(|l| l.contains("catalog-vm")),
        "{so}"
    );
    // 5. The canary takes part of the traffic, as served and as the control plane counted.
    let s5 = step(&so, 5);
    assert!(served(s5, "catalog-v2"), "{so}");
    let table = s5
        .split("$ trellis stat workloads")
        .nth(1)
        .expect("stat's output");
    let v2 = table
        .lines()
        .find(|l| l.starts_with("shop/catalog-v2 "))
        .unwrap_or_else(|| panic!("a row for the canary: {so}"));
    assert!(v2.contains("100.00%"), "{v2}");

    // Retries and failover absorbed both faults. A request in flight on the link at the
    // moment it is cut may be lost with its connection: at most that one.
    let line = so
        .lines()
        .find(|l| l.contains(" requests, ") && l.contains(" failed"))
        .unwrap();
    let num = |after: &str| -> u64 {
        line.split(after)
            .next()
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap()
            .trim_start_matches('(')
            .parse()
            .unwrap()
    };
    let (sent, failed, warm) = (num(" requests, "), num(" failed"), num(" more before"));
    assert!(failed <= 1, "{so}\n{se}");
    // The warm-up starts once the caller's proxy holds every catalog workload: none of its
    // requests goes unanswered (one did, `no_healthy_upstream`, when it started at once).
    assert!(warm >= 1, "{line}");
    assert!(!line.contains("not answered"), "{line}");
    assert!(so.contains("agents deregistered"), "{so}");

    // The control plane counted every request of the story, from the proxies' reports:
    // the catalog's row of the stat table, under its REQUESTS header.
    let table = so
        .split("trellis stat -n shop -o wide):")
        .nth(1)
        .expect("the stat table");
    let header = table
        .lines()
        .find(|l| l.starts_with("NAME"))
        .expect("a header");
    let col = header.find("REQUESTS").expect("a REQUESTS column");
    let row = table
        .lines()
        .find(|l| l.starts_with("shop/catalog "))
        .expect("the catalog's row");
    let counted: u64 = row[col..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        sent <= counted && counted <= sent + warm,
        "{sent} + {warm} vs {counted}: {so}"
    );
    assert!(row.contains("bare-metal,container,vm"), "{row}");
    let edges = so
        .split("(trellis edges -n shop):")
        .nth(1)
        .expect("the edges table");
    for callee in [
        "shop/catalog-vm",
        "shop/catalog-container",
        "shop/catalog-bare-metal",
        "shop/catalog-v2",
    ] {
        assert!(
            edges
                .lines()
                .any(|l| l.starts_with("shop/shopper") && l.contains(callee)),
            "{callee}: {so}"
        );
    }
}
