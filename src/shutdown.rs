//! The shutdown trigger shared by every thread: a count of stop requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts stop requests (SIGINT/SIGTERM, or an internal failure). The first
/// asks for a graceful stop; a second one while stopping means "get out now".
///
/// It is polled, so every blocking call in a loop that watches it has a
/// timeout.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Incremented by signal handlers, so it must stay a bare atomic.
    requests: Arc<AtomicUsize>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter signal handlers increment (see `main`).
    pub fn counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.requests)
    }

    /// Asks for a stop, as a signal would.
    pub fn trigger(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
    }

    /// True once any stop was requested.
    pub fn requested(&self) -> bool {
        self.requests.load(Ordering::SeqCst) >= 1
    }

    /// True once a second stop was requested: abandon slow work.
    pub fn forced(&self) -> bool {
        self.requests.load(Ordering::SeqCst) >= 2
    }
}
