//! The core daemon: what is sent is stored, exactly, and stopping flushes.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::Duration;

use crate::util::*;

/// Sends precise readings, stops the server with `sig`, and checks every
/// value landed bit for bit.
fn sent_readings_are_stored_exactly(sig: i32) {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let sent = precise_readings(2000);
    send_datagrams(server.addr, sent.iter().map(|s| s.text.as_bytes()));
    let status = server.stop_with(sig, EXIT);
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        server.log_text()
    );
    let counts = server.shutdown_counts();
    assert_eq!(counts["received"], 2000);
    assert_eq!(counts["accepted"], 2000);
    assert_eq!(counts["persisted"], 2000);
    let wal = std::path::PathBuf::from(format!("{}-wal", scratch.db_arg()));
    assert!(
        !wal.exists(),
        "a clean stop leaves one self-contained file, no {}",
        wal.display()
    );

    let mut stored = rows(&scratch.db);
    assert_eq!(stored.len(), sent.len());
    // Rows may be reordered within a batch; match them by ingested_at.
    stored.sort_by(|a, b| a.ingested_at.total_cmp(&b.ingested_at));
    for (row, want) in stored.iter().zip(&sent) {
        assert_eq!(row.sensor_id, want.sensor_id);
        let bits = |t: f64, h: f64, i: f64| (t.to_bits(), h.to_bits(), i.to_bits());
        assert_eq!(
            bits(row.temperature, row.humidity, row.ingested_at),
            bits(want.temperature, want.humidity, want.ingested_at),
            "{}",
            want.text
        );
        assert!(
            row.received_at > 1.7e9,
            "received_at is the receive time: {row:?}"
        );
    }
}

/// A stop leaves one self-contained file in WAL mode: the last close
/// copies the WAL back and removes it, and the next start needs no switch.
#[test]
fn stop_leaves_one_self_contained_file() {
    let scratch = Scratch::new();
    let mut server = start_holding(scratch.path(), scratch.db_arg());
    let datagram = |i| format!(r#"{{"sensor_id": {i}, "temperature": 1.5, "humidity": 2.5}}"#);
    send_datagrams(server.addr, (0..3000).map(datagram));
    server.wait_for_accepted(3000, EXIT);
    assert_eq!(server.stop_clean()["flushed_at_shutdown"], 3000);
    let wal = scratch.path().join("sensors.db-wal");
    assert!(!wal.exists(), "the WAL is copied back and removed at exit");
    assert_eq!(journal_mode(&scratch.db), "wal");
    assert_eq!(row_count(&scratch.db), 3000);
}

/// N readings sent are N rows after SIGINT, bit-exact.
#[test]
fn sigint_stores_every_reading_exactly() {
    sent_readings_are_stored_exactly(libc::SIGINT);
}

/// N readings sent are N rows after SIGTERM, bit-exact.
#[test]
fn sigterm_stores_every_reading_exactly() {
    sent_readings_are_stored_exactly(libc::SIGTERM);
}

/// With a huge batch and flush interval nothing commits while running; the
/// shutdown guard flushes all of it in one final transaction.
#[test]
fn guard_flushes_everything_queued() {
    let scratch = Scratch::new();
    let mut server = start_holding(scratch.path(), scratch.db_arg());
    send_readings(
        server.addr,
        &["--interval", "0", "--count", "5000", "--seed", "7"],
        scratch.path(),
    );
    server.wait_for_accepted(5000, Duration::from_secs(20));
    assert_eq!(
        row_count(&scratch.db),
        0,
        "nothing is committed before the signal"
    );
    let counts = server.stop_clean();
    assert_eq!(counts["flushed_at_shutdown"], 5000);
    assert_eq!(counts["persisted"], 5000);
    assert_eq!(row_count(&scratch.db), 5000);
}

/// One datagram per rejection reason, each between good ones: exactly the
/// good ones are stored, each bad one is counted, and serving goes on.
#[test]
fn bad_datagrams_are_counted_and_good_ones_stored() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let good = |id: i64| format!(r#"{{"sensor_id": {id}, "temperature": 20.5, "humidity": 5}}"#);
    let bad: Vec<Vec<u8>> = vec![
        b"\xff\xfe not utf-8".to_vec(),
        b"{not json".to_vec(),
        b"42".to_vec(),
        br#"{"temperature": 1, "humidity": 2}"#.to_vec(),
        br#"{"sensor_id": 1.5, "temperature": 1, "humidity": 2}"#.to_vec(),
        br#"{"sensor_id": "esp32-kitchen", "firmware": "1.2"}"#.to_vec(),
        br#"{"sensor_id": "", "temperature": 1}"#.to_vec(),
        br#"{"sensor_id": 1, "temperature": 1, "gps": {"lat": 48.1}}"#.to_vec(),
        br#"{"sensor_id": 1, "temperature": 1, "humidity": 2, "ingested_at": -5}"#.to_vec(),
        br#"{"sensor_id": 99999999999999999999, "temperature": 1, "humidity": 2}"#.to_vec(),
        Vec::new(),
        vec![b'['; 60_000],
    ];
    let mut datagrams = Vec::new();
    for (i, b) in bad.iter().enumerate() {
        datagrams.push(good(i as i64).into_bytes());
        datagrams.push(b.clone());
    }
    datagrams.push(good(1000).into_bytes());
    send_datagrams(server.addr, &datagrams);
    let status = server.stop_with(libc::SIGINT, EXIT);
    assert!(status.success(), "log:\n{}", server.log_text());
    let counts = server.shutdown_counts();
    assert_eq!(counts["received"], datagrams.len() as u64);
    assert_eq!(counts["rejected"], bad.len() as u64);
    assert_eq!(counts["accepted"], bad.len() as u64 + 1);
    let mut ids: Vec<i64> = rows(&scratch.db).iter().map(|r| r.sensor_id).collect();
    ids.sort();
    let mut want: Vec<i64> = (0..bad.len() as i64).collect();
    want.push(1000);
    assert_eq!(ids, want);
    let log = server.log_text();
    for reason in [
        "not UTF-8",
        "not JSON",
        "not a JSON object",
        "missing field `sensor_id`",
        "wrong type for `sensor_id`",
        "`ingested_at` out of range",
        "no measurement",
        "bad `sensor_id` name",
        "an extra field holds an object or an array",
    ] {
        assert!(log.contains(reason), "no WARN for {reason}; log:\n{log}");
    }
}

/// A flood of one bad kind is logged at most about once per second.
#[test]
fn rejection_warnings_are_rate_limited() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    send_datagrams(server.addr, (0..5000).map(|_| b"garbage".as_slice()));
    assert_eq!(server.stop_clean()["rejected"], 5000);
    let warnings = server
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("not JSON"))
        .count();
    assert!(
        (1..=10).contains(&warnings),
        "{warnings} warning lines for one flood"
    );
}

/// The valid elements of an array are stored; each invalid one is rejected.
#[test]
fn arrays_store_their_valid_elements() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let datagram = r#"  [{"sensor_id": 1, "temperature": 1.5, "humidity": 2, "ingested_at": 100},
        {"sensor_id": 2, "temperature": 2.5, "humidity": 3},
        "nope",
        {"sensor_id": 3, "temperature": true, "humidity": 3},
        {"sensor_id": 4, "temperature": 4.5, "humidity": 5, "firmware": "1.2"}]
    "#;
    send_datagrams(server.addr, [datagram]);
    let counts = server.stop_clean();
    assert_eq!(
        (counts["received"], counts["accepted"], counts["rejected"]),
        (1, 3, 2)
    );
    let stored = rows(&scratch.db);
    let mut ids: Vec<i64> = stored.iter().map(|r| r.sensor_id).collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 4]);
    let first = stored.iter().find(|r| r.sensor_id == 1).unwrap();
    assert_eq!(first.ingested_at, 100.0);
    let second = stored.iter().find(|r| r.sensor_id == 2).unwrap();
    assert_eq!(
        second.ingested_at, second.received_at,
        "missing ingested_at is the receive time"
    );
}

/// `stats --json` agrees with what was sent, and the table shows the totals.
#[test]
fn stats_agree_with_the_rows() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let sent = precise_readings(500);
    send_datagrams(server.addr, sent.iter().map(|s| s.text.as_bytes()));
    assert!(server.stop_with(libc::SIGTERM, EXIT).success());

    let mut want: BTreeMap<i64, Vec<&Sent>> = BTreeMap::new();
    for s in &sent {
        want.entry(s.sensor_id).or_default().push(s);
    }
    let out = run(
        &["stats", "--db", scratch.db_arg(), "--json"],
        scratch.path(),
    );
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["readings"], 500);
    assert_eq!(json["sensors"], want.len());
    let per_sensor = json["per_sensor"].as_array().unwrap();
    assert_eq!(per_sensor.len(), want.len());
    for (entry, (id, readings)) in per_sensor.iter().zip(&want) {
        assert_eq!(entry["sensor_id"], *id);
        assert_eq!(entry["readings"], readings.len());
        let min = readings
            .iter()
            .map(|s| s.temperature)
            .fold(f64::INFINITY, f64::min);
        let max = readings
            .iter()
            .map(|s| s.humidity)
            .fold(f64::NEG_INFINITY, f64::max);
        let avg = readings.iter().map(|s| s.temperature).sum::<f64>() / readings.len() as f64;
        assert_eq!(entry["temperature"]["min"].as_f64().unwrap(), min);
        assert_eq!(entry["humidity"]["max"].as_f64().unwrap(), max);
        assert!((entry["temperature"]["avg"].as_f64().unwrap() - avg).abs() < 1e-9);
    }

    let out = run(&["stats", "--db", scratch.db_arg()], scratch.path());
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("readings: 500"), "{table}");
    assert!(
        table.contains(&format!("sensors:  {}", want.len())),
        "{table}"
    );
}

/// A port already in use: exit 1 and one clear line, no panic.
#[test]
fn bind_error_is_one_line_and_exit_1() {
    let scratch = Scratch::new();
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        &["serve", "--bind", &addr, "--db", scratch.db_arg()],
        scratch.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "error: cannot bind {addr}: Address already in use"
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

/// A database that cannot be opened: exit 1 and one clear line, no panic.
#[test]
fn database_error_is_one_line_and_exit_1() {
    let scratch = Scratch::new();
    let out = run(
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--db",
            "/nonexistent-dir/x.db",
        ],
        scratch.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "error: cannot open database /nonexistent-dir/x.db: folder /nonexistent-dir does not exist"
        ),
        "{stderr}"
    );
    let out = run(&["stats", "--db", "/nonexistent-dir/x.db"], scratch.path());
    assert_eq!(out.status.code(), Some(1));
}

/// Bad flags are usage errors: exit 2, clap's message.
#[test]
fn usage_errors_exit_2() {
    let scratch = Scratch::new();
    for args in [
        &["serve", "--batch-size", "0"][..],
        &["serve", "--flush-interval", "soon"],
        &["send", "--sensor-ids", "9-1"],
        &["serve", "--allow", "10.0.0.0/99"],
        &["frobnicate"],
    ] {
        let out = run(args, scratch.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

/// The client sends exactly --count readings within the --sensor-ids range.
#[test]
fn client_sends_count_readings_in_range() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let out = send_readings(
        server.addr,
        &["--interval", "1ms", "--count", "300", "--sensor-ids", "5-7"],
        scratch.path(),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("sent 300 readings"));
    assert!(server.stop_with(libc::SIGINT, EXIT).success());
    let stored = rows(&scratch.db);
    assert_eq!(stored.len(), 300);
    for row in stored {
        assert!((5..=7).contains(&row.sensor_id));
        assert!((1.0..35.0).contains(&row.temperature));
        assert!((1.0..12.0).contains(&row.humidity));
        assert!(row.ingested_at <= row.received_at);
    }
}

/// `stats --limit`, `--sensor` and `--since` select what a fleet owner asks
/// first: the busiest sensors, one sensor, the last stretch of time; JSON
/// puts the totals before the per-sensor array, with `last_seen`.
#[test]
fn stats_filters_and_limits() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // Sensor i sends i readings; sensor 9's are two days old.
    let datagrams: Vec<String> = (1..=9)
        .flat_map(|id| {
            let at = if id == 9 { now - 2.0 * 86_400.0 } else { now - 60.0 };
            (0..id).map(move |k| {
                format!(
                    r#"{{"sensor_id": {id}, "temperature": {k}, "humidity": 1, "ingested_at": {at}}}"#
                )
            })
        })
        .collect();
    send_datagrams(server.addr, &datagrams);
    server.stop_clean();
    let db = scratch.db_arg();
    let stats = |args: &[&str]| {
        let out = run(&[&["stats", "--db", db][..], args].concat(), scratch.path());
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };

    let table = stats(&["--limit", "3"]);
    assert!(table.contains("the 3 busiest of 9 sensors:"), "{table}");
    let shown: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.contains("sensor  readings"))
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(shown, ["9", "8", "7"], "{table}");
    assert!(table.contains("1m ago"), "{table}");

    let one = stats(&["--sensor", "4", "--json"]);
    assert!(
        one.find("\"readings\"").unwrap() < one.find("\"per_sensor\"").unwrap(),
        "totals first: {one}"
    );
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["readings"], 4);
    assert_eq!(one["per_sensor"][0]["sensor_id"], 4);
    assert!((one["per_sensor"][0]["last_seen"].as_f64().unwrap() - (now - 60.0)).abs() < 1e-3);

    let recent: serde_json::Value =
        serde_json::from_str(&stats(&["--since", "1h", "--json"])).unwrap();
    assert_eq!(recent["readings"], 36, "sensors 1-8, not the old sensor 9");
    assert_eq!(recent["sensors"], 8);
}
