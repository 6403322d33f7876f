//! The batching thread and the shutdown guard. Knows the channel and a
//! `Store`, never sockets.
//!
//! The persister commits a batch when it reaches `batch_size` readings or
//! when `flush_interval` has passed since its first reading. A failed batch
//! is kept and retried with capped exponential backoff, never dropped; while
//! it retries the channel fills and the receiver waits.
//!
//! `ShutdownGuard` replaces the original design's `atexit` handler: dropping
//! it commits everything still in flight in one transaction, or writes it to
//! the spill file when that fails or a second signal says to hurry.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{error, info, warn};

use crate::error::Error;
use crate::ledger::Ledger;
use crate::reading::Reading;
use crate::shutdown::Shutdown;
use crate::spill;
use crate::store::{BatchId, Interrupter, Store};

/// How often a waiting persister or guard looks at the shutdown trigger.
const POLL: Duration = Duration::from_millis(100);
/// First and largest delay between attempts to write a failed batch.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// After a second signal, how long an interrupted final flush may take to
/// report whether it committed before its readings are spilled regardless.
const FORCED_GRACE: Duration = Duration::from_secs(2);

/// The store, shared by the persister and, at shutdown, the guard.
pub type SharedStore = Arc<Mutex<Box<dyn Store>>>;

/// Locks the store even if a panicking persister poisoned the lock: a
/// transaction it left open was rolled back when it unwound.
fn lock(store: &SharedStore) -> MutexGuard<'_, Box<dyn Store>> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Readings the persister holds, given up to the guard when dropped, which
/// also happens when the persister panics.
struct Held {
    readings: Vec<Reading>,
    /// Where a dropped `Held` leaves its readings for the guard.
    salvage: Arc<Mutex<Vec<Reading>>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.readings.is_empty() {
            let mut salvage = self.salvage.lock().unwrap_or_else(PoisonError::into_inner);
            salvage.append(&mut self.readings);
        }
    }
}

/// Settings for batching.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// The most readings in one transaction.
    pub batch_size: usize,
    /// The longest a reading waits in a batch before it is committed.
    pub flush_interval: Duration,
}

/// Issues batch ids: one random run id, then a sequence.
#[derive(Debug)]
pub struct BatchIds {
    run: u64,
    next: u64,
}

impl BatchIds {
    pub fn new() -> Self {
        BatchIds {
            run: rand::random(),
            next: 0,
        }
    }

    fn next(&mut self) -> BatchId {
        self.next += 1;
        BatchId {
            run: self.run,
            seq: self.next,
        }
    }
}

impl Default for BatchIds {
    fn default() -> Self {
        Self::new()
    }
}

/// The persister's state; `run` consumes it on the `persister` thread.
pub struct Persister {
    rx: Receiver<Vec<Reading>>,
    store: SharedStore,
    config: BatchConfig,
    ids: Arc<Mutex<BatchIds>>,
    ledger: Arc<Ledger>,
    shutdown: Shutdown,
    held: Held,
}

impl Persister {
    pub fn new(
        rx: Receiver<Vec<Reading>>,
        store: SharedStore,
        config: BatchConfig,
        ids: Arc<Mutex<BatchIds>>,
        ledger: Arc<Ledger>,
        shutdown: Shutdown,
        salvage: Arc<Mutex<Vec<Reading>>>,
    ) -> Self {
        let held = Held {
            readings: Vec::new(),
            salvage,
        };
        Persister {
            rx,
            store,
            config,
            ids,
            ledger,
            shutdown,
            held,
        }
    }

    /// Commits batches until shutdown is requested or the receiver is gone.
    /// What is still queued or held then is the guard's to flush.
    pub fn run(mut self) {
        let batch_size = self.config.batch_size.max(1);
        // When the oldest held reading arrived, if any are held.
        let mut oldest: Option<Instant> = None;
        while !self.shutdown.requested() {
            let wait = match oldest {
                Some(since) => self
                    .config
                    .flush_interval
                    .saturating_sub(since.elapsed())
                    .min(POLL),
                None => POLL,
            };
            match self.rx.recv_timeout(wait) {
                Ok(chunk) => {
                    self.take(chunk, &mut oldest);
                    // Take what else is queued now, so one wake-up moves many chunks.
                    while self.held.readings.len() < batch_size {
                        match self.rx.try_recv() {
                            Ok(chunk) => self.take(chunk, &mut oldest),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let due = oldest.is_some_and(|since| since.elapsed() >= self.config.flush_interval);
            while self.held.readings.len() >= batch_size || (due && !self.held.readings.is_empty())
            {
                let n = self.held.readings.len().min(batch_size);
                if !self.commit(n) {
                    return;
                }
                oldest = (!self.held.readings.is_empty()).then(Instant::now);
                if self.shutdown.requested() {
                    return;
                }
            }
        }
    }

    fn take(&mut self, mut chunk: Vec<Reading>, oldest: &mut Option<Instant>) {
        Ledger::sub(&self.ledger.queued, chunk.len() as u64);
        if self.held.readings.is_empty() {
            *oldest = Some(Instant::now());
        }
        self.held.readings.append(&mut chunk);
    }

    /// Commits the first `n` held readings, retrying until it succeeds.
    /// Returns false, keeping them held, if shutdown is requested first.
    fn commit(&mut self, n: usize) -> bool {
        let id = self
            .ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next();
        let mut delay = FIRST_BACKOFF;
        let mut attempt = 1u32;
        loop {
            #[cfg(feature = "failpoints")]
            fail::fail_point!("persister::commit");
            let result = lock(&self.store).write_batch(id, &self.held.readings[..n]);
            match result {
                Ok(()) => {
                    Ledger::add(&self.ledger.persisted, n as u64);
                    self.held.readings.drain(..n);
                    if attempt > 1 {
                        info!("batch of {n} readings committed after {attempt} attempts");
                    }
                    return true;
                }
                Err(e) => {
                    // One line per backoff level, then one per minute at the cap.
                    if delay < MAX_BACKOFF || attempt.is_multiple_of(12) {
                        warn!(
                            "attempt {attempt} to commit {n} readings failed: {e}; retrying in {}",
                            humantime::format_duration(delay)
                        );
                    }
                    if !sleep_unless_shutdown(delay, &self.shutdown) {
                        warn!(
                            "shutdown requested; leaving {n} uncommitted readings to the final flush"
                        );
                        return false;
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
            }
        }
    }
}

/// Sleeps for `duration`; returns false early if shutdown is requested.
fn sleep_unless_shutdown(duration: Duration, shutdown: &Shutdown) -> bool {
    let until = Instant::now() + duration;
    loop {
        if shutdown.requested() {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(POLL));
    }
}

/// What the final flush did, for the shutdown line and the exit code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// The persister panicked; the log says why.
    pub persister_panicked: bool,
    /// The receiver stopped with this error.
    pub receiver_error: Option<String>,
    /// Readings were written to the spill file instead of the database.
    pub spilled: bool,
    /// Readings could be neither committed nor spilled: they are lost.
    pub lost: u64,
}

impl FlushReport {
    /// True when everything received is in the database.
    pub fn clean(&self) -> bool {
        !self.persister_panicked && self.receiver_error.is_none() && !self.spilled && self.lost == 0
    }
}

/// Owns everything still in flight: the receiver and persister threads, the
/// channel between them, and the store. Dropping it stops the threads, then
/// commits every uncommitted reading in ONE transaction, or spills them.
pub struct ShutdownGuard {
    /// Joined first: its tail is what it read after the stop.
    pub receiver: Option<JoinHandle<Result<Vec<Reading>, Error>>>,
    /// Joined second; a panic here is reported, and what it held is salvaged.
    pub persister: Option<JoinHandle<()>>,
    /// A second handle on the channel, so what is queued survives the
    /// persister (a panicking thread drops its own handle).
    pub rx: Receiver<Vec<Reading>>,
    pub store: SharedStore,
    /// Obtained at start, since it must work while another thread holds the store.
    pub interrupt: Arc<Interrupter>,
    pub salvage: Arc<Mutex<Vec<Reading>>>,
    pub ids: Arc<Mutex<BatchIds>>,
    pub ledger: Arc<Ledger>,
    pub shutdown: Shutdown,
    pub spill_path: PathBuf,
    /// Set once the flush ran, so `Drop` after `finish` does nothing.
    pub report: Option<FlushReport>,
}

impl ShutdownGuard {
    /// Runs the final flush now and returns what it did.
    pub fn finish(mut self) -> FlushReport {
        self.flush()
    }

    fn flush(&mut self) -> FlushReport {
        if let Some(report) = &self.report {
            return report.clone();
        }
        let mut report = FlushReport::default();
        // Threads stop on the trigger; an internal stop (a panic) sets it here.
        if !self.shutdown.requested() {
            self.shutdown.trigger();
        }
        let mut pending = Vec::new();
        if let Some(receiver) = self.receiver.take() {
            match receiver.join() {
                Ok(Ok(tail)) => pending = tail,
                Ok(Err(e)) => report.receiver_error = Some(e.to_string()),
                Err(_) => report.receiver_error = Some("the receiver thread panicked".into()),
            }
        }
        if let Some(persister) = self.persister.take() {
            self.wait_for(&persister);
            if persister.join().is_err() {
                error!("the persister thread panicked; flushing what it held and what is queued");
                report.persister_panicked = true;
            }
        }
        let mut readings =
            std::mem::take(&mut *self.salvage.lock().unwrap_or_else(PoisonError::into_inner));
        // The receiver has stopped, so nothing more arrives; empty the channel.
        for chunk in self.rx.try_iter() {
            Ledger::sub(&self.ledger.queued, chunk.len() as u64);
            readings.extend(chunk);
        }
        readings.append(&mut pending);
        if !readings.is_empty() {
            self.final_flush(readings, &mut report);
        }
        self.report = Some(report.clone());
        report
    }

    /// Waits for the persister to stop; after a second signal, interrupts
    /// the store so a hung write cannot hold it.
    fn wait_for(&self, persister: &JoinHandle<()>) {
        while !persister.is_finished() {
            if self.shutdown.forced() {
                (self.interrupt)();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Commits `readings` in one transaction on a helper thread, so a second
    /// signal can abandon it; spills whatever does not commit.
    fn final_flush(&mut self, readings: Vec<Reading>, report: &mut FlushReport) {
        let count = readings.len() as u64;
        let readings = Arc::new(readings);
        let started = Instant::now();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let flusher = {
            let (store, readings) = (Arc::clone(&self.store), Arc::clone(&readings));
            let id = self
                .ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .next();
            thread::Builder::new()
                .name("flusher".into())
                .spawn(move || {
                    // The guard may have given up waiting; then nobody listens.
                    let _ = done_tx.send(lock(&store).write_batch(id, &readings));
                })
        };
        let outcome = match flusher {
            Ok(_) => self.await_flush(&done_rx),
            Err(e) => Some(Err(Error::Thread {
                name: "flusher",
                source: e,
            })),
        };
        match outcome {
            Some(Ok(())) => {
                Ledger::add(&self.ledger.persisted, count);
                Ledger::add(&self.ledger.flushed_at_shutdown, count);
                info!(
                    "final flush committed {count} readings in {:.3}s",
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            Some(Err(e)) => error!("final flush of {count} readings failed: {e}"),
            None => warn!(
                "final flush of {count} readings did not answer after a second signal; \
                 spilling them (if it did commit, replay may add them twice)"
            ),
        }
        report.spilled = true;
        match spill::write(&self.spill_path, &readings) {
            Ok(()) => {
                Ledger::add(&self.ledger.spilled, count);
                info!("spilled {count} readings to {}", self.spill_path.display());
            }
            Err(e) => {
                error!("{e}; {count} readings are lost");
                report.lost = count;
            }
        }
    }

    /// The flush's result, or None if a second signal came and the
    /// interrupted flush did not report within `FORCED_GRACE`.
    fn await_flush(&self, done: &Receiver<Result<(), Error>>) -> Option<Result<(), Error>> {
        let mut forced_at: Option<Instant> = None;
        loop {
            match done.recv_timeout(Duration::from_millis(20)) {
                Ok(result) => return Some(result),
                Err(RecvTimeoutError::Disconnected) => {
                    return Some(Err(Error::database(
                        "final flush",
                        "the flush thread panicked",
                    )));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.shutdown.forced() {
                let since = *forced_at.get_or_insert_with(|| {
                    warn!("second signal: abandoning the final flush");
                    Instant::now()
                });
                // Repeated: an interrupt between two statements is not sticky.
                (self.interrupt)();
                if since.elapsed() > FORCED_GRACE {
                    return None;
                }
            }
        }
    }
}

impl Drop for ShutdownGuard {
    /// Flushes what is in flight unless `finish` already did.
    fn drop(&mut self) {
        let report = self.flush();
        if !report.clean() {
            warn!("shutdown guard finished: {report:?}");
        }
    }
}
