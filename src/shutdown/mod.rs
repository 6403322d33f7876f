//! The whole shutdown path: the trigger shared by every thread (a count of
//! stop requests, and a wake-up that blocked threads wait on), and in
//! `guard` the `ShutdownGuard` whose drop is the final flush.

pub mod guard;

pub use guard::{FlushReport, ShutdownGuard, Worker};

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counts stop requests (SIGINT/SIGTERM, or an internal failure). The first
/// asks for a graceful stop; a second one while stopping means "get out now".
///
/// Each request also writes a byte to a socket pair that is never read, so
/// from the first request on its read end polls readable: a thread blocked
/// in `wait`, or polling `wake_fd` beside its own descriptors, wakes at
/// once instead of at its next timeout.
#[derive(Clone, Debug)]
pub struct Shutdown {
    /// Incremented by signal handlers, so it must stay a bare atomic.
    requests: Arc<AtomicUsize>,
    /// Written on every request, never read: polls readable once stopping.
    wake: Arc<Wake>,
}

#[derive(Debug)]
struct Wake {
    /// What waiting threads poll.
    read: UnixStream,
    /// Non-blocking: a request never waits for room, and one byte is enough.
    write: UnixStream,
}

impl Shutdown {
    pub fn new() -> io::Result<Self> {
        let (read, write) = UnixStream::pair()?;
        write.set_nonblocking(true)?;
        Ok(Shutdown {
            requests: Arc::new(AtomicUsize::new(0)),
            wake: Arc::new(Wake { read, write }),
        })
    }

    /// What a signal handler does: count the request, then wake waiters.
    /// Only an atomic add and a `write`, both async-signal-safe.
    pub fn signal_action(&self) -> impl Fn() + Send + Sync + 'static {
        let requests = Arc::clone(&self.requests);
        let wake = Arc::clone(&self.wake);
        move || {
            requests.fetch_add(1, Ordering::SeqCst);
            // SAFETY: the descriptor is open and non-blocking while `wake`
            // lives, and this closure owns a reference to it; a full buffer
            // or any error is ignored, as one byte already wakes everyone.
            unsafe {
                libc::write(wake.write.as_raw_fd(), b"x".as_ptr().cast(), 1);
            }
        }
    }

    /// Asks for a stop, as a signal would.
    pub fn trigger(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        // Full (many requests) is fine: the reader is already woken.
        let _ = (&self.wake.write).write(b"x");
    }

    /// True once any stop was requested.
    pub fn requested(&self) -> bool {
        self.requests.load(Ordering::SeqCst) >= 1
    }

    /// True once a second stop was requested: abandon slow work.
    pub fn forced(&self) -> bool {
        self.requests.load(Ordering::SeqCst) >= 2
    }

    /// Polls readable from the first request on, for threads that wait on
    /// other descriptors too.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.read.as_fd()
    }

    /// Waits up to `timeout` for a stop request; returns `requested()`.
    pub fn wait(&self, timeout: Duration) -> bool {
        // An error (EINTR) just ends the wait early.
        let _ = poll_readable(&[self.wake_fd()], timeout);
        self.requested()
    }
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which
/// are readable. An interrupted wait returns none.
pub fn poll_readable<const N: usize>(
    fds: &[BorrowedFd<'_>; N],
    timeout: Duration,
) -> io::Result<[bool; N]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    // Rounded up: a wait of 0.3 ms must not become a busy poll.
    let millis =
        libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `polled` is an array of N initialised pollfds.
    let ready = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, millis) };
    if ready < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(polled.map(|p| p.revents != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A trigger from another thread ends a long wait at once, and the wake
    /// stays set for later waits.
    #[test]
    fn trigger_wakes_a_waiting_thread() {
        let shutdown = Shutdown::new().unwrap();
        assert!(!shutdown.wait(Duration::from_millis(1)));
        let started = Instant::now();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                shutdown.trigger();
            });
            assert!(shutdown.wait(Duration::from_secs(60)));
        });
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(shutdown.wait(Duration::from_secs(60)));
        assert!(!shutdown.forced());
        (shutdown.signal_action())();
        assert!(shutdown.forced());
    }
}
