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
//! `named` sends the same readings from named sensors (`"esp32-517"`)
//! with two extra fields, `pressure` and `rssi`.
//!
//! Usage: `bench_send TO COUNT [--rate R] [named]`. Without `--rate` it
//! sends COUNT datagrams as fast as it can (the blast `scripts/bench.sh`
//! uses). With it, it paces them at R datagrams/s, as
//! `scripts/bench-knee.sh` needs: every millisecond a burst of what the
//! schedule says is due (about R/1000, more after a late wake-up, so a
//! stall is caught up), then it sleeps until the next millisecond. It never
//! spins, so it costs what a remote sender's kernel work would, not a core.
//!
//! Prints `sent=N failed=F seconds=S cpu_seconds=C`: C is its own user +
//! system CPU time (getrusage), for the report's sender CPU.

use std::fmt::Write as _;
use std::net::UdpSocket;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Distinct datagrams to cycle through: many more than the 991 sensors, so
/// the database sees the index traffic of random sensor ids.
const POOL: usize = 1 << 16;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: bench_send TO COUNT [--rate R] [named]");
        std::process::exit(2);
    };
    if args.len() < 3 {
        usage();
    }
    let (mut rate, mut named) = (None::<f64>, false);
    let mut rest = args[3..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--rate" => {
                rate = rest
                    .next()
                    .and_then(|r| r.parse().ok())
                    .filter(|r: &f64| *r > 0.0);
                if rate.is_none() {
                    usage();
                }
            }
            "named" => named = true,
            _ => usage(),
        }
    }
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
    let mut datagrams = pool.iter().cycle().take(count as usize);
    let mut send_next = |n: u64| {
        for datagram in datagrams.by_ref().take(n as usize) {
            if socket.send(datagram.as_bytes()).is_err() {
                failed += 1;
            }
        }
    };
    match rate {
        None => send_next(count),
        Some(rate) => {
            let mut done = 0u64;
            while done < count {
                // What the schedule says is due by now: a late wake-up
                // makes a larger burst, so the mean rate holds.
                let due = ((started.elapsed().as_secs_f64() * rate) as u64).clamp(done, count);
                send_next(due - done);
                done = due;
                // Sleep to the next whole tick after now (not after the
                // last one: a late burst must not be followed by a spin).
                let elapsed = started.elapsed();
                let ticks = elapsed.as_nanos() / TICK.as_nanos() + 1;
                let next = Duration::from_nanos((ticks * TICK.as_nanos()) as u64);
                std::thread::sleep(next - elapsed);
            }
        }
    }
    println!(
        "sent={} failed={failed} seconds={:.6} cpu_seconds={:.6}",
        count - failed,
        started.elapsed().as_secs_f64(),
        cpu_seconds()
    );
}

/// The pause between bursts in `--rate` mode.
const TICK: Duration = Duration::from_millis(1);

/// This process's user + system CPU time so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given and has no
    // other preconditions; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
