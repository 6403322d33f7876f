//! Rows per second through each sink, one 10,000-reading batch per
//! iteration: SQLite, PostgreSQL by binary COPY (what the store does) and
//! PostgreSQL by multi-row INSERT (the alternative COPY was chosen over).
//!
//! The PostgreSQL cases run when `SENSORD_BENCH_PG_URL` names a database;
//! `scripts/bench-sinks.sh` starts a throwaway cluster and sets it.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postgres::types::ToSql;
use postgres::{Client, NoTls};

use sensord::Reading;
use sensord::store::postgres::timestamp;
use sensord::store::{self, BatchId, Options};

const BATCH: usize = 10_000;
/// Rows per INSERT statement: 5 parameters each, under PostgreSQL's 65,535.
const INSERT_ROWS: usize = 1_000;

fn readings(n: usize) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            Reading::from(sensord::reading::ReadingParts {
                sensor_id: sensord::reading::SensorId::Int((i % 1000) as i64),
                temperature: Some(20.0 + (i % 97) as f64 / 7.0),
                humidity: Some((i % 89) as f64 / 89.0),
                ingested_at: 1_764_150_000.0 + i as f64 / 1000.0,
                received_at: 1_764_150_000.5 + i as f64 / 1000.0,
                extra: None,
                seq: None,
                boot: None,
            })
        })
        .collect()
}

fn options(table: &str) -> Options {
    Options {
        busy_timeout: Duration::from_secs(5),
        table: table.to_string(),
        stop: None,
        password_file: None,
    }
}

/// Runs `write` once per iteration with a fresh batch id.
fn bench_batches(c: &mut Criterion, name: &str, mut write: impl FnMut(BatchId, &[Reading])) {
    let batch = readings(BATCH);
    let mut group = c.benchmark_group("sinks");
    group
        .throughput(Throughput::Elements(BATCH as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    let run = rand_run();
    let mut seq = 0;
    group.bench_function(name, |b| {
        b.iter(|| {
            seq += 1;
            write(BatchId { run, seq }, black_box(&batch));
        })
    });
    group.finish();
}

/// A run id unlikely to repeat across bench runs on one database.
fn rand_run() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

fn sqlite(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let mut sink = store::open(db.to_str().unwrap(), &options(store::DEFAULT_TABLE)).unwrap();
    bench_batches(c, "sqlite", |id, batch| {
        sink.write_batch(id, batch, &[]).unwrap();
    });
}

fn postgres_copy(c: &mut Criterion) {
    let Ok(url) = std::env::var("SENSORD_BENCH_PG_URL") else {
        eprintln!("SENSORD_BENCH_PG_URL not set; skipping the PostgreSQL cases");
        return;
    };
    let mut sink = store::open(&url, &options("bench_copy")).unwrap();
    bench_batches(c, "postgres_copy", |id, batch| {
        sink.write_batch(id, batch, &[]).unwrap();
    });
}

/// The store's transaction with multi-row INSERTs in place of COPY.
fn postgres_insert(c: &mut Criterion) {
    let Ok(url) = std::env::var("SENSORD_BENCH_PG_URL") else {
        return;
    };
    // Opening the store creates the table and the batch-id table.
    drop(store::open(&url, &options("bench_insert")).unwrap());
    let mut client = Client::connect(&url, NoTls).unwrap();
    let values: Vec<String> = (0..INSERT_ROWS)
        .map(|r| {
            let p = r * 5;
            format!(
                "(${}, ${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5
            )
        })
        .collect();
    let insert = client
        .prepare(&format!(
            "INSERT INTO bench_insert (sensor_id, temperature, humidity, ingested_at, received_at) \
             VALUES {}",
            values.join(", ")
        ))
        .unwrap();
    bench_batches(c, "postgres_insert", |id, batch| {
        let mut tx = client.transaction().unwrap();
        tx.execute(
            "INSERT INTO sensord_batches (run, seq) VALUES ($1, $2)",
            &[&(id.run as i64), &(id.seq as i64)],
        )
        .unwrap();
        for chunk in batch.chunks(INSERT_ROWS) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|r| {
                    let sensord::reading::Sensor::Int(id) = r.sensor() else {
                        unreachable!("the bench's sensors are integers")
                    };
                    (
                        id,
                        r.temperature(),
                        r.humidity(),
                        timestamp(r.ingested_at),
                        timestamp(r.received_at),
                    )
                })
                .collect();
            let params: Vec<&(dyn ToSql + Sync)> = rows
                .iter()
                .flat_map(|(id, temperature, humidity, ingested, received)| {
                    [
                        id as &(dyn ToSql + Sync),
                        temperature,
                        humidity,
                        ingested,
                        received,
                    ]
                })
                .collect();
            // BATCH is a multiple of INSERT_ROWS, so every chunk is full.
            tx.execute(&insert, &params).unwrap();
        }
        tx.commit().unwrap();
    });
}

criterion_group!(benches, sqlite, postgres_copy, postgres_insert);
criterion_main!(benches);
