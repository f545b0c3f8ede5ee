//! Sealed memory files and descriptor passing (`shm.file.memfd`, `shm.file.seals`,
//! `shm.fd.passing`).
//!
//! A sealed segment lives in an anonymous memfd instead of a file under `/dev/shm`.
//! Its seals make its size final, so no process holding a descriptor can truncate it
//! under another's mapping (the `SIGBUS` of `shm.file.attach`'s known risk). Guests
//! get it by descriptor: inherited with a spawn ticket, or in one `SCM_RIGHTS`
//! message on a Unix socket ([`send_with_fds`], [`recv_with_fds`]).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// The seals a sealed segment carries, and that a guest attaching by descriptor
/// requires: no shrinking, no growing, and no further seals (so nobody can later add
/// `F_SEAL_FUTURE_WRITE` and stop new guests from mapping it writable). Never
/// `F_SEAL_WRITE`: guests write the segment.
pub const SEGMENT_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// The seals of `fd` (`F_GET_SEALS`). A file that cannot carry seals (not a memfd
/// made with `MFD_ALLOW_SEALING`, or a regular file) has none: 0.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: fcntl(F_GET_SEALS) takes no argument and no pointers.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 {
        return Ok(seals);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) => Ok(0),
        _ => Err(err),
    }
}

/// A new open file description of the file `fd` names, read-write and
/// close-on-exec, opened through `/proc/self/fd`. Unlike `dup`, it shares no file
/// offset, status flags or OFD locks with `fd`: a lock taken through it is its own.
pub fn reopen(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("no NUL in a number");
    // SAFETY: path is a valid NUL-terminated string for the duration of the call.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

const FD_SIZE: usize = size_of::<RawFd>();
/// The most descriptors one message of [`send_with_fds`] may carry.
pub const SEND_MAX_FDS: usize = 16;
// SAFETY: CMSG_SPACE is plain arithmetic on its argument; it touches no memory.
const SEND_CMSG_SPACE: usize =
    unsafe { libc::CMSG_SPACE((SEND_MAX_FDS * FD_SIZE) as u32) } as usize;
/// How many descriptors one [`recv_with_fds`] has room for: more than any message of
/// ours carries, so a message with too many is seen whole and refused.
pub const RECV_MAX_FDS: usize = 8;
// SAFETY: as above.
const RECV_CMSG_SPACE: usize =
    unsafe { libc::CMSG_SPACE((RECV_MAX_FDS * FD_SIZE) as u32) } as usize;

/// A control-message buffer, aligned for `cmsghdr` (whose alignment is at most 8).
type CmsgBuf<const WORDS: usize> = [u64; WORDS];
const SEND_CMSG_WORDS: usize = SEND_CMSG_SPACE.div_ceil(8);
const RECV_CMSG_WORDS: usize = RECV_CMSG_SPACE.div_ceil(8);

/// Sends `data` (non-empty) with all of `fds` (1 to [`SEND_MAX_FDS`]) in one
/// `SCM_RIGHTS` message, without blocking or raising `SIGPIPE`: a full socket is an
/// error of kind [`io::ErrorKind::WouldBlock`] and a closed peer one of kind
/// [`io::ErrorKind::BrokenPipe`]. On `Ok` the whole message and every descriptor are
/// queued on the receiving socket, and the caller may close its own copies.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(!data.is_empty() && !fds.is_empty() && fds.len() <= SEND_MAX_FDS);
    let payload = (fds.len() * FD_SIZE) as u32;
    let mut control: CmsgBuf<SEND_CMSG_WORDS> = [0; SEND_CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is plain arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
    // SAFETY: msg_control points at our zeroed, 8-aligned buffer of at least
    // msg_controllen bytes, so the first header is in bounds (non-null).
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    assert!(!cmsg.is_null());
    // SAFETY: cmsg points at a cmsghdr inside `control`, followed by room for
    // `fds.len()` ints (CMSG_SPACE above); the data may be unaligned for c_int, hence
    // write_unaligned.
    unsafe {
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
        let out = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            out.add(i).write_unaligned(fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg points at our live iovec (the kernel only reads `data` through
        // it) and control buffer. MSG_DONTWAIT never blocks and MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of a signal.
        let n = unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match n {
            n if n as usize == data.len() => return Ok(()),
            n if n < 0 => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            // A stream socket may take part of the data; the descriptors went with
            // that part, the rest would arrive as another message: refuse it here
            // rather than split a record (our records are far below any buffer).
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "sendmsg sent part of the message",
                ))
            }
        }
    }
}

/// What [`recv_with_fds`] received.
#[derive(Debug)]
pub struct Received {
    /// Bytes of data written into the caller's buffer.
    pub len: usize,
    /// Every descriptor that arrived (close-on-exec), in order, owned.
    pub fds: Vec<OwnedFd>,
    /// The kernel truncated the data or the control data (`MSG_TRUNC`,
    /// `MSG_CTRUNC`): descriptors that did not fit were closed by the kernel.
    pub truncated: bool,
}

/// Waits up to `timeout` for one message on `sock` and receives it with
/// `MSG_CMSG_CLOEXEC`: at most `buf.len()` bytes of data, and every `SCM_RIGHTS`
/// descriptor (up to [`RECV_MAX_FDS`]; the kernel closes any beyond). Every received
/// descriptor is owned by the result, so dropping it closes them. `Ok(None)` when
/// nothing arrived in time; end of stream is [`io::ErrorKind::UnexpectedEof`].
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    timeout: Duration,
) -> io::Result<Option<Received>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd we own; the timeout bounds the wait.
        let rc = unsafe { libc::poll(&mut pfd, 1, if left.is_zero() { 0 } else { ms }) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc == 0 {
            if left.is_zero() {
                return Ok(None);
            }
            continue;
        }
        let mut fds = Vec::new();
        match recv_once(sock, buf, |fd| fds.push(fd)) {
            Err(err) => match err.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                _ => return Err(err),
            },
            Ok((0, _)) if fds.is_empty() => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok((len, flags)) => {
                return Ok(Some(Received {
                    len,
                    fds,
                    truncated: flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
                }))
            }
        }
    }
}

/// One non-blocking `recvmsg` with `MSG_CMSG_CLOEXEC`: at most `buf.len()` bytes of
/// data, and every `SCM_RIGHTS` descriptor (up to [`RECV_MAX_FDS`]; the kernel closes
/// any beyond) handed to `take`, owned. Returns the bytes read and the message flags.
pub(crate) fn recv_once(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    take: impl FnMut(OwnedFd),
) -> io::Result<(usize, libc::c_int)> {
    let mut control: CmsgBuf<RECV_CMSG_WORDS> = [0; RECV_CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = RECV_CMSG_SPACE as _;
    // SAFETY: the kernel writes at most buf.len() bytes into `buf` and at most
    // RECV_CMSG_SPACE bytes into `control`, both live for the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recvmsg succeeded, so `msg` describes the control data it wrote into
    // `control`, and the descriptors in it were installed for us and are unowned.
    unsafe { take_fds(&msg, take) };
    Ok((n as usize, msg.msg_flags))
}

/// Hands every `SCM_RIGHTS` descriptor of a received message to `take`, owned.
///
/// # Safety
///
/// `msg` must be the header of a successful `recvmsg`: its control buffer holds
/// `msg_controllen` bytes of well-formed control messages written by the kernel, and
/// the descriptors in them are owned by nobody else.
pub(crate) unsafe fn take_fds(msg: &libc::msghdr, mut take: impl FnMut(OwnedFd)) {
    let start = msg.msg_control as usize;
    #[allow(clippy::unnecessary_cast)] // socklen_t on musl, size_t on glibc
    let end = start + msg.msg_controllen as usize;
    // SAFETY: msg is a valid header (caller); CMSG_FIRSTHDR only reads its control
    // pointer and length and returns null when no header fits.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null headers from CMSG_FIRSTHDR/CMSG_NXTHDR lie inside the
        // control buffer.
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_DATA is pointer arithmetic within the message.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            // SAFETY: CMSG_LEN is plain arithmetic.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            #[allow(clippy::unnecessary_cast)]
            let claimed = (len as usize).saturating_sub(head) / FD_SIZE;
            // Never trust a length past the end of the buffer.
            let room = end.saturating_sub(data as usize) / FD_SIZE;
            for i in 0..claimed.min(room) {
                // SAFETY: entry i is inside the control buffer (bounded by `room`),
                // possibly unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                if raw < 0 {
                    continue;
                }
                // SAFETY: the kernel installed this descriptor for us in this recvmsg;
                // nothing else owns it (caller).
                take(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: msg and cmsg are valid (above); CMSG_NXTHDR returns null past the
        // end of the control data.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::pair;
    use std::os::fd::AsFd;

    fn memfd(seals: libc::c_int) -> OwnedFd {
        // SAFETY: the name is a valid NUL-terminated string.
        let raw = unsafe {
            libc::memfd_create(
                c"shmhub-memfd-t".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(raw >= 0);
        // SAFETY: just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate and fcntl take no pointers.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), 4096), 0);
            if seals != 0 {
                assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
            }
        }
        fd
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create: not in Miri")]
    fn seals_are_read_and_an_unsealable_file_has_none() {
        assert_eq!(seals(memfd(0).as_fd()).unwrap(), 0);
        let sealed = memfd(SEGMENT_SEALS);
        assert_eq!(seals(sealed.as_fd()).unwrap(), SEGMENT_SEALS);
        let file = tempfile::tempfile().unwrap();
        assert_eq!(seals(file.as_fd()).unwrap(), 0);
        // A reopened description is the same inode: same seals, own locks.
        let again = reopen(sealed.as_fd()).unwrap();
        assert_eq!(seals(again.as_fd()).unwrap(), SEGMENT_SEALS);
        let a = std::fs::File::from(sealed);
        let b = std::fs::File::from(again);
        assert!(crate::lock::try_lock(&a, 0).unwrap());
        assert!(crate::lock::is_locked_by_other(&b, 0).unwrap());
        assert!(!crate::lock::try_lock(&b, 0).unwrap());
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create: not in Miri")]
    fn data_and_descriptors_travel_in_one_message() {
        let (tx, rx) = pair().unwrap();
        let (a, b) = (memfd(0), memfd(0));
        send_with_fds(tx.as_fd(), b"ticket", &[a.as_fd(), b.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let got = recv_with_fds(rx.as_fd(), &mut buf, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..got.len], b"ticket");
        assert_eq!(got.fds.len(), 2);
        assert!(!got.truncated);
        for fd in &got.fds {
            // SAFETY: F_GETFD only queries the descriptor table.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "MSG_CMSG_CLOEXEC");
        }
        // Nothing pending: bounded wait, then None.
        let none = recv_with_fds(rx.as_fd(), &mut buf, Duration::from_millis(10)).unwrap();
        assert!(none.is_none());
        drop(tx);
        let eof = recv_with_fds(rx.as_fd(), &mut buf, Duration::from_secs(5)).unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
        let err = send_with_fds(rx.as_fd(), b"x", &[a.as_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "no SIGPIPE");
    }
}
