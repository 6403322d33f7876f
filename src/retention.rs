//! `--retain`: the thread (`retention`) that deletes readings whose
//! `ingested_at` is older than the horizon, with a store connection of its
//! own so it never waits for the persister's.
//!
//! It deletes in steps of at most `STEP` readings, each its own short
//! transaction (see `Store::expire`), and pauses between steps at least
//! as long as a step took, so the persister always finds the write lock
//! free within a few milliseconds. After a pass over every sensor it
//! sleeps until the next, a quarter of the retention period later (at
//! most a minute). SQLite reuses the pages freed, so a file that receives
//! at a steady rate stops growing once the oldest readings expire.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, info, warn};

use crate::error::Error;
use crate::ledger::Ledger;
use crate::reading::unix_now;
use crate::store::{Interrupter, Store};

/// The most readings deleted (and sensors looked at) per transaction: a
/// few milliseconds of the write lock.
pub const STEP: usize = 2000;
/// The least pause between two steps of a pass: longer than the persister's
/// longest wait between two tries for the lock (20 ms, `SqliteStore::begin`).
const STEP_PAUSE: Duration = Duration::from_millis(25);
/// The longest wait between passes, and after a failed step.
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// The running retention thread. Dropping it interrupts the step in
/// progress, stops the thread and waits for it.
pub struct RetentionGuard {
    stop: Option<Sender<()>>,
    interrupt: Interrupter,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RetentionGuard {
    fn drop(&mut self) {
        self.stop.take();
        (self.interrupt)();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts deleting readings older than `retain` from `store`, counting
/// them in `ledger.expired`.
pub fn start(
    store: Box<dyn Store>,
    retain: Duration,
    ledger: Arc<Ledger>,
) -> Result<RetentionGuard, Error> {
    let interrupt = store.interrupter();
    let (stop, stopped) = crossbeam_channel::bounded(0);
    let thread = thread::Builder::new()
        .name("retention".into())
        .spawn(move || run(store, retain, &ledger, &stopped))
        .map_err(|source| Error::Thread {
            name: "retention",
            source,
        })?;
    info!(
        "deleting readings older than {} (--retain)",
        humantime::format_duration(retain)
    );
    Ok(RetentionGuard {
        stop: Some(stop),
        interrupt,
        thread: Some(thread),
    })
}

fn run(mut store: Box<dyn Store>, retain: Duration, ledger: &Ledger, stopped: &Receiver<()>) {
    let interval = (retain / 4).clamp(Duration::from_millis(250), MAX_INTERVAL);
    let mut from = i64::MIN;
    let mut in_pass = 0u64;
    let mut failing = Duration::ZERO;
    loop {
        let before = unix_now() - retain.as_secs_f64();
        let started = Instant::now();
        let wait = match store.expire(before, from, STEP) {
            Ok(step) => {
                failing = Duration::ZERO;
                Ledger::add(&ledger.expired, step.deleted);
                in_pass += step.deleted;
                match step.resume {
                    Some(next) => {
                        from = next;
                        STEP_PAUSE.max(started.elapsed())
                    }
                    None => {
                        if in_pass > 0 {
                            debug!("retention deleted {in_pass} readings");
                        }
                        (from, in_pass) = (i64::MIN, 0);
                        interval
                    }
                }
            }
            Err(e) => {
                if matches!(
                    stopped.try_recv(),
                    Err(crossbeam_channel::TryRecvError::Disconnected)
                ) {
                    return;
                }
                failing = (failing * 2).clamp(interval, MAX_INTERVAL);
                warn!(
                    "{e}; trying again in {}",
                    humantime::format_duration(failing)
                );
                failing
            }
        };
        if !matches!(stopped.recv_timeout(wait), Err(RecvTimeoutError::Timeout)) {
            return;
        }
    }
}
