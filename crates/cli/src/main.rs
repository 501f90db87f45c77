//! `trellis`: one binary, one subcommand per part of the mesh. This file only parses flags,
//! loads config, builds the runtime and hands over.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use trellis_model::{resource::NamespacedName, value::DurationValue};
use trellis_proxy::{http::server::ServerLimits, Options, Proxy};

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
    /// Run the data-plane proxy.
    Proxy(ProxyArgs),
}

#[derive(clap::Args)]
// A later flag wins, so wrappers and tests can override defaults they also pass.
#[command(args_override_self = true)]
struct ProxyArgs {
    /// Resource file (multi-document YAML).
    #[arg(long, env = "TRELLIS_CONFIG")]
    config: PathBuf,
    /// The workload this proxy serves, NAMESPACE/NAME.
    #[arg(long)]
    workload: Option<NamespacedName>,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match cli.cmd {
        Cmd::Proxy(args) => proxy(args),
    }
}

fn proxy(a: ProxyArgs) -> ExitCode {
    let opts = Options {
        config: a.config,
        workload: a.workload,
        admin: a.admin,
        outbound: a.outbound,
        inbound: a.inbound,
        drain_timeout: a.drain_timeout.0,
        watch_interval: a.watch_interval.0.max(Duration::from_millis(10)),
        limits: ServerLimits {
            header_read_timeout: a.header_read_timeout.0,
            max_header_bytes: a.max_header_bytes,
            idle_timeout: a.idle_timeout.0,
        },
        access_log: !a.no_access_log,
    };
    // Config is checked before any port is bound.
    let loaded = match trellis_proxy::load(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis proxy: invalid config: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let rt = if a.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis proxy: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let proxy = match Proxy::start(opts, loaded).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
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
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "signal handling failed");
                ExitCode::FAILURE
            }
        }
    })
}
