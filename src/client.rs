//! `sensord send`: a client sending random readings, one per datagram, as
//! the original design's client did, numbered per sensor (`seq`, `boot`).
//! With `--reliable` it keeps each reading until the server acknowledges
//! it, retransmitting with exponential back-off (see README, "Delivery
//! over a lossy network").

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

use log::{info, warn};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::error::Error;
use crate::reading::unix_now;
use crate::shutdown::{Shutdown, poll_readable};

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
    /// Keep every reading until acknowledged, retransmitting it.
    pub reliable: bool,
    /// The most readings unacknowledged at once (`--reliable`).
    pub max_unacked: usize,
    /// How long a reading may stay unacknowledged before it is given up.
    pub give_up: Duration,
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

/// What a run of `send` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Readings sent (each once; retransmissions are counted apart).
    pub sent: u64,
    /// Readings acknowledged (`--reliable`).
    pub acked: u64,
    /// Retransmissions.
    pub retransmitted: u64,
    /// Readings given up on after `GIVE_UP` without an ack.
    pub gave_up: u64,
}

impl Sent {
    /// True when a reliable run has every reading acknowledged.
    pub fn all_acked(&self) -> bool {
        self.acked == self.sent
    }
}

/// The first retransmission timeout: above a commit's usual latency
/// (`--flush-interval` is 100 ms), well under CoAP's 2 s, which suits a
/// sensor sending once a minute rather than every 10 ms.
pub const INITIAL_TIMEOUT: Duration = Duration::from_millis(500);
/// Back-off doubles the timeout up to this, so a long outage is probed
/// every few seconds instead of ever more rarely.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(4);
/// A reading unacknowledged this long after its first send is given up,
/// unless `--give-up-after` says otherwise.
pub const GIVE_UP: Duration = Duration::from_secs(60);
/// Retransmissions are packed as JSON arrays into datagrams this large.
const RETRANSMIT_BYTES: usize = 1400;

/// Sends readings until `count` is reached or `shutdown` is triggered,
/// numbered per sensor (`seq` from 0, one random `boot` per run).
pub fn run(config: &SendConfig, shutdown: &Shutdown) -> Result<Sent, Error> {
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
    // 0 to 2^63-1, as the server takes.
    let boot = rng.random::<u64>() >> 1;
    info!(
        "sending to {} every {} (boot {boot}{})",
        config.to,
        humantime::format_duration(config.interval),
        if config.reliable {
            ", retransmitting until acknowledged"
        } else {
            ""
        }
    );
    let mut client = Client {
        socket,
        to: config.to,
        boot,
        reliable: config.reliable,
        max_unacked: config.max_unacked.max(1),
        give_up: config.give_up,
        next_seq: HashMap::new(),
        unacked: BTreeMap::new(),
        timers: BinaryHeap::new(),
        sent: Sent::default(),
        refused: 0,
    };
    // Reliable: reads of acks never block (`wait` polls), and a send the
    // socket's buffer cannot take goes out again when its timer expires.
    // Otherwise sends block, so a blast loses nothing in this process.
    client
        .socket
        .set_nonblocking(config.reliable)
        .map_err(|source| Error::Io {
            what: "make the socket non-blocking",
            source,
        })?;
    let mut next = Instant::now();
    while config.count.is_none_or(|count| client.sent.sent < count) && !shutdown.requested() {
        let sensor = rng.random_range(config.sensor_ids.0.clone());
        if client.reliable {
            client.tend(Duration::ZERO, &mut rng, shutdown)?;
            while client.full(sensor) && !shutdown.requested() {
                client.tend(Duration::from_millis(50), &mut rng, shutdown)?;
            }
            if shutdown.requested() {
                break;
            }
        }
        client.send_new(sensor, &mut rng)?;
        if !config.interval.is_zero() {
            // A late wake-up (a busy machine) is not made up with a burst.
            next = (next + config.interval).max(Instant::now());
            if client.reliable {
                while Instant::now() < next && !shutdown.requested() {
                    let left = next.saturating_duration_since(Instant::now());
                    client.tend(left, &mut rng, shutdown)?;
                }
            } else {
                pace(next, shutdown);
            }
        }
    }
    if client.reliable {
        // The last acks: until every reading is acknowledged or given up.
        if !client.unacked.is_empty() {
            info!(
                "waiting up to {} for the last {} acks",
                humantime::format_duration(config.give_up),
                client.unacked.len()
            );
        }
        while !client.unacked.is_empty() && !shutdown.requested() {
            client.tend(Duration::from_millis(50), &mut rng, shutdown)?;
        }
    }
    let sent = client.sent;
    if client.reliable {
        info!(
            "sent {}, acked {}, retransmitted {}, gave up {}",
            crate::ledger::count(sent.sent, "reading"),
            sent.acked,
            sent.retransmitted,
            sent.gave_up
        );
    } else {
        info!("sent {}", crate::ledger::count(sent.sent, "reading"));
    }
    if client.refused > 0 && !sent.all_acked() {
        // The kernel reports a refusal on the send after the one refused,
        // so some "sent" readings were refused too.
        return Err(Error::Config(format!(
            "{} refused {}: nothing is listening there (is `sensord serve` running, on that \
             port?)",
            config.to,
            crate::ledger::count(client.refused, "datagram")
        )));
    }
    Ok(sent)
}

/// A reading kept until it is acknowledged.
struct Pending {
    /// Its JSON object, exactly as first sent.
    text: String,
    first_sent: Instant,
    /// The current retransmission timeout, and when it expires.
    timeout: Duration,
    due: Instant,
}

/// The sending side of `send`.
struct Client {
    socket: UdpSocket,
    to: SocketAddr,
    boot: u64,
    reliable: bool,
    max_unacked: usize,
    give_up: Duration,
    /// The next `seq` of each sensor.
    next_seq: HashMap<i64, u64>,
    /// Readings sent and not yet acknowledged, by sensor and seq.
    unacked: BTreeMap<(i64, u64), Pending>,
    /// Retransmission deadlines; an entry whose reading was acknowledged
    /// or rescheduled since is skipped when it comes up.
    timers: BinaryHeap<Reverse<(Instant, i64, u64)>>,
    sent: Sent,
    /// Sends the kernel refused (nothing listening).
    refused: u64,
}

impl Client {
    /// True while a new reading from `sensor` must wait: `max_unacked`
    /// readings are in flight, or its next `seq` is that far above its
    /// oldest unacknowledged one. The second keeps every retransmission
    /// within the server's duplicate window, however long one reading
    /// keeps being lost.
    fn full(&self, sensor: i64) -> bool {
        let next = self.next_seq.get(&sensor).copied().unwrap_or(0);
        let oldest = self
            .unacked
            .range((sensor, 0)..=(sensor, u64::MAX))
            .next()
            .map_or(next, |((_, seq), _)| *seq);
        self.unacked.len() >= self.max_unacked || next - oldest >= self.max_unacked as u64
    }

    /// Sends a new random reading from `sensor`, keeping it if reliable.
    fn send_new(&mut self, sensor: i64, rng: &mut StdRng) -> Result<(), Error> {
        let next = self.next_seq.entry(sensor).or_default();
        let seq = *next;
        *next += 1;
        let mut text = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            r#"{{"sensor_id":{sensor},"boot":{},"seq":{seq},"temperature":{},"humidity":{},"ingested_at":{}}}"#,
            self.boot,
            rng.random_range(1.0..35.0),
            rng.random_range(1.0..12.0),
            unix_now()
        );
        self.send(text.as_bytes())?;
        self.sent.sent += 1;
        if self.reliable {
            let now = Instant::now();
            let timeout = jitter(INITIAL_TIMEOUT, rng);
            self.timers.push(Reverse((now + timeout, sensor, seq)));
            self.unacked.insert(
                (sensor, seq),
                Pending {
                    text,
                    first_sent: now,
                    timeout: INITIAL_TIMEOUT,
                    due: now + timeout,
                },
            );
        }
        Ok(())
    }

    fn send(&mut self, datagram: &[u8]) -> Result<(), Error> {
        match self.socket.send(datagram) {
            Ok(_) => Ok(()),
            // Nobody listening yet (ICMP port unreachable): keep going.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                if self.refused == 0 {
                    warn!("{} refused a datagram; is the server running?", self.to);
                }
                self.refused += 1;
                Ok(())
            }
            // Reliable only (the socket is non-blocking): the send buffer
            // is full; the reading is retransmitted when its timer expires.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(source) => Err(Error::Io {
                what: "send a datagram",
                source,
            }),
        }
    }

    /// Reads every ack waiting, and forgets what they acknowledge.
    fn read_acks(&mut self) -> Result<(), Error> {
        let mut buffer = [0u8; 65_536];
        loop {
            let n = match self.socket.recv(&mut buffer) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.refused += 1;
                    continue;
                }
                Err(source) => {
                    return Err(Error::Io {
                        what: "read acks",
                        source,
                    });
                }
            };
            let Ok(ack) = serde_json::from_slice::<Ack>(&buffer[..n]) else {
                continue;
            };
            for entry in ack.ack {
                if entry.boot != self.boot {
                    continue;
                }
                for (lo, hi) in entry.seq {
                    let done: Vec<(i64, u64)> = self
                        .unacked
                        .range((entry.sensor_id, lo)..=(entry.sensor_id, hi))
                        .map(|(key, _)| *key)
                        .collect();
                    for key in done {
                        self.unacked.remove(&key);
                        self.sent.acked += 1;
                    }
                }
            }
        }
    }

    /// Retransmits every reading whose timeout expired, packed into
    /// arrays, doubling its timeout; gives up on those past `GIVE_UP`.
    fn retransmit(&mut self, rng: &mut StdRng) -> Result<(), Error> {
        let now = Instant::now();
        let mut datagram = String::from("[");
        while let Some(&Reverse((due, sensor, seq))) = self.timers.peek() {
            if due > now {
                break;
            }
            self.timers.pop();
            let Some(pending) = self.unacked.get_mut(&(sensor, seq)) else {
                continue;
            };
            if pending.due != due {
                continue;
            }
            if now.duration_since(pending.first_sent) >= self.give_up {
                self.unacked.remove(&(sensor, seq));
                self.sent.gave_up += 1;
                continue;
            }
            pending.timeout = (pending.timeout * 2).min(MAX_TIMEOUT);
            pending.due = now + jitter(pending.timeout, rng);
            self.timers.push(Reverse((pending.due, sensor, seq)));
            if datagram.len() + pending.text.len() + 2 > RETRANSMIT_BYTES && datagram.len() > 1 {
                datagram.push(']');
                let full = std::mem::replace(&mut datagram, String::from("["));
                self.send(full.as_bytes())?;
            }
            // Pending readings are borrowed from the map: copy the text.
            let text = &self.unacked[&(sensor, seq)].text;
            if datagram.len() > 1 {
                datagram.push(',');
            }
            datagram.push_str(text);
            self.sent.retransmitted += 1;
        }
        if datagram.len() > 1 {
            datagram.push(']');
            self.send(datagram.as_bytes())?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for an ack (see `wait`), then reads the acks
    /// and retransmits what is due: a reliable sender's one chore.
    fn tend(
        &mut self,
        timeout: Duration,
        rng: &mut StdRng,
        shutdown: &Shutdown,
    ) -> Result<(), Error> {
        self.wait(timeout, shutdown)?;
        self.read_acks()?;
        self.retransmit(rng)
    }

    /// Waits up to `timeout` (at most until the next retransmission) for an
    /// ack to arrive or a stop request.
    fn wait(&self, timeout: Duration, shutdown: &Shutdown) -> Result<(), Error> {
        let until_due = self.timers.peek().map_or(timeout, |Reverse((due, _, _))| {
            due.saturating_duration_since(Instant::now())
        });
        let fds = [self.socket.as_fd(), shutdown.wake_fd()];
        poll_readable(&fds, timeout.min(until_due)).map_err(|source| Error::Io {
            what: "wait for acks",
            source,
        })?;
        Ok(())
    }
}

/// A timeout times a random factor from 1 to 1.5, as CoAP's
/// ACK_RANDOM_FACTOR, so retransmissions of many readings spread out.
fn jitter(timeout: Duration, rng: &mut StdRng) -> Duration {
    timeout.mul_f64(rng.random_range(1.0..1.5))
}

/// An ack datagram, as the server sends it.
#[derive(Deserialize)]
struct Ack {
    ack: Vec<AckEntry>,
}

#[derive(Deserialize)]
struct AckEntry {
    /// Integer ids only: `send` sends no names.
    sensor_id: i64,
    boot: u64,
    seq: Vec<(u64, u64)>,
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
