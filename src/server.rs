//! `sensord serve`: wires the receiver and persister threads to a socket
//! and a store, logs counters while they run, and hands over to the
//! shutdown guard when asked to stop. `start_up` opens the store and replays
//! a spill file before that, interruptibly.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::acks::Acks;
use crate::error::Error;
use crate::http;
use crate::ledger::{Counts, Ledger};
use crate::persister::{BatchConfig, Persister, Shared};
use crate::reading::Format;
use crate::receiver::{self, Cidr, Receiver};
use crate::retention;
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
    /// Whether sequenced readings are acknowledged (`--acks`).
    pub acks: bool,
}

/// What runs beside ingest, made ready by the caller at start so that a
/// port in use or an unreachable database fails before anything runs.
#[derive(Default)]
pub struct Ops {
    /// `--http`: the bound listener to serve `/metrics`, `/health` and the
    /// dashboard on.
    pub http: Option<http::Listener>,
    /// `--http`: the dashboard API's own store connection, for reading.
    pub dashboard: Option<Box<dyn Store>>,
    /// `--retain`: how long readings are kept, and the store connection
    /// that deletes the older ones.
    pub retention: Option<(Duration, Box<dyn Store>)>,
    /// Spill files imported at start, for `/metrics`.
    pub spill_files_replayed: u64,
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
             flushed_at_shutdown={} spilled={} duplicates={} late={} dead_letter={} lost={} \
             denied={} kernel_drops={} unread={} expired={} buffer_peak={}%",
            c.received,
            c.accepted,
            c.rejected,
            c.reasons(),
            c.persisted,
            c.flushed_at_shutdown,
            c.spilled,
            c.duplicates,
            c.late,
            c.dead_letter,
            c.lost,
            c.denied,
            c.kernel_drops,
            c.unread,
            c.expired,
            crate::ledger::percent(c.buffer_peak)
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
    ops: Ops,
    shutdown: Shutdown,
) -> Result<Outcome, Error> {
    let ledger = Arc::new(Ledger::default());
    Ledger::add(&ledger.spill_files_replayed, ops.spill_files_replayed);
    let chunk = CHUNK.min(config.queue_capacity.max(1));
    let (tx, rx) = crossbeam_channel::bounded((config.queue_capacity / chunk).max(1));
    let counter_socket = socket_clone(&socket)?;
    let local = socket.local_addr().map_err(|source| Error::Io {
        what: "read the bound address",
        source,
    })?;
    let acks = Acks::new(if config.acks {
        Some(socket_clone(&socket)?)
    } else {
        None
    });
    let shared = Arc::new(Shared::new(
        store,
        Arc::clone(&ledger),
        shutdown.clone(),
        spill,
        acks,
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
            acks: config.acks,
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
    // Both stop after the final flush: /health says "stopping" meanwhile,
    // and the retention and dashboard connections close before the
    // persister's, whose close then empties and removes the WAL.
    let mut http = match ops.http {
        Some(listener) => {
            let socket = socket_clone(&counter_socket)?;
            let sources = http::Sources {
                ledger: Arc::clone(&ledger),
                socket,
                shutdown: shutdown.clone(),
            };
            Some(http::start(listener, sources, ops.dashboard)?)
        }
        None => None,
    };
    let retention = match ops.retention {
        Some((retain, store)) => Some(retention::start(store, retain, Arc::clone(&ledger))?),
        None => None,
    };

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
            ledger
                .worker_stopped
                .store(true, std::sync::atomic::Ordering::Relaxed);
            break;
        }
        if stats_on && Instant::now() >= next_stats {
            next_stats += config.stats_interval;
            info!(
                "stats: {}",
                ledger.period_snapshot(receiver::kernel_drops(&counter_socket))
            );
        }
    }
    info!("stopping: reading what the socket holds, then flushing what is queued");
    drop(retention);
    if let Some(http) = http.as_mut() {
        http.close_database();
    }
    let flush = guard.finish();
    let counts = ledger.snapshot(receiver::kernel_drops(&counter_socket));
    drop(http);
    Ok(Outcome { counts, flush })
}

fn socket_clone(socket: &UdpSocket) -> Result<UdpSocket, Error> {
    socket.try_clone().map_err(|source| Error::Io {
        what: "clone the socket",
        source,
    })
}

/// Opens the store and imports a spill file left by an earlier run, and
/// returns both. A stop request meanwhile interrupts the database work,
/// leaves the spill file as it was (its import is one transaction), and
/// ends start-up.
pub fn start_up(
    db: &str,
    options: &crate::store::Options,
    spill: &Spill,
    skip_bad_spill_lines: bool,
    shutdown: &Shutdown,
) -> Result<(Box<dyn Store>, crate::spill::Replayed), Error> {
    let stopped = |phase: &str| {
        Error::Config(format!(
            "stopped during start-up ({phase}); nothing was imported and the spill file, if \
             any, is kept"
        ))
    };
    let mut store = crate::store::open(db, options).map_err(|e| {
        if shutdown.requested() {
            stopped("opening the database")
        } else {
            e
        }
    })?;
    if shutdown.requested() {
        return Err(stopped("opening the database"));
    }
    let replayed = {
        let _watch = InterruptOnStop::start(shutdown.clone(), store.interrupter());
        spill.replay(store.as_mut(), skip_bad_spill_lines)
    };
    match replayed {
        Err(_) if shutdown.requested() => Err(stopped("replaying the spill file")),
        Err(e) => Err(e),
        Ok(_) if shutdown.requested() => Err(Error::Config(
            "stopped during start-up, after the spill file was imported".into(),
        )),
        Ok(replayed) => Ok((store, replayed)),
    }
}

/// While it lives, a thread interrupts the store as soon as a stop is
/// requested (and again every 50 ms, as an interrupt between two
/// statements is lost). Dropping it ends the thread.
struct InterruptOnStop {
    _done: crossbeam_channel::Sender<()>,
}

impl InterruptOnStop {
    fn start(shutdown: Shutdown, interrupt: crate::store::Interrupter) -> Self {
        let (done, until) = crossbeam_channel::bounded::<()>(0);
        let spawned = std::thread::Builder::new()
            .name("start-up".into())
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    until.recv_timeout(Duration::from_millis(50))
                {
                    if shutdown.requested() {
                        interrupt();
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot watch for stop requests during start-up: {e}");
        }
        InterruptOnStop { _done: done }
    }
}
