//! The hybrid fleet on real parts: a bare-metal host (a network namespace) whose unchanged
//! client is curl behind `trellis join --capture`, and one service, `catalog.test`, served by
//! a real VM (QEMU, Debian's kernel, `trellis join` in its initramfs) in the client's zone and a
//! real container (podman + runc, joined by `trellis containers`) in the next zone. All on a
//! private bridge; needs root (CI runs as root), and without it says so and does nothing.
//!
//! Scenarios, in order:
//! 1. the client reaches the VM by mesh name, over mutual TLS, through capture;
//! 2. the VM's application answers 500: the client sees it classified `app_error`
//!    (application), and it is not retried;
//! 3. the VM's application is killed: every request still succeeds (retried on the container,
//!    within the retry budget), the VM's agent reports it down, and traffic comes back when it
//!    is restarted;
//! 4. the container is stopped: its endpoint leaves the mesh (deregistered from the engine's
//!    event) and the client's proxy stops using it;
//! 5. the link to the VM is cut (iptables DROP): with no other endpoint, the failures are
//!    classified as network (`upstream_timeout` on the pooled connection, `connect_timeout`
//!    on a new one).
//!
//! The sixth scenario, an agent restarting with its stored identity and no token, is in
//! tests/capture.rs (a host) and tests/containers.rs (a container).

mod common;

use std::time::{Duration, Instant};

use common::*;
use trellis_test_support::{podman::Podman, vm::Vm, Logs, Temp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_a_vm_and_a_container_serve_one_service_and_fail_over() {
    let Some(mut bed) = root_bed("fleet") else {
        return;
    };
    let images = Vm::build(BIN);
    let client = bed.host(2);
    let logs = Logs::new("fleet-logs");
    let (cp, xds) = control_on_bridge(&bed);
    apply_ok(&cp, FLEET_MESH.to_string()).await;

    // The VM, in the client's zone.
    let vm_token = token(&cp, "test", "catalog", "10m", "1");
    let settings = [
        ("name", "catalog-vm"),
        ("cp", xds.as_str()),
        ("ca", cp.ca_hash.as_str()),
        ("token", vm_token.as_str()),
        ("region", "eu-west-1"),
        ("zone", "eu-west-1a"),
    ];
    let booted = Instant::now();
    let vm = Vm::boot(&mut bed, 20, &images, &settings).await;
    eprintln!("VM up in {:?}", booted.elapsed());

    // The container, in the next zone of the same region.
    let mut podman = Podman::new(bed.bridge(), bed.gateway(), 10, 19);
    let socket = podman.serve().await.to_string();
    let state = Temp::dir("fleet-containers");
    let t = token(&cp, "test", "catalog", "10m", "1");
    let c = discovery(&cp, &xds, &socket, &t, &state, &logs.0);
    bed.spawn(c, &logs.path("discovery.log"));
    run_catalog_container(&podman, "catalog-ctr");

    // The bare-metal client host, in eu-west-1a.
    let client_state = Temp::dir("fleet-client");
    let t = token(&cp, "test", "shopper", "10m", "1");
    let client_join = Join {
        cp: &cp,
        xds: xds.clone(),
        state: client_state.0.clone(),
        name: "shopper-1",
        app: "shopper",
        address: bed.addr(2).to_string(),
    };
    let mut c = client_join.cmd(&bed, &client, Some(&t));
    c.args([
        "--region",
        "eu-west-1",
        "--zone",
        "eu-west-1a",
        "--check",
        "none",
    ]);
    bed.spawn(c, &logs.path("client-agent.log"));

    eventually(
        "the VM and the container are healthy",
        Duration::from_secs(120),
        async || {
            (healthy(&cp, "catalog-vm").await == Some(true)
                && healthy(&cp, "catalog-ctr").await == Some(true))
            .then_some(())
        },
    )
    .await;
    let url = "http://catalog.test.mesh/";

    // 1. By mesh name, through capture and mutual TLS, to the VM: the client's own zone.
    let r = eventually(
        "the client reaches the VM",
        Duration::from_secs(30),
        async || {
            let r = get_in(&bed, &client, url);
            (r.0 == 200 && r.2 == "vm-app").then_some(r)
        },
    )
    .await;
    assert_eq!(r.1, "", "{r:?}");

    // 2. The application's own 500: passed through unchanged (not retried: 500 is not a
    //    retried code) and counted by the caller's proxy as the application's failure.
    let metric = |m: &str| {
        let labels = [
            ("direction", "outbound"),
            ("dst_service", "catalog.test"),
            ("failure_class", "app_error"),
        ];
        trellis_test_support::sum_metric(m, "trellis_http_requests_total", &labels)
    };
    let before = metric(&get_in(&bed, &client, "http://127.0.0.1:15000/metrics").2);
    let (status, class, body) = get_in(&bed, &client, "http://catalog.test.mesh/cgi-bin/fail");
    assert_eq!(
        (status, class.as_str(), body.as_str()),
        (500, "", "vm-app-broken")
    );
    let after = metric(&get_in(&bed, &client, "http://127.0.0.1:15000/metrics").2);
    assert_eq!(after, before + 1.0, "one app_error, no retry");

    // 3. The VM's application dies: no request fails (the container takes the retries),
    //    then the VM's agent reports it down, and it comes back with the application.
    vm.exec("killall httpd").await;
    for i in 0..20 {
        let (status, class, body) = get_in(&bed, &client, url);
        assert_eq!(
            (status, body.as_str()),
            (200, "container-app"),
            "request {i}: {class}"
        );
    }
    eventually(
        "the VM is reported down",
        Duration::from_secs(20),
        async || (healthy(&cp, "catalog-vm").await == Some(false)).then_some(()),
    )
    .await;
    vm.exec("httpd -p 8080 -h /www").await;
    eventually(
        "traffic returns to the VM",
        Duration::from_secs(30),
        async || (get_in(&bed, &client, url).2 == "vm-app").then_some(()),
    )
    .await;

    // 4. The container stops: it leaves the mesh from the engine's event.
    let stopped = Instant::now();
    podman.run(&["stop", "--time", "0", "catalog-ctr"]);
    eventually(
        "the container is deregistered",
        Duration::from_secs(10),
        async || healthy(&cp, "catalog-ctr").await.is_none().then_some(()),
    )
    .await;
    eprintln!(
        "container deregistered {:?} after podman stop",
        stopped.elapsed()
    );

    // 5. The link to the VM is cut: with no other endpoint, the failure is the network's:
    //    the pooled connection's request times out, a new connection's connect does.
    let drop_rule = ["-d", &vm.ip.to_string(), "-j", "DROP"];
    let mut add = vec!["iptables", "-I", "OUTPUT"];
    add.extend(drop_rule);
    assert!(bed.run(&client, &add).0);
    let (status, class, _) = get_in(&bed, &client, url);
    eprintln!("link cut: {status} {class}");
    assert!(matches!(status, 502..=504), "{status} {class}");
    assert!(
        matches!(class.as_str(), "connect_timeout" | "upstream_timeout"),
        "{class}"
    );
    let mut del = vec!["iptables", "-D", "OUTPUT"];
    del.extend(drop_rule);
    assert!(bed.run(&client, &del).0);
    eventually(
        "the VM serves again once the link is back",
        Duration::from_secs(60),
        async || (get_in(&bed, &client, url).2 == "vm-app").then_some(()),
    )
    .await;
    drop(vm);
}
