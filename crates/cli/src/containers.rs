//! `trellis containers`: join the containers of a Docker or Podman engine to the mesh, each
//! with its own agent in its network namespace (see `trellis_agent::containers`).

use std::{collections::HashMap, path::PathBuf, process::ExitCode};

use crate::{runtime, xds_urls};

#[derive(clap::Args)]
pub(crate) struct ContainersArgs {
    /// The engine's Docker API socket (`podman system service` serves one too).
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    engine: String,
    /// The control planes' xDS addresses (URLs; comma-separated or repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    control_plane: Vec<String>,
    /// The mesh's root, `sha256:HEX`, for a control plane reached over TLS (https://).
    #[arg(long, env = "TRELLIS_CA_HASH")]
    ca_hash: Option<String>,
    /// A join token for the containers of one identity, `NAMESPACE/IDENTITY=TOKEN` (repeat;
    /// create it with `--uses` for as many containers as may start). A container that has
    /// joined once needs none again.
    #[arg(long = "token", value_parser = identity_token, hide_env_values = true)]
    tokens: Vec<(String, String)>,
    /// Where each container's identity is kept, one directory per container name.
    #[arg(long, default_value = "/var/lib/trellis/containers")]
    state_dir: PathBuf,
    /// Write each container agent's log to DIR/NAME.log (default: this process's output).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Capture each container's traffic (iptables in its network namespace).
    #[arg(long)]
    capture: bool,
    /// One more `trellis join` flag for every container, e.g. `--join-arg=--check-interval=1s`.
    #[arg(long = "join-arg", allow_hyphen_values = true)]
    join_args: Vec<String>,
}

fn identity_token(s: &str) -> Result<(String, String), String> {
    let (id, token) = s
        .split_once('=')
        .ok_or("expected NAMESPACE/IDENTITY=TOKEN")?;
    if !id.contains('/') {
        return Err(format!("{id:?}: expected NAMESPACE/IDENTITY"));
    }
    Ok((id.to_string(), token.to_string()))
}

pub(crate) fn containers(a: ContainersArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("trellis containers: cannot find its own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut join_args = a.join_args.clone();
    if a.capture {
        join_args.push("--capture".into());
    }
    let opts = trellis_agent::containers::DiscoveryOptions {
        engine: trellis_agent::containers::Engine::new(&a.engine),
        servers: xds_urls(&a.control_plane),
        ca_hash: a.ca_hash.clone(),
        tokens: a.tokens.iter().cloned().collect::<HashMap<_, _>>(),
        state_dir: a.state_dir.clone(),
        exe,
        join_args,
        log_dir: a.log_dir.clone(),
    };
    let Some(rt) = runtime(1, "containers") else {
        return ExitCode::FAILURE;
    };
    let stop = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    match rt.block_on(trellis_agent::containers::run(opts, stop)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "container discovery stopped");
            ExitCode::FAILURE
        }
    }
}
