//! Container discovery with real containers: podman (runc) on a test bridge, its Docker API
//! socket watched by `trellis containers`, a client host with a capturing agent. A labelled
//! container joins as a `container` Workload with an agent in its network namespace, serves
//! `http://catalog.test.mesh/` over mutual TLS, leaves every proxy when it stops, and rejoins
//! with its stored identity (the single-use token is spent) when it starts again, and is
//! handed from one discovery to the next in an upgrade in place. Needs root.

mod common;

use std::time::{Duration, Instant};

use common::*;
use trellis_test_support::{podman::Podman, Logs, Temp};

/// Wait until `client` (a host of the bed) is answered 200 by `catalog.test.mesh`.
async fn until_served(
    bed: &trellis_test_support::netbed::NetBed,
    client: &str,
    what: &str,
    secs: u64,
) {
    eventually(what, Duration::from_secs(secs), async || {
        let (status, _, _) = get_in(bed, client, "http://catalog.test.mesh/");
        (status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_containers_join_serve_leave_and_rejoin_from_the_engines_events() {
    // Before the bed: dropped after it, once the agents it runs have stopped writing there.
    let (state, client_state) = (
        Temp::dir("containers-state"),
        Temp::dir("containers-client"),
    );
    let Some(mut bed) = root_bed("container") else {
        return;
    };
    let client = bed.host(2);
    let logs = Logs::new("containers-logs");
    let mut podman = Podman::new(bed.bridge(), bed.gateway(), 10, 19);
    let socket = podman.serve().await.to_string();

    let (cp, xds) = control_on_bridge(&bed);
    apply_ok(&cp, CATALOG.to_string()).await;

    // Discovery on the host, with one single-use token for the catalog identity.
    let t = token(&cp, "test", "catalog", "10m", "1");
    let discovery_cmd = || discovery(&cp, &xds, &socket, &t, &state, &logs.0);
    let discovery = bed.spawn(discovery_cmd(), &logs.path("discovery.log"));

    // A client host whose unchanged application is curl.
    let t = token(&cp, "test", "shopper", "10m", "1");
    let client_join = Join::shopper(&cp, xds.clone(), client_state.0.clone(), &bed);
    let mut c = client_join.cmd(&bed, &client, Some(&t));
    c.args(["--check", "none"]);
    bed.spawn(c, &logs.path("client-agent.log"));

    // The container starts; discovery joins it from the engine's start event.
    run_catalog_container(&podman, "catalog-c1");
    let w = eventually(
        "the container's workload is healthy",
        Duration::from_secs(30),
        async || {
            let w = workload(&cp, "catalog-c1").await?;
            (w["status"]["health"]["healthy"] == true).then_some(w)
        },
    )
    .await;
    assert_eq!(w["spec"]["environment"], "container", "{w}");
    assert_eq!(w["spec"]["identity"], "catalog", "{w}");
    assert_eq!(w["spec"]["locality"]["zone"], "eu-west-1b", "{w}");
    let ip = w["spec"]["address"].as_str().unwrap().to_string();
    // From the container network's range on the bed's bridge.
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    assert_eq!(ip.octets()[..3], bed.addr(0).octets()[..3], "{ip}");
    assert!((10..=19).contains(&ip.octets()[3]), "{ip}");

    // The client reaches it by mesh name; the container's own proxy answers (mTLS between
    // the two agents), and the container's port is captured.
    let (code, body) = eventually(
        "the client reaches the container",
        Duration::from_secs(20),
        async || {
            let (status, _, body) = get_in(&bed, &client, "http://catalog.test.mesh/");
            (status == 200).then_some((status, body))
        },
    )
    .await;
    assert_eq!((code, body.trim()), (200, "container-app"));

    // Stopped: the workload leaves, and the client's proxy stops sending to it.
    let stopped = Instant::now();
    podman.run(&["stop", "--time", "0", "catalog-c1"]);
    eventually(
        "the workload is deregistered",
        Duration::from_secs(10),
        async || workload(&cp, "catalog-c1").await.is_none().then_some(()),
    )
    .await;
    let (code, _) = eventually(
        "the client's proxy has no endpoint",
        Duration::from_secs(10),
        async || {
            let (status, _, body) = get_in(&bed, &client, "http://catalog.test.mesh/");
            (status == 503).then_some((status, body))
        },
    )
    .await;
    eprintln!(
        "endpoint gone from the client's proxy {:?} after the stop",
        stopped.elapsed()
    );
    assert_eq!(code, 503);

    // Started again: a new network namespace, the same name; it rejoins with the identity
    // stored for it (its token was single-use and is spent).
    podman.run(&["start", "catalog-c1"]);
    until_served(&bed, &client, "the container rejoins", 30).await;
    let agent_log = logs.read("catalog-c1.log");
    assert!(
        agent_log.contains("reusing the stored certificate"),
        "{agent_log}"
    );

    // Discovery crashes: the container's agent stops with it and deregisters (nothing
    // manages it any more); a new discovery joins the running container again.
    bed.signal(discovery, "-KILL");
    eventually(
        "the orphaned agent leaves",
        Duration::from_secs(20),
        async || workload(&cp, "catalog-c1").await.is_none().then_some(()),
    )
    .await;
    let discovery = bed.spawn(discovery_cmd(), &logs.path("discovery-2.log"));
    eventually(
        "the new discovery rejoins it",
        Duration::from_secs(30),
        async || {
            let w = workload(&cp, "catalog-c1").await?;
            (w["status"]["health"]["healthy"] == true).then_some(())
        },
    )
    .await;

    // The container's agent dies: discovery starts it again (it registers once more).
    let registered = || {
        logs.read("catalog-c1.log")
            .matches("workload registered")
            .count()
    };
    let before = registered();
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", "--", "trellis join .*--name catalog-c1"])
        .status()
        .unwrap();
    assert!(killed.success(), "no agent to kill");
    eventually(
        "discovery restarts the agent",
        Duration::from_secs(20),
        async || (registered() > before).then_some(()),
    )
    .await;
    let d = logs.read("discovery-2.log");
    assert!(d.contains("its agent exited"), "{d}");
    // Silent while it was down, the workload was marked unhealthy; its first heartbeat
    // makes it healthy again, and the client's proxy learns it.
    until_served(&bed, &client, "the client reaches the restarted agent", 20).await;

    // Upgrade in place: the same command started again takes over; the running discovery
    // hands its agents over (the new agents take their listeners) and exits, and the
    // container stays registered and reachable throughout.
    let upgraded = bed.spawn(discovery_cmd(), &logs.path("discovery-3.log"));
    let (mut served, mut failed) = (0, Vec::new());
    while !bed.exited(discovery) {
        assert!(
            workload(&cp, "catalog-c1").await.is_some(),
            "deregistered during the upgrade"
        );
        let (status, _, body) = get_in(&bed, &client, "http://catalog.test.mesh/");
        if status == 200 {
            served += 1;
        } else {
            failed.push((status, body));
        }
        assert!(
            served + failed.len() < 3000,
            "the old discovery did not leave"
        );
    }
    assert_eq!(
        bed.wait_exit(discovery, Duration::from_secs(1)).await,
        Some(0),
        "{}",
        logs.read("discovery-2.log")
    );
    eprintln!(
        "discovery upgraded in place: {served} requests served during it, failed: {failed:?}"
    );
    if !failed.is_empty() {
        let agent = logs.read("catalog-c1.log");
        let tail: Vec<&str> = agent
            .lines()
            .filter(|l| l.contains("\"level\""))
            .rev()
            .take(80)
            .collect();
        panic!(
            "{failed:?}\nagent log (last lines first):\n{}\ndiscovery-2:\n{}\ndiscovery-3:\n{}",
            tail.join("\n"),
            logs.read("discovery-2.log"),
            logs.read("discovery-3.log")
        );
    }
    assert!(logs
        .read("discovery-2.log")
        .contains("a new discovery took over"));
    // The container's agent was replaced, not restarted: the old one handed over.
    assert!(logs
        .read("catalog-c1.log")
        .contains("a new agent took over"));
    let (status, _, _) = get_in(&bed, &client, "http://catalog.test.mesh/");
    assert_eq!(status, 200);
    assert_eq!(healthy(&cp, "catalog-c1").await, Some(true));
    let discovery = upgraded;

    bed.signal(discovery, "-TERM");
    assert_eq!(
        bed.wait_exit(discovery, Duration::from_secs(20)).await,
        Some(0)
    );
    eventually(
        "discovery's stop deregisters",
        Duration::from_secs(10),
        async || workload(&cp, "catalog-c1").await.is_none().then_some(()),
    )
    .await;
}
