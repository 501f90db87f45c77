//! `trellis join`: flags and the workload file into [`trellis_agent::AgentOptions`], or a
//! systemd unit that runs the same command.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use crate::{ca_hash_arg, proxy_options, runtime, xds_urls, DurationValue, RunArgs};

#[derive(clap::Args)]
#[command(args_override_self = true)]
pub(crate) struct JoinArgs {
    /// The control planes' xDS addresses (URLs; comma-separated or repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    control_plane: Vec<String>,
    /// Join token, for the first start only: a restart reuses the identity in --state-dir.
    #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The mesh's root, `sha256:HEX`, for a control plane reached over TLS (https://).
    #[arg(long, env = "TRELLIS_CA_HASH", value_parser = ca_hash_arg)]
    ca_hash: Option<[u8; 32]>,
    /// Where the identity is kept (key, certificate, bundle; mode 0600).
    #[arg(long, default_value = "/var/lib/trellis")]
    state_dir: PathBuf,
    /// A Workload resource (YAML) giving name, labels and spec; the flags below override it.
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Workload name (default: the file's, else the host name).
    #[arg(long)]
    name: Option<String>,
    /// A label, KEY=VALUE (repeat); services select the workload by these.
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// The address peers reach this host at.
    #[arg(long)]
    address: Option<IpAddr>,
    /// bare-metal, vm or container.
    #[arg(long)]
    environment: Option<String>,
    /// Locality: region.
    #[arg(long)]
    region: Option<String>,
    /// Locality: zone.
    #[arg(long)]
    zone: Option<String>,
    /// The application's port for a service port name, NAME=PORT (repeat).
    #[arg(long = "port", value_parser = key_value)]
    ports: Vec<(String, String)>,
    /// How the application is checked: `http:/PATH`, `tcp`, `grpc[:SERVICE]` (the gRPC
    /// health protocol) or `none`.
    #[arg(long, default_value = "tcp")]
    check: String,
    /// The port checked (default: the first --port).
    #[arg(long)]
    check_port: Option<u16>,
    /// How often the application is checked and a heartbeat sent.
    #[arg(long, default_value = "5s")]
    check_interval: DurationValue,
    /// Time allowed for one check.
    #[arg(long, default_value = "2s")]
    check_timeout: DurationValue,
    /// Passes in a row before the workload is healthy.
    #[arg(long, default_value_t = 1)]
    healthy_threshold: u32,
    /// Failures in a row before it is unhealthy.
    #[arg(long, default_value_t = 3)]
    unhealthy_threshold: u32,
    /// Print a systemd unit that runs this same command, and exit.
    #[arg(long)]
    print_systemd_unit: bool,
    /// Capture the workload's traffic with iptables rules in this network namespace:
    /// outbound TCP to the proxy, TCP to its ports to the inbound listener, DNS to the
    /// agent's resolver. Needs root (CAP_NET_ADMIN); the rules go when the agent stops.
    /// IPv6 too (ip6tables) when the namespace has IPv6.
    #[arg(long)]
    capture: bool,
    /// With --capture: leave IPv6 alone even when the namespace has it (for a kernel
    /// without ip6tables' nat table). IPv6 traffic then goes around the proxy.
    #[arg(long, requires = "capture")]
    no_ipv6_capture: bool,
    /// Stop (and deregister) when the parent process exits; `trellis containers` starts its
    /// agents so.
    #[arg(long, hide = true)]
    exit_with_parent: bool,
    /// With --capture: print the rules (iptables-restore input) and exit.
    #[arg(long, requires = "capture")]
    dry_run: bool,
    /// Answer DNS for NAME.NAMESPACE.mesh on this address, UDP and TCP (with --capture the default
    /// is 127.0.0.1:15053, where DNS is redirected).
    #[arg(long)]
    dns: Option<std::net::SocketAddr>,
    /// Where the resolver sends other names (default: the first nameserver of
    /// /etc/resolv.conf).
    #[arg(long)]
    dns_upstream: Option<std::net::SocketAddr>,
    #[command(flatten)]
    run: RunArgs,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Name, labels and spec: the file's, then the flags'.
fn workload(a: &JoinArgs) -> Result<(String, serde_json::Value, serde_json::Value), String> {
    let (mut name, mut labels, mut spec) = (None, serde_json::json!({}), serde_json::json!({}));
    if let Some(path) = &a.workload {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
        let docs = trellis_model::parse_documents(&file, &text).map_err(|e| e.to_string())?;
        let [r] = docs.as_slice() else {
            return Err(format!(
                "{file}: expected one Workload, found {} documents",
                docs.len()
            ));
        };
        let trellis_model::resource::Spec::Workload(w) = &r.spec else {
            return Err(format!("{file}: expected a Workload, found a {}", r.kind()));
        };
        name = Some(r.metadata.name.clone());
        labels = serde_json::to_value(&r.metadata.labels).map_err(|e| e.to_string())?;
        spec = serde_json::to_value(w).map_err(|e| e.to_string())?;
        if let Some(o) = spec.as_object_mut() {
            // Null fields are left out: the control plane fills what the agent owns.
            o.retain(|_, v| !v.is_null());
        }
    }
    for (k, v) in &a.labels {
        labels[k] = v.clone().into();
    }
    if let Some(ip) = a.address {
        spec["address"] = ip.to_string().into();
    }
    if let Some(e) = &a.environment {
        spec["environment"] = e.clone().into();
    }
    if let Some(r) = &a.region {
        spec["locality"]["region"] = r.clone().into();
    }
    if let Some(z) = &a.zone {
        spec["locality"]["zone"] = z.clone().into();
    }
    for (k, v) in &a.ports {
        let p: u16 = v
            .parse()
            .map_err(|_| format!("--port {k}={v}: not a port"))?;
        spec["ports"][k] = p.into();
    }
    if spec.get("address").is_none() {
        return Err(
            "the workload's address is needed: --address, or spec.address in --workload".into(),
        );
    }
    let name = a.name.clone().or(name).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into())
    });
    Ok((name, labels, spec))
}

fn health(a: &JoinArgs, spec: &serde_json::Value) -> Result<trellis_agent::Health, String> {
    let address: IpAddr = spec["address"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or("spec.address: not an IP address")?;
    // The application listens next to the agent: on loopback unless its address is itself
    // a loopback one (several workloads on one host, tests).
    let ip = if address.is_loopback() {
        address
    } else {
        IpAddr::from([127, 0, 0, 1])
    };
    let port = a.check_port.or_else(|| {
        spec["ports"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(|v| v.as_u64())
            .map(|p| p as u16)
    });
    let at = || {
        port.map(|p| std::net::SocketAddr::new(ip, p))
            .ok_or("a check needs a port: --check-port or --port NAME=PORT")
    };
    let check = match a.check.as_str() {
        "none" => trellis_agent::Check::None,
        "tcp" => trellis_agent::Check::Tcp(at()?),
        c if c == "grpc" || c.starts_with("grpc:") => trellis_agent::Check::Grpc {
            addr: at()?,
            service: c.strip_prefix("grpc:").unwrap_or_default().to_string(),
        },
        c => match c.strip_prefix("http:") {
            Some(path) if path.starts_with('/') => trellis_agent::Check::Http {
                addr: at()?,
                path: path.to_string(),
            },
            _ => {
                return Err(format!(
                    "--check {c:?}: expected http:/PATH, tcp, grpc[:SERVICE] or none"
                ))
            }
        },
    };
    Ok(trellis_agent::Health {
        check,
        interval: a.check_interval.0,
        timeout: a.check_timeout.0,
        healthy_threshold: a.healthy_threshold,
        unhealthy_threshold: a.unhealthy_threshold,
    })
}

/// The mark capture rules let pass, unless --socket-mark says otherwise.
const DEFAULT_MARK: u32 = 0x539;

/// Capture rules (listener ports as the flags give them; the agent puts in the bound ones)
/// and the resolver's options.
fn capture_and_dns(
    a: &JoinArgs,
    spec: &serde_json::Value,
) -> (
    Option<trellis_agent::capture::CaptureOptions>,
    Option<trellis_agent::dns::DnsOptions>,
) {
    let mark = a.run.socket_mark.unwrap_or(DEFAULT_MARK);
    let listen = a
        .dns
        .or_else(|| a.capture.then(|| ([127, 0, 0, 1], 15053).into()));
    let dns = listen.map(|listen| trellis_agent::dns::DnsOptions {
        listen,
        upstream: a.dns_upstream.or_else(|| {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            trellis_agent::dns::resolv_conf_upstream(&text)
        }),
        mark: a.capture.then_some(mark),
    });
    let capture = a.capture.then(|| {
        let mut app_ports: Vec<u16> = spec["ports"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_u64())
                    .map(|p| p as u16)
                    .collect()
            })
            .unwrap_or_default();
        app_ports.sort_unstable();
        app_ports.dedup();
        // The control planes: the agent's own calls to them are not marked.
        let exclude = a
            .control_plane
            .iter()
            .filter_map(|u| {
                let hostport = u.split("://").last()?.split('/').next()?;
                std::net::ToSocketAddrs::to_socket_addrs(hostport).ok()
            })
            .flatten()
            .collect();
        trellis_agent::capture::CaptureOptions {
            mark,
            app_ports,
            outbound_port: a.run.outbound.port(),
            inbound_port: a.run.inbound.port(),
            dns_port: dns.as_ref().map(|d| d.listen.port()),
            exclude,
            ipv6: !a.no_ipv6_capture && trellis_agent::capture::ipv6_present(),
            route: spec["address"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .map(|a| {
                    let (net, bits) = trellis_control::VIRTUAL_IP_RANGE;
                    (format!("{net}/{bits}"), a)
                }),
        }
    });
    (capture, dns)
}

/// A systemd unit running this command: the token is not in it (it is needed once, from
/// an environment file, and the state dir carries the identity after that).
fn systemd_unit(name: &str) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/usr/local/bin/trellis".into());
    let mut args = Vec::new();
    let mut skip = false;
    for a in std::env::args().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.as_str() {
            "--print-systemd-unit" => {}
            "--token" => skip = true,
            _ if a.starts_with("--token=") => {}
            _ => args.push(if a.contains(char::is_whitespace) {
                format!("\"{a}\"")
            } else {
                a
            }),
        }
    }
    format!(
        "[Unit]\nDescription=Trellis agent for workload {name}\nWants=network-online.target\nAfter=network-online.target\n\n[Service]\n# READY=1 once the proxy serves; an upgrade's new process says MAINPID= itself.\nType=notify\nNotifyAccess=all\n# The join token, for the first start only: TRELLIS_JOIN_TOKEN=trellis-join....\nEnvironmentFile=-/etc/trellis/join.env\nExecStart={exe} {}\n# Upgrade in place: replace the binary, then `systemctl reload`; the agent starts the new\n# one, which takes its listeners over, and drains.\nExecReload=/bin/kill -USR2 $MAINPID\nRestart=always\nRestartSec=2\nKillSignal=SIGTERM\nTimeoutStopSec=40\n\n[Install]\nWantedBy=multi-user.target\n",
        args.join(" ")
    )
}

pub(crate) fn join(a: JoinArgs) -> ExitCode {
    let (name, labels, spec) = match workload(&a) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("trellis join: {e}");
            return ExitCode::from(crate::EX_USAGE);
        }
    };
    if a.print_systemd_unit {
        print!("{}", systemd_unit(&name));
        return ExitCode::SUCCESS;
    }
    let (capture, dns) = capture_and_dns(&a, &spec);
    if a.dry_run {
        if let Some(c) = &capture {
            println!("# iptables-restore --noflush");
            print!("{}", c.rules());
            if c.ipv6 {
                println!("# ip6tables-restore --noflush");
                print!("{}", c.rules_v6());
            }
            if let Some((range, address)) = &c.route {
                println!("# and, when nothing routes {range}: ip route add {range} dev <the interface holding {address}> proto 217");
            }
        }
        return ExitCode::SUCCESS;
    }
    let health = match health(&a, &spec) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("trellis join: {e}");
            return ExitCode::from(crate::EX_USAGE);
        }
    };
    let labels = labels
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let identity = trellis_proxy::identity::IdentityOptions {
        state_dir: a.state_dir.clone(),
        join_token: a.token.clone(),
        ca_hash: a.ca_hash,
    };
    let servers = xds_urls(&a.control_plane);
    // The agent fills in the proxy's source and workload once it knows its namespace.
    let placeholder = trellis_proxy::Source::Xds(trellis_proxy::xds::XdsOptions {
        servers: servers.clone(),
        node_id: String::new(),
        workload: None,
        identity: None,
    });
    let mut proxy = proxy_options(&a.run, placeholder, None, None);
    // The span collector's settings are checked before the join token is spent.
    if let Some(e) = &proxy.otlp_endpoint {
        if let Err(e) =
            trellis_proxy::check_collector(e, proxy.collector_tls(), &proxy.otlp_headers)
        {
            eprintln!("trellis join: {e}");
            return ExitCode::from(crate::EX_USAGE);
        }
    }
    // The token's shape, last of the flags: the unit and the dry run do not carry it.
    if let Some(e) = crate::not_a_join_token(a.token.as_deref(), "--token") {
        eprintln!("trellis join: {e}");
        return ExitCode::from(crate::EX_USAGE);
    }
    // Upgrades in place by default: the same command run again (a new binary) takes over.
    // A Unix socket's path is limited to 107 bytes; a longer state dir goes without.
    let handoff = a.state_dir.join("handoff.sock");
    if proxy.handoff.is_none() && handoff.as_os_str().len() < 100 {
        proxy.handoff = Some(handoff);
    }
    // Its successor would stop with this process: a discovery upgrades its agents itself.
    proxy.upgrade_on_usr2 = !a.exit_with_parent;
    if let Some(c) = &capture {
        proxy.socket_mark = Some(c.mark);
        proxy.ipv6_capture = c.ipv6;
    }
    let opts = trellis_agent::AgentOptions {
        servers,
        name,
        labels,
        spec,
        identity,
        proxy,
        health,
        capture,
        dns,
    };
    let Some(rt) = runtime(a.run.threads, "join") else {
        return ExitCode::FAILURE;
    };
    let run = async {
        if a.exit_with_parent {
            trellis_agent::run_until(opts, trellis_agent::parent_exited()).await
        } else {
            trellis_agent::run(opts).await
        }
    };
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis join: cannot join: {e}");
            ExitCode::FAILURE
        }
    }
}
