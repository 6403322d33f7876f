//! Issue 16, real sensors: datagrams as real devices send them, each with
//! the exact rows it must give. The corpus is shared with the PostgreSQL
//! tests (postgres.rs), which check the same rows there.

use std::path::Path;

use rusqlite::Connection;
use serde_json::{Value, json};

use crate::util::*;

/// One row a datagram must give. Times are the decimal text of the exact
/// instant: the stored f64 is the one nearest it.
#[derive(Clone, Debug)]
pub struct Want {
    /// The id as the sensor sent it (an integer's decimal form, or a name).
    pub sensor: &'static str,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub ingested_at: &'static str,
    pub extra: Option<Value>,
}

impl Want {
    pub fn ingested_at(&self) -> f64 {
        self.ingested_at.parse().unwrap()
    }

    /// The microseconds PostgreSQL stores: `ingested_at` rounded to the
    /// nearest microsecond, as the store does.
    pub fn micros(&self) -> i64 {
        let t = self.ingested_at();
        let whole = t.trunc();
        whole as i64 * 1_000_000 + ((t - whole) * 1e6).round() as i64
    }
}

/// Datagrams for one `--timestamp-unit`, the rows they must give, and how
/// many readings in them are rejected (each with a counted reason).
pub struct Run {
    pub unit: &'static str,
    pub datagrams: Vec<String>,
    pub rows: Vec<Want>,
    pub rejected: u64,
}

fn want(
    sensor: &'static str,
    temperature: Option<f64>,
    humidity: Option<f64>,
    ingested_at: &'static str,
    extra: Option<Value>,
) -> Want {
    Want {
        sensor,
        temperature,
        humidity,
        ingested_at,
        extra,
    }
}

/// The corpus, one run per timestamp unit. Every row has its own
/// `ingested_at`, so rows read back in time order line up with `rows`.
pub fn corpus() -> Vec<Run> {
    let seconds = Run {
        unit: "s",
        datagrams: vec![
            // A DS18B20 probe: temperature only.
            r#"{"sensor_id": 2, "temperature": 21.123456789012345, "ingested_at": 1764150001.25}"#.into(),
            // A hygrometer: humidity only.
            r#"{"sensor_id": 3, "humidity": 45.1, "ingested_at": 1764150002}"#.into(),
            // A BME280 with pressure.
            r#"{"sensor_id": "bme280-attic", "temperature": 19.87, "humidity": 55.2, "pressure": 1013.25, "ingested_at": 1764150003.5}"#.into(),
            // Battery and signal strength beside the measurement.
            r#"{"sensor_id": 4, "temperature": 20.1, "battery_v": 3.71, "rssi": -67, "ingested_at": 1764150004}"#.into(),
            // A MAC address, and a non-ASCII name.
            r#"{"sensor_id": "a4:cf:12:9b:00:01", "temperature": 22.25, "ingested_at": 1764150005}"#.into(),
            r#"{"sensor_id": "capteur-séjour-温度", "humidity": 40, "ingested_at": 1764150006}"#.into(),
            // "42" is sensor 42.
            r#"{"sensor_id": "42", "temperature": 1.5, "ingested_at": 1764150007}"#.into(),
            // RFC 3339 with offsets.
            r#"{"sensor_id": "esp32-kitchen", "temperature": 21.0, "ingested_at": "2026-11-30T05:00:00.123456+01:00"}"#.into(),
            r#"{"sensor_id": "esp32-kitchen", "temperature": 21.5, "ingested_at": "2026-11-29T22:30:01.5-05:30"}"#.into(),
            // NDJSON, with and without a trailing newline, a blank line.
            "{\"sensor_id\": 10, \"temperature\": 0.1, \"ingested_at\": 1764150010}\n\
             \n{\"sensor_id\": 11, \"humidity\": 5e-324, \"ingested_at\": 1764150011}\n"
                .into(),
            "{\"sensor_id\": 12, \"temperature\": -0.5, \"ingested_at\": 1764150012}\n\
             {\"sensor_id\": \"ndjson\", \"co2\": 415, \"ingested_at\": 1764150013}"
                .into(),
            // An array mixing every kind, with one bad element.
            r#"[{"sensor_id": 20, "temperature": 20.5, "humidity": 30.5, "ingested_at": 1764150020},
                {"sensor_id": "mixed-bme", "temperature": 1, "pressure": 990.5, "fw": "1.2.3", "ok": true, "ingested_at": "2026-11-30T04:00:21Z"},
                {"sensor_id": 21, "humidity": 2.5, "ingested_at": 1764150022},
                {"sensor_id": 22, "temperature": 3, "gps": {"lat": 48.1}},
                {"sensor_id": "aa:bb:cc:dd:ee:ff", "rssi": -80, "battery_v": 2.9, "ingested_at": 1764150023}]"#
                .into(),
            // Rejected, each with its reason: no measurement, a bad name.
            r#"{"sensor_id": 30, "firmware": "2.0"}"#.into(),
            r#"{"sensor_id": "", "temperature": 1}"#.into(),
        ],
        rows: vec![
            want("2", Some(21.123456789012345), None, "1764150001.25", None),
            want("3", None, Some(45.1), "1764150002", None),
            want("bme280-attic", Some(19.87), Some(55.2), "1764150003.5", Some(json!({"pressure": 1013.25}))),
            want("4", Some(20.1), None, "1764150004", Some(json!({"battery_v": 3.71, "rssi": -67}))),
            want("a4:cf:12:9b:00:01", Some(22.25), None, "1764150005", None),
            want("capteur-séjour-温度", None, Some(40.0), "1764150006", None),
            want("42", Some(1.5), None, "1764150007", None),
            want("10", Some(0.1), None, "1764150010", None),
            want("11", None, Some(5e-324), "1764150011", None),
            want("12", Some(-0.5), None, "1764150012", None),
            want("ndjson", None, None, "1764150013", Some(json!({"co2": 415}))),
            want("20", Some(20.5), Some(30.5), "1764150020", None),
            want("21", None, Some(2.5), "1764150022", None),
            want("aa:bb:cc:dd:ee:ff", None, None, "1764150023", Some(json!({"battery_v": 2.9, "rssi": -80}))),
            want("esp32-kitchen", Some(21.0), None, "1796011200.123456", None),
            want("esp32-kitchen", Some(21.5), None, "1796011201.5", None),
            want("mixed-bme", Some(1.0), None, "1796011221", Some(json!({"fw": "1.2.3", "ok": true, "pressure": 990.5}))),
        ],
        rejected: 3,
    };
    let ms = Run {
        unit: "ms",
        datagrams: vec![
            r#"{"sensor_id": "js-node", "temperature": 20, "ingested_at": 1764150100123}"#.into(),
            // A string is RFC 3339 whatever the unit.
            r#"{"sensor_id": "js-node", "temperature": 21, "ingested_at": "2026-11-30T04:00:00.250Z"}"#.into(),
        ],
        rows: vec![
            want("js-node", Some(20.0), None, "1764150100.123", None),
            want("js-node", Some(21.0), None, "1796011200.25", None),
        ],
        rejected: 0,
    };
    let us = Run {
        unit: "us",
        datagrams: vec![
            r#"{"sensor_id": 7, "humidity": 1, "ingested_at": 1764150200123456}"#.into(),
        ],
        rows: vec![want("7", None, Some(1.0), "1764150200.123456", None)],
        rejected: 0,
    };
    let ns = Run {
        unit: "ns",
        datagrams: vec![
            r#"{"sensor_id": 8, "temperature": 3, "ingested_at": 1764150300123456789}"#.into(),
            // Before 1970 in any unit: out of range.
            r#"{"sensor_id": 8, "temperature": 3, "ingested_at": -1}"#.into(),
        ],
        rows: vec![want("8", Some(3.0), None, "1764150300.123456789", None)],
        rejected: 1,
    };
    vec![seconds, ms, us, ns]
}

/// A stored row, read back with the name (or integer) the sensor sent.
#[derive(Debug)]
pub struct Got {
    pub sensor: String,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub extra: Option<String>,
}

/// Checks stored rows (in time order) against `rows`, values to the bit.
pub fn check_rows(got: &[Got], rows: &[Want], unit: &str) {
    let mut want: Vec<&Want> = rows.iter().collect();
    want.sort_by(|a, b| a.ingested_at().total_cmp(&b.ingested_at()));
    assert_eq!(got.len(), want.len(), "unit {unit}: {got:#?}");
    for (got, want) in got.iter().zip(want) {
        assert_eq!(got.sensor, want.sensor, "{want:?}");
        assert_eq!(
            got.temperature.map(f64::to_bits),
            want.temperature.map(f64::to_bits),
            "{want:?}"
        );
        assert_eq!(
            got.humidity.map(f64::to_bits),
            want.humidity.map(f64::to_bits),
            "{want:?}"
        );
        let extra: Option<Value> = got
            .extra
            .as_deref()
            .map(|text| serde_json::from_str(text).unwrap());
        assert_eq!(extra, want.extra, "{want:?}");
        if let Some(Value::Object(fields)) = &extra {
            let Some(Value::Object(wanted)) = &want.extra else {
                unreachable!("compared equal above")
            };
            for (key, value) in fields {
                if let (Some(a), Some(b)) = (value.as_f64(), wanted[key].as_f64()) {
                    assert_eq!(a.to_bits(), b.to_bits(), "{key} of {want:?}");
                }
            }
        }
    }
}

/// Every row of a SQLite file in time order, with its `ingested_at`.
fn sqlite_rows(db: &Path) -> Vec<(Got, f64)> {
    let conn = Connection::open(db).unwrap();
    let mut statement = conn
        .prepare(
            "SELECT COALESCE(n.name, CAST(m.sensor_id AS TEXT)), m.temperature, m.humidity,
                    m.ingested_at, m.extra
             FROM sensor_measurements m LEFT JOIN sensor_names n ON n.key = m.sensor_id
             ORDER BY m.ingested_at",
        )
        .unwrap();
    statement
        .query_map([], |r| {
            Ok((
                Got {
                    sensor: r.get(0)?,
                    temperature: r.get(1)?,
                    humidity: r.get(2)?,
                    extra: r.get(4)?,
                },
                r.get(3)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn query_text(db: &Path, sql: &str) -> String {
    let conn = Connection::open(db).unwrap();
    conn.query_row(sql, [], |r| r.get::<_, String>(0)).unwrap()
}

/// Every datagram of the corpus, under its unit, gives exactly its rows in
/// SQLite, bit for bit; every reading not stored is counted as rejected.
#[test]
fn sqlite_stores_what_real_sensors_send() {
    for run in corpus() {
        let scratch = Scratch::new();
        let mut server = Server::start(
            scratch.path(),
            &["--db", scratch.db_arg(), "--timestamp-unit", run.unit],
        );
        send_datagrams(server.addr, &run.datagrams);
        let counts = server.stop_clean();
        assert_eq!(
            counts["received"],
            run.datagrams.len() as u64,
            "{}",
            run.unit
        );
        assert_eq!(counts["accepted"], run.rows.len() as u64, "{}", run.unit);
        assert_eq!(counts["rejected"], run.rejected, "{}", run.unit);
        assert_eq!(counts["persisted"], run.rows.len() as u64, "{}", run.unit);
        let stored = sqlite_rows(&scratch.db);
        let mut want = run.rows.clone();
        want.sort_by(|a, b| a.ingested_at().total_cmp(&b.ingested_at()));
        for ((_, at), want) in stored.iter().zip(&want) {
            assert_eq!(at.to_bits(), want.ingested_at().to_bits(), "{want:?}");
        }
        let got: Vec<Got> = stored.into_iter().map(|(got, _)| got).collect();
        check_rows(&got, &run.rows, run.unit);
    }
}

/// The README's queries work: a named sensor through `sensor_names`, an
/// extra field with `->>`, and `stats` shows ids as sent with what each
/// sensor measures.
#[test]
fn sqlite_named_sensors_and_extras_are_queryable() {
    let scratch = Scratch::new();
    let seconds = corpus().remove(0);
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    send_datagrams(server.addr, &seconds.datagrams);
    server.stop_clean();
    assert_eq!(
        query_text(
            &scratch.db,
            "SELECT group_concat(temperature) FROM sensor_measurements
             WHERE sensor_id = (SELECT key FROM sensor_names WHERE name = 'esp32-kitchen')"
        ),
        "21.0,21.5"
    );
    assert_eq!(
        query_text(
            &scratch.db,
            "SELECT group_concat(extra ->> 'pressure') FROM sensor_measurements
             WHERE extra ->> 'pressure' IS NOT NULL ORDER BY ingested_at"
        ),
        "1013.25,990.5"
    );
    // The name lookup uses the index on (sensor_id, ingested_at).
    let conn = Connection::open(&scratch.db).unwrap();
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT * FROM sensor_measurements
             WHERE sensor_id = (SELECT key FROM sensor_names WHERE name = 'x')
               AND ingested_at >= 0",
        )
        .unwrap()
        .query_map([], |r| r.get(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let plan = plan.join(" | ");
    assert!(
        plan.contains("USING INDEX sensor_measurements_sensor_time"),
        "{plan}"
    );
    let out = run(
        &["stats", "--db", scratch.db_arg(), "--json"],
        Path::new("/"),
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sensor = |id: Value| {
        stats["per_sensor"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["sensor_id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {stats}"))
            .clone()
    };
    assert_eq!(
        sensor(json!("bme280-attic"))["measurements"],
        json!(["temperature", "humidity", "pressure"])
    );
    assert_eq!(
        sensor(json!(4))["measurements"],
        json!(["temperature", "battery_v", "rssi"])
    );
    assert_eq!(sensor(json!(42))["readings"], 1);
    assert_eq!(sensor(json!("esp32-kitchen"))["readings"], 2);
    let out = run(
        &[
            "stats",
            "--db",
            scratch.db_arg(),
            "--sensor",
            "capteur-séjour-温度",
        ],
        Path::new("/"),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("readings: 1\n"), "{text}");
    assert!(text.contains("capteur-séjour-温度"), "{text}");
}

/// `--extra-fields drop` stores no extras, and a reading whose only
/// measurement was an extra field is then rejected with its reason.
#[test]
fn extra_fields_can_be_dropped() {
    let scratch = Scratch::new();
    let mut server = Server::start(
        scratch.path(),
        &["--db", scratch.db_arg(), "--extra-fields", "drop"],
    );
    send_datagrams(
        server.addr,
        [
            r#"{"sensor_id": 1, "temperature": 2, "pressure": 1000}"#,
            r#"{"sensor_id": 2, "co2": 415}"#,
        ],
    );
    let counts = server.stop_clean();
    assert_eq!((counts["accepted"], counts["rejected"]), (1, 1));
    assert!(server.log_text().contains("no measurement"));
    assert_eq!(
        query_text(
            &scratch.db,
            "SELECT COUNT(*) || ' ' || COUNT(extra) FROM sensor_measurements"
        ),
        "1 0"
    );
}

/// A file of schema version 2, as the previous release made it, with rows
/// and an index of its owner's, is upgraded in place at start: every row
/// intact to the bit, the measurements nullable, `extra` and
/// `sensor_names` added, both indexes there; then it takes named sensors.
#[test]
fn sqlite_version_2_file_is_upgraded_in_place() {
    let scratch = Scratch::new();
    let conn = Connection::open(&scratch.db).unwrap();
    conn.execute_batch(
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
             spill_key TEXT PRIMARY KEY, readings INTEGER NOT NULL, imported_at REAL NOT NULL
         );
         CREATE TABLE sensord_batches (
             run INTEGER NOT NULL, seq INTEGER NOT NULL, committed_at REAL NOT NULL,
             PRIMARY KEY (run, seq)
         ) WITHOUT ROWID;
         ALTER TABLE sensor_measurements ADD COLUMN site TEXT DEFAULT 'barn';
         CREATE INDEX mine ON sensor_measurements (received_at);
         INSERT INTO sensor_measurements VALUES (1, 21.123456789012345, 0.1, 1764150000.5, 1764150000.75, 'attic');
         INSERT INTO sensor_measurements (sensor_id, temperature, humidity, ingested_at, received_at)
             VALUES (2, 0.5, 5e-324, 1764150001.25, 1764150001.5);
         PRAGMA user_version = 2;",
    )
    .unwrap();
    drop(conn);
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    send_datagrams(
        server.addr,
        [r#"{"sensor_id": "new-probe", "temperature": 3.5, "ingested_at": 1764150002}"#],
    );
    server.stop_clean();
    let conn = Connection::open(&scratch.db).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
    type Bits = (i64, u64, u64, u64, u64, Option<String>);
    let old: Vec<Bits> = conn
        .prepare(
            "SELECT sensor_id, temperature, humidity, ingested_at, received_at, site
             FROM sensor_measurements WHERE sensor_id > 0 ORDER BY ingested_at",
        )
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, f64>(1)?.to_bits(),
                r.get::<_, f64>(2)?.to_bits(),
                r.get::<_, f64>(3)?.to_bits(),
                r.get::<_, f64>(4)?.to_bits(),
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        old,
        [
            (
                1,
                21.123456789012345f64.to_bits(),
                0.1f64.to_bits(),
                1764150000.5f64.to_bits(),
                1764150000.75f64.to_bits(),
                Some("attic".to_string())
            ),
            (
                2,
                0.5f64.to_bits(),
                5e-324f64.to_bits(),
                1764150001.25f64.to_bits(),
                1764150001.5f64.to_bits(),
                Some("barn".to_string())
            ),
        ]
    );
    let stored: Vec<(Got, f64)> = sqlite_rows(&scratch.db);
    assert_eq!(stored[2].0.sensor, "new-probe");
    assert_eq!(stored[2].0.humidity, None);
    let indexes: String = conn
        .query_row(
            "SELECT group_concat(name) FROM (SELECT name FROM sqlite_schema
             WHERE type = 'index' AND tbl_name = 'sensor_measurements' ORDER BY name)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, "mine,sensor_measurements_sensor_time");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// A version 2 file holding a sensor id in the range now kept for names
/// is not upgraded: start-up stops and says why, and the file is as it was.
#[test]
fn sqlite_upgrade_refuses_ids_in_the_name_range() {
    let scratch = Scratch::new();
    let conn = Connection::open(&scratch.db).unwrap();
    conn.execute_batch(
        "CREATE TABLE sensor_measurements (
             sensor_id INTEGER NOT NULL, temperature REAL NOT NULL, humidity REAL NOT NULL,
             ingested_at REAL NOT NULL, received_at REAL NOT NULL
         );
         INSERT INTO sensor_measurements VALUES (-9223372036854775808, 1, 2, 3, 4);
         PRAGMA user_version = 2;",
    )
    .unwrap();
    drop(conn);
    let out = run(
        &["serve", "--db", scratch.db_arg(), "--bind", "127.0.0.1:0"],
        scratch.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 rows have a sensor_id below -9223372032559808512"),
        "{stderr}"
    );
    let conn = Connection::open(&scratch.db).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
}
