//! The embedded default: one SQLite file in WAL mode.
//!
//! Each batch is one transaction: a row in `sensord_batches` naming the
//! batch (so a batch is never written twice, as in PostgreSQL), then the
//! readings. A reading the database refuses for good is found by bisection
//! under savepoints and handed back; the rest commit. Before and after each
//! write the store checks that its path still names the file it opened, and
//! recreates the file there if it was deleted or replaced.

use std::cell::RefCell;
use std::ffi::c_int;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use rusqlite::{
    Connection, ErrorCode, InterruptHandle, OpenFlags, OptionalExtension, Savepoint,
    TransactionBehavior, params,
};

use super::{
    BatchId, DEFAULT_TABLE, Expired, Filter, Imported, Interrupter, NameKeys, Options, RawReading,
    Recent, Refusal, SEQUENCE_COLUMNS, SensorRow, SensorSummary, SpillBatch, Store, Summary,
    add_extra_measurements, attach_delivery, check_name_key, delivery_from_row, delivery_sql,
    per_sensor_sql, stream_from_row,
};
use crate::delivery::{StreamKey, StreamRecord, StreamUpdate};
use crate::error::Error;
use crate::reading::{NAME_KEYS, Reading, SensorId, unix_now};

/// The schema version this build writes, kept in `PRAGMA user_version`.
/// 1: measurements and spill imports; 2: `sensord_batches` added;
/// 3: measurements optional, `extra` column, `sensor_names`;
/// 4: `seq` and `boot` columns, `sensord_sequences`.
const SCHEMA_VERSION: i64 = 4;

/// The measurements table as version 4 makes it, for `SCHEMA` and for
/// the rebuild of an older one (`upgrade_measurements`).
const MEASUREMENTS: &str = "
        sensor_id   INTEGER NOT NULL,
        temperature REAL,
        humidity    REAL,
        ingested_at REAL    NOT NULL,
        received_at REAL    NOT NULL,
        extra       TEXT,
        seq         INTEGER,
        boot        INTEGER";

/// Every statement is idempotent, so upgrading a file of any older version
/// (or of version 0 whose tables exist) is running it again, after
/// `upgrade_measurements`.
/// `sensord_batches` is WITHOUT ROWID so that its key is its only B-tree:
/// a batch's id costs one more page in the commit, not two.
/// `sensor_names` gives each name its key, stored in `sensor_id` (see
/// `reading::NAME_KEYS`); `key` is the rowid, so a lookup by key is one
/// B-tree and by name the UNIQUE index.
static SCHEMA: LazyLock<String> = LazyLock::new(|| {
    format!(
        "
    CREATE TABLE IF NOT EXISTS sensor_measurements ({MEASUREMENTS}
    );
    CREATE TABLE IF NOT EXISTS sensor_names (
        key  INTEGER PRIMARY KEY,
        name TEXT    NOT NULL UNIQUE
    );
    CREATE INDEX IF NOT EXISTS sensor_measurements_sensor_time
        ON sensor_measurements (sensor_id, ingested_at);
    CREATE TABLE IF NOT EXISTS sensord_spill_imports (
        spill_key   TEXT PRIMARY KEY,
        readings    INTEGER NOT NULL,
        imported_at REAL    NOT NULL
    );
    CREATE TABLE IF NOT EXISTS sensord_batches (
        run          INTEGER NOT NULL,
        seq          INTEGER NOT NULL,
        committed_at REAL    NOT NULL,
        PRIMARY KEY (run, seq)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS sensord_sequences (
        sensor_id  INTEGER NOT NULL,
        boot       INTEGER NOT NULL,
        base       INTEGER NOT NULL,
        highest    INTEGER NOT NULL,
        received   INTEGER NOT NULL,
        duplicates INTEGER NOT NULL,
        reordered  INTEGER NOT NULL,
        late       INTEGER NOT NULL,
        first_seen REAL    NOT NULL,
        last_seen  REAL    NOT NULL,
        missing    TEXT    NOT NULL,
        PRIMARY KEY (sensor_id, boot)
    ) WITHOUT ROWID;
"
    )
});

/// The columns sensord writes, and the type affinity each needs: SQLite
/// converts a value to its column's affinity, so a REAL value in a column
/// of another affinity could come back as text or an integer.
const COLUMNS: [(&str, &str); 8] = [
    ("sensor_id", "INTEGER"),
    ("temperature", "REAL"),
    ("humidity", "REAL"),
    ("ingested_at", "REAL"),
    ("received_at", "REAL"),
    ("extra", "TEXT"),
    ("seq", "INTEGER"),
    ("boot", "INTEGER"),
];

/// Columns an older table may lack, and their declarations: the upgrade
/// adds them.
const ADDED_LATER: [(&str, &str); 3] = [("extra", "TEXT"), ("seq", "INTEGER"), ("boot", "INTEGER")];

/// Batch ids of this run kept in `sensord_batches` besides the newest, as in
/// PostgreSQL: only the newest can be in doubt.
const KEPT_BATCH_IDS: u64 = 16;
/// Rows of `sensord_batches` older than this, from any run, are pruned when
/// a store opens.
const BATCH_ID_RETENTION_SECONDS: f64 = 7.0 * 86_400.0;

/// Rows per INSERT statement. One statement run opens and closes its
/// cursors once for all its rows: a quarter off the final flush of a
/// million readings.
const ROWS_PER_INSERT: usize = 64;

/// The two INSERTs `insert_all` runs, their SQL built once.
static INSERT_MANY: LazyLock<String> = LazyLock::new(|| insert_sql(ROWS_PER_INSERT));
static INSERT_ONE: LazyLock<String> = LazyLock::new(|| insert_sql(1));

/// `INSERT ... VALUES (?, ?, ?, ?, ?, ?, ?, ?), ...` with `rows` rows. OR FAIL, as
/// no constraint can fail on validated readings in sensord's own table,
/// spares SQLite the statement journal it keeps to undo half a multi-row
/// statement. A failure leaves the statement's earlier rows in place, so
/// the fast path drops the whole transaction on any error, and bisection
/// runs each slice under a savepoint whose rollback undoes them.
fn insert_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT OR FAIL INTO sensor_measurements \
         (sensor_id, temperature, humidity, ingested_at, received_at, extra, seq, boot) \
         VALUES {values}"
    )
}

/// Whether a failed write is *permanent*: caused by the values of the rows
/// written, so retrying the same rows cannot help but other rows may
/// succeed. Those codes are SQLITE_CONSTRAINT with all its extended codes
/// (CHECK, NOT NULL, UNIQUE, PRIMARY KEY, FOREIGN KEY, a trigger's
/// `RAISE(ABORT, ...)`), SQLITE_MISMATCH (datatype mismatch), SQLITE_TOOBIG
/// (a value over the size limit) and SQLITE_RANGE (a bind index out of
/// range). Everything else is *transient*, about the database or the
/// machine rather than the rows: BUSY, LOCKED, IOERR, FULL, NOMEM, READONLY,
/// CANTOPEN, PERM, PROTOCOL, INTERRUPT and ABORT, SCHEMA, CORRUPT and
/// NOTADB, and the generic SQLITE_ERROR ("no such table", which a person
/// must fix); they go back to the caller, which retries, rather than
/// refusing readings that were not at fault.
fn is_permanent(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(failure, _) if matches!(
            failure.code,
            ErrorCode::ConstraintViolation
                | ErrorCode::TypeMismatch
                | ErrorCode::TooBig
                | ErrorCode::ParameterOutOfRange
        )
    )
}

/// A SQLite database file.
pub struct SqliteStore {
    conn: Connection,
    /// The path as given, for messages and to reopen it.
    path: String,
    /// How long to wait for another writer's lock before a write fails.
    busy_timeout: Duration,
    /// Set by the interrupter; from then on every write fails at once.
    /// SQLite's own busy handler ignores `sqlite3_interrupt`, so the wait
    /// for the write lock is our loop, which watches this.
    interrupted: Arc<AtomicBool>,
    /// Interrupts the current connection's statement; swapped on reopen.
    interrupt: Arc<Mutex<InterruptHandle>>,
    /// The thread that copies the WAL into the database file beside the
    /// writer (see `start_checkpointer`); None for read-only use.
    checkpointer: Option<thread::JoinHandle<()>>,
    /// The file the writer opened, to notice when its path no longer names
    /// it; None for read-only use or a database that is not a named file.
    opened: Option<OpenedFile>,
    /// Set once the file was found deleted or replaced (`Store::replaced`).
    replaced: bool,
    /// True while `conn` is the placeholder `reopen` leaves when opening
    /// the path again failed; the next write tries again.
    detached: bool,
    /// Sensor names' keys; a cell since writes borrow the connection.
    names: RefCell<NameKeys>,
}

/// A file as the path named it when opened: `(device, inode)` stays the
/// same for as long as the path names that file.
#[derive(Clone, Debug, PartialEq)]
struct OpenedFile {
    /// The absolute path SQLite resolved.
    path: PathBuf,
    id: (u64, u64),
}

impl OpenedFile {
    fn of(conn: &Connection) -> Option<Self> {
        let path = PathBuf::from(conn.path().filter(|p| !p.is_empty())?);
        let id = file_id(&path).ok()?;
        Some(OpenedFile { path, id })
    }
}

fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
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

/// Opens (creating if missing) the file at `path` for writing, checks or
/// migrates its schema, and starts its checkpointer.
fn open_writer(
    path: &str,
    busy_timeout: Duration,
) -> Result<(Connection, thread::JoinHandle<()>), Error> {
    let open_error = |e: rusqlite::Error| Error::Open {
        db: path.to_string(),
        cause: cause(&e),
    };
    let mut conn = Connection::open(path).map_err(open_error)?;
    // SQLite counts the timeout in milliseconds in an i32 (24 days); a
    // longer wait is as good as forever for the schema lock.
    conn.busy_timeout(busy_timeout.min(Duration::from_millis(i32::MAX as u64)))
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
        Migration::Mismatch(cause) => Error::Open {
            db: path.to_string(),
            cause,
        },
    })?;
    // From here on, lock waits are `begin`'s loop, which can be interrupted.
    conn.busy_timeout(Duration::ZERO).map_err(open_error)?;
    let checkpointer = start_checkpointer(path, &mut conn)?;
    Ok((conn, checkpointer))
}

impl Drop for SqliteStore {
    /// Stops the checkpointer before the writer closes, so the writer is
    /// the last connection and its close checkpoints the whole WAL and
    /// removes it: a stopped daemon leaves one self-contained file.
    fn drop(&mut self) {
        self.stop_checkpointer();
    }
}

/// One batch to commit: its id, if it has one, and its readings.
#[derive(Clone, Copy)]
struct Part<'a> {
    /// Recorded in `sensord_batches`; a part whose id is there is skipped.
    id: Option<BatchId>,
    readings: &'a [Reading],
}

/// How `commit_parts` inserts readings.
#[derive(Clone, Copy, PartialEq)]
enum Insert {
    /// All at once; any error fails the transaction.
    Fast,
    /// By bisection under savepoints, setting aside refused readings.
    Isolating,
}

impl SqliteStore {
    /// Opens (creating if missing) the file at `path` for writing.
    pub fn open(path: &str, options: &Options) -> Result<Self, Error> {
        let (conn, checkpointer) = open_writer(path, options.busy_timeout)?;
        Ok(SqliteStore {
            interrupt: Arc::new(Mutex::new(conn.get_interrupt_handle())),
            opened: OpenedFile::of(&conn),
            conn,
            path: path.to_string(),
            busy_timeout: options.busy_timeout,
            interrupted: Arc::new(AtomicBool::new(false)),
            checkpointer: Some(checkpointer),
            replaced: false,
            detached: false,
            names: RefCell::default(),
        })
    }

    /// Opens an existing file read-only, for `stats`. A file a killed
    /// writer left mid-transaction needs its journal rolled back, which a
    /// read-only connection cannot do; this does it, as any writer opening
    /// the file would, and says so.
    pub fn open_existing(path: &str) -> Result<Self, Error> {
        let open_error = |cause: String| Error::Open {
            db: path.to_string(),
            cause,
        };
        if !Path::new(path).exists() {
            return Err(open_error("no such file".to_string()));
        }
        // The first read of the schema is what finds a hot journal.
        let first_read = |conn: &Connection| {
            conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |_| Ok(()))
        };
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| open_error(cause(&e)))?;
        let conn = match first_read(&conn) {
            Ok(()) => conn,
            Err(e) if needs_writer_to_recover(&e) => {
                info!(
                    "{path} was left mid-transaction by a writer that was killed \
                     ({}); recovering it as its next writer would",
                    cause(&e)
                );
                let unrecoverable = |e: rusqlite::Error| {
                    open_error(format!(
                        "it was left mid-transaction by a writer that was killed, and \
                         recovering it needs write access to the file and its folder ({}); \
                         run `sensord serve --db {path}` once, or open it with sqlite3, as a \
                         user who can write there",
                        cause(&e)
                    ))
                };
                drop(conn);
                let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
                    .map_err(unrecoverable)?;
                first_read(&conn).map_err(unrecoverable)?;
                conn
            }
            Err(e) => return Err(open_error(cause(&e))),
        };
        Ok(SqliteStore {
            interrupt: Arc::new(Mutex::new(conn.get_interrupt_handle())),
            conn,
            path: path.to_string(),
            busy_timeout: Duration::from_secs(5),
            interrupted: Arc::new(AtomicBool::new(false)),
            checkpointer: None,
            opened: None,
            replaced: false,
            detached: false,
            names: RefCell::default(),
        })
    }

    /// Starts a write transaction, waiting up to `busy_timeout` for another
    /// writer's lock; IMMEDIATE takes the lock up front, so a batch never
    /// waits halfway through. (EXCLUSIVE also keeps readers out, which only
    /// a rollback journal needs.)
    fn begin(&self) -> rusqlite::Result<rusqlite::Transaction<'_>> {
        // A timeout past the end of time means no deadline.
        let deadline = Instant::now().checked_add(self.busy_timeout);
        let mut pause = Duration::from_millis(1);
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(interrupted_error());
            }
            match rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == ErrorCode::DatabaseBusy
                        && deadline.is_none_or(|d| Instant::now() < d) =>
                {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                result => return result,
            }
        }
    }

    /// Commits `parts` in one transaction, with `spill_key` recorded if
    /// given. Returns None if nothing was written because the spill key, or
    /// (without a key) the one part's id, was already there.
    fn commit_parts(
        &self,
        spill_key: Option<&str>,
        parts: &[Part<'_>],
        streams: &[StreamUpdate],
        insert: Insert,
    ) -> rusqlite::Result<Option<Imported>> {
        let mut tx = self.begin()?;
        if let Some(key) = spill_key {
            let seen = tx
                .query_row(
                    "SELECT 1 FROM sensord_spill_imports WHERE spill_key = ?1",
                    [key],
                    |_| Ok(()),
                )
                .optional()?;
            if seen.is_some() {
                return Ok(None);
            }
        }
        let mut refusals = Vec::new();
        let (mut count, mut skipped) = (0, 0);
        for part in parts {
            if let Some(id) = part.id {
                // Stored as INTEGER: the bits matter, not the sign.
                let fresh = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO sensord_batches (run, seq, committed_at) \
                         VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![id.run as i64, id.seq as i64, unix_now()])?;
                if fresh == 0 {
                    info!(
                        "batch {:016x}/{} was committed by an earlier attempt; not writing it again",
                        id.run, id.seq
                    );
                    if spill_key.is_none() {
                        return Ok(None);
                    }
                    skipped += part.readings.len() as u64;
                    continue;
                }
            }
            self.resolve_names(&tx, part.readings, &[])?;
            let names = &self.names.borrow();
            match insert {
                Insert::Fast => insert_all(&tx, part.readings, names, &self.interrupted)?,
                Insert::Isolating => {
                    let mut savepoint = tx.savepoint()?;
                    isolate(
                        &mut savepoint,
                        part.readings,
                        names,
                        &self.interrupted,
                        &mut refusals,
                    )?;
                    savepoint.commit()?;
                }
            }
            count += part.readings.len();
        }
        if !streams.is_empty() {
            self.resolve_names(&tx, &[], streams)?;
            let names = &self.names.borrow();
            let mut upsert = tx.prepare_cached(&format!(
                "INSERT OR REPLACE INTO sensord_sequences ({SEQUENCE_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))?;
            for StreamUpdate { key, record: r } in streams {
                upsert.execute(params![
                    names.key(key.sensor.as_sensor()),
                    key.boot as i64,
                    r.base as i64,
                    r.highest as i64,
                    r.received as i64,
                    r.duplicates as i64,
                    r.reordered as i64,
                    r.late as i64,
                    r.first_seen,
                    r.last_seen,
                    r.missing_text(),
                ])?;
            }
        }
        match spill_key {
            Some(key) => {
                tx.execute(
                    "INSERT INTO sensord_spill_imports (spill_key, readings, imported_at) \
                     VALUES (?1, ?2, ?3)",
                    params![key, (count - refusals.len()) as i64, unix_now()],
                )?;
            }
            // Only a live run's own batches are pruned: a spill file's ids
            // may be checked again by another spill file of the same run.
            None => {
                for id in parts.iter().filter_map(|p| p.id) {
                    tx.prepare_cached("DELETE FROM sensord_batches WHERE run = ?1 AND seq < ?2")?
                        .execute(params![
                            id.run as i64,
                            id.seq.saturating_sub(KEPT_BATCH_IDS) as i64
                        ])?;
                }
            }
        }
        tx.commit()?;
        Ok(Some(Imported {
            stored: (count - refusals.len()) as u64,
            skipped,
            refused: refusals,
        }))
    }

    /// Gives each sensor name among `readings` without a known key its
    /// key, adding it to `sensor_names` in `tx` if new there: a batch that
    /// rolls back takes its new names with it.
    fn resolve_names(
        &self,
        tx: &Connection,
        readings: &[Reading],
        streams: &[StreamUpdate],
    ) -> rusqlite::Result<()> {
        let mut names = self.names.borrow_mut();
        for name in names.unknown(readings, streams) {
            let found: Option<i64> = tx
                .prepare_cached("SELECT key FROM sensor_names WHERE name = ?1")?
                .query_row([name], |row| row.get(0))
                .optional()?;
            let key = match found {
                Some(key) => key,
                None => {
                    let key: i64 = tx
                        .prepare_cached(
                            "INSERT INTO sensor_names (key, name) VALUES \
                             ((SELECT COALESCE(MAX(key) + 1, ?1) FROM sensor_names), ?2) \
                             RETURNING key",
                        )?
                        .query_row(params![NAME_KEYS.start, name], |row| row.get(0))?;
                    check_name_key(key).map_err(|message| {
                        rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                            Some(message),
                        )
                    })?
                }
            };
            names.learn(name, key);
        }
        Ok(())
    }

    /// `commit_parts`, keeping the name cache true to what committed.
    fn commit_or_forget(
        &self,
        spill_key: Option<&str>,
        parts: &[Part<'_>],
        streams: &[StreamUpdate],
        insert: Insert,
    ) -> rusqlite::Result<Option<Imported>> {
        let result = self.commit_parts(spill_key, parts, streams, insert);
        let mut names = self.names.borrow_mut();
        match result {
            Ok(_) => names.committed(),
            Err(_) => names.rolled_back(),
        }
        result
    }

    /// `commit_parts`, first all at once and, if that fails for good, again
    /// isolating the refused readings. Writes into the file at the store's
    /// path even if it was deleted or replaced before or during the write.
    fn write_parts(
        &mut self,
        spill_key: Option<&str>,
        parts: &[Part<'_>],
        streams: &[StreamUpdate],
        what: &str,
    ) -> Result<Option<Imported>, Error> {
        let sql_error = |e: rusqlite::Error| Error::database(what, cause(&e));
        loop {
            self.follow_path()?;
            let result = match self.commit_or_forget(spill_key, parts, streams, Insert::Fast) {
                Err(e) if is_permanent(&e) => {
                    debug!("{what}: {}; isolating the refused readings", cause(&e));
                    self.commit_or_forget(spill_key, parts, streams, Insert::Isolating)
                }
                result => result,
            };
            let outcome = result.map_err(sql_error)?;
            // Committed into a file that was deleted or replaced meanwhile:
            // nobody will see it there, so write it again into the new one.
            if !self.path_moved() {
                return Ok(outcome);
            }
        }
    }

    /// True if the store's path no longer names the file it opened.
    fn path_moved(&self) -> bool {
        self.moved().is_some()
    }

    /// What became of the opened file, if its path no longer names it.
    fn moved(&self) -> Option<&'static str> {
        let opened = self.opened.as_ref()?;
        match file_id(&opened.path) {
            Ok(id) if id == opened.id => None,
            Ok(_) => Some("was replaced by another file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("was deleted"),
            // Unknowable (a folder made unreadable, say): the open file
            // still takes writes, so carry on.
            Err(_) => None,
        }
    }

    /// If the file was deleted or replaced under the store, reopens (or
    /// recreates) the file its path names now, and marks the store
    /// replaced.
    fn follow_path(&mut self) -> Result<(), Error> {
        if !self.detached {
            let Some(happened) = self.moved() else {
                return Ok(());
            };
            error!(
                "database {} {happened} while sensord was writing to it: the readings \
                 stored in it are not in the file at that path now; opening {} again",
                self.path, self.path
            );
            self.replaced = true;
        }
        self.reopen()?;
        info!("reopened database {}; writing there from now on", self.path);
        Ok(())
    }

    /// Closes the connection and opens the path again, as `open` does.
    fn reopen(&mut self) -> Result<(), Error> {
        self.stop_checkpointer();
        // The file opened next may not have the names this one had.
        self.names.get_mut().clear();
        // The old connection closes before the path is opened again: two
        // connections of one process to the same -shm file would not lock
        // each other out (POSIX locks are per process). An in-memory
        // database holds its place meanwhile.
        let placeholder = Connection::open_in_memory().map_err(|e| Error::Open {
            db: self.path.clone(),
            cause: cause(&e),
        })?;
        let old = std::mem::replace(&mut self.conn, placeholder);
        self.detached = true;
        // Empties the old WAL, through the descriptor open on it: SQLite
        // does not checkpoint a moved file at close, and a WAL left at the
        // path would be replayed into whatever file the path names now
        // (tested: the old rows replaced the new file's).
        if let Err(e) = old.wal_checkpoint_v2(None::<&str>, CheckpointMode::TRUNCATE) {
            warn!("emptying the old WAL of {}: {}", self.path, cause(&e));
        }
        if let Err((_, e)) = old.close() {
            warn!("closing the old connection to {}: {}", self.path, cause(&e));
        }
        let (conn, checkpointer) = open_writer(&self.path, self.busy_timeout)?;
        self.detached = false;
        *self
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = conn.get_interrupt_handle();
        self.opened = OpenedFile::of(&conn);
        self.conn = conn;
        self.checkpointer = Some(checkpointer);
        Ok(())
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
}

/// Inserts `readings` in the open transaction on `conn`, stopping early if
/// interrupted: `sqlite3_interrupt` alone is lost between two statements.
fn insert_all(
    conn: &Connection,
    readings: &[Reading],
    names: &NameKeys,
    interrupted: &AtomicBool,
) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(&INSERT_MANY)?;
    let mut rows = readings.chunks_exact(ROWS_PER_INSERT);
    for (i, group) in rows.by_ref().enumerate() {
        if i % 16 == 0 && interrupted.load(Ordering::Relaxed) {
            return Err(interrupted_error());
        }
        bind_rows(&mut insert, group, names)?;
        insert.raw_execute()?;
    }
    // The rest one row at a time, with a statement also compiled once:
    // a trickle's small batches would otherwise each compile their own.
    let rest = rows.remainder();
    if !rest.is_empty() {
        let mut insert = conn.prepare_cached(&INSERT_ONE)?;
        for row in rest.chunks(1) {
            bind_rows(&mut insert, row, names)?;
            insert.raw_execute()?;
        }
    }
    Ok(())
}

/// Inserts `readings` under `savepoint` (taken just before), setting aside
/// the ones the database refuses: a slice that fails for good is rolled
/// back to the savepoint and its halves tried under savepoints of their
/// own; a single reading that fails becomes a refusal.
fn isolate(
    savepoint: &mut Savepoint<'_>,
    readings: &[Reading],
    names: &NameKeys,
    interrupted: &AtomicBool,
    refusals: &mut Vec<Refusal>,
) -> rusqlite::Result<()> {
    if interrupted.load(Ordering::Relaxed) {
        return Err(interrupted_error());
    }
    let e = match insert_all(savepoint, readings, names, interrupted) {
        Err(e) if is_permanent(&e) => e,
        other => return other,
    };
    if savepoint.is_autocommit() {
        // The savepoints went with the transaction: nothing to bisect in.
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
            Some(format!(
                "{}, and that rolled back the whole transaction (a trigger's \
                 RAISE(ROLLBACK)?), so the refused reading cannot be set aside; \
                 RAISE(ABORT) refuses one reading",
                cause(&e)
            )),
        ));
    }
    savepoint.rollback()?;
    if let [reading] = readings {
        refusals.push(Refusal {
            reading: reading.clone(),
            cause: cause(&e),
        });
        return Ok(());
    }
    let (low, high) = readings.split_at(readings.len() / 2);
    for half in [low, high] {
        let mut inner = savepoint.savepoint()?;
        isolate(&mut inner, half, names, interrupted, refusals)?;
        inner.commit()?;
    }
    Ok(())
}

/// Binds `rows` to the parameters of an INSERT made by `insert_sql`. A
/// missing measurement, `extra` or sequence is NULL.
fn bind_rows(
    insert: &mut rusqlite::Statement<'_>,
    rows: &[Reading],
    names: &NameKeys,
) -> rusqlite::Result<()> {
    for (i, r) in rows.iter().enumerate() {
        let at = 8 * i;
        let sequence = r.sequence();
        insert.raw_bind_parameter(at + 1, names.key(r.sensor()))?;
        insert.raw_bind_parameter(at + 2, r.temperature())?;
        insert.raw_bind_parameter(at + 3, r.humidity())?;
        insert.raw_bind_parameter(at + 4, r.ingested_at)?;
        insert.raw_bind_parameter(at + 5, r.received_at)?;
        insert.raw_bind_parameter(at + 6, r.extra().map(|e| e.as_str()))?;
        // Both at most `MAX_SEQ`: they fit an i64.
        insert.raw_bind_parameter(at + 7, sequence.map(|s| s.seq as i64))?;
        insert.raw_bind_parameter(at + 8, sequence.map(|s| s.boot as i64))?;
    }
    Ok(())
}

fn interrupted_error() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT),
        Some("interrupted".to_string()),
    )
}

/// True for the errors a read-only connection gets where a killed writer
/// left a hot rollback journal or a WAL index to rebuild.
fn needs_writer_to_recover(e: &rusqlite::Error) -> bool {
    use rusqlite::ffi::{SQLITE_READONLY_RECOVERY, SQLITE_READONLY_ROLLBACK};
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == SQLITE_READONLY_ROLLBACK
                || f.extended_code == SQLITE_READONLY_RECOVERY
    )
}

enum Migration {
    Sql(rusqlite::Error),
    TooNew(i64),
    /// The existing measurements table cannot take sensord's rows.
    Mismatch(String),
}

/// Checks, creates or upgrades the schema under a write lock, so several
/// processes opening a new file at once do it once, and prunes old batch
/// ids.
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
    if let Some(mismatch) = table_mismatch(&tx).map_err(Migration::Sql)? {
        return Err(Migration::Mismatch(format!(
            "table {DEFAULT_TABLE}: {mismatch}"
        )));
    }
    if version < SCHEMA_VERSION {
        upgrade_measurements(&tx).map_err(|e| match e {
            Upgrade::Sql(e) => Migration::Sql(e),
            Upgrade::ReservedIds(n) => Migration::Mismatch(format!(
                "table {DEFAULT_TABLE}: {n} rows have a sensor_id below {}, which this \
                 sensord keeps for sensor names; move them to other ids first",
                NAME_KEYS.end
            )),
        })?;
        tx.execute_batch(&SCHEMA).map_err(Migration::Sql)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(Migration::Sql)?;
    }
    tx.execute(
        "DELETE FROM sensord_batches WHERE committed_at < ?1",
        [unix_now() - BATCH_ID_RETENTION_SECONDS],
    )
    .map_err(Migration::Sql)?;
    tx.commit().map_err(Migration::Sql)
}

enum Upgrade {
    Sql(rusqlite::Error),
    /// Rows whose `sensor_id` is a name key now.
    ReservedIds(i64),
}

impl From<rusqlite::Error> for Upgrade {
    fn from(e: rusqlite::Error) -> Self {
        Upgrade::Sql(e)
    }
}

/// The measurements table as sensord 1 and 2 made it, without whitespace
/// and in upper case: only a table that starts so (perhaps followed by
/// columns added with ALTER TABLE) is rebuilt by `upgrade_measurements`.
const MADE_BY_VERSION_2: &str = "CREATETABLESENSOR_MEASUREMENTS(SENSOR_IDINTEGERNOTNULL,\
     TEMPERATUREREALNOTNULL,HUMIDITYREALNOTNULL,INGESTED_ATREALNOTNULL,RECEIVED_ATREALNOTNULL";

/// Brings a measurements table to version 3 in the open transaction,
/// keeping every row. SQLite cannot drop NOT NULL from a column, so a
/// table sensord 1 or 2 made is rebuilt: created anew (with any columns
/// added to it since), rows copied, old dropped, new renamed, its indexes
/// and triggers created again. A table made some other way keeps its
/// definition (its constraints are its owner's; a reading they refuse is a
/// refusal) and only gets `extra` if it lacks it. Nothing to do if there
/// is no table yet.
fn upgrade_measurements(tx: &Connection) -> Result<(), Upgrade> {
    let sql: Option<String> = tx
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
            [DEFAULT_TABLE],
            |row| row.get(0),
        )
        .optional()?;
    let Some(sql) = sql else {
        return Ok(());
    };
    let reserved: i64 = tx.query_row(
        &format!("SELECT COUNT(*) FROM {DEFAULT_TABLE} WHERE sensor_id < ?1"),
        [NAME_KEYS.end],
        |row| row.get(0),
    )?;
    if reserved > 0 {
        return Err(Upgrade::ReservedIds(reserved));
    }
    let squeezed: String = sql
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if !squeezed.starts_with(MADE_BY_VERSION_2) {
        for (column, declared) in ADDED_LATER {
            let has: bool = tx.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2 COLLATE NOCASE",
                [DEFAULT_TABLE, column],
                |row| row.get(0),
            )?;
            if !has {
                tx.execute_batch(&format!(
                    "ALTER TABLE {DEFAULT_TABLE} ADD COLUMN {column} {declared}"
                ))?;
            }
        }
        return Ok(());
    }
    // The text after `received_at REAL NOT NULL`: columns added since, and
    // the closing parenthesis.
    let upper = sql.to_ascii_uppercase();
    let rest = upper
        .find("RECEIVED_AT")
        .and_then(|at| {
            upper[at..]
                .find("NULL")
                .map(|null| at + null + "NULL".len())
        })
        .map_or(")", |end| &sql[end..]);
    let columns = tx
        .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?
        .query_map([DEFAULT_TABLE], |row| row.get::<_, String>(0))?
        .map(|name| name.map(|n| format!("\"{}\"", n.replace('"', "\"\""))))
        .collect::<rusqlite::Result<Vec<_>>>()?
        .join(", ");
    // Indexes and triggers on the table, as their owners wrote them
    // (automatic indexes have no SQL and come back with their constraints).
    let recreate = tx
        .prepare(
            "SELECT sql FROM sqlite_schema WHERE tbl_name = ?1 COLLATE NOCASE \
             AND type IN ('index', 'trigger') AND sql IS NOT NULL",
        )?
        .query_map([DEFAULT_TABLE], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.execute_batch(&format!(
        "CREATE TABLE sensord_upgrade ({MEASUREMENTS}{rest};
         INSERT INTO sensord_upgrade ({columns}) SELECT {columns} FROM {DEFAULT_TABLE};
         DROP TABLE {DEFAULT_TABLE};
         ALTER TABLE sensord_upgrade RENAME TO {DEFAULT_TABLE};"
    ))?;
    for sql in recreate {
        tx.execute_batch(&sql)?;
    }
    Ok(())
}

/// Why an existing measurements table cannot take sensord's rows, if it
/// cannot. It must be a table with the `COLUMNS`, each of the affinity
/// listed (so `BIGINT` or `DOUBLE` will do; see "Determination Of Column
/// Affinity" in SQLite's documentation). Anything else is allowed, since
/// it cannot change what is stored: constraints, triggers and indexes (a
/// row they refuse is a refusal) and extra columns, unless one is NOT NULL
/// without a default, which every insert would break.
fn table_mismatch(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let kind: Option<String> = conn
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE",
            [DEFAULT_TABLE],
            |row| row.get(0),
        )
        .optional()?;
    match kind.as_deref() {
        None | Some("table") => {}
        Some(other) => return Ok(Some(format!("is a {other}, expected a table"))),
    }
    // (name, declared type, NOT NULL, default, part of the primary key)
    let mut statement = conn.prepare(
        "SELECT name, type, \"notnull\", dflt_value IS NOT NULL, pk \
         FROM pragma_table_info(?1)",
    )?;
    let columns = statement
        .query_map([DEFAULT_TABLE], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, bool>(2)?,
                row.get::<_, bool>(3)?,
                row.get::<_, i64>(4)? > 0,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if columns.is_empty() {
        return Ok(None);
    }
    for (name, expected) in COLUMNS {
        let Some((_, declared, ..)) = columns.iter().find(|c| c.0.eq_ignore_ascii_case(name))
        else {
            if ADDED_LATER.iter().any(|(added, _)| *added == name) {
                continue;
            }
            return Ok(Some(format!("no column {name}")));
        };
        if affinity(declared) != expected {
            let is = if declared.is_empty() {
                "untyped"
            } else {
                declared
            };
            return Ok(Some(format!("column {name} is {is}, expected {expected}")));
        }
    }
    let extra = columns.iter().filter(|c| {
        !COLUMNS
            .iter()
            .any(|(name, _)| c.0.eq_ignore_ascii_case(name))
    });
    for (name, declared, not_null, has_default, in_key) in extra {
        // An INTEGER PRIMARY KEY is the rowid, which SQLite fills in.
        let rowid = *in_key && declared.eq_ignore_ascii_case("INTEGER");
        if *not_null && !has_default && !rowid {
            return Ok(Some(format!(
                "column {name} is NOT NULL without a default, and sensord does not write it"
            )));
        }
    }
    Ok(None)
}

/// The type affinity SQLite gives a column declared `declared`.
fn affinity(declared: &str) -> &'static str {
    let declared = declared.to_ascii_uppercase();
    let has = |part: &str| declared.contains(part);
    if has("INT") {
        "INTEGER"
    } else if has("CHAR") || has("CLOB") || has("TEXT") {
        "TEXT"
    } else if has("BLOB") || declared.is_empty() {
        "BLOB"
    } else if has("REAL") || has("FLOA") || has("DOUB") {
        "REAL"
    } else {
        "NUMERIC"
    }
}

/// rusqlite's message without its error-code prefix where it has one.
fn cause(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(_, Some(message)) => message.clone(),
        other => other.to_string(),
    }
}

/// Selects a value only if it is a number: another program may have
/// written anything into any column, and SQLite keeps it as written.
fn numeric(column: &str) -> String {
    format!("CASE WHEN typeof({column}) IN ('integer', 'real') THEN {column} END")
}

impl SqliteStore {
    /// The committed state of one stream, if any.
    fn load_stream(&mut self, key: &StreamKey) -> Result<Option<StreamRecord>, Error> {
        self.follow_path()?;
        let sql_error =
            |e: rusqlite::Error| Error::database(format!("cannot read {}", self.path), cause(&e));
        let sensor = match &key.sensor {
            SensorId::Int(id) => Some(*id),
            SensorId::Name(name) => self
                .conn
                .prepare_cached("SELECT key FROM sensor_names WHERE name = ?1")
                .and_then(|mut s| s.query_row([&**name], |row| row.get(0)).optional())
                .map_err(sql_error)?,
        };
        let Some(sensor) = sensor else {
            return Ok(None);
        };
        let row = self
            .conn
            .prepare_cached(&format!(
                "SELECT {} FROM sensord_sequences WHERE sensor_id = ?1 AND boot = ?2",
                &SEQUENCE_COLUMNS["sensor_id, boot, ".len()..]
            ))
            .and_then(|mut s| {
                s.query_row(params![sensor, key.boot as i64], |row| {
                    stream_from_row(|i| row.get(i), |i| row.get(i), |i| row.get(i))
                })
                .optional()
            })
            .map_err(sql_error)?;
        row.transpose()
            .map_err(|corrupt| Error::database(format!("cannot read {}", self.path), corrupt))
    }
}

impl Store for SqliteStore {
    fn write_batch(
        &mut self,
        id: BatchId,
        readings: &[Reading],
        streams: &[StreamUpdate],
    ) -> Result<Vec<Refusal>, Error> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("store::write_batch", |message| Err(Error::database(
            format!("cannot write batch to {}", self.path),
            message.unwrap_or_else(|| "injected failure".to_string())
        )));
        let what = format!("cannot write {} readings to {}", readings.len(), self.path);
        let part = Part {
            id: Some(id),
            readings,
        };
        let outcome = self.write_parts(None, &[part], streams, &what)?;
        Ok(outcome.map(|imported| imported.refused).unwrap_or_default())
    }

    fn import_spill(
        &mut self,
        key: &str,
        batches: &[SpillBatch],
        streams: &[StreamUpdate],
    ) -> Result<Option<Imported>, Error> {
        let what = format!("cannot import spill file into {}", self.path);
        let parts: Vec<Part<'_>> = batches
            .iter()
            .map(|b| Part {
                id: b.id,
                readings: &b.readings,
            })
            .collect();
        self.write_parts(Some(key), &parts, streams, &what)
    }

    /// One look-up per key: SQLite answers in microseconds.
    fn load_streams(
        &mut self,
        keys: &[StreamKey],
    ) -> Result<Vec<(StreamKey, StreamRecord)>, Error> {
        let mut found = Vec::new();
        for key in keys {
            if let Some(record) = self.load_stream(key)? {
                found.push((key.clone(), record));
            }
        }
        Ok(found)
    }

    fn interrupter(&self) -> Interrupter {
        let interrupt = Arc::clone(&self.interrupt);
        let interrupted = Arc::clone(&self.interrupted);
        Box::new(move || {
            interrupted.store(true, Ordering::SeqCst);
            interrupt
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .interrupt();
        })
    }

    /// Aggregates numbers only: a value another program wrote that is not
    /// a number (text, a blob, NULL) counts as a reading but in no
    /// aggregate, and a row whose `sensor_id` is not an integer in no
    /// sensor's line (with a warning saying how many). An aggregate with no
    /// number to go on is NaN.
    fn summary(&mut self, filter: &Filter) -> Result<Summary, Error> {
        let sql_error =
            |e: rusqlite::Error| Error::database(format!("cannot read {}", self.path), cause(&e));
        // A file sensord has not upgraded (or a table made by hand) may
        // lack the names table and the extra column: it has neither.
        let (has_names, has_extra): (bool, bool) = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'sensor_names'),
                        EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = 'extra' COLLATE NOCASE)",
                [DEFAULT_TABLE],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(sql_error)?;
        let condition = filter.sql(|t| t.to_string(), has_names);
        let (readings, first, last, stray): (i64, Option<f64>, Option<f64>, i64) = self
            .conn
            .query_row(
                &format!(
                    "SELECT COUNT(*), MIN({at}), MAX({at}),
                            COUNT(*) - COUNT(CASE WHEN typeof(sensor_id) = 'integer' THEN 1 END)
                     FROM {DEFAULT_TABLE} WHERE {condition}",
                    at = numeric("ingested_at")
                ),
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .map_err(sql_error)?;
        if stray > 0 {
            warn!(
                "{stray} rows of {} have a sensor_id that is not an integer; they count in \
                 the readings but in no sensor's line",
                self.path
            );
        }
        let mut statement = self
            .conn
            .prepare(&per_sensor_sql(
                DEFAULT_TABLE,
                &format!("typeof(sensor_id) = 'integer' AND {condition}"),
                &format!("MAX({})", numeric("ingested_at")),
                (&numeric("temperature"), &numeric("humidity")),
                has_names,
            ))
            .map_err(sql_error)?;
        let (keys, mut per_sensor): (Vec<i64>, Vec<SensorSummary>) = statement
            .query_map([], |row| {
                let summary = SensorSummary::from_row(
                    |i| row.get(i),
                    |i| Ok(row.get::<_, Option<f64>>(i)?.unwrap_or(f64::NAN)),
                    |i| row.get(i),
                )?;
                Ok((row.get::<_, i64>(0)?, summary))
            })
            .map_err(sql_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_error)?
            .into_iter()
            .unzip();
        let extra_fields = if has_extra {
            self.conn
                .prepare(&format!(
                    "SELECT DISTINCT sensor_id, field.key
                     FROM {DEFAULT_TABLE}, json_each(CASE WHEN json_valid(extra)
                         AND json_type(extra) = 'object' THEN extra END) AS field
                     WHERE typeof(sensor_id) = 'integer'
                       AND field.type IN ('integer', 'real') AND {condition}"
                ))
                .map_err(sql_error)?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(sql_error)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_error)?
        } else {
            Vec::new()
        };
        add_extra_measurements(&mut per_sensor, &keys, extra_fields);
        let has_sequences: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' \
                 AND name = 'sensord_sequences')",
                [],
                |row| row.get(0),
            )
            .map_err(sql_error)?;
        if has_sequences {
            let rows = self
                .conn
                .prepare(&delivery_sql("TRUE"))
                .map_err(sql_error)?
                .query_map([], |row| delivery_from_row(|i| row.get(i), |i| row.get(i)))
                .map_err(sql_error)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_error)?;
            attach_delivery(&mut per_sensor, &keys, rows);
        }
        Ok(Summary {
            readings: readings as u64,
            span: first.zip(last),
            per_sensor,
        })
    }

    /// Sensors whose `sensor_id` is not an integer (written by another
    /// program) are passed over: they cannot be walked in id order.
    fn expire(&mut self, before: f64, from: i64, limit: usize) -> Result<Expired, Error> {
        let limit = limit.max(1) as u64;
        let step = || -> rusqlite::Result<Expired> {
            let tx = self.begin()?;
            let mut expired = Expired {
                deleted: 0,
                resume: Some(from),
            };
            let mut looked_at = 0;
            while let Some(at) = expired.resume {
                if expired.deleted >= limit || looked_at >= limit {
                    break;
                }
                looked_at += 1;
                let sensor: Option<i64> = tx
                    .prepare_cached(
                        "SELECT sensor_id FROM sensor_measurements \
                         WHERE sensor_id >= ?1 AND typeof(sensor_id) = 'integer' \
                         ORDER BY sensor_id LIMIT 1",
                    )?
                    .query_row([at], |row| row.get(0))
                    .optional()?;
                let Some(sensor) = sensor else {
                    expired.resume = None;
                    break;
                };
                let left = limit - expired.deleted;
                let deleted =
                    tx.prepare_cached(
                        "DELETE FROM sensor_measurements WHERE rowid IN ( \
                             SELECT rowid FROM sensor_measurements \
                             WHERE sensor_id = ?1 AND ingested_at < ?2 LIMIT ?3)",
                    )?
                    .execute(params![sensor, before, left as i64])? as u64;
                expired.deleted += deleted;
                // The limit may have stopped it short of this sensor's last.
                expired.resume = if deleted < left {
                    sensor.checked_add(1)
                } else {
                    Some(sensor)
                };
            }
            tx.commit()?;
            Ok(expired)
        };
        step().map_err(|e| {
            Error::database(
                format!("cannot delete expired readings from {}", self.path),
                cause(&e),
            )
        })
    }

    fn replaced(&self) -> bool {
        self.replaced
    }

    // The dashboard's reads: each statement is an index seek, or a range of
    // one sensor's times, on its own short read transaction (autocommit),
    // so none holds back the checkpointer for long.

    fn sensor_list(&mut self, recent: &Recent) -> Result<Vec<SensorRow>, Error> {
        let list = || -> rusqlite::Result<Vec<SensorRow>> {
            let conn = &self.conn;
            let mut next = conn.prepare_cached(
                "SELECT sensor_id FROM sensor_measurements \
                 WHERE sensor_id >= ?1 AND typeof(sensor_id) = 'integer' \
                 ORDER BY sensor_id LIMIT 1",
            )?;
            let mut latest = conn.prepare_cached(&format!(
                "SELECT {}, {}, {} FROM sensor_measurements \
                 WHERE sensor_id = ?1 ORDER BY ingested_at DESC LIMIT 1",
                numeric("ingested_at"),
                numeric("temperature"),
                numeric("humidity")
            ))?;
            let mut count = conn.prepare_cached(
                "SELECT COUNT(*) FROM sensor_measurements \
                 WHERE sensor_id = ?1 AND ingested_at >= ?2",
            )?;
            let mut sample = conn.prepare_cached(&format!(
                "SELECT {}, {} FROM sensor_measurements \
                 WHERE sensor_id = ?1 AND ingested_at > ?2 AND ingested_at <= ?3 \
                 ORDER BY ingested_at DESC LIMIT 1",
                numeric("temperature"),
                numeric("humidity")
            ))?;
            let mut name = conn.prepare_cached("SELECT name FROM sensor_names WHERE key = ?1")?;
            // A prefix of its primary key: one seek per sensor.
            let mut delivery = conn.prepare_cached(&delivery_sql("sensor_id = ?1"))?;
            let mut rows = Vec::new();
            let mut from = Some(i64::MIN);
            while let Some(at) = from {
                // Many short statements: `sqlite3_interrupt` between two of
                // them is lost, so a stop is looked for here too.
                if self.interrupted.load(Ordering::Relaxed) {
                    return Err(interrupted_error());
                }
                let Some(key) = next.query_row([at], |r| r.get::<_, i64>(0)).optional()? else {
                    break;
                };
                from = key.checked_add(1);
                let (last_seen, temperature, humidity) = latest
                    .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?
                    .unwrap_or((None, None, None));
                let named = if NAME_KEYS.contains(&key) {
                    name.query_row([key], |r| r.get::<_, String>(0))
                        .optional()?
                } else {
                    None
                };
                let id = named.map_or(SensorId::Int(key), |name| SensorId::Name(name.into()));
                let mut row = SensorRow {
                    id,
                    last_seen: last_seen.unwrap_or(f64::NAN),
                    temperature,
                    humidity,
                    recent: count.query_row(params![key, recent.from], |r| r.get::<_, i64>(0))?
                        as u64,
                    spark_temperature: Vec::with_capacity(recent.samples),
                    spark_humidity: Vec::with_capacity(recent.samples),
                    loss_ratio: delivery
                        .query_row([key], |r| delivery_from_row(|i| r.get(i), |i| r.get(i)))
                        .optional()?
                        .map(|(_, d)| d.loss_ratio()),
                };
                for i in 0..recent.samples {
                    let start = recent.from + i as f64 * recent.step;
                    let (t, h) = sample
                        .query_row(params![key, start, start + recent.step], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .optional()?
                        .unwrap_or((None, None));
                    row.spark_temperature.push(t);
                    row.spark_humidity.push(h);
                }
                rows.push(row);
            }
            Ok(rows)
        };
        list().map_err(|e| self.read_error(&e))
    }

    fn sensor_key(&mut self, id: &SensorId) -> Result<Option<i64>, Error> {
        let find = || -> rusqlite::Result<Option<i64>> {
            let key = match id {
                SensorId::Int(key) => *key,
                SensorId::Name(name) => {
                    match self
                        .conn
                        .prepare_cached("SELECT key FROM sensor_names WHERE name = ?1")?
                        .query_row([&**name], |r| r.get(0))
                        .optional()?
                    {
                        Some(key) => key,
                        None => return Ok(None),
                    }
                }
            };
            let stored: bool = self
                .conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM sensor_measurements WHERE sensor_id = ?1)",
                )?
                .query_row([key], |r| r.get(0))?;
            Ok(stored.then_some(key))
        };
        find().map_err(|e| self.read_error(&e))
    }

    fn sensor_span(&mut self, key: i64) -> Result<Option<(f64, f64)>, Error> {
        let at = numeric("ingested_at");
        let span: rusqlite::Result<(Option<f64>, Option<f64>)> = self
            .conn
            .prepare_cached(&format!(
                "SELECT (SELECT {at} FROM sensor_measurements WHERE sensor_id = ?1
                         ORDER BY ingested_at LIMIT 1),
                        (SELECT {at} FROM sensor_measurements WHERE sensor_id = ?1
                         ORDER BY ingested_at DESC LIMIT 1)"
            ))
            .and_then(|mut s| s.query_row([key], |r| Ok((r.get(0)?, r.get(1)?))));
        let (first, last) = span.map_err(|e| self.read_error(&e))?;
        Ok(first.zip(last))
    }

    fn sensor_readings(
        &mut self,
        key: i64,
        (from, to): (f64, f64),
        sink: &mut dyn FnMut(RawReading<'_>),
    ) -> Result<(), Error> {
        let mut read = || -> rusqlite::Result<()> {
            let mut statement = self.conn.prepare_cached(&format!(
                "SELECT {}, {}, {}, extra FROM sensor_measurements \
                 WHERE sensor_id = ?1 AND ingested_at >= ?2 AND ingested_at <= ?3 \
                 ORDER BY ingested_at",
                numeric("ingested_at"),
                numeric("temperature"),
                numeric("humidity")
            ))?;
            let mut rows = statement.query(params![key, from, to])?;
            while let Some(row) = rows.next()? {
                let Some(at) = row.get::<_, Option<f64>>(0)? else {
                    continue;
                };
                sink(RawReading {
                    at,
                    temperature: row.get(1)?,
                    humidity: row.get(2)?,
                    extra: row.get_ref(3)?.as_str_or_null().ok().flatten(),
                });
            }
            Ok(())
        };
        read().map_err(|e| self.read_error(&e))
    }
}

impl SqliteStore {
    /// A failed dashboard read, naming the file.
    fn read_error(&self, e: &rusqlite::Error) -> Error {
        Error::database(format!("cannot read {}", self.path), cause(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(n: usize, seed: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| {
                Reading::from(crate::reading::ReadingParts {
                    sensor_id: crate::reading::SensorId::Int(((i * 7919 + seed) % 991) as i64),
                    temperature: Some(20.0 + (i % 97) as f64 / 7.0),
                    humidity: Some((i % 89) as f64 / 89.0),
                    ingested_at: 1_764_150_000.0 + (seed + i) as f64 / 1000.0,
                    received_at: 1_764_150_000.5,
                    extra: None,
                    seq: None,
                    boot: None,
                })
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
                    &[],
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
