//! The batching thread. Knows the channel and a `Store`, never sockets.
//!
//! The persister commits a batch when it reaches `batch_size` readings or
//! when `flush_interval` has passed since its first reading. A batch that
//! fails for a transient reason is kept and retried, under the same batch
//! id, with capped exponential backoff, never dropped; while it retries the
//! channel fills and the receiver waits. Readings the database refuses for
//! good are set aside by the store and written to the dead-letter file
//! here, so one poison reading never stalls the rest.
//!
//! Sequenced readings are admitted (`delivery`) as a batch is formed:
//! duplicates are dropped and counted, and the state of each stream the
//! batch touches commits with it. After the commit the acks it made due are
//! sent (`acks`).
//!
//! What is still in flight at a stop is the shutdown guard's
//! (`shutdown::guard`), which shares `Shared` with the persister.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use log::{debug, error, info, warn};

use crate::acks::{Acks, Chunk};
use crate::delivery::{Admitted, Delivery, StreamUpdate};
use crate::error::Error;
use crate::ledger::{self, Ledger};
use crate::reading::Reading;
use crate::shutdown::Shutdown;
use crate::spill::Spill;
use crate::store::{self, BatchId, Interrupter, Refusal, Store};

/// The longest a waiting persister sleeps. Only a safety net: a stop
/// request unparks it (the guard) or disconnects the channel (the
/// receiver's exit), and a chunk wakes it when it holds nothing.
const POLL: Duration = Duration::from_secs(1);
/// First and largest delay between attempts to write a failed batch.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Locks `mutex` even if a panicking thread poisoned it: every holder
/// leaves the data consistent between statements, and a transaction a
/// panicking persister left open was rolled back when it unwound.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Readings taken from the channel and not yet committed. Shared, and only
/// locked briefly, so the guard can take them even from a persister that
/// panicked or is stuck in a write.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// Waiting for the next batch, oldest first.
    pub(crate) readings: Vec<Reading>,
    /// The batch being written, with its id: after a failed attempt a store
    /// may not know whether it landed, so it is only ever retried under
    /// the same id.
    pub(crate) in_flight: Option<(BatchId, Arc<Batch>)>,
}

/// A batch as committed: admitted readings and the state of their streams.
#[derive(Clone, Debug, Default)]
pub(crate) struct Batch {
    pub(crate) readings: Vec<Reading>,
    pub(crate) streams: Vec<StreamUpdate>,
    /// Readings taken from `Held` to form it, duplicates included: what
    /// its commit makes due in `Acks`.
    pub(crate) taken: usize,
}

/// What the persister and the shutdown guard share.
pub struct Shared {
    pub(crate) store: Mutex<Box<dyn Store>>,
    /// Obtained at start: it must work while another thread holds `store`.
    pub(crate) interrupt: Interrupter,
    pub(crate) held: Mutex<Held>,
    ids: Mutex<BatchIds>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) shutdown: Shutdown,
    /// Where readings go that cannot be committed: the spill file at a
    /// stop, the dead-letter file for refused readings.
    pub(crate) spill: Spill,
    /// The streams of sequenced readings. Locked last (after `held`, then
    /// `acks`) when with them, and never across a database call.
    pub(crate) delivery: Mutex<Delivery>,
    /// Acks owed, sent after commits.
    pub(crate) acks: Mutex<Acks>,
}

impl Shared {
    pub fn new(
        store: Box<dyn Store>,
        ledger: Arc<Ledger>,
        shutdown: Shutdown,
        spill: Spill,
        acks: Acks,
    ) -> Self {
        Shared {
            interrupt: store.interrupter(),
            store: Mutex::new(store),
            held: Mutex::default(),
            ids: Mutex::new(BatchIds::new()),
            ledger,
            shutdown,
            spill,
            delivery: Mutex::default(),
            acks: Mutex::new(acks),
        }
    }

    /// Loads from `store` the streams of `readings` not in memory.
    pub(crate) fn load_streams(
        &self,
        store: &mut dyn Store,
        readings: &[Reading],
    ) -> Result<(), Error> {
        let unknown = lock(&self.delivery).unknown(readings);
        if unknown.is_empty() {
            return Ok(());
        }
        let loaded = store.load_streams(&unknown)?;
        let mut delivery = lock(&self.delivery);
        for (key, record) in loaded {
            delivery.insert(key, record);
        }
        Ok(())
    }

    /// Counts what admission set aside.
    pub(crate) fn count_admitted(&self, admitted: &Admitted) {
        Ledger::add(&self.ledger.duplicates, admitted.duplicates);
        Ledger::add(&self.ledger.late, admitted.late);
        if admitted.late > 0 {
            warn!(
                "{} older than their sensor's duplicate window ({} readings behind its \
                 newest) not stored (late)",
                ledger::count(admitted.late, "sequenced reading"),
                crate::delivery::WINDOW
            );
        }
    }

    pub(crate) fn next_id(&self) -> BatchId {
        lock(&self.ids).next()
    }

    /// Counts a committed write of `n` readings of which the store refused
    /// `refused`, and writes those to the dead-letter file (or counts them
    /// lost if it cannot).
    pub(crate) fn committed(&self, n: usize, refused: &[Refusal]) {
        Ledger::add(&self.ledger.persisted, (n - refused.len()) as u64);
        if refused.is_empty() {
            return;
        }
        let count = refused.len() as u64;
        match self.spill.dead_letters(refused) {
            Ok(()) => {
                Ledger::add(&self.ledger.dead_letter, count);
                warn!(
                    "the database refused {} for good ({}); see {}",
                    ledger::count(count, "reading"),
                    refused[0].cause,
                    self.spill.dead_letter_path().display()
                );
            }
            Err(e) => {
                Ledger::add(&self.ledger.lost, count);
                error!("{e}; {count} readings the database refused are lost");
            }
        }
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
    rx: Receiver<Chunk>,
    shared: Arc<Shared>,
    config: BatchConfig,
}

impl Persister {
    pub fn new(rx: Receiver<Chunk>, shared: Arc<Shared>, config: BatchConfig) -> Self {
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
    fn take(&self, chunks: Vec<Chunk>, oldest: &mut Option<Instant>) -> usize {
        let mut held = lock(&self.shared.held);
        if held.readings.is_empty() {
            *oldest = Some(Instant::now());
        }
        let mut acks = lock(&self.shared.acks);
        for mut chunk in chunks {
            acks.taken(chunk.readings.len(), chunk.acks);
            held.readings.append(&mut chunk.readings);
        }
        held.readings.len()
    }

    /// Forms the next batch from up to `batch_size` of the oldest held
    /// readings: loads the streams it needs, admits its readings, and puts
    /// it in flight. Fails, leaving the readings held, if a stream cannot
    /// be loaded.
    fn prepare(&self, batch_size: usize) -> Result<(BatchId, Arc<Batch>), Error> {
        let first: Vec<Reading> = {
            let held = lock(&self.shared.held);
            let n = held.readings.len().min(batch_size);
            lock(&self.shared.delivery).make_room();
            // Only the sequenced ones matter: usually none, or few.
            held.readings[..n]
                .iter()
                .filter(|r| r.sequence().is_some())
                .cloned()
                .collect()
        };
        if !first.is_empty() {
            self.shared
                .load_streams(&mut **lock(&self.shared.store), &first)?;
        }
        let mut held = lock(&self.shared.held);
        let n = held.readings.len().min(batch_size);
        let taken = if n == held.readings.len() {
            std::mem::take(&mut held.readings)
        } else {
            held.readings.drain(..n).collect()
        };
        let admitted = lock(&self.shared.delivery).admit(taken);
        self.shared.count_admitted(&admitted);
        let mut readings = admitted.readings;
        store::sort_for_index(&mut readings);
        let batch = Arc::new(Batch {
            readings,
            streams: admitted.streams,
            taken: n,
        });
        let id = self.shared.next_id();
        held.in_flight = Some((id, Arc::clone(&batch)));
        Ok((id, batch))
    }

    /// Commits up to `batch_size` of the oldest held readings, retrying until
    /// it succeeds; returns how many remain held. Returns None, leaving the
    /// batch in flight for the guard, if shutdown is requested first.
    fn commit(&self, batch_size: usize) -> Option<usize> {
        let started = Instant::now();
        let started_ms = ledger::unix_ms();
        let mut delay = FIRST_BACKOFF;
        let mut attempt = 1u32;
        let mut prepared: Option<(BatchId, Arc<Batch>)> = None;
        loop {
            #[cfg(feature = "failpoints")]
            fail::fail_point!("persister::commit");
            let attempt_started = Instant::now();
            // A batch is formed once; a failed write is retried as it was.
            let result = match &prepared {
                Some((id, batch)) => Ok((*id, Arc::clone(batch))),
                None => self.prepare(batch_size),
            }
            .and_then(|(id, batch)| {
                prepared = Some((id, Arc::clone(&batch)));
                lock(&self.shared.store).write_batch(id, &batch.readings, &batch.streams)
            });
            // The readings written, or (if the batch could not be formed)
            // about to be taken.
            let n = match &prepared {
                Some((_, batch)) => batch.readings.len(),
                None => lock(&self.shared.held).readings.len().min(batch_size),
            };
            match result {
                Ok(refused) => {
                    self.shared.committed(n, &refused);
                    if let Some((_, batch)) = &prepared {
                        let mut acks = lock(&self.shared.acks);
                        acks.committed(batch.taken, &lock(&self.shared.delivery));
                    }
                    let commits = &self.shared.ledger.commits;
                    commits.committed(attempt_started.elapsed(), ledger::unix_ms());
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
                    self.shared.ledger.commits.failed(started_ms);
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
