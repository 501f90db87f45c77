//! Graceful drain: a signal that tells connections to finish, and a count of those still open.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::sync::{watch, Notify};

/// Shared drain state.
pub(crate) struct Drain {
    tx: watch::Sender<bool>,
    /// Set before `tx` says so: read on every request ([`Self::draining`], [`IdleEnds`])
    /// without the watch's lock.
    started: Arc<AtomicBool>,
    active: Arc<Counts>,
    /// A successor took the listeners over (an upgrade in place): see [`Drain::idle_ends`].
    handed: watch::Sender<bool>,
}

/// How long, in a drain after an upgrade's handover, an idle HTTP/1.1 connection waits for
/// a last request (answered with `connection: close`) before it is closed: a client that
/// sends one then goes to the new process for the next without a failed request, where a
/// connection closed at once races the client's next request.
pub(crate) const HANDOVER_IDLE_GRACE: Duration = Duration::from_secs(2);

/// What a drain waits for: open connections, and accept loops still running.
#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    accepting: AtomicUsize,
    none_left: Notify,
}

/// Held by each open connection ([`Drain::track`]) and by each accept loop
/// ([`Drain::accepting`]).
pub(crate) struct Active {
    counts: Arc<Counts>,
    loop_: bool,
}

impl Active {
    fn count(&self) -> &AtomicUsize {
        if self.loop_ {
            &self.counts.accepting
        } else {
            &self.counts.connections
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.count().fetch_sub(1, Ordering::AcqRel) == 1 {
            self.counts.none_left.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            tx: watch::channel(false).0,
            started: Arc::default(),
            active: Arc::default(),
            handed: watch::channel(false).0,
        }
    }
}

impl Drain {
    /// Count a connection. An accept loop counts each connection it accepts before it
    /// hands it to a task, so a drain never misses a connection whose task has not run yet.
    pub(crate) fn track(&self) -> Active {
        self.guard(false)
    }

    /// Count an accept loop: a drain ends only once every loop stopped accepting, after
    /// it counted ([`Self::track`]) every connection it took.
    pub(crate) fn accepting(&self) -> Active {
        self.guard(true)
    }

    fn guard(&self, loop_: bool) -> Active {
        let active = Active {
            counts: self.active.clone(),
            loop_,
        };
        active.count().fetch_add(1, Ordering::AcqRel);
        active
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
    pub(crate) fn idle_ends(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut signal = self.signal();
        let handed = self.handed.subscribe();
        IdleEnds {
            started: self.started.clone(),
            armed: None,
            ends: Box::pin(async move {
                let _ = signal.wait_for(|d| *d).await;
                if *handed.borrow() {
                    tokio::time::sleep(HANDOVER_IDLE_GRACE).await;
                }
            }),
        }
    }

    /// Whether draining started.
    pub(crate) fn draining(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Start draining and wait until every accept loop stopped and every connection
    /// closed.
    pub(crate) async fn drain(&self) {
        self.started.store(true, Ordering::Release);
        self.tx.send_replace(true);
        loop {
            let notified = self.active.none_left.notified();
            if self.active.accepting.load(Ordering::Acquire) == 0 && self.active() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Open connections.
    pub(crate) fn active(&self) -> usize {
        self.active.connections.load(Ordering::Acquire)
    }
}

/// [`Drain::idle_ends`]: an idle connection polls it each time it waits for a request. The
/// watch behind it keeps the task's waker from the first poll until the drain starts (a
/// connection's task does not change), so until then a poll with that same waker is only a
/// flag's load rather than the watch's lock and a new registration: ~350 instructions per
/// request on each proxy.
struct IdleEnds {
    started: Arc<AtomicBool>,
    /// The waker the watch holds, once a poll left it there.
    armed: Option<Waker>,
    ends: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Future for IdleEnds {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let same_waker = self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same_waker && !self.started.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        let polled = self.ends.as_mut().poll(cx);
        if polled.is_pending() && !same_waker {
            self.armed = Some(cx.waker().clone());
        }
        polled
    }
}

#[cfg(test)]
mod tests;
