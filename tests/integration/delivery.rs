//! Sequence numbers: exactly once across duplicates, kills, spills and
//! reboots; acknowledgements and their bounds. The lossy-network proofs
//! are in `lossy`.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::faults::WriteLock;
use crate::util::*;

/// A sequenced reading whose values follow from its identity.
pub fn reading(sensor: i64, boot: u64, seq: u64) -> String {
    format!(
        r#"{{"sensor_id":{sensor},"boot":{boot},"seq":{seq},"temperature":{},"ingested_at":{}}}"#,
        seq as f64 / 8.0,
        1_764_150_000 + seq
    )
}

/// `(sensor_id, boot, seq)` of every stored row, sorted.
pub fn identities(db: &Path) -> Vec<(i64, i64, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut ids: Vec<(i64, i64, i64)> = conn
        .prepare("SELECT sensor_id, boot, seq FROM sensor_measurements WHERE seq IS NOT NULL")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    ids.sort();
    ids
}

/// Every stored identity once: no duplicates.
fn assert_exactly(db: &Path, expected: &[(i64, i64, i64)]) {
    let ids = identities(db);
    let mut distinct = ids.clone();
    distinct.dedup();
    assert_eq!(ids.len(), distinct.len(), "a reading is stored twice");
    assert_eq!(ids, expected);
}

fn range(sensor: i64, boot: i64, seqs: std::ops::Range<i64>) -> Vec<(i64, i64, i64)> {
    seqs.map(|s| (sensor, boot, s)).collect()
}

/// One sensor's line of `stats --json`.
fn sensor_stats(db: &Path, sensor: i64) -> Value {
    let doc = stats_json(db);
    doc["per_sensor"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sensor_id"] == sensor)
        .unwrap_or_else(|| panic!("sensor {sensor} in {doc}"))
        .clone()
}

/// Waits up to `timeout` for one datagram on `socket`.
fn recv_ack(socket: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    socket.set_read_timeout(Some(timeout)).unwrap();
    let mut buffer = [0u8; 65_536];
    match socket.recv(&mut buffer) {
        Ok(n) => Some(buffer[..n].to_vec()),
        Err(_) => None,
    }
}

/// The `(sensor_id, boot, seq)` an ack acknowledges.
pub fn acked(ack: &[u8]) -> Vec<(i64, i64, i64)> {
    let value: Value = serde_json::from_slice(ack).expect("an ack is JSON");
    let mut ids = Vec::new();
    for entry in value["ack"].as_array().expect("an ack array") {
        let (sensor, boot) = (
            entry["sensor_id"].as_i64().unwrap(),
            entry["boot"].as_i64().unwrap(),
        );
        for pair in entry["seq"].as_array().unwrap() {
            let (lo, hi) = (pair[0].as_i64().unwrap(), pair[1].as_i64().unwrap());
            assert!(lo <= hi, "range {pair}");
            ids.extend((lo..=hi).map(|s| (sensor, boot, s)));
        }
    }
    ids
}

/// A datagram sent again is stored once and counted as a duplicate, in
/// the shutdown line and in the sensor's stream state; the ledger closes.
#[test]
fn duplicates_are_stored_once_and_counted() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let once: Vec<String> = (0..100).map(|s| reading(1, 7, s)).collect();
    send_datagrams(server.addr, &once);
    send_datagrams(server.addr, &once);
    send_datagrams(server.addr, [format!("[{}]", once[10..21].join(","))]);
    let counts = server.stop_clean();
    assert_eq!(counts["accepted"], 211);
    assert_eq!(counts["persisted"], 100);
    assert_eq!(counts["duplicates"], 111);
    assert_eq!(counts["late"], 0);
    assert_exactly(&scratch.db, &range(1, 7, 0..100));
    let stats = sensor_stats(&scratch.db, 1);
    assert_eq!(stats["duplicates"], 111);
    assert_eq!(stats["lost"], 0);
    assert_eq!(stats["delivery"]["received"], 100);
}

/// SIGKILL loses nothing committed, and after a restart the readings the
/// sensor sends again are recognised from the committed window.
#[test]
fn exactly_once_across_a_kill() {
    let scratch = Scratch::new();
    let args = ["--db", scratch.db_arg(), "--stats-interval", "50ms"];
    let mut server = Server::start(scratch.path(), &args);
    send_datagrams(server.addr, (0..1000).map(|s| reading(5, 9, s)));
    server.wait_for_count("persisted", 1000, EXIT);
    server.stop_with(libc::SIGKILL, EXIT);
    let mut server = Server::start(scratch.path(), &args);
    send_datagrams(server.addr, (0..2000).map(|s| reading(5, 9, s)));
    let counts = server.stop_clean();
    assert_eq!((counts["persisted"], counts["duplicates"]), (1000, 1000));
    assert_exactly(&scratch.db, &range(5, 9, 0..2000));
}

/// Readings spilled at a stop, and duplicates among them, are imported
/// once at the next start; the sensor's retransmissions of them are then
/// duplicates.
#[test]
fn spill_and_replay_keep_exactly_once() {
    let scratch = Scratch::new();
    let args = [
        &["--db", scratch.db_arg(), "--busy-timeout", "200ms"][..],
        &HOLD_UNTIL_STOP,
    ]
    .concat();
    let mut server = Server::start(scratch.path(), &args);
    send_datagrams(server.addr, (0..500).map(|s| reading(3, 1, s)));
    send_datagrams(server.addr, (0..100).map(|s| reading(3, 1, s)));
    server.wait_for_accepted(600, EXIT);
    let lock = WriteLock::take(&scratch.db);
    let status = server.stop_with(libc::SIGTERM, EXIT);
    drop(lock);
    assert_eq!(status.code(), Some(1));
    let counts = server.shutdown_counts();
    assert_eq!((counts["spilled"], counts["duplicates"]), (500, 100));
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    server.wait_for_line("replayed 500 readings", EXIT);
    send_datagrams(server.addr, (0..600).map(|s| reading(3, 1, s)));
    let counts = server.stop_clean();
    assert_eq!((counts["persisted"], counts["duplicates"]), (100, 500));
    assert_exactly(&scratch.db, &range(3, 1, 0..600));
}

/// A sensor reboots (a new boot) while late readings of its old boot still
/// arrive: they are stored once, and neither boot shows loss.
#[test]
fn a_reboot_with_late_readings_of_the_old_boot() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    send_datagrams(server.addr, (0..90).map(|s| reading(4, 1, s)));
    send_datagrams(server.addr, (0..50).map(|s| reading(4, 2, s)));
    send_datagrams(server.addr, (90..100).map(|s| reading(4, 1, s)));
    send_datagrams(server.addr, (85..95).map(|s| reading(4, 1, s)));
    let counts = server.stop_clean();
    assert_eq!((counts["persisted"], counts["duplicates"]), (150, 10));
    let mut expected = range(4, 1, 0..100);
    expected.extend(range(4, 2, 0..50));
    assert_exactly(&scratch.db, &expected);
    let stats = sensor_stats(&scratch.db, 4);
    assert_eq!(stats["lost"], 0);
    assert_eq!(stats["duplicates"], 10);
    assert_eq!(stats["delivery"]["boots"], 2);
    assert_eq!(stats["delivery"]["expected"], 150);
}

/// A gap is lost until a retransmission fills it; a reading older than
/// the window is not stored but counted as late.
#[test]
fn gaps_count_as_lost_until_filled_and_late_readings_are_counted() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    send_datagrams(
        server.addr,
        (0..100).filter(|s| s % 10 != 3).map(|s| reading(8, 0, s)),
    );
    let counts = server.stop_clean();
    assert_eq!(counts["persisted"], 90);
    assert_eq!(sensor_stats(&scratch.db, 8)["lost"], 10);
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    send_datagrams(server.addr, [reading(8, 0, 13), reading(8, 0, 30_000)]);
    send_datagrams(server.addr, [reading(8, 0, 43)]);
    let counts = server.stop_clean();
    assert_eq!((counts["persisted"], counts["late"]), (2, 1));
    let stats = sensor_stats(&scratch.db, 8);
    // 0..=30000 expected; 92 received.
    assert_eq!(stats["lost"], 30_001 - 92);
    assert_eq!(stats["delivery"]["late"], 1);
    assert!(!identities(&scratch.db).contains(&(8, 0, 43)));
}

/// Bad sequence fields are rejected with a reason and never acknowledged;
/// the good reading of the same datagram is.
#[test]
fn bad_sequence_fields_are_rejected_and_not_acked() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let datagram = format!(
        r#"[{}, {{"sensor_id":1,"boot":3,"temperature":1}}, {{"sensor_id":1,"seq":-1,"temperature":1}},
            {{"sensor_id":1,"seq":2.5,"temperature":1}}, {{"sensor_id":1,"seq":9223372036854775808,"temperature":1}}]"#,
        reading(1, 0, 1)
    );
    socket.send_to(datagram.as_bytes(), server.addr).unwrap();
    let ack = recv_ack(&socket, EXIT).expect("an ack");
    assert_eq!(acked(&ack), [(1, 0, 1)]);
    let counts = server.stop_clean();
    assert_eq!((counts["accepted"], counts["rejected"]), (1, 4));
    let log = server.log_text();
    assert!(log.contains("`boot` without `seq`"), "{log}");
    assert!(log.contains("`seq` out of range"), "{log}");
    assert!(log.contains("wrong type for `seq`"), "{log}");
}

/// The ack comes only after the readings it confirms are in the database,
/// and never takes a source more bytes than it sent: one tiny datagram's
/// ack waits for the retransmission whose bytes pay for it.
#[test]
fn acks_follow_the_commit_and_never_outgrow_what_they_answer() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tiny = r#"{"sensor_id":1,"seq":5,"humidity":1}"#;
    socket.send_to(tiny.as_bytes(), server.addr).unwrap();
    assert_eq!(
        recv_ack(&socket, Duration::from_secs(1)),
        None,
        "ack larger than its datagram"
    );
    assert_eq!(identities(&scratch.db), [(1, 0, 5)]);
    socket.send_to(tiny.as_bytes(), server.addr).unwrap();
    let ack = recv_ack(&socket, EXIT).expect("an ack once paid for");
    assert!(ack.len() <= 2 * tiny.len(), "{} bytes", ack.len());
    assert_eq!(acked(&ack), [(1, 0, 5)]);

    // Many readings: acks in ranges, each after its rows are committed,
    // their bytes never more than what was sent before them.
    let mut sent_bytes = 0;
    let mut ack_bytes = 0;
    let mut confirmed = Vec::new();
    for seq in 0..300 {
        let datagram = reading(2, 11, seq);
        sent_bytes += datagram.len();
        socket.send_to(datagram.as_bytes(), server.addr).unwrap();
    }
    let deadline = Instant::now() + EXIT;
    while confirmed.len() < 300 && Instant::now() < deadline {
        let Some(ack) = recv_ack(&socket, Duration::from_secs(1)) else {
            continue;
        };
        ack_bytes += ack.len();
        assert!(ack_bytes <= sent_bytes, "{ack_bytes} > {sent_bytes}");
        let ids = acked(&ack);
        let stored = identities(&scratch.db);
        for id in &ids {
            assert!(stored.contains(id), "{id:?} acked before it was stored");
        }
        confirmed.extend(ids);
    }
    confirmed.sort();
    assert_eq!(confirmed, range(2, 11, 0..300));
    server.stop_clean();
}

/// Sources outside --allow get no ack, and --acks off sends none.
#[test]
fn no_acks_outside_allow_or_when_off() {
    let scratch = Scratch::new();
    for (args, stored) in [(["--allow", "10.0.0.0/8"], 0), (["--acks", "off"], 1)] {
        let db = scratch.path().join(format!("{stored}.db"));
        let mut server = Server::start(
            scratch.path(),
            &[&["--db", db.to_str().unwrap()][..], &args].concat(),
        );
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        for seq in 0..3 {
            socket
                .send_to(reading(1, 0, seq).as_bytes(), server.addr)
                .unwrap();
        }
        assert_eq!(recv_ack(&socket, Duration::from_secs(1)), None, "{args:?}");
        let counts = server.stop_clean();
        assert_eq!(counts["persisted"], 3 * stored, "{args:?}");
    }
}

/// A sensor sending to the daemon through `sensord send --reliable` with
/// nothing lost: every reading acknowledged, stored once, exit 0.
#[test]
fn reliable_send_gets_every_reading_acknowledged() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let out = send_readings(
        server.addr,
        &[
            "--reliable",
            "--interval",
            "0",
            "--count",
            "3000",
            "--sensor-ids",
            "1-5",
        ],
        scratch.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sent 3000 readings, acked 3000,"),
        "{stderr}"
    );
    let counts = server.stop_clean();
    assert_eq!(counts["persisted"], 3000);
    let ids = identities(&scratch.db);
    let mut per_sensor: HashMap<i64, Vec<i64>> = HashMap::new();
    for (sensor, _, seq) in ids {
        per_sensor.entry(sensor).or_default().push(seq);
    }
    // Numbered from 0 per sensor, each once.
    for seqs in per_sensor.values() {
        assert_eq!(*seqs, (0..seqs.len() as i64).collect::<Vec<_>>());
    }
}

/// `send --reliable` with nobody acknowledging gives up and exits 1.
#[test]
fn reliable_send_without_acks_fails() {
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg(), "--acks", "off"]);
    let to: SocketAddr = server.addr;
    let out = run(
        &[
            "send",
            "--to",
            &to.to_string(),
            "--reliable",
            "--interval",
            "0",
            "--count",
            "20",
            "--give-up-after",
            "2s",
        ],
        scratch.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("acked 0, ") && stderr.contains("gave up 20"),
        "{stderr}"
    );
    server.stop_clean();
}
