//! A seeded, lossy UDP relay on loopback, to put between a client and the
//! server: it drops, duplicates and delays (so reorders) datagrams in each
//! direction, and remembers what it delivered and what it lost, so a test
//! can compare what the server counted with what the network did.
//!
//! Each direction has its own `StdRng`, seeded from the relay's seed, and
//! draws the same numbers in the same order for each datagram, so the same
//! seed and the same sequence of datagrams in a direction give the same
//! fault decisions. With several clients, the upstream sequence is the
//! order in which their datagrams reach the relay; the downstream sequence
//! is the order in which the server's replies reach it.
//!
//! Threads: `relay-up` reads from the clients, one `relay-down` per client
//! reads the server's replies on that client's upstream socket, and
//! `relay-sched` sends each copy of either direction when it is due. All of them poll a stop flag
//! between reads with a timeout, so dropping the relay ends them promptly.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How long a relay thread blocks before it looks at the stop flag again.
const POLL: Duration = Duration::from_millis(20);

/// The largest datagram the relay carries (the UDP maximum on IPv4).
const MAX_DATAGRAM: usize = 65_507;

/// What the network does to the datagrams of one direction.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// The probability that a datagram is dropped (no copy delivered).
    pub drop: f64,
    /// The probability that a datagram not dropped is delivered twice.
    pub duplicate: f64,
    /// Each copy is delayed uniformly in `0..=max_delay`, which reorders
    /// datagrams sent less than `max_delay` apart.
    pub max_delay: Duration,
}

impl Faults {
    /// A perfect network: everything delivered once, in order.
    pub const NONE: Faults = Faults {
        drop: 0.0,
        duplicate: 0.0,
        max_delay: Duration::ZERO,
    };
}

/// The counts of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams the relay read.
    pub received: u64,
    /// Copies sent on (two for a duplicated datagram).
    pub forwarded: u64,
    /// Datagrams dropped: none of their copies is sent.
    pub dropped: u64,
    /// Datagrams given a second copy.
    pub duplicated: u64,
}

/// The counts of both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Client to server.
    pub up: DirectionStats,
    /// Server to client.
    pub down: DirectionStats,
}

/// A loopback relay between clients and one server; dropping it stops its
/// threads (each within about `POLL`) and drops what is still delayed.
pub struct Relay {
    /// The address clients send to.
    addr: SocketAddr,
    /// What happened so far, shared with the threads.
    shared: Arc<Shared>,
    /// `relay-up` and `relay-sched`; the `relay-down` threads are in
    /// `shared.down_threads`.
    threads: Vec<JoinHandle<()>>,
}

/// The state the relay's threads share.
struct Shared {
    /// Set by `Drop`; every thread ends when it sees it.
    stop: AtomicBool,
    /// Where the server's replies go on to the clients from.
    front: UdpSocket,
    server: SocketAddr,
    /// The fault decisions of the server's replies, drawn by whichever
    /// `relay-down` thread reads one.
    down_rng: Mutex<StdRng>,
    down_faults: Faults,
    /// Counts and payloads, for the accessors.
    record: Mutex<Record>,
    /// Where the copies go to wait for `relay-sched`.
    copies: Sender<Copy>,
    /// The number of the next copy, which breaks ties between copies due
    /// at the same time in the order they were scheduled.
    order: AtomicU64,
    /// One `relay-down` thread per client.
    down_threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What the relay did, per datagram.
#[derive(Default)]
struct Record {
    stats: RelayStats,
    /// Upstream datagrams dropped, in arrival order.
    lost_up: Vec<Vec<u8>>,
    /// Upstream datagrams with at least one copy sent, in the order of
    /// their first copy.
    delivered_up: Vec<Vec<u8>>,
    /// The same two for downstream datagrams.
    lost_down: Vec<Vec<u8>>,
    delivered_down: Vec<Vec<u8>>,
}

/// A datagram's direction and the socket and address its copies go by.
#[derive(Clone)]
enum Route {
    /// To the server, from the client's own upstream socket (connected to
    /// the server).
    Up(Arc<UdpSocket>),
    /// To the client at this address, from the relay's front socket.
    Down(SocketAddr),
}

/// One datagram on its way: all its copies share `payload` and `delivered`.
struct Datagram {
    route: Route,
    payload: Vec<u8>,
    /// Whether a copy has been sent, so the payload is recorded once.
    delivered: AtomicBool,
}

/// One copy of a datagram, due at a time; ordered by (due, arrival number)
/// so copies due together keep their order.
struct Copy {
    due: Instant,
    order: u64,
    datagram: Arc<Datagram>,
}

impl PartialEq for Copy {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Copy {}
impl PartialOrd for Copy {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Copy {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.order).cmp(&(other.due, other.order))
    }
}

impl Relay {
    /// Listens on 127.0.0.1:0 and forwards to `server`, and the server's
    /// replies back to each client. The upstream faults draw from a
    /// `StdRng` seeded with `seed`, the downstream ones from one seeded with
    /// `seed + 1`.
    pub fn start(server: SocketAddr, seed: u64, up: Faults, down: Faults) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("binding loopback works");
        front.set_read_timeout(Some(POLL)).unwrap();
        let addr = front.local_addr().unwrap();
        let (copies, copies_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            front,
            server,
            down_rng: Mutex::new(StdRng::seed_from_u64(seed.wrapping_add(1))),
            down_faults: down,
            record: Mutex::new(Record::default()),
            copies,
            order: AtomicU64::new(0),
            down_threads: Mutex::new(Vec::new()),
        });
        let upstream = {
            let shared = Arc::clone(&shared);
            let rng = StdRng::seed_from_u64(seed);
            thread::Builder::new()
                .name("relay-up".into())
                .spawn(move || read_clients(&shared, rng, up))
                .unwrap()
        };
        let scheduler = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("relay-sched".into())
                .spawn(move || send_when_due(&shared, &copies_rx))
                .unwrap()
        };
        Relay {
            addr,
            shared,
            threads: vec![upstream, scheduler],
        }
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counts so far, per direction.
    pub fn stats(&self) -> RelayStats {
        self.shared.record.lock().unwrap().stats
    }

    /// Client-to-server payloads the relay dropped, in arrival order.
    /// Datagrams still delayed are neither lost nor delivered yet.
    pub fn lost_upstream(&self) -> Vec<Vec<u8>> {
        self.shared.record.lock().unwrap().lost_up.clone()
    }

    /// Server-to-client payloads the relay dropped, in arrival order.
    pub fn lost_downstream(&self) -> Vec<Vec<u8>> {
        self.shared.record.lock().unwrap().lost_down.clone()
    }

    /// Client-to-server payloads delivered at least once.
    pub fn delivered_upstream(&self) -> Vec<Vec<u8>> {
        self.shared.record.lock().unwrap().delivered_up.clone()
    }

    /// Server-to-client payloads (acks) delivered at least once.
    pub fn delivered_downstream(&self) -> Vec<Vec<u8>> {
        self.shared.record.lock().unwrap().delivered_down.clone()
    }

    /// Waits up to `timeout` until nothing is delayed in either direction:
    /// every datagram read so far is lost or delivered. True if so.
    pub fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let record = self.shared.record.lock().unwrap();
                let s = record.stats;
                if s.up.received == s.up.dropped + record.delivered_up.len() as u64
                    && s.down.received == s.down.dropped + record.delivered_down.len() as u64
                {
                    return true;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
        // `relay-up` has ended, so no new `relay-down` thread can appear.
        let down = std::mem::take(&mut *self.shared.down_threads.lock().unwrap());
        for handle in down {
            let _ = handle.join();
        }
    }
}

/// `relay-up`: reads the clients' datagrams, opens an upstream socket (and
/// its `relay-down` thread) for each new client, and schedules the copies.
fn read_clients(shared: &Arc<Shared>, mut rng: StdRng, faults: Faults) {
    let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::Relaxed) {
        // Timeouts, and ICMP errors from a client that went away.
        let Ok((len, client)) = shared.front.recv_from(&mut buf) else {
            continue;
        };
        let socket = match upstream.entry(client) {
            Entry::Occupied(e) => Arc::clone(e.get()),
            Entry::Vacant(e) => {
                let socket = Arc::new(open_upstream(shared, client));
                Arc::clone(e.insert(socket))
            }
        };
        let datagram = Datagram {
            route: Route::Up(socket),
            payload: buf[..len].to_vec(),
            delivered: AtomicBool::new(false),
        };
        schedule(shared, &mut rng, &faults, datagram);
    }
}

/// A socket for `client`'s datagrams to the server, and the `relay-down`
/// thread that carries the server's replies on it back to `client`.
fn open_upstream(shared: &Arc<Shared>, client: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("binding loopback works");
    socket.connect(shared.server).unwrap();
    socket.set_read_timeout(Some(POLL)).unwrap();
    let reader = socket.try_clone().unwrap();
    let shared_down = Arc::clone(shared);
    let handle = thread::Builder::new()
        .name("relay-down".into())
        .spawn(move || read_server(&shared_down, &reader, client))
        .unwrap();
    shared.down_threads.lock().unwrap().push(handle);
    socket
}

/// `relay-down`: reads the server's replies to `client` and schedules
/// their copies.
fn read_server(shared: &Shared, socket: &UdpSocket, client: SocketAddr) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::Relaxed) {
        // Timeouts, and ICMP errors while the server is not listening.
        let Ok(len) = socket.recv(&mut buf) else {
            continue;
        };
        let datagram = Datagram {
            route: Route::Down(client),
            payload: buf[..len].to_vec(),
            delivered: AtomicBool::new(false),
        };
        let mut rng = shared.down_rng.lock().unwrap();
        schedule(shared, &mut rng, &shared.down_faults, datagram);
    }
}

/// `relay-sched`: sends each copy when it is due.
fn send_when_due(shared: &Shared, copies: &Receiver<Copy>) {
    let mut pending = BinaryHeap::new();
    while !shared.stop.load(Ordering::Relaxed) {
        send_due(shared, &mut pending);
        let wait = pending.peek().map_or(POLL, |Reverse(c): &Reverse<Copy>| {
            c.due.saturating_duration_since(Instant::now()).min(POLL)
        });
        match copies.recv_timeout(wait) {
            Ok(copy) => pending.push(Reverse(copy)),
            Err(RecvTimeoutError::Timeout) => {}
            // `shared` holds a sender as long as this thread runs.
            Err(RecvTimeoutError::Disconnected) => unreachable!(),
        }
    }
}

/// Sends every copy in `pending` that is due, recording each datagram's
/// first delivered copy.
fn send_due(shared: &Shared, pending: &mut BinaryHeap<Reverse<Copy>>) {
    let now = Instant::now();
    while pending.peek().is_some_and(|Reverse(c)| c.due <= now) {
        // peek() just found it.
        let Reverse(copy) = pending.pop().unwrap();
        let datagram = &copy.datagram;
        let sent = match &datagram.route {
            Route::Up(socket) => socket.send(&datagram.payload),
            Route::Down(client) => shared.front.send_to(&datagram.payload, client),
        };
        // A send that fails (an ICMP error pending on the socket) is a
        // loss the network might have caused too; it is not counted.
        if sent.is_err() {
            continue;
        }
        let mut record = shared.record.lock().unwrap();
        let first = !datagram.delivered.swap(true, Ordering::Relaxed);
        match datagram.route {
            Route::Up(_) => {
                record.stats.up.forwarded += 1;
                if first {
                    record.delivered_up.push(datagram.payload.clone());
                }
            }
            Route::Down(_) => {
                record.stats.down.forwarded += 1;
                if first {
                    record.delivered_down.push(datagram.payload.clone());
                }
            }
        }
    }
}

/// Draws one datagram's fate, always the same four numbers in the same
/// order so that a seed's decisions do not depend on earlier outcomes;
/// counts it, records it if dropped, and hands its copies to `relay-sched`.
fn schedule(shared: &Shared, rng: &mut StdRng, faults: &Faults, datagram: Datagram) {
    let dropped = rng.random_bool(faults.drop);
    let duplicated = rng.random_bool(faults.duplicate);
    let max = faults.max_delay.as_nanos() as u64;
    let delays = [rng.random_range(0..=max), rng.random_range(0..=max)];
    let now = Instant::now();
    let mut record = shared.record.lock().unwrap();
    let record = &mut *record;
    let (stats, lost) = match datagram.route {
        Route::Up(_) => (&mut record.stats.up, &mut record.lost_up),
        Route::Down(_) => (&mut record.stats.down, &mut record.lost_down),
    };
    stats.received += 1;
    if dropped {
        stats.dropped += 1;
        lost.push(datagram.payload);
        return;
    }
    let copies = if duplicated {
        stats.duplicated += 1;
        2
    } else {
        1
    };
    let datagram = Arc::new(datagram);
    for nanos in &delays[..copies] {
        // `relay-sched` holds the receiver until the relay is dropped, and
        // a copy sent after that is one the relay no longer delivers.
        let _ = shared.copies.send(Copy {
            due: now + Duration::from_nanos(*nanos),
            order: shared.order.fetch_add(1, Ordering::Relaxed),
            datagram: Arc::clone(&datagram),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A loopback server that sends every datagram back where it came
    /// from, until dropped.
    struct Echo {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Echo {
        fn start() -> Echo {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.set_read_timeout(Some(POLL)).unwrap();
            let addr = socket.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let thread = thread::spawn(move || {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..len], from);
                    }
                }
            });
            Echo {
                addr,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Sends `n` distinct datagrams through `relay` from one socket, a
    /// little apart, and returns the payloads and what came back within
    /// `wait` after the last.
    fn exchange(relay: &Relay, n: usize, wait: Duration) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(POLL)).unwrap();
        let sent: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("datagram {i}").into_bytes())
            .collect();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        for payload in &sent {
            client.send_to(payload, relay.addr()).unwrap();
            // Slower than loopback drops in a full receive buffer.
            thread::sleep(Duration::from_micros(200));
            client.set_nonblocking(true).unwrap();
            while let Ok(len) = client.recv(&mut buf) {
                got.push(buf[..len].to_vec());
            }
            client.set_nonblocking(false).unwrap();
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(len) = client.recv(&mut buf) {
                got.push(buf[..len].to_vec());
            }
        }
        (sent, got)
    }

    /// Without faults every datagram goes there and back once, in order.
    #[test]
    fn relay_without_faults_delivers_everything_in_order() {
        let echo = Echo::start();
        let relay = Relay::start(echo.addr, 1, Faults::NONE, Faults::NONE);
        let (sent, got) = exchange(&relay, 300, Duration::from_millis(300));
        assert_eq!(got, sent);
        assert!(relay.settle(Duration::from_secs(5)));
        let all = DirectionStats {
            received: 300,
            forwarded: 300,
            dropped: 0,
            duplicated: 0,
        };
        assert_eq!(relay.stats(), RelayStats { up: all, down: all });
        assert!(relay.lost_upstream().is_empty());
        assert_eq!(relay.delivered_upstream(), sent);
        assert_eq!(relay.delivered_downstream(), sent);
    }

    /// With loss, duplicates and reordering both ways, every datagram the
    /// relay read is either lost or delivered, the echo server sees each
    /// delivered copy, and the client gets exactly the delivered replies.
    #[test]
    fn relay_accounts_for_every_datagram() {
        let echo = Echo::start();
        let faults = Faults {
            drop: 0.2,
            duplicate: 0.1,
            max_delay: Duration::from_millis(20),
        };
        let relay = Relay::start(echo.addr, 7, faults, faults);
        let (sent, got) = exchange(&relay, 1000, Duration::from_millis(500));
        assert!(relay.settle(Duration::from_secs(5)));
        let stats = relay.stats();
        let (lost, delivered) = (relay.lost_upstream(), relay.delivered_upstream());

        assert_eq!(stats.up.received, 1000);
        assert_eq!(stats.up.dropped, lost.len() as u64);
        assert_eq!(lost.len() + delivered.len(), 1000);
        let lost_set: HashSet<_> = lost.iter().collect();
        let delivered_set: HashSet<_> = delivered.iter().collect();
        assert!(lost_set.is_disjoint(&delivered_set));
        assert_eq!(
            &lost_set | &delivered_set,
            sent.iter().collect::<HashSet<_>>()
        );
        assert_eq!(
            stats.up.forwarded,
            stats.up.received - stats.up.dropped + stats.up.duplicated
        );
        // Each copy delivered upstream was echoed once.
        assert_eq!(stats.down.received, stats.up.forwarded);
        assert_eq!(
            stats.down.forwarded,
            stats.down.received - stats.down.dropped + stats.down.duplicated
        );
        assert_eq!(got.len() as u64, stats.down.forwarded);
        let got_set: HashSet<_> = got.iter().collect();
        let down: HashSet<_> = relay.delivered_downstream().iter().cloned().collect();
        assert_eq!(got_set, down.iter().collect::<HashSet<_>>());
        // The faults happened at about the rates asked for.
        assert!((120..=280).contains(&stats.up.dropped), "{stats:?}");
        assert!(
            stats.up.duplicated > 30 && stats.down.duplicated > 20,
            "{stats:?}"
        );
        // Some replies arrived out of order.
        let order: Vec<usize> = got
            .iter()
            .map(|p| String::from_utf8_lossy(&p[9..]).parse().unwrap())
            .collect();
        assert!(order.windows(2).any(|w| w[0] > w[1]));
    }

    /// The same seed drops the same datagrams of the same sequence; another
    /// seed drops others.
    #[test]
    fn relay_same_seed_same_decisions() {
        let echo = Echo::start();
        let faults = Faults {
            drop: 0.3,
            duplicate: 0.2,
            max_delay: Duration::from_millis(5),
        };
        let run = |seed| {
            let relay = Relay::start(echo.addr, seed, faults, Faults::NONE);
            exchange(&relay, 200, Duration::from_millis(100));
            assert!(relay.settle(Duration::from_secs(5)));
            (relay.lost_upstream(), relay.stats().up)
        };
        let first = run(42);
        assert_eq!(run(42), first);
        assert_ne!(run(43).0, first.0);
    }
}
