//! `ShutdownGuard`: the original design's `atexit` handler. Dropping it
//! stops the receiver and persister, then commits everything still in
//! flight in one transaction, or writes it to the spill file when that
//! fails, runs out of time, or a second signal says to hurry.
//!
//! Every phase is bounded: the receiver's drain by what the socket held
//! when the stop came (see `receiver`), the wait for the persister and the
//! final flush together by `--busy-timeout` plus `STOP_GRACE` from the stop
//! request, and everything by about `FORCED_GRACE` after a second signal.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{error, info, warn};

use crate::acks::Chunk;
use crate::error::Error;
use crate::ledger::Ledger;
use crate::persister::{Batch, Shared, lock};
use crate::reading::Reading;
use crate::store::{self, BatchId, Refusal, SpillBatch};

/// After a second signal, or past the stop deadline, how long an
/// interrupted write may take to return before the guard stops waiting for
/// it and spills its readings.
const FORCED_GRACE: Duration = Duration::from_secs(1);
/// The stop's time beyond `--busy-timeout`: for the drain, the sort, and a
/// final commit that began just before the deadline.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// A thread and the channel that tells when it ended: the thread holds the
/// only sender, which its end drops, even by a panic.
pub struct Worker<T> {
    pub handle: JoinHandle<T>,
    done: Receiver<()>,
}

impl<T: Send + 'static> Worker<T> {
    /// Starts `f` on a thread called `name`.
    pub fn spawn(
        name: &'static str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Self, Error> {
        let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
        let handle = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _done = done_tx;
                f()
            })
            .map_err(|source| Error::Thread { name, source })?;
        Ok(Worker { handle, done })
    }

    /// True once the thread has ended.
    pub fn finished(&self) -> bool {
        matches!(
            self.done.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
    }

    /// Waits up to `timeout` for the thread to end; true if it has.
    fn wait(&self, timeout: Duration) -> bool {
        matches!(
            self.done.recv_timeout(timeout),
            Err(RecvTimeoutError::Disconnected)
        )
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
    /// The database was deleted or replaced under the store while running.
    pub database_replaced: bool,
}

impl FlushReport {
    /// True when everything received is in the database (or, refused by
    /// it for good, in the dead-letter file).
    pub fn clean(&self) -> bool {
        !self.persister_panicked
            && self.receiver_error.is_none()
            && !self.spilled
            && self.lost == 0
            && !self.database_replaced
    }
}

/// Owns everything still in flight: the receiver and persister threads, the
/// channel between them, and what the persister holds. Dropping it stops
/// the threads, then commits every uncommitted reading in ONE transaction
/// (after retrying, under its own id, a batch whose write had failed), or
/// spills them.
pub struct ShutdownGuard {
    /// Joined first: its tail is what it read after the stop.
    pub receiver: Option<Worker<Result<Chunk, Error>>>,
    /// Joined second; a panic here is reported, and what it held is salvaged.
    pub persister: Option<Worker<()>>,
    /// A second handle on the channel, so what is queued survives the
    /// persister (a panicking thread drops its own handle).
    rx: Receiver<Chunk>,
    shared: Arc<Shared>,
    /// How long the database may make a stop wait: `--busy-timeout`.
    busy_timeout: Duration,
    /// Set once the flush ran, so `Drop` after `finish` does nothing.
    report: Option<FlushReport>,
}

/// The readings the final flush must commit: perhaps a batch to retry
/// under its old id, then the rest.
struct Uncommitted {
    retry: Option<(BatchId, Arc<Batch>)>,
    /// Not admitted yet (`delivery`): the flush admits them.
    rest: Vec<Reading>,
    /// The id the rest is committed under, and spilled with.
    rest_id: BatchId,
}

impl ShutdownGuard {
    pub fn new(rx: Receiver<Chunk>, shared: Arc<Shared>, busy_timeout: Duration) -> Self {
        ShutdownGuard {
            receiver: None,
            persister: None,
            rx,
            shared,
            busy_timeout,
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
        let deadline = Instant::now()
            .checked_add(self.busy_timeout.saturating_add(STOP_GRACE))
            .unwrap_or_else(far_future);
        // A persister sleeping until its batch is due stops now.
        if let Some(persister) = &self.persister {
            persister.handle.thread().unpark();
        }
        let mut tail = Chunk::default();
        if let Some(receiver) = self.receiver.take() {
            match receiver.handle.join() {
                Ok(Ok(readings)) => tail = readings,
                Ok(Err(e)) => report.receiver_error = Some(e.to_string()),
                Err(_) => report.receiver_error = Some("the receiver thread panicked".into()),
            }
        }
        let mut persister_stuck = false;
        if let Some(persister) = self.persister.take() {
            let stopped = self.await_or_abandon(deadline, "the persister's write", |wait| {
                persister.wait(wait).then_some(())
            });
            if stopped.is_some() {
                if persister.handle.join().is_err() {
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
                rest_id: self.shared.next_id(),
            }
        };
        // The receiver has stopped, so nothing more arrives; empty the channel.
        {
            let mut acks = lock(&self.shared.acks);
            for chunk in self.rx.try_iter().chain([tail]) {
                acks.taken(chunk.readings.len(), chunk.acks);
                uncommitted.rest.extend(chunk.readings);
            }
        }
        if uncommitted.retry.is_some() || !uncommitted.rest.is_empty() {
            let uncommitted = if persister_stuck {
                warn!("the persister did not stop in time; spilling what it held");
                Some(uncommitted)
            } else {
                self.final_flush(uncommitted, deadline)
            };
            if let Some(uncommitted) = uncommitted {
                self.spill(uncommitted, &mut report);
            }
        }
        report.database_replaced = lock(&self.shared.store).replaced();
        self.report = Some(report.clone());
        report
    }

    /// True once slow work must be abandoned: a second signal, or the
    /// stop's deadline passed.
    fn hurry(&self, deadline: Instant) -> bool {
        self.shared.shutdown.forced() || Instant::now() >= deadline
    }

    /// Polls `answer` until it gives one. Once the stop must hurry (a
    /// second signal, or past `deadline`) it interrupts the store, again on
    /// every poll, as an interrupt between two statements is lost, and
    /// gives up (None) if no answer came `FORCED_GRACE` later. `phase`
    /// names what is abandoned, for the log.
    fn await_or_abandon<T>(
        &self,
        deadline: Instant,
        phase: &str,
        mut answer: impl FnMut(Duration) -> Option<T>,
    ) -> Option<T> {
        let mut hurried_at: Option<Instant> = None;
        loop {
            if let Some(answer) = answer(Duration::from_millis(20)) {
                return Some(answer);
            }
            if self.hurry(deadline) {
                let since = *hurried_at.get_or_insert_with(|| {
                    if self.shared.shutdown.forced() {
                        warn!("second signal: interrupting {phase}");
                    } else {
                        warn!("{phase} is still waiting on the database after --busy-timeout; interrupting it");
                    }
                    Instant::now()
                });
                (self.shared.interrupt)();
                if since.elapsed() > FORCED_GRACE {
                    return None;
                }
            }
        }
    }

    /// Commits the uncommitted readings on a helper thread, so a second
    /// signal or the deadline can abandon it. Returns what did not commit.
    fn final_flush(
        &mut self,
        mut uncommitted: Uncommitted,
        deadline: Instant,
    ) -> Option<Uncommitted> {
        // Sequenced readings are admitted in arrival order before sorting,
        // on the flusher, which can load their streams. Without any, the
        // rest is sorted here and written as it is: no copy of it is made.
        // The receiver has stopped, so the second core is free to sort.
        let sequenced = uncommitted.rest.iter().any(|r| r.sequence().is_some());
        if !sequenced {
            store::sort_for_index_on_two_threads(&mut uncommitted.rest);
        }
        let started = Instant::now();
        let shared = Arc::clone(&self.shared);
        let rest = Arc::new(std::mem::take(&mut uncommitted.rest));
        let (retry, rest_for_flusher) = (uncommitted.retry.clone(), Arc::clone(&rest));
        let id = uncommitted.rest_id;
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let flusher = thread::Builder::new()
            .name("flusher".into())
            .spawn(move || {
                let mut store = lock(&shared.store);
                let mut outcome = FlushOutcome::default();
                let result = (|| {
                    if let Some((id, batch)) = &retry {
                        outcome.retry_refused =
                            Some(store.write_batch(*id, &batch.readings, &batch.streams)?);
                    }
                    if sequenced {
                        let batch = admit(&shared, &mut **store, &rest_for_flusher)?;
                        let written = store.write_batch(id, &batch.readings, &batch.streams);
                        outcome.rest = Some(batch);
                        outcome.rest_refused = Some(written?);
                    } else if !rest_for_flusher.is_empty() {
                        outcome.rest_refused =
                            Some(store.write_batch(id, &rest_for_flusher, &[])?);
                    }
                    Ok(())
                })();
                // The guard may have given up waiting; then nobody listens.
                let _ = done_tx.send((outcome, result));
            });
        let answer = match flusher {
            Ok(_) => self.await_or_abandon(deadline, "the final flush", |wait| {
                match done_rx.recv_timeout(wait) {
                    Ok(outcome) => Some(outcome),
                    Err(RecvTimeoutError::Disconnected) => Some((
                        FlushOutcome::default(),
                        Err(Error::database("final flush", "the flush thread panicked")),
                    )),
                    Err(RecvTimeoutError::Timeout) => None,
                }
            }),
            Err(e) => Some((
                FlushOutcome::default(),
                Err(Error::Thread {
                    name: "flusher",
                    source: e,
                }),
            )),
        };
        let (outcome, result) = answer.unwrap_or_else(|| {
            warn!(
                "the final flush did not answer in time; spilling its readings under their \
                 batch ids (the next start imports them only if they did not commit)"
            );
            (
                FlushOutcome::default(),
                Err(Error::database("final flush", "abandoned")),
            )
        });
        let mut committed = 0;
        if let (Some(refused), Some((_, batch))) = (&outcome.retry_refused, &uncommitted.retry) {
            self.shared.committed(batch.readings.len(), refused);
            committed += batch.readings.len() - refused.len();
            uncommitted.retry = None;
        }
        match (outcome.rest, &outcome.rest_refused) {
            (Some(batch), Some(refused)) => {
                self.shared.count_admitted(&batch.admitted);
                self.shared.committed(batch.readings.len(), refused);
                committed += batch.readings.len() - refused.len();
            }
            // Admitted, not committed: spilled as admitted.
            (Some(batch), None) => {
                self.shared.count_admitted(&batch.admitted);
                uncommitted.rest = batch.readings;
            }
            (None, Some(refused)) => {
                self.shared.committed(rest.len(), refused);
                committed += rest.len() - refused.len();
            }
            (None, None) => uncommitted.rest = Arc::unwrap_or_clone(rest),
        }
        Ledger::add(&self.shared.ledger.flushed_at_shutdown, committed as u64);
        match result {
            Ok(()) => {
                info!(
                    "final flush committed {committed} readings in {:.3}s",
                    started.elapsed().as_secs_f64()
                );
                let mut acks = lock(&self.shared.acks);
                acks.all_committed(&lock(&self.shared.delivery));
                None
            }
            Err(e) => {
                error!("final flush failed: {e}");
                Some(uncommitted)
            }
        }
    }

    /// Writes what did not commit to the spill file, each batch under the
    /// id it was attempted with.
    fn spill(&self, uncommitted: Uncommitted, report: &mut FlushReport) {
        let mut batches = Vec::new();
        if let Some((id, batch)) = uncommitted.retry {
            batches.push(SpillBatch {
                id: Some(id),
                readings: Arc::unwrap_or_clone(batch).readings,
            });
        }
        if !uncommitted.rest.is_empty() {
            batches.push(SpillBatch {
                id: Some(uncommitted.rest_id),
                readings: uncommitted.rest,
            });
        }
        let count: u64 = batches.iter().map(|b| b.readings.len() as u64).sum();
        report.spilled = true;
        let path = self.shared.spill.path().display();
        match self.shared.spill.write(&batches) {
            Ok(()) => {
                Ledger::add(&self.shared.ledger.spilled, count);
                info!("spilled {count} readings to {path}");
            }
            Err(e) => {
                Ledger::add(&self.shared.ledger.lost, count);
                error!("{e}; {count} readings could not be spilled and are lost");
                report.lost = count;
            }
        }
    }
}

/// How far the final flush got: each write that committed, with what the
/// database refused in it.
#[derive(Default)]
struct FlushOutcome {
    retry_refused: Option<Vec<Refusal>>,
    /// The rest, once admitted.
    rest: Option<FlushBatch>,
    rest_refused: Option<Vec<Refusal>>,
}

/// The final flush's own batch: the rest, admitted and sorted.
struct FlushBatch {
    readings: Vec<Reading>,
    streams: Vec<crate::delivery::StreamUpdate>,
    /// What admission set aside, counted once the guard has the answer.
    admitted: crate::delivery::Admitted,
}

/// Admits `rest` (in arrival order, loading the streams it needs) and
/// sorts what it keeps.
fn admit(
    shared: &Shared,
    store: &mut dyn store::Store,
    rest: &[Reading],
) -> Result<FlushBatch, Error> {
    shared.load_streams(store, rest)?;
    let mut admitted = lock(&shared.delivery).admit(rest.to_vec());
    let mut readings = std::mem::take(&mut admitted.readings);
    let streams = std::mem::take(&mut admitted.streams);
    store::sort_for_index_on_two_threads(&mut readings);
    Ok(FlushBatch {
        readings,
        streams,
        admitted,
    })
}

/// A deadline that never comes, for a timeout too long to add to now.
fn far_future() -> Instant {
    // About 30 years: far beyond any stop, and representable on every
    // platform's monotonic clock.
    Instant::now() + Duration::from_secs(1 << 30)
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
