//! The two CPU costs of ingesting a reading, apart from the socket: parsing
//! its datagram, and its share of one batch insert into SQLite (with the
//! `(sensor_id, ingested_at)` index and random sensor ids, as in service).
//! `scripts/bench.sh` measures the whole daemon.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use sensord::Reading;
use sensord::reading::{Format, ReadingParts, Sensor, SensorId, parse_datagram};
use sensord::store::sqlite::SqliteStore;
use sensord::store::{self, BatchId, Options, Store};

/// A reading as `sensord send` writes it.
const DATAGRAM: &[u8] = br#"{"sensor_id":517,"temperature":23.41508812034951,"humidity":7.025389347710512,"ingested_at":1764140501.1234567}"#;

/// The same from a named sensor with two extra fields.
const NAMED: &[u8] = br#"{"sensor_id":"esp32-517","temperature":23.41508812034951,"humidity":7.025389347710512,"pressure":1013.2512,"rssi":-67,"ingested_at":1764140501.1234567}"#;

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_datagram");
    group.throughput(Throughput::Elements(1));
    let (mut out, mut rejections) = (Vec::with_capacity(1), Vec::new());
    for (name, datagram) in [
        ("one reading", DATAGRAM),
        ("one reading, named sensor + 2 extras", NAMED),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                parse_datagram(
                    black_box(datagram),
                    1_764_140_501.5,
                    &Format::default(),
                    &mut out,
                    &mut rejections,
                );
                black_box(&out);
            })
        });
    }
    group.finish();
}

/// Random readings from sensors 10-1000, taken one microsecond apart from
/// `start` on.
fn readings(rng: &mut StdRng, n: usize, start: f64) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            let at = start + i as f64 * 1e-6;
            Reading::from(ReadingParts {
                sensor_id: SensorId::Int(rng.random_range(10..=1000)),
                temperature: Some(rng.random_range(1.0..35.0)),
                humidity: Some(rng.random_range(1.0..12.0)),
                ingested_at: at,
                received_at: at,
                extra: None,
                seq: None,
                boot: None,
            })
        })
        .collect()
}

/// `readings` from named sensors (`esp32-10` to `esp32-1000`) with two
/// extra fields, made by parsing their datagrams.
fn named_readings(rng: &mut StdRng, n: usize, start: f64) -> Vec<Reading> {
    let (mut out, mut rejections) = (Vec::with_capacity(n), Vec::new());
    for r in readings(rng, n, start) {
        let Sensor::Int(id) = r.sensor() else {
            unreachable!("`readings` makes integer ids")
        };
        let datagram = format!(
            r#"{{"sensor_id":"esp32-{id}","temperature":{},"humidity":{},"pressure":{},"rssi":{},"ingested_at":{}}}"#,
            r.temperature().unwrap_or_default(),
            r.humidity().unwrap_or_default(),
            1000.0 + r.ingested_at.fract() * 50.0,
            -(id % 60) - 30,
            r.ingested_at
        );
        parse_datagram(
            datagram.as_bytes(),
            r.received_at,
            &Format::default(),
            &mut out,
            &mut rejections,
        );
    }
    assert!(rejections.is_empty());
    out
}

fn batch_insert(c: &mut Criterion) {
    batch_insert_of(
        c,
        "sort + write_batch of 250000, random sensor ids",
        readings,
    );
    batch_insert_of(
        c,
        "sort + write_batch of 250000, named sensors + 2 extras",
        named_readings,
    );
}

/// The persister's work per batch on readings `make` makes, in a fresh
/// database already holding a million of them.
fn batch_insert_of(
    c: &mut Criterion,
    name: &str,
    make: fn(&mut StdRng, usize, f64) -> Vec<Reading>,
) {
    // The default --batch-size, which batches reach under load.
    const BATCH: usize = 250_000;
    let dir = tempfile::tempdir().expect("a temporary directory can be made");
    let path = dir.path().join("bench.db");
    let options = Options {
        busy_timeout: Duration::from_secs(5),
        table: "sensor_measurements".to_string(),
        stop: None,
        password_file: None,
    };
    let mut store = SqliteStore::open(path.to_str().expect("temp paths are UTF-8"), &options)
        .expect("a new database opens");
    let mut rng = StdRng::seed_from_u64(7);
    let mut seq = 0;
    let mut start = 1_764_140_000.0;
    let mut next_batch = || {
        seq += 1;
        start += 1.0;
        (BatchId { run: 1, seq }, make(&mut rng, BATCH, start))
    };
    // A million rows first: the index is then deeper than one batch.
    for _ in 0..4 {
        let (id, batch) = next_batch();
        store
            .write_batch(id, &batch, &[])
            .expect("the batch commits");
    }
    let mut group = c.benchmark_group("sqlite");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    // What the persister does per batch: sort it in place, then write it.
    group.bench_function(name, |b| {
        b.iter_batched(
            &mut next_batch,
            |(id, mut batch)| {
                store::sort_for_index(&mut batch);
                store
                    .write_batch(id, &batch, &[])
                    .expect("the batch commits")
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, parse, batch_insert);
criterion_main!(benches);
