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
use http::Method;
use trellis_test_support::{control::ControlProcess, netbed::NetBed, podman::Podman, vm::Vm, Temp};

/// One request from `ns` with curl: status (0 if curl failed), x-trellis-failure, body.
fn get(bed: &NetBed, ns: &str, url: &str) -> (u16, String, String) {
    let out = bed
        .cmd(ns, &["curl", "-s", "-D", "-", "--max-time", "10", url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or(("", ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let class = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-trellis-failure")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, class, body.trim().to_string())
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
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("==== {}", e.path().display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

async fn healthy(cp: &ControlProcess, name: &str) -> Option<bool> {
    let (st, v) = cp
        .call(
            Method::GET,
            &format!("/api/v1/resources/Workload/test/{name}"),
            "",
            None,
        )
        .await;
    (st == 200).then(|| v["spec"]["healthy"] == true)
}

const MESH: &str = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog, namespace: test }
spec:
  selector: { app: catalog }
  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: catalog, namespace: test }
spec:
  parentRefs: [{ kind: Service, name: catalog, port: 80 }]
  rules:
    - backendRefs: [{ name: catalog, port: 80 }]
      timeouts: { request: 5s }
      retry: { attempts: 2, codes: [502, 503, 504], backoff: 20ms, perTryTimeout: 1s }
---
apiVersion: trellis.dev/v1alpha1
kind: BackendTrafficPolicy
metadata: { name: catalog, namespace: test }
spec:
  targetRefs: [{ name: catalog }]
  connectionPool: { connectTimeout: 500ms }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_a_vm_and_a_container_serve_one_service_and_fail_over() {
    let Some(mut bed) = NetBed::new() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the fleet test as root"
        );
        eprintln!("skipped: network namespaces, containers and a VM need root");
        return;
    };
    let images = Vm::build(BIN);
    let client = bed.host(2);
    let logs = Logs(Temp::dir("fleet-logs"));
    let cp = ControlProcess::start_in(
        BIN,
        trellis_test_support::temp_path("control"),
        &[],
        "127.0.0.1:0",
        &format!("{}:0", bed.gateway()),
    );
    let xds = format!("https://{}", cp.xds);
    apply_ok(&cp, MESH.to_string()).await;

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
    let mut c = std::process::Command::new(BIN);
    c.args(["containers", "--engine", &socket, "--control-plane", &xds])
        .args([
            "--ca-hash",
            &cp.ca_hash,
            "--token",
            &format!("test/catalog={t}"),
        ])
        .args(["--state-dir", state.0.to_str().unwrap()])
        .args(["--log-dir", logs.0 .0.to_str().unwrap(), "--capture"])
        .arg("--join-arg=--check-interval=200ms");
    bed.spawn(c, &logs.0.join("discovery.log"));
    podman.run(&[
        "run",
        "-d",
        "--name",
        "catalog-ctr",
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

    // The bare-metal client host, in eu-west-1a.
    let client_state = Temp::dir("fleet-client");
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
    .args([
        "--environment",
        "bare-metal",
        "--region",
        "eu-west-1",
        "--zone",
        "eu-west-1a",
    ])
    .args(["--check", "none", "--capture"]);
    bed.spawn(c, &logs.0.join("client-agent.log"));

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
            let r = get(&bed, &client, url);
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
    let before = metric(&get(&bed, &client, "http://127.0.0.1:15000/metrics").2);
    let (status, class, body) = get(&bed, &client, "http://catalog.test.mesh/cgi-bin/fail");
    assert_eq!(
        (status, class.as_str(), body.as_str()),
        (500, "", "vm-app-broken")
    );
    let after = metric(&get(&bed, &client, "http://127.0.0.1:15000/metrics").2);
    assert_eq!(after, before + 1.0, "one app_error, no retry");

    // 3. The VM's application dies: no request fails (the container takes the retries),
    //    then the VM's agent reports it down, and it comes back with the application.
    vm.exec("killall httpd").await;
    for i in 0..20 {
        let (status, class, body) = get(&bed, &client, url);
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
        async || (get(&bed, &client, url).2 == "vm-app").then_some(()),
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
    let (status, class, _) = get(&bed, &client, url);
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
        async || (get(&bed, &client, url).2 == "vm-app").then_some(()),
    )
    .await;
    drop(vm);
}
