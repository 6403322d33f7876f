//! The embedded default: one SQLite file in WAL mode.

use std::ffi::c_int;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};
use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::{
    BatchId, Imported, Interrupter, Options, Refusal, SensorSummary, SpillBatch, Store, Summary,
    per_sensor_sql,
};
use crate::error::Error;
use crate::reading::{Reading, unix_now};

/// The schema version this build writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS sensor_measurements (
        sensor_id   INTEGER NOT NULL,
        temperature REAL    NOT NULL,
        humidity    REAL    NOT NULL,
        ingested_at REAL    NOT NULL,
        received_at REAL    NOT NULL
    );
    CREATE INDEX IF NOT EXISTS sensor_measurements_sensor_time
        ON sensor_measurements (sensor_id, ingested_at);
    CREATE TABLE IF NOT EXISTS sensord_spill_imports (
        spill_key   TEXT PRIMARY KEY,
        readings    INTEGER NOT NULL,
        imported_at REAL    NOT NULL
    );
";

/// Rows per INSERT statement. One statement run opens and closes its
/// cursors once for all its rows: a quarter off the final flush of a
/// million readings.
const ROWS_PER_INSERT: usize = 64;

/// The two INSERTs `insert_all` runs, their SQL built once.
static INSERT_MANY: LazyLock<String> = LazyLock::new(|| insert_sql(ROWS_PER_INSERT));
static INSERT_ONE: LazyLock<String> = LazyLock::new(|| insert_sql(1));

/// `INSERT ... VALUES (?, ?, ?, ?, ?), ...` with `rows` rows. OR FAIL, as
/// no constraint can fail on validated readings, spares SQLite the
/// statement journal it keeps to undo half a multi-row statement; any
/// error still rolls the whole batch back.
fn insert_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT OR FAIL INTO sensor_measurements \
         (sensor_id, temperature, humidity, ingested_at, received_at) VALUES {values}"
    )
}

/// A SQLite database file.
pub struct SqliteStore {
    conn: Connection,
    /// The path as given, for messages.
    path: String,
    /// How long to wait for another writer's lock before a write fails.
    busy_timeout: Duration,
    /// Set by the interrupter; from then on every write fails at once.
    /// SQLite's own busy handler ignores `sqlite3_interrupt`, so the wait
    /// for the write lock is our loop, which watches this.
    interrupted: Arc<AtomicBool>,
    /// The thread that copies the WAL into the database file beside the
    /// writer (see `start_checkpointer`); None for read-only use.
    checkpointer: Option<thread::JoinHandle<()>>,
}

/// WAL size, in pages, from which a commit asks for a checkpoint: 40 MiB,
/// so one checkpoint writes each hot index page once for several batches.
const CHECKPOINT_PAGES: i32 = 10_000;

/// Starts a thread with its own connection that copies committed pages
/// from the WAL into the database file when the writer's commits have grown
/// the WAL past `CHECKPOINT_PAGES`, and hooks it to `writer`'s commits.
/// SQLite's own automatic checkpoint does that inside the commit, so the
/// persister would wait for those writes and their fsyncs (about a tenth of
/// its time at full speed); a PASSIVE checkpoint never blocks the writer.
///
/// The hook holds the thread's only sender: removing the hook ends it.
fn start_checkpointer(
    path: &str,
    writer: &mut Connection,
) -> Result<thread::JoinHandle<()>, Error> {
    let open_error = |e: rusqlite::Error| Error::Open {
        db: path.to_string(),
        cause: cause(&e),
    };
    let conn = Connection::open(path).map_err(open_error)?;
    // A connection learns the file is in WAL mode on its first read; until
    // then a checkpoint does nothing.
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
        .map_err(open_error)?;
    // At most one request waits: commits during a checkpoint need one more.
    let (wake, requests) = crossbeam_channel::bounded::<()>(1);
    let label = path.to_string();
    let thread = thread::Builder::new()
        .name("checkpointer".into())
        .spawn(move || {
            for () in requests {
                let started = Instant::now();
                match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
                    Ok((wal, copied)) => debug!(
                        "checkpoint copied {copied} of {wal} WAL pages in {:.1} ms",
                        started.elapsed().as_secs_f64() * 1e3
                    ),
                    // The next request retries; the WAL only grows meanwhile.
                    Err(e) => warn!("checkpoint of {label} failed: {}", cause(&e)),
                }
            }
        })
        .map_err(|source| Error::Thread {
            name: "checkpointer",
            source,
        })?;
    // Replaces SQLite's automatic checkpoint, which uses the same hook.
    writer
        .wal_hook(Some(move |_: &mut Wal, pages: c_int| {
            if pages >= CHECKPOINT_PAGES {
                let _ = wake.try_send(());
            }
            Ok(())
        }))
        .map_err(open_error)?;
    Ok(thread)
}

impl Drop for SqliteStore {
    /// Stops the checkpointer before the writer closes, so the writer is
    /// the last connection and its close checkpoints the whole WAL and
    /// removes it: a stopped daemon leaves one self-contained file.
    fn drop(&mut self) {
        self.stop_checkpointer();
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the file at `path` for writing.
    pub fn open(path: &str, options: &Options) -> Result<Self, Error> {
        let open_error = |e: rusqlite::Error| Error::Open {
            db: path.to_string(),
            cause: cause(&e),
        };
        let mut conn = Connection::open(path).map_err(open_error)?;
        conn.busy_timeout(options.busy_timeout)
            .map_err(open_error)?;
        // WAL lets readers (sqlite3, `sensord stats`) work while we write;
        // NORMAL syncs at checkpoints, not every commit, which WAL keeps safe
        // against corruption (a power cut can lose only the last commits).
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_error)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Open {
                db: path.to_string(),
                cause: format!("cannot switch from journal mode {mode} to WAL"),
            });
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_error)?;
        // 16 MiB of page cache holds the index pages a sorted batch touches
        // (a few leaves per sensor) with room to spare: 32 MiB inserted no
        // faster. It is most of the daemon's memory however long it runs.
        conn.pragma_update(None, "cache_size", -16384)
            .map_err(open_error)?;
        migrate(&mut conn).map_err(|e| match e {
            Migration::Sql(e) => open_error(e),
            Migration::TooNew(version) => Error::Open {
                db: path.to_string(),
                cause: format!(
                    "schema version {version} is newer than this sensord supports \
                     ({SCHEMA_VERSION})"
                ),
            },
        })?;
        // From here on, lock waits are `begin`'s loop, which can be interrupted.
        conn.busy_timeout(Duration::ZERO).map_err(open_error)?;
        let checkpointer = start_checkpointer(path, &mut conn)?;
        Ok(SqliteStore {
            conn,
            path: path.to_string(),
            busy_timeout: options.busy_timeout,
            interrupted: Arc::new(AtomicBool::new(false)),
            checkpointer: Some(checkpointer),
        })
    }

    /// Opens an existing file read-only, for `stats`.
    pub fn open_existing(path: &str) -> Result<Self, Error> {
        let open_error = |cause: String| Error::Open {
            db: path.to_string(),
            cause,
        };
        if !Path::new(path).exists() {
            return Err(open_error("no such file".to_string()));
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| open_error(cause(&e)))?;
        Ok(SqliteStore {
            conn,
            path: path.to_string(),
            busy_timeout: Duration::from_secs(5),
            interrupted: Arc::new(AtomicBool::new(false)),
            checkpointer: None,
        })
    }

    /// Starts a write transaction, waiting up to `busy_timeout` for another
    /// writer's lock; IMMEDIATE takes the lock up front, so a batch never
    /// waits halfway through. (EXCLUSIVE also keeps readers out, which only
    /// a rollback journal needs.)
    fn begin(&self, behavior: TransactionBehavior) -> rusqlite::Result<rusqlite::Transaction<'_>> {
        let deadline = Instant::now() + self.busy_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(interrupted_error());
            }
            match rusqlite::Transaction::new_unchecked(&self.conn, behavior) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
                {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                result => return result,
            }
        }
    }

    /// Commits `readings` in one transaction begun with `behavior`.
    fn write(&mut self, readings: &[Reading], behavior: TransactionBehavior) -> Result<(), Error> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("store::write_batch", |message| Err(Error::database(
            format!("cannot write batch to {}", self.path),
            message.unwrap_or_else(|| "injected failure".to_string())
        )));
        let what = || format!("cannot write {} readings to {}", readings.len(), self.path);
        let tx = self
            .begin(behavior)
            .map_err(|e| Error::database(what(), cause(&e)))?;
        Self::insert_all(&tx, readings, &self.interrupted)
            .map_err(|e| Error::database(what(), cause(&e)))?;
        tx.commit().map_err(|e| Error::database(what(), cause(&e)))
    }

    /// Stops the checkpointer, if running, so the writer is the only
    /// connection this process has to the file.
    fn stop_checkpointer(&mut self) {
        let Some(checkpointer) = self.checkpointer.take() else {
            return;
        };
        // Dropping the hook drops the checkpointer's only sender.
        let _ = self
            .conn
            .wal_hook(None::<fn(&mut Wal, c_int) -> rusqlite::Result<()>>);
        let _ = checkpointer.join();
    }

    /// Inserts `readings` in the open transaction `tx`, stopping early if
    /// interrupted: `sqlite3_interrupt` alone is lost between two statements.
    fn insert_all(
        tx: &rusqlite::Transaction<'_>,
        readings: &[Reading],
        interrupted: &AtomicBool,
    ) -> rusqlite::Result<()> {
        let mut insert = tx.prepare_cached(&INSERT_MANY)?;
        let mut rows = readings.chunks_exact(ROWS_PER_INSERT);
        for (i, group) in rows.by_ref().enumerate() {
            if i % 16 == 0 && interrupted.load(Ordering::Relaxed) {
                return Err(interrupted_error());
            }
            bind_rows(&mut insert, group)?;
            insert.raw_execute()?;
        }
        // The rest one row at a time, with a statement also compiled once:
        // a trickle's small batches would otherwise each compile their own.
        let rest = rows.remainder();
        if !rest.is_empty() {
            let mut insert = tx.prepare_cached(&INSERT_ONE)?;
            for row in rest.chunks(1) {
                bind_rows(&mut insert, row)?;
                insert.raw_execute()?;
            }
        }
        Ok(())
    }
}

/// Binds `rows` to the parameters of an INSERT made by `insert_sql`.
fn bind_rows(insert: &mut rusqlite::Statement<'_>, rows: &[Reading]) -> rusqlite::Result<()> {
    for (i, r) in rows.iter().enumerate() {
        let at = 5 * i;
        insert.raw_bind_parameter(at + 1, r.sensor_id)?;
        insert.raw_bind_parameter(at + 2, r.temperature)?;
        insert.raw_bind_parameter(at + 3, r.humidity)?;
        insert.raw_bind_parameter(at + 4, r.ingested_at)?;
        insert.raw_bind_parameter(at + 5, r.received_at)?;
    }
    Ok(())
}

fn interrupted_error() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT),
        Some("interrupted".to_string()),
    )
}

enum Migration {
    Sql(rusqlite::Error),
    TooNew(i64),
}

/// Creates or upgrades the schema under a write lock, so several processes
/// opening a new file at once do it once.
fn migrate(conn: &mut Connection) -> Result<(), Migration> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(Migration::Sql)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(Migration::Sql)?;
    if version > SCHEMA_VERSION {
        return Err(Migration::TooNew(version));
    }
    if version < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA).map_err(Migration::Sql)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(Migration::Sql)?;
    }
    tx.commit().map_err(Migration::Sql)
}

/// rusqlite's message without its error-code prefix where it has one.
fn cause(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(_, Some(message)) => message.clone(),
        other => other.to_string(),
    }
}

impl Store for SqliteStore {
    fn write_batch(&mut self, _id: BatchId, readings: &[Reading]) -> Result<Vec<Refusal>, Error> {
        self.write(readings, TransactionBehavior::Immediate)?;
        Ok(Vec::new())
    }

    fn import_spill(
        &mut self,
        key: &str,
        batches: &[SpillBatch],
    ) -> Result<Option<Imported>, Error> {
        let what = || format!("cannot import spill file into {}", self.path);
        let sql_error = |e: rusqlite::Error| Error::database(what(), cause(&e));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_error)?;
        let seen = tx
            .query_row(
                "SELECT 1 FROM sensord_spill_imports WHERE spill_key = ?1",
                [key],
                |_| Ok(()),
            )
            .optional()
            .map_err(sql_error)?;
        if seen.is_some() {
            return Ok(None);
        }
        let mut count = 0;
        for batch in batches {
            Self::insert_all(&tx, &batch.readings, &self.interrupted).map_err(sql_error)?;
            count += batch.readings.len();
        }
        tx.execute(
            "INSERT INTO sensord_spill_imports (spill_key, readings, imported_at) VALUES (?1, ?2, ?3)",
            params![key, count as i64, unix_now()],
        )
        .map_err(sql_error)?;
        tx.commit().map_err(sql_error)?;
        Ok(Some(Imported {
            stored: count as u64,
            ..Imported::default()
        }))
    }

    fn interrupter(&self) -> Interrupter {
        let handle = self.conn.get_interrupt_handle();
        let interrupted = Arc::clone(&self.interrupted);
        Box::new(move || {
            interrupted.store(true, Ordering::SeqCst);
            handle.interrupt();
        })
    }

    fn summary(&mut self) -> Result<Summary, Error> {
        let sql_error =
            |e: rusqlite::Error| Error::database(format!("cannot read {}", self.path), cause(&e));
        let (readings, first, last): (i64, Option<f64>, Option<f64>) = self
            .conn
            .query_row(
                "SELECT COUNT(*), MIN(ingested_at), MAX(ingested_at) FROM sensor_measurements",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .map_err(sql_error)?;
        let mut statement = self
            .conn
            .prepare(&per_sensor_sql(super::DEFAULT_TABLE))
            .map_err(sql_error)?;
        let per_sensor = statement
            .query_map([], |row| {
                SensorSummary::from_row(|i| row.get(i), |i| row.get(i))
            })
            .map_err(sql_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_error)?;
        Ok(Summary {
            readings: readings as u64,
            span: first.zip(last),
            per_sensor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(n: usize, seed: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| Reading {
                sensor_id: ((i * 7919 + seed) % 991) as i64,
                temperature: 20.0 + (i % 97) as f64 / 7.0,
                humidity: (i % 89) as f64 / 89.0,
                ingested_at: 1_764_150_000.0 + (seed + i) as f64 / 1000.0,
                received_at: 1_764_150_000.5,
            })
            .collect()
    }

    /// Commits that grow the WAL past `CHECKPOINT_PAGES` get it copied into
    /// the database file by the checkpointer while the store stays open;
    /// closing the store leaves one self-contained file with every row.
    #[test]
    fn checkpointer_copies_the_wal_and_close_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let path_str = path.to_str().unwrap();
        let wal = dir.path().join("c.db-wal");
        let options = Options {
            busy_timeout: Duration::from_secs(5),
            table: super::super::DEFAULT_TABLE.to_string(),
            stop: None,
            password_file: None,
        };
        let mut store = SqliteStore::open(path_str, &options).unwrap();
        let (batches, per_batch) = (4, 200_000);
        for seq in 1..=batches {
            let mut batch = readings(per_batch, seq * per_batch);
            super::super::sort_for_index(&mut batch);
            store
                .write_batch(
                    BatchId {
                        run: 1,
                        seq: seq as u64,
                    },
                    &batch,
                )
                .unwrap();
        }
        // Only the checkpointer writes pages into the database file while
        // the store is open; wait (bounded) for it to have copied most.
        let deadline = Instant::now() + Duration::from_secs(60);
        let wal_bytes = fs_len(&wal);
        while fs_len(&path) < wal_bytes / 2 {
            assert!(Instant::now() < deadline, "no checkpoint within 60 s");
            thread::sleep(Duration::from_millis(20));
        }
        drop(store);
        assert!(!wal.exists(), "the last close removes the WAL");
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM sensor_measurements", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, (batches * per_batch) as i64);
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    fn fs_len(path: &Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}
