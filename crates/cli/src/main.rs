//! `trellis`: one binary, one subcommand per part of the mesh. This file only parses flags,
//! loads config, builds the runtime and hands over.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use trellis_model::{resource::NamespacedName, value::DurationValue};
use trellis_proxy::{xds::XdsOptions, Options, Proxy, ServerLimits, Source};

mod check;
mod client;
mod closed_pipe;
mod containers;
mod ctl;
mod demo;
mod diagnose;
mod fleet;
mod join;
mod shift;

/// `EX_USAGE` from sysexits.h: bad flags or config.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "A service mesh for hybrid fleets: bare metal, VMs and containers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole mesh on this machine: a control plane, a service joined as a VM, a container
    /// and a bare-metal host, a caller, traffic and a failover (loopback only).
    Demo(demo::DemoArgs),
    /// Run the data-plane proxy.
    Proxy(ProxyArgs),
    /// Join this host or VM to the mesh: identity, Workload registration, the proxy, health
    /// checks and heartbeats; deregisters on SIGTERM.
    Join(Box<join::JoinArgs>),
    /// Join the labelled containers of a Docker or Podman engine (`trellis.service=NAME`), as
    /// they start and stop, each with an agent in its network namespace.
    Containers(containers::ContainersArgs),
    /// Run the control plane: resource store, HTTP API and xDS server.
    Control(ControlArgs),
    /// Create or update every resource of a file, a directory or stdin, atomically.
    Apply {
        /// A file, a directory of .yaml/.yml/.json files, or `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// List resources of a kind, or show one.
    Get {
        /// Kind (service, workload, httproute, grpcroute, backendtrafficpolicy,
        /// authorizationpolicy, peerauthentication, trustbundle, ratelimitpolicy, rollout,
        /// or short forms: svc, wl, route, btp, authz, pa, bundle, rl, ro), or KIND/NAME.
        kind: String,
        /// Name, or NAMESPACE/NAME (lists every resource of the kind when absent).
        name: Option<String>,
        /// Namespace (every namespace when listing without it; `default` for one resource).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Every namespace (what listing without -n does; taken as kubectl takes it).
        #[arg(short = 'A', long, conflicts_with = "namespace")]
        all_namespaces: bool,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: ctl::Output,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Delete a resource.
    Delete {
        /// Kind, or KIND/NAME.
        kind: String,
        /// Name, or NAMESPACE/NAME.
        name: Option<String>,
        /// Namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Show a resource with its status conditions and the proxies that use it.
    Describe {
        /// Kind, or KIND/NAME.
        kind: String,
        /// Name, or NAMESPACE/NAME.
        name: Option<String>,
        /// Namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Every connected proxy: versions sent and acknowledged, and the last rejection.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: ctl::Output,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Rate, success, latency and failures (network, application, policy) per service or
    /// workload, from what every proxy reported to the control plane.
    Stat(fleet::ViewArgs),
    /// Caller → callee workload pairs: environments, identities, mTLS, rate, success, p99.
    Edges(fleet::ViewArgs),
    /// What fails, and whether it is the network, the application, the mesh's policy or the
    /// configuration: where, with the evidence of both ends of each hop, and what to check.
    Diagnose(diagnose::DiagnoseArgs),
    /// The mesh's own health: store, proxies in sync, references, certificates, root
    /// rotation, workloads, agents, clocks (exit status 1 when a check fails); `--proxy`
    /// checks the proxy on this host.
    Check(check::CheckArgs),
    /// A sign-in link to the single pane (a page served by the control plane: topology,
    /// problems, services, traffic shifts), good once for 15 minutes; opened in the
    /// desktop's browser when there is one.
    Dashboard {
        #[command(flatten)]
        conn: client::Conn,
        /// Only print the link.
        #[arg(long)]
        no_open: bool,
    },
    /// Live requests as the proxies see them: method, path, outcome and failure class,
    /// latency, attempts, endpoint, who called whom (header values only with --headers).
    Tap(fleet::TapArgs),
    /// The tap's requests added up by source, destination, method and path: count, success,
    /// best/worst/last latency and the failure class they carried.
    Top(fleet::TopArgs),
    /// Progressive delivery: `shift svc/NAME --to BACKEND` moves a Service's traffic to a
    /// canary step by step, judged against the stable version at each step and rolled back
    /// on its own (the control plane runs it); `shift status|pause|resume|abort|promote`.
    Shift(shift::ShiftArgs),
    /// Check a server and token, and save them for later commands.
    Login {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Join tokens: a proxy's first credential, for one identity.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The mesh's certificate authority: its roots, and their rotation.
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(Subcommand)]
enum CaCmd {
    /// Trust domain, signing root, trusted roots, rotation phase.
    Status {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// One phase of a root rotation, in order: `begin` (a new root is trusted everywhere),
    /// `activate` (it signs; proxies move to it as they renew), `finish` (the old root is
    /// dropped, once every certificate it signed has expired).
    Rotate {
        /// begin, activate or finish.
        #[arg(value_parser = ["begin", "activate", "finish"])]
        phase: String,
        /// Finish before the old root's certificates have expired (their holders lose
        /// their peers' trust).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: client::Conn,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Every join token: scope, expiry, uses left (never the secret).
    List {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Revoke a join token by id (the part after `trellis-join.`).
    Revoke {
        /// Token id.
        id: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Make a read-only token (for the pane on a wall screen, a dashboard, a colleague):
    /// it reads everything but the tokens and changes nothing; printed once.
    ReadOnly {
        /// What it is for.
        #[arg(long, default_value = "viewer")]
        name: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// The read-only tokens (ids and names).
    ReadOnlyList {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Revoke a read-only token by id.
    ReadOnlyRevoke {
        /// Token id.
        id: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Create a join token for NAMESPACE/IDENTITY; it is printed once.
    Create {
        /// Namespace of the identity.
        #[arg(short = 'n', long)]
        namespace: String,
        /// The identity (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/IDENTITY).
        #[arg(long)]
        identity: String,
        /// How long the token may be used (at most 24h).
        #[arg(long, default_value = "1h")]
        ttl: DurationValue,
        /// How many times it may be used.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[command(flatten)]
        conn: client::Conn,
    },
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Data directory: the embedded store and the admin token.
    #[arg(long, default_value = "./trellis-data")]
    data_dir: PathBuf,
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    api: SocketAddr,
    /// xDS (gRPC) address.
    #[arg(long, default_value = "127.0.0.1:7071")]
    xds: SocketAddr,
    /// `embedded` (a redb file in the data dir) or etcd://HOST:PORT[,HOST:PORT...].
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Largest API request body, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// SPIFFE trust domain of the mesh (fixed when the mesh's CA is first made).
    #[arg(long, default_value = "trellis.local")]
    trust_domain: String,
    /// Lifetime of issued workload certificates (10s to 8760h).
    #[arg(long, default_value = "24h")]
    svid_ttl: DurationValue,
    /// Sign with this CA certificate (a root, or an intermediate) instead of a root the
    /// control plane makes and keeps in its store.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PKCS#8 PEM; keep it mode 0600).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The roots proxies trust, when --ca-cert is an intermediate.
    #[arg(long, requires = "ca_cert")]
    ca_bundle: Option<PathBuf>,
    /// Most telemetry series kept for the whole mesh; beyond, new series fold into `other`
    /// rows (each series holds 10 s slots for 15 minutes and 1 minute slots for 24 hours).
    #[arg(long, default_value_t = 100_000)]
    telemetry_series: usize,
    /// Most telemetry series kept per proxy.
    #[arg(long, default_value_t = 500)]
    telemetry_series_per_proxy: usize,
    /// Most memory the fleet's telemetry slots may take, MiB; beyond, the oldest slots go
    /// first (and a query over a longer window is refused, saying what is held).
    #[arg(long, default_value_t = 512)]
    telemetry_memory: usize,
    /// On a shared store (etcd): the xDS address other replicas reach this one at, to
    /// answer fleet queries together (the --xds address by default).
    #[arg(long)]
    advertise: Option<SocketAddr>,
}

#[derive(clap::Args)]
// A later flag wins, so wrappers and tests can override defaults they also pass.
#[command(args_override_self = true)]
struct ProxyArgs {
    /// Resource file (multi-document YAML).
    #[arg(
        long,
        env = "TRELLIS_CONFIG",
        required_unless_present = "xds",
        conflicts_with = "xds"
    )]
    config: Option<PathBuf>,
    /// Take the config from control planes instead (xDS URLs, comma-separated or repeated;
    /// tried in turn on failure).
    #[arg(long, value_delimiter = ',')]
    xds: Vec<String>,
    /// Node id announced over xDS (default: WORKLOAD@HOSTNAME, or HOSTNAME).
    #[arg(long)]
    node_id: Option<String>,
    /// The workload this proxy serves, NAMESPACE/NAME.
    #[arg(long)]
    workload: Option<NamespacedName>,
    #[command(flatten)]
    run: RunArgs,
    /// Keep an identity (key, certificate, trust bundle; mode 0600) in this directory; a
    /// still-valid stored certificate is reused after a restart (with --xds).
    #[arg(long, requires = "xds")]
    state_dir: Option<PathBuf>,
    /// Join token for the first certificate (`trellis token create`); prefer the environment
    /// variable, which other users cannot read in the process list.
    #[arg(
        long,
        env = "TRELLIS_JOIN_TOKEN",
        hide_env_values = true,
        requires = "state_dir"
    )]
    join_token: Option<String>,
    /// The mesh's root, `sha256:HEX` (printed by `trellis token create`): how a proxy with
    /// nothing stored checks a control plane reached over TLS (`--xds https://…`) before it
    /// sends its join token.
    #[arg(long, env = "TRELLIS_CA_HASH", value_parser = ca_hash_arg, requires = "state_dir")]
    ca_hash: Option<[u8; 32]>,
}

/// How a proxy serves (shared by `trellis proxy` and `trellis join`).
#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Admin listener (/metrics, /ready, /live, /config_dump).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Outbound listener.
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// Inbound listener.
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound: SocketAddr,
    /// How long SIGTERM waits for open connections.
    #[arg(long, default_value = "30s")]
    drain_timeout: DurationValue,
    /// Upgrade in place: take over the listeners of the proxy answering at this Unix socket
    /// (start the new binary with the same flags; the old one drains and exits once the new
    /// one has its config), and answer there for the next upgrade. `trellis join` uses
    /// STATE_DIR/handoff.sock unless given one.
    #[arg(long)]
    handoff: Option<PathBuf>,
    /// How often the config file is checked for changes.
    #[arg(long, default_value = "1s")]
    watch_interval: DurationValue,
    /// Time a client has to send request headers.
    #[arg(long, default_value = "10s")]
    header_read_timeout: DurationValue,
    /// Largest request head accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Time a kept-alive HTTP/1.1 client connection may sit idle between requests.
    #[arg(long, default_value = "60s")]
    idle_timeout: DurationValue,
    /// Worker threads (1 runs a single-threaded runtime, the sidecar default).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Do not write access-log lines to stdout.
    #[arg(long)]
    no_access_log: bool,
    /// With an identity, what the inbound listener accepts on every port, overriding the
    /// PeerAuthentications (which default to STRICT): `strict` (mutual TLS only) or
    /// `permissive` (mutual TLS and plaintext, while callers migrate).
    #[arg(long, value_enum)]
    mtls_mode: Option<MtlsMode>,
    /// Mark the proxy's upstream sockets with this SO_MARK (decimal or 0x hex; needs
    /// CAP_NET_ADMIN), so that capture rules let them pass. `trellis join --capture` sets
    /// 0x539.
    #[arg(long, value_parser = mark_arg)]
    socket_mark: Option<u32>,
    /// With xDS: how often to report to the control plane what this proxy recorded, for
    /// `trellis stat` and `edges` (`0s`: never).
    #[arg(long, default_value = "10s")]
    report_interval: DurationValue,
    /// With xDS: a Service this proxy asked for on demand (a name the application used that
    /// its Workload does not declare as an upstream) is released once unused for this long.
    #[arg(long, default_value = "5m")]
    on_demand_idle: DurationValue,
    /// Export spans over OTLP/gRPC to this collector, `http://HOST:PORT` (usually port 4317)
    /// or `https://HOST:PORT` over TLS: sampled requests' spans, and every failed request's.
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT", value_parser = otlp_arg)]
    otlp_endpoint: Option<String>,
    /// The roots (PEM) that verify an `https://` collector's certificate; the system's
    /// bundle without it.
    #[arg(long, env = "TRELLIS_OTLP_CA", requires = "otlp_endpoint")]
    otlp_ca: Option<std::path::PathBuf>,
    /// The certificate chain (PEM, leaf first) this proxy shows an `https://` collector that
    /// asks for a client certificate.
    #[arg(
        long,
        env = "TRELLIS_OTLP_CLIENT_CERT",
        requires_all = ["otlp_endpoint", "otlp_client_key"]
    )]
    otlp_client_cert: Option<std::path::PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of `--otlp-client-cert`.
    #[arg(long, env = "TRELLIS_OTLP_CLIENT_KEY", requires = "otlp_client_cert")]
    otlp_client_key: Option<std::path::PathBuf>,
    /// A header sent to the collector with every export, `NAME=VALUE` (an API key, a
    /// tenant); repeat it, or give several comma-separated in the environment (which keeps
    /// a secret out of the process list).
    #[arg(
        long = "otlp-header",
        env = "TRELLIS_OTLP_HEADERS",
        value_delimiter = ',',
        requires = "otlp_endpoint",
        hide_env_values = true
    )]
    otlp_headers: Vec<String>,
    /// The share of the traces this proxy starts (requests without a `traceparent` or B3
    /// context) that are sampled, in percent; a Service's `spec.tracing.samplingPercent`
    /// overrides it for requests to that service.
    #[arg(long, default_value_t = 1.0, value_parser = percent_arg)]
    trace_sampling: f64,
}

fn otlp_arg(s: &str) -> Result<String, String> {
    trellis_proxy::check_endpoint(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

fn percent_arg(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?}: expected a percentage from 0 to 100")),
    }
}

fn mark_arg(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?}: expected a number, decimal or 0x hex"))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MtlsMode {
    Strict,
    Permissive,
}

fn main() -> ExitCode {
    closed_pipe::quiet();
    match std::panic::catch_unwind(run) {
        Ok(code) => code,
        // Unwound (what the command holds was dropped): the status a shell gives a process
        // ended by SIGPIPE.
        Err(_) if closed_pipe::happened() => ExitCode::from(141),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn run() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story, faults included; its parts' logs only on errors
    // (RUST_LOG=warn shows the ejections and health changes too).
    let level = if matches!(cli.cmd, Cmd::Demo(_)) {
        "error"
    } else {
        "info"
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    // A person at a terminal reads lines; a service manager or a file gets JSON, one event a
    // line, for the log's collector.
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        tracing_subscriber::fmt()
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }
    match cli.cmd {
        Cmd::Demo(args) => demo::demo(args),
        Cmd::Proxy(args) => proxy(args),
        Cmd::Join(args) => join::join(*args),
        Cmd::Containers(args) => containers::containers(args),
        Cmd::Control(args) => control(args),
        Cmd::Apply { file, conn } => ctl_run(ctl::apply(&conn, &file)),
        Cmd::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
            conn,
        } => ctl_run(async move {
            let target = ctl::Target::of(&kind, name.as_deref(), namespace.as_deref())?;
            if all_namespaces && target.names_one() {
                anyhow::bail!("-A lists every namespace: give no name, or name one with -n");
            }
            ctl::get(&conn, target, output).await
        }),
        Cmd::Delete {
            kind,
            name,
            namespace,
            conn,
        } => ctl_run(async move {
            let target = ctl::Target::of(&kind, name.as_deref(), namespace.as_deref())?;
            ctl::delete(&conn, target).await
        }),
        Cmd::Describe {
            kind,
            name,
            namespace,
            conn,
        } => ctl_run(async move {
            let target = ctl::Target::of(&kind, name.as_deref(), namespace.as_deref())?;
            ctl::describe(&conn, target).await
        }),
        Cmd::Status { output, conn } => ctl_run(ctl::status(&conn, output)),
        Cmd::Login { conn } => ctl_run(ctl::login(&conn)),
        Cmd::Stat(a) => ctl_run(fleet::stat(&a)),
        Cmd::Edges(a) => ctl_run(fleet::edges(&a)),
        Cmd::Diagnose(a) => ctl_run(diagnose::run(&a)),
        Cmd::Check(a) => ctl_run(check::run(&a)),
        Cmd::Dashboard { conn, no_open } => ctl_run(check::dashboard(&conn, !no_open)),
        Cmd::Tap(a) => ctl_run(fleet::tap(&a)),
        Cmd::Top(a) => ctl_run(fleet::top(&a)),
        Cmd::Shift(a) => ctl_run(shift::run(&a)),
        Cmd::Token(TokenCmd::Create {
            namespace,
            identity,
            ttl,
            uses,
            conn,
        }) => ctl_run(ctl::token_create(&conn, &namespace, &identity, ttl.0, uses)),
        Cmd::Token(TokenCmd::List { conn }) => ctl_run(ctl::token_list(&conn)),
        Cmd::Token(TokenCmd::ReadOnly { name, conn }) => {
            ctl_run(ctl::read_only_create(&conn, &name))
        }
        Cmd::Token(TokenCmd::ReadOnlyList { conn }) => ctl_run(ctl::read_only_list(&conn)),
        Cmd::Token(TokenCmd::ReadOnlyRevoke { id, conn }) => {
            ctl_run(ctl::read_only_revoke(&conn, &id))
        }
        Cmd::Token(TokenCmd::Revoke { id, conn }) => ctl_run(ctl::token_revoke(&conn, &id)),
        Cmd::Ca(CaCmd::Status { conn }) => ctl_run(ctl::ca_status(&conn, None, false)),
        Cmd::Ca(CaCmd::Rotate { phase, force, conn }) => {
            ctl_run(ctl::ca_status(&conn, Some(&phase), force))
        }
    }
}

/// Run a client command on a small runtime; print its error and exit 1 on failure.
fn ctl_run(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn control(a: ControlArgs) -> ExitCode {
    let opts = trellis_control::Options {
        data_dir: a.data_dir,
        api: a.api,
        xds: a.xds,
        store: a.store,
        max_body_bytes: a.max_body_bytes,
        trust_domain: a.trust_domain,
        svid_ttl: a.svid_ttl.0,
        ca_files: match (a.ca_cert, a.ca_key) {
            (Some(cert), Some(key)) => Some(trellis_control::CaFiles {
                cert,
                key,
                bundle: a.ca_bundle,
            }),
            _ => None,
        },
        telemetry: trellis_control::TelemetryLimits {
            series: a.telemetry_series,
            series_per_reporter: a.telemetry_series_per_proxy,
            memory: a.telemetry_memory << 20,
            ..Default::default()
        },
        advertise: a.advertise,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis control: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let c = match trellis_control::Control::start(opts.clone()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("trellis control: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(t) = &c.new_token {
            // Printed once, at the first start; afterwards it is only in the file.
            eprintln!(
                "admin token (saved in {}, shown only now): {t}",
                opts.data_dir.join("admin.token").display()
            );
        }
        // Not secret, and what every client beyond this host needs first: said at every start
        // and kept beside the admin token.
        let hash_file = opts.data_dir.join("ca-hash");
        if let Err(e) = std::fs::write(&hash_file, format!("{}\n", c.ca_hash)) {
            tracing::warn!(file = %hash_file.display(), error = %e, "cannot write the CA hash");
        }
        if !c.api_addr.ip().is_loopback() {
            eprintln!(
                "the API is served over TLS: clients of the API pass --api-ca-hash {} (also in {})",
                c.ca_hash,
                hash_file.display()
            );
        }
        tracing::info!(api = %c.api_addr, xds = %c.xds_addr, ca_hash = %c.ca_hash, "control plane ready");
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return ExitCode::FAILURE;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("control plane stopping");
        ExitCode::SUCCESS
    })
}

/// xDS addresses as URLs (`HOST:PORT` means `http://HOST:PORT`).
fn xds_urls(given: &[String]) -> Vec<String> {
    given
        .iter()
        .map(|s| {
            if s.contains("://") {
                s.clone()
            } else {
                format!("http://{s}")
            }
        })
        .collect()
}

/// The proxy's options from the shared serving flags.
fn proxy_options(
    r: &RunArgs,
    source: Source,
    workload: Option<NamespacedName>,
    identity: Option<trellis_proxy::identity::IdentityOptions>,
) -> Options {
    Options {
        source,
        workload,
        admin: r.admin,
        outbound: r.outbound,
        inbound: r.inbound,
        drain_timeout: r.drain_timeout.0,
        watch_interval: r.watch_interval.0.max(Duration::from_millis(10)),
        limits: ServerLimits {
            header_read_timeout: r.header_read_timeout.0,
            max_header_bytes: r.max_header_bytes,
            idle_timeout: r.idle_timeout.0,
        },
        access_log: !r.no_access_log,
        identity,
        mtls_mode: r.mtls_mode.map(|m| match m {
            MtlsMode::Strict => trellis_model::resource::MtlsMode::Strict,
            MtlsMode::Permissive => trellis_model::resource::MtlsMode::Permissive,
        }),
        socket_mark: r.socket_mark,
        ipv6_capture: false,
        report_every: r.report_interval.0,
        otlp_endpoint: r.otlp_endpoint.clone(),
        otlp_ca: r.otlp_ca.clone(),
        otlp_client_cert: r.otlp_client_cert.clone(),
        otlp_client_key: r.otlp_client_key.clone(),
        otlp_headers: r.otlp_headers.clone(),
        trace_sampling: r.trace_sampling / 100.0,
        on_demand_idle: r.on_demand_idle.0,
        handoff: r.handoff.clone(),
        upgrade_on_usr2: true,
        stop_on_interrupt: true,
    }
}

/// A tokio runtime: one thread (the sidecar default) or `threads` workers.
fn runtime(threads: usize, what: &str) -> Option<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    rt.map_err(|e| eprintln!("trellis {what}: cannot start runtime: {e}"))
        .ok()
}

/// Why `token` (a join token given on the command line or in TRELLIS_JOIN_TOKEN) is not one,
/// said before anything starts: the control plane would refuse it only once the proxy runs.
/// The value is not repeated (it may be a real token with a typo in it).
fn not_a_join_token(token: Option<&str>, flag: &str) -> Option<String> {
    let t = token?;
    trellis_identity::join::parse(t).is_none().then(|| {
        format!(
            "{flag} (or TRELLIS_JOIN_TOKEN) is not a join token: {}",
            trellis_identity::join::SHAPE
        )
    })
}

fn ca_hash_arg(s: &str) -> Result<[u8; 32], String> {
    trellis_proxy::identity::parse_ca_hash(s).ok_or_else(|| {
        "expected sha256:HEX (64 hex digits), as `trellis token create` prints".into()
    })
}

fn proxy(a: ProxyArgs) -> ExitCode {
    let source = match a.config {
        Some(path) => Source::File(path),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            let node_id = a.node_id.clone().unwrap_or_else(|| match &a.workload {
                Some(w) => format!("{w}@{host}"),
                None => host,
            });
            Source::Xds(XdsOptions {
                servers: xds_urls(&a.xds),
                node_id,
                workload: a.workload.as_ref().map(|w| w.to_string()),
                identity: None,
            })
        }
    };
    let identity = a
        .state_dir
        .map(|state_dir| trellis_proxy::identity::IdentityOptions {
            state_dir,
            join_token: a.join_token,
            ca_hash: a.ca_hash,
        });
    let opts = proxy_options(&a.run, source, a.workload, identity);
    if let Some(e) = &opts.otlp_endpoint {
        if let Err(e) = trellis_proxy::check_collector(e, opts.collector_tls(), &opts.otlp_headers)
        {
            eprintln!("trellis proxy: {e}");
            return ExitCode::from(EX_USAGE);
        }
    }
    // The token's shape, as `trellis join` checks it: before it is sent anywhere.
    if let Some(e) = not_a_join_token(
        opts.identity.as_ref().and_then(|i| i.join_token.as_deref()),
        "--join-token",
    ) {
        eprintln!("trellis proxy: {e}");
        return ExitCode::from(EX_USAGE);
    }
    // Config is checked before any port is bound.
    let loaded = match trellis_proxy::load(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis proxy: invalid config: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let Some(rt) = runtime(a.run.threads, "proxy") else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let proxy = match Proxy::start(opts, loaded).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("trellis proxy: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (admin, outbound, inbound) = proxy.addrs;
        let upstreams: Vec<String> = proxy
            .bound_upstreams()
            .iter()
            .map(|(s, p, a)| format!("{s}:{p}={a}"))
            .collect();
        tracing::info!(%admin, %outbound, %inbound, upstreams = upstreams.join(","), "listening");
        match proxy.run().await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "signal handling failed");
                ExitCode::FAILURE
            }
        }
    })
}
