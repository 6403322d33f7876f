//! `sensord serve`: wires the receiver and persister threads to a socket
//! and a store, logs counters while they run, and hands over to the
//! shutdown guard when asked to stop.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info};

use crate::error::Error;
use crate::ledger::{Counts, Ledger};
use crate::persister::{BatchConfig, Persister, Shared};
use crate::reading::Format;
use crate::receiver::{self, Cidr, Receiver};
use crate::shutdown::{FlushReport, Shutdown, ShutdownGuard, Worker};
use crate::spill::Spill;
use crate::store::Store;

/// The most readings in one chunk handed from receiver to persister.
const CHUNK: usize = 1024;

/// How the daemon runs, from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    pub batch: BatchConfig,
    /// The most readings queued between receiver and persister.
    pub queue_capacity: usize,
    /// How often to log counters; zero turns it off.
    pub stats_interval: Duration,
    /// Sources allowed to send; empty allows all.
    pub allow: Vec<Cidr>,
    /// How long the database may make a stop wait, beyond a few seconds.
    pub busy_timeout: Duration,
    /// How datagrams are read.
    pub format: Format,
}

/// What a run did, for the shutdown line and the exit code.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub counts: Counts,
    pub flush: FlushReport,
}

impl Outcome {
    /// The one line logged at exit.
    pub fn shutdown_line(&self) -> String {
        let c = &self.counts;
        format!(
            "shutdown complete: received={} accepted={} rejected={}{} persisted={} \
             flushed_at_shutdown={} spilled={} dead_letter={} lost={} denied={} \
             kernel_drops={} unread={}",
            c.received,
            c.accepted,
            c.rejected,
            c.reasons(),
            c.persisted,
            c.flushed_at_shutdown,
            c.spilled,
            c.dead_letter,
            c.lost,
            c.denied,
            c.kernel_drops,
            c.unread
        )
    }

    /// True when everything received is in the database, or refused by it
    /// for good and in the dead-letter file.
    pub fn clean(&self) -> bool {
        self.flush.clean() && self.counts.lost == 0
    }
}

/// Runs the daemon on `socket` until `shutdown` is triggered, then flushes
/// everything in flight. The socket and trigger are parameters so tests can
/// bind `127.0.0.1:0` and stop it themselves.
pub fn run(
    socket: UdpSocket,
    store: Box<dyn Store>,
    spill: Spill,
    config: Config,
    shutdown: Shutdown,
) -> Result<Outcome, Error> {
    let ledger = Arc::new(Ledger::default());
    let chunk = CHUNK.min(config.queue_capacity.max(1));
    let (tx, rx) = crossbeam_channel::bounded((config.queue_capacity / chunk).max(1));
    let counter_socket = socket.try_clone().map_err(|source| Error::Io {
        what: "clone the socket",
        source,
    })?;
    let local = socket.local_addr().map_err(|source| Error::Io {
        what: "read the bound address",
        source,
    })?;
    let shared = Arc::new(Shared::new(
        store,
        Arc::clone(&ledger),
        shutdown.clone(),
        spill,
    ));
    let persister = Persister::new(rx.clone(), Arc::clone(&shared), config.batch.clone());
    let mut guard = ShutdownGuard::new(rx, shared, config.busy_timeout);
    let persister = Worker::spawn("persister", move || persister.run())?;
    let receiver = Receiver::new(
        socket,
        tx,
        persister.handle.thread().clone(),
        receiver::Settings {
            chunk_size: chunk,
            drain_limit: config.queue_capacity,
            allow: config.allow.clone(),
            format: config.format,
        },
        Arc::clone(&ledger),
        shutdown.clone(),
    );
    guard.persister = Some(persister);
    guard.receiver = Some(Worker::spawn("receiver", move || receiver.run())?);

    if config.allow.is_empty() {
        info!("accepting datagrams from any source (use --allow CIDR to restrict)");
    } else {
        let list: Vec<String> = config.allow.iter().map(Cidr::to_string).collect();
        info!("accepting datagrams only from {}", list.join(", "));
    }
    info!("listening on {local}");

    let mut next_stats = Instant::now() + config.stats_interval;
    let stats_on = !config.stats_interval.is_zero();
    // Wakes at once on a stop request; otherwise looks at the threads every
    // 250 ms, and logs the counters on time.
    loop {
        let mut wait = Duration::from_millis(250);
        if stats_on {
            wait = wait.min(next_stats.saturating_duration_since(Instant::now()));
        }
        if shutdown.wait(wait) {
            break;
        }
        if guard.persister.as_ref().is_some_and(Worker::finished)
            || guard.receiver.as_ref().is_some_and(Worker::finished)
        {
            error!("a worker thread stopped unexpectedly; shutting down");
            break;
        }
        if stats_on && Instant::now() >= next_stats {
            next_stats += config.stats_interval;
            info!(
                "stats: {}",
                ledger.snapshot(receiver::kernel_drops(&counter_socket))
            );
        }
    }
    info!("stopping: reading what the socket holds, then flushing what is queued");
    let flush = guard.finish();
    let counts = ledger.snapshot(receiver::kernel_drops(&counter_socket));
    Ok(Outcome { counts, flush })
}
