//! Graceful drain: a signal that tells connections to finish, and a count of those still open.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::{watch, Notify};

/// Shared drain state.
pub(crate) struct Drain {
    tx: watch::Sender<bool>,
    active: Arc<(AtomicUsize, Notify)>,
    /// A successor took the listeners over (an upgrade in place): see [`Drain::idle_ends`].
    handed: watch::Sender<bool>,
}

/// How long, in a drain after an upgrade's handover, an idle HTTP/1.1 connection waits for
/// a last request (answered with `connection: close`) before it is closed: a client that
/// sends one then goes to the new process for the next without a failed request, where a
/// connection closed at once races the client's next request.
pub(crate) const HANDOVER_IDLE_GRACE: Duration = Duration::from_secs(2);

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
            handed: watch::channel(false).0,
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

    /// A successor took the listeners over: the drain that follows gives idle connections
    /// [`HANDOVER_IDLE_GRACE`].
    pub(crate) fn hand_over(&self) {
        self.handed.send_replace(true);
    }

    /// Completes once a successor took the listeners over.
    pub(crate) fn handed_over(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut handed = self.handed.subscribe();
        async move {
            let _ = handed.wait_for(|h| *h).await;
        }
    }

    /// Completes when an idle kept-alive connection is to be closed: when draining starts,
    /// or [`HANDOVER_IDLE_GRACE`] later after a handover.
    pub(crate) fn idle_ends(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut signal = self.signal();
        let handed = self.handed.subscribe();
        async move {
            let _ = signal.wait_for(|d| *d).await;
            if *handed.borrow() {
                tokio::time::sleep(HANDOVER_IDLE_GRACE).await;
            }
        }
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
