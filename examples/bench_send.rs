//! The benchmark's sender: a bare `send` loop over pre-formatted readings,
//! so the sender costs no more than the socket does.
//!
//! `sensord send --interval 0` formats each reading as it goes and reached
//! 0.6 to 0.99 (median about 0.8) of a bare send loop's rate on a 2-core
//! machine, short of the 0.9 needed to saturate a receiver;
//! `scripts/bench.sh` measures both every run and prints the ratio. The readings look like `sensord send`'s: random sensor
//! ids in 10-1000, temperature in [1, 35), humidity in [1, 12), and
//! `ingested_at` increasing from the start time.
//!
//! `bench_send TO COUNT named` sends the same readings from named sensors
//! (`"esp32-517"`) with two extra fields, `pressure` and `rssi`.
//!
//! Usage: `bench_send TO COUNT [named]`. Prints `sent=N failed=F seconds=S`.

use std::fmt::Write as _;
use std::net::UdpSocket;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Distinct datagrams to cycle through: many more than the 991 sensors, so
/// the database sees the index traffic of random sensor ids.
const POOL: usize = 1 << 16;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let named = match args.get(3).map(String::as_str) {
        None if args.len() == 3 => false,
        Some("named") if args.len() == 4 => true,
        _ => {
            eprintln!("usage: bench_send TO COUNT [named]");
            std::process::exit(2);
        }
    };
    let count: u64 = args[2].parse().expect("COUNT must be an integer");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("loopback is bindable");
    socket.connect(&args[1]).expect("TO must be an address");

    let mut rng = StdRng::seed_from_u64(42);
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64();
    let pool: Vec<String> = (0..POOL)
        .map(|i| {
            let mut datagram = String::with_capacity(192);
            let (id, temperature, humidity, at) = (
                rng.random_range(10..=1000),
                rng.random_range(1.0..35.0),
                rng.random_range(1.0..12.0),
                start + i as f64 * 1e-6,
            );
            // Writing to a String cannot fail.
            let _ = if named {
                write!(
                    datagram,
                    r#"{{"sensor_id":"esp32-{id}","temperature":{temperature},"humidity":{humidity},"pressure":{},"rssi":{},"ingested_at":{at}}}"#,
                    rng.random_range(950.0..1050.0),
                    rng.random_range(-90..-30),
                )
            } else {
                write!(
                    datagram,
                    r#"{{"sensor_id":{id},"temperature":{temperature},"humidity":{humidity},"ingested_at":{at}}}"#,
                )
            };
            datagram
        })
        .collect();

    let started = Instant::now();
    let mut failed = 0u64;
    // Exactly COUNT attempts; a failed one (say, refused while nobody
    // listens) is counted, not retried, so the loop always ends.
    for datagram in pool.iter().cycle().take(count as usize) {
        if socket.send(datagram.as_bytes()).is_err() {
            failed += 1;
        }
    }
    println!(
        "sent={} failed={failed} seconds={:.6}",
        count - failed,
        started.elapsed().as_secs_f64()
    );
}
