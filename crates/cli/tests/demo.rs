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
}
