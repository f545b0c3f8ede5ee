//! Doorbells (`shm.doorbell.*`): one Unix stream connection per guest, between the
//! guest and its host, that a party can wait on with `epoll`/`poll` (or an async
//! runtime) instead of a futex.
//!
//! A party that waits on its doorbell marks itself parked with [`PARKED_DOORBELL`]
//! (a futex waiter uses [`PARKED_FUTEX`]); the other side, seeing that value after it
//! publishes or consumes, writes one byte into the connection. Nobody parked, no
//! system call. The connection doubles as a liveness signal: the end of the stream
//! means the other process is gone.
//!
//! Spawned guests get a socket pair through their spawn ticket. Guests that attach by
//! path connect to the host's listening socket in the abstract namespace (no file is
//! created) named after the segment id, and introduce themselves with a [`Hello`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Parked-flag value: not parked.
pub const NOT_PARKED: u32 = 0;
/// Parked-flag value: asleep on the futex word (wake with `FUTEX_WAKE`).
pub const PARKED_FUTEX: u32 = 1;
/// Parked-flag value: waiting on the doorbell (wake by writing one byte into it).
pub const PARKED_DOORBELL: u32 = 2;

/// Writes one byte into a doorbell without ever blocking or raising `SIGPIPE`. A full
/// socket already holds a pending ring, and a closed one has nobody to wake, so every
/// error is ignored.
// shm[impl shm.doorbell.ring]
pub fn ring(fd: BorrowedFd<'_>) {
    let byte = 1u8;
    // SAFETY: send reads one byte from a live local; MSG_DONTWAIT never blocks and
    // MSG_NOSIGNAL turns a closed peer into EPIPE instead of a signal.
    unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&byte as *const u8).cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

/// What draining a doorbell found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing was pending.
    Quiet,
    /// At least one ring was pending (now consumed).
    Rang,
    /// The other end is closed: its process is gone (or let go of the doorbell).
    HungUp,
}

/// Reads every pending byte of a doorbell without blocking.
pub fn drain(fd: BorrowedFd<'_>) -> Drained {
    let mut buf = [0u8; 64];
    let mut rang = false;
    loop {
        // SAFETY: recv writes at most buf.len() bytes into our local buffer.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => return Drained::HungUp,
            n if n > 0 => rang = true,
            _ => {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if rang => Drained::Rang,
                    io::ErrorKind::WouldBlock => Drained::Quiet,
                    _ => Drained::HungUp,
                };
            }
        }
    }
}

/// A connected pair of close-on-exec, non-blocking stream sockets.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned both fds to us; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The abstract-namespace address of a segment's listening socket:
/// `\0shmhub.<id0 hex><id1 hex>`.
// shm[impl shm.doorbell.connect]
fn address(segment_id: [u64; 2]) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = format!("shmhub.{:016x}{:016x}", segment_id[0], segment_id[1]);
    // sun_path[0] stays 0: the abstract namespace.
    for (dst, src) in addr.sun_path[1..].iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    (addr, len as libc::socklen_t)
}

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers and returns a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Host: listens for the doorbell connections of guests that attach by path. The
/// name lives in the abstract namespace, so nothing is created on disk and it goes
/// away with the host.
pub fn listen(segment_id: [u64; 2]) -> io::Result<OwnedFd> {
    let fd = stream_socket()?;
    let (addr, len) = address(segment_id);
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen takes no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), 255) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Guest: connects to the host's listening socket and says who it is. A Unix stream
/// connect to a listener with backlog room completes at once, so this never waits
/// for the host.
pub fn connect(segment_id: [u64; 2], hello: Hello) -> io::Result<OwnedFd> {
    let fd = stream_socket()?;
    let (addr, len) = address(segment_id);
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes = hello.encode();
    // SAFETY: send reads bytes.len() bytes from a live local.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n != bytes.len() as isize {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the doorbell hello did not fit in a new connection",
        ));
    }
    Ok(fd)
}

/// Host: takes one pending connection, if any.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    // SAFETY: null address pointers ask for no peer address.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The process id of a connection's peer, as the kernel recorded it at connect time
/// (not a claim the peer makes).
pub fn peer_pid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: ucred is plain old data; all zeroes is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

/// Host: reads a connection's hello. `Ok(None)` while its bytes have not arrived.
pub fn read_hello(fd: BorrowedFd<'_>) -> io::Result<Option<Hello>> {
    let mut buf = [0u8; Hello::LEN];
    // SAFETY: recv writes at most buf.len() bytes into our local buffer. MSG_PEEK
    // leaves a partial hello in place for the next try.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    match n {
        n if n == Hello::LEN as isize => {
            // SAFETY: as above, consuming the bytes just peeked.
            unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                );
            }
            Ok(Some(Hello::decode(buf)))
        }
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before its hello",
        )),
        n if n > 0 => Ok(None),
        _ => {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err),
            }
        }
    }
}

/// The first bytes a path guest sends on its doorbell connection: which entry it
/// claimed, at which generation. The host checks both against the entry, and the
/// entry's pid against the connection's kernel-recorded peer pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The claimed entry's index.
    pub index: u32,
    /// The generation claimed.
    pub generation: u32,
}

impl Hello {
    /// Encoded size: index then generation, little-endian u32 each.
    pub const LEN: usize = 8;

    fn encode(self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&self.index.to_le_bytes());
        out[4..].copy_from_slice(&self.generation.to_le_bytes());
        out
    }

    fn decode(buf: [u8; Self::LEN]) -> Self {
        Self {
            index: u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")),
            generation: u32::from_le_bytes(buf[4..].try_into().expect("4 bytes")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    #[cfg_attr(miri, ignore = "recv(MSG_DONTWAIT): not in Miri")]
    fn a_ring_is_drained_once_and_a_close_is_a_hang_up() {
        let (a, b) = pair().unwrap();
        assert_eq!(drain(b.as_fd()), Drained::Quiet);
        ring(a.as_fd());
        ring(a.as_fd());
        assert_eq!(drain(b.as_fd()), Drained::Rang);
        assert_eq!(drain(b.as_fd()), Drained::Quiet);
        drop(a);
        assert_eq!(drain(b.as_fd()), Drained::HungUp);
        // Ringing a closed doorbell neither blocks nor raises SIGPIPE.
        ring(b.as_fd());
    }

    #[test]
    #[cfg_attr(miri, ignore = "recv(MSG_DONTWAIT): not in Miri")]
    fn a_full_doorbell_never_blocks_the_ringer() {
        let (a, b) = pair().unwrap();
        for _ in 0..10_000 {
            ring(a.as_fd());
        }
        assert_eq!(drain(b.as_fd()), Drained::Rang);
    }

    #[test]
    #[cfg_attr(miri, ignore = "AF_UNIX sockets: not in Miri")]
    fn a_path_guest_connects_and_introduces_itself() {
        let id = crate::random_u64x2();
        let listener = listen(id).unwrap();
        assert!(accept(listener.as_fd()).unwrap().is_none());
        let hello = Hello {
            index: 7,
            generation: 3,
        };
        let guest = connect(id, hello).unwrap();
        let host = accept(listener.as_fd())
            .unwrap()
            .expect("pending connection");
        assert_eq!(peer_pid(host.as_fd()).unwrap(), std::process::id());
        assert_eq!(read_hello(host.as_fd()).unwrap(), Some(hello));
        ring(host.as_fd());
        assert_eq!(drain(guest.as_fd()), Drained::Rang);
        // A second listener on the same id is refused: names are unique.
        assert!(listen(id).is_err());
        drop(listener);
        assert!(connect(id, hello).is_err(), "the name goes with the host");
    }
}
