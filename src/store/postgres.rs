//! PostgreSQL: several sensord instances writing to one shared database.
//!
//! Each batch is one transaction: a row in `sensord_batches` naming the
//! batch, then the readings by binary `COPY`, then COMMIT. The batch row
//! makes a retry idempotent: when the connection dies during COMMIT nobody
//! knows whether it landed, so the retry inserts the batch id first and, if
//! it is already there, stops without writing the readings again.
//!
//! The connection is opened lazily and dropped on any error; the next
//! attempt (the persister retries with backoff) reconnects. Connections are
//! unencrypted (`NoTls`): run sensord next to PostgreSQL, or through a
//! tunnel, when the network between them is not trusted.
//!
//! Timestamps are stored as `timestamptz`, which holds microseconds:
//! readings' unix seconds are rounded to the nearest microsecond.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::RecvTimeoutError;
use log::{info, warn};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use postgres::{CancelToken, Client, Config, NoTls, Transaction};

use super::{
    BatchId, Interrupter, Options, Refusal, SensorSummary, SpillBatch, Store, Summary,
    per_sensor_sql,
};
use crate::error::Error;
use crate::reading::Reading;

/// Batch ids of this run kept in `sensord_batches` besides the newest: only
/// the newest can be in doubt, the rest are kept for people debugging.
const KEPT_BATCH_IDS: i64 = 16;
/// Rows of `sensord_batches` older than this, from any run, are pruned when
/// a store opens; a run that ended long ago has nothing left in doubt.
const BATCH_ID_RETENTION: &str = "7 days";
/// Key of the advisory lock that serialises schema creation across instances.
const SCHEMA_LOCK: i64 = 0x5e45_50d0;
/// Applied unless the URL sets them: a dead peer must not hang a write
/// forever (unacknowledged data fails the connection after this long).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// The column types of a measurements row, in `COPY` order.
const COLUMNS: [Type; 5] = [
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
];

/// A table in a PostgreSQL database.
pub struct PostgresStore {
    config: Config,
    /// The URL with any password replaced by `***`, for messages.
    url: String,
    /// The measurements table; validated as an identifier, so it can be
    /// quoted into SQL as is.
    table: String,
    /// The open connection, if any; `None` after an error.
    client: Option<Client>,
    /// The current connection's cancel token, for the interrupter.
    cancel: Arc<Mutex<Option<CancelToken>>>,
    /// Set by the interrupter; a connect being waited for gives up on it.
    interrupted: Arc<AtomicBool>,
}

/// Why one attempt failed: the server's or client library's error, or an
/// interrupt while connecting.
enum Failure {
    Sql(postgres::Error),
    Interrupted,
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
            #[cfg(feature = "failpoints")]
            Failure::Injected => "injected failure".to_string(),
        }
    }
}

/// The server's message where there is one, else the client library's.
fn cause(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => e.to_string(),
    }
}

impl PostgresStore {
    /// Connects to `url` and creates the schema if missing.
    pub fn open(url: &str, options: &Options) -> Result<Self, Error> {
        let mut store = Self::new(url, &options.table, options.busy_timeout)?;
        let created = store.create_schema().map_err(|e| store.open_error(&e))?;
        if created {
            info!("created table {} in {}", store.table, store.url);
        }
        Ok(store)
    }

    /// Connects to `url` for reading; the table must exist.
    pub fn open_existing(url: &str, table: &str) -> Result<Self, Error> {
        let mut store = Self::new(url, table, Duration::from_secs(5))?;
        let exists = store.client().and_then(|client| {
            let row = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted(table)])?;
            Ok(row.try_get::<_, bool>(0)?)
        });
        if !exists.map_err(|e| store.open_error(&e))? {
            return Err(Error::Open {
                db: store.url.clone(),
                cause: format!("no table {table}"),
            });
        }
        Ok(store)
    }

    /// Parses `url` and connects. `connect_timeout` applies unless the URL
    /// sets its own.
    fn new(url: &str, table: &str, connect_timeout: Duration) -> Result<Self, Error> {
        let redacted = redact(url);
        let mut config: Config = url.parse().map_err(|e: postgres::Error| Error::Open {
            db: redacted.clone(),
            cause: e.to_string(),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("sensord");
        }
        let mut store = PostgresStore {
            config,
            url: redacted,
            table: table.to_string(),
            client: None,
            cancel: Arc::new(Mutex::new(None)),
            interrupted: Arc::new(AtomicBool::new(false)),
        };
        if let Err(e) = store.client() {
            return Err(store.open_error(&e));
        }
        Ok(store)
    }

    fn open_error(&self, e: &Failure) -> Error {
        Error::Open {
            db: self.url.clone(),
            cause: e.cause(),
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

    /// Connects on a helper thread, so the interrupter can abandon a connect
    /// that hangs (a server that accepts TCP but never answers). An
    /// abandoned thread ends when its connect does.
    fn connect(&self) -> Result<Client, Failure> {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let config = self.config.clone();
        thread::Builder::new()
            .name("pg-connect".into())
            .spawn(move || {
                // Nobody listens if the connect was abandoned.
                let _ = done_tx.send(config.connect(NoTls));
            })
            .map_err(|_| Failure::Interrupted)?;
        loop {
            match done_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(result) => return result.map_err(Failure::Sql),
                Err(RecvTimeoutError::Timeout) => {
                    if self.interrupted.load(Ordering::SeqCst) {
                        return Err(Failure::Interrupted);
                    }
                }
                // The connect thread panicked.
                Err(RecvTimeoutError::Disconnected) => return Err(Failure::Interrupted),
            }
        }
    }

    /// Creates the tables and index if missing, under an advisory lock so
    /// instances starting together do it once. Returns true if this call
    /// created the measurements table.
    fn create_schema(&mut self) -> Result<bool, Failure> {
        let table = quoted(&self.table);
        let index = quoted(&format!("{}_sensor_time", self.table));
        let client = self.client()?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])?
            .try_get(0)?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 sensor_id   bigint           NOT NULL,
                 temperature double precision NOT NULL,
                 humidity    double precision NOT NULL,
                 ingested_at timestamptz      NOT NULL,
                 received_at timestamptz      NOT NULL
             );
             CREATE INDEX IF NOT EXISTS {index} ON {table} (sensor_id, ingested_at);
             CREATE TABLE IF NOT EXISTS sensord_batches (
                 run          bigint      NOT NULL,
                 seq          bigint      NOT NULL,
                 committed_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (run, seq)
             );
             CREATE TABLE IF NOT EXISTS sensord_spill_imports (
                 table_name  text        NOT NULL,
                 spill_key   text        NOT NULL,
                 readings    bigint      NOT NULL,
                 imported_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (table_name, spill_key)
             );
             DELETE FROM sensord_batches
                 WHERE committed_at < now() - interval '{BATCH_ID_RETENTION}';"
        ))?;
        tx.commit()?;
        Ok(!exists)
    }

    /// One attempt at writing a batch. Returns false if the batch had
    /// already been committed (by an attempt whose COMMIT went unanswered).
    fn try_write(&mut self, id: BatchId, readings: &[Reading]) -> Result<bool, Failure> {
        // Stored as bigint: the bits matter, not the sign.
        let (run, seq) = (id.run as i64, id.seq as i64);
        let copy = copy_statement(&self.table);
        let client = self.client()?;
        let mut tx = client.transaction()?;
        let fresh = tx.execute(
            "INSERT INTO sensord_batches (run, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&run, &seq],
        )?;
        if fresh == 0 {
            return Ok(false);
        }
        copy_in(&mut tx, &copy, readings)?;
        tx.execute(
            "DELETE FROM sensord_batches WHERE run = $1 AND seq < $2",
            &[&run, &(seq - KEPT_BATCH_IDS)],
        )?;
        tx.commit()?;
        // Tests lose the COMMIT's answer here.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("postgres::after_commit", |_| Err(Failure::Injected));
        Ok(true)
    }
}

/// The `COPY` statement that loads readings into `table`.
fn copy_statement(table: &str) -> String {
    format!(
        "COPY {} (sensor_id, temperature, humidity, ingested_at, received_at) \
         FROM STDIN (FORMAT binary)",
        quoted(table)
    )
}

/// Streams `readings` into the table through `copy` (a `copy_statement`).
fn copy_in(
    tx: &mut Transaction<'_>,
    copy: &str,
    readings: &[Reading],
) -> Result<(), postgres::Error> {
    let mut writer = BinaryCopyInWriter::new(tx.copy_in(copy)?, &COLUMNS);
    for r in readings {
        writer.write(&[
            &r.sensor_id,
            &r.temperature,
            &r.humidity,
            &timestamp(r.ingested_at),
            &timestamp(r.received_at),
        ])?;
    }
    writer.finish()?;
    Ok(())
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

/// `url` with its password, in the user-info part or a `password=`
/// parameter, replaced by `***`.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            let (start, end) = (scheme_end + 3 + colon + 1, scheme_end + 3 + at);
            out.replace_range(start..end, "***");
        }
    }
    if let Some(query) = out.find('?') {
        let params: Vec<String> = out[query + 1..]
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => param.to_string(),
            })
            .collect();
        out = format!("{}?{}", &out[..query], params.join("&"));
    }
    out
}

impl Store for PostgresStore {
    fn write_batch(&mut self, id: BatchId, readings: &[Reading]) -> Result<Vec<Refusal>, Error> {
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
        let mut result = self.try_write(id, readings);
        if let Err(Failure::Sql(e)) = &result
            && reused
            && e.as_db_error().is_none_or(|db| db.severity() == "FATAL")
        {
            self.disconnect();
            result = self.try_write(id, readings);
        }
        match result {
            Ok(true) => Ok(Vec::new()),
            Ok(false) => {
                info!(
                    "batch {:016x}/{} was committed by an earlier attempt; not writing it again",
                    id.run, id.seq
                );
                Ok(Vec::new())
            }
            Err(e) => {
                self.disconnect();
                Err(Error::database(
                    format!("cannot write {} readings to {}", readings.len(), self.url),
                    e.cause(),
                ))
            }
        }
    }

    fn import_spill(
        &mut self,
        key: &str,
        batches: &[SpillBatch],
    ) -> Result<Option<Vec<Refusal>>, Error> {
        let readings: Vec<Reading> = batches
            .iter()
            .flat_map(|b| b.readings.iter().copied())
            .collect();
        let readings = &readings[..];
        let what = format!("cannot import spill file into {}", self.url);
        let copy = copy_statement(&self.table);
        let table = self.table.clone();
        let attempt = |client: &mut Client| -> Result<bool, postgres::Error> {
            let mut tx = client.transaction()?;
            let fresh = tx.execute(
                "INSERT INTO sensord_spill_imports (table_name, spill_key, readings)
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&table, &key, &(readings.len() as i64)],
            )?;
            if fresh == 0 {
                return Ok(false);
            }
            copy_in(&mut tx, &copy, readings)?;
            tx.commit()?;
            Ok(true)
        };
        let result = self
            .client()
            .and_then(|client| attempt(client).map_err(Failure::Sql));
        match result {
            Ok(true) => Ok(Some(Vec::new())),
            Ok(false) => Ok(None),
            Err(e) => {
                self.disconnect();
                Err(Error::database(what, e.cause()))
            }
        }
    }

    fn interrupter(&self) -> Interrupter {
        let cancel = Arc::clone(&self.cancel);
        let interrupted = Arc::clone(&self.interrupted);
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
                let spawned = thread::Builder::new()
                    .name("pg-cancel".into())
                    .spawn(move || {
                        if let Err(e) = token.cancel_query(NoTls) {
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

    fn summary(&mut self) -> Result<Summary, Error> {
        let what = format!("cannot read {}", self.url);
        let table = quoted(&self.table);
        let result = self.client().and_then(|client| {
            let totals = client.query_one(
                &format!(
                    "SELECT COUNT(*), EXTRACT(EPOCH FROM MIN(ingested_at))::float8,
                            EXTRACT(EPOCH FROM MAX(ingested_at))::float8
                     FROM {table}"
                ),
                &[],
            )?;
            let per_sensor = client
                .query(&per_sensor_sql(&table), &[])?
                .iter()
                .map(|row| SensorSummary::from_row(|i| row.try_get(i), |i| row.try_get(i)))
                .collect::<Result<Vec<_>, postgres::Error>>()?;
            let first: Option<f64> = totals.try_get(1)?;
            let last: Option<f64> = totals.try_get(2)?;
            Ok(Summary {
                readings: totals.try_get::<_, i64>(0)? as u64,
                span: first.zip(last),
                per_sensor,
            })
        });
        result.map_err(|e| Error::database(what, e.cause()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passwords never reach a message; everything else stays.
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://ann:s3cr%40t@db:5432/x?sslmode=disable"),
            "postgres://ann:***@db:5432/x?sslmode=disable"
        );
        assert_eq!(
            redact("postgresql://db/x?user=ann&password=s3cret&connect_timeout=2"),
            "postgresql://db/x?user=ann&password=***&connect_timeout=2"
        );
        assert_eq!(redact("postgres://ann@db/x"), "postgres://ann@db/x");
        assert_eq!(redact("postgres://db/x?a=b@c:d"), "postgres://db/x?a=b@c:d");
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
