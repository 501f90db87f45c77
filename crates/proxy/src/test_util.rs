//! Helpers for the crate's unit tests.

/// The snapshot a proxy serving `local` would build from `yaml`.
pub(crate) fn snapshot(yaml: &str, local: Option<&str>) -> crate::snapshot::Snapshot {
    let res = trellis_model::parse_documents("test.yaml", yaml).expect("test YAML parses");
    let local = local.map(|l| l.parse().expect("NAMESPACE/NAME"));
    let cfg = trellis_model::translate("test.yaml", &res, local.as_ref()).expect("translates");
    let mut reg = prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::Metrics::register(&mut reg);
    crate::snapshot::Snapshot::build(cfg, None, &metrics, true)
}

/// A connection slot of a cluster allowing one connection (not counted anywhere).
pub(crate) fn slot() -> crate::slot::Slot {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    crate::slot::Slot::new(
        slots.try_acquire_owned().expect("a free slot"),
        Default::default(),
    )
}

/// What a test's access log received.
#[derive(Clone, Default)]
pub(crate) struct Sink(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("sink").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    /// The lines written, parsed.
    pub(crate) fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().expect("sink").clone())
            .expect("UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect()
    }
}

/// A proxy's shared state over `yaml` (serving `local`), its access log into a sink.
pub(crate) fn shared(
    yaml: &str,
    local: Option<&str>,
) -> (std::sync::Arc<crate::shared::Shared>, Sink) {
    use std::sync::Arc;
    let snap = snapshot(yaml, local);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::Metrics::register(&mut registry);
    let sink = Sink::default();
    let log = crate::access_log::AccessLog::to(Some(Box::new(sink.clone())), Default::default());
    let shared = crate::shared::Shared {
        state: arc_swap::ArcSwap::from_pointee(snap),
        telemetry: Arc::new(crate::telemetry::Telemetry {
            metrics: metrics.clone(),
            log,
            taps: Default::default(),
            spans: None,
            trace_sampling: 0.0,
        }),
        dialer: Arc::new(crate::pool::Dialer {
            metrics,
            tls: None,
            mark: None,
        }),
        registry,
        drain: Default::default(),
        source: "test".into(),
        synced: tokio::sync::watch::Sender::new(true),
        xds_status: Default::default(),
        identity: None,
        inbound_tls: Default::default(),
        mtls_mode: None,
        peer_labels: Default::default(),
        host: Default::default(),
        adaptive: Default::default(),
        demand: None,
    };
    (Arc::new(shared), sink)
}

/// Wait until `cond` holds, for at most ten seconds (then panic), yielding between tries.
pub(crate) async fn eventually_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
