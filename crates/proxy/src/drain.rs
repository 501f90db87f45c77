//! Graceful drain: a signal that tells connections to finish, and a count of those still open.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::{watch, Notify};

/// Shared drain state.
pub(crate) struct Drain {
    tx: watch::Sender<bool>,
    active: Arc<(AtomicUsize, Notify)>,
}

/// Held by each open connection.
pub(crate) struct Active(Arc<(AtomicUsize, Notify)>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0 .0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0 .1.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            tx: watch::channel(false).0,
            active: Arc::new((AtomicUsize::new(0), Notify::new())),
        }
    }
}

impl Drain {
    /// Count a connection.
    pub(crate) fn track(&self) -> Active {
        self.active.0.fetch_add(1, Ordering::AcqRel);
        Active(self.active.clone())
    }

    /// A receiver that changes when draining starts.
    pub(crate) fn signal(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Whether draining started.
    pub(crate) fn draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Start draining and wait until every connection closed.
    pub(crate) async fn drain(&self) {
        self.tx.send_replace(true);
        loop {
            let notified = self.active.1.notified();
            if self.active.0.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Open connections.
    pub(crate) fn active(&self) -> usize {
        self.active.0.load(Ordering::Acquire)
    }
}
