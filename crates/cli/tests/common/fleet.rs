//! Helpers of the tests that run on the network-namespace test bed (capture, containers,
//! fleet) and of their loopback twin.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use trellis_test_support::{control::ControlProcess, netbed::NetBed, podman::Podman};

use super::BIN;

/// A bed, or `None` (saying so) when this machine cannot make one; under CI that fails.
pub fn root_bed(what: &str) -> Option<NetBed> {
    let bed = NetBed::new();
    if bed.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the {what} tests as root"
        );
        eprintln!("skipped: {what} needs root");
    }
    bed
}

/// A control plane whose xDS port is on the bed's bridge (so TLS only), and its xDS URL.
pub fn control_on_bridge(bed: &NetBed) -> (ControlProcess, String) {
    let cp = ControlProcess::start_in(
        BIN,
        trellis_test_support::temp_path("control"),
        &[],
        "127.0.0.1:0",
        &format!("{}:0", bed.gateway()),
    );
    let xds = format!("https://{}", cp.xds);
    (cp, xds)
}

/// `catalog.test`: HTTP on port 80, the workloads' port 8080.
pub const CATALOG: &str = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]\n";

/// The fleet scenarios' mesh: [`CATALOG`], a route that retries 502–504 on another endpoint
/// within a 5 s budget (1 s per try), and a 500 ms connect timeout.
pub const FLEET_MESH: &str = "apiVersion: trellis.dev/v1alpha1
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

/// `trellis join --capture` on a bed host, as a bare-metal workload of `app`.
pub struct Join<'a> {
    pub cp: &'a ControlProcess,
    pub xds: String,
    pub state: PathBuf,
    pub name: &'a str,
    pub app: &'a str,
    pub address: String,
}

impl<'a> Join<'a> {
    /// The beds' client: `shopper-1` (app `shopper`) on host 2.
    pub fn shopper(cp: &'a ControlProcess, xds: String, state: PathBuf, bed: &NetBed) -> Self {
        Join {
            cp,
            xds,
            state,
            name: "shopper-1",
            app: "shopper",
            address: bed.addr(2).to_string(),
        }
    }

    /// The command, in namespace `ns`, with the token for a first join.
    pub fn cmd(&self, bed: &NetBed, ns: &str, token: Option<&str>) -> Command {
        let mut c = bed.cmd(ns, &[BIN, "join"]);
        c.args(["--control-plane", &self.xds, "--ca-hash", &self.cp.ca_hash])
            .args(["--state-dir", self.state.to_str().unwrap()])
            .args(["--name", self.name, "--label", &format!("app={}", self.app)])
            .args(["--address", &self.address, "--environment", "bare-metal"])
            .args(["--check-interval", "200ms", "--capture"])
            // Reports every second: `diagnose` sees a fault within the scenario.
            .args(["--report-interval", "1s"])
            .env_remove("TRELLIS_JOIN_TOKEN");
        if let Some(t) = token {
            c.args(["--token", t]);
        }
        c
    }
}

/// `trellis containers` on the engine at `socket`, joining `test/catalog` containers with
/// `token`, capturing, their agents' logs in `log_dir`.
pub fn discovery(
    cp: &ControlProcess,
    xds: &str,
    socket: &str,
    token: &str,
    state: &std::path::Path,
    log_dir: &std::path::Path,
) -> Command {
    let mut c = Command::new(BIN);
    c.args(["containers", "--engine", socket, "--control-plane", xds])
        .args(["--ca-hash", &cp.ca_hash])
        .args(["--token", &format!("test/catalog={token}")])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--log-dir", log_dir.to_str().unwrap(), "--capture"])
        .arg("--join-arg=--check-interval=200ms");
    c
}

/// Start container `name` of `catalog.test` in eu-west-1b, checked at /index.html.
pub fn run_catalog_container(podman: &Podman, name: &str) {
    podman.run(&[
        "run",
        "-d",
        "--name",
        name,
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
}

/// One request from `ns` with curl: status (0 if curl failed), x-trellis-failure, body.
pub fn get_in(bed: &NetBed, ns: &str, url: &str) -> (u16, String, String) {
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

/// The stored Workload `test/NAME`, if any.
pub async fn workload(cp: &ControlProcess, name: &str) -> Option<serde_json::Value> {
    let (st, v) = cp
        .call(
            http::Method::GET,
            &format!("/api/v1/resources/Workload/test/{name}"),
            "",
            None,
        )
        .await;
    (st == 200).then_some(v)
}

/// Whether Workload `test/NAME` is healthy; `None` when it is not registered.
pub async fn healthy(cp: &ControlProcess, name: &str) -> Option<bool> {
    workload(cp, name)
        .await
        .map(|w| w["status"]["health"]["healthy"] == true)
}

/// A child process, killed on drop (continued first: a stopped process cannot die of
/// SIGKILL until it is).
pub struct Proc(pub Child);

impl Proc {
    /// Send `sig` (`-TERM`, `-STOP`…).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What differs between the fleet on real parts (tests/fleet.rs) and its loopback twin
/// (tests/fleet_loopback.rs): how the client calls `catalog.test.mesh`, and how each fault is
/// made and mended. [`fleet_scenarios`] runs the same scenarios on either.
#[allow(async_fn_in_trait)] // test code, driven on one task
pub trait Fleet {
    /// How long the VM and the container may take to join and pass their checks.
    const READY: Duration;
    /// How long the client may take to reach the VM at first.
    const REACH: Duration;
    /// How long the VM may take to serve again once its fault is mended.
    const RECOVER: Duration;
    /// GET `path` from the client: status, failure class (`x-trellis-failure`), body.
    async fn get(&self, path: &str) -> (u16, String, String);
    /// The client proxy's `/metrics`.
    async fn client_metrics(&self) -> String;
    /// Kill the VM's application (its agent stays).
    async fn kill_vm_app(&mut self);
    /// Start the VM's application again.
    async fn start_vm_app(&mut self);
    /// Take the container away (it stops, or its agent does).
    async fn stop_container(&mut self);
    /// Cut the client off from the VM (or make the VM not answer).
    async fn cut_vm(&mut self);
    /// Undo [`Fleet::cut_vm`].
    async fn mend_vm(&mut self);
}

/// The fleet scenarios 1–5, in order, once the VM (`catalog-vm`, the client's zone) and the
/// container (`catalog-ctr`, the next zone) are healthy; `catalog.test` routes as
/// [`FLEET_MESH`] says.
pub async fn fleet_scenarios<F: Fleet>(f: &mut F, cp: &ControlProcess) {
    super::eventually(
        "the VM and the container are healthy",
        F::READY,
        async || {
            (healthy(cp, "catalog-vm").await == Some(true)
                && healthy(cp, "catalog-ctr").await == Some(true))
            .then_some(())
        },
    )
    .await;

    // 1. The client's own zone first, by mutual TLS.
    let r = super::eventually("the client reaches the VM", F::REACH, async || {
        let r = f.get("/").await;
        (r.0 == 200 && r.2 == "vm-app").then_some(r)
    })
    .await;
    assert_eq!(r.1, "", "{r:?}");

    // 2. The application's own 500: passed through unchanged (not retried: 500 is not a
    //    retried code) and counted by the caller's proxy, once, as the application's failure.
    let app_errors = |m: &str| {
        let labels = [
            ("direction", "outbound"),
            ("dst_service", "catalog.test"),
            ("failure_class", "app_error"),
        ];
        trellis_test_support::sum_metric(m, "trellis_http_requests_total", &labels)
    };
    let before = app_errors(&f.client_metrics().await);
    let (status, class, body) = f.get("/cgi-bin/fail").await;
    assert_eq!(
        (status, class.as_str(), body.as_str()),
        (500, "", "vm-app-broken")
    );
    let after = app_errors(&f.client_metrics().await);
    assert_eq!((before, after), (0.0, 1.0), "one app_error, no retry");

    // 3. The VM's application dies: no request fails (the container takes the retries),
    //    then the VM's agent reports it down, and traffic returns with the application.
    f.kill_vm_app().await;
    for i in 0..20 {
        let (status, class, body) = f.get("/").await;
        assert_eq!(
            (status, body.as_str()),
            (200, "container-app"),
            "request {i}: {class}"
        );
    }
    super::eventually(
        "the VM is reported down",
        Duration::from_secs(20),
        async || (healthy(cp, "catalog-vm").await == Some(false)).then_some(()),
    )
    .await;
    f.start_vm_app().await;
    super::eventually(
        "traffic returns to the VM",
        Duration::from_secs(30),
        async || (f.get("/").await.2 == "vm-app").then_some(()),
    )
    .await;

    // 4. The container goes: its workload leaves the mesh.
    let stopped = Instant::now();
    f.stop_container().await;
    super::eventually(
        "the container is deregistered",
        Duration::from_secs(10),
        async || healthy(cp, "catalog-ctr").await.is_none().then_some(()),
    )
    .await;
    eprintln!(
        "container deregistered {:?} after it stopped",
        stopped.elapsed()
    );
    // ... and the client's proxy has taken it: until then it may still send to the
    // container (whose agent serves until every caller has the change), and the next step
    // needs the VM to be its only endpoint.
    super::eventually(
        "the client's proxy has the change",
        Duration::from_secs(10),
        async || {
            let (_, v) = cp
                .call(http::Method::GET, "/api/v1/proxies", "", None)
                .await;
            let rev: u64 = v["revision"].as_str()?.parse().ok()?;
            let client = v["proxies"]
                .as_array()?
                .iter()
                .find(|p| p["workload"] == "test/shopper-1")?;
            let acked: u64 = client["types"]["document"]["acked"]
                .as_str()?
                .parse()
                .ok()?;
            (acked >= rev).then_some(())
        },
    )
    .await;

    // 5. The VM is cut off: with no other endpoint, the failure is the network's (the
    //    pooled connection's request times out, a new connection's connect does).
    f.cut_vm().await;
    let (status, class, _) = f.get("/").await;
    eprintln!("VM cut off: {status} {class}");
    assert!(matches!(status, 502..=504), "{status} {class}");
    assert!(
        matches!(class.as_str(), "connect_timeout" | "upstream_timeout"),
        "{class}"
    );
    // A second request fails the same way; `diagnose` then joins the client's failed
    // attempts with what the VM's proxy saw of them (nothing, by their ids): the network
    // towards the VM, not its application.
    let (status, class, _) = f.get("/").await;
    assert!(matches!(status, 502..=504), "{status} {class}");
    let verdict = super::eventually(
        "diagnose names the network towards the VM",
        Duration::from_secs(20),
        async || {
            let (_, v) = cp
                .call(
                    http::Method::GET,
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
                        && (x["place"]["to"]["workload"] == "test/catalog-vm"
                            || x["place"]["at"]["workload"] == "test/catalog-vm")
                })
                .cloned()
        },
    )
    .await;
    assert!(
        verdict["evidence"]
            .to_string()
            .contains("failed attempts test/shopper-1 listed reached"),
        "{verdict:#}"
    );
    f.mend_vm().await;
    super::eventually(
        "the VM serves again once it is reachable",
        F::RECOVER,
        async || (f.get("/").await.2 == "vm-app").then_some(()),
    )
    .await;
}
