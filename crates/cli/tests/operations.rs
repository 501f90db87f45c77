//! Zero failed requests through the operations an operator runs on a live mesh: a steady
//! load through two proxies with mutual TLS (a bare-metal caller, callees labelled VM and
//! container), counted while each operation happens, one at a time. Each operation's
//! requests, failures and their classes are printed as a table (docs/reliability.md).
//!
//! Here: a push storm (100 applies), a route's weights moved, a callee's proxy drained and
//! restarted while the other endpoint serves, the control plane killed (SIGKILL) and
//! restarted, and a callee's proxy upgraded in place while it is the only endpoint serving. Elsewhere, under load as well: a config file reload (lifecycle.rs), an agent
//! leaving on SIGTERM (join.rs), one of two replicas on etcd killed (control.rs), leaf
//! renewals and a root rotation (identity.rs).

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::*;
use trellis_test_support::{control::ControlProcess, Temp};

/// Services `b` (both callees), `b-vm` and `b-ct` (one each), the route splitting `b`
/// between the two by `weights` (none: `b` goes to both endpoints as one cluster), and the
/// three Workloads.
fn mesh(apps: [SocketAddr; 2], inbound: [u16; 2], weights: Option<[u32; 2]>) -> String {
    let svc = |name: &str, sel: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {sel}\n  ports: [{{ name: web, port: 80, targetPort: 1, protocol: HTTP }}]\n")
    };
    let peer = |name: &str, env: &str, version: &str, app: SocketAddr, inbound: u16| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: b, version: {version} }} }}\nspec:\n  address: 127.0.0.1\n  identity: beta\n  inboundPort: {inbound}\n  environment: {env}\n  ports: {{ web: {} }}\n", app.port())
    };
    let route = weights.map_or_else(String::new, |w| format!("---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: b, namespace: test }}\nspec:\n  parentRefs: [{{ kind: Service, name: b, port: 80 }}]\n  rules:\n    - backendRefs:\n        - {{ name: b-vm, port: 80, weight: {} }}\n        - {{ name: b-ct, port: 80, weight: {} }}\n", w[0], w[1]));
    [
        svc("b", "{ app: b }"),
        svc("b-vm", "{ app: b, version: vm }"),
        svc("b-ct", "{ app: b, version: ct }") + &route,
        peer("peer-vm", "vm", "vm", apps[0], inbound[0]),
        peer("peer-ct", "container", "ct", apps[1], inbound[1]),
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec: { address: 127.0.0.1, identity: client, environment: bare-metal }\n".to_string(),
    ]
    .join("---\n")
}

/// The load: four clients on kept-alive connections, each answer counted by its body: per
/// operation (`ok`, `failed`), and in a window the operation's checks reset (`window`).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<Mutex<[u64; 2]>>,
    window: Arc<Mutex<[u64; 2]>>,
    failed: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(outbound: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(Mutex::new([0u64; 2]));
        let window = Arc::new(Mutex::new([0u64; 2]));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..4)
            .map(|_| {
                let (stop, ok, window, failed) =
                    (stop.clone(), ok.clone(), window.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut c = client::Conn::h1(outbound).await;
                    while !stop.load(Ordering::Relaxed) {
                        match c.get("b.test", "/").await {
                            Ok(r) if r.status == 200 => {
                                let i = usize::from(&r.body[..] == b"ct");
                                ok.lock().unwrap()[i] += 1;
                                window.lock().unwrap()[i] += 1;
                            }
                            Ok(r) => failed.lock().unwrap().push(
                                r.headers.get("x-trellis-failure").map_or_else(
                                    || r.status.to_string(),
                                    |v| v.to_str().unwrap_or("?").to_string(),
                                ),
                            ),
                            Err(e) => {
                                failed.lock().unwrap().push(format!("client: {e}"));
                                c = client::Conn::h1(outbound).await;
                            }
                        }
                        // About a hundred requests a second per client.
                        tokio::time::sleep(Duration::from_millis(8)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            window,
            failed,
            tasks,
        }
    }

    /// Wait until the answers since now satisfy `pred` (by callee).
    async fn until(&self, what: &str, pred: impl Fn([u64; 2]) -> bool) {
        *self.window.lock().unwrap() = [0, 0];
        eventually(what, Duration::from_secs(30), async || {
            let v = *self.window.lock().unwrap();
            if pred(v) {
                return Some(());
            }
            // Answers that came before the change count only if they already fit.
            if v[0] + v[1] > 400 {
                *self.window.lock().unwrap() = [0, 0];
            }
            None
        })
        .await;
    }

    /// Answers so far (by callee) and the failures, taken.
    fn take(&self) -> ([u64; 2], Vec<String>) {
        let ok = std::mem::take(&mut *self.ok.lock().unwrap());
        (ok, std::mem::take(&mut *self.failed.lock().unwrap()))
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// One row: an operation, the requests during it, the failures and their classes.
struct Row {
    op: &'static str,
    answered: u64,
    failed: Vec<String>,
    secs: f64,
}

async fn during<F: std::future::Future<Output = ()>>(
    load: &Load,
    rows: &mut Vec<Row>,
    op: &'static str,
    f: F,
) -> [u64; 2] {
    let _ = load.take();
    let began = Instant::now();
    f.await;
    let (ok, failed) = load.take();
    rows.push(Row {
        op,
        answered: ok[0] + ok[1],
        failed,
        secs: began.elapsed().as_secs_f64(),
    });
    ok
}

/// Join a callee's proxy for `workload` with `state` (a token for identity `beta` the first
/// time; its stored certificate after). It answers for upgrades at `state`.sock: started
/// again while it runs, the new process takes its listeners over.
fn callee(cp: &ControlProcess, state: &std::path::Path, workload: &str, t: &str) -> ProxyProcess {
    let handoff = state.with_extension("sock");
    ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        workload,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--join-token",
            t,
            "--handoff",
            handoff.to_str().unwrap(),
        ],
    )
}

#[tokio::test]
async fn operations_on_a_live_mesh_fail_no_request() {
    let apps = [upstream::named("vm").await, upstream::named("ct").await];
    let mut cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, mesh(apps, [1, 1], None)).await;
    let beta = token(&cp, "test", "beta", "10m", "2");
    // Removed when the test ends, pass or fail: the state dirs and the hand-over sockets by them.
    let states = [
        Temp::path("ops-vm"),
        Temp::path("ops-ct"),
        Temp::path("ops-client"),
    ];
    let _sockets = states.each_ref().map(|s| Temp(s.with_extension("sock")));
    let mut vm = callee(&cp, &states[0], "test/peer-vm", &beta);
    let ct = callee(&cp, &states[1], "test/peer-ct", &beta);
    vm.wait_ready().await;
    ct.wait_ready().await;
    let mut inbound = [vm.inbound.port(), ct.inbound.port()];
    apply_ok(&cp, mesh(apps, inbound, Some([50, 50]))).await;
    let t = token(&cp, "test", "client", "10m", "1");
    let caller = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/client",
        &[
            "--state-dir",
            states[2].to_str().unwrap(),
            "--join-token",
            &t,
        ],
    );
    caller.wait_ready().await;
    until_answered(caller.outbound, "b.test").await;
    let load = Load::start(caller.outbound);
    let mut rows = Vec::new();
    let both = |v: [u64; 2]| v[0] > 20 && v[1] > 20;
    during(
        &load,
        &mut rows,
        "steady (baseline)",
        load.until("both callees answer", both),
    )
    .await;

    // 1. A push storm: 100 applies, each a change every proxy receives.
    during(&load, &mut rows, "push storm: 100 applies", async {
        for i in 0..100 {
            let noise = format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: noise-{}, namespace: test }}\nspec:\n  selector: {{ app: noise }}\n  ports: [{{ port: 80 }}]\n", i % 10);
            apply_ok(&cp, noise).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;

    // 2. The route's weights moved: all to the VM, all to the container, back to half.
    during(&load, &mut rows, "route weights moved (3 steps)", async {
        for w in [[100, 0], [0, 100], [50, 50]] {
            apply_ok(&cp, mesh(apps, inbound, Some(w))).await;
            load.until("the new weights apply", |v| {
                (0..2).all(|i| (w[i] == 0) == (v[i] == 0)) && v[0] + v[1] > 40
            })
            .await;
        }
    })
    .await;

    // 3. The VM callee's proxy drained (SIGTERM) and started again; the container's serves
    // the same service meanwhile (the route's split is deleted: one cluster of both).
    let (st, v) = cp
        .call(
            http::Method::DELETE,
            "/api/v1/resources/HTTPRoute/test/b",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    load.until("both callees answer", both).await;
    during(
        &load,
        &mut rows,
        "callee proxy drained and restarted",
        async {
            vm.signal("TERM");
            assert_eq!(vm.wait_exit(Duration::from_secs(40)).await, Some(0));
            vm = callee(&cp, &states[0], "test/peer-vm", &beta);
            vm.wait_ready().await;
            inbound[0] = vm.inbound.port();
            apply_ok(&cp, mesh(apps, inbound, None)).await;
            load.until("both callees answer again", both).await;
        },
    )
    .await;

    // 4. The control plane killed (SIGKILL): the proxies serve on their last config; it
    // starts again on its data, they reconnect, and a change reaches them.
    during(&load, &mut rows, "control plane SIGKILL + restart", async {
        let (api, xds) = (cp.api.to_string(), cp.xds.to_string());
        let dir = cp.kill();
        load.until("serving without it", |v| v[0] + v[1] > 100)
            .await;
        cp = ControlProcess::start_in(BIN, dir, &[], &api, &xds);
        apply_ok(&cp, mesh(apps, inbound, Some([100, 0]))).await;
        load.until("a change after the restart", |v| v[0] > 40 && v[1] == 0)
            .await;
    })
    .await;

    // 5. The VM callee's proxy upgraded in place while it is the only endpoint the route
    // sends to: a new process (same flags) takes its listeners over, has its config from
    // the control plane, and the old one drains and exits.
    during(
        &load,
        &mut rows,
        "callee proxy upgraded in place (only endpoint)",
        async {
            let new = callee(&cp, &states[0], "test/peer-vm", &beta);
            assert_eq!(new.inbound, vm.inbound, "the same inbound listener");
            assert_eq!(vm.wait_exit(Duration::from_secs(40)).await, Some(0));
            vm = new;
            load.until("the new process serves", |v| v[0] > 100 && v[1] == 0)
                .await;
        },
    )
    .await;
    load.stop().await;

    println!("| operation | requests during it | failed | classes | seconds |");
    println!("| --- | ---: | ---: | --- | ---: |");
    for r in &rows {
        let mut classes: Vec<String> = r.failed.clone();
        classes.sort();
        classes.dedup();
        println!(
            "| {} | {} | {} | {} | {:.1} |",
            r.op,
            r.answered + r.failed.len() as u64,
            r.failed.len(),
            if classes.is_empty() {
                "-".into()
            } else {
                classes.join(", ")
            },
            r.secs
        );
    }
    for l in caller.logs() {
        if l["failure_class"].as_str().is_some_and(|c| c != "ok") {
            println!("caller: {l}");
        }
    }
    for r in &rows {
        assert!(r.answered > 0, "{}: no request answered", r.op);
        assert!(
            r.failed.is_empty(),
            "{}: {} failed: {:?}",
            r.op,
            r.failed.len(),
            r.failed
        );
    }
}
