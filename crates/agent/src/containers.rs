//! Container discovery: containers labelled `trellis.service=NAME` become Workloads with
//! environment `container`, from a Docker Engine API socket (Docker's, or the one `podman
//! system service` serves), driven by the engine's event stream rather than polling.
//!
//! Each such container gets its own agent (`trellis join`), started from the host inside the
//! container's network namespace (`nsenter --net`), not baked into its image:
//! - images stay unchanged, and the proxy is upgraded with the host's binary;
//! - the identity's key stays in a host directory (`STATE/NAME`, mode 0700) that the
//!   container cannot read, and a restarted container of the same name rejoins with it,
//!   without a token;
//! - capture rules go into the container's namespace, where its traffic is.
//!
//! When the container dies, this process deregisters its Workload at once, signed with the
//! container's stored key from the host's namespace (the container's network is already
//! torn down, so its own agent cannot), then kills that agent.
//!
//! Upgrade in place: the same command started again (a new binary) takes over through
//! `STATE/containers.sock`. The running discovery stops restarting and managing its agents;
//! the new one starts an agent for every labelled container, each of which takes over from
//! the old agent of its container (through `STATE/NAME/handoff.sock`, as `trellis join`
//! does); the old agents exit without deregistering, and the old discovery exits once they
//! all have (within [`HANDOVER_WAIT`]), leaving nothing.
//!
//! Labels: `trellis.service` (required; also the workload's `app` label), `trellis.port`
//! (`8080`, or `http=8080,grpc=9090`), `trellis.namespace` (default `default`),
//! `trellis.identity` (default the service), `trellis.locality` (`REGION/ZONE`),
//! `trellis.check` (as `trellis join --check`), `trellis.version` (label `version`).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::{net::UnixStream, sync::mpsc};
use trellis_proxy::{
    handoff,
    identity::{self, IdentityOptions},
};

/// Why discovery stopped or a call to the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The socket could not be reached.
    #[error("container engine at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP failed, or the engine answered with an error.
    #[error("container engine {what}: {detail}")]
    Api {
        /// The call.
        what: String,
        /// Why.
        detail: String,
    },
    /// Taking over from the running discovery failed, or its socket could not be bound.
    #[error(transparent)]
    Handoff(#[from] trellis_proxy::handoff::HandoffError),
}

/// How long a discovery that a new one took over waits for its agents to be replaced; what
/// is left then stops with it (and deregisters).
pub const HANDOVER_WAIT: Duration = Duration::from_secs(60);

/// A Docker Engine API client over a unix socket.
#[derive(Clone, Debug)]
pub struct Engine {
    socket: PathBuf,
}

/// One container, as discovery needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Container {
    /// Engine id.
    pub id: String,
    /// Name, without the leading `/`.
    pub name: String,
    /// Its init process, whose network namespace the agent joins.
    pub pid: u32,
    /// Its address on its (first) network.
    pub ip: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A start or a death.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A container started.
    Start(String),
    /// A container stopped (died, was killed or stopped).
    Stop(String),
}

const API: &str = "/v1.41";

impl Engine {
    /// An engine at `unix:///path` or `/path`.
    pub fn new(url: &str) -> Self {
        Self {
            socket: PathBuf::from(url.strip_prefix("unix://").unwrap_or(url)),
        }
    }

    async fn send(&self, path: &str) -> Result<http::Response<hyper::body::Incoming>, EngineError> {
        let api = |detail: String| EngineError::Api {
            what: path.to_string(),
            detail,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| EngineError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| api(e.to_string()))?;
        tokio::spawn(conn);
        let req = http::Request::get(format!("{API}{path}"))
            .header("host", "engine")
            .body(Empty::<Bytes>::new())
            .map_err(|e| api(e.to_string()))?;
        let resp = tx.send_request(req).await.map_err(|e| api(e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            let text = body.map(|b| String::from_utf8_lossy(&b).into_owned());
            return Err(api(format!(
                "{status}: {}",
                text.unwrap_or_default().trim()
            )));
        }
        Ok(resp)
    }

    async fn get_json(&self, path: &str) -> Result<serde_json::Value, EngineError> {
        let resp = self.send(path).await?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| EngineError::Api {
                what: path.to_string(),
                detail: e.to_string(),
            })?;
        serde_json::from_slice(&body.to_bytes()).map_err(|e| EngineError::Api {
            what: path.to_string(),
            detail: e.to_string(),
        })
    }

    /// Ids of the running containers that carry `trellis.service`.
    pub async fn list(&self) -> Result<Vec<String>, EngineError> {
        let filters = url_escape(r#"{"label":["trellis.service"]}"#);
        let v = self
            .get_json(&format!("/containers/json?filters={filters}"))
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["Id"].as_str().map(str::to_string))
            .collect())
    }

    /// One container's details; `None` if it is gone or not running.
    pub async fn inspect(&self, id: &str) -> Result<Option<Container>, EngineError> {
        let v = match self.get_json(&format!("/containers/{id}/json")).await {
            Ok(v) => v,
            Err(EngineError::Api { detail, .. }) if detail.starts_with("404") => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(parse_container(&v))
    }

    /// The engine's container start and stop events, from now on. The channel closes when the
    /// stream ends (the engine restarted).
    pub async fn events(&self) -> Result<mpsc::Receiver<Event>, EngineError> {
        // Events are picked here, not by an `event` filter: podman matches that filter against
        // its own names ("died"), Docker against its ("die").
        let filters = url_escape(r#"{"type":["container"]}"#);
        let resp = self.send(&format!("/events?filters={filters}")).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut lines = Lines::default();
            let mut events = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                lines.push(&data, &mut events);
                for e in events.drain(..) {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Percent-encode a query value (the JSON of `filters`).
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The longest event line read: the rest of a longer one is skipped up to its end. An engine
/// writes a few hundred bytes per event; a broken one must not grow the agent without bound.
const MAX_EVENT_LINE: usize = 64 << 10;

/// The event stream cut into lines (one JSON object each), however its bytes arrive.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
    /// In a line that grew too long: dropped up to its end.
    skipping: bool,
}

impl Lines {
    /// Take `data`; the events of the lines it completes go to `out`.
    fn push(&mut self, data: &[u8], out: &mut Vec<Event>) {
        for piece in data.split_inclusive(|b| *b == b'\n') {
            if !self.skipping {
                self.buf.extend_from_slice(piece);
            }
            if piece.last() == Some(&b'\n') {
                if !self.skipping {
                    out.extend(parse_event(&self.buf));
                }
                self.buf.clear();
                self.skipping = false;
            } else if self.buf.len() > MAX_EVENT_LINE {
                self.buf = Vec::new();
                self.skipping = true;
            }
        }
    }
}

fn parse_event(line: &[u8]) -> Option<Event> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if v["Type"].as_str() != Some("container") {
        return None;
    }
    let id = v["Actor"]["ID"].as_str().or(v["id"].as_str())?.to_string();
    match v["Action"].as_str().or(v["status"].as_str())? {
        "start" => Some(Event::Start(id)),
        "die" | "died" | "stop" | "kill" => Some(Event::Stop(id)),
        _ => None,
    }
}

fn parse_container(v: &serde_json::Value) -> Option<Container> {
    if v["State"]["Running"].as_bool() != Some(true) {
        return None;
    }
    let labels = v["Config"]["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let ip = v["NetworkSettings"]["Networks"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|n| n["IPAddress"].as_str())
        .chain(v["NetworkSettings"]["IPAddress"].as_str())
        .find(|ip| !ip.is_empty())
        .map(str::to_string);
    Some(Container {
        id: v["Id"].as_str()?.to_string(),
        name: v["Name"].as_str()?.trim_start_matches('/').to_string(),
        pid: u32::try_from(v["State"]["Pid"].as_u64()?).ok()?,
        ip,
        labels,
    })
}

/// How containers are joined.
#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    /// The engine's socket.
    pub engine: Engine,
    /// Control planes' xDS URLs.
    pub servers: Vec<String>,
    /// The mesh's root hash, for https control planes.
    pub ca_hash: Option<String>,
    /// Join tokens by `NAMESPACE/IDENTITY` (multi-use ones: one per service).
    pub tokens: HashMap<String, String>,
    /// One sub-directory per container name holds its identity.
    pub state_dir: PathBuf,
    /// The `trellis` binary to run as each container's agent.
    pub exe: PathBuf,
    /// Extra `trellis join` flags for every container (`--capture`, `--check-interval 1s`…).
    pub join_args: Vec<String>,
    /// Where each agent's output goes (a file per container), if anywhere.
    pub log_dir: Option<PathBuf>,
}

/// What `trellis join` is given for `c`, or why the container is not joined.
pub fn join_args(c: &Container, o: &DiscoveryOptions) -> Result<Vec<String>, String> {
    let service = c
        .labels
        .get("trellis.service")
        .ok_or("no trellis.service label")?;
    let ip = c.ip.as_ref().ok_or("no IP address on any network")?;
    let mut a: Vec<String> = vec!["join".into()];
    let mut arg = |k: &str, v: &str| {
        a.push(k.to_string());
        a.push(v.to_string());
    };
    arg("--control-plane", &o.servers.join(","));
    if let Some(h) = &o.ca_hash {
        arg("--ca-hash", h);
    }
    arg(
        "--state-dir",
        &o.state_dir.join(&c.name).display().to_string(),
    );
    arg("--name", &c.name);
    arg("--label", &format!("app={service}"));
    if let Some(v) = c.labels.get("trellis.version") {
        arg("--label", &format!("version={v}"));
    }
    arg("--address", ip);
    arg("--environment", "container");
    for (i, p) in c
        .labels
        .get("trellis.port")
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let named = if p.contains('=') {
            p.to_string()
        } else if i == 0 {
            format!("http={p}")
        } else {
            format!("port{i}={p}")
        };
        arg("--port", &named);
    }
    if let Some(l) = c.labels.get("trellis.locality") {
        let (region, zone) = l.split_once('/').unwrap_or((l, ""));
        arg("--region", region);
        if !zone.is_empty() {
            arg("--zone", zone);
        }
    }
    if let Some(check) = c.labels.get("trellis.check") {
        arg("--check", check);
    }
    // An agent whose discovery process died stops with it; the next one joins anew.
    a.push("--exit-with-parent".into());
    a.extend(o.join_args.iter().cloned());
    Ok(a)
}

/// The `NAMESPACE/IDENTITY` a container joins as.
fn identity_of(c: &Container) -> String {
    let ns = c
        .labels
        .get("trellis.namespace")
        .map_or("default", String::as_str);
    let service = c.labels.get("trellis.service").map_or("", String::as_str);
    let id = c
        .labels
        .get("trellis.identity")
        .map_or(service, String::as_str);
    format!("{ns}/{id}")
}

/// A container's agent, restarted with back-off when it exits while the container runs
/// (a failed join, or an agent of a crashed discovery still holding the namespace's ports).
struct Joined {
    container: Container,
    child: Option<Child>,
    restarts: u32,
    retry_at: Option<tokio::time::Instant>,
}

impl Drop for Joined {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Join every labelled container that runs now or starts later, until the event stream ends
/// (an error: the engine went away) or `stop` resolves.
pub async fn run(
    o: DiscoveryOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), EngineError> {
    // An upgrade in place: the discovery running with this state dir stops managing its
    // agents before this one starts theirs, which take over from them.
    let path = o.state_dir.join("containers.sock");
    if let Some(prev) = handoff::take_over(&path).await? {
        let from = prev.offer.pid;
        prev.finish()?;
        tracing::info!(
            predecessor = from,
            "taking the containers over from the running discovery"
        );
    }
    let _ = std::fs::create_dir_all(&o.state_dir);
    let listener = handoff::bind(&path)
        .map_err(|e| tracing::warn!(error = %e, "upgrades in place are off"))
        .ok();
    let successor = async {
        match listener {
            Some(l) => handoff::serve(l, Default::default()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(successor);
    let mut handing: Option<tokio::time::Instant> = None;
    // Subscribe first, then list: a container that starts in between is in one or the other.
    let mut events = o.engine.events().await?;
    let mut joined: HashMap<String, Joined> = HashMap::new();
    for id in o.engine.list().await? {
        start(&o, &id, &mut joined).await;
    }
    tracing::info!(engine = %o.engine.socket.display(), containers = joined.len(), "watching containers");
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        if let Some(since) = handing {
            if joined.is_empty() || since.elapsed() > HANDOVER_WAIT {
                tracing::info!(
                    left = joined.len(),
                    "the new discovery has the containers; exiting"
                );
                // What was not replaced in time leaves, as at a stop.
                for (_, j) in joined.drain() {
                    leave(&o, j).await;
                }
                return Ok(());
            }
        }
        tokio::select! {
            r = &mut successor, if handing.is_none() => match r {
                Ok(pid) => {
                    tracing::info!(successor = pid, "a new discovery took over; its agents replace these");
                    handing = Some(tokio::time::Instant::now());
                }
                Err(e) => tracing::error!(error = %e, "the handoff socket failed; upgrades in place are off"),
            },
            // Once handed over, the new discovery follows the engine.
            e = events.recv(), if handing.is_none() => match e {
                Some(Event::Start(id)) => start(&o, &id, &mut joined).await,
                Some(Event::Stop(id)) => {
                    if let Some(j) = joined.remove(&id) {
                        leave(&o, j).await;
                    }
                }
                None => {
                    return Err(EngineError::Api {
                        what: "/events".into(),
                        detail: "the event stream ended".into(),
                    })
                }
            },
            _ = tick.tick() => match handing {
                None => supervise(&o, &mut joined),
                // Agents that exited were replaced: not restarted, not deregistered.
                Some(_) => joined.retain(|_, j| {
                    j.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
                }),
            },
            _ = &mut stop => break,
        }
    }
    for (_, j) in joined.drain() {
        leave(&o, j).await;
    }
    Ok(())
}

/// Restart agents that exited while their container runs: 1 s, 2 s, 4 s… at most 30 s apart.
fn supervise(o: &DiscoveryOptions, joined: &mut HashMap<String, Joined>) {
    let now = tokio::time::Instant::now();
    for j in joined.values_mut() {
        if let Some(c) = &mut j.child {
            match c.try_wait() {
                Ok(Some(status)) => {
                    let wait =
                        Duration::from_secs(1u64 << j.restarts.min(5)).min(Duration::from_secs(30));
                    tracing::warn!(container = %j.container.name, %status, retry_in_s = wait.as_secs(), "its agent exited");
                    j.child = None;
                    j.retry_at = Some(now + wait);
                    j.restarts += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(container = %j.container.name, error = %e, "cannot check its agent")
                }
            }
        }
        if j.child.is_none() && j.retry_at.is_some_and(|t| t <= now) {
            j.retry_at = None;
            j.child = spawn_agent(o, &j.container);
        }
    }
}

async fn start(o: &DiscoveryOptions, id: &str, joined: &mut HashMap<String, Joined>) {
    if joined.contains_key(id) {
        return;
    }
    let c = match o.engine.inspect(id).await {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(container = %id, error = %e, "cannot inspect");
            return;
        }
    };
    if !c.labels.contains_key("trellis.service") {
        return;
    }
    if let Some(child) = spawn_agent(o, &c) {
        tracing::info!(container = %c.name, ip = ?c.ip, identity = %identity_of(&c), "container joined");
        joined.insert(
            id.to_string(),
            Joined {
                container: c,
                child: Some(child),
                restarts: 0,
                retry_at: None,
            },
        );
    }
}

/// Start `trellis join` for `c` in its network namespace.
fn spawn_agent(o: &DiscoveryOptions, c: &Container) -> Option<Child> {
    let args = match join_args(c, o) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(container = %c.name, "not joined: {e}");
            return None;
        }
    };
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{}/ns/net", c.pid))
        .arg("--")
        .arg(&o.exe)
        .args(&args)
        .stdin(Stdio::null());
    match o.tokens.get(&identity_of(c)) {
        Some(t) => cmd.env("TRELLIS_JOIN_TOKEN", t),
        None => cmd.env_remove("TRELLIS_JOIN_TOKEN"),
    };
    match &o.log_dir {
        Some(d) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join(format!("{}.log", c.name)));
            match f.and_then(|f| Ok((f.try_clone()?, f))) {
                Ok((a, b)) => cmd.stdout(a).stderr(b),
                Err(_) => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
            };
        }
        None => {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        }
    }
    cmd.spawn()
        .map_err(|e| tracing::error!(container = %c.name, error = %e, "cannot start its agent"))
        .ok()
}

/// The container is gone: deregister its Workload with its stored identity, then stop its
/// agent (whose network went with the container).
async fn leave(o: &DiscoveryOptions, j: Joined) {
    let opts = IdentityOptions {
        state_dir: o.state_dir.join(&j.container.name),
        join_token: None,
        ca_hash: None,
    };
    let left = match identity::bootstrap(&opts, &o.servers).await {
        // Its container is gone already: nothing to wait for.
        Ok(creds) => crate::deregister(&o.servers, &creds, &j.container.name, Duration::ZERO).await,
        Err(e) => Err(e.to_string()),
    };
    match left {
        Ok(_) => {
            tracing::info!(container = %j.container.name, "container left: workload deregistered")
        }
        Err(e) => tracing::warn!(container = %j.container.name, error = %e, "could not deregister"),
    }
    drop(j);
}

/// The event stream read whole and in two pieces (the fuzz target): the same events either
/// way, and never more than one line's worth kept.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn check_events(data: &[u8]) {
    let (cut, data) = match data.split_first() {
        Some((&c, rest)) => (usize::from(c) * rest.len() / 256, rest),
        None => return,
    };
    let mut whole = (Lines::default(), Vec::new());
    whole.0.push(data, &mut whole.1);
    let mut two = (Lines::default(), Vec::new());
    two.0.push(&data[..cut], &mut two.1);
    assert!(two.0.buf.len() <= MAX_EVENT_LINE);
    two.0.push(&data[cut..], &mut two.1);
    assert!(whole.0.buf.len() <= MAX_EVENT_LINE && two.0.buf.len() <= MAX_EVENT_LINE);
    assert_eq!(whole.1, two.1, "the events depend on how the bytes arrived");
    for line in data.split(|b| *b == b'\n') {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
            let _ = parse_container(&v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_answers_are_read_as_docker_and_podman_write_them() {
        // Trimmed from podman 4.3's /containers/{id}/json.
        let v = serde_json::json!({
            "Id": "abc", "Name": "/catalog-c1",
            "State": { "Running": true, "Pid": 4242 },
            "Config": { "Labels": { "trellis.service": "catalog", "trellis.port": "8080",
                                    "trellis.locality": "eu-west-1/eu-west-1b" } },
            "NetworkSettings": { "IPAddress": "", "Networks": { "hybnet": { "IPAddress": "10.77.0.10" } } }
        });
        let c = parse_container(&v).unwrap();
        assert_eq!(
            (c.name.as_str(), c.pid, c.ip.as_deref()),
            ("catalog-c1", 4242, Some("10.77.0.10"))
        );
        let mut stopped = v.clone();
        stopped["State"]["Running"] = false.into();
        assert_eq!(parse_container(&stopped), None);

        let o = DiscoveryOptions {
            engine: Engine::new("unix:///run/podman.sock"),
            servers: vec!["https://10.77.0.1:7071".into()],
            ca_hash: Some("sha256:00".into()),
            tokens: HashMap::new(),
            state_dir: "/var/lib/trellis/containers".into(),
            exe: "/usr/bin/trellis".into(),
            join_args: vec!["--capture".into()],
            log_dir: None,
        };
        let a = join_args(&c, &o).unwrap().join(" ");
        for part in [
            "--state-dir /var/lib/trellis/containers/catalog-c1",
            "--label app=catalog",
            "--address 10.77.0.10 --environment container",
            "--port http=8080",
            "--region eu-west-1 --zone eu-west-1b",
            "--capture",
        ] {
            assert!(a.contains(part), "{part} in {a}");
        }
        assert_eq!(identity_of(&c), "default/catalog");

        let start = br#"{"status":"start","id":"abc","Type":"container","Action":"start","Actor":{"ID":"abc","Attributes":{"trellis.service":"catalog"}}}"#;
        assert_eq!(parse_event(start), Some(Event::Start("abc".into())));
        let die = br#"{"Type":"container","Action":"die","Actor":{"ID":"abc"}}"#;
        assert_eq!(parse_event(die), Some(Event::Stop("abc".into())));
        assert_eq!(parse_event(br#"{"Type":"image","Action":"pull"}"#), None);
        assert_eq!(
            url_escape(r#"{"a":["b"]}"#),
            "%7B%22a%22%3A%5B%22b%22%5D%7D"
        );
    }
}
