//! Container discovery with real containers: podman (runc) on a test bridge, its Docker API
//! socket watched by `trellis containers`, a client host with a capturing agent. A labelled
//! container joins as a `container` Workload with an agent in its network namespace, serves
//! `http://catalog.test.mesh/` over mutual TLS, leaves every proxy when it stops, and rejoins
//! with its stored identity (the single-use token is spent) when it starts again. Needs root.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::Method;
use trellis_test_support::{control::ControlProcess, netbed::NetBed, podman::Podman, Temp};

/// curl in `ns`: (HTTP status, body); status 0 when curl failed.
fn get(bed: &NetBed, ns: &str, url: &str) -> (u16, String) {
    let out = bed
        .cmd(
            ns,
            &["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}", url],
        )
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The processes' logs, printed when the test fails.
struct Logs(Temp);

impl Drop for Logs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for e in std::fs::read_dir(&self.0 .0)
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            eprintln!("==== {}\n{text}", e.path().display());
        }
    }
}

async fn workload(cp: &ControlProcess, name: &str) -> Option<serde_json::Value> {
    let (st, v) = cp
        .call(
            Method::GET,
            &format!("/api/v1/resources/Workload/test/{name}"),
            "",
            None,
        )
        .await;
    (st == 200).then_some(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_containers_join_serve_leave_and_rejoin_from_the_engines_events() {
    let Some(mut bed) = NetBed::new() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the container tests as root"
        );
        eprintln!("skipped: containers and network namespaces need root");
        return;
    };
    let client = bed.host(2);
    let logs = Logs(Temp::dir("containers-logs"));
    let mut podman = Podman::new(bed.bridge(), bed.gateway(), 10, 19);
    let socket = podman.serve().await.to_string();

    let cp = ControlProcess::start_in(
        BIN,
        trellis_test_support::temp_path("control"),
        &[],
        "127.0.0.1:0",
        &format!("{}:0", bed.gateway()),
    );
    let xds = format!("https://{}", cp.xds);
    let svc = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]\n";
    apply_ok(&cp, svc.to_string()).await;

    // Discovery on the host, with one single-use token for the catalog identity.
    let state = Temp::dir("containers-state");
    let t = token(&cp, "test", "catalog", "10m", "1");
    let discovery_cmd = || {
        let mut c = std::process::Command::new(BIN);
        c.args(["containers", "--engine", &socket, "--control-plane", &xds])
            .args(["--ca-hash", &cp.ca_hash])
            .args(["--token", &format!("test/catalog={t}")])
            .args(["--state-dir", state.0.to_str().unwrap()])
            .args(["--log-dir", logs.0 .0.to_str().unwrap(), "--capture"])
            .arg("--join-arg=--check-interval=200ms");
        c
    };
    let discovery = bed.spawn(discovery_cmd(), &logs.0.join("discovery.log"));

    // A client host whose unchanged application is curl.
    let client_state = Temp::dir("containers-client");
    let t = token(&cp, "test", "shopper", "10m", "1");
    let mut c = bed.cmd(&client, &[BIN, "join"]);
    c.args([
        "--control-plane",
        &xds,
        "--ca-hash",
        &cp.ca_hash,
        "--token",
        &t,
    ])
    .args(["--state-dir", client_state.0.to_str().unwrap()])
    .args(["--name", "shopper-1", "--address", &bed.addr(2).to_string()])
    .args(["--check", "none", "--capture"]);
    bed.spawn(c, &logs.0.join("client-agent.log"));

    // The container starts; discovery joins it from the engine's start event.
    podman.run(&[
        "run",
        "-d",
        "--name",
        "catalog-c1",
        "--network",
        "trellisnet",
        "--label",
        "trellis.service=catalog",
        "--label",
        "trellis.namespace=test",
        "--label",
        "trellis.port=8080",
        "--label",
        "trellis.check=http:/index.html",
        "--label",
        "trellis.locality=eu-west-1/eu-west-1b",
        trellis_test_support::podman::IMAGE,
    ]);
    let w = eventually(
        "the container's workload is healthy",
        Duration::from_secs(30),
        async || {
            let w = workload(&cp, "catalog-c1").await?;
            (w["spec"]["healthy"] == true).then_some(w)
        },
    )
    .await;
    assert_eq!(w["spec"]["environment"], "container", "{w}");
    assert_eq!(w["spec"]["identity"], "catalog", "{w}");
    assert_eq!(w["spec"]["locality"]["zone"], "eu-west-1b", "{w}");
    let ip = w["spec"]["address"].as_str().unwrap().to_string();
    assert!(
        ip.starts_with(
            &format!("{}", bed.addr(0))
                .trim_end_matches(".0")
                .to_string()
        ),
        "{ip}"
    );

    // The client reaches it by mesh name; the container's own proxy answers (mTLS between
    // the two agents), and the container's port is captured.
    let (code, body) = eventually(
        "the client reaches the container",
        Duration::from_secs(20),
        async || {
            let r = get(&bed, &client, "http://catalog.test.mesh/");
            (r.0 == 200).then_some(r)
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
            let r = get(&bed, &client, "http://catalog.test.mesh/");
            (r.0 == 503).then_some(r)
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
    eventually(
        "the container rejoins",
        Duration::from_secs(30),
        async || {
            let r = get(&bed, &client, "http://catalog.test.mesh/");
            (r.0 == 200).then_some(())
        },
    )
    .await;
    let agent_log = std::fs::read_to_string(logs.0.join("catalog-c1.log")).unwrap_or_default();
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
    let discovery = bed.spawn(discovery_cmd(), &logs.0.join("discovery-2.log"));
    eventually(
        "the new discovery rejoins it",
        Duration::from_secs(30),
        async || {
            let w = workload(&cp, "catalog-c1").await?;
            (w["spec"]["healthy"] == true).then_some(())
        },
    )
    .await;

    // The container's agent dies: discovery starts it again (it registers once more).
    let registered = || {
        std::fs::read_to_string(logs.0.join("catalog-c1.log"))
            .unwrap_or_default()
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
    let d = std::fs::read_to_string(logs.0.join("discovery-2.log")).unwrap_or_default();
    assert!(d.contains("its agent exited"), "{d}");

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
