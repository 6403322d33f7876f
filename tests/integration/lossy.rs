//! Issue 17's proofs through a network that loses, duplicates and reorders
//! on purpose (`relay`): `send --reliable` gets every reading stored
//! exactly once; without it, the loss sensord reports is exactly what the
//! relay dropped; a killed server loses nothing of a reliable client's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::delivery::identities;
use crate::relay::{Faults, Relay};
use crate::util::*;

const LOSSY: Faults = Faults {
    drop: 0.2,
    duplicate: 0.05,
    max_delay: Duration::from_millis(50),
};

type Id = (i64, i64, i64);

/// Every reading object in `payloads` (objects or arrays), by identity,
/// with its values' bits; fails if two copies of one identity differ.
fn readings_in(payloads: &[Vec<u8>]) -> BTreeMap<Id, [u64; 3]> {
    let mut out = BTreeMap::new();
    for payload in payloads {
        let value: Value = serde_json::from_slice(payload).unwrap();
        let objects = match value {
            Value::Array(items) => items,
            object => vec![object],
        };
        for r in objects {
            let id = (
                r["sensor_id"].as_i64().unwrap(),
                r["boot"].as_i64().unwrap(),
                r["seq"].as_i64().unwrap(),
            );
            let bits = ["temperature", "humidity", "ingested_at"]
                .map(|k| r[k].as_f64().unwrap().to_bits());
            if let Some(before) = out.insert(id, bits) {
                assert_eq!(before, bits, "{id:?} was retransmitted with other values");
            }
        }
    }
    out
}

/// Every stored row's identity and value bits.
fn stored(db: &std::path::Path) -> Vec<(Id, [u64; 3])> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.prepare(
        "SELECT sensor_id, boot, seq, temperature, humidity, ingested_at FROM sensor_measurements",
    )
    .unwrap()
    .query_map([], |r| {
        Ok((
            (r.get(0)?, r.get(1)?, r.get(2)?),
            [r.get::<_, f64>(3)?, r.get(4)?, r.get(5)?].map(f64::to_bits),
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Per sensor, `lost` and `duplicates` from `stats --json`.
fn loss_by_sensor(scratch: &Scratch) -> HashMap<i64, (u64, u64)> {
    stats_json(&scratch.db)["per_sensor"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["sensor_id"].as_i64().unwrap(),
                (
                    s["lost"].as_u64().unwrap(),
                    s["duplicates"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// `send --reliable --count 20000` through 20% loss each way, 5%
/// duplicates and 50 ms of reordering: exit 0, each reading stored once
/// with the values it was sent with, no loss left, duplicates counted.
#[test]
fn reliable_send_through_a_lossy_network_stores_each_reading_once() {
    const COUNT: usize = 20_000;
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let relay = Relay::start(server.addr, 7, LOSSY, LOSSY);
    let out = run(
        &[
            "send",
            "--to",
            &relay.addr().to_string(),
            "--reliable",
            "--interval",
            "0",
            "--count",
            &COUNT.to_string(),
            "--sensor-ids",
            "1-4",
            "--seed",
            "3",
        ],
        scratch.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("sent {COUNT} readings, acked {COUNT},")),
        "{stderr}"
    );
    relay.settle(EXIT);
    let stats = relay.stats();
    let counts = server.stop_clean();
    let rows = stored(&scratch.db);
    assert_eq!(rows.len(), COUNT);
    let ids: BTreeSet<Id> = rows.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), COUNT, "a reading is stored twice");
    let sent = readings_in(&relay.delivered_upstream());
    for (id, bits) in &rows {
        assert_eq!(sent.get(id), Some(bits), "{id:?} is not what was sent");
    }
    for (sensor, (lost, _)) in loss_by_sensor(&scratch) {
        assert_eq!(lost, 0, "sensor {sensor}");
    }
    assert!(counts["duplicates"] > 0);
    eprintln!(
        "lossy reliable: sent {COUNT}; relay up {:?}, down {:?}; stored {}; duplicates {}; {}",
        stats.up,
        stats.down,
        rows.len(),
        counts["duplicates"],
        stderr.lines().last().unwrap_or_default()
    );
}

/// Without --reliable, each sensor's `lost` is exactly the readings the
/// relay dropped between its first and last delivered one (sensord cannot
/// know of a loss before the first or after the last), and `duplicates`
/// exactly the copies the relay made.
#[test]
fn reported_loss_is_what_the_relay_dropped() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let relay = Relay::start(server.addr, 11, LOSSY, Faults::NONE);
    let out = run(
        &[
            "send",
            "--to",
            &relay.addr().to_string(),
            "--interval",
            "200us",
            "--count",
            "5000",
            "--sensor-ids",
            "1-3",
            "--seed",
            "5",
        ],
        scratch.path(),
    );
    assert!(out.status.success(), "{out:?}");
    relay.settle(EXIT);
    let stats = relay.stats();
    let counts = server.stop_clean();
    assert_eq!(
        counts["kernel_drops"], 0,
        "the premise: only the relay loses"
    );
    let delivered = readings_in(&relay.delivered_upstream());
    let lost = readings_in(&relay.lost_upstream());
    assert_eq!(delivered.len() + lost.len(), 5000);
    let mut expected: HashMap<i64, u64> = HashMap::new();
    for (sensor, _, seq) in lost.keys() {
        let of_sensor = delivered.keys().filter(|(s, _, _)| s == sensor);
        let (first, last) = (
            of_sensor.clone().map(|k| k.2).min(),
            of_sensor.map(|k| k.2).max(),
        );
        if first.is_some_and(|f| f < *seq) && last.is_some_and(|l| *seq < l) {
            *expected.entry(*sensor).or_default() += 1;
        }
    }
    let reported = loss_by_sensor(&scratch);
    for sensor in 1..=3 {
        assert_eq!(
            reported[&sensor].0,
            expected.get(&sensor).copied().unwrap_or(0),
            "sensor {sensor}"
        );
    }
    let duplicates: u64 = reported.values().map(|(_, d)| d).sum();
    assert_eq!(duplicates, stats.up.duplicated);
    assert_eq!(counts["duplicates"], stats.up.duplicated);
    assert_eq!(identities(&scratch.db).len(), delivered.len());
    eprintln!(
        "lossy unreliable: sent 5000; relay {:?}; stored {}; lost per sensor {reported:?}",
        stats.up,
        delivered.len()
    );
}

/// The server is SIGKILLed and started again on the same port while a
/// reliable client keeps sending: every reading ends up stored once.
#[test]
fn a_killed_server_loses_nothing_of_a_reliable_client() {
    const COUNT: u64 = 20_000;
    let scratch = Scratch::new();
    let args = ["--db", scratch.db_arg(), "--stats-interval", "50ms"];
    let mut server = Server::start(scratch.path(), &args);
    let bind = server.addr.to_string();
    let mut client = Command::new(bin())
        .args(["send", "--to", &bind, "--reliable", "--interval", "100us"])
        .args(["--count", &COUNT.to_string(), "--sensor-ids", "1-2"])
        .current_dir(scratch.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    server.wait_for_count("persisted", 2000, EXIT);
    server.stop_with(libc::SIGKILL, EXIT);
    let mut server = Server::start_bound(scratch.path(), &bind, &args, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(client.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    server.stop_clean();
    let ids = identities(&scratch.db);
    let distinct: BTreeSet<Id> = ids.iter().copied().collect();
    assert_eq!((ids.len() as u64, distinct.len() as u64), (COUNT, COUNT));
    eprintln!(
        "killed server: {}",
        stderr.lines().last().unwrap_or_default()
    );
}
