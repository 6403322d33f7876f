//! The bare-socket ceiling for `scripts/bench.sh`: a blocking `recv_from`
//! loop that counts datagrams and does nothing else, on a socket set up as
//! `sensord serve` sets up its own (same receive buffer request).
//!
//! Usage: `bare_recv BIND COUNT [RECV_BUFFER [IDLE_SECS]]`
//!
//! Prints `listening on ADDR` once bound. Stops when COUNT datagrams have
//! arrived, or when none arrived for IDLE_SECS (default 2) after the first,
//! and prints `received=R last_unix=T`, T being the unix time of the last
//! datagram.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: bare_recv BIND COUNT [RECV_BUFFER [IDLE_SECS]]");
        std::process::exit(2);
    }
    let count: u64 = args[2].parse().expect("COUNT must be an integer");
    // sensord serve's default --recv-buffer.
    let recv_buffer: usize = args.get(3).map_or(134_217_728, |a| {
        a.parse().expect("RECV_BUFFER must be an integer")
    });
    let idle = Duration::from_secs_f64(
        args.get(4)
            .map_or(2.0, |a| a.parse().expect("IDLE_SECS must be a number")),
    );
    let socket = sensord::receiver::bind(args[1].parse().expect("an IP:PORT address"), recv_buffer)
        .unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1);
        });
    // A bound socket always has a local address.
    println!("listening on {}", socket.local_addr().unwrap());
    // The bench script waits for that line in a file; push it out now.
    std::io::stdout().flush().expect("stdout is writable");

    let mut buf = vec![0u8; 65_536];
    let mut received = 0u64;
    let mut last = SystemTime::now();
    // The first datagram may be a while coming; after it, a gap of `idle`
    // means the sender is done and some datagrams were lost.
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a non-zero timeout is valid");
    while received < count {
        match socket.recv_from(&mut buf) {
            Ok(_) => {
                received += 1;
                // As sensord stamps received_at; and a run that ends by the
                // idle timeout still reports when its last datagram came.
                last = SystemTime::now();
                if received == 1 {
                    socket
                        .set_read_timeout(Some(idle))
                        .expect("a non-zero timeout is valid");
                }
            }
            Err(_) => break,
        }
    }
    let last_unix = last
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64();
    println!("received={received} last_unix={last_unix:.6}");
}
