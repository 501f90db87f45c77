//! What the control plane follows of the store: the catalog, and what it compiled from it.

use std::sync::Arc;

use crate::catalog::{Catalog, Compiled};

/// The catalog and what was compiled from it, at one revision.
pub(crate) struct State {
    /// Every resource.
    pub(crate) catalog: Catalog,
    /// What proxies get.
    pub(crate) compiled: Arc<Compiled>,
}
