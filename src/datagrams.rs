//! Receiving many datagrams per system call (`recvmmsg` on Linux).
//!
//! Under load the receiver spends about half its time in the kernel; one
//! call for up to `SLOTS` datagrams instead of one call each takes the
//! per-call part of that (entry, exit, file lookup) off every datagram.
//! Elsewhere the same interface reads one datagram per call.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use crate::reading::unix_now;

/// Datagrams taken per call. Each slot is a full 64 KiB buffer, but only
/// the pages a datagram touches become resident: 32 small readings cost
/// 128 KiB.
pub const SLOTS: usize = 32;

/// The largest UDP payload, and so each slot's size.
const MAX_DATAGRAM: usize = 65_536;

/// Receive buffers for up to `SLOTS` datagrams, and those the last call
/// received that have not been taken yet.
pub struct Datagrams {
    /// `SLOTS` buffers of `MAX_DATAGRAM` bytes, one after another.
    bufs: Box<[u8]>,
    /// Length and source of each datagram the last call received.
    received: Vec<(usize, SocketAddr)>,
    /// How many of `received` were taken.
    taken: usize,
    /// When the last call returned, as unix seconds.
    received_at: f64,
    /// The kernel's view of `bufs`, reused by every call.
    #[cfg(target_os = "linux")]
    sys: linux::Headers,
}

impl Datagrams {
    pub fn new() -> Self {
        let mut bufs = vec![0u8; SLOTS * MAX_DATAGRAM].into_boxed_slice();
        Datagrams {
            #[cfg(target_os = "linux")]
            sys: linux::Headers::new(&mut bufs),
            bufs,
            received: Vec::with_capacity(SLOTS),
            taken: 0,
            received_at: 0.0,
        }
    }

    /// Receives up to `SLOTS` datagrams without blocking, replacing any
    /// not yet taken; fails with `WouldBlock` if none is waiting. The
    /// socket must be non-blocking (the receiver makes it so once) where
    /// there is no `recvmmsg`.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received.clear();
        self.taken = 0;
        #[cfg(target_os = "linux")]
        self.sys.recv(socket, &mut self.received)?;
        #[cfg(not(target_os = "linux"))]
        {
            let (len, source) = socket.recv_from(&mut self.bufs[..MAX_DATAGRAM])?;
            self.received.push((len, source));
        }
        self.received_at = unix_now();
        Ok(self.received.len())
    }

    /// How many received datagrams were not taken yet.
    pub fn pending(&self) -> usize {
        self.received.len() - self.taken
    }

    /// Takes the next received datagram, with its source (the unspecified
    /// address if the kernel gave a family sensord does not know).
    pub fn take(&mut self) -> Option<(&[u8], SocketAddr)> {
        let &(len, source) = self.received.get(self.taken)?;
        let start = self.taken * MAX_DATAGRAM;
        self.taken += 1;
        Some((&self.bufs[start..start + len], source))
    }

    /// Drops the received datagrams not taken yet; returns how many.
    pub fn discard_pending(&mut self) -> u64 {
        let pending = self.pending();
        self.taken = self.received.len();
        pending as u64
    }

    /// When the last `recv` returned, as unix seconds: the receive time of
    /// every datagram it took.
    pub fn received_at(&self) -> f64 {
        self.received_at
    }
}

impl Default for Datagrams {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::mem;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
    use std::os::fd::AsRawFd;

    use super::{MAX_DATAGRAM, SLOTS};

    /// `recvmmsg`'s headers. They point into the buffers and into
    /// themselves, all boxed, so moving `Headers` leaves them valid.
    pub struct Headers {
        /// One per slot: where its datagram goes.
        iovs: Box<[libc::iovec]>,
        /// One per slot: where the kernel writes the datagram's source.
        addrs: Box<[libc::sockaddr_storage]>,
        /// One per slot, pointing at its `iovs` and `addrs` entries; the
        /// kernel writes each datagram's length into it.
        msgs: Box<[libc::mmsghdr]>,
    }

    impl Headers {
        pub fn new(bufs: &mut [u8]) -> Self {
            assert_eq!(bufs.len(), SLOTS * MAX_DATAGRAM);
            let mut iovs: Box<[libc::iovec]> = bufs
                .chunks_exact_mut(MAX_DATAGRAM)
                .map(|slot| libc::iovec {
                    iov_base: slot.as_mut_ptr().cast(),
                    iov_len: slot.len(),
                })
                .collect();
            // SAFETY: sockaddr_storage and mmsghdr are plain C structs for
            // which all zeroes is a valid value.
            let mut addrs: Box<[libc::sockaddr_storage]> =
                (0..SLOTS).map(|_| unsafe { mem::zeroed() }).collect();
            let msgs = (0..SLOTS)
                .map(|i| {
                    let mut msg: libc::mmsghdr = unsafe { mem::zeroed() };
                    msg.msg_hdr.msg_iov = &raw mut iovs[i];
                    msg.msg_hdr.msg_iovlen = 1;
                    msg.msg_hdr.msg_name = (&raw mut addrs[i]).cast();
                    msg
                })
                .collect();
            Headers { iovs, addrs, msgs }
        }

        pub fn recv(
            &mut self,
            socket: &UdpSocket,
            received: &mut Vec<(usize, SocketAddr)>,
        ) -> io::Result<()> {
            debug_assert_eq!(self.iovs.len(), SLOTS);
            for msg in self.msgs.iter_mut() {
                msg.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
                msg.msg_hdr.msg_controllen = 0;
                msg.msg_hdr.msg_flags = 0;
                msg.msg_len = 0;
            }
            // SAFETY: the headers point at live, exclusively borrowed
            // buffers and addresses of the sizes they declare.
            let n = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    self.msgs.as_mut_ptr(),
                    SLOTS as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for (msg, addr) in self.msgs.iter().zip(self.addrs.iter()).take(n as usize) {
                received.push((msg.msg_len as usize, socket_addr(addr)));
            }
            Ok(())
        }
    }

    fn socket_addr(addr: &libc::sockaddr_storage) -> SocketAddr {
        match i32::from(addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let v4 = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                    u16::from_be(v4.sin_port),
                ))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let v6 = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(v6.sin6_addr.s6_addr),
                    u16::from_be(v6.sin6_port),
                    v6.sin6_flowinfo,
                    v6.sin6_scope_id,
                ))
            }
            _ => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `count` datagrams of different sizes from two sockets, then
    /// takes them all: contents, lengths and sources come back intact,
    /// `SLOTS` per call at most.
    fn round_trip(localhost: &str) {
        let Ok(server) = UdpSocket::bind(format!("{localhost}:0")) else {
            eprintln!("{localhost} is not available here; skipping");
            return;
        };
        server.set_nonblocking(true).unwrap();
        let senders = [
            UdpSocket::bind(format!("{localhost}:0")).unwrap(),
            UdpSocket::bind(format!("{localhost}:0")).unwrap(),
        ];
        let count = SLOTS + 7;
        let payload = |i: usize| vec![b'a' + (i % 26) as u8; 1 + i * 97];
        for i in 0..count {
            senders[i % 2]
                .send_to(&payload(i), server.local_addr().unwrap())
                .unwrap();
        }
        let mut datagrams = Datagrams::new();
        let mut got = Vec::new();
        while got.len() < count {
            // Loopback queued every datagram before send_to returned.
            let n = datagrams.recv(&server).unwrap();
            assert!(n <= SLOTS);
            assert_eq!(datagrams.pending(), n);
            while let Some((data, source)) = datagrams.take() {
                got.push((data.to_vec(), source));
            }
            assert_eq!(datagrams.pending(), 0);
        }
        for (i, (data, source)) in got.iter().enumerate() {
            assert_eq!(data, &payload(i), "datagram {i}");
            assert_eq!(*source, senders[i % 2].local_addr().unwrap());
        }
        let nothing = datagrams.recv(&server).unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn round_trip_ipv4() {
        round_trip("127.0.0.1");
    }

    #[test]
    fn round_trip_ipv6() {
        round_trip("[::1]");
    }
}
