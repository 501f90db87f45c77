//! The hybrid fleet on real parts: a bare-metal host (a network namespace) whose unchanged
//! client is curl behind `trellis join --capture`, and one service, `catalog.test`, served by
//! a real VM (QEMU, Debian's kernel, `trellis join` in its initramfs) in the client's zone and a
//! real container (podman + runc, joined by `trellis containers`) in the next zone. All on a
//! private bridge; needs root (CI runs as root), and without it says so and does nothing.
//!
//! Scenarios, in order (`fleet_scenarios` in tests/common/fleet.rs, which tests/fleet_loopback.rs
//! runs too):
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
//!    on a new one);
//! 6. the link to the VM rejects (iptables REJECT with a TCP reset on the client's host):
//!    `diagnose` names the network on that link, not the VM's host, whose proxy goes on
//!    reporting;
//! 7. a surge on a VM page that serves one request at a time: the VM's adaptive limit comes
//!    down and sheds, the control plane spills a share of the traffic to the container
//!    (started again), and brings it all back to the VM once the surge is over.
//!
//! The sixth scenario, an agent restarting with its stored identity and no token, is in
//! tests/capture.rs (a host) and tests/containers.rs (a container).

mod common;

use std::time::{Duration, Instant};

use common::*;
use trellis_test_support::{
    eventually_explained, netbed::NetBed, podman::Podman, vm::Vm, Logs, Temp,
};

/// The client is curl on the bare-metal host, by mesh name through capture; faults are the
/// real thing: the VM's httpd killed over its command channel, `podman stop`, and an
/// iptables DROP of the VM's address on the client's host.
struct RealFleet<'a> {
    bed: &'a NetBed,
    client: &'a str,
    vm: &'a Vm,
    podman: &'a Podman,
}

impl RealFleet<'_> {
    /// Insert (`-I`) or delete (`-D`) the client host's DROP rule for the VM's address.
    fn drop_rule(&self, op: &str) {
        let vm = self.vm.ip.to_string();
        let rule = ["iptables", op, "OUTPUT", "-d", &vm, "-j", "DROP"];
        assert!(self.bed.run(self.client, &rule).0);
    }

    /// Insert (`-I`) or delete (`-D`) the client host's rule that answers TCP to the VM's
    /// address with a reset.
    fn reject_rule(&self, op: &str) {
        let vm = self.vm.ip.to_string();
        let rule = [
            "iptables",
            op,
            "OUTPUT",
            "-d",
            &vm,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ];
        assert!(self.bed.run(self.client, &rule).0);
    }
}

impl Fleet for RealFleet<'_> {
    // The VM boots under TCG.
    const READY: Duration = Duration::from_secs(120);
    const REACH: Duration = Duration::from_secs(30);
    // A dropped connection's retransmissions back off; a new one is made after them.
    const RECOVER: Duration = Duration::from_secs(60);

    async fn get(&self, path: &str) -> (u16, String, String) {
        get_in(
            self.bed,
            self.client,
            &format!("http://catalog.test.mesh{path}"),
        )
    }

    async fn client_metrics(&self) -> String {
        get_in(self.bed, self.client, "http://127.0.0.1:15000/metrics").2
    }

    async fn kill_vm_app(&mut self) {
        self.vm.exec("killall httpd").await;
    }

    async fn start_vm_app(&mut self) {
        self.vm.exec("httpd -p 8080 -h /www").await;
    }

    async fn stop_container(&mut self) {
        self.podman.run(&["stop", "--time", "0", "catalog-ctr"]);
    }

    async fn cut_vm(&mut self) {
        self.drop_rule("-I");
    }

    async fn mend_vm(&mut self) {
        self.drop_rule("-D");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_a_vm_and_a_container_serve_one_service_and_fail_over() {
    // Before the bed: dropped after it, once the agents it runs have stopped (the container
    // discovery writes in its dir until then, and made it again after an earlier removal).
    let (state, client_state) = (Temp::dir("fleet-containers"), Temp::dir("fleet-client"));
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
    let t = token(&cp, "test", "catalog", "10m", "1");
    let c = discovery(&cp, &xds, &socket, &t, &state, &logs.0);
    bed.spawn(c, &logs.path("discovery.log"));
    run_catalog_container(&podman, "catalog-ctr");

    // The bare-metal client host, in eu-west-1a.
    let t = token(&cp, "test", "shopper", "10m", "1");
    let client_join = Join::shopper(&cp, xds.clone(), client_state.0.clone(), &bed);
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

    let mut fleet = RealFleet {
        bed: &bed,
        client: &client,
        vm: &vm,
        podman: &podman,
    };
    let five = Instant::now();
    fleet_scenarios(&mut fleet, &cp).await;
    eprintln!("scenarios 1-5 took {:?}", five.elapsed());

    // 6. The link rejects: the client's connects to the VM are reset by its own host's
    //    rule. The VM's proxy goes on reporting over its own path (every 10 s; a minute's
    //    window holds some even when the emulated VM runs slow), so the verdict is the
    //    link's, with the evidence that the VM's host is up.
    let six = Instant::now();
    fleet.reject_rule("-I");
    let verdict = eventually_explained(
        "diagnose names the rejecting link to the VM, whose host is up",
        Duration::from_secs(45),
        async || {
            let got = fleet.get("/").await;
            let (_, v) = cp
                .call(
                    http::Method::GET,
                    "/api/v1/diagnose?namespace=test&window=1m",
                    "",
                    None,
                )
                .await;
            // Said if the wait times out: what the client got, and every verdict.
            let seen = || format!("the client got {got:?}; diagnose said {v}");
            v["verdicts"]
                .as_array()
                .ok_or_else(seen)?
                .iter()
                .find(|x| {
                    x["cause"] == "network"
                        && x["place"]["kind"] == "link"
                        && x["place"]["to"]["workload"] == "test/catalog-vm"
                        && (x["caller_saw"]["connect_refused"].as_u64() > Some(0)
                            || x["caller_saw"]["connection_reset"].as_u64() > Some(0))
                        // The VM's proxy reports every 10 s: on a fast machine the scenario
                        // can come before its first report.
                        && x["evidence"].to_string().contains("its host is up")
                })
                .cloned()
                .ok_or_else(seen)
        },
    )
    .await;
    let (_, proxies) = cp
        .call(http::Method::GET, "/api/v1/proxies", "", None)
        .await;
    assert!(
        verdict["evidence"].to_string().contains("its host is up"),
        "{verdict:#}\n{proxies:#}"
    );
    fleet.reject_rule("-D");
    eprintln!("scenario 6 took {:?}: {verdict}", six.elapsed());

    // 7. A surge spills from the VM to the container and comes back.
    let seven = Instant::now();
    podman.run(&["start", "catalog-ctr"]);
    eventually(
        "the container is back",
        Duration::from_secs(60),
        async || (healthy(&cp, "catalog-ctr").await == Some(true)).then_some(()),
    )
    .await;
    // Spill-over from the VM pool to the containers (the VM's limit may come down to 2).
    // Overload is the adaptive limit's to tell here: outlier detection is off, so a try that
    // times out in the VM's queue does not eject it (the health floor, scenario 3).
    let spill = "apiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: { name: catalog, namespace: test }\nspec:\n  targetRefs: [{ name: catalog }]\n  connectionPool: { connectTimeout: 500ms }\n  outlierDetection: { consecutiveFailures: 0 }\n  adaptiveConcurrency: { minLimit: 2 }\n  spillover:\n    pools: [{ environment: vm }, { environment: container }]\n    hold: 1s\n";
    apply_ok(&cp, spill.to_string()).await;
    // The client's proxy holds the policy (before it does, the VM and the container share
    // the traffic, and a request the VM answers proves nothing), and the VM takes the
    // traffic again (the client's proxy may still hold it ejected after scenario 6's resets).
    eventually(
        "the VM serves under the spill-over policy before the surge",
        Duration::from_secs(90),
        async || {
            let dump = get_in(&bed, &client, "http://127.0.0.1:15000/config_dump").2;
            let dump: serde_json::Value = serde_json::from_str(&dump).ok()?;
            catalog_spills(&dump).then_some(())?;
            (fleet.get("/").await.2 == "vm-app").then_some(())
        },
    )
    .await;
    // Before the surge, the VM's proxy learns the page's time unloaded: one request at a
    // time, 150 of them (its limit's baseline needs ten windows of ten).
    let (done, out, err) = bed.run(
        &client,
        &[
            "curl",
            "-s",
            "--max-time",
            "120",
            "http://catalog.test.mesh/cgi-bin/one?[1-150]",
        ],
    );
    let from_vm = out.lines().filter(|l| *l == "vm-one").count();
    eprintln!("scenario 7: warmed up after {:?}", seven.elapsed());
    assert!(
        done && from_vm >= 140,
        "{from_vm} from the VM:\n{out}\n{err}"
    );
    let vm_pool = async || {
        let (_, v) = cp
            .call(http::Method::GET, "/api/v1/spill?namespace=test", "", None)
            .await;
        v.as_array()?
            .iter()
            .find(|s| s["service"] == "test/catalog")
            .map(|s| (s["pools"][0].clone(), s["history"].clone()))
    };
    // The surge: eight requests at once, all the time, to a page the VM serves one at a
    // time (20 a second).
    let surge = {
        let mut c = bed.cmd(
            &client,
            &[
                "curl",
                "-s",
                "-Z",
                "--parallel-max",
                "8",
                "--max-time",
                "5",
                "http://catalog.test.mesh/cgi-bin/one?[1-1000000]",
            ],
        );
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        Proc(c.spawn().expect("curl"))
    };
    let mut told = Instant::now();
    let spilling = eventually(
        "the VM pool spills to the container",
        Duration::from_secs(90),
        async || {
            let (pool, _) = vm_pool().await?;
            if told.elapsed() > Duration::from_secs(5) {
                eprintln!("the VM pool: {pool}");
                told = Instant::now();
            }
            (pool["spilled_percent"].as_f64()? > 0.0).then_some(pool)
        },
    )
    .await;
    eprintln!(
        "scenario 7: spilling after {:?}: {spilling}",
        seven.elapsed()
    );
    assert_eq!(spilling["to"], "container", "{spilling:#}");
    let stat = eventually(
        "stat tells the spill",
        Duration::from_secs(10),
        async || {
            let out = ok(cli(&cp, &["stat", "-n", "test"]));
            out.contains("% spilled vm → container since")
                .then_some(out)
        },
    )
    .await;
    eprintln!("{stat}");
    drop(surge);
    let (back, history) = eventually(
        "the traffic comes back to the VM",
        Duration::from_secs(90),
        async || {
            let (pool, history) = vm_pool().await?;
            (pool["spilled_percent"].as_f64()? == 0.0).then_some((pool, history))
        },
    )
    .await;
    eprintln!("scenario 7: back after {:?}", seven.elapsed());
    assert_eq!(
        history.as_array().unwrap().last().unwrap()["what"],
        "ended",
        "{back:#} {history:#}"
    );
    eventually("the VM serves again", Duration::from_secs(30), async || {
        (fleet.get("/cgi-bin/one").await.2 == "vm-one").then_some(())
    })
    .await;
    drop(vm);
}

/// Whether a proxy's `/config_dump` holds a spill-over policy on `test/catalog`'s clusters.
fn catalog_spills(dump: &serde_json::Value) -> bool {
    dump["config"]["clusters"]
        .as_object()
        .is_some_and(|clusters| {
            clusters.iter().any(|(key, c)| {
                key.starts_with("test/catalog:") && !c["policy"]["spillover"].is_null()
            })
        })
}
