//! The batching thread and the shutdown guard. Knows the channel and a
//! `Store`, never sockets.
//!
//! The persister commits a batch when it reaches `batch_size` readings or
//! when `flush_interval` has passed since its first reading. A failed batch
//! is kept and retried, under the same batch id, with capped exponential
//! backoff, never dropped; while it retries the channel fills and the
//! receiver waits.
//!
//! `ShutdownGuard` replaces the original design's `atexit` handler: dropping
//! it commits everything still in flight in one transaction, or writes it to
//! the spill file when that fails or a second signal says to hurry.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use log::{debug, error, info, warn};

use crate::error::Error;
use crate::ledger::Ledger;
use crate::reading::Reading;
use crate::shutdown::Shutdown;
use crate::spill;
use crate::store::{self, BatchId, Interrupter, Store};

/// The longest a waiting persister sleeps. Only a safety net: a stop
/// request unparks it (the guard) or disconnects the channel (the
/// receiver's exit), and a chunk wakes it when it holds nothing.
const POLL: Duration = Duration::from_secs(1);
/// First and largest delay between attempts to write a failed batch.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// After a second signal, how long an interrupted write may take to return
/// before the guard stops waiting for it and spills its readings.
const FORCED_GRACE: Duration = Duration::from_secs(1);
/// Locks `mutex` even if a panicking thread poisoned it: every holder
/// leaves the data consistent between statements, and a transaction a
/// panicking persister left open was rolled back when it unwound.
fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Readings taken from the channel and not yet committed. Shared, and only
/// locked briefly, so the guard can take them even from a persister that
/// panicked or is stuck in a write.
#[derive(Debug, Default)]
struct Held {
    /// Waiting for the next batch, oldest first.
    readings: Vec<Reading>,
    /// The batch being written, with its id: after a failed attempt a store
    /// may not know whether it landed, so it is only ever retried under
    /// the same id.
    in_flight: Option<(BatchId, Arc<Vec<Reading>>)>,
}

/// What the persister and the shutdown guard share.
pub struct Shared {
    store: Mutex<Box<dyn Store>>,
    /// Obtained at start: it must work while another thread holds `store`.
    interrupt: Interrupter,
    held: Mutex<Held>,
    ids: Mutex<BatchIds>,
    ledger: Arc<Ledger>,
    shutdown: Shutdown,
}

impl Shared {
    pub fn new(store: Box<dyn Store>, ledger: Arc<Ledger>, shutdown: Shutdown) -> Self {
        Shared {
            interrupt: store.interrupter(),
            store: Mutex::new(store),
            held: Mutex::default(),
            ids: Mutex::new(BatchIds::new()),
            ledger,
            shutdown,
        }
    }

    fn next_id(&self) -> BatchId {
        lock(&self.ids).next()
    }
}

/// Settings for batching.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// The most readings in one transaction.
    pub batch_size: usize,
    /// How long a batch gathers readings, from the persister taking its
    /// first, before it is committed. Readings queued during a commit are
    /// taken after it, so under load batches gather a commit's time longer
    /// and come out larger, which keeps the index cheap (timing them from
    /// their arrival instead measured about 10% more CPU per reading). Half
    /// a batch or more queued during a commit is committed at once.
    pub flush_interval: Duration,
}

/// Issues batch ids: one random run id, then a sequence.
#[derive(Debug)]
struct BatchIds {
    run: u64,
    next: u64,
}

impl BatchIds {
    fn new() -> Self {
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

/// The persister's state; `run` consumes it on the `persister` thread.
pub struct Persister {
    rx: Receiver<Vec<Reading>>,
    shared: Arc<Shared>,
    config: BatchConfig,
}

impl Persister {
    pub fn new(rx: Receiver<Vec<Reading>>, shared: Arc<Shared>, config: BatchConfig) -> Self {
        Persister { rx, shared, config }
    }

    /// Commits batches until shutdown is requested or the receiver is gone.
    /// What is still queued or held then is the guard's to flush.
    pub fn run(self) {
        let batch_size = self.config.batch_size.max(1);
        // When the oldest held reading arrived, if any are held.
        let mut oldest: Option<Instant> = None;
        let mut held = 0usize;
        // Set by a commit, until the next look at the queue.
        let mut just_committed = false;
        // Half a batch or more queued during the last commit: the persister
        // is what limits the rate, and gathering for --flush-interval would
        // only idle it while the backlog grows, so it commits them at once.
        let mut behind = false;
        while !self.shared.shutdown.requested() {
            let wait = match oldest {
                Some(since) => self
                    .config
                    .flush_interval
                    .saturating_sub(since.elapsed())
                    .min(POLL),
                None => POLL,
            };
            // Holding readings, it sleeps until they are due: the receiver
            // wakes it early when the queue passes half full. Holding none,
            // it waits for the first chunk. Not waking per chunk keeps a
            // trickle of readings cheap.
            let first = if held > 0 {
                thread::park_timeout(wait);
                self.rx.try_recv().map_err(|e| match e {
                    TryRecvError::Empty => RecvTimeoutError::Timeout,
                    TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            } else {
                self.rx.recv_timeout(wait)
            };
            match first {
                Ok(chunk) => {
                    let mut taking = held + chunk.len();
                    let mut chunks = vec![chunk];
                    // Take what else is queued now: one wake-up, one lock.
                    while taking < batch_size {
                        match self.rx.try_recv() {
                            Ok(chunk) => {
                                taking += chunk.len();
                                chunks.push(chunk);
                            }
                            Err(_) => break,
                        }
                    }
                    held = self.take(chunks, &mut oldest);
                    behind = just_committed && held >= batch_size.div_ceil(2);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            just_committed = false;
            let due = |oldest: Option<Instant>| {
                oldest.is_some_and(|since| since.elapsed() >= self.config.flush_interval)
            };
            // A commit restarts the clock for what it left held.
            while held >= batch_size || (held > 0 && (behind || due(oldest))) {
                let Some(left) = self.commit(batch_size) else {
                    return;
                };
                held = left;
                oldest = (held > 0).then(Instant::now);
                (just_committed, behind) = (true, false);
                if self.shared.shutdown.requested() {
                    return;
                }
            }
        }
    }

    /// Moves chunks into the held readings; returns how many are held.
    fn take(&self, chunks: Vec<Vec<Reading>>, oldest: &mut Option<Instant>) -> usize {
        let mut held = lock(&self.shared.held);
        if held.readings.is_empty() {
            *oldest = Some(Instant::now());
        }
        for mut chunk in chunks {
            Ledger::sub(&self.shared.ledger.queued, chunk.len() as u64);
            held.readings.append(&mut chunk);
        }
        held.readings.len()
    }

    /// Commits up to `batch_size` of the oldest held readings, retrying until
    /// it succeeds; returns how many remain held. Returns None, leaving the
    /// batch in flight for the guard, if shutdown is requested first.
    fn commit(&self, batch_size: usize) -> Option<usize> {
        let (id, batch) = {
            let mut held = lock(&self.shared.held);
            let n = held.readings.len().min(batch_size);
            let mut batch = if n == held.readings.len() {
                std::mem::take(&mut held.readings)
            } else {
                held.readings.drain(..n).collect()
            };
            store::sort_for_index(&mut batch);
            let batch = Arc::new(batch);
            let id = self.shared.next_id();
            held.in_flight = Some((id, Arc::clone(&batch)));
            (id, batch)
        };
        let n = batch.len();
        let started = Instant::now();
        let mut delay = FIRST_BACKOFF;
        let mut attempt = 1u32;
        loop {
            #[cfg(feature = "failpoints")]
            fail::fail_point!("persister::commit");
            let result = lock(&self.shared.store).write_batch(id, &batch);
            match result {
                Ok(_refused) => {
                    Ledger::add(&self.shared.ledger.persisted, n as u64);
                    debug!(
                        "committed {n} readings in {:.1} ms",
                        started.elapsed().as_secs_f64() * 1e3
                    );
                    if attempt > 1 {
                        info!("batch of {n} readings committed after {attempt} attempts");
                    }
                    let mut held = lock(&self.shared.held);
                    held.in_flight = None;
                    return Some(held.readings.len());
                }
                Err(e) => {
                    // One line per backoff level, then one per minute at the cap.
                    if delay < MAX_BACKOFF || attempt.is_multiple_of(12) {
                        warn!(
                            "attempt {attempt} to commit {n} readings failed: {e}; retrying in {}",
                            humantime::format_duration(delay)
                        );
                    }
                    if !sleep_unless_shutdown(delay, &self.shared.shutdown) {
                        warn!(
                            "shutdown requested; leaving {n} uncommitted readings to the final flush"
                        );
                        return None;
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
            }
        }
    }
}

/// Sleeps for `duration`; returns false at once if shutdown is requested.
fn sleep_unless_shutdown(duration: Duration, shutdown: &Shutdown) -> bool {
    !shutdown.wait(duration)
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
/// channel between them, and what the persister holds. Dropping it stops
/// the threads, then commits every uncommitted reading in ONE transaction
/// (after retrying, under its own id, a batch whose write had failed), or
/// spills them.
pub struct ShutdownGuard {
    /// Joined first: its tail is what it read after the stop.
    pub receiver: Option<JoinHandle<Result<Vec<Reading>, Error>>>,
    /// Joined second; a panic here is reported, and what it held is salvaged.
    pub persister: Option<JoinHandle<()>>,
    /// A second handle on the channel, so what is queued survives the
    /// persister (a panicking thread drops its own handle).
    rx: Receiver<Vec<Reading>>,
    shared: Arc<Shared>,
    spill_path: PathBuf,
    /// Set once the flush ran, so `Drop` after `finish` does nothing.
    report: Option<FlushReport>,
}

/// The readings the final flush must commit: perhaps a batch to retry
/// under its old id, then the rest.
struct Uncommitted {
    retry: Option<(BatchId, Arc<Vec<Reading>>)>,
    rest: Vec<Reading>,
}

impl ShutdownGuard {
    pub fn new(rx: Receiver<Vec<Reading>>, shared: Arc<Shared>, spill_path: PathBuf) -> Self {
        ShutdownGuard {
            receiver: None,
            persister: None,
            rx,
            shared,
            spill_path,
            report: None,
        }
    }

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
        if !self.shared.shutdown.requested() {
            self.shared.shutdown.trigger();
        }
        // A persister sleeping until its batch is due stops now.
        if let Some(persister) = &self.persister {
            persister.thread().unpark();
        }
        let mut tail = Vec::new();
        if let Some(receiver) = self.receiver.take() {
            match receiver.join() {
                Ok(Ok(readings)) => tail = readings,
                Ok(Err(e)) => report.receiver_error = Some(e.to_string()),
                Err(_) => report.receiver_error = Some("the receiver thread panicked".into()),
            }
        }
        let mut persister_stuck = false;
        if let Some(persister) = self.persister.take() {
            if self.wait_for(&persister) {
                if persister.join().is_err() {
                    error!(
                        "the persister thread panicked; flushing what it held and what is queued"
                    );
                    report.persister_panicked = true;
                }
            } else {
                // It still holds the store; its readings are in `held`.
                persister_stuck = true;
            }
        }
        let mut uncommitted = {
            let mut held = lock(&self.shared.held);
            Uncommitted {
                retry: held.in_flight.take(),
                rest: std::mem::take(&mut held.readings),
            }
        };
        // The receiver has stopped, so nothing more arrives; empty the channel.
        for chunk in self.rx.try_iter() {
            Ledger::sub(&self.shared.ledger.queued, chunk.len() as u64);
            uncommitted.rest.extend(chunk);
        }
        uncommitted.rest.append(&mut tail);
        if uncommitted.retry.is_some() || !uncommitted.rest.is_empty() {
            let uncommitted = if persister_stuck {
                warn!("the persister did not stop after a second signal; spilling what it held");
                Some(uncommitted)
            } else {
                self.final_flush(uncommitted)
            };
            if let Some(uncommitted) = uncommitted {
                self.spill(uncommitted, &mut report);
            }
        }
        self.report = Some(report.clone());
        report
    }

    /// Waits for the persister to stop. After a second signal it interrupts
    /// the store, and gives up waiting (returning false) if the persister is
    /// still stuck in a write `FORCED_GRACE` later.
    fn wait_for(&self, persister: &JoinHandle<()>) -> bool {
        let mut forced_at: Option<Instant> = None;
        while !persister.is_finished() {
            if self.shared.shutdown.forced() {
                let since = *forced_at.get_or_insert_with(Instant::now);
                (self.shared.interrupt)();
                if since.elapsed() > FORCED_GRACE {
                    return false;
                }
            }
            thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Commits the uncommitted readings on a helper thread, so a second
    /// signal can abandon it. Returns what did not commit.
    fn final_flush(&mut self, mut uncommitted: Uncommitted) -> Option<Uncommitted> {
        // The retried batch was sorted when it was first taken. The
        // receiver has stopped, so the second core is free to sort.
        store::sort_for_index_on_two_threads(&mut uncommitted.rest);
        let started = Instant::now();
        let shared = Arc::clone(&self.shared);
        let rest = Arc::new(uncommitted.rest);
        let (retry, rest_for_flusher) = (uncommitted.retry.clone(), Arc::clone(&rest));
        let id = self.shared.next_id();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let flusher = thread::Builder::new()
            .name("flusher".into())
            .spawn(move || {
                let mut store = lock(&shared.store);
                // How far it got: the retried batch committed, then the rest.
                let mut retried = false;
                let result = (|| {
                    if let Some((id, batch)) = &retry {
                        store.write_batch(*id, batch)?;
                        retried = true;
                    }
                    if !rest_for_flusher.is_empty() {
                        store.write_batch(id, &rest_for_flusher)?;
                    }
                    Ok(())
                })();
                // The guard may have given up waiting; then nobody listens.
                let _ = done_tx.send((retried, result));
            });
        let outcome = match flusher {
            Ok(_) => self.await_flush(&done_rx),
            Err(e) => Some((
                false,
                Err(Error::Thread {
                    name: "flusher",
                    source: e,
                }),
            )),
        };
        let retry_len = uncommitted
            .retry
            .as_ref()
            .map_or(0, |(_, batch)| batch.len());
        let (retried, result) = match outcome {
            Some(outcome) => outcome,
            None => {
                warn!(
                    "the final flush did not answer after a second signal; spilling its \
                     readings (if it did commit, replay may add them twice)"
                );
                (false, Err(Error::database("final flush", "abandoned")))
            }
        };
        let committed =
            if retried { retry_len } else { 0 } + if result.is_ok() { rest.len() } else { 0 };
        Ledger::add(&self.shared.ledger.persisted, committed as u64);
        Ledger::add(&self.shared.ledger.flushed_at_shutdown, committed as u64);
        match result {
            Ok(()) => {
                info!(
                    "final flush committed {committed} readings in {:.3}s",
                    started.elapsed().as_secs_f64()
                );
                None
            }
            Err(e) => {
                error!("final flush failed: {e}");
                Some(Uncommitted {
                    retry: if retried { None } else { uncommitted.retry },
                    rest: Arc::unwrap_or_clone(rest),
                })
            }
        }
    }

    /// The flush's outcome, or None if a second signal came and the
    /// interrupted flush did not report within `FORCED_GRACE`.
    fn await_flush(
        &self,
        done: &Receiver<(bool, Result<(), Error>)>,
    ) -> Option<(bool, Result<(), Error>)> {
        let mut forced_at: Option<Instant> = None;
        loop {
            match done.recv_timeout(Duration::from_millis(20)) {
                Ok(outcome) => return Some(outcome),
                Err(RecvTimeoutError::Disconnected) => {
                    let panicked = Error::database("final flush", "the flush thread panicked");
                    return Some((false, Err(panicked)));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.shared.shutdown.forced() {
                let since = *forced_at.get_or_insert_with(|| {
                    warn!("second signal: abandoning the final flush");
                    Instant::now()
                });
                // Repeated: an interrupt between two statements is not sticky.
                (self.shared.interrupt)();
                if since.elapsed() > FORCED_GRACE {
                    return None;
                }
            }
        }
    }

    /// Writes what did not commit to the spill file.
    fn spill(&self, uncommitted: Uncommitted, report: &mut FlushReport) {
        let mut readings = match uncommitted.retry {
            Some((_, batch)) => Arc::unwrap_or_clone(batch),
            None => Vec::new(),
        };
        readings.extend(uncommitted.rest);
        let count = readings.len() as u64;
        report.spilled = true;
        match spill::write(&self.spill_path, &readings) {
            Ok(()) => {
                Ledger::add(&self.shared.ledger.spilled, count);
                info!("spilled {count} readings to {}", self.spill_path.display());
            }
            Err(e) => {
                error!("{e}; {count} readings are lost");
                report.lost = count;
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
