//! The query benchmark's helper (`scripts/bench-queries.sh`): fills a SQLite
//! database with readings the way the daemon writes them, then times the
//! query users run most, one sensor over a time range.
//!
//! The fill goes through sensord's own store in sorted batches of 250,000,
//! as the persister commits them under load. The fleet is 991 sensors (ids
//! 10-1000, as `sensord send` picks them), each reporting once a second in
//! random order, so 10 million readings span about 2.8 hours.
//!
//! Usage: `bench_queries DB COUNT QUERIES`. Adds readings until DB holds
//! COUNT, printing `filled=N seconds=S`, then runs QUERIES queries on a new
//! connection, each for a random sensor over a random one-hour window within
//! that sensor's readings (so a file filled earlier, or by the daemon, is
//! queried where it has data), and prints
//! `queries=Q rows_median=R ms_median=M ms_p95=P ms_max=X`.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rusqlite::{Connection, OpenFlags};
use sensord::Reading;
use sensord::store::{self, BatchId, Options, Store, sqlite::SqliteStore};

const SENSORS: std::ops::RangeInclusive<i64> = 10..=1000;
const BATCH: usize = 250_000;
/// Where the fleet's clock starts: 2026-11-26T09:00Z.
const START: f64 = 1_795_683_600.0;
const WINDOW_SECS: f64 = 3600.0;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: bench_queries DB COUNT QUERIES");
        std::process::exit(2);
    }
    let (db, count, queries) = (&args[1], number(&args[2]), number(&args[3]));
    fill(db, count);

    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| fail(&format!("cannot open {db}: {e}")));
    let mut query = conn
        .prepare(
            "SELECT COUNT(*), MIN(temperature), AVG(temperature), MAX(temperature)
             FROM sensor_measurements
             WHERE sensor_id = ?1 AND ingested_at >= ?2 AND ingested_at < ?3",
        )
        .unwrap_or_else(|e| fail(&format!("cannot prepare the query: {e}")));
    // Two index seeks, outside the timing: where this sensor's readings lie.
    let mut extent = conn
        .prepare(
            "SELECT MIN(ingested_at), MAX(ingested_at)
             FROM sensor_measurements WHERE sensor_id = ?1",
        )
        .unwrap_or_else(|e| fail(&format!("cannot prepare the query: {e}")));
    let mut rng = StdRng::seed_from_u64(7);
    let (mut millis, mut rows) = (Vec::new(), Vec::new());
    for _ in 0..queries {
        let sensor = rng.random_range(SENSORS);
        let (first, last): (Option<f64>, Option<f64>) = extent
            .query_row([sensor], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap_or_else(|e| fail(&format!("query failed: {e}")));
        let (first, last) = (first.unwrap_or(START), last.unwrap_or(START));
        let from = first + rng.random_range(0.0..(last - first - WINDOW_SECS).max(1.0));
        let started = Instant::now();
        let found: i64 = query
            .query_row((sensor, from, from + WINDOW_SECS), |row| row.get(0))
            .unwrap_or_else(|e| fail(&format!("query failed: {e}")));
        millis.push(started.elapsed().as_secs_f64() * 1e3);
        rows.push(found as f64);
    }
    println!(
        "queries={queries} rows_median={:.0} ms_median={:.3} ms_p95={:.3} ms_max={:.3}",
        quantile(&mut rows, 0.5),
        quantile(&mut millis, 0.5),
        quantile(&mut millis, 0.95),
        quantile(&mut millis, 1.0),
    );
}

/// Adds readings until `db` holds `count`.
fn fill(db: &str, count: usize) {
    let options = Options {
        busy_timeout: std::time::Duration::from_secs(5),
        table: store::DEFAULT_TABLE.to_string(),
        stop: None,
        password_file: None,
    };
    let mut store =
        SqliteStore::open(db, &options).unwrap_or_else(|e| fail(&format!("cannot open {db}: {e}")));
    let held: i64 = Connection::open(db)
        .and_then(|conn| {
            conn.query_row("SELECT COUNT(*) FROM sensor_measurements", [], |row| {
                row.get(0)
            })
        })
        .unwrap_or_else(|e| fail(&format!("cannot count the readings in {db}: {e}")));
    let held = held as usize;
    if held >= count {
        println!("existing={held}");
        return;
    }
    let fleet = SENSORS.count();
    let mut rng = StdRng::seed_from_u64(held as u64);
    let started = Instant::now();
    let mut next = held;
    let mut seq = 0;
    while next < count {
        let n = BATCH.min(count - next);
        let mut batch: Vec<Reading> = (next..next + n)
            .map(|i| {
                // Reading i falls in second i / fleet of the fleet's clock.
                let at = START + (i / fleet) as f64 + rng.random_range(0.0..1.0);
                Reading::from(sensord::reading::ReadingParts {
                    sensor_id: sensord::reading::SensorId::Int(rng.random_range(SENSORS)),
                    temperature: Some(rng.random_range(1.0..35.0)),
                    humidity: Some(rng.random_range(1.0..12.0)),
                    ingested_at: at,
                    received_at: at + 0.001,
                    extra: None,
                    seq: None,
                    boot: None,
                })
            })
            .collect();
        store::sort_for_index(&mut batch);
        seq += 1;
        store
            .write_batch(BatchId { run: 0, seq }, &batch, &[])
            .unwrap_or_else(|e| fail(&e.to_string()));
        next += n;
    }
    println!(
        "filled={} seconds={:.3}",
        count - held,
        started.elapsed().as_secs_f64()
    );
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}

fn number(text: &str) -> usize {
    text.parse()
        .unwrap_or_else(|_| fail(&format!("`{text}` is not a count")))
}

fn fail(message: &str) -> ! {
    eprintln!("bench_queries: {message}");
    std::process::exit(1);
}
