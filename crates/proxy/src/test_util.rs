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
