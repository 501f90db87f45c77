//! The hybrid fleet's scenarios without root, for developers: the same mesh as tests/fleet.rs
//! on 127.0.0.x addresses, where the environments are labels, not real. A "VM" agent
//! (127.0.0.20, the client's zone) and a "container" agent (127.0.0.10, the next zone) serve
//! `catalog.test` from real application processes; a "bare-metal" client agent is called in
//! explicit mode (`Host: catalog.test.mesh`: no capture without root). Scenarios 1–5 are
//! tests/fleet.rs's own (`fleet_scenarios`), with the faults made as below.
//!
//! 1. the client reaches the VM over mutual TLS;
//! 2. the VM's application answers 500: `app_error`, not retried;
//! 3. the VM's application is killed: no request fails, the VM is reported down, and traffic
//!    returns once the application is back;
//! 4. the container's agent stops: its workload leaves and the client stops using it;
//! 5. the VM's host freezes (its agent is stopped with SIGSTOP, the nearest a user can get to
//!    a cut link): with no other endpoint, the failure is classified as network;
//! 6. the client's agent restarts with its stored identity and no token.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use trellis_test_support::{control::ControlProcess, Logs, Temp};

const APP: &str = r#"
import http.server, sys
name = sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code, body = (500, name + "-broken") if self.path == "/cgi-bin/fail" else (200, name)
        body = body.encode()
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

async fn app(ip: &str, port: u16, name: &str) -> Proc {
    let p = Proc(
        Command::new("python3")
            .args(["-c", APP, ip, &port.to_string(), name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    eventually(
        "the application listens",
        Duration::from_secs(10),
        async || tokio::net::TcpStream::connect(addr).await.ok().map(drop),
    )
    .await;
    p
}

/// `trellis join` on `ip`, its stderr into `log`.
fn join(
    cp: &ControlProcess,
    state: &Path,
    log: PathBuf,
    args: &[&str],
    token: Option<&str>,
) -> Proc {
    let mut c = Command::new(BIN);
    c.args(["join", "--control-plane", &cp.xds_url()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--admin", "127.0.0.1:0", "--no-access-log"])
        .args(["--check-interval", "200ms", "--unhealthy-threshold", "1"])
        .args(["--report-interval", "1s"])
        .args(args)
        .env_remove("TRELLIS_JOIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    if let Some(t) = token {
        c.args(["--token", t]);
    }
    Proc(c.spawn().expect("spawn trellis join"))
}

/// The address of listener `which` (`outbound`, `admin`) that an agent logged.
async fn listening(log: &Path, which: &str) -> SocketAddr {
    eventually("the agent listens", Duration::from_secs(20), async || {
        let text = std::fs::read_to_string(log).ok()?;
        text.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "listening").then(|| v[which].as_str()?.parse().ok())?
        })
    })
    .await
}

/// GET through the client's outbound listener: status, failure class, body.
async fn get(out: SocketAddr, path: &str) -> (u16, String, String) {
    match client::get_full(out, "catalog.test.mesh", path, &[]).await {
        Ok(r) => (
            r.status.as_u16(),
            r.headers
                .get("x-trellis-failure")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            String::from_utf8_lossy(&r.body).into_owned(),
        ),
        Err(_) => (0, String::new(), String::new()),
    }
}

/// The client is called in explicit mode on its outbound listener; faults are what a user
/// without root can make: the VM's application process killed, the container's agent
/// stopped, the VM's agent frozen with SIGSTOP.
struct LoopbackFleet<'a> {
    out: SocketAddr,
    admin: SocketAddr,
    vm_app: Option<Proc>,
    vm_addr: (&'a str, u16),
    vm: &'a Proc,
    ctr: &'a Proc,
}

impl Fleet for LoopbackFleet<'_> {
    const READY: Duration = Duration::from_secs(30);
    const REACH: Duration = Duration::from_secs(20);
    const RECOVER: Duration = Duration::from_secs(30);

    async fn get(&self, path: &str) -> (u16, String, String) {
        get(self.out, path).await
    }

    async fn client_metrics(&self) -> String {
        let r = client::get_full(self.admin, "admin", "/metrics", &[])
            .await
            .unwrap();
        String::from_utf8_lossy(&r.body).into_owned()
    }

    async fn kill_vm_app(&mut self) {
        self.vm_app = None;
    }

    async fn start_vm_app(&mut self) {
        let (ip, port) = self.vm_addr;
        self.vm_app = Some(app(ip, port, "vm-app").await);
    }

    async fn stop_container(&mut self) {
        self.ctr.signal("-TERM");
    }

    async fn cut_vm(&mut self) {
        self.vm.signal("-STOP");
    }

    async fn mend_vm(&mut self) {
        self.vm.signal("-CONT");
    }
}

#[tokio::test]
async fn the_fleet_scenarios_run_on_loopback_without_root() {
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, FLEET_MESH.to_string()).await;
    let logs = Logs::new("fleet-lo-logs");
    let dirs = Temp::dir("fleet-lo-state");
    let log = |n: &str| logs.path(n);

    let (vm_ip, ctr_ip) = ("127.0.0.20", "127.0.0.10");
    let vm_port = free_port(vm_ip);
    let vm_app = app(vm_ip, vm_port, "vm-app").await;
    let ctr_port = free_port(ctr_ip);
    let _ctr_app = app(ctr_ip, ctr_port, "container-app").await;
    let t = token(&cp, "test", "catalog", "10m", "2");
    let place = |ip: &str, env: &str, zone: &str, port: u16| -> Vec<String> {
        [
            "--label",
            "app=catalog",
            "--address",
            ip,
            "--environment",
            env,
            "--region",
            "eu-west-1",
            "--zone",
            zone,
            "--check",
            "http:/",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--port".into(),
            format!("http={port}"),
            "--inbound".into(),
            format!("{ip}:0"),
            "--outbound".into(),
            format!("{ip}:0"),
        ])
        .collect()
    };
    let args = |v: &[String], name: &str| -> Vec<String> {
        let mut a = vec!["--name".to_string(), name.to_string()];
        a.extend(v.iter().cloned());
        a
    };
    let vm_args = args(&place(vm_ip, "vm", "eu-west-1a", vm_port), "catalog-vm");
    let vm_refs: Vec<&str> = vm_args.iter().map(String::as_str).collect();
    let vm = join(&cp, &dirs.join("vm"), log("vm.log"), &vm_refs, Some(&t));
    let ctr_args = args(
        &place(ctr_ip, "container", "eu-west-1b", ctr_port),
        "catalog-ctr",
    );
    let ctr_refs: Vec<&str> = ctr_args.iter().map(String::as_str).collect();
    let ctr = join(&cp, &dirs.join("ctr"), log("ctr.log"), &ctr_refs, Some(&t));
    let client_token = token(&cp, "test", "shopper", "10m", "1");
    let client_args = [
        "--name",
        "shopper-1",
        "--address",
        "127.0.0.2",
        "--environment",
        "bare-metal",
        "--region",
        "eu-west-1",
        "--zone",
        "eu-west-1a",
        "--check",
        "none",
        "--outbound",
        "127.0.0.2:0",
        "--inbound",
        "127.0.0.2:0",
    ];
    let client = join(
        &cp,
        &dirs.join("client"),
        log("client.log"),
        &client_args,
        Some(&client_token),
    );
    let out = listening(&log("client.log"), "outbound").await;
    let mut fleet = LoopbackFleet {
        out,
        admin: listening(&log("client.log"), "admin").await,
        vm_app: Some(vm_app),
        vm_addr: (vm_ip, vm_port),
        vm: &vm,
        ctr: &ctr,
    };
    fleet_scenarios(&mut fleet, &cp).await;

    // 6. The client's agent restarts: its stored identity, no token.
    drop(client);
    let _client = join(
        &cp,
        &dirs.join("client"),
        log("client-2.log"),
        &client_args,
        None,
    );
    let out = listening(&log("client-2.log"), "outbound").await;
    eventually(
        "the restarted client serves",
        Duration::from_secs(20),
        async || (get(out, "/").await.2 == "vm-app").then_some(()),
    )
    .await;
    let text = std::fs::read_to_string(log("client-2.log")).unwrap();
    assert!(text.contains("reusing the stored certificate"), "{text}");
}
