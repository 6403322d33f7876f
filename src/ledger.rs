//! Counters every thread adds to and the stats and shutdown lines read.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::reading::Rejection;

/// `1 reading`, `2 readings`: a count and its noun, for messages.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

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
    /// Readings committed this run, final flush included.
    pub persisted: AtomicU64,
    /// Readings committed by the final flush at shutdown.
    pub flushed_at_shutdown: AtomicU64,
    /// Readings written to the spill file at shutdown.
    pub spilled: AtomicU64,
    /// Readings the database refused for good, in the dead-letter file.
    pub dead_letter: AtomicU64,
    /// Readings that could be neither committed nor written to a file.
    pub lost: AtomicU64,
    /// Sequenced readings already stored or queued, not stored again.
    pub duplicates: AtomicU64,
    /// Sequenced readings older than their stream's duplicate window, not
    /// stored (`delivery::WINDOW`).
    pub late: AtomicU64,
    /// Datagrams read at a stop beyond what the drain keeps, and dropped
    /// unparsed (see `receiver`); part of `unread`.
    pub discarded: AtomicU64,
    /// The socket's kernel drop counter when the stop began, plus one: from
    /// then on a socket filter turns datagrams away, and the kernel counts
    /// them as drops, which the shutdown line reports as `unread`. Zero
    /// while running.
    pub drops_at_stop: AtomicU64,
    /// The fullest the socket's receive buffer was seen since the last
    /// stats line, in thousandths (sampled before each read).
    pub buffer_peak: AtomicU64,
    /// The same over the whole run.
    pub buffer_peak_run: AtomicU64,
    /// Readings deleted by `--retain`.
    pub expired: AtomicU64,
    /// Spill files imported at start (0 or 1: one spill path per run).
    pub spill_files_replayed: AtomicU64,
    /// Batch commits, how long each took, and when the last one ended:
    /// written by the persister once per commit, read by `/metrics`.
    pub commits: CommitLog,
    /// Set by the server when a worker thread ended unexpectedly, so
    /// `/health` can say why the daemon is stopping.
    pub worker_stopped: AtomicBool,
}

/// Upper bounds of the commit duration histogram, in seconds: a batch of
/// a few thousand readings takes milliseconds, a quarter million on a slow
/// SD card seconds, and a busy database up to `--busy-timeout`.
pub const COMMIT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The persister's record of its commits: a few atomics, written once per
/// batch, never per reading.
#[derive(Debug, Default)]
pub struct CommitLog {
    /// Batches the persister committed (the final flush is not one).
    pub ok: AtomicU64,
    /// Attempts to commit a batch that failed (each retry counts).
    pub failed: AtomicU64,
    /// Commits per bucket of `COMMIT_BUCKETS` (not cumulative); the last
    /// slot is beyond the largest bound.
    pub buckets: [AtomicU64; COMMIT_BUCKETS.len() + 1],
    /// Total time of the committed attempts, in microseconds.
    pub micros: AtomicU64,
    /// When the last commit ended, unix milliseconds; 0 before the first.
    pub last_ms: AtomicU64,
    /// When the first failed attempt of the batch still failing began,
    /// unix milliseconds; 0 while commits succeed.
    pub failing_since_ms: AtomicU64,
}

impl CommitLog {
    /// Records a commit that took `took` and ended at `now_ms`.
    pub fn committed(&self, took: Duration, now_ms: u64) {
        let seconds = took.as_secs_f64();
        let bucket = COMMIT_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(COMMIT_BUCKETS.len());
        Ledger::add(&self.buckets[bucket], 1);
        Ledger::add(&self.micros, took.as_micros() as u64);
        Ledger::add(&self.ok, 1);
        self.last_ms.store(now_ms, Ordering::Relaxed);
        self.failing_since_ms.store(0, Ordering::Relaxed);
    }

    /// Records a failed attempt of a batch first tried at `since_ms`.
    pub fn failed(&self, since_ms: u64) {
        Ledger::add(&self.failed, 1);
        let _ = self.failing_since_ms.compare_exchange(
            0,
            since_ms.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// The time now in unix milliseconds.
pub fn unix_ms() -> u64 {
    (crate::reading::unix_now() * 1e3) as u64
}

/// A point-in-time copy of the ledger, plus the socket's kernel drop counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub received: u64,
    pub denied: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Accepted readings in memory, not yet stored or set aside.
    pub queued: u64,
    pub persisted: u64,
    pub flushed_at_shutdown: u64,
    pub spilled: u64,
    pub dead_letter: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub late: u64,
    /// Datagrams the kernel dropped on our socket before a stop began
    /// (Linux only; 0 elsewhere).
    pub kernel_drops: u64,
    /// Datagrams that arrived after a stop began and were not read.
    pub unread: u64,
    /// Rejections by reason, indexed by `Rejection::index`.
    pub rejected_by_reason: [u64; Rejection::KINDS],
    /// The receive buffer's fullest, in thousandths: since the last stats
    /// line in the stats line, over the run in the shutdown line.
    pub buffer_peak: u64,
    /// Readings deleted by `--retain`.
    pub expired: u64,
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

    /// The counters now; `kernel_drops` is the socket's drop counter now.
    pub fn snapshot(&self, kernel_drops: u64) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (kernel_drops, unread) = match get(&self.drops_at_stop) {
            0 => (kernel_drops, 0),
            at_stop => {
                let at_stop = (at_stop - 1).min(kernel_drops);
                (at_stop, kernel_drops - at_stop)
            }
        };
        Counts {
            received: get(&self.received),
            denied: get(&self.denied),
            accepted: get(&self.accepted),
            rejected: get(&self.rejected),
            queued: 0,
            persisted: get(&self.persisted),
            flushed_at_shutdown: get(&self.flushed_at_shutdown),
            spilled: get(&self.spilled),
            dead_letter: get(&self.dead_letter),
            lost: get(&self.lost),
            duplicates: get(&self.duplicates),
            late: get(&self.late),
            kernel_drops,
            unread: unread + get(&self.discarded),
            rejected_by_reason: self.rejected_by_reason.each_ref().map(get),
            buffer_peak: get(&self.buffer_peak_run).max(get(&self.buffer_peak)),
            expired: get(&self.expired),
        }
        .with_queued()
    }

    /// `snapshot`, with the buffer's peak since the last call of this (for
    /// the periodic stats line), which starts a new period.
    pub fn period_snapshot(&self, kernel_drops: u64) -> Counts {
        let mut counts = self.snapshot(kernel_drops);
        let peak = self.buffer_peak.swap(0, Ordering::Relaxed);
        self.buffer_peak_run.fetch_max(peak, Ordering::Relaxed);
        counts.buffer_peak = peak;
        counts
    }
}

/// Thousandths as a percentage with one decimal: `93.5`.
pub fn percent(thousandths: u64) -> String {
    format!("{}.{}", thousandths / 10, thousandths % 10)
}

impl Counts {
    /// Sets `queued`: accepted readings not yet stored or set aside, in
    /// the receiver's chunk, the channel, the batch being gathered or the
    /// commit in progress. Derived, so the stats line always sums.
    fn with_queued(mut self) -> Self {
        let done = self.persisted
            + self.spilled
            + self.dead_letter
            + self.lost
            + self.duplicates
            + self.late;
        self.queued = self.accepted.saturating_sub(done);
        self
    }

    /// Rejections by reason, `(not_json=3 missing_field=1)`, or nothing.
    pub fn reasons(&self) -> String {
        let parts: Vec<String> = self
            .rejected_by_reason
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| format!("{}={n}", Rejection::kind_name(i)))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(" "))
        }
    }
}

impl fmt::Display for Counts {
    /// The periodic stats line's counters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received={} accepted={} rejected={}{} denied={} persisted={} duplicates={} \
             late={} queued={} dead_letter={} kernel_drops={} expired={} buffer_peak={}%",
            self.received,
            self.accepted,
            self.rejected,
            self.reasons(),
            self.denied,
            self.persisted,
            self.duplicates,
            self.late,
            self.queued,
            self.dead_letter,
            self.kernel_drops,
            self.expired,
            percent(self.buffer_peak)
        )
    }
}
