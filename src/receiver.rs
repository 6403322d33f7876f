//! The UDP receive loop: takes datagrams from the socket, parses them, and
//! hands readings to the persister in chunks. Knows sockets and the channel,
//! never the database.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};
use ipnet::{IpNet, Ipv4Net};
use log::{debug, info, warn};

use crate::acks::{AckRequest, Chunk};
use crate::datagrams::Datagrams;
use crate::error;
use crate::error::Error;
use crate::ledger::Ledger;
use crate::reading::{Format, Rejection, parse_datagram};
use crate::shutdown::{Shutdown, poll_readable};

/// How long a receiver holding a chunk the full queue refused waits before
/// offering it again, and how often a blocked send looks at the shutdown
/// trigger.
const POLL: Duration = Duration::from_millis(100);
/// The longest an idle receiver waits: a safety net only, as datagrams and
/// stop requests wake it.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// The longest a stop spends reading what the socket holds. Past it, the
/// rest is read without parsing and counted as unread.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Binds `addr` and asks the kernel for a `recv_buffer`-byte receive buffer,
/// logging what it granted.
pub fn bind(addr: SocketAddr, recv_buffer: usize) -> Result<UdpSocket, Error> {
    let socket = UdpSocket::bind(addr).map_err(|source| Error::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let granted = set_recv_buffer(&socket, recv_buffer).map_err(|source| Error::Io {
        what: "set the receive buffer size",
        source,
    })?;
    // Linux grants double what it is asked (its bookkeeping share), capped
    // at net.core.rmem_max without CAP_NET_ADMIN.
    let wanted = recv_buffer.min(libc::c_int::MAX as usize / 2) * 2;
    if granted > 0 && granted < wanted {
        warn!(
            "receive buffer: asked for {recv_buffer} bytes, kernel granted only {granted} \
             (net.core.rmem_max caps it without CAP_NET_ADMIN); bursts beyond it are dropped \
             and counted in kernel_drops. Raise the cap: sysctl -w net.core.rmem_max={recv_buffer}"
        );
    } else {
        info!("receive buffer: asked for {recv_buffer} bytes, kernel granted {granted}");
    }
    Ok(socket)
}

/// How full the socket's receive buffer is, in thousandths of its size, by
/// the kernel's own accounting (SO_MEMINFO); None where unknown.
#[cfg(target_os = "linux")]
fn receive_buffer_fill(socket: &UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // asm-generic's value (x86, ARM, RISC-V); not exported by libc.
    const SO_MEMINFO: libc::c_int = 55;
    let mut info = [0u32; 16];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: fd is an open socket; `info` and `len` describe a live
    // buffer the kernel fills up to `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let (alloc, size) = (
        info[libc::SK_MEMINFO_RMEM_ALLOC as usize],
        info[libc::SK_MEMINFO_RCVBUF as usize],
    );
    (rc == 0 && size > 0).then(|| u64::from(alloc) * 1000 / u64::from(size))
}

#[cfg(not(target_os = "linux"))]
fn receive_buffer_fill(_socket: &UdpSocket) -> Option<u64> {
    None
}

/// Sets SO_RCVBUF, trying SO_RCVBUFFORCE first (it lifts the
/// `net.core.rmem_max` cap when we have CAP_NET_ADMIN), and returns the size
/// granted. Linux reports double the size asked for: its bookkeeping share.
#[cfg(target_os = "linux")]
fn set_recv_buffer(socket: &UdpSocket, bytes: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd is an open socket for the call's duration; value and size
    // describe a live c_int.
    unsafe {
        let set = |option| {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                size,
            )
        };
        if set(libc::SO_RCVBUFFORCE) != 0 && set(libc::SO_RCVBUF) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut granted: libc::c_int = 0;
        let mut len = size;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw mut granted).cast(),
            &mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(granted).unwrap_or(0))
    }
}

#[cfg(not(target_os = "linux"))]
fn set_recv_buffer(_socket: &UdpSocket, _bytes: usize) -> io::Result<usize> {
    Ok(0)
}

/// The socket's kernel drop counter: the last column of its row in
/// /proc/net/udp or /proc/net/udp6, found by the socket's inode. Zero where
/// that is not available.
pub fn kernel_drops(socket: &UdpSocket) -> u64 {
    kernel_drops_linux(socket).unwrap_or(0)
}

#[cfg(target_os = "linux")]
fn kernel_drops_linux(socket: &UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
        .ok()?
        .ino();
    let inode = inode.to_string();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let columns: Vec<&str> = line.split_whitespace().collect();
            // Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            if columns.get(9) == Some(&inode.as_str()) {
                return columns.last()?.parse().ok();
            }
        }
    }
    None
}

/// Attaches a classic BPF filter that accepts nothing: the kernel then
/// drops every datagram that arrives for the socket, counting it in the
/// socket's drop counter, and leaves what is already queued readable.
#[cfg(target_os = "linux")]
fn refuse_new_datagrams(socket: &UdpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // `ret #0`: keep zero bytes of the packet, which drops it.
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the fd is open for the call's duration; `fprog` points to a
    // live one-instruction program, which the kernel copies.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn refuse_new_datagrams(_socket: &UdpSocket) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(not(target_os = "linux"))]
fn kernel_drops_linux(_socket: &UdpSocket) -> Option<u64> {
    None
}

/// One `--allow` entry: a network, IPv4 where it names IPv4 addresses
/// (`::ffff:10.0.0.0/104` is `10.0.0.0/8`), as sources are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ipv4_if_mapped(ip))
    }
}

/// A dual-stack socket reports IPv4 peers as `::ffff:a.b.c.d`.
fn ipv4_if_mapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let net: IpNet = match text.parse() {
            Ok(net) => net,
            Err(_) => text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                format!("`{text}` is not an address or network like 10.0.0.0/8 or fd00::/8")
            })?,
        };
        let net = match net {
            IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                Some(v4) => IpNet::V4(
                    Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of 96..=128, less 96"),
                ),
                None => net,
            },
            other => other,
        };
        Ok(Cidr(net.trunc()))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Lets at most one log line through per second, counting the rest.
#[derive(Debug)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    const fn new() -> Self {
        RateLimit {
            last: None,
            suppressed: 0,
        }
    }

    /// Returns how many were suppressed since the last line if a line may be
    /// logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Returns how many were suppressed if a second has passed since the
    /// last line, so a count is never held back waiting for the next event.
    fn overdue(&mut self) -> Option<u64> {
        // Nothing suppressed (the usual case) costs no clock read.
        if self.suppressed == 0
            || self
                .last
                .is_none_or(|last| last.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last = None;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// How the receiver sizes its work, and whom it takes datagrams from.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Readings per chunk handed to the persister.
    pub chunk_size: usize,
    /// The most readings a stop's drain keeps.
    pub drain_limit: usize,
    /// Sources allowed to send; empty means everyone.
    pub allow: Vec<Cidr>,
    /// How datagrams are read (`--timestamp-unit`, `--extra-fields`).
    pub format: Format,
    /// Whether datagrams with sequenced readings are to be acknowledged.
    pub acks: bool,
}

/// The receive loop's state; `run` consumes it on the `receiver` thread.
pub struct Receiver {
    socket: UdpSocket,
    /// Chunks of readings for the persister.
    tx: Sender<Chunk>,
    /// The persister's thread, unparked when the queue passes half full
    /// (it sleeps while its batch is not yet due).
    persister: Thread,
    /// A chunk is sent once it holds this many readings, or when the socket
    /// has nothing more to read.
    chunk_size: usize,
    /// The most readings a stop's drain keeps (`--queue-capacity`), so
    /// memory stays within the README's bound through a stop.
    drain_limit: usize,
    /// Sources allowed to send; empty means everyone.
    allow: Vec<Cidr>,
    /// How datagrams are read.
    format: Format,
    /// Whether to note the acks datagrams are owed (`--acks on`).
    acks: bool,
    ledger: Arc<Ledger>,
    shutdown: Shutdown,
    /// One rate limit per rejection reason, and one for denied sources.
    rejection_logs: [RateLimit; Rejection::KINDS],
    denied_log: RateLimit,
    error_log: RateLimit,
}

impl Receiver {
    pub fn new(
        socket: UdpSocket,
        tx: Sender<Chunk>,
        persister: Thread,
        settings: Settings,
        ledger: Arc<Ledger>,
        shutdown: Shutdown,
    ) -> Self {
        Receiver {
            socket,
            tx,
            persister,
            chunk_size: settings.chunk_size.max(1),
            drain_limit: settings.drain_limit.max(1),
            allow: settings.allow,
            format: settings.format,
            acks: settings.acks,
            ledger,
            shutdown,
            rejection_logs: [const { RateLimit::new() }; Rejection::KINDS],
            denied_log: RateLimit::new(),
            error_log: RateLimit::new(),
        }
    }

    /// Receives until shutdown, then reads what the kernel held for the
    /// socket when the stop came (see `drain`). Returns the readings it
    /// could not hand to the persister (the tail), for the final flush.
    pub fn run(mut self) -> Result<Chunk, Error> {
        // Reads never block: `wait_readable` does the waiting.
        self.socket
            .set_nonblocking(true)
            .map_err(|source| Error::Io {
                what: "make the socket non-blocking",
                source,
            })?;
        let mut datagrams = Datagrams::new();
        let mut rejections = Vec::new();
        let mut chunk = Chunk::with_capacity(self.chunk_size);
        while !self.shutdown.requested() {
            self.log_suppressed();
            let wait = if chunk.is_empty() { IDLE_POLL } else { POLL };
            if datagrams.pending() > 0 || self.wait_readable(wait) {
                // Take everything already waiting, so a burst becomes one
                // chunk and one wake-up of the persister.
                self.read_waiting(&mut datagrams, &mut chunk, &mut rejections, self.chunk_size);
            }
            // After POLL without datagrams, this retries handing over a
            // chunk kept below.
            if chunk.is_empty() {
                continue;
            }
            if chunk.len() < self.chunk_size {
                // A persister that is behind (the queue is full) lets small
                // chunks grow, so --queue-capacity counts readings, not the
                // datagrams of a trickle; a full chunk waits for room below.
                let sent = chunk.len();
                match self.tx.try_send(std::mem::take(&mut chunk)) {
                    // The next is likely as small: a trickle's chunks of one
                    // reading each would otherwise each allocate a full
                    // chunk (40 KiB), which the allocator hands back to the
                    // kernel when the persister frees it, and faults in again.
                    Ok(()) => chunk = Chunk::with_capacity(sent),
                    Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => {
                        chunk = back;
                    }
                }
                self.wake_if_filling();
                continue;
            }
            let full = std::mem::replace(&mut chunk, Chunk::with_capacity(self.chunk_size));
            if let Some(unsent) = self.hand_over(full) {
                chunk = unsent;
                break;
            }
        }
        self.drain(&mut datagrams, &mut chunk, &mut rejections);
        Ok(chunk)
    }

    /// Stopping: what the kernel already holds was received, so it is kept,
    /// but only that. A socket filter that accepts nothing is attached
    /// first: from then on the kernel turns datagrams away and counts them
    /// as drops on the socket, which the shutdown line reports as `unread`,
    /// so a flood during the stop can neither prolong it nor grow memory.
    /// The drain keeps at most `drain_limit` readings and runs at most
    /// `DRAIN_TIME`; what the socket still holds then is read without
    /// parsing and counted as unread.
    fn drain(
        &mut self,
        datagrams: &mut Datagrams,
        chunk: &mut Chunk,
        rejections: &mut Vec<Rejection>,
    ) {
        match refuse_new_datagrams(&self.socket) {
            // Plus one: zero means "not stopping".
            Ok(()) => self
                .ledger
                .drops_at_stop
                .store(kernel_drops(&self.socket) + 1, Ordering::Relaxed),
            Err(e) => warn!(
                "cannot attach a socket filter ({}); the drain is bounded by time and count only",
                error::io_cause(&e)
            ),
        }
        let deadline = Instant::now() + DRAIN_TIME;
        let limit = chunk.len().max(self.drain_limit);
        let mut drained = 0;
        while chunk.len() < limit && Instant::now() < deadline {
            let before = drained;
            drained += self.read_waiting(datagrams, chunk, rejections, limit);
            if drained == before && datagrams.pending() == 0 {
                break;
            }
        }
        // The rest, up to a bound: the filter stops new arrivals, and without
        // it (no filter) the deadline does.
        let deadline = Instant::now() + DRAIN_TIME;
        let mut discarded = datagrams.discard_pending();
        while Instant::now() < deadline {
            match datagrams.recv(&self.socket) {
                Ok(_) => discarded += datagrams.discard_pending(),
                Err(_) => break,
            }
        }
        Ledger::add(&self.ledger.discarded, discarded);
        if discarded > 0 {
            warn!(
                "stopped receiving; read {drained} datagrams still queued in the socket, and \
                 left {discarded} unread (the drain keeps at most --queue-capacity readings)"
            );
        } else {
            info!("stopped receiving; read {drained} datagrams still queued in the socket");
        }
    }

    /// Handles the datagrams already received, then reads those the socket
    /// already holds, without blocking, until it has none or `chunk` holds
    /// `limit` readings (one datagram holding an array can take it past).
    /// Returns how many datagrams it handled; any left stay pending.
    fn read_waiting(
        &mut self,
        datagrams: &mut Datagrams,
        chunk: &mut Chunk,
        rejections: &mut Vec<Rejection>,
        limit: usize,
    ) -> u64 {
        // Sampled once per chunk, before reading: the buffer is fullest then.
        if let Some(fill) = receive_buffer_fill(&self.socket) {
            self.ledger.buffer_peak.fetch_max(fill, Ordering::Relaxed);
        }
        let mut handled = 0;
        loop {
            let received_at = datagrams.received_at();
            while chunk.len() < limit {
                let Some((datagram, source)) = datagrams.take() else {
                    break;
                };
                self.handle(datagram, source, received_at, chunk, rejections);
                handled += 1;
            }
            if chunk.len() >= limit {
                return handled;
            }
            match datagrams.recv(&self.socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return handled,
                Err(e) => {
                    self.log_error(&e);
                    return handled;
                }
            }
        }
    }

    /// Waits up to `timeout` for a datagram or a stop request; true if the
    /// socket has something to read.
    fn wait_readable(&mut self, timeout: Duration) -> bool {
        let fds = [self.socket.as_fd(), self.shutdown.wake_fd()];
        match poll_readable(&fds, timeout) {
            Ok([socket, _]) => socket,
            Err(e) => {
                self.log_error(&e);
                false
            }
        }
    }

    /// Sends a chunk to the persister, waiting while the channel is full.
    /// Gives the chunk back if shutdown is requested meanwhile.
    fn hand_over(&self, mut chunk: Chunk) -> Option<Chunk> {
        loop {
            self.wake_if_filling();
            match self.tx.send_timeout(chunk, POLL) {
                Ok(()) => {
                    self.wake_if_filling();
                    return None;
                }
                Err(SendTimeoutError::Timeout(back)) if !self.shutdown.requested() => chunk = back,
                Err(SendTimeoutError::Timeout(back) | SendTimeoutError::Disconnected(back)) => {
                    return Some(back);
                }
            }
        }
    }

    /// Wakes the persister once the queue is half full, so a burst is
    /// taken in batches well before the queue blocks the receiver.
    fn wake_if_filling(&self) {
        let capacity = self.tx.capacity().unwrap_or(usize::MAX);
        if self.tx.len() * 2 >= capacity {
            self.persister.unpark();
        }
    }

    fn handle(
        &mut self,
        datagram: &[u8],
        source: SocketAddr,
        received_at: f64,
        chunk: &mut Chunk,
        rejections: &mut Vec<Rejection>,
    ) {
        if !self.allow.is_empty() && !self.allow.iter().any(|cidr| cidr.contains(source.ip())) {
            Ledger::add(&self.ledger.denied, 1);
            if let Some(suppressed) = self.denied_log.allow() {
                warn!(
                    "denied datagram from {source}: not in --allow{}",
                    suppressed_note(suppressed)
                );
            }
            return;
        }
        Ledger::add(&self.ledger.received, 1);
        let before = chunk.len();
        parse_datagram(
            datagram,
            received_at,
            &self.format,
            &mut chunk.readings,
            rejections,
        );
        let parsed = &chunk.readings[before..];
        Ledger::add(&self.ledger.accepted, parsed.len() as u64);
        if self.acks
            && let Some(request) = AckRequest::of(source, datagram.len(), parsed)
        {
            chunk.acks.push(request);
        }
        for rejection in rejections.drain(..) {
            self.ledger.count_rejection(rejection);
            if let Some(suppressed) = self.rejection_logs[rejection.index()].allow() {
                warn!(
                    "rejected reading from {source}: {rejection}{}",
                    suppressed_note(suppressed)
                );
            } else {
                debug!("rejected reading from {source}: {rejection}");
            }
        }
    }

    /// Logs the counts of lines suppressed more than a second ago. Called
    /// once per wake of the receive loop, not per datagram.
    fn log_suppressed(&mut self) {
        for (index, limit) in self.rejection_logs.iter_mut().enumerate() {
            if let Some(n) = limit.overdue() {
                warn!(
                    "rejected {n} more {} ({}; similar lines suppressed)",
                    if n == 1 { "reading" } else { "readings" },
                    Rejection::kind_name(index).replace('_', " ")
                );
            }
        }
        if let Some(n) = self.denied_log.overdue() {
            warn!(
                "denied {} more from sources not in --allow (similar lines suppressed)",
                crate::ledger::count(n, "datagram")
            );
        }
        if let Some(n) = self.error_log.overdue() {
            warn!("{} more receive failures (similar lines suppressed)", n);
        }
    }

    /// Logs a failed receive (rate-limited) and pauses for POLL, so an
    /// error that repeats at once does not spin the thread.
    fn log_error(&mut self, e: &io::Error) {
        if let Some(suppressed) = self.error_log.allow() {
            warn!(
                "receive failed: {}{}",
                error::io_cause(e),
                suppressed_note(suppressed)
            );
        }
        self.shutdown.wait(POLL);
    }
}

fn suppressed_note(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} similar lines suppressed)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CIDR parsing and matching, including IPv4-mapped IPv6 peers.
    #[test]
    fn cidr_matching() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let host: Cidr = "127.0.0.1".parse().unwrap();
        assert!(host.contains("127.0.0.1".parse().unwrap()));
        assert!(!host.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let odd: Cidr = "192.168.1.128/25".parse().unwrap();
        assert!(odd.contains("192.168.1.200".parse().unwrap()));
        assert!(!odd.contains("192.168.1.100".parse().unwrap()));
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        let mapped: Cidr = "::ffff:127.0.0.1/128".parse().unwrap();
        assert!(mapped.contains("127.0.0.1".parse().unwrap()));
        assert!(mapped.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert_eq!(mapped.to_string(), "127.0.0.1/32");
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.contains("10.200.0.1".parse().unwrap()));
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }
}
