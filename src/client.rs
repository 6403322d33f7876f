//! `sensord send`: a client sending random readings, one per datagram, as
//! the original design's client did.

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::error::Error;
use crate::reading::unix_now;
use crate::shutdown::Shutdown;

/// What to send, from the command line.
#[derive(Clone, Debug)]
pub struct SendConfig {
    pub to: SocketAddr,
    /// Pause between readings; zero sends as fast as the socket takes them.
    pub interval: Duration,
    /// Stop after this many; None sends until interrupted.
    pub count: Option<u64>,
    pub sensor_ids: SensorIds,
    /// Seed for reproducible readings; None draws one from the OS.
    pub seed: Option<u64>,
}

/// A `--sensor-ids LO-HI` range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SensorIds(pub RangeInclusive<i64>);

impl FromStr for SensorIds {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a range LO-HI of sensor ids, like 10-1000");
        // Split at the dash after the first character, so LO may be negative.
        let at = text
            .get(1..)
            .and_then(|rest| rest.find('-'))
            .ok_or_else(bad)?
            + 1;
        let lo: i64 = text[..at].trim().parse().map_err(|_| bad())?;
        let hi: i64 = text[at + 1..].trim().parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(format!("sensor id range `{text}` is empty (LO > HI)"));
        }
        Ok(SensorIds(lo..=hi))
    }
}

/// Sends readings until `count` is reached or `shutdown` is triggered.
/// Returns how many were sent.
pub fn run(config: &SendConfig, shutdown: &Shutdown) -> Result<u64, Error> {
    let local = if config.to.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(local).map_err(|source| Error::Bind {
        addr: local.to_string(),
        source,
    })?;
    socket.connect(config.to).map_err(|source| Error::Io {
        what: "set the destination address",
        source,
    })?;
    let mut rng = match config.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => rand::make_rng(),
    };
    info!(
        "sending to {} every {}",
        config.to,
        humantime::format_duration(config.interval)
    );
    let mut datagram = String::with_capacity(128);
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut next = Instant::now();
    while config.count.is_none_or(|count| sent < count) && !shutdown.requested() {
        datagram.clear();
        // Writing to a String cannot fail.
        let _ = write!(
            datagram,
            r#"{{"sensor_id":{},"temperature":{},"humidity":{},"ingested_at":{}}}"#,
            rng.random_range(config.sensor_ids.0.clone()),
            rng.random_range(1.0..35.0),
            rng.random_range(1.0..12.0),
            unix_now()
        );
        match socket.send(datagram.as_bytes()) {
            Ok(_) => sent += 1,
            // Nobody listening yet (ICMP port unreachable): keep going.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                if failed == 0 {
                    warn!("{} refused a datagram; is the server running?", config.to);
                }
                failed += 1;
            }
            Err(source) => {
                return Err(Error::Io {
                    what: "send a datagram",
                    source,
                });
            }
        }
        if !config.interval.is_zero() {
            // A late wake-up (a busy machine) is not made up with a burst.
            next = (next + config.interval).max(Instant::now());
            pace(next, shutdown);
        }
    }
    info!("sent {}", crate::ledger::count(sent, "reading"));
    if failed > 0 {
        // The kernel reports a refusal on the send after the one refused,
        // so some "sent" readings were refused too.
        return Err(Error::Config(format!(
            "{} refused {}: nothing is listening there (is `sensord serve` running, on that \
             port?)",
            config.to,
            crate::ledger::count(failed, "datagram")
        )));
    }
    Ok(sent)
}

/// Sleeps until `until`, waking early on shutdown.
fn pace(until: Instant, shutdown: &Shutdown) {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || shutdown.requested() {
            return;
        }
        thread::sleep(left.min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges parse, negative bounds included; bad ones name the problem.
    #[test]
    fn sensor_id_ranges() {
        assert_eq!("10-1000".parse(), Ok(SensorIds(10..=1000)));
        assert_eq!("-5--1".parse(), Ok(SensorIds(-5..=-1)));
        assert_eq!("7-7".parse(), Ok(SensorIds(7..=7)));
        assert!("9-1".parse::<SensorIds>().unwrap_err().contains("empty"));
        assert!("abc".parse::<SensorIds>().is_err());
    }
}
