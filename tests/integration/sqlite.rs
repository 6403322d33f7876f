//! The SQLite store under attack: poison readings, retried batch ids, old
//! schemas, foreign tables, a file deleted under the daemon, and `stats` on
//! whatever another program or a killed writer left.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use sensord::Reading;
use sensord::store::sqlite::SqliteStore;
use sensord::store::{BatchId, DEFAULT_TABLE, Options, SpillBatch, Store};

use crate::util::*;

/// The message SQLite gives for the CHECK constraint `poisoned_table` adds.
const POISON_CAUSE: &str = "CHECK constraint failed: temperature < 1000";

fn options() -> Options {
    Options {
        busy_timeout: Duration::from_secs(5),
        table: DEFAULT_TABLE.to_string(),
        stop: None,
        password_file: None,
    }
}

fn open(db: &Path) -> SqliteStore {
    SqliteStore::open(db.to_str().unwrap(), &options()).unwrap()
}

/// Creates sensord's measurements table by hand, with a CHECK constraint
/// that refuses temperatures of 1000 and more, before sensord opens it.
fn poisoned_table(db: &Path) {
    let conn = Connection::open(db).unwrap();
    conn.execute_batch(
        "CREATE TABLE sensor_measurements (
             sensor_id   INTEGER NOT NULL,
             temperature REAL    NOT NULL CHECK (temperature < 1000),
             humidity    REAL    NOT NULL,
             ingested_at REAL    NOT NULL,
             received_at REAL    NOT NULL
         )",
    )
    .unwrap();
}

/// `n` readings with distinct times; those at `poison` are 5000 degrees.
fn readings(n: usize, poison: &[usize]) -> Vec<Reading> {
    (0..n)
        .map(|i| reading(i, if poison.contains(&i) { 5000.0 } else { 20.5 }))
        .collect()
}

/// The `i`th of `readings`, at `temperature`.
fn reading(i: usize, temperature: f64) -> Reading {
    Reading::from(sensord::reading::ReadingParts {
        sensor_id: sensord::reading::SensorId::Int((i % 10) as i64),
        temperature: Some(temperature),
        humidity: Some(0.5),
        ingested_at: 1_764_150_000.0 + i as f64 / 1000.0,
        received_at: 1_764_150_000.0,
        extra: None,
        seq: None,
        boot: None,
    })
}

fn id(seq: u64) -> BatchId {
    BatchId { run: 7, seq }
}

fn query_i64(db: &Path, sql: &str) -> i64 {
    let conn = Connection::open(db).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// A batch of 1000 with 3 readings the table refuses commits the other 997
/// and returns the 3, each with the database's reason.
#[test]
fn poison_readings_are_refused_and_the_rest_commit() {
    let scratch = Scratch::new();
    poisoned_table(&scratch.db);
    let mut store = open(&scratch.db);
    let poison = [0, 500, 999];
    let batch = readings(1000, &poison);
    let refused = store.write_batch(id(1), &batch, &[]).unwrap();
    drop(store);
    assert_eq!(row_count(&scratch.db), 997);
    let refused_readings: Vec<Reading> = refused.iter().map(|r| r.reading.clone()).collect();
    let expected: Vec<Reading> = poison.iter().map(|&i| batch[i].clone()).collect();
    assert_eq!(refused_readings, expected);
    for refusal in &refused {
        assert_eq!(refusal.cause, POISON_CAUSE);
    }
    assert_eq!(
        query_i64(
            &scratch.db,
            "SELECT COUNT(*) FROM sensor_measurements WHERE temperature >= 1000"
        ),
        0
    );
}

/// Writing a batch again under an id that already committed writes
/// nothing and refuses nothing, even if it holds poison.
#[test]
fn a_committed_batch_id_is_not_written_again() {
    let scratch = Scratch::new();
    poisoned_table(&scratch.db);
    let mut store = open(&scratch.db);
    let batch = readings(1000, &[3, 4, 5]);
    assert_eq!(store.write_batch(id(1), &batch, &[]).unwrap().len(), 3);
    assert_eq!(store.write_batch(id(1), &batch, &[]).unwrap(), vec![]);
    drop(store);
    // A new store (a restart) knows the id too.
    let mut store = open(&scratch.db);
    assert_eq!(store.write_batch(id(1), &batch, &[]).unwrap(), vec![]);
    drop(store);
    assert_eq!(row_count(&scratch.db), 997);
}

/// A run keeps its newest batch ids, not all of them: the table stays small.
#[test]
fn old_batch_ids_of_a_run_are_pruned() {
    let scratch = Scratch::new();
    let mut store = open(&scratch.db);
    for seq in 1..=100 {
        store.write_batch(id(seq), &readings(2, &[]), &[]).unwrap();
    }
    drop(store);
    assert_eq!(row_count(&scratch.db), 200);
    let kept = query_i64(&scratch.db, "SELECT COUNT(*) FROM sensord_batches");
    assert!((16..=20).contains(&kept), "{kept} batch ids kept");
    assert_eq!(
        query_i64(&scratch.db, "SELECT MAX(seq) FROM sensord_batches"),
        100
    );
}

/// Batch ids older than a week, from any run, are pruned at open.
#[test]
fn batch_ids_older_than_a_week_are_pruned_at_open() {
    let scratch = Scratch::new();
    let mut store = open(&scratch.db);
    store.write_batch(id(1), &readings(1, &[]), &[]).unwrap();
    drop(store);
    let conn = Connection::open(&scratch.db).unwrap();
    conn.execute_batch(
        "INSERT INTO sensord_batches VALUES (99, 1, unixepoch() - 8 * 86400);
         INSERT INTO sensord_batches VALUES (99, 2, unixepoch() - 6 * 86400);",
    )
    .unwrap();
    drop(conn);
    drop(open(&scratch.db));
    assert_eq!(
        query_i64(
            &scratch.db,
            "SELECT COUNT(*) FROM sensord_batches WHERE run = 99"
        ),
        1
    );
}

/// A spill import is one transaction: batches whose id committed are
/// skipped, the others (with an id or without) imported, poison refused;
/// the same key again imports nothing.
#[test]
fn import_spill_skips_committed_batches_and_refuses_poison() {
    let scratch = Scratch::new();
    poisoned_table(&scratch.db);
    let mut store = open(&scratch.db);
    let committed = readings(100, &[]);
    store.write_batch(id(1), &committed, &[]).unwrap();
    let batches = vec![
        SpillBatch {
            id: Some(id(1)),
            readings: committed.clone(),
        },
        SpillBatch {
            id: Some(id(2)),
            readings: readings(50, &[10]),
        },
        SpillBatch {
            id: None,
            readings: readings(30, &[0, 29]),
        },
    ];
    let imported = store
        .import_spill("spill-a", &batches, &[])
        .unwrap()
        .unwrap();
    assert_eq!((imported.stored, imported.skipped), (49 + 28, 100));
    assert_eq!(imported.refused.len(), 3);
    assert!(imported.refused.iter().all(|r| r.cause == POISON_CAUSE));
    assert_eq!(store.import_spill("spill-a", &batches, &[]).unwrap(), None);
    // The imported batch's id is recorded: writing it again does nothing.
    assert_eq!(
        store.write_batch(id(2), &readings(50, &[]), &[]).unwrap(),
        vec![]
    );
    drop(store);
    assert_eq!(row_count(&scratch.db), 100 + 49 + 28);
    assert_eq!(
        query_i64(
            &scratch.db,
            "SELECT readings FROM sensord_spill_imports WHERE spill_key = 'spill-a'"
        ),
        49 + 28
    );
}

/// A file of schema version 1 (before batch ids) is upgraded in place at
/// open and keeps its rows; version 0 with the tables present too.
#[test]
fn older_schema_versions_are_upgraded_and_keep_their_rows() {
    for version in [0, 1] {
        let scratch = Scratch::new();
        let conn = Connection::open(&scratch.db).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE sensor_measurements (
                 sensor_id   INTEGER NOT NULL,
                 temperature REAL    NOT NULL,
                 humidity    REAL    NOT NULL,
                 ingested_at REAL    NOT NULL,
                 received_at REAL    NOT NULL
             );
             CREATE INDEX sensor_measurements_sensor_time
                 ON sensor_measurements (sensor_id, ingested_at);
             CREATE TABLE sensord_spill_imports (
                 spill_key   TEXT PRIMARY KEY,
                 readings    INTEGER NOT NULL,
                 imported_at REAL    NOT NULL
             );
             INSERT INTO sensor_measurements VALUES (1, 20.5, 0.5, 1764150000.0, 1764150000.0);
             INSERT INTO sensor_measurements VALUES (2, 21.5, 0.6, 1764150001.0, 1764150001.0);
             PRAGMA user_version = {version};"
        ))
        .unwrap();
        drop(conn);
        let mut store = open(&scratch.db);
        store.write_batch(id(1), &readings(10, &[]), &[]).unwrap();
        assert_eq!(
            store.write_batch(id(1), &readings(10, &[]), &[]).unwrap(),
            vec![]
        );
        drop(store);
        assert_eq!(row_count(&scratch.db), 12, "version {version}");
        assert_eq!(query_i64(&scratch.db, "PRAGMA user_version"), 4);
        assert_eq!(
            query_i64(&scratch.db, "SELECT COUNT(*) FROM sensord_batches"),
            1
        );
    }
}

/// An existing table whose columns cannot take sensord's rows stops
/// `serve` at start with one line naming the mismatch; extra nullable
/// columns, other declared types of the same affinity and constraints are
/// accepted.
#[test]
fn a_mismatched_table_is_refused_at_start() {
    let cases = [
        (
            "sensor_id INTEGER, temperature TEXT, humidity REAL, ingested_at REAL, received_at REAL",
            "table sensor_measurements: column temperature is TEXT, expected REAL",
        ),
        (
            "sensor_id INTEGER, temperature REAL, ingested_at REAL, received_at REAL",
            "table sensor_measurements: no column humidity",
        ),
        (
            "sensor_id INTEGER, temperature REAL, humidity REAL, ingested_at REAL, \
             received_at REAL, site TEXT NOT NULL",
            "table sensor_measurements: column site is NOT NULL without a default, \
             and sensord does not write it",
        ),
    ];
    for (columns, message) in cases {
        let scratch = Scratch::new();
        let conn = Connection::open(&scratch.db).unwrap();
        conn.execute_batch(&format!("CREATE TABLE sensor_measurements ({columns})"))
            .unwrap();
        drop(conn);
        let out = run(
            &["serve", "--bind", "127.0.0.1:0", "--db", scratch.db_arg()],
            scratch.path(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{columns}: {stderr}");
        let expected = format!("cannot open database {}: {message}", scratch.db_arg());
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].ends_with(&expected), "{stderr}");
    }

    let scratch = Scratch::new();
    let conn = Connection::open(&scratch.db).unwrap();
    conn.execute_batch(
        "CREATE TABLE sensor_measurements (
             id INTEGER PRIMARY KEY, sensor_id BIGINT NOT NULL,
             temperature DOUBLE PRECISION CHECK (temperature < 1000), humidity FLOAT,
             ingested_at REAL, received_at REAL, site TEXT, note TEXT NOT NULL DEFAULT ''
         )",
    )
    .unwrap();
    drop(conn);
    drop(open(&scratch.db));
}

/// A database file deleted (with its -wal and -shm) while the daemon runs
/// is recreated at its path and holds what was sent afterwards; the run
/// then exits 1, not 0, and says what happened.
#[test]
fn a_deleted_database_is_recreated_at_its_path() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &[
            "--db",
            scratch.db_arg(),
            "--flush-interval",
            "20ms",
            "--stats-interval",
            "50ms",
        ],
    );
    let datagram = |i| format!(r#"{{"sensor_id": {i}, "temperature": 1.5, "humidity": 2.5}}"#);
    send_datagrams(server.addr, (0..100).map(datagram));
    wait_for_rows(&scratch.db, 100);
    for suffix in ["", "-wal", "-shm"] {
        std::fs::remove_file(format!("{}{suffix}", scratch.db_arg())).unwrap();
    }
    send_datagrams(server.addr, (100..130).map(datagram));
    server.wait_for_line("reopened database", EXIT);
    wait_for_rows(&scratch.db, 30);
    let status = server.stop_with(libc::SIGTERM, EXIT);
    let log = server.log_text();
    assert!(
        log.contains(&format!("database {} was deleted", scratch.db_arg())),
        "{log}"
    );
    assert_eq!(row_count(&scratch.db), 30, "{log}");
    assert_eq!(status.code(), Some(1), "{log}");
}

/// Waits (up to `EXIT`) until `db` exists and holds `n` rows.
fn wait_for_rows(db: &Path, n: u64) {
    let deadline = Instant::now() + EXIT;
    loop {
        let rows = if db.exists() {
            Connection::open(db)
                .and_then(|c| {
                    c.query_row("SELECT COUNT(*) FROM sensor_measurements", [], |r| {
                        r.get::<_, i64>(0)
                    })
                })
                .unwrap_or(0) as u64
        } else {
            0
        };
        if rows >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rows} rows of {n} within {EXIT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A busy timeout near the longest the command line takes (100 years),
/// far beyond what SQLite's millisecond timeout can hold, means "no
/// deadline", not a panic.
#[test]
fn an_endless_busy_timeout_works() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--busy-timeout", "99years"],
    );
    let datagram = |i| format!(r#"{{"sensor_id": {i}, "temperature": 1.5, "humidity": 2.5}}"#);
    send_datagrams(server.addr, (0..10).map(datagram));
    server.stop_clean();
    assert_eq!(row_count(&scratch.db), 10);
}

/// Runs `sensord stats --db DB ARGS` and returns its stdout, failing the
/// test unless it exits 0.
fn stats(db: &Path, args: &[&str]) -> String {
    let db = db.to_str().unwrap();
    let out = run(&[&["stats", "--db", db][..], args].concat(), Path::new("/"));
    assert!(
        out.status.success(),
        "stats {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Rows another program wrote with any value SQLite can hold (times out of
/// range, NULLs, text, the largest doubles, whose sum overflows) print as a
/// table and as JSON, exit 0.
#[test]
fn stats_prints_any_stored_value() {
    let scratch = Scratch::new();
    let conn = Connection::open(&scratch.db).unwrap();
    // No declared types, no NOT NULL: what another program might make.
    conn.execute_batch(
        "CREATE TABLE sensor_measurements
             (sensor_id, temperature, humidity, ingested_at, received_at);
         INSERT INTO sensor_measurements VALUES (1, 20.5, 0.5, 1e300, 1e300);
         INSERT INTO sensor_measurements VALUES (1, 1.7976931348623157e308, 0.5, -5, 0);
         INSERT INTO sensor_measurements VALUES (1, 1.7976931348623157e308, 0.5, 1764150000, 0);
         INSERT INTO sensor_measurements VALUES (2, 'hot', NULL, 'yesterday', NULL);
         INSERT INTO sensor_measurements VALUES (3, NULL, x'00', NULL, NULL);
         INSERT INTO sensor_measurements VALUES (9223372036854775807, -1e308, 1e-300, 0, 0);
         INSERT INTO sensor_measurements VALUES (9223372036854775807, -1e308, 9223372036854775807, 0, 0);
         INSERT INTO sensor_measurements VALUES (9223372036854775807, 0, 9223372036854775807, 0, 0);
         INSERT INTO sensor_measurements VALUES (NULL, 1, 1, 1, 1);
         INSERT INTO sensor_measurements VALUES ('four', 1, 1, 1, 1);",
    )
    .unwrap();
    drop(conn);

    let table = stats(&scratch.db, &[]);
    assert!(table.contains("readings: 10"), "{table}");
    assert!(table.contains("sensors:  4"), "{table}");
    assert!(table.contains("-5 .. 1e300"), "{table}");
    assert!(table.contains("1.80e308"), "{table}");
    let sensor_2 = table
        .lines()
        .find(|l| l.trim_start().starts_with("2 "))
        .unwrap();
    assert_eq!(
        sensor_2.split_whitespace().collect::<Vec<_>>(),
        ["2", "1", "-", "-", "-", "-", "-", "-", "-"],
        "{table}"
    );

    let json: serde_json::Value = serde_json::from_str(&stats(&scratch.db, &["--json"])).unwrap();
    assert_eq!(json["readings"], 10);
    assert_eq!(json["first_ingested_at"], -5.0);
    assert_eq!(json["last_ingested_at"], 1e300);
    assert_eq!(
        json["per_sensor"][1]["temperature"]["min"],
        serde_json::Value::Null
    );
}

/// Only times out of range or non-numeric: the span says so and still
/// exits 0.
#[test]
fn stats_without_a_usable_time_says_so() {
    let scratch = Scratch::new();
    let conn = Connection::open(&scratch.db).unwrap();
    conn.execute_batch(
        "CREATE TABLE sensor_measurements
             (sensor_id, temperature, humidity, ingested_at, received_at);
         INSERT INTO sensor_measurements VALUES (1, 20.5, 0.5, 'noon', 0);",
    )
    .unwrap();
    drop(conn);
    let table = stats(&scratch.db, &[]);
    assert!(
        table.contains("span:     (no ingested_at is a number)"),
        "{table}"
    );
}

/// A file a killed writer left with a hot rollback journal (made here by
/// copying a database and its journal mid-transaction) is recovered by
/// `stats`, which then reports the rows as they were before that
/// transaction.
#[test]
fn stats_recovers_a_file_left_mid_transaction() {
    let scratch = Scratch::new();
    let source = scratch.path().join("source.db");
    let conn = Connection::open(&source).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = DELETE;
         CREATE TABLE sensor_measurements (
             sensor_id INTEGER NOT NULL, temperature REAL NOT NULL, humidity REAL NOT NULL,
             ingested_at REAL NOT NULL, received_at REAL NOT NULL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
         INSERT INTO sensor_measurements SELECT i % 10, 20.5, 0.5, 1764150000 + i, 0 FROM n;
         PRAGMA cache_size = 10;
         BEGIN;
         DELETE FROM sensor_measurements WHERE sensor_id < 5;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
         INSERT INTO sensor_measurements SELECT 100, 20.5, 0.5, 1764150000 + i, 0 FROM n;",
    )
    .unwrap();
    let journal = scratch.path().join("source.db-journal");
    assert!(journal.exists(), "the transaction has a journal");
    std::fs::copy(&source, &scratch.db).unwrap();
    std::fs::copy(&journal, format!("{}-journal", scratch.db_arg())).unwrap();
    drop(conn);

    let db = scratch.db_arg();
    let out = run(&["stats", "--db", db], scratch.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("left mid-transaction by a writer that was killed"),
        "{stderr}"
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("readings: 20000"), "{table}");
    assert!(table.contains("sensors:  10"), "{table}");
}

/// `stats` reads a file whose daemon was killed (SIGKILL) in the middle
/// of writing, WAL and all.
#[test]
fn stats_reads_a_file_whose_writer_was_killed() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--batch-size", "500"],
    );
    let datagram = |i| format!(r#"{{"sensor_id": {i}, "temperature": 1.5, "humidity": 2.5}}"#);
    send_datagrams(server.addr, (0..20_000).map(|i| datagram(i % 50)));
    wait_for_rows(&scratch.db, 1);
    server.stop_with(libc::SIGKILL, EXIT);
    let table = stats(&scratch.db, &[]);
    assert!(table.contains("readings: "), "{table}");
}

/// A `BEFORE INSERT` trigger's `RAISE(ABORT, ...)` refuses a reading as a
/// constraint does, with the trigger's message.
#[test]
fn a_trigger_refusal_is_isolated_too() {
    let scratch = Scratch::new();
    drop(open(&scratch.db));
    let conn = Connection::open(&scratch.db).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER no_heat BEFORE INSERT ON sensor_measurements
         WHEN NEW.temperature >= 1000 BEGIN SELECT RAISE(ABORT, 'too hot'); END",
    )
    .unwrap();
    drop(conn);
    let mut store = open(&scratch.db);
    let refused = store
        .write_batch(id(1), &readings(200, &[7, 150]), &[])
        .unwrap();
    drop(store);
    let causes: Vec<&str> = refused.iter().map(|r| r.cause.as_str()).collect();
    assert_eq!(causes, ["too hot", "too hot"]);
    assert_eq!(row_count(&scratch.db), 198);
}

/// A trigger's `RAISE(ROLLBACK, ...)` ends the transaction and with it the
/// savepoints bisection needs: the batch fails (to be retried) with a
/// message that says so, and nothing is written.
#[test]
fn a_trigger_rolling_back_everything_is_an_error() {
    let scratch = Scratch::new();
    drop(open(&scratch.db));
    let conn = Connection::open(&scratch.db).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER no_heat BEFORE INSERT ON sensor_measurements
         WHEN NEW.temperature >= 1000 BEGIN SELECT RAISE(ROLLBACK, 'too hot'); END",
    )
    .unwrap();
    drop(conn);
    let mut store = open(&scratch.db);
    let error = store
        .write_batch(id(1), &readings(200, &[7]), &[])
        .unwrap_err()
        .to_string();
    assert!(error.contains("too hot"), "{error}");
    assert!(error.contains("RAISE(ROLLBACK)"), "{error}");
    drop(store);
    assert_eq!(row_count(&scratch.db), 0);
}

/// A file replaced under the store (another database renamed over its
/// path) is noticed at the next write, which goes into the new file; the
/// store reports `replaced()` and the new file stays intact.
#[test]
fn a_replaced_file_is_written_and_reported() {
    let scratch = Scratch::new();
    let mut store = open(&scratch.db);
    store.write_batch(id(1), &readings(100, &[]), &[]).unwrap();
    assert!(!store.replaced());
    let other = scratch.path().join("other.db");
    let mut other_store = open(&other);
    other_store
        .write_batch(id(1), &readings(5, &[]), &[])
        .unwrap();
    drop(other_store);
    std::fs::rename(&other, &scratch.db).unwrap();
    store.write_batch(id(2), &readings(10, &[]), &[]).unwrap();
    assert!(store.replaced());
    drop(store);
    assert_eq!(row_count(&scratch.db), 15);
    let check: String = Connection::open(&scratch.db)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// The interrupter stops a long bisection (a batch whose every reading is
/// refused) promptly: the batch fails, to be retried, and nothing is
/// written.
#[test]
fn the_interrupter_stops_a_long_bisection() {
    let scratch = Scratch::new();
    poisoned_table(&scratch.db);
    let mut store = open(&scratch.db);
    let batch: Vec<Reading> = (0..200_000).map(|i| reading(i, 5000.0)).collect();
    let interrupt = store.interrupter();
    let interrupter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        interrupt();
    });
    let started = Instant::now();
    let error = store
        .write_batch(id(1), &batch, &[])
        .unwrap_err()
        .to_string();
    let took = started.elapsed();
    interrupter.join().unwrap();
    assert!(error.contains("interrupted"), "{error}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    drop(store);
    assert_eq!(row_count(&scratch.db), 0);
}
