//! Helpers of the tests that run on the network-namespace test bed (capture, containers,
//! fleet) and of their loopback twin.

use std::{
    path::PathBuf,
    process::{Child, Command},
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

impl Join<'_> {
    /// The command, in namespace `ns`, with the token for a first join.
    pub fn cmd(&self, bed: &NetBed, ns: &str, token: Option<&str>) -> Command {
        let mut c = bed.cmd(ns, &[BIN, "join"]);
        c.args(["--control-plane", &self.xds, "--ca-hash", &self.cp.ca_hash])
            .args(["--state-dir", self.state.to_str().unwrap()])
            .args(["--name", self.name, "--label", &format!("app={}", self.app)])
            .args(["--address", &self.address, "--environment", "bare-metal"])
            .args(["--check-interval", "200ms", "--capture"])
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
        .map(|w| w["spec"]["healthy"] == true)
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
