//! `clients/python/sensord_client.py` under CPython, sending through the
//! lossy relay: to a fake acking server here (the client's own logic), and
//! to the real binary (exactly-once in the database).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Value, json};

use crate::relay::{Faults, Relay};
use crate::util::*;

/// The network of issue 17's proof: 20% loss each way, 5% duplicates,
/// reordering within 50 ms.
const LOSSY: Faults = Faults {
    drop: 0.2,
    duplicate: 0.05,
    max_delay: Duration::from_millis(50),
};

/// What `clients/python/tests/send_n.py` printed.
struct Driven {
    /// Its exit status was 0.
    success: bool,
    /// The client's counters: sent, acked, retransmitted, gave_up,
    /// unacked, and the boot it drew.
    stats: HashMap<String, u64>,
    /// (seq, temperature, humidity, ingested_at), as sent.
    readings: Vec<(u64, f64, f64, f64)>,
    /// The whole output, for failure messages.
    output: Output,
}

/// Runs the driver under `python3`: `count` readings as `sensor_id` to
/// `to`, failing the test if it runs longer than 180 s.
fn drive(to: SocketAddr, count: usize, sensor_id: &str) -> Driven {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python/tests/send_n.py");
    let child = Command::new("python3")
        .arg(script)
        .args([&to.to_string(), &count.to_string(), sensor_id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let output = match done_rx.recv_timeout(Duration::from_secs(180)) {
        Ok(output) => output.expect("waiting for python3 works"),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("send_n.py did not finish within 180 s");
        }
    };
    let printed: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("send_n.py printed no JSON ({e}): {output:?}"));
    let stats = printed["stats"]
        .as_object()
        .expect("stats is an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a counter")))
        .collect();
    let readings = printed["readings"]
        .as_array()
        .expect("readings is an array")
        .iter()
        .map(|r| {
            let f = |i: usize| r[i].as_f64().expect("a number");
            (r[0].as_u64().expect("a seq"), f(1), f(2), f(3))
        })
        .collect();
    Driven {
        success: output.status.success(),
        stats,
        readings,
        output,
    }
}

/// Asserts that the driver sent `count` readings and every one was acked.
fn assert_all_acked(driven: &Driven, count: u64) {
    let s = &driven.stats;
    assert!(
        driven.success && s["sent"] == count && s["acked"] == count,
        "not all acked: {s:?}; {}; stderr: {}",
        driven.output.status,
        String::from_utf8_lossy(&driven.output.stderr)
    );
    assert_eq!((s["gave_up"], s["unacked"]), (0, 0), "{s:?}");
    assert_eq!(driven.readings.len() as u64, count);
}

/// The client's unit tests (`clients/python/tests/test_client.py`: fields,
/// ack parsing, the window, back-off, giving up) pass under CPython.
#[test]
fn python_client_unit_tests_pass() {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python/tests");
    let mut child = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s"])
        .arg(&tests)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr was piped");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        let _ = done_tx.send((child.wait(), text));
    });
    let (status, text) = done_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            signal(pid, libc::SIGKILL);
            panic!("the Python unit tests did not finish within 60 s");
        });
    assert!(status.expect("waiting works").success(), "{text}");
}

/// What `FakeSensord` holds: (sensor_id as JSON text, boot, seq) → the
/// first copy of the reading's object.
type Stored = HashMap<(String, u64, u64), Value>;

/// A stand-in for sensord's acks: it keeps the first copy of each
/// (sensor_id, boot, seq) and acks every datagram's sequenced readings at
/// once, as ranges. Dropping it stops its thread.
struct FakeSensord {
    addr: SocketAddr,
    stored: Arc<Mutex<Stored>>,
    /// Copies of a stored reading that arrived again, and how many of
    /// those differed from the first.
    duplicates: Arc<Mutex<(u64, u64)>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeSensord {
    fn start() -> FakeSensord {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stored = Arc::new(Mutex::new(HashMap::new()));
        let duplicates = Arc::new(Mutex::new((0, 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stored, duplicates, stop) = (stored.clone(), duplicates.clone(), stop.clone());
            thread::Builder::new()
                .name("fake-sensord".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 65_507];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((len, from)) = socket.recv_from(&mut buf) else {
                            continue;
                        };
                        let mut stored = stored.lock().unwrap();
                        let mut duplicates = duplicates.lock().unwrap();
                        if let Some(ack) = take(&buf[..len], &mut stored, &mut duplicates) {
                            let _ = socket.send_to(ack.to_string().as_bytes(), from);
                        }
                    }
                })
                .unwrap()
        };
        FakeSensord {
            addr,
            stored,
            duplicates,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeSensord {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Stores the sequenced readings of one datagram (an object, an array, or
/// NDJSON) and returns its ack, None if it held none.
fn take(datagram: &[u8], stored: &mut Stored, duplicates: &mut (u64, u64)) -> Option<Value> {
    let mut readings = Vec::new();
    for value in serde_json::Deserializer::from_slice(datagram).into_iter::<Value>() {
        match value.ok()? {
            Value::Array(items) => readings.extend(items),
            object => readings.push(object),
        }
    }
    // (sensor_id, boot) → its seqs, in first-seen order of the pair.
    let mut acked: Vec<(Value, u64, Vec<u64>)> = Vec::new();
    for reading in readings {
        let sensor_id = reading.get("sensor_id");
        let boot = reading.get("boot").map_or(Some(0), Value::as_u64);
        let (Some(sensor_id), Some(boot), Some(seq)) = (sensor_id, boot, reading["seq"].as_u64())
        else {
            continue;
        };
        let key = (sensor_id.to_string(), boot, seq);
        match stored.get(&key) {
            Some(first) => {
                duplicates.0 += 1;
                duplicates.1 += u64::from(*first != reading);
            }
            None => {
                stored.insert(key, reading.clone());
            }
        }
        match acked
            .iter_mut()
            .find(|(id, b, _)| id == sensor_id && *b == boot)
        {
            Some((_, _, seqs)) => seqs.push(seq),
            None => acked.push((sensor_id.clone(), boot, vec![seq])),
        }
    }
    if acked.is_empty() {
        return None;
    }
    let entries: Vec<Value> = acked
        .into_iter()
        .map(|(sensor_id, boot, mut seqs)| {
            seqs.sort_unstable();
            seqs.dedup();
            let mut ranges: Vec<[u64; 2]> = Vec::new();
            for seq in seqs {
                match ranges.last_mut() {
                    Some(last) if last[1] + 1 == seq => last[1] = seq,
                    _ => ranges.push([seq, seq]),
                }
            }
            json!({"sensor_id": sensor_id, "boot": boot, "seq": ranges})
        })
        .collect();
    Some(json!({ "ack": entries }))
}

/// Through 20% loss each way, duplicates and reordering, the client gets
/// every reading acked by retransmitting, and the (fake) server holds each
/// one with the values sent; retransmissions are byte-for-byte the same.
#[test]
fn python_client_retransmits_until_acked_through_lossy_relay() {
    let server = FakeSensord::start();
    let relay = Relay::start(server.addr, 17, LOSSY, LOSSY);
    let driven = drive(relay.addr(), 2000, "py-fake");
    assert_all_acked(&driven, 2000);
    assert!(driven.stats["retransmitted"] > 0, "{:?}", driven.stats);
    assert!(relay.stats().up.dropped > 0 && relay.stats().down.dropped > 0);

    let boot = driven.stats["boot"];
    let stored = server.stored.lock().unwrap();
    assert_eq!(stored.len(), 2000);
    for &(seq, temperature, humidity, ingested_at) in &driven.readings {
        let reading = &stored[&("\"py-fake\"".to_string(), boot, seq)];
        let got = |field: &str| reading[field].as_f64().unwrap().to_bits();
        assert_eq!(
            [got("temperature"), got("humidity"), got("ingested_at")],
            [
                temperature.to_bits(),
                humidity.to_bits(),
                ingested_at.to_bits()
            ],
            "seq {seq}: {reading}"
        );
    }
    let (duplicates, differing) = *server.duplicates.lock().unwrap();
    assert!(duplicates > 0);
    assert_eq!(differing, 0, "retransmissions changed a reading");
}

/// Issue 17's proof for the Python client: through 20% loss each way the
/// real binary acks every reading, and the database holds each one exactly
/// once with its values bit-exact. Needs the server side of issue 17.
#[test]
fn python_client_delivers_through_lossy_relay() {
    const COUNT: usize = 2000;
    let scratch = Scratch::new();
    let mut server = Server::start(scratch.path(), &["--db", scratch.db_arg()]);
    let relay = Relay::start(server.addr, 42, LOSSY, LOSSY);
    let driven = drive(relay.addr(), COUNT, "py-relay");
    assert_all_acked(&driven, COUNT as u64);
    drop(relay);
    server.stop_clean();

    let conn = rusqlite::Connection::open(&scratch.db).unwrap();
    let mut statement = conn
        .prepare(
            "SELECT m.temperature, m.humidity, m.ingested_at
             FROM sensor_measurements m JOIN sensor_names n ON n.key = m.sensor_id
             WHERE n.name = 'py-relay'",
        )
        .unwrap();
    let mut stored: HashMap<[u64; 3], u64> = HashMap::new();
    for row in statement
        .query_map([], |r| {
            Ok([r.get::<_, f64>(0)?, r.get(1)?, r.get(2)?].map(f64::to_bits))
        })
        .unwrap()
    {
        *stored.entry(row.unwrap()).or_default() += 1;
    }
    // Each reading's values are distinct, so they stand for its seq.
    for &(seq, temperature, humidity, ingested_at) in &driven.readings {
        let key = [temperature, humidity, ingested_at].map(f64::to_bits);
        assert_eq!(stored.get(&key), Some(&1), "seq {seq} stored not once");
    }
    assert_eq!(stored.values().sum::<u64>(), COUNT as u64);
}
