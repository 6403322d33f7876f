//! A bare `send` loop, the yardstick `scripts/bench.sh` holds
//! `sensord send --interval 0` against: it sends COUNT copies of one
//! pre-formatted reading as fast as the socket takes them.
//!
//! Usage: `bare_send TO COUNT`. Prints `sent=N seconds=S`.

use std::net::UdpSocket;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: bare_send TO COUNT");
        std::process::exit(2);
    }
    let count: u64 = args[2].parse().expect("COUNT must be an integer");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("loopback is bindable");
    socket.connect(&args[1]).expect("TO must be an address");
    // The same shape and size as what `sensord send` writes.
    let datagram = br#"{"sensor_id":517,"temperature":23.41508812034951,"humidity":7.025389347710512,"ingested_at":1764140501.1234567}"#;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < count {
        if socket.send(datagram).is_ok() {
            sent += 1;
        }
    }
    println!("sent={sent} seconds={:.6}", started.elapsed().as_secs_f64());
}
