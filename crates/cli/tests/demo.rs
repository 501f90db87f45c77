//! `trellis demo`, the README's first command, runs its story and exits cleanly.

mod common;

use common::BIN;

#[test]
fn the_demo_joins_three_environments_fails_over_and_loses_no_request() {
    let out = std::process::Command::new(BIN)
        .args(["demo", "--duration", "6s", "--rate", "20"])
        .output()
        .expect("run trellis demo");
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for env in ["as vm", "as container", "as bare-metal"] {
        assert!(so.contains(env), "{so}");
    }
    // Before the failure the caller's own zone serves; after it, the container in the
    // same region; nothing fails on the way.
    let (before, after) = so
        .split_once("fails its health check")
        .expect("the failure happens");
    // Each line lists the instances that served in that second, in name order.
    let served = |part: &str, who: &str| {
        part.lines()
            .any(|l| l.starts_with("t=") && l.contains("served by:") && l.contains(who))
    };
    assert!(served(before, "catalog-vm"), "{so}");
    assert!(!served(before, "catalog-container"), "{so}");
    assert!(served(after, "catalog-container"), "{so}");
    assert!(
        !so.lines()
            .any(|l| l.starts_with("t=") && l.contains("catalog-bare-metal")),
        "the other region stays idle: {so}"
    );
    assert!(so.contains(" 0 failed"), "{so}");
    assert!(so.contains("agents deregistered"), "{so}");

    // The control plane counted every request the shopper sent, from the proxies' reports:
    // the catalog's row of the stat table, read under its REQUESTS header.
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
    let (sent, warm) = (num(" requests, "), num(" more before"));
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
    // Every request of the story; of the ones sent while waiting for the caller's zone,
    // those that reached the catalog (one sent before the proxy had the service is no one's).
    assert!(
        sent <= counted && counted <= sent + warm,
        "{sent} + {warm} vs {counted}: {so}"
    );
    assert!(
        row.contains("bare-metal,container,vm") || row.contains("container,vm"),
        "{row}"
    );
    let edges = so
        .split("(trellis edges -n shop):")
        .nth(1)
        .expect("the edges table");
    assert!(
        edges
            .lines()
            .any(|l| l.starts_with("shop/shopper") && l.contains("shop/catalog-vm")),
        "{so}"
    );
}
