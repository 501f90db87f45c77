//! Labels shared by every request that carries them: built once per config, cloned by a
//! reference count, compared by identity where it is hot (metrics and summaries).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelValue;

/// A label value shared by every request that carries it: built once per config (service,
/// workload, route), cloned per request by a reference count. Empty means "unknown".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Label(Option<Arc<str>>);

impl Label {
    /// The value, or "unknown".
    pub(crate) fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("unknown")
    }

    /// The value, if known.
    pub(crate) fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// Identity of the shared value (0 for "unknown").
    pub(crate) fn addr(&self) -> usize {
        self.0
            .as_ref()
            .map_or(0, |a| Arc::as_ptr(a).cast::<u8>() as usize)
    }

    pub(crate) fn same(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl From<Arc<str>> for Label {
    fn from(s: Arc<str>) -> Self {
        Self(Some(s))
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Self(Some(s.into()))
    }
}

impl EncodeLabelValue for Label {
    fn encode(
        &self,
        e: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(e, self.as_str())
    }
}

impl serde::Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Traffic direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum Direction {
    /// From the local workload to a service.
    outbound,
    /// From a peer to the local workload.
    inbound,
}

impl Direction {
    /// Name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::outbound => "outbound",
            Self::inbound => "inbound",
        }
    }
}
