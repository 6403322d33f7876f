//! Where readings end up. The small `Store` trait is all the persister and
//! `stats` know; `open` picks the implementation once, from `--db`.
//!
//! Stores know SQL, never channels or sockets.

use std::collections::HashMap;

use crate::delivery::{StreamKey, StreamRecord, StreamUpdate};
use crate::error::Error;
use crate::reading::{NAME_KEYS, Reading, Sensor, SensorId};

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

/// A reading the database refused for good (a constraint it breaks, a
/// value its column cannot hold), with the database's reason. Retrying
/// cannot help, so it is set aside in the dead-letter file and the rest of
/// its batch commits.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub reading: Reading,
    pub cause: String,
}

/// What an import of a spill file did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imported {
    /// Readings committed.
    pub stored: u64,
    /// Readings skipped because their batch had committed before.
    pub skipped: u64,
    /// Readings the database refused for good.
    pub refused: Vec<Refusal>,
}

/// One batch of a spill file: the readings, and the id they were last
/// attempted under, if any. A batch whose commit outcome was unknown (an
/// unanswered COMMIT, an abandoned final flush) is imported only if that
/// id never committed.
#[derive(Clone, Debug, PartialEq)]
pub struct SpillBatch {
    pub id: Option<BatchId>,
    pub readings: Vec<Reading>,
}

/// A database that stores readings.
///
/// Errors are of two kinds (see docs/design.md): *permanent* ones, which a
/// retry of the same rows cannot fix (a constraint violation, a data type
/// error), and *transient* ones (a lock, a lost connection, a full disk).
/// A store handles permanent ones itself: it finds the refused readings by
/// bisection under savepoints in the same transaction, commits the others,
/// and returns the refused. Only transient errors reach the caller, which
/// retries.
pub trait Store: Send {
    /// Commits `readings` in one transaction under `id`, except those the
    /// database refuses for good, which are returned. Idempotent by `id`:
    /// if a batch with this id already committed (an attempt whose COMMIT
    /// went unanswered), writes nothing and returns no refusals. Callers
    /// hand readings over in index order (`sort_for_index`): in any other
    /// order they are stored all the same, but SQLite takes about a third
    /// longer. `streams` is the delivery state of the sequenced readings'
    /// streams after them (`delivery`), committed with them.
    fn write_batch(
        &mut self,
        id: BatchId,
        readings: &[Reading],
        streams: &[StreamUpdate],
    ) -> Result<Vec<Refusal>, Error>;

    /// Commits the batches of a spill file in one transaction, recording
    /// `key` with them; a batch whose id already committed is skipped, and
    /// the ids of the others are recorded as committed. Returns None,
    /// writing nothing, if `key` was already imported (replay is idempotent
    /// across a crash before the file's removal); else the refused
    /// readings, as for `write_batch`, with how many were stored and
    /// skipped.
    /// `streams` is committed with them, as for `write_batch`.
    fn import_spill(
        &mut self,
        key: &str,
        batches: &[SpillBatch],
        streams: &[StreamUpdate],
    ) -> Result<Option<Imported>, Error>;

    /// The committed delivery state of each of `keys` (a sensor's boot)
    /// that sent sequenced readings (table `sensord_sequences`); keys
    /// without one are left out.
    fn load_streams(&mut self, keys: &[StreamKey])
    -> Result<Vec<(StreamKey, StreamRecord)>, Error>;

    /// A handle that makes the current or next operation fail promptly.
    fn interrupter(&self) -> Interrupter;

    /// Totals and per-sensor aggregates of the readings `filter` selects,
    /// for `sensord stats`.
    fn summary(&mut self, filter: &Filter) -> Result<Summary, Error>;

    /// Deletes readings whose `ingested_at` is before `before` (unix
    /// seconds), in one short transaction: sensor by sensor in id order,
    /// from sensor `from` on, until `limit` readings are deleted or `limit`
    /// sensors looked at. Each sensor's old readings are found through the
    /// `(sensor_id, ingested_at)` index, so a step costs about `limit`
    /// index look-ups however large the table, and ingest waits for the
    /// write lock no longer than that.
    fn expire(&mut self, before: f64, from: i64, limit: usize) -> Result<Expired, Error>;

    /// True once the store found that the database it writes was deleted
    /// or replaced under it while running (and recovered by reopening):
    /// such a run must not report a clean stop.
    fn replaced(&self) -> bool {
        false
    }

    // The dashboard's reads (`http::api`), on a connection of their own.
    // Each is bounded by the `(sensor_id, ingested_at)` index: a seek per
    // sensor, or one sensor's range of times.

    /// Every sensor with readings, in key order, with its latest reading,
    /// how many readings it took from `recent.from` on, and a sparkline.
    fn sensor_list(&mut self, recent: &Recent) -> Result<Vec<SensorRow>, Error>;

    /// The key stored in `sensor_id` for `id`, if that sensor has readings.
    fn sensor_key(&mut self, id: &SensorId) -> Result<Option<i64>, Error>;

    /// The first and last `ingested_at` of sensor `key`, if it has readings.
    fn sensor_span(&mut self, key: i64) -> Result<Option<(f64, f64)>, Error>;

    /// Hands sensor `key`'s readings taken in `window` (`from..=to`, unix
    /// seconds) to `sink`, in time order.
    fn sensor_readings(
        &mut self,
        key: i64,
        window: (f64, f64),
        sink: &mut dyn FnMut(RawReading<'_>),
    ) -> Result<(), Error>;
}

/// The stretch of time `Store::sensor_list` counts readings and draws
/// sparklines over: `samples` slots of `step` seconds from `from` on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recent {
    pub from: f64,
    pub step: f64,
    pub samples: usize,
}

/// One sensor of `Store::sensor_list`.
#[derive(Clone, Debug, PartialEq)]
pub struct SensorRow {
    /// As the sensor sent it: its integer, or its name.
    pub id: SensorId,
    /// The latest `ingested_at`, unix seconds.
    pub last_seen: f64,
    /// The latest reading's measurements (None where it had none).
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    /// Readings taken from `Recent::from` on.
    pub recent: u64,
    /// Per slot of `Recent`, the latest reading's temperature and humidity
    /// in it; None for a slot without a reading or without that value.
    pub spark_temperature: Vec<Option<f64>>,
    pub spark_humidity: Vec<Option<f64>>,
    /// Readings lost (by sequence numbers) per reading expected; None for
    /// a sensor that sends no sequence numbers.
    pub loss_ratio: Option<f64>,
}

/// One stored reading, as `Store::sensor_readings` hands it over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawReading<'a> {
    /// `ingested_at`, unix seconds.
    pub at: f64,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    /// The `extra` column's JSON text, if any.
    pub extra: Option<&'a str>,
}

/// What one `Store::expire` step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Readings deleted.
    pub deleted: u64,
    /// The sensor id the next step starts from; None once the step went
    /// past the last sensor, which ends a pass over the table.
    pub resume: Option<i64>,
}

/// What `sensord stats` reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Readings the filter selects.
    pub readings: u64,
    /// Earliest and latest `ingested_at`, if there are readings.
    pub span: Option<(f64, f64)>,
    /// One entry per sensor, in ascending `sensor_id` order.
    pub per_sensor: Vec<SensorSummary>,
}

/// Which readings `Store::summary` covers: all, or one sensor's, or those
/// taken since a time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub sensor_id: Option<SensorId>,
    /// Unix seconds: readings whose `ingested_at` is at or after it.
    pub since: Option<f64>,
}

impl Filter {
    /// The SQL condition, `TRUE AND ...`, with the values written in (a
    /// name quoted as a string literal). `time` turns unix seconds into
    /// what the store compares `ingested_at` with. A name is looked up
    /// once, so the `(sensor_id, ingested_at)` index serves it; without a
    /// `sensor_names` table (`has_names` false) no row has a name.
    fn sql(&self, time: impl Fn(f64) -> String, has_names: bool) -> String {
        let mut condition = String::from("TRUE");
        match &self.sensor_id {
            Some(SensorId::Int(id)) => condition += &format!(" AND sensor_id = {id}"),
            Some(SensorId::Name(_)) if !has_names => condition += " AND FALSE",
            Some(SensorId::Name(name)) => {
                condition += &format!(
                    " AND sensor_id = (SELECT key FROM sensor_names WHERE name = '{}')",
                    name.replace('\'', "''")
                );
            }
            None => {}
        }
        if let Some(since) = self.since.filter(|s| s.is_finite()) {
            condition += &format!(" AND ingested_at >= {}", time(since));
        }
        condition
    }
}

/// Aggregates for one sensor.
#[derive(Clone, Debug, PartialEq)]
pub struct SensorSummary {
    /// As the sensor sent it: its integer, or its name.
    pub sensor_id: SensorId,
    pub readings: u64,
    pub temperature: MinAvgMax,
    pub humidity: MinAvgMax,
    /// The latest `ingested_at`, unix seconds; NaN if none is a number.
    pub last_seen: f64,
    /// What the sensor measures: `temperature` and `humidity` if any of
    /// its readings has one, then its numeric extra fields, by name.
    pub measurements: Vec<String>,
    /// Loss accounting over all its boots, if it sends sequence numbers.
    pub delivery: Option<DeliverySummary>,
}

/// A sensor's delivery counters, summed over its boots (`delivery`): what
/// RTCP receiver reports call cumulative loss, and more. Over the whole
/// history, whatever the filter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliverySummary {
    /// Readings its sequence numbers say it sent: per boot, lowest to
    /// highest received.
    pub expected: u64,
    /// Distinct readings received.
    pub received: u64,
    /// Readings received again and not stored.
    pub duplicates: u64,
    /// Readings that arrived below the highest seen.
    pub reordered: u64,
    /// Readings too old for the duplicate window, not stored.
    pub late: u64,
    /// Boots seen.
    pub boots: u64,
    /// When sensord first and last heard from it, unix seconds.
    pub first_seen: f64,
    pub last_seen: f64,
}

impl DeliverySummary {
    /// Expected and never received: gaps no retransmission filled.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    /// `lost` over `expected`.
    pub fn loss_ratio(&self) -> f64 {
        self.lost() as f64 / self.expected.max(1) as f64
    }
}

/// The per-sensor sums of the rows of `sensord_sequences` that
/// `condition` selects, in the column order `delivery_from_row` reads, for
/// `attach_delivery`.
fn delivery_sql(condition: &str) -> String {
    format!(
        "SELECT sensor_id, CAST(SUM(highest - base + 1) AS BIGINT), CAST(SUM(received) AS BIGINT),
            CAST(SUM(duplicates) AS BIGINT), CAST(SUM(reordered) AS BIGINT),
            CAST(SUM(late) AS BIGINT), COUNT(*), MIN(first_seen), MAX(last_seen)
         FROM sensord_sequences WHERE {condition} GROUP BY sensor_id"
    )
}

/// Reads one row of `DELIVERY_SQL` through a driver's getters.
fn delivery_from_row<E>(
    int: impl Fn(usize) -> Result<i64, E>,
    real: impl Fn(usize) -> Result<f64, E>,
) -> Result<(i64, DeliverySummary), E> {
    Ok((
        int(0)?,
        DeliverySummary {
            expected: int(1)? as u64,
            received: int(2)? as u64,
            duplicates: int(3)? as u64,
            reordered: int(4)? as u64,
            late: int(5)? as u64,
            boots: int(6)? as u64,
            first_seen: real(7)?,
            last_seen: real(8)?,
        },
    ))
}

/// Gives each sensor of `per_sensor` (whose keys are `keys`) its row of
/// `DELIVERY_SQL`, if it has one.
fn attach_delivery(
    per_sensor: &mut [SensorSummary],
    keys: &[i64],
    rows: Vec<(i64, DeliverySummary)>,
) {
    let mut rows: HashMap<i64, DeliverySummary> = rows.into_iter().collect();
    for (sensor, key) in per_sensor.iter_mut().zip(keys) {
        sensor.delivery = rows.remove(key);
    }
}

/// The columns of `sensord_sequences` a store writes and reads, in order.
const SEQUENCE_COLUMNS: &str = "sensor_id, boot, base, highest, received, duplicates, \
     reordered, late, first_seen, last_seen, missing";

/// A row of `SEQUENCE_COLUMNS` after the key, read through a driver's
/// getters (from column 0); the inner error says what is corrupt.
fn stream_from_row<E>(
    int: impl Fn(usize) -> Result<i64, E>,
    real: impl Fn(usize) -> Result<f64, E>,
    text: impl Fn(usize) -> Result<String, E>,
) -> Result<Result<StreamRecord, String>, E> {
    let missing = text(8)?;
    let Some(missing) = StreamRecord::parse_missing(&missing) else {
        return Ok(Err(format!(
            "sensord_sequences.missing is not a list of ranges: {missing}"
        )));
    };
    Ok(Ok(StreamRecord {
        base: int(0)? as u64,
        highest: int(1)? as u64,
        received: int(2)? as u64,
        duplicates: int(3)? as u64,
        reordered: int(4)? as u64,
        late: int(5)? as u64,
        first_seen: real(6)?,
        last_seen: real(7)?,
        missing,
    }))
}

impl SensorSummary {
    /// Reads one row of `per_sensor_sql` through a driver's getters.
    fn from_row<E>(
        int: impl Fn(usize) -> Result<i64, E>,
        real: impl Fn(usize) -> Result<f64, E>,
        text: impl Fn(usize) -> Result<Option<String>, E>,
    ) -> Result<Self, E> {
        let stats = |first: usize| -> Result<MinAvgMax, E> {
            Ok(MinAvgMax {
                min: real(first)?,
                avg: real(first + 1)?,
                max: real(first + 2)?,
            })
        };
        let mut measurements = Vec::new();
        for (name, column) in [("temperature", 10), ("humidity", 11)] {
            if int(column)? > 0 {
                measurements.push(name.to_string());
            }
        }
        Ok(SensorSummary {
            sensor_id: match text(9)? {
                Some(name) => SensorId::Name(name.into()),
                None => SensorId::Int(int(0)?),
            },
            readings: int(1)? as u64,
            temperature: stats(2)?,
            humidity: stats(5)?,
            last_seen: real(8)?,
            measurements,
            delivery: None,
        })
    }
}

/// Adds each sensor's numeric extra fields, from `(key, field)` rows in
/// any order, to the measurements of the sensor whose key it is.
fn add_extra_measurements(
    per_sensor: &mut [SensorSummary],
    keys: &[i64],
    rows: Vec<(i64, String)>,
) {
    let mut fields: HashMap<i64, Vec<String>> = HashMap::new();
    for (key, field) in rows {
        fields.entry(key).or_default().push(field);
    }
    for (sensor, key) in per_sensor.iter_mut().zip(keys) {
        if let Some(mut extra) = fields.remove(key) {
            extra.sort();
            extra.dedup();
            sensor.measurements.extend(extra);
        }
    }
}

/// Per-sensor aggregates of `table` (already quoted as the store needs),
/// of the rows `condition` selects, in the column order
/// `SensorSummary::from_row` reads; `last_seen` is the SQL for the latest
/// `ingested_at` as unix seconds, `temperature` and `humidity` the SQL for
/// a value to aggregate. Without a `sensor_names` table (`has_names`
/// false) every sensor is its integer.
fn per_sensor_sql(
    table: &str,
    condition: &str,
    last_seen: &str,
    (t, h): (&str, &str),
    has_names: bool,
) -> String {
    let name = if has_names {
        "(SELECT name FROM sensor_names WHERE key = sensor_id)"
    } else {
        "NULL"
    };
    format!(
        "SELECT sensor_id, COUNT(*), MIN({t}), AVG({t}), MAX({t}),
                MIN({h}), AVG({h}), MAX({h}), {last_seen}, {name},
                COUNT({t}), COUNT({h})
         FROM {table} WHERE {condition} GROUP BY sensor_id ORDER BY sensor_id"
    )
}

/// Keys of sensor names, as this store has seen them committed, and the
/// ones added by the transaction in progress. A name's key never changes
/// once committed, so the cache stays true for as long as the database
/// does (a SQLite file replaced under the store clears it).
#[derive(Debug, Default)]
pub(crate) struct NameKeys {
    keys: HashMap<Box<str>, i64>,
    /// Added in the open transaction: forgotten if it does not commit.
    pending: Vec<Box<str>>,
}

impl NameKeys {
    /// The names among `readings` and `streams` without a known key, each
    /// once.
    fn unknown<'a>(&self, readings: &'a [Reading], streams: &'a [StreamUpdate]) -> Vec<&'a str> {
        let mut unknown: Vec<&str> = Vec::new();
        let sensors = readings
            .iter()
            .map(Reading::sensor)
            .chain(streams.iter().map(|s| s.key.sensor.as_sensor()));
        for sensor in sensors {
            if let Sensor::Name(name) = sensor
                && !self.keys.contains_key(name)
                && !unknown.contains(&name)
            {
                unknown.push(name);
            }
        }
        unknown
    }

    /// Records `name`'s key, found or made in the open transaction.
    fn learn(&mut self, name: &str, key: i64) {
        self.keys.insert(name.into(), key);
        self.pending.push(name.into());
    }

    /// The open transaction committed: its keys are for good.
    fn committed(&mut self) {
        self.pending.clear();
    }

    /// The open transaction failed: its new keys may not exist.
    fn rolled_back(&mut self) {
        for name in self.pending.drain(..) {
            self.keys.remove(&name);
        }
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.pending.clear();
    }

    /// The integer stored in `sensor_id` for `id`.
    fn key(&self, sensor: Sensor<'_>) -> i64 {
        match sensor {
            Sensor::Int(id) => id,
            // Every write resolves its names first, in its transaction.
            Sensor::Name(name) => self.keys[name],
        }
    }
}

/// Checks that a newly allocated name key is in the reserved range.
fn check_name_key(key: i64) -> Result<i64, String> {
    if NAME_KEYS.contains(&key) {
        Ok(key)
    } else {
        Err(format!(
            "no sensor name key left (sensord keeps {} for names)",
            NAME_KEYS.end.abs_diff(NAME_KEYS.start)
        ))
    }
}

/// The smallest, mean and largest value of a measurement; NaN where the
/// store had no number to aggregate (JSON shows it as null).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
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

fn index_order(a: &Reading, b: &Reading) -> std::cmp::Ordering {
    match (a.sensor(), b.sensor()) {
        // The common case without `Sensor::cmp`'s variant check.
        (Sensor::Int(x), Sensor::Int(y)) => x.cmp(&y),
        (x, y) => x.cmp(&y),
    }
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

/// Fails, naming it, if the folder a SQLite file `db` would be created in
/// does not exist (SQLite only says "unable to open database file").
pub fn check_folder(db: &str) -> Result<(), Error> {
    if is_url(db) {
        return Ok(());
    }
    let folder = match std::path::Path::new(db).parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    if folder.is_dir() {
        Ok(())
    } else {
        Err(Error::Open {
            db: db.to_string(),
            cause: format!("folder {} does not exist", folder.display()),
        })
    }
}

/// Opens the store `db` names for reading only; it must exist.
pub fn open_existing(db: &str, options: &Options) -> Result<Box<dyn Store>, Error> {
    if is_url(db) {
        return Ok(Box::new(postgres::PostgresStore::open_existing(
            db, options,
        )?));
    }
    if std::path::Path::new(db).is_dir() {
        return Err(Error::Open {
            db: db.to_string(),
            cause: "is a folder, not a database file".into(),
        });
    }
    sqlite_table(&options.table)?;
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
    /// PostgreSQL also how long a connection attempt (the whole handshake)
    /// and a statement may take.
    pub busy_timeout: std::time::Duration,
    /// The measurements table (PostgreSQL; SQLite takes only the default).
    pub table: String,
    /// Stop requests during start-up: a connect or schema creation waiting
    /// on the database gives up when one comes.
    pub stop: Option<crate::shutdown::Shutdown>,
    /// PostgreSQL: a file holding the password, used when neither the URL
    /// nor `PGPASSWORD` gives one.
    pub password_file: Option<std::path::PathBuf>,
}

/// Decodes `%XX` escapes (a `+` stays a `+`); None if one is malformed or
/// the result is not UTF-8. For `--db` URLs and the dashboard's query
/// strings.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// True if `db` names a PostgreSQL server rather than a SQLite file.
pub fn is_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::ReadingParts;

    /// Readings from 991 sensors in arrival order, with distinct times, so
    /// index order is one exact order.
    fn arrivals(n: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| {
                Reading::from(ReadingParts {
                    sensor_id: SensorId::Int(((i * 7919) % 991) as i64),
                    temperature: Some((i % 97) as f64),
                    humidity: Some((i % 89) as f64),
                    ingested_at: 1_764_150_000.0 + i as f64 / 1000.0,
                    received_at: 1_764_150_000.0,
                    extra: None,
                    seq: None,
                    boot: None,
                })
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
}
