//! Where readings end up. The small `Store` trait is all the persister and
//! `stats` know; `open` picks the implementation once, from `--db`.
//!
//! Stores know SQL, never channels or sockets.

use crate::error::Error;
use crate::reading::Reading;

pub mod postgres;
pub mod sqlite;

/// The measurements table unless `--table` names another.
pub const DEFAULT_TABLE: &str = "sensor_measurements";

/// Identifies one batch across retries, so a store whose commit outcome can
/// be unknown (a network database) can tell whether it already landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchId {
    /// Random per process run.
    pub run: u64,
    /// Counts batches within the run.
    pub seq: u64,
}

/// Aborts whatever the store is doing right now, from another thread.
pub type Interrupter = Box<dyn Fn() + Send + Sync>;

/// A database that stores readings.
pub trait Store: Send {
    /// Commits `readings` in one transaction: all of them or none. Callers
    /// hand them over in index order (`sort_for_index`): in any other order
    /// they are stored all the same, but SQLite takes about a third longer.
    fn write_batch(&mut self, id: BatchId, readings: &[Reading]) -> Result<(), Error>;

    /// Commits the final flush's readings like `write_batch`, as the last
    /// write before the store is dropped, so the store may prepare for
    /// closing first.
    fn write_final(&mut self, id: BatchId, readings: &[Reading]) -> Result<(), Error> {
        self.write_batch(id, readings)
    }

    /// Commits the readings of a spill file in one transaction (in index
    /// order, as for `write_batch`), recording `key` with them. Returns
    /// false, writing nothing, if `key` was already imported: replay is
    /// idempotent across a crash before the file's removal.
    fn import_spill(&mut self, key: &str, readings: &[Reading]) -> Result<bool, Error>;

    /// A handle that makes the current or next operation fail promptly.
    fn interrupter(&self) -> Interrupter;

    /// Totals and per-sensor aggregates, for `sensord stats`.
    fn summary(&mut self) -> Result<Summary, Error>;
}

/// What `sensord stats` reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub readings: u64,
    /// Earliest and latest `ingested_at`, if there are readings.
    pub span: Option<(f64, f64)>,
    /// One entry per sensor, in ascending `sensor_id` order.
    pub per_sensor: Vec<SensorSummary>,
}

/// Aggregates for one sensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SensorSummary {
    pub sensor_id: i64,
    pub readings: u64,
    pub temperature: MinAvgMax,
    pub humidity: MinAvgMax,
}

impl SensorSummary {
    /// Reads one row of `per_sensor_sql` through a driver's getters.
    fn from_row<E>(
        int: impl Fn(usize) -> Result<i64, E>,
        real: impl Fn(usize) -> Result<f64, E>,
    ) -> Result<Self, E> {
        let stats = |first: usize| -> Result<MinAvgMax, E> {
            Ok(MinAvgMax {
                min: real(first)?,
                avg: real(first + 1)?,
                max: real(first + 2)?,
            })
        };
        Ok(SensorSummary {
            sensor_id: int(0)?,
            readings: int(1)? as u64,
            temperature: stats(2)?,
            humidity: stats(5)?,
        })
    }
}

/// Per-sensor aggregates of `table` (already quoted as the store needs), in
/// the column order `SensorSummary::from_row` reads.
fn per_sensor_sql(table: &str) -> String {
    format!(
        "SELECT sensor_id, COUNT(*), MIN(temperature), AVG(temperature), MAX(temperature),
                MIN(humidity), AVG(humidity), MAX(humidity)
         FROM {table} GROUP BY sensor_id ORDER BY sensor_id"
    )
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MinAvgMax {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
}

/// Puts `readings` in the order of the stores' `(sensor_id, ingested_at)`
/// index. A batch written in that order finds each index page it touches
/// once and fills it in one pass instead of revisiting pages at random.
pub fn sort_for_index(readings: &mut [Reading]) {
    readings.sort_unstable_by(index_order);
}

/// `sort_for_index` on two threads, for when a second core is free (the
/// final flush, once the receiver has stopped): partitioning around the
/// middle element leaves two halves that sort independently and are then in
/// order as they stand, so no merge and no second buffer. A million
/// readings: about 0.04 s instead of 0.07.
pub fn sort_for_index_on_two_threads(readings: &mut [Reading]) {
    // Below this, a thread costs more than it saves.
    const MIN_SPLIT: usize = 65_536;
    if readings.len() < MIN_SPLIT {
        return sort_for_index(readings);
    }
    let mid = readings.len() / 2;
    readings.select_nth_unstable_by(mid, index_order);
    let (low, high) = readings.split_at_mut(mid);
    // The scope joins the helper before returning.
    let helped = std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name("sorter".into())
            .spawn_scoped(scope, || sort_for_index(low));
        sort_for_index(high);
        helper.is_ok()
    });
    if !helped {
        // No thread to be had: that half is sorted here too.
        sort_for_index(&mut readings[..mid]);
    }
}

/// `sort_for_index` for readings whose first `sorted` already are in index
/// order: sorts the rest and merges it in, a pass over the readings instead
/// of a sort of all of them. A million readings of which 125,000 are new:
/// about 15 ms instead of 90.
pub fn sort_for_index_after(readings: &mut [Reading], sorted: usize) {
    let sorted = sorted.min(readings.len());
    sort_for_index(&mut readings[sorted..]);
    merge_sorted_runs(readings, sorted);
}

/// Merges `readings[..mid]` and `readings[mid..]`, each already in index
/// order, into one run in index order, stably. The second run is copied
/// aside (it is the shorter one in every use) and the merge fills from the
/// back, so readings of the first run that sort before all of the second
/// stay where they are. Nothing in the loop can panic, so the readings are
/// never left half merged.
pub fn merge_sorted_runs(readings: &mut [Reading], mid: usize) {
    if mid == 0 || mid >= readings.len() || index_order(&readings[mid - 1], &readings[mid]).is_le()
    {
        return;
    }
    let second = readings[mid..].to_vec();
    // Invariant: k == i + j, the next slot to fill from the back.
    let (mut i, mut j) = (mid, second.len());
    while j > 0 {
        let k = i + j - 1;
        if i > 0 && index_order(&readings[i - 1], &second[j - 1]).is_gt() {
            readings[k] = readings[i - 1];
            i -= 1;
        } else {
            readings[k] = second[j - 1];
            j -= 1;
        }
    }
}

fn index_order(a: &Reading, b: &Reading) -> std::cmp::Ordering {
    a.sensor_id
        .cmp(&b.sensor_id)
        .then(a.ingested_at.total_cmp(&b.ingested_at))
}

/// Opens the store `db` names, creating its schema if missing.
pub fn open(db: &str, options: &Options) -> Result<Box<dyn Store>, Error> {
    if is_url(db) {
        return Ok(Box::new(postgres::PostgresStore::open(db, options)?));
    }
    sqlite_table(&options.table)?;
    Ok(Box::new(sqlite::SqliteStore::open(db, options)?))
}

/// Opens the store `db` names for reading only; it must exist.
pub fn open_existing(db: &str, table: &str) -> Result<Box<dyn Store>, Error> {
    if is_url(db) {
        return Ok(Box::new(postgres::PostgresStore::open_existing(db, table)?));
    }
    sqlite_table(table)?;
    Ok(Box::new(sqlite::SqliteStore::open_existing(db)?))
}

/// A SQLite file holds one fleet, always in the default table.
fn sqlite_table(table: &str) -> Result<(), Error> {
    if table == DEFAULT_TABLE {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "--table applies to PostgreSQL only; a SQLite file always uses {DEFAULT_TABLE}"
        )))
    }
}

/// Checks a `--table` value: letters, digits and underscores, not starting
/// with a digit, at most 50 characters (so the index name derived from it
/// fits PostgreSQL's 63).
pub fn table_name(name: &str) -> Result<String, String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 50;
    if valid {
        Ok(name.to_string())
    } else {
        Err("must be 1 to 50 letters, digits or underscores, not starting with a digit".into())
    }
}

/// Store settings from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a write waits for a lock held by another writer; for
    /// PostgreSQL, how long a connection attempt may take.
    pub busy_timeout: std::time::Duration,
    /// The measurements table (PostgreSQL; SQLite takes only the default).
    pub table: String,
}

/// True if `db` names a PostgreSQL server rather than a SQLite file.
pub fn is_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings from 991 sensors in arrival order, with distinct times, so
    /// index order is one exact order.
    fn arrivals(n: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| Reading {
                sensor_id: ((i * 7919) % 991) as i64,
                temperature: (i % 97) as f64,
                humidity: (i % 89) as f64,
                ingested_at: 1_764_150_000.0 + i as f64 / 1000.0,
                received_at: 1_764_150_000.0,
            })
            .collect()
    }

    #[test]
    fn sorting_on_two_threads_gives_index_order() {
        for n in [0, 1, 1000, 200_001] {
            let mut expected = arrivals(n);
            sort_for_index(&mut expected);
            let mut readings = arrivals(n);
            sort_for_index_on_two_threads(&mut readings);
            assert!(
                readings.is_sorted_by(|a, b| index_order(a, b).is_le()),
                "n = {n}"
            );
            assert_eq!(readings, expected, "n = {n}");
        }
    }

    proptest::proptest! {
        /// Whatever the split, and however many readings share a key, the
        /// result is in index order and holds exactly the readings given.
        #[test]
        fn sorting_after_a_sorted_prefix_gives_index_order(
            keys in proptest::collection::vec((0i64..20, 0u8..8), 0..400),
            split in 0.0f64..=1.0,
        ) {
            let readings: Vec<Reading> = keys
                .iter()
                .enumerate()
                .map(|(i, &(sensor_id, t))| Reading {
                    sensor_id,
                    temperature: i as f64,
                    humidity: 0.0,
                    ingested_at: f64::from(t),
                    received_at: 0.0,
                })
                .collect();
            let sorted = (readings.len() as f64 * split) as usize;
            let mut merged = readings.clone();
            sort_for_index(&mut merged[..sorted]);
            sort_for_index_after(&mut merged, sorted);
            proptest::prop_assert!(merged.is_sorted_by(|a, b| index_order(a, b).is_le()));
            // Each reading is tagged by its position: none lost or doubled.
            let mut tags: Vec<usize> = merged.iter().map(|r| r.temperature as usize).collect();
            tags.sort_unstable();
            proptest::prop_assert_eq!(tags, (0..readings.len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn sorting_after_a_sorted_prefix_of_a_million() {
        let mut readings = arrivals(1_000_000);
        let mut expected = readings.clone();
        sort_for_index(&mut expected);
        sort_for_index(&mut readings[..875_000]);
        sort_for_index_after(&mut readings, 875_000);
        assert_eq!(readings, expected);
    }
}
