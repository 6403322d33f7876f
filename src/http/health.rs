//! `GET /health`: 200 while the daemon receives and commits, 503 with the
//! reason when it does not.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::ledger::{self, Ledger};
use crate::shutdown::Shutdown;

/// How long a batch may go on failing to commit before the daemon reports
/// itself unhealthy: a lock held for a moment, or a reconnect, is not worth
/// waking anyone.
pub const FAILING_FOR: Duration = Duration::from_secs(3);

/// The status code and a one-line reason.
pub fn check(ledger: &Ledger, shutdown: &Shutdown) -> (u16, String) {
    if ledger.worker_stopped.load(Ordering::Relaxed) {
        return (
            503,
            "unhealthy: a worker thread stopped unexpectedly".into(),
        );
    }
    if shutdown.requested() {
        return (503, "unhealthy: stopping".into());
    }
    let now = ledger::unix_ms();
    let commits = &ledger.commits;
    let since = commits.failing_since_ms.load(Ordering::Relaxed);
    let failing = Duration::from_millis(now.saturating_sub(since));
    if since > 0 && failing > FAILING_FOR {
        return (
            503,
            format!(
                "unhealthy: a batch has been failing to commit for {:.1} s \
                 ({} failed attempts in all; the log says why)",
                failing.as_secs_f64(),
                commits.failed.load(Ordering::Relaxed)
            ),
        );
    }
    let text = match commits.last_ms.load(Ordering::Relaxed) {
        0 => "ok: receiving; nothing committed yet".to_string(),
        last => format!(
            "ok: receiving; last commit {:.1} s ago",
            now.saturating_sub(last) as f64 / 1e3
        ),
    };
    (200, text)
}
