//! Counters every thread adds to and the stats and shutdown lines read.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::reading::Rejection;

/// The daemon's running totals. Readings and datagrams are counted
/// separately: one datagram may carry an array of readings.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Datagrams taken from the socket from allowed sources.
    pub received: AtomicU64,
    /// Datagrams dropped because their source is not in `--allow`.
    pub denied: AtomicU64,
    /// Valid readings handed to the persister.
    pub accepted: AtomicU64,
    /// Invalid readings; an unparseable datagram counts as one.
    pub rejected: AtomicU64,
    /// Rejections by reason, indexed by `Rejection::index`.
    pub rejected_by_reason: [AtomicU64; Rejection::KINDS],
    /// Readings sitting in the channel between receiver and persister.
    pub queued: AtomicU64,
    /// Readings committed this run, final flush included.
    pub persisted: AtomicU64,
    /// Readings committed by the final flush at shutdown.
    pub flushed_at_shutdown: AtomicU64,
    /// Readings written to the spill file at shutdown.
    pub spilled: AtomicU64,
}

/// A point-in-time copy of the ledger, plus the socket's kernel drop counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub received: u64,
    pub denied: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub queued: u64,
    pub persisted: u64,
    pub flushed_at_shutdown: u64,
    pub spilled: u64,
    /// Datagrams the kernel dropped on our socket (Linux only; 0 elsewhere).
    pub kernel_drops: u64,
}

impl Ledger {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn count_rejection(&self, rejection: Rejection) {
        Self::add(&self.rejected, 1);
        Self::add(&self.rejected_by_reason[rejection.index()], 1);
    }

    pub fn snapshot(&self, kernel_drops: u64) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            received: get(&self.received),
            denied: get(&self.denied),
            accepted: get(&self.accepted),
            rejected: get(&self.rejected),
            queued: get(&self.queued),
            persisted: get(&self.persisted),
            flushed_at_shutdown: get(&self.flushed_at_shutdown),
            spilled: get(&self.spilled),
            kernel_drops,
        }
    }
}

impl fmt::Display for Counts {
    /// The periodic stats line's counters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received={} accepted={} rejected={} denied={} persisted={} queued={} kernel_drops={}",
            self.received,
            self.accepted,
            self.rejected,
            self.denied,
            self.persisted,
            self.queued,
            self.kernel_drops
        )
    }
}
