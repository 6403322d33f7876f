//! PostgreSQL: several sensord instances writing to one shared database.
//!
//! Each batch is one transaction: a row in `sensord_batches` naming the
//! batch, then the readings by binary `COPY`, then COMMIT. The batch row
//! makes a retry idempotent: when the connection dies during COMMIT nobody
//! knows whether it landed, so the retry inserts the batch id first and, if
//! it is already there, stops without writing the readings again.
//!
//! A reading the server refuses for good (see `is_permanent`) must not hold
//! back the others: the batch is redone in a new transaction, the readings
//! inserted by bisection under savepoints, and the refused ones returned.
//! Only when nothing fails does a batch take the fast path: one `COPY`, no
//! savepoints.
//!
//! Every wait is bounded: a connect by its timeout (the whole handshake,
//! not just the TCP connect), every statement by `statement_timeout` and
//! every lock wait by `lock_timeout`, both `--busy-timeout`, and a dead peer
//! by TCP keepalives and `tcp_user_timeout`. At start-up, a stop request
//! ends any of these waits at once.
//!
//! The connection is opened lazily and dropped on any error; the next
//! attempt (the persister retries with backoff) reconnects.
//!
//! Credentials never reach a message: the database is named by
//! `postgres://USER@HOST:PORT/DBNAME`, built from the parsed settings. The
//! password comes from the URL (user info or `password=`), else the
//! `PGPASSWORD` variable, else `--db-password-file`, as libpq orders them.
//!
//! TLS (rustls): `sslmode=disable`, `allow` and `prefer` connect without it,
//! as before; `require` encrypts without checking the certificate (as libpq
//! does without a root certificate); `verify-full` checks the certificate
//! against `sslrootcert=FILE` and the host name.
//!
//! Timestamps are stored as `timestamptz`, which holds microseconds:
//! readings' unix seconds are rounded to the nearest microsecond.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{info, warn};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::config::{Host, SslMode};
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{CancelToken, Client, Config, NoTls, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    BatchId, Expired, Filter, Imported, Interrupter, NameKeys, Options, RawReading, Recent,
    Refusal, SEQUENCE_COLUMNS, SensorRow, SensorSummary, SpillBatch, Store, Summary,
    add_extra_measurements, attach_delivery, delivery_from_row, delivery_sql, per_sensor_sql,
    stream_from_row,
};
use crate::delivery::{StreamKey, StreamRecord, StreamUpdate};
use crate::error::{Error, io_cause};
use crate::reading::{NAME_KEYS, Reading, SensorId};
use crate::shutdown::Shutdown;

/// Batch ids of this run kept in `sensord_batches` besides the newest: only
/// the newest can be in doubt, the rest are kept for people debugging.
const KEPT_BATCH_IDS: i64 = 16;
/// Rows of `sensord_batches` older than this are pruned when a store opens,
/// except each run's newest `KEPT_BATCH_IDS + 1`: those are the ids a spill
/// file of that run can name (its in-flight batch and its final flush), and
/// replaying it, however late, must find them.
const BATCH_ID_RETENTION: &str = "7 days";
/// Key of the advisory lock that serialises schema creation across instances.
const SCHEMA_LOCK: i64 = 0x5e45_50d0;
/// Applied unless the URL sets them: a dead peer must not hang a write
/// forever (unacknowledged data fails the connection after this long).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive probes start after this much idle time unless the URL says
/// otherwise (the driver's default, two hours, finds a dead peer too late;
/// the probes then fail a connection whose peer is gone even while nothing
/// is sent, which `tcp_user_timeout` does not).
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// How often a wait on a connect looks at the interrupt flag and the stop
/// trigger.
const POLL: Duration = Duration::from_millis(20);

/// The columns of a measurements row, in `COPY` order, with their types as
/// `COPY` sends them and as `format_type` names them.
const COLUMNS: [(&str, Type, &str); 8] = [
    ("sensor_id", Type::INT8, "bigint"),
    ("temperature", Type::FLOAT8, "double precision"),
    ("humidity", Type::FLOAT8, "double precision"),
    ("ingested_at", Type::TIMESTAMPTZ, "timestamp with time zone"),
    ("received_at", Type::TIMESTAMPTZ, "timestamp with time zone"),
    ("extra", Type::JSONB, "jsonb"),
    ("seq", Type::INT8, "bigint"),
    ("boot", Type::INT8, "bigint"),
];

/// A table in a PostgreSQL database.
pub struct PostgresStore {
    config: Config,
    /// How connections are encrypted, per `sslmode`.
    tls: Tls,
    /// `postgres://USER@HOST:PORT/DBNAME`, built from `config`: what
    /// messages call the database. Never holds the password.
    url: String,
    /// The measurements table; validated as an identifier, so it can be
    /// quoted into SQL as is.
    table: String,
    /// The open connection, if any; `None` after an error.
    client: Option<Client>,
    /// A connect still running on its helper thread after its caller gave
    /// up on it. The next connect waits on it instead of starting another,
    /// so a server that accepts and never answers holds one thread, not one
    /// per attempt.
    connecting: Option<Receiver<Result<Client, postgres::Error>>>,
    /// The current connection's cancel token, for the interrupter.
    cancel: Arc<Mutex<Option<CancelToken>>>,
    /// Set by the interrupter; a connect being waited for gives up on it.
    interrupted: Arc<AtomicBool>,
    /// Sensor names' keys (in `sensor_names`, shared by every table).
    names: NameKeys,
}

/// How connections are encrypted.
#[derive(Clone)]
enum Tls {
    /// `sslmode=disable`, `allow` or `prefer`: plain TCP, as libpq's
    /// `prefer` ends up against a server without TLS.
    None,
    /// `sslmode=require` or `verify-full`: the server must speak TLS.
    Rustls(MakeRustlsConnect),
}

impl Tls {
    fn connect(&self, config: &Config) -> Result<Client, postgres::Error> {
        match self {
            Tls::None => config.connect(NoTls),
            Tls::Rustls(tls) => config.connect(tls.clone()),
        }
    }

    fn cancel(&self, token: &CancelToken) -> Result<(), postgres::Error> {
        match self {
            Tls::None => token.cancel_query(NoTls),
            Tls::Rustls(tls) => token.cancel_query(tls.clone()),
        }
    }
}

/// Why one attempt failed.
enum Failure {
    /// The server's or client library's error.
    Sql(postgres::Error),
    /// The interrupter fired while connecting.
    Interrupted,
    /// The connect did not finish within its timeout.
    TimedOut(Duration),
    /// The measurements table exists with columns sensord cannot use.
    Schema(String),
    /// A failure injected by a test.
    #[cfg(feature = "failpoints")]
    Injected,
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Failure::Sql(e)
    }
}

impl Failure {
    fn cause(&self) -> String {
        match self {
            Failure::Sql(e) => cause(e),
            Failure::Interrupted => "interrupted while connecting".to_string(),
            Failure::TimedOut(after) => format!(
                "no connection within {} (the server did not complete the handshake)",
                humantime::format_duration(*after)
            ),
            Failure::Schema(mismatch) => mismatch.clone(),
            #[cfg(feature = "failpoints")]
            Failure::Injected => "injected failure".to_string(),
        }
    }
}

/// True for errors that retrying the same rows cannot fix, so the readings
/// behind them are isolated and refused rather than retried forever:
///
/// - class 22, data exception (a value out of range for its column, an
///   invalid time, ...);
/// - class 23, integrity constraint violation (CHECK, NOT NULL, UNIQUE,
///   foreign key, exclusion: constraints someone added to the table);
/// - 42804, datatype mismatch;
/// - P0001, raise exception (a trigger refusing a row).
///
/// Everything else is transient and retried: lock and statement timeouts
/// (55P03, 57014), a lost or refused connection, a full disk (53100), a
/// server shutting down, serialization failures (40001), and missing or
/// changed tables or columns (class 42 otherwise), which an operator can
/// fix while sensord retries.
pub fn is_permanent(e: &postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        let code = code.code();
        code.starts_with("22") || code.starts_with("23") || code == "42804" || code == "P0001"
    })
}

/// One line saying why `e` happened: the server's message where there is
/// one, else the client library's, followed by its root causes (the
/// library's own text is often just "error connecting to server").
fn cause(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = inner.source();
    }
    strip_os_errors(&text)
}

/// `text` without the " (os error N)" that `io::Error` appends.
fn strip_os_errors(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(" (os error ") {
        out.push_str(&rest[..at]);
        rest = rest[at..].find(')').map_or("", |end| &rest[at + end + 1..]);
    }
    out.push_str(rest);
    out
}

impl PostgresStore {
    /// Connects to `url` and creates the schema if missing, or checks that
    /// an existing table has the columns sensord writes. A stop request
    /// (`options.stop`) ends the wait for either at once.
    pub fn open(url: &str, options: &Options) -> Result<Self, Error> {
        let mut store = Self::new(url, options, true)?;
        let created = interruptible(options.stop.as_ref(), store.interrupter(), || {
            store.create_schema()
        })
        .map_err(|e| store.start_up_error(&e, options.stop.as_ref()))?;
        if created {
            info!("created table {} in {}", store.table, store.url);
        }
        Ok(store)
    }

    /// Connects to `url` for reading; the table must exist. Statements are
    /// not cut short (a summary of a large table takes a while); lock waits
    /// and the connect are.
    pub fn open_existing(url: &str, options: &Options) -> Result<Self, Error> {
        let mut store = Self::new(url, options, false)?;
        let table = store.table.clone();
        let checked = interruptible(options.stop.as_ref(), store.interrupter(), || {
            let client = store.client()?;
            let exists: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted(&table)])?
                .try_get(0)?;
            if !exists {
                return Ok(false);
            }
            check_columns(client, &table)?;
            Ok(true)
        });
        if !checked.map_err(|e| store.start_up_error(&e, options.stop.as_ref()))? {
            return Err(Error::Open {
                db: store.url.clone(),
                cause: format!("no table {table}"),
            });
        }
        Ok(store)
    }

    /// Parses `url` and applies `options`; does not connect yet.
    /// `bounded_statements` sets `statement_timeout` as well as
    /// `lock_timeout`.
    fn new(url: &str, options: &Options, bounded_statements: bool) -> Result<Self, Error> {
        let (url, ssl) = take_ssl_params(url)?;
        let mut config: Config = url.parse().map_err(|e: postgres::Error| {
            Error::Config(format!("--db is not a valid PostgreSQL URL: {}", cause(&e)))
        })?;
        let display = display_url(&config);
        let tls = ssl.connector().map_err(|cause| Error::Open {
            db: display.clone(),
            cause,
        })?;
        if matches!(tls, Tls::Rustls(_)) {
            config.ssl_mode(SslMode::Require);
        }
        set_password(&mut config, options.password_file.as_ref())?;
        let timeout = options.busy_timeout.max(Duration::from_millis(1));
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        // Keepalives are on unless the URL turns them off; only the
        // driver's default idle time is replaced.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        if config.get_application_name().is_none() {
            config.application_name("sensord");
        }
        let mut session = config.get_options().unwrap_or_default().to_string();
        let mut limit = |name: &str| {
            if !session.contains(name) {
                session = format!("{session} -c {name}={}ms", timeout.as_millis())
                    .trim_start()
                    .to_string();
            }
        };
        limit("lock_timeout");
        if bounded_statements {
            limit("statement_timeout");
        }
        config.options(&session);
        Ok(PostgresStore {
            config,
            tls,
            url: display,
            table: options.table.clone(),
            client: None,
            connecting: None,
            cancel: Arc::new(Mutex::new(None)),
            interrupted: Arc::new(AtomicBool::new(false)),
            names: NameKeys::default(),
        })
    }

    /// The error that ends start-up: a stop request says so, anything else
    /// names its cause.
    fn start_up_error(&self, e: &Failure, stop: Option<&Shutdown>) -> Error {
        let cause = if stop.is_some_and(Shutdown::requested) {
            "interrupted by a stop request".to_string()
        } else {
            e.cause()
        };
        Error::Open {
            db: self.url.clone(),
            cause,
        }
    }

    /// The open connection, connecting first if there is none.
    fn client(&mut self) -> Result<&mut Client, Failure> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.disconnect();
        }
        if self.client.is_none() {
            let client = self.connect()?;
            *self.cancel.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(client.cancel_token());
            self.client = Some(client);
        }
        // Just ensured to be Some.
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn disconnect(&mut self) {
        *self.cancel.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.client = None;
    }

    /// Connects on a helper thread, giving up after the connect timeout or
    /// when interrupted: the driver bounds only the TCP connect, and a
    /// server that accepts TCP but never answers would hang the handshake
    /// for good. An abandoned connect is kept in `connecting` for the next
    /// call.
    fn connect(&mut self) -> Result<Client, Failure> {
        let timeout = self
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let deadline = Instant::now() + timeout;
        let done_rx = match self.connecting.take() {
            Some(pending) => pending,
            None => {
                let (done_tx, done_rx) = crossbeam_channel::bounded(1);
                let (config, tls) = (self.config.clone(), self.tls.clone());
                thread::Builder::new()
                    .name("pg-connect".into())
                    .spawn(move || {
                        // Nobody listens if the connect was abandoned for good.
                        let _ = done_tx.send(tls.connect(&config));
                    })
                    .map_err(|_| Failure::Interrupted)?;
                done_rx
            }
        };
        loop {
            match done_rx.recv_timeout(POLL) {
                Ok(result) => return result.map_err(Failure::Sql),
                Err(RecvTimeoutError::Timeout) => {
                    let interrupted = self.interrupted.load(Ordering::SeqCst);
                    if interrupted || Instant::now() >= deadline {
                        self.connecting = Some(done_rx);
                        return Err(if interrupted {
                            Failure::Interrupted
                        } else {
                            Failure::TimedOut(timeout)
                        });
                    }
                }
                // The connect thread panicked.
                Err(RecvTimeoutError::Disconnected) => return Err(Failure::Interrupted),
            }
        }
    }

    /// Creates the tables and index if missing, under an advisory lock so
    /// instances starting together do it once, and checks the columns of
    /// an existing measurements table. Returns true if this call created
    /// the measurements table.
    fn create_schema(&mut self) -> Result<bool, Failure> {
        let table = quoted(&self.table);
        let index = quoted(&format!("{}_sensor_time", self.table));
        let name = self.table.clone();
        let url = self.url.clone();
        let client = self.client()?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])?
            .try_get(0)?;
        if exists && check_columns(&mut tx, &name)? == Columns::Older {
            // Each takes the table's ACCESS EXCLUSIVE lock, so only when
            // needed; adding a nullable column rewrites nothing.
            tx.batch_execute(&format!(
                "ALTER TABLE {table} ALTER COLUMN temperature DROP NOT NULL,
                                     ALTER COLUMN humidity DROP NOT NULL,
                                     ADD COLUMN IF NOT EXISTS extra jsonb,
                                     ADD COLUMN IF NOT EXISTS seq bigint,
                                     ADD COLUMN IF NOT EXISTS boot bigint;"
            ))?;
            info!(
                "upgraded table {name} in {url}: measurements optional, extra, seq and boot \
                 columns added"
            );
        }
        let (first_key, last_key) = (NAME_KEYS.start, NAME_KEYS.end - 1);
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 sensor_id   bigint           NOT NULL,
                 temperature double precision,
                 humidity    double precision,
                 ingested_at timestamptz      NOT NULL,
                 received_at timestamptz      NOT NULL,
                 extra       jsonb,
                 seq         bigint,
                 boot        bigint
             );
             CREATE SEQUENCE IF NOT EXISTS sensor_names_key AS bigint
                 MINVALUE {first_key} MAXVALUE {last_key} START {first_key};
             CREATE TABLE IF NOT EXISTS sensor_names (
                 key  bigint PRIMARY KEY DEFAULT nextval('sensor_names_key'),
                 name text   NOT NULL UNIQUE
             );
             CREATE INDEX IF NOT EXISTS {index} ON {table} (sensor_id, ingested_at);
             CREATE TABLE IF NOT EXISTS sensord_batches (
                 run          bigint      NOT NULL,
                 seq          bigint      NOT NULL,
                 committed_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (run, seq)
             );
             CREATE TABLE IF NOT EXISTS sensord_sequences (
                 table_name text             NOT NULL,
                 sensor_id  bigint           NOT NULL,
                 boot       bigint           NOT NULL,
                 base       bigint           NOT NULL,
                 highest    bigint           NOT NULL,
                 received   bigint           NOT NULL,
                 duplicates bigint           NOT NULL,
                 reordered  bigint           NOT NULL,
                 late       bigint           NOT NULL,
                 first_seen double precision NOT NULL,
                 last_seen  double precision NOT NULL,
                 missing    text             NOT NULL,
                 PRIMARY KEY (table_name, sensor_id, boot)
             );
             CREATE TABLE IF NOT EXISTS sensord_spill_imports (
                 table_name  text        NOT NULL,
                 spill_key   text        NOT NULL,
                 readings    bigint      NOT NULL,
                 imported_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (table_name, spill_key)
             );
             DELETE FROM sensord_batches old
                 WHERE committed_at < now() - interval '{BATCH_ID_RETENTION}'
                   AND seq < (SELECT max(seq) FROM sensord_batches newest
                              WHERE newest.run = old.run) - {KEPT_BATCH_IDS};"
        ))?;
        tx.commit()?;
        Ok(!exists)
    }

    /// One attempt at writing a batch: the fast path, then, if a reading
    /// was refused for good, the batch again with the refused ones
    /// isolated. Returns None if the batch had already been committed (by
    /// an attempt whose COMMIT went unanswered).
    fn try_write(
        &mut self,
        id: BatchId,
        readings: &[Reading],
        streams: &[StreamUpdate],
    ) -> Result<Option<Vec<Refusal>>, Failure> {
        let table = self.table.clone();
        // Stored as bigint: the bits matter, not the sign.
        let (run, seq) = (id.run as i64, id.seq as i64);
        self.client()?;
        let client = self.client.as_mut().expect("connected above");
        let names = &mut self.names;
        let attempt = |client: &mut Client, names: &mut NameKeys, isolate: bool| {
            let mut tx = client.transaction()?;
            let fresh = tx.execute(
                "INSERT INTO sensord_batches (run, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&run, &seq],
            )?;
            if fresh == 0 {
                return Ok(None);
            }
            resolve_names(&mut tx, names, readings)?;
            let refused = if isolate {
                insert_isolating(&mut tx, &table, names, readings)?
            } else {
                copy_in(&mut tx, &table, names, readings)?;
                Vec::new()
            };
            save_streams(&mut tx, names, &table, streams)?;
            tx.execute(
                "DELETE FROM sensord_batches WHERE run = $1 AND seq < $2",
                &[&run, &(seq - KEPT_BATCH_IDS)],
            )?;
            tx.commit()?;
            Ok::<_, postgres::Error>(Some(refused))
        };
        let result = match remembering(names, |names| attempt(client, names, false)) {
            Err(e) if is_permanent(&e) => remembering(names, |names| attempt(client, names, true))?,
            other => other?,
        };
        // Tests lose the COMMIT's answer here.
        #[cfg(feature = "failpoints")]
        if result.is_some() {
            fail::fail_point!("postgres::after_commit", |_| Err(Failure::Injected));
        }
        Ok(result)
    }

    /// One attempt at importing a spill file (see `Store::import_spill`).
    fn try_import(
        &mut self,
        key: &str,
        batches: &[SpillBatch],
        streams: &[StreamUpdate],
    ) -> Result<Option<Imported>, Failure> {
        let table = self.table.clone();
        let in_file: usize = batches.iter().map(|b| b.readings.len()).sum();
        self.client()?;
        let client = self.client.as_mut().expect("connected above");
        let names = &mut self.names;
        let attempt = |client: &mut Client, names: &mut NameKeys, isolate: bool| {
            let mut tx = client.transaction()?;
            let fresh = tx.execute(
                "INSERT INTO sensord_spill_imports (table_name, spill_key, readings)
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&table, &key, &(in_file as i64)],
            )?;
            if fresh == 0 {
                return Ok(None);
            }
            let mut readings = Vec::with_capacity(in_file);
            let mut skipped = 0;
            for batch in batches {
                if let Some(id) = batch.id {
                    let fresh = tx.execute(
                        "INSERT INTO sensord_batches (run, seq) VALUES ($1, $2)
                         ON CONFLICT DO NOTHING",
                        &[&(id.run as i64), &(id.seq as i64)],
                    )?;
                    if fresh == 0 {
                        info!(
                            "spill file batch {:016x}/{} was committed before; not importing it again",
                            id.run, id.seq
                        );
                        skipped += batch.readings.len() as u64;
                        continue;
                    }
                }
                readings.extend_from_slice(&batch.readings);
            }
            resolve_names(&mut tx, names, &readings)?;
            let refused = if isolate {
                insert_isolating(&mut tx, &table, names, &readings)?
            } else {
                copy_in(&mut tx, &table, names, &readings)?;
                Vec::new()
            };
            save_streams(&mut tx, names, &table, streams)?;
            tx.commit()?;
            Ok::<_, postgres::Error>(Some(Imported {
                stored: (readings.len() - refused.len()) as u64,
                skipped,
                refused,
            }))
        };
        Ok(
            match remembering(names, |names| attempt(client, names, false)) {
                Err(e) if is_permanent(&e) => {
                    remembering(names, |names| attempt(client, names, true))?
                }
                other => other?,
            },
        )
    }

    /// The aggregates of `summary`, their averages computed in `numeric`
    /// when `exact` (float8 sums overflow near the type's limits). The
    /// values go to `numeric` through their text, which since PostgreSQL
    /// 12 is the shortest exact form: a direct cast keeps 15 digits, and
    /// f64::MAX would round up out of range on the way back.
    fn try_summary(&mut self, exact: bool, filter: &Filter) -> Result<Summary, postgres::Error> {
        let table = quoted(&self.table);
        let client = self.client.as_mut().expect("connected by summary");
        // A table sensord has not upgraded lacks the names table and the
        // extra column: it has neither.
        let upgraded = client.query_one(
            "SELECT to_regclass('sensor_names') IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1)
                            AND attname = 'extra' AND NOT attisdropped)",
            &[&table],
        )?;
        let (has_names, has_extra): (bool, bool) = (upgraded.try_get(0)?, upgraded.try_get(1)?);
        let condition = filter.sql(|t| format!("to_timestamp({t})"), has_names);
        let last_seen = "EXTRACT(EPOCH FROM MAX(ingested_at))::float8";
        let per_sensor = per_sensor_sql(
            &table,
            &condition,
            last_seen,
            ("temperature", "humidity"),
            has_names,
        );
        let per_sensor = if exact {
            per_sensor
                .replace(
                    "AVG(temperature)",
                    "AVG(temperature::text::numeric)::float8",
                )
                .replace("AVG(humidity)", "AVG(humidity::text::numeric)::float8")
        } else {
            per_sensor
        };
        let totals = client.query_one(
            &format!(
                "SELECT COUNT(*), EXTRACT(EPOCH FROM MIN(ingested_at))::float8,
                        EXTRACT(EPOCH FROM MAX(ingested_at))::float8
                 FROM {table} WHERE {condition}"
            ),
            &[],
        )?;
        let (keys, mut per_sensor): (Vec<i64>, Vec<SensorSummary>) = client
            .query(&per_sensor, &[])?
            .iter()
            .map(|row| {
                let summary = SensorSummary::from_row(
                    |i| row.try_get(i),
                    |i| Ok(row.try_get::<_, Option<f64>>(i)?.unwrap_or(f64::NAN)),
                    |i| row.try_get(i),
                )?;
                Ok((row.try_get::<_, i64>(0)?, summary))
            })
            .collect::<Result<Vec<_>, postgres::Error>>()?
            .into_iter()
            .unzip();
        let extra_fields = if has_extra {
            client
                .query(
                    &format!(
                        "SELECT DISTINCT sensor_id, field.key
                         FROM {table}, jsonb_each(CASE WHEN jsonb_typeof(extra) = 'object'
                             THEN extra END) AS field
                         WHERE jsonb_typeof(field.value) = 'number' AND {condition}"
                    ),
                    &[],
                )?
                .iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect::<Result<Vec<_>, postgres::Error>>()?
        } else {
            Vec::new()
        };
        add_extra_measurements(&mut per_sensor, &keys, extra_fields);
        let has_sequences: bool = client
            .query_one("SELECT to_regclass('sensord_sequences') IS NOT NULL", &[])?
            .try_get(0)?;
        if has_sequences {
            let rows = client
                .query(&delivery_sql("table_name = $1"), &[&self.table])?
                .iter()
                .map(|row| delivery_from_row(|i| row.try_get(i), |i| row.try_get(i)))
                .collect::<Result<Vec<_>, postgres::Error>>()?;
            attach_delivery(&mut per_sensor, &keys, rows);
        }
        let first: Option<f64> = totals.try_get(1)?;
        let last: Option<f64> = totals.try_get(2)?;
        Ok(Summary {
            readings: totals.try_get::<_, i64>(0)? as u64,
            span: first.zip(last),
            per_sensor,
        })
    }
}

/// Runs `work`; a stop request while it runs fires `interrupt` (and again
/// every `POLL`, in case the work had not yet started its next statement),
/// so a connect or statement waiting on the database ends at once.
fn interruptible<T>(
    stop: Option<&Shutdown>,
    interrupt: Interrupter,
    work: impl FnOnce() -> Result<T, Failure>,
) -> Result<T, Failure> {
    let Some(stop) = stop.cloned() else {
        return work();
    };
    let done = Arc::new(AtomicBool::new(false));
    let watching = Arc::clone(&done);
    // Not joined: the watcher ends within a POLL of `done`, and waiting for
    // that would slow every start by as much.
    let watcher = thread::Builder::new()
        .name("pg-stop-watch".into())
        .spawn(move || {
            while !watching.load(Ordering::SeqCst) {
                if stop.wait(POLL) && !watching.load(Ordering::SeqCst) {
                    interrupt();
                    thread::sleep(POLL);
                }
            }
        });
    if watcher.is_err() {
        warn!("cannot start a thread to watch for stop requests; start-up is not interruptible");
    }
    let result = work();
    done.store(true, Ordering::SeqCst);
    result
}

/// What `check_columns` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Columns {
    /// The table as this sensord makes it.
    Current,
    /// A table an earlier sensord made (measurements NOT NULL, no `extra`):
    /// `create_schema` upgrades it.
    Older,
}

/// Checks that `table` has the columns sensord writes, with their types, and
/// that any other column can be left out of an insert (it has a default or
/// takes NULL). The message names the first mismatch. A table of an
/// earlier sensord passes as `Columns::Older`.
fn check_columns(
    client: &mut impl postgres::GenericClient,
    table: &str,
) -> Result<Columns, Failure> {
    let rows = client.query(
        "SELECT attname::text, format_type(atttypid, atttypmod), attnotnull, atthasdef
         FROM pg_attribute
         WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped
         ORDER BY attnum",
        &[&quoted(table)],
    )?;
    let mismatch = |what: String| Err(Failure::Schema(format!("table {table}: {what}")));
    let mut columns = Columns::Current;
    for (name, _, expected) in COLUMNS {
        match rows.iter().find(|row| row.get::<_, String>(0) == name) {
            None if matches!(name, "extra" | "seq" | "boot") => columns = Columns::Older,
            None => return mismatch(format!("column {name} is missing, expected {expected}")),
            Some(row) => {
                let actual: String = row.get(1);
                if actual != expected {
                    return mismatch(format!("column {name} is {actual}, expected {expected}"));
                }
                if matches!(name, "temperature" | "humidity") && row.get::<_, bool>(2) {
                    columns = Columns::Older;
                }
            }
        }
    }
    for row in &rows {
        let name: String = row.get(0);
        let (not_null, has_default): (bool, bool) = (row.get(2), row.get(3));
        if !COLUMNS.iter().any(|(known, _, _)| *known == name) && not_null && !has_default {
            return mismatch(format!(
                "column {name} is NOT NULL without a default, and sensord does not write it"
            ));
        }
    }
    Ok(columns)
}

/// Gives each sensor name among `readings` without a known key its key,
/// adding it to `sensor_names` in `tx` if new there. An instance adding the
/// same name at the same time makes the insert wait for its commit; then
/// the name is there and the second look finds it.
fn resolve_names(
    tx: &mut Transaction<'_>,
    names: &mut NameKeys,
    readings: &[Reading],
) -> Result<(), postgres::Error> {
    resolve_sensor_names(tx, names, readings, &[])
}

/// `resolve_names` for the sensors of `readings` and of `streams`.
fn resolve_sensor_names(
    tx: &mut Transaction<'_>,
    names: &mut NameKeys,
    readings: &[Reading],
    streams: &[StreamUpdate],
) -> Result<(), postgres::Error> {
    for name in names.unknown(readings, streams) {
        let find = "SELECT key FROM sensor_names WHERE name = $1";
        let key = match tx.query_opt(find, &[&name])? {
            Some(row) => row.try_get(0)?,
            None => match tx.query_opt(
                "INSERT INTO sensor_names (name) VALUES ($1) ON CONFLICT (name) DO NOTHING \
                 RETURNING key",
                &[&name],
            )? {
                Some(row) => row.try_get(0)?,
                None => tx.query_one(find, &[&name])?.try_get(0)?,
            },
        };
        names.learn(name, key);
    }
    Ok(())
}

/// Writes the delivery state of `streams` in `tx` (`Store::write_batch`).
fn save_streams(
    tx: &mut Transaction<'_>,
    names: &mut NameKeys,
    table: &str,
    streams: &[StreamUpdate],
) -> Result<(), postgres::Error> {
    if streams.is_empty() {
        return Ok(());
    }
    resolve_sensor_names(tx, names, &[], streams)?;
    let upsert = tx.prepare(&format!(
        "INSERT INTO sensord_sequences (table_name, {SEQUENCE_COLUMNS})
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (table_name, sensor_id, boot) DO UPDATE SET
             base = EXCLUDED.base, highest = EXCLUDED.highest,
             received = EXCLUDED.received, duplicates = EXCLUDED.duplicates,
             reordered = EXCLUDED.reordered, late = EXCLUDED.late,
             first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen,
             missing = EXCLUDED.missing"
    ))?;
    for StreamUpdate { key, record: r } in streams {
        tx.execute(
            &upsert,
            &[
                &table,
                &names.key(key.sensor.as_sensor()),
                &(key.boot as i64),
                &(r.base as i64),
                &(r.highest as i64),
                &(r.received as i64),
                &(r.duplicates as i64),
                &(r.reordered as i64),
                &(r.late as i64),
                &r.first_seen,
                &r.last_seen,
                &r.missing_text(),
            ],
        )?;
    }
    Ok(())
}

/// Runs one attempt at a transaction that may learn name keys, keeping
/// only those of an attempt that committed.
fn remembering<T>(
    names: &mut NameKeys,
    attempt: impl FnOnce(&mut NameKeys) -> Result<T, postgres::Error>,
) -> Result<T, postgres::Error> {
    let result = attempt(names);
    match result {
        Ok(_) => names.committed(),
        Err(_) => names.rolled_back(),
    }
    result
}

/// Extra fields' JSON text, sent as `jsonb` in binary `COPY`: a version
/// byte, then the text, which the server parses.
#[derive(Debug)]
struct Jsonb<'a>(&'a str);

impl ToSql for Jsonb<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// The `COPY` statement that loads readings into `table`.
fn copy_statement(table: &str) -> String {
    format!(
        "COPY {} (sensor_id, temperature, humidity, ingested_at, received_at, extra, seq, boot) \
         FROM STDIN (FORMAT binary)",
        quoted(table)
    )
}

/// Streams `readings` into `table` by binary `COPY`; their names have keys
/// in `names`. A missing value is NULL.
fn copy_in(
    tx: &mut Transaction<'_>,
    table: &str,
    names: &NameKeys,
    readings: &[Reading],
) -> Result<(), postgres::Error> {
    let types = COLUMNS.map(|(_, column_type, _)| column_type);
    let mut writer = BinaryCopyInWriter::new(tx.copy_in(&copy_statement(table))?, &types);
    for r in readings {
        let sequence = r.sequence();
        writer.write(&[
            &names.key(r.sensor()),
            &r.temperature(),
            &r.humidity(),
            &timestamp(r.ingested_at),
            &timestamp(r.received_at),
            &r.extra().map(|e| Jsonb(e.as_str())),
            // Both at most `MAX_SEQ`: they fit an i64.
            &sequence.map(|s| s.seq as i64),
            &sequence.map(|s| s.boot as i64),
        ])?;
    }
    writer.finish()?;
    Ok(())
}

/// Inserts `readings` except those the server refuses for good, which it
/// returns with the server's message. Halves under savepoints: a part that
/// fails permanently is rolled back and split again, down to single
/// readings. k refused readings among n cost about 2k·log2(n) `COPY`s.
fn insert_isolating(
    tx: &mut Transaction<'_>,
    table: &str,
    names: &NameKeys,
    readings: &[Reading],
) -> Result<Vec<Refusal>, postgres::Error> {
    let mut refused = Vec::new();
    let mut parts = vec![readings];
    while let Some(part) = parts.pop() {
        if part.is_empty() {
            continue;
        }
        let mut savepoint = tx.savepoint("sensord_isolate")?;
        match copy_in(&mut savepoint, table, names, part) {
            Ok(()) => savepoint.commit()?,
            Err(e) if is_permanent(&e) => {
                savepoint.rollback()?;
                if let [reading] = part {
                    refused.push(Refusal {
                        reading: reading.clone(),
                        cause: cause(&e),
                    });
                } else {
                    let (low, high) = part.split_at(part.len() / 2);
                    // Popped low first, so the rows go in in their order.
                    parts.extend([high, low]);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(refused)
}

/// Unix seconds as a time exact to the microsecond, rounded to the nearest
/// one (PostgreSQL would truncate). Negative times become the epoch.
pub fn timestamp(seconds: f64) -> SystemTime {
    let seconds = seconds.max(0.0);
    let whole = seconds.trunc();
    // `seconds - whole` is exact; only the scaling by 1e6 rounds.
    let micros = (whole as u64) * 1_000_000 + ((seconds - whole) * 1e6).round() as u64;
    UNIX_EPOCH + Duration::from_micros(micros)
}

/// `name` as a quoted SQL identifier. Table names are validated to letters,
/// digits and underscores, so there is nothing to escape.
fn quoted(name: &str) -> String {
    format!("\"{name}\"")
}

/// `postgres://USER@HOST:PORT/DBNAME` from parsed settings, so that no
/// password, in whatever part of the URL it was, can reach a message.
fn display_url(config: &Config) -> String {
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let ports = config.get_ports();
    let mut hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]"),
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{name}:{port}")
        })
        .collect();
    if hosts.is_empty() {
        hosts = config
            .get_hostaddrs()
            .iter()
            .map(|addr| format!("{addr}"))
            .collect();
    }
    let dbname = config.get_dbname().or(config.get_user()).unwrap_or("");
    format!("postgres://{user}{}/{dbname}", hosts.join(","))
}

/// Fills in the password when the URL has none: `PGPASSWORD`, else the
/// file `--db-password-file` names (its first line). The file is read
/// whenever it is given, so a wrong path fails start-up even when unused.
fn set_password(config: &mut Config, file: Option<&PathBuf>) -> Result<(), Error> {
    let from_file = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!(
                    "cannot read --db-password-file {}: {}",
                    path.display(),
                    io_cause(&e)
                ))
            })?;
            let line = text.strip_suffix('\n').unwrap_or(&text);
            Some(line.strip_suffix('\r').unwrap_or(line).to_string())
        }
        None => None,
    };
    if config.get_password().is_some() {
        return Ok(());
    }
    let from_env = std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty());
    if let Some(password) = from_env.or(from_file) {
        config.password(password);
    }
    Ok(())
}

/// The TLS settings of a URL, which the driver cannot parse itself (it
/// knows neither `verify-full` nor `sslrootcert`).
struct SslParams {
    mode: String,
    root_cert: Option<PathBuf>,
}

/// `url` parsed as the driver would see it (the TLS settings sensord reads
/// itself taken off), for naming things after the server; None if it does
/// not parse.
pub fn parsed(url: &str) -> Option<Config> {
    take_ssl_params(url).ok()?.0.parse().ok()
}

/// Splits `sslmode` and `sslrootcert` off `url`'s query string.
fn take_ssl_params(url: &str) -> Result<(String, SslParams), Error> {
    let mut ssl = SslParams {
        mode: "prefer".to_string(),
        root_cert: None,
    };
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), ssl));
    };
    let mut kept = Vec::new();
    for param in query.split('&') {
        match param.split_once('=') {
            Some(("sslmode", value)) => ssl.mode = decode(value)?,
            Some(("sslrootcert", value)) => ssl.root_cert = Some(decode(value)?.into()),
            _ => kept.push(param),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, ssl))
}

/// `super::percent_decode`, its failure a `--db` error.
fn decode(text: &str) -> Result<String, Error> {
    super::percent_decode(text)
        .ok_or_else(|| Error::Config(format!("--db: bad percent-encoding in {text:?}")))
}

impl SslParams {
    /// The connector `sslmode` asks for; the error names what is wrong.
    fn connector(&self) -> Result<Tls, String> {
        use rustls::ClientConfig;
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        let config = match self.mode.as_str() {
            "disable" | "allow" | "prefer" => return Ok(Tls::None),
            "require" => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider)))
                .with_no_client_auth(),
            "verify-full" => {
                let path = self.root_cert.as_ref().ok_or(
                    "sslmode=verify-full needs sslrootcert=FILE (the CA certificate to trust)",
                )?;
                let unreadable = |e: &dyn std::fmt::Display| {
                    format!("cannot read sslrootcert {}: {e}", path.display())
                };
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| unreadable(&e))? {
                    let cert = cert.map_err(|e| unreadable(&e))?;
                    roots.add(cert).map_err(|e| unreadable(&e))?;
                }
                if roots.is_empty() {
                    return Err(unreadable(&"no certificate in it"));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            other => {
                return Err(format!(
                    "sslmode={other} is not supported; use disable, prefer, require or verify-full"
                ));
            }
        };
        Ok(Tls::Rustls(MakeRustlsConnect::new(config)))
    }
}

/// `sslmode=require`: encryption without authentication, as libpq does it
/// without a root certificate. Signatures are still checked, so the
/// session is at least bound to the certificate the server sent.
#[derive(Debug)]
struct NoCertificateCheck(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl Store for PostgresStore {
    fn write_batch(
        &mut self,
        id: BatchId,
        readings: &[Reading],
        streams: &[StreamUpdate],
    ) -> Result<Vec<Refusal>, Error> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("store::write_batch", |message| Err(Error::database(
            format!("cannot write batch to {}", self.url),
            message.unwrap_or_else(|| "injected failure".to_string())
        )));
        self.interrupted.store(false, Ordering::SeqCst);
        // A connection that broke while idle is only noticed when used; then
        // one more attempt on a fresh connection is safe (the batch id
        // guards against writing twice) and spares a backoff.
        let reused = self.client.is_some();
        let mut result = self.try_write(id, readings, streams);
        if let Err(Failure::Sql(e)) = &result
            && reused
            && e.as_db_error().is_none_or(|db| db.severity() == "FATAL")
        {
            self.disconnect();
            result = self.try_write(id, readings, streams);
        }
        match result {
            Ok(Some(refused)) => Ok(refused),
            Ok(None) => {
                info!(
                    "batch {:016x}/{} was committed by an earlier attempt; not writing it again",
                    id.run, id.seq
                );
                Ok(Vec::new())
            }
            Err(e) => {
                self.disconnect();
                Err(Error::database(
                    format!(
                        "cannot write {} readings to table {} in {}",
                        readings.len(),
                        self.table,
                        self.url
                    ),
                    e.cause(),
                ))
            }
        }
    }

    fn import_spill(
        &mut self,
        key: &str,
        batches: &[SpillBatch],
        streams: &[StreamUpdate],
    ) -> Result<Option<Imported>, Error> {
        self.interrupted.store(false, Ordering::SeqCst);
        self.try_import(key, batches, streams).map_err(|e| {
            self.disconnect();
            Error::database(
                format!(
                    "cannot import spill file into table {} in {}",
                    self.table, self.url
                ),
                e.cause(),
            )
        })
    }

    fn interrupter(&self) -> Interrupter {
        let cancel = Arc::clone(&self.cancel);
        let interrupted = Arc::clone(&self.interrupted);
        let tls = self.tls.clone();
        // One cancel request at a time: sending one connects to the server,
        // which may hang just like the query it cancels.
        let cancelling = Arc::new(AtomicBool::new(false));
        Box::new(move || {
            interrupted.store(true, Ordering::SeqCst);
            let token = cancel
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(token) = token
                && !cancelling.swap(true, Ordering::SeqCst)
            {
                let done = Arc::clone(&cancelling);
                let tls = tls.clone();
                let spawned = thread::Builder::new()
                    .name("pg-cancel".into())
                    .spawn(move || {
                        if let Err(e) = tls.cancel(&token) {
                            warn!("cannot send a cancel request: {}", cause(&e));
                        }
                        done.store(false, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    cancelling.store(false, Ordering::SeqCst);
                }
            }
        })
    }

    fn expire(&mut self, before: f64, from: i64, limit: usize) -> Result<Expired, Error> {
        let what = format!(
            "cannot delete expired readings from table {} in {}",
            self.table, self.url
        );
        let table = quoted(&self.table);
        let limit = limit.max(1) as i64;
        let client = self
            .client()
            .map_err(|e| Error::database(&what, e.cause()))?;
        let result = (|| -> Result<Expired, postgres::Error> {
            let mut tx = client.transaction()?;
            let next = tx.prepare(&format!(
                "SELECT sensor_id FROM {table} WHERE sensor_id >= $1 \
                 ORDER BY sensor_id LIMIT 1"
            ))?;
            let delete = tx.prepare(&format!(
                "DELETE FROM {table} WHERE ctid IN ( \
                     SELECT ctid FROM {table} \
                     WHERE sensor_id = $1 AND ingested_at < to_timestamp($2) LIMIT $3)"
            ))?;
            let mut expired = Expired {
                deleted: 0,
                resume: Some(from),
            };
            let mut looked_at = 0;
            while let Some(at) = expired.resume {
                if expired.deleted >= limit as u64 || looked_at >= limit {
                    break;
                }
                looked_at += 1;
                let Some(row) = tx.query_opt(&next, &[&at])? else {
                    expired.resume = None;
                    break;
                };
                let sensor: i64 = row.try_get(0)?;
                let left = limit - expired.deleted as i64;
                let deleted = tx.execute(&delete, &[&sensor, &before, &left])?;
                expired.deleted += deleted;
                // The limit may have stopped it short of this sensor's last.
                expired.resume = if (deleted as i64) < left {
                    sensor.checked_add(1)
                } else {
                    Some(sensor)
                };
            }
            tx.commit()?;
            Ok(expired)
        })();
        result.map_err(|e| {
            self.disconnect();
            Error::database(what, cause(&e))
        })
    }

    /// Two queries whatever the number of keys: one for the names' keys,
    /// one for the streams, so a batch of many new sensors costs no round
    /// trip each.
    fn load_streams(
        &mut self,
        keys: &[StreamKey],
    ) -> Result<Vec<(StreamKey, StreamRecord)>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let what = format!("cannot read table sensord_sequences in {}", self.url);
        self.interrupted.store(false, Ordering::SeqCst);
        let table = self.table.clone();
        let result = (|| {
            let client = self.client()?;
            let names: Vec<&str> = keys
                .iter()
                .filter_map(|k| match &k.sensor {
                    SensorId::Name(name) => Some(&**name),
                    SensorId::Int(_) => None,
                })
                .collect();
            let mut name_keys: HashMap<String, i64> = HashMap::new();
            if !names.is_empty() {
                let rows = client.query(
                    "SELECT name, key FROM sensor_names WHERE name = ANY($1)",
                    &[&names],
                )?;
                for row in rows {
                    name_keys.insert(row.try_get(0)?, row.try_get(1)?);
                }
            }
            let mut wanted: HashMap<(i64, i64), &StreamKey> = HashMap::new();
            for key in keys {
                let sensor = match &key.sensor {
                    SensorId::Int(id) => Some(*id),
                    SensorId::Name(name) => name_keys.get(&**name).copied(),
                };
                if let Some(sensor) = sensor {
                    wanted.insert((sensor, key.boot as i64), key);
                }
            }
            let (sensors, boots): (Vec<i64>, Vec<i64>) = wanted.keys().copied().unzip();
            let rows = client.query(
                &format!(
                    "SELECT s.sensor_id, s.boot, {} FROM sensord_sequences s
                     JOIN unnest($2::bigint[], $3::bigint[]) AS k (sensor_id, boot)
                         ON s.sensor_id = k.sensor_id AND s.boot = k.boot
                     WHERE s.table_name = $1",
                    &SEQUENCE_COLUMNS["sensor_id, boot, ".len()..]
                ),
                &[&table, &sensors, &boots],
            )?;
            let mut found = Vec::with_capacity(rows.len());
            for row in rows {
                let id: (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                let record = stream_from_row(
                    |i| row.try_get(i + 2),
                    |i| row.try_get(i + 2),
                    |i| row.try_get(i + 2),
                )?
                .map_err(Failure::Schema)?;
                if let Some(key) = wanted.get(&id) {
                    found.push(((*key).clone(), record));
                }
            }
            Ok(found)
        })();
        result.map_err(|e: Failure| {
            self.disconnect();
            Error::database(what, e.cause())
        })
    }

    fn summary(&mut self, filter: &Filter) -> Result<Summary, Error> {
        let what = format!("cannot read table {} in {}", self.table, self.url);
        self.client()
            .map_err(|e| Error::database(&what, e.cause()))?;
        // Two readings near f64::MAX overflow a float8 average; numeric does
        // not, at a cost paid only then.
        let result = match self.try_summary(false, filter) {
            Err(e) if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {
                self.try_summary(true, filter)
            }
            other => other,
        };
        result.map_err(|e| {
            self.disconnect();
            Error::database(what, cause(&e))
        })
    }

    // The dashboard's reads: each statement seeks the index per sensor, or
    // reads a range of one sensor's times.

    fn sensor_list(&mut self, recent: &Recent) -> Result<Vec<SensorRow>, Error> {
        let table_name = self.table.clone();
        self.read(|client, table| {
            // The distinct sensors by a loose index scan: one seek each.
            let latest = client.query(
                &format!(
                    "WITH RECURSIVE ids (key) AS (
                         (SELECT sensor_id FROM {table} ORDER BY sensor_id LIMIT 1)
                         UNION ALL
                         SELECT (SELECT sensor_id FROM {table} WHERE sensor_id > ids.key
                                 ORDER BY sensor_id LIMIT 1)
                         FROM ids WHERE ids.key IS NOT NULL)
                     SELECT ids.key, names.name, latest.at, latest.temperature,
                            latest.humidity,
                            (SELECT COUNT(*) FROM {table} WHERE sensor_id = ids.key
                                 AND ingested_at >= to_timestamp($1::float8))
                     FROM ids
                     LEFT JOIN sensor_names names ON names.key = ids.key
                     CROSS JOIN LATERAL (
                         SELECT EXTRACT(EPOCH FROM ingested_at)::float8 AS at,
                                temperature, humidity
                         FROM {table} WHERE sensor_id = ids.key
                         ORDER BY ingested_at DESC LIMIT 1) latest
                     WHERE ids.key IS NOT NULL ORDER BY ids.key"
                ),
                &[&recent.from],
            )?;
            let mut keys = Vec::with_capacity(latest.len());
            let mut rows = Vec::with_capacity(latest.len());
            for row in &latest {
                let key: i64 = row.try_get(0)?;
                let name: Option<String> = row.try_get(1)?;
                keys.push(key);
                rows.push(SensorRow {
                    id: name.map_or(SensorId::Int(key), |name| SensorId::Name(name.into())),
                    last_seen: row.try_get(2)?,
                    temperature: row.try_get(3)?,
                    humidity: row.try_get(4)?,
                    recent: row.try_get::<_, i64>(5)? as u64,
                    spark_temperature: vec![None; recent.samples],
                    spark_humidity: vec![None; recent.samples],
                    loss_ratio: None,
                });
            }
            // One row per sensor and boot: bounded by the streams, not the
            // readings.
            let losses = client.query(&delivery_sql("table_name = $1"), &[&table_name])?;
            for row in &losses {
                let (key, delivery) = delivery_from_row(|i| row.try_get(i), |i| row.try_get(i))?;
                if let Ok(n) = keys.binary_search(&key) {
                    rows[n].loss_ratio = Some(delivery.loss_ratio());
                }
            }
            let samples = client.query(
                &format!(
                    "SELECT ids.n, slot.i, sample.temperature, sample.humidity
                     FROM unnest($1::bigint[]) WITH ORDINALITY AS ids (key, n)
                     CROSS JOIN generate_series(0, $2::int - 1) AS slot (i)
                     CROSS JOIN LATERAL (
                         SELECT temperature, humidity FROM {table}
                         WHERE sensor_id = ids.key
                           AND ingested_at > to_timestamp($3::float8 + slot.i * $4::float8)
                           AND ingested_at <= to_timestamp($3::float8 + (slot.i + 1) * $4::float8)
                         ORDER BY ingested_at DESC LIMIT 1) sample"
                ),
                &[&keys, &(recent.samples as i32), &recent.from, &recent.step],
            )?;
            for sample in &samples {
                let n = sample.try_get::<_, i64>(0)? as usize - 1;
                let i = sample.try_get::<_, i32>(1)? as usize;
                rows[n].spark_temperature[i] = sample.try_get(2)?;
                rows[n].spark_humidity[i] = sample.try_get(3)?;
            }
            Ok(rows)
        })
    }

    fn sensor_key(&mut self, id: &SensorId) -> Result<Option<i64>, Error> {
        self.read(|client, table| {
            let key = match id {
                SensorId::Int(key) => *key,
                SensorId::Name(name) => {
                    match client
                        .query_opt("SELECT key FROM sensor_names WHERE name = $1", &[&&**name])?
                    {
                        Some(row) => row.try_get(0)?,
                        None => return Ok(None),
                    }
                }
            };
            let stored: bool = client
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE sensor_id = $1)"),
                    &[&key],
                )?
                .try_get(0)?;
            Ok(stored.then_some(key))
        })
    }

    fn sensor_span(&mut self, key: i64) -> Result<Option<(f64, f64)>, Error> {
        self.read(|client, table| {
            let at = "EXTRACT(EPOCH FROM ingested_at)::float8";
            let row = client.query_one(
                &format!(
                    "SELECT (SELECT {at} FROM {table} WHERE sensor_id = $1
                             ORDER BY ingested_at LIMIT 1),
                            (SELECT {at} FROM {table} WHERE sensor_id = $1
                             ORDER BY ingested_at DESC LIMIT 1)"
                ),
                &[&key],
            )?;
            let first: Option<f64> = row.try_get(0)?;
            let last: Option<f64> = row.try_get(1)?;
            Ok(first.zip(last))
        })
    }

    fn sensor_readings(
        &mut self,
        key: i64,
        (from, to): (f64, f64),
        sink: &mut dyn FnMut(RawReading<'_>),
    ) -> Result<(), Error> {
        self.read(|client, table| {
            let params: [&(dyn ToSql + Sync); 3] = [&key, &from, &to];
            let mut rows = client.query_raw(
                &format!(
                    "SELECT EXTRACT(EPOCH FROM ingested_at)::float8, temperature, humidity,
                            extra::text
                     FROM {table}
                     WHERE sensor_id = $1 AND ingested_at >= to_timestamp($2::float8)
                       AND ingested_at <= to_timestamp($3::float8)
                     ORDER BY ingested_at"
                ),
                params,
            )?;
            while let Some(row) = rows.next()? {
                sink(RawReading {
                    at: row.try_get(0)?,
                    temperature: row.try_get(1)?,
                    humidity: row.try_get(2)?,
                    extra: row.try_get(3)?,
                });
            }
            Ok(())
        })
    }
}

impl PostgresStore {
    /// Runs the dashboard read `work` on the connection (connecting first)
    /// with the quoted table name; an error drops the connection and names
    /// the table.
    fn read<T>(
        &mut self,
        work: impl FnOnce(&mut Client, &str) -> Result<T, postgres::Error>,
    ) -> Result<T, Error> {
        let what = format!("cannot read table {} in {}", self.table, self.url);
        let table = quoted(&self.table);
        let client = self
            .client()
            .map_err(|e| Error::database(&what, e.cause()))?;
        work(client, &table).map_err(|e| {
            self.disconnect();
            Error::database(what, cause(&e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name shown for a database has user, host, port and database
    /// name, and no password from any part of the URL.
    #[test]
    fn display_url_has_no_password() {
        let shown = |url: &str| {
            let (url, _) = take_ssl_params(url).unwrap();
            display_url(&url.parse().unwrap())
        };
        assert_eq!(
            shown("postgres://ann:s3cr%40t@db:5433/x?sslmode=disable"),
            "postgres://ann@db:5433/x"
        );
        assert_eq!(
            shown("postgresql://db/x?user=ann&password=s3cret&connect_timeout=2"),
            "postgres://ann@db:5432/x"
        );
        assert_eq!(
            shown("postgres://ann@[::1]/x?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem"),
            "postgres://ann@[::1]:5432/x"
        );
    }

    /// `sslmode` and `sslrootcert` are taken off the URL, decoded.
    #[test]
    fn ssl_params_are_split_off() {
        let (url, ssl) =
            take_ssl_params("postgres://a@h/x?sslmode=verify-full&port=1&sslrootcert=%2Fca.pem")
                .unwrap();
        assert_eq!(url, "postgres://a@h/x?port=1");
        assert_eq!(ssl.mode, "verify-full");
        assert_eq!(ssl.root_cert, Some(PathBuf::from("/ca.pem")));
    }

    /// The root cause follows the driver's text, without "(os error N)".
    #[test]
    fn os_errors_are_stripped() {
        assert_eq!(
            strip_os_errors("error connecting to server: Connection refused (os error 111)"),
            "error connecting to server: Connection refused"
        );
    }

    /// Timestamps round to the nearest microsecond, not down.
    #[test]
    fn timestamps_round_to_microseconds() {
        let micros = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_micros();
        assert_eq!(micros(timestamp(1764150000.123456)), 1_764_150_000_123_456);
        assert_eq!(micros(timestamp(1764150000.9999996)), 1_764_150_001_000_000);
        assert_eq!(micros(timestamp(0.0000004)), 0);
        assert_eq!(micros(timestamp(-3.0)), 0);
    }
}
