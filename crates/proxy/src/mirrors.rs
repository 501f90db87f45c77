//! The mirrors' state in a proxy (see [`crate::stages::mirror`]): a cap on copies in
//! flight, and each route's figures for the period, taken by the reporter.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use trellis_telemetry::report::Mirrored;

/// Mirrored requests in flight at once, per proxy; beyond it a copy is skipped.
pub(crate) const IN_FLIGHT: usize = 64;

/// The mirrors of this proxy: their slots and the period's figures.
pub(crate) struct Mirrors {
    slots: Arc<tokio::sync::Semaphore>,
    figures: Mutex<BTreeMap<(String, String), Mirrored>>,
}

impl Default for Mirrors {
    fn default() -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            figures: Mutex::default(),
        }
    }
}

impl Mirrors {
    /// A slot for one copy in flight, if one is free.
    pub(crate) fn slot(
        &self,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::TryAcquireError> {
        self.slots.clone().try_acquire_owned()
    }

    /// Change the figures of `route`'s mirror to `mirror`.
    pub(crate) fn with(
        &self,
        route: &str,
        service: &str,
        mirror: &str,
        f: impl FnOnce(&mut Mirrored),
    ) {
        let mut g = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a proxy has a few routes with mirrors, not thousands.
        if g.len() >= 256 && !g.contains_key(&(route.to_string(), mirror.to_string())) {
            return;
        }
        let m = g
            .entry((route.to_string(), mirror.to_string()))
            .or_insert_with(|| Mirrored {
                route: route.into(),
                service: service.into(),
                mirror: mirror.into(),
                ..Default::default()
            });
        f(m);
    }

    /// A copy not sent.
    pub(crate) fn skipped(&self, route: &str, service: &str, mirror: &str) {
        self.with(route, service, mirror, |m| m.skipped += 1);
    }

    /// The period's figures, taken.
    pub(crate) fn take(&self) -> Vec<Mirrored> {
        let mut g = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *g).into_values().collect()
    }
}
