//! Traces end to end: two proxies with mutual TLS export their spans over OTLP/gRPC to a
//! receiver built from the official OTLP protobufs (the `opentelemetry-proto` crate's tonic
//! server), and the spans join across the two hops.
//!
//! The mesh: `test/shop` (bare metal) calls `catalog.test`, served by `test/catalog-vm`
//! (a VM) behind its proxy. A request to a path ending in `/fail` gets a 500 from the
//! application and is tried twice.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value,
    trace::v1::{span::SpanKind, status::StatusCode},
};
use trellis_test_support::{control::ControlProcess, eventually};

/// A span as received, with its resource's and its own attributes as text.
#[derive(Clone, Debug)]
struct Got {
    resource: HashMap<String, String>,
    attrs: HashMap<String, String>,
    trace: String,
    span: String,
    parent: String,
    kind: i32,
    error: bool,
    /// The export's `authorization` and `x-tenant` metadata.
    headers: (Option<String>, Option<String>),
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        let header = |n: &str| {
            req.metadata()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let headers = (header("authorization"), header("x-tenant"));
        for rs in req.into_inner().resource_spans {
            let resource = text(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        resource: resource.clone(),
                        attrs: text(&s.attributes),
                        trace: hex(&s.trace_id),
                        span: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        kind: s.kind,
                        error: s
                            .status
                            .is_some_and(|st| st.code == StatusCode::Error as i32),
                        headers: headers.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on loopback; stops when the returned sender is dropped.
async fn receiver() -> (
    SocketAddr,
    Receiver,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let r = Receiver::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let svc = TraceServiceServer::new(r.clone());
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(l),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    (addr, r, stop, task)
}

impl Receiver {
    fn of(&self, trace: &str) -> Vec<Got> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.trace == trace)
            .cloned()
            .collect()
    }

    /// The spans of `trace` once there are `n` (waited for, with a deadline).
    async fn wait(&self, trace: &str, n: usize) -> Vec<Got> {
        eventually(
            &format!("{n} spans of trace {trace}"),
            Duration::from_secs(15),
            async || {
                let s = self.of(trace);
                (s.len() >= n).then_some(s)
            },
        )
        .await
    }
}

fn mesh(app: SocketAddr, inbound: u16) -> String {
    let workload = |name: &str, id: &str, env: &str, ports: &str| {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: {id} }} }}\nspec:\n  address: 127.0.0.1\n  identity: {id}\n  environment: {env}\n  locality: {{ region: eu, zone: eu-1 }}{ports}\n"
        )
    };
    [
        // Every trace a caller starts towards catalog is sampled, whatever the proxy's own
        // rate says.
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: test }\nspec:\n  selector: { app: catalog }\n  ports: [{ name: http, port: 80, targetPort: 1, protocol: HTTP }]\n  tracing: { samplingPercent: 100 }\n".to_string(),
        workload(
            "catalog-vm",
            "catalog",
            "vm",
            &format!("\n  ports: {{ http: {} }}\n  inboundPort: {inbound}", app.port()),
        ),
        workload("shop", "shop", "bare-metal", ""),
        route("catalog", "catalog", "    - retry: { attempts: 1, codes: [500], backoff: 1ms }\n"),
        policy("catalog", "  outlierDetection: { consecutiveFailures: 0 }\n  retryBudget: { percent: 100, minRetriesPerSecond: 1000 }\n"),
    ]
    .join("---\n")
}

fn by_kind(spans: &[Got], service: &str, kind: SpanKind) -> Vec<Got> {
    spans
        .iter()
        .filter(|g| g.resource["service.name"] == service && g.kind == kind as i32)
        .cloned()
        .collect()
}

#[tokio::test]
async fn spans_join_across_two_mtls_hops_and_a_failed_unsampled_request_is_exported() {
    let (otlp, got, stop, served) = receiver().await;
    let app = upstream::http(|req| async move {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok")));
        if req.uri().path().ends_with("/fail") {
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        }
        r
    })
    .await;
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, mesh(app, 1)).await;
    let otlp_url = format!("http://{otlp}");
    let join = |id: &str, workload: &str| {
        // No trace is started sampled unless its service says so.
        let extra = ["--otlp-endpoint", &otlp_url, "--trace-sampling", "0"];
        join_xds(&cp, &cp.xds_url(), id, workload, &extra)
    };
    let vm = join("catalog", "test/catalog-vm");
    vm.wait_ready().await;
    apply_ok(&cp, mesh(app, vm.inbound.port())).await;
    let shop = join("shop", "test/shop");
    shop.wait_ready().await;
    eventually(
        "the caller reaches catalog",
        Duration::from_secs(15),
        async || {
            let r = client::get_full(shop.outbound, "catalog.test", "/warm", &[])
                .await
                .ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;

    // 1. A sampled request: four spans, one chain across both proxies.
    let t1 = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{t1}-00f067aa0ba902b7-01");
    let r = client::get_full(
        shop.outbound,
        "catalog.test",
        "/ok",
        &[("traceparent", &tp)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let spans = got.wait(t1, 4).await;
    let shop_server = &by_kind(&spans, "shop", SpanKind::Server)[0];
    let shop_try = &by_kind(&spans, "shop", SpanKind::Client)[0];
    let vm_server = &by_kind(&spans, "catalog-vm", SpanKind::Server)[0];
    let vm_try = &by_kind(&spans, "catalog-vm", SpanKind::Client)[0];
    assert_eq!(shop_server.parent, "00f067aa0ba902b7");
    assert_eq!(shop_try.parent, shop_server.span);
    assert_eq!(
        vm_server.parent, shop_try.span,
        "the callee's span hangs under the caller's try"
    );
    assert_eq!(vm_try.parent, vm_server.span);
    let (shop_id, catalog_id) = (
        "spiffe://trellis.local/ns/test/sa/shop",
        "spiffe://trellis.local/ns/test/sa/catalog",
    );
    for s in [shop_server, vm_server] {
        assert_eq!(s.attrs["trellis.source.identity"], shop_id, "{s:?}");
        assert_eq!(s.attrs["trellis.destination.identity"], catalog_id, "{s:?}");
        assert_eq!(s.attrs["trellis.failure_class"], "ok");
        assert_eq!(s.attrs["trellis.sampled"], "true");
        assert!(!s.error);
    }
    assert_eq!(shop_server.attrs["trellis.destination.environment"], "vm");
    assert_eq!(
        (
            shop_server.attrs["trellis.destination.workload"].as_str(),
            shop_try.attrs["trellis.destination.workload"].as_str()
        ),
        ("test/catalog-vm", "test/catalog-vm"),
        "namespace/name, as the CLI and the pane name it"
    );
    assert_eq!(shop_server.attrs["trellis.destination.locality"], "eu/eu-1");
    assert_eq!(vm_server.attrs["trellis.source.environment"], "bare-metal");
    assert_eq!(vm_server.attrs["trellis.source.workload"], "test/shop");
    assert_eq!(
        shop_try.attrs["network.peer.port"],
        vm.inbound.port().to_string()
    );
    assert_eq!(shop_server.resource["trellis.environment"], "bare-metal");
    assert_eq!(vm_server.resource["trellis.environment"], "vm");

    // 2. An unsampled success, then an unsampled failure tried twice: only the failure is
    // exported, each try a span of its own, each with the callee's span beneath it.
    let t2 = "0af7651916cd43dd8448eb211c80319c";
    let t3 = "5b8aa5a2d2c872e8321cf37308d69df2";
    let unsampled = |t: &str| format!("00-{t}-b7ad6b7169203331-00");
    let r = client::get_full(
        shop.outbound,
        "catalog.test",
        "/ok",
        &[("traceparent", &unsampled(t3))],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let r = client::get_full(
        shop.outbound,
        "catalog.test",
        "/x/fail",
        &[("traceparent", &unsampled(t2))],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 500);
    // The caller's request and two tries; two requests at the callee, each with its try.
    let spans = got.wait(t2, 7).await;
    let shop_server = by_kind(&spans, "shop", SpanKind::Server);
    let shop_tries = by_kind(&spans, "shop", SpanKind::Client);
    let vm_servers = by_kind(&spans, "catalog-vm", SpanKind::Server);
    assert_eq!(
        (shop_server.len(), shop_tries.len(), vm_servers.len()),
        (1, 2, 2)
    );
    let s = &shop_server[0];
    assert!(s.error);
    assert_eq!(s.attrs["trellis.failure_class"], "app_error");
    assert_eq!(s.attrs["trellis.sampled"], "false");
    assert_eq!(s.attrs["trellis.attempts"], "2");
    let mut tries: Vec<_> = shop_tries.iter().map(|t| t.span.clone()).collect();
    let mut parents: Vec<_> = vm_servers.iter().map(|v| v.parent.clone()).collect();
    tries.sort();
    parents.sort();
    assert_eq!(tries, parents, "each try reached the callee as its parent");
    assert!(shop_tries.iter().all(|t| t.parent == s.span && t.error));
    assert!(
        got.of(t3).is_empty(),
        "an unsampled success is not exported"
    );

    // 3. B3 from the application is continued.
    let t4 = "80f198ee56343ba864fe8b2a57d3eff7";
    let r = client::get_full(
        shop.outbound,
        "catalog.test",
        "/ok",
        &[("b3", &format!("{t4}-e457b5a2e4d86bd1-1"))],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let spans = got.wait(t4, 4).await;
    assert_eq!(
        by_kind(&spans, "shop", SpanKind::Server)[0].parent,
        "e457b5a2e4d86bd1"
    );

    // 4. No context: the first proxy starts the trace, sampled at the service's rate.
    let before = got.0.lock().unwrap().len();
    let r = client::get_full(shop.outbound, "catalog.test", "/ok", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let started = eventually(
        "a trace started by the caller",
        Duration::from_secs(15),
        async || {
            let all = got.0.lock().unwrap();
            all[before..]
                .iter()
                .find(|g| g.resource["service.name"] == "shop" && g.kind == SpanKind::Server as i32)
                .cloned()
        },
    )
    .await;
    assert_eq!(started.parent, "", "a root span");
    got.wait(&started.trace, 4).await;

    // 5. The collector goes away: requests are served as before, and the lost spans are
    // counted rather than waited for.
    drop(stop);
    served.await.unwrap();
    for _ in 0..3 {
        let r = client::get_full(
            shop.outbound,
            "catalog.test",
            "/ok",
            &[("traceparent", &tp)],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    eventually(
        "spans that could not be sent are counted",
        Duration::from_secs(15),
        async || {
            let m = shop.metrics().await;
            m.lines()
                .any(|l| l.starts_with("trellis_trace_spans_total{outcome=\"failed\"}"))
                .then_some(())
        },
    )
    .await;
}

/// Opaque TCP through two proxies with mutual TLS: each proxy's connection is a span (the
/// caller's sampled at its rate of 100 %), the callee's in the caller's trace (the stream's
/// hello carries it), and a connection the callee could not complete is exported by the
/// callee although neither its rate (0 %) nor its caller's decision asked.
#[tokio::test]
async fn tcp_connections_are_spans_and_a_failed_one_is_exported_unsampled() {
    let (otlp, got, _stop, _served) = receiver().await;
    let echo = upstream::tcp_echo().await;
    let (closed, _closed) = upstream::refusing();
    // Where the quiet caller's proxy binds Service `traced`.
    let bind = upstream::spare_addr().await;
    let cp = ControlProcess::start(BIN, &[]);
    let mesh = |inbound: u16| {
        let tcp = |name: &str, port: u16, extra: &str| {
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: catalog }}\n  ports: [{{ name: {name}, port: {port}, targetPort: 1, protocol: TCP }}]\n{extra}")
        };
        [
            tcp("db", 5432, ""),
            tcp("cold", 5433, ""),
            tcp("traced", 5434, "  tracing: { samplingPercent: 100 }\n"),
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: catalog-vm, namespace: test, labels: {{ app: catalog }} }}\nspec:\n  address: 127.0.0.1\n  identity: catalog\n  environment: vm\n  inboundPort: {inbound}\n  ports: {{ db: {0}, cold: {1}, traced: {0} }}\n", echo.port(), closed.port()),
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: shop, namespace: test, labels: { app: shop } }\nspec: { address: 127.0.0.1, identity: shop, environment: bare-metal }\n".to_string(),
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: quiet, namespace: test, labels: {{ app: quiet }} }}\nspec:\n  address: 127.0.0.1\n  identity: quiet\n  environment: bare-metal\n  upstreams: [{{ service: traced.test, port: 5434, bind: '{bind}' }}]\n"),
        ]
        .join("---\n")
    };
    apply_ok(&cp, mesh(1)).await;
    let otlp_url = format!("http://{otlp}");
    let join = |id: &str, workload: &str, rate: &str| {
        let extra = ["--otlp-endpoint", &otlp_url, "--trace-sampling", rate];
        join_xds(&cp, &cp.xds_url(), id, workload, &extra)
    };
    let vm = join("catalog", "test/catalog-vm", "0");
    vm.wait_ready().await;
    apply_ok(&cp, mesh(vm.inbound.port())).await;
    let shop = join("shop", "test/shop", "100");
    shop.wait_ready().await;
    // A caller that samples nothing.
    let quiet = join("quiet", "test/quiet", "0");
    quiet.wait_ready().await;
    until_echoed(shop.outbound, "db.test:5432").await;
    // The first span received that `with` picks, waited for.
    let first = async |what: String, with: &dyn Fn(&Got) -> bool| {
        eventually(&what, Duration::from_secs(15), async || {
            got.0.lock().unwrap().iter().find(|g| with(g)).cloned()
        })
        .await
    };
    let span_of = async |service: &str, name: &str, kind: SpanKind, with: &dyn Fn(&Got) -> bool| {
        let what = format!("{service}'s span of a connection to {name}");
        first(what, &|g: &Got| {
            g.resource["service.name"] == service
                && g.kind == kind as i32
                && g.attrs
                    .get("trellis.destination.service")
                    .map(String::as_str)
                    == Some(name)
                && with(g)
        })
        .await
    };
    let tcp = |g: &Got| g.attrs.get("network.transport").map(String::as_str) == Some("tcp");
    // A try's span of an HTTP request (a CONNECT's): it names no service.
    let try_span = async |service: &str, id: &str| {
        let what = format!("{service}'s span {id}");
        first(what, &|g: &Got| {
            g.resource["service.name"] == service && g.span == id
        })
        .await
    };
    // The caller's span: its own trace, the bytes each way, whom it reached.
    let s = span_of("shop", "db.test", SpanKind::Client, &tcp).await;
    assert_eq!(s.attrs["network.transport"], "tcp", "{s:?}");
    assert_eq!(s.attrs["trellis.failure_class"], "ok", "{s:?}");
    assert_eq!(s.attrs["trellis.tcp.bytes_from_client"], "4", "{s:?}");
    assert_eq!(s.attrs["trellis.tcp.bytes_to_client"], "4", "{s:?}");
    assert_eq!(s.attrs["trellis.destination.workload"], "test/catalog-vm");
    assert_eq!(
        s.attrs["trellis.destination.identity"],
        "spiffe://trellis.local/ns/test/sa/catalog"
    );
    assert_eq!(s.attrs["network.peer.port"], vm.inbound.port().to_string());
    assert!(!s.error);
    // Its parent is the CONNECT request's try, an HTTP span of the caller's.
    let connect = try_span("shop", &s.parent).await;
    assert!(connect.attrs.contains_key("trellis.attempt"), "{connect:?}");
    assert_eq!(connect.kind, SpanKind::Client as i32);
    assert_eq!(connect.trace, s.trace);
    // The callee's span of the same stream: in the caller's trace, under the same try (the
    // stream's hello said so), exported at the callee's rate of 0 % because the caller
    // sampled it; it names the caller's workload.
    let c = span_of("catalog-vm", "db.test", SpanKind::Server, &|g| {
        g.trace == s.trace
    })
    .await;
    assert_eq!(c.parent, s.parent, "{c:?}");
    assert_eq!(c.attrs["trellis.sampled"], "true", "{c:?}");
    assert_eq!(c.attrs["trellis.source.workload"], "test/shop", "{c:?}");
    assert!(!c.error);

    // The callee cannot reach its application, for a caller that samples nothing: the
    // callee's span is exported anyway (its rate 0 %, the caller's decision no), an error
    // naming the class and who called.
    let _ = echo_through(quiet.outbound, "cold.test:5433", b"ping").await;
    let s = span_of("catalog-vm", "cold.test", SpanKind::Server, &tcp).await;
    assert!(s.error, "{s:?}");
    assert_eq!(s.attrs["trellis.failure_class"], "connect_refused", "{s:?}");
    assert_eq!(s.attrs["trellis.sampled"], "false", "{s:?}");
    assert_eq!(
        s.attrs["trellis.source.identity"],
        "spiffe://trellis.local/ns/test/sa/quiet"
    );
    assert_eq!(s.resource["trellis.environment"], "vm");
    // Its parent: the caller's CONNECT try (the tunnel never opened), which failed with the
    // callee's class.
    let q = try_span("quiet", &s.parent).await;
    assert!(q.attrs.contains_key("trellis.attempt"), "{q:?}");
    assert_eq!(q.trace, s.trace);
    assert_eq!(q.attrs["trellis.failure_class"], "connect_refused", "{q:?}");

    // Through the quiet caller's TCP bind, to a Service whose own sampling rate is 100 %:
    // the connection is sampled by the Service's rate, as an HTTP request would be, and the
    // callee's span follows.
    let echoed = eventually(
        "an echo through the bind",
        Duration::from_secs(10),
        async || {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(bind).await.ok()?;
            c.write_all(b"ping").await.ok()?;
            let mut back = [0u8; 4];
            c.read_exact(&mut back).await.ok()?;
            Some(back)
        },
    )
    .await;
    assert_eq!(&echoed, b"ping");
    let s = span_of("quiet", "traced.test", SpanKind::Client, &tcp).await;
    assert_eq!(s.attrs["trellis.sampled"], "true", "{s:?}");
    assert_eq!(s.parent, "", "a bind's connection starts its trace: {s:?}");
    let c = span_of("catalog-vm", "traced.test", SpanKind::Server, &|g| {
        g.trace == s.trace
    })
    .await;
    assert_eq!(c.parent, s.span, "{c:?}");
}

/// A CA made by the real `openssl` command in `dir`: `NAME.pem` and its key `NAME.key`.
fn openssl_ca(dir: &std::path::Path, name: &str, cn: &str) {
    let (key, pem, subj) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN={cn}"),
    );
    let mut args = vec!["req", "-x509", "-days", "1", "-subj", &subj];
    args.extend_from_slice(&EC_KEY);
    args.extend_from_slice(&["-keyout", &key, "-out", &pem]);
    openssl(dir, &args);
}

/// A key (`NAME.key`) and a certificate (`NAME.pem`) for `cn` made by `openssl` in `dir`,
/// signed by the CA `ca` (from [`openssl_ca`]), with the extensions `ext`.
fn openssl_leaf(dir: &std::path::Path, ca: &str, name: &str, cn: &str, ext: &str) {
    let [key, csr, pem, cnf, subj, ca_pem, ca_key] = [
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.cnf"),
        format!("/CN={cn}"),
        format!("{ca}.pem"),
        format!("{ca}.key"),
    ];
    let mut args = vec!["req", "-new", "-subj", &subj];
    args.extend_from_slice(&EC_KEY);
    args.extend_from_slice(&["-keyout", &key, "-out", &csr]);
    openssl(dir, &args);
    std::fs::write(dir.join(&cnf), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &cnf,
            "-out",
            &pem,
        ],
    );
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 signed by it (`server.pem`,
/// `server.key`), made by `openssl` in `dir`.
fn openssl_ca_and_server(dir: &std::path::Path) {
    openssl_ca(dir, "ca", "collector CA");
    openssl_leaf(
        dir,
        "ca",
        "server",
        "collector",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    );
}

/// A TLS stream as tonic's server takes it.
struct Tls(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for Tls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The OTLP receiver over TLS (ALPN h2), with the certificate in `dir`; with `client_ca`,
/// it requires a client certificate chained to that CA (PEM); stops with the task.
async fn tls_receiver(
    dir: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> (SocketAddr, Receiver, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(chain, key).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let r = Receiver::default();
    let svc = TraceServiceServer::new(r.clone());
    // Handshakes that fail (a client that does not trust the certificate) are skipped.
    let incoming = futures_util::stream::unfold((l, acceptor), |(l, acceptor)| async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return None;
            };
            if let Ok(s) = acceptor.accept(tcp).await {
                return Some((Ok::<_, std::io::Error>(Tls(s)), (l, acceptor)));
            }
        }
    });
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    (addr, r, task)
}

/// A request to `down.test`, whose port is closed: a 502, whose spans are exported whatever
/// the sampling says.
async fn fail_one(p: &trellis_test_support::ProxyProcess) {
    let r = client::get_full(p.outbound, "down.test", "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 502);
}

/// The spans `got` holds once there are some; the first is a failed request's.
async fn failed_spans(got: &Receiver, what: &str) -> Vec<Got> {
    let spans = eventually(what, Duration::from_secs(15), async || {
        let g = got.0.lock().unwrap().clone();
        (!g.is_empty()).then_some(g)
    })
    .await;
    assert_eq!(
        spans[0].attrs["trellis.failure_class"], "connect_refused",
        "{spans:?}"
    );
    spans
}

/// Until `p` counts spans it could not send to its collector.
async fn spans_not_sent(p: &trellis_test_support::ProxyProcess) {
    eventually(
        "spans the collector could not be sent are counted",
        Duration::from_secs(15),
        async || {
            (p.metric("trellis_trace_spans_total", &[("outcome", "failed")])
                .await
                > 0.0)
                .then_some(())
        },
    )
    .await;
}

/// `trellis proxy` with the collector `endpoint` and `args`, refused before it starts with
/// exit status `code`: its stderr.
fn refused(endpoint: &str, args: &[&str], code: i32) -> String {
    let out = std::process::Command::new(BIN)
        .args([
            "proxy",
            "--config",
            "/dev/null",
            "--otlp-endpoint",
            endpoint,
        ])
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(code), "{args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn spans_go_to_a_collector_over_tls_verified_by_the_ca_given() {
    let dir = trellis_test_support::Temp::dir("otlp-tls");
    openssl_ca_and_server(&dir);
    let other = trellis_test_support::Temp::dir("otlp-other-ca");
    openssl_ca_and_server(&other);
    let (otlp, got, task) = tls_receiver(&dir, None).await;
    let down = trellis_test_support::upstream::closed_port().await;
    let config = docs(&[service("down", "HTTP", &[down]), client_workload(&[])]);
    let url = format!("https://{otlp}");
    let ca = dir.join("ca.pem").display().to_string();
    // The proxy, its collector verified with `ca`.
    let start = |ca: &str, env: &[(&str, &str)]| {
        trellis_test_support::ProxyProcess::start_with_env(
            BIN,
            &config,
            &[
                "--workload",
                "test/client",
                "--otlp-endpoint",
                &url,
                "--otlp-ca",
                ca,
            ],
            env,
        )
    };
    // Headers for the collector (an API key) from the environment, out of the process list.
    let p = start(
        &ca,
        &[(
            "TRELLIS_OTLP_HEADERS",
            "Authorization=Bearer t0ken,x-tenant=shop",
        )],
    );
    fail_one(&p).await;
    let spans = failed_spans(&got, "the failed request's span over TLS").await;
    assert_eq!(
        spans[0].headers,
        (Some("Bearer t0ken".into()), Some("shop".into())),
        "the collector's headers came with the export"
    );
    drop(p);

    // The collector's certificate from another CA: refused, and the spans counted as failed.
    let before = got.0.lock().unwrap().len();
    let wrong = other.join("ca.pem").display().to_string();
    let p = start(&wrong, &[]);
    fail_one(&p).await;
    spans_not_sent(&p).await;
    assert_eq!(got.0.lock().unwrap().len(), before, "nothing reached it");
    task.abort();

    // A CA file that cannot be read stops the proxy before it starts, naming the file.
    let err = refused(&url, &["--otlp-ca", "/nonexistent/ca.pem"], 64);
    assert!(err.contains("--otlp-ca /nonexistent/ca.pem"), "{err}");
    // So does a header that cannot be sent, named without its value (it may be a secret).
    let err = refused(&url, &["--otlp-header", "x-key=s3cret\u{7f}"], 64);
    assert!(
        err.contains("--otlp-header x-key: its value is not visible ASCII"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[tokio::test]
async fn spans_go_to_a_collector_that_asks_for_a_client_certificate() {
    let dir = trellis_test_support::Temp::dir("otlp-mtls");
    openssl_ca_and_server(&dir);
    // The collector trusts the clients of its own CA; the proxy's certificate is one of
    // them, and a stray key matches no certificate.
    openssl_ca(&dir, "clients", "collector's clients");
    openssl_leaf(
        &dir,
        "clients",
        "client",
        "trellis proxy test.client",
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    );
    openssl_leaf(
        &dir,
        "clients",
        "stray",
        "stray",
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    );
    let (otlp, got, task) = tls_receiver(&dir, Some(&dir.join("clients.pem"))).await;
    let down = trellis_test_support::upstream::closed_port().await;
    let config = docs(&[service("down", "HTTP", &[down]), client_workload(&[])]);
    let url = format!("https://{otlp}");
    let path = |f: &str| dir.join(f).display().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let start = |more: &[&str]| {
        let mut args = vec![
            "--workload",
            "test/client",
            "--otlp-endpoint",
            &url,
            "--otlp-ca",
            &ca,
        ];
        args.extend_from_slice(more);
        trellis_test_support::ProxyProcess::start(BIN, &config, &args)
    };

    // Without a client certificate the collector refuses the connection: nothing arrives,
    // and the spans are counted as failed.
    let p = start(&[]);
    fail_one(&p).await;
    spans_not_sent(&p).await;
    assert!(got.0.lock().unwrap().is_empty(), "nothing reached it");
    drop(p);

    // With it, the failed request's spans are exported.
    let p = start(&["--otlp-client-cert", &cert, "--otlp-client-key", &key]);
    fail_one(&p).await;
    failed_spans(&got, "the failed request's span over mutual TLS").await;
    drop(p);
    task.abort();

    // Refused before the proxy starts, naming the flag and the file.
    let stray = path("stray.key");
    let err = refused(
        &url,
        &["--otlp-client-cert", &cert, "--otlp-client-key", &stray],
        64,
    );
    assert!(
        err.contains(&format!("--otlp-client-key {stray}: not the key of {cert}")),
        "{err}"
    );
    let err = refused(
        &url,
        &[
            "--otlp-client-cert",
            &ca,
            "--otlp-client-key",
            &path("ca.pem"),
        ],
        64,
    );
    assert!(
        err.contains(&format!(
            "--otlp-client-key {}: no PEM private key",
            path("ca.pem")
        )),
        "{err}"
    );
    // TLS settings for a plaintext collector are refused, not ignored.
    let plain = format!("http://{otlp}");
    let err = refused(
        &plain,
        &["--otlp-client-cert", &cert, "--otlp-client-key", &key],
        64,
    );
    assert!(
        err.contains(&format!(
            "--otlp-client-cert {cert}: the collector {plain} is plaintext"
        )),
        "{err}"
    );
    // A certificate without its key is a usage error of the command line.
    let err = refused(&url, &["--otlp-client-cert", &cert], 2);
    assert!(err.contains("--otlp-client-key"), "{err}");
    // `trellis join` checks them before it spends its join token on a control plane.
    let state = dir.join("state");
    let out = std::process::Command::new(BIN)
        .args([
            "join",
            "--control-plane",
            "http://127.0.0.1:1",
            "--state-dir",
        ])
        .arg(&state)
        .args([
            "--name",
            "vm-1",
            "--address",
            "127.0.0.1",
            "--port",
            "http=8080",
        ])
        .args(["--token", "trellis-join.unused", "--otlp-endpoint", &url])
        .args(["--otlp-client-cert", &cert, "--otlp-client-key", &stray])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!(
            "trellis join: --otlp-client-key {stray}: not the key of"
        )),
        "{err}"
    );
}
