//! Large payloads: anything bigger than the largest slot class travels in a dedicated
//! anonymous memfd whose file descriptor is passed over the guest's doorbell (the
//! per-guest Unix stream socket, see [`crate::doorbell`]) with `SCM_RIGHTS`.
//!
//! The sender creates a [`LargeBuffer`], fills it, and [`finish`](LargeBuffer::finish)es
//! it: the header is written, the sender's mapping is dropped and the file is sealed
//! against any change of size (and against writes). It then passes the fd with
//! [`send_fd`]: one data byte [`FD_MARK`] carrying one descriptor. The receiver reads
//! its doorbell with [`recv_pending`] (never with a plain `recv`, which would silently
//! discard the descriptors), which queues every received fd in arrival order, and
//! maps each with [`LargeView::open`], checking seals, size and header against what
//! the message announcing the payload said.
//!
//! # Memfd layout
//!
//! The file is exactly [`LARGE_HEADER_LEN`] + `len` bytes long. The payload starts at
//! offset [`LARGE_HEADER_LEN`] (4096, page-aligned on 4 KiB-page systems); the header
//! uses the first 64 bytes, the rest of the first 4096 is zero. All integers are
//! little-endian.
//!
//! | Offset | Size | Field   | Value                                   |
//! |-------:|-----:|---------|-----------------------------------------|
//! | 0      | 8    | `magic` | [`LARGE_MAGIC`] (`b"SHMLARGE"` as LE u64) |
//! | 8      | 8    | `seq`   | the sender's sequence number for it     |
//! | 16     | 8    | `len`   | payload length in bytes                 |
//! | 24     | 40   | —       | zero (reserved)                         |
//!
//! # Seals
//!
//! [`LargeBuffer::finish`] adds `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE |
//! F_SEAL_SEAL`. The receiver requires `F_SEAL_SHRINK` and `F_SEAL_GROW` (without them
//! the sender could truncate the file under our mapping and turn our reads into
//! `SIGBUS`). `F_SEAL_WRITE` is optional for the receiver: when present, nobody can
//! modify the contents any more, so [`LargeView::sealed_slice`] hands out a plain
//! `&[u8]`.
//!
//! # Kernel behaviour on the stream socket
//!
//! - A Unix stream `recvmsg` returns the bytes of several queued sends at once, but
//!   never goes past a send that carried descriptors: a read ends with (at most) one
//!   `SCM_RIGHTS` batch. Wake bytes queued before an fd arrive in the same read as the
//!   fd; those after it need another read. [`recv_pending`] loops until `EAGAIN`.
//! - A send that returns successfully has already queued the byte and the fd on the
//!   receiving socket, so a [`recv_pending`] that starts afterwards finds it. Send the
//!   fd *before* publishing the message that refers to it.
//! - Descriptors that do not fit the receiver's control buffer, or that cannot be
//!   installed (the receiver is at `RLIMIT_NOFILE`), are closed by the kernel and the
//!   read reports `MSG_CTRUNC`: they are lost. The sequence number in the header lets
//!   the receiver notice (the next queued fd carries an unexpected `seq`).
//! - Wake bytes share the socket buffer with fds; a receiver that never drains makes
//!   [`send_fd`] fail with [`io::ErrorKind::WouldBlock`]. Each fd is also "in flight"
//!   and counts against the sending user's `RLIMIT_NOFILE` until it is received
//!   (`ETOOMANYREFS` beyond it).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::doorbell::Drained;

/// Bytes before the payload in a large-payload memfd (the header page).
pub const LARGE_HEADER_LEN: usize = 4096;
/// The `magic` field of a large-payload header: `b"SHMLARGE"` read as a little-endian
/// `u64`.
pub const LARGE_MAGIC: u64 = u64::from_le_bytes(*b"SHMLARGE");
/// The data byte sent together with a descriptor (a plain wake-up is `1`).
pub const FD_MARK: u8 = 2;
/// The most received descriptors [`recv_pending`] keeps queued; any beyond are closed
/// on arrival, so a hostile peer cannot fill our descriptor table.
pub const MAX_QUEUED_FDS: usize = 256;

/// The seals [`LargeBuffer::finish`] applies.
const FINISH_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
/// The seals [`LargeView::open`] insists on.
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Header field offsets (see the module docs).
const MAGIC_AT: usize = 0;
const SEQ_AT: usize = 8;
const LEN_AT: usize = 16;

/// Why a received descriptor was refused as a large payload.
#[derive(Debug, thiserror::Error)]
pub enum LargeError {
    /// A system call on the descriptor failed.
    #[error("{op} on a large-payload fd failed: {source}")]
    Io {
        /// The call that failed (`"F_GET_SEALS"`, `"fstat"`, `"mmap"`).
        op: &'static str,
        /// The error it returned.
        #[source]
        source: io::Error,
    },
    /// The file is not sealed against shrinking and growing: the sender could
    /// truncate it under our mapping and make our reads fault.
    #[error("large-payload fd lacks F_SEAL_SHRINK|F_SEAL_GROW (seals {seals:#x})")]
    NotSealed {
        /// The seals found (`F_GET_SEALS`).
        seals: i32,
    },
    /// The file's size is not [`LARGE_HEADER_LEN`] + the announced length.
    #[error("large-payload fd is {found} bytes, expected {expected}")]
    Size {
        /// The file's size.
        found: u64,
        /// [`LARGE_HEADER_LEN`] + the announced length (saturating).
        expected: u64,
    },
    /// A header field does not match (checked in the order magic, seq, len).
    #[error("large-payload header field {field} is {found:#x}, expected {expected:#x}")]
    Header {
        /// `"magic"`, `"seq"` or `"len"`.
        field: &'static str,
        /// The value in the file.
        found: u64,
        /// The value required.
        expected: u64,
    },
}

/// One `mmap` of a whole file, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared, with `prot`.
    fn new(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel (null hint, no MAP_FIXED) cannot
        // alias any memory Rust knows about.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { ptr, len })
    }

    /// The mapping's byte at `offset` (which must be at most `len`).
    fn at(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset <= self.len);
        // SAFETY: offset <= len, so the result is inside the mapping or one past it.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// Loads the little-endian `u64` at the 8-aligned `offset` (in bounds) with two
    /// atomic 32-bit loads: sound even if another process writes it concurrently (the
    /// value may then be torn, which only makes a check fail), and unlike a 64-bit
    /// atomic it never needs a write access on 32-bit targets.
    fn load_u64(&self, offset: usize) -> u64 {
        assert!(offset % 8 == 0 && offset + 8 <= self.len);
        let word = |at: usize| {
            // SAFETY: in bounds (asserted above) and 4-aligned (the mapping is page
            // aligned); every bit pattern is a valid u32, and an atomic load is not a
            // data race with writers elsewhere.
            let atomic = unsafe { &*self.at(at).cast::<AtomicU32>() };
            u32::from_le(atomic.load(Ordering::Relaxed))
        };
        u64::from(word(offset)) | (u64::from(word(offset + 4)) << 32)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and every borrow of it ended with `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// `errno` as an `io::Error` for the call named `op`.
fn os_error(op: &'static str) -> LargeError {
    LargeError::Io {
        op,
        source: io::Error::last_os_error(),
    }
}

/// The sending side of a large payload: a fresh, writable memfd of
/// [`LARGE_HEADER_LEN`] + `len` bytes, mapped whole. Unmapped and closed on drop
/// unless [`finish`](Self::finish)ed.
#[derive(Debug)]
pub struct LargeBuffer {
    map: Mapping,
    fd: OwnedFd,
    len: usize,
}

// SAFETY: the mapping is owned by this value (nobody else maps the memfd before
// `finish`), and all writes to it go through `&mut self`, so moving the value to
// another thread moves sole access with it.
unsafe impl Send for LargeBuffer {}

impl LargeBuffer {
    /// Creates a zero-filled buffer for a payload of `len` bytes.
    pub fn create(len: usize) -> io::Result<Self> {
        Self::create_named(len, c"shmhub-large")
    }

    /// [`create`](Self::create) with the memfd named `name` (shown in
    /// `/proc/<pid>/fd`); the tests use their own names to count their fds.
    fn create_named(len: usize, name: &std::ffi::CStr) -> io::Result<Self> {
        let total = LARGE_HEADER_LEN
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "payload too large"))?;
        let size = libc::off_t::try_from(total)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "payload too large"))?;
        // SAFETY: name is a valid NUL-terminated string for the duration of the call.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate takes no pointers.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let map = Mapping::new(fd.as_fd(), total, libc::PROT_READ | libc::PROT_WRITE)?;
        Ok(Self { map, fd, len })
    }

    /// The payload length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the payload: [`len`](Self::len) writable bytes (page-aligned on
    /// 4 KiB-page systems), valid until `finish` or drop.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.at(LARGE_HEADER_LEN)
    }

    /// The payload as a slice, to fill in place (for example straight from a read).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the payload is `len` initialised (zero-filled by the kernel) bytes of
        // our private writable mapping, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    /// Copies `src` into the payload at `offset`. Returns `false` (and copies nothing)
    /// when the span does not fit.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> bool {
        match offset.checked_add(src.len()) {
            Some(end) if end <= self.len => {
                let dst = self.map.at(LARGE_HEADER_LEN + offset);
                // SAFETY: [offset, end) is inside the payload (checked above); src is
                // caller memory that cannot overlap our private mapping.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
                true
            }
            _ => false,
        }
    }

    /// Writes the header, drops this process's mapping, seals the file
    /// (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL`) and returns the fd
    /// to pass with [`send_fd`]. The fd may be closed as soon as it is sent.
    pub fn finish(self, seq: u64) -> io::Result<OwnedFd> {
        let Self { map, fd, len } = self;
        let mut header = [0u8; 24];
        header[MAGIC_AT..MAGIC_AT + 8].copy_from_slice(&LARGE_MAGIC.to_le_bytes());
        header[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
        header[LEN_AT..LEN_AT + 8].copy_from_slice(&(len as u64).to_le_bytes());
        // SAFETY: the mapping is ours, writable and at least LARGE_HEADER_LEN bytes;
        // header is a local that cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), map.at(0), header.len()) };
        // F_SEAL_WRITE is refused while any writable shared mapping exists.
        drop(map);
        // SAFETY: fcntl(F_ADD_SEALS) takes an integer argument, no pointers.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, FINISH_SEALS) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// The sequence number in the header of a received large-payload file, read without
/// mapping it (to tell an orphan from the file a descriptor names; [`LargeView::open`]
/// checks everything again). `None` when the file is too short or cannot be read.
pub fn header_seq(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: pread writes at most 8 bytes into our local buffer.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            bytes.as_mut_ptr().cast(),
            bytes.len(),
            SEQ_AT as libc::off_t,
        )
    };
    (n == 8).then(|| u64::from_le_bytes(bytes))
}

/// The receiving side of a large payload: a read-only mapping of a received memfd,
/// checked by [`open`](Self::open). Unmapped and closed on drop.
#[derive(Debug)]
pub struct LargeView {
    map: Mapping,
    _fd: OwnedFd,
    len: usize,
    write_sealed: bool,
}

// SAFETY: the mapping is owned by this value and only ever read through it; moving it
// to another thread is moving a read-only mapping.
unsafe impl Send for LargeView {}
// SAFETY: every `&self` method only reads the mapping (raw copies or atomic loads);
// concurrent reads from several threads are fine.
unsafe impl Sync for LargeView {}

impl LargeView {
    /// Checks a received fd and maps it read-only: the seals must include
    /// `F_SEAL_SHRINK | F_SEAL_GROW` (checked before mapping), the size must be exactly
    /// [`LARGE_HEADER_LEN`] + `len`, and the header must hold [`LARGE_MAGIC`], `seq` and
    /// `len`. On any refusal the fd is closed.
    ///
    /// `len` comes from the (untrusted) message announcing the payload; bound it
    /// before calling, since reading the view can allocate up to `len` bytes of
    /// shared memory on our side if the sender left holes.
    pub fn open(fd: OwnedFd, seq: u64, len: u64) -> Result<Self, LargeError> {
        // SAFETY: fcntl(F_GET_SEALS) takes no argument and no pointers.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(os_error("F_GET_SEALS"));
        }
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(LargeError::NotSealed { seals });
        }
        // Seals are never removed, so from here on the size cannot change.
        // SAFETY: stat is plain old data; all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one `stat` into our local.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(os_error("fstat"));
        }
        let found = u64::try_from(st.st_size).unwrap_or(0);
        let expected = (LARGE_HEADER_LEN as u64).saturating_add(len);
        if found != expected {
            return Err(LargeError::Size { found, expected });
        }
        let total = usize::try_from(expected).map_err(|_| LargeError::Io {
            op: "mmap",
            source: io::Error::new(io::ErrorKind::InvalidInput, "too large to map"),
        })?;
        let map = Mapping::new(fd.as_fd(), total, libc::PROT_READ)
            .map_err(|source| LargeError::Io { op: "mmap", source })?;
        let view = Self {
            map,
            _fd: fd,
            len: total - LARGE_HEADER_LEN,
            write_sealed: seals & libc::F_SEAL_WRITE != 0,
        };
        for (field, at, want) in [
            ("magic", MAGIC_AT, LARGE_MAGIC),
            ("seq", SEQ_AT, seq),
            ("len", LEN_AT, len),
        ] {
            let found = view.map.load_u64(at);
            if found != want {
                return Err(LargeError::Header {
                    field,
                    found,
                    expected: want,
                });
            }
        }
        Ok(view)
    }

    /// The payload length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the payload: [`len`](Self::len) readable bytes, valid while the
    /// view lives. Another process may still be writing them unless
    /// [`is_write_sealed`](Self::is_write_sealed).
    pub fn as_ptr(&self) -> *const u8 {
        self.map.at(LARGE_HEADER_LEN)
    }

    /// Whether the sender sealed the contents (`F_SEAL_WRITE`): then no process can
    /// change them any more and [`sealed_slice`](Self::sealed_slice) is available.
    pub fn is_write_sealed(&self) -> bool {
        self.write_sealed
    }

    /// Copies the payload bytes at `offset..offset + dst.len()` into `dst`. Returns
    /// `false` (and copies nothing) when the span does not fit. Always safe: a hostile
    /// sender writing concurrently can only make the copy inconsistent.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> bool {
        match offset.checked_add(dst.len()) {
            Some(end) if end <= self.len => {
                let src = self.map.at(LARGE_HEADER_LEN + offset);
                if self.write_sealed {
                    // SAFETY: [offset, end) is inside the payload (checked above) and
                    // sealed against writes; dst is caller memory that cannot overlap
                    // our read-only mapping.
                    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
                } else {
                    // SAFETY: inside the payload, mapped while `self` lives; the
                    // sender may still write it, and the copy is atomic for that.
                    unsafe { crate::shared_copy::copy_from_shared(src, dst) };
                }
                true
            }
            _ => false,
        }
    }

    /// A copy of the whole payload (no zero-fill first).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        // SAFETY: the payload is `len` bytes of our mapping; `out` has capacity for
        // them, and they are all initialised by the copy before set_len. Unsealed, the
        // sender may still write them: then the copy is atomic.
        unsafe {
            if self.write_sealed {
                std::ptr::copy_nonoverlapping(self.as_ptr(), out.as_mut_ptr(), self.len);
            } else {
                crate::shared_copy::copy_from_shared_raw(self.as_ptr(), out.as_mut_ptr(), self.len);
            }
            out.set_len(self.len);
        }
        out
    }

    /// The payload as a slice without copying, when the sender sealed it against
    /// writes (`None` otherwise: use [`copy_to`](Self::copy_to) /
    /// [`to_vec`](Self::to_vec), or [`as_slice`](Self::as_slice) if you trust the
    /// sender).
    pub fn sealed_slice(&self) -> Option<&[u8]> {
        if !self.write_sealed {
            return None;
        }
        // SAFETY: F_SEAL_WRITE (seen before mapping, never removable) means no
        // writable shared mapping of the file exists or can be created and write(2) is
        // refused, so the bytes cannot change while the slice lives.
        Some(unsafe { self.as_slice() })
    }

    /// The payload as a slice without copying.
    ///
    /// # Safety
    ///
    /// No process may write the memfd while the slice lives. After
    /// [`LargeBuffer::finish`] the sender has unmapped it, so an honest sender never
    /// does, but a hostile one could keep another writable mapping (that is what
    /// `F_SEAL_WRITE` rules out: prefer [`sealed_slice`](Self::sealed_slice)). The
    /// copying accessors are always safe.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes from the payload start are inside our live mapping (or
        // an empty slice at its end, still non-null and aligned for u8); the caller
        // promises nobody writes them while the slice lives.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

/// Sends one [`FD_MARK`] byte carrying `fd` (`SCM_RIGHTS`) on a doorbell stream socket,
/// without blocking or raising `SIGPIPE`. A full socket is an error of kind
/// [`io::ErrorKind::WouldBlock`] (nothing was sent: retry after the peer drained).
/// On `Ok` the descriptor is already queued on the receiving socket and the caller
/// may close its own copy.
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    send_fds(sock, &[fd])
}

/// Sends one [`FD_MARK`] byte carrying all of `fds` (at most
/// [`SEND_MAX_FDS`](crate::memfd::SEND_MAX_FDS)) in one `SCM_RIGHTS` message.
fn send_fds(sock: BorrowedFd<'_>, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    crate::memfd::send_with_fds(sock, &[FD_MARK], fds)
}

/// Reads everything pending on a doorbell stream socket without blocking, like
/// [`crate::doorbell::drain`], and queues every descriptor that arrived (close-on-exec)
/// on `fds` in arrival order. Use it instead of `drain` on a socket that can carry
/// fds: a plain read would make the kernel close them.
///
/// Returns [`Drained::Rang`] if any byte (wake-up or [`FD_MARK`]) was read,
/// [`Drained::Quiet`] if nothing was pending, and [`Drained::HungUp`] at the end of the
/// stream or on an error other than `EAGAIN`/`EINTR` (descriptors read before that
/// are still queued).
///
/// Descriptors beyond [`MAX_QUEUED_FDS`] in `fds` are closed at once. A read whose
/// control data was truncated (`MSG_CTRUNC`: more fds in one message than the
/// buffer holds, or our descriptor table is full) still counts as a ring; the fds
/// that did not fit were closed by the kernel and are lost, which the caller notices
/// through the sequence number of the next one ([`LargeView::open`] refuses it).
pub fn recv_pending(sock: BorrowedFd<'_>, fds: &mut VecDeque<OwnedFd>) -> Drained {
    let mut data = [0u8; 64];
    let mut rang = false;
    loop {
        let got = crate::memfd::recv_once(sock, &mut data, |fd| {
            // Beyond the cap, `fd` drops here: closed at once.
            if fds.len() < MAX_QUEUED_FDS {
                fds.push_back(fd);
            }
        });
        match got {
            Err(err) => {
                return match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if rang => Drained::Rang,
                    io::ErrorKind::WouldBlock => Drained::Quiet,
                    _ => Drained::HungUp,
                }
            }
            Ok((0, _)) => return Drained::HungUp,
            Ok(_) => rang = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::{pair, ring};
    use std::ffi::CStr;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    /// How many of this process's fds are memfds named `name` (each test uses its own
    /// name, so tests running in parallel do not disturb each other's counts).
    fn memfds_named(name: &CStr) -> usize {
        let want = format!("/memfd:{} (deleted)", name.to_str().unwrap());
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy() == want)
            .count()
    }

    fn pattern(i: usize) -> u8 {
        ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i >> 12) as u8
    }

    /// A finished buffer of `len` pattern bytes.
    fn finished(name: &CStr, len: usize, seq: u64) -> OwnedFd {
        let mut buf = LargeBuffer::create_named(len, name).unwrap();
        let chunk: Vec<u8> = (0..len).map(pattern).collect();
        assert!(buf.write_at(0, &chunk));
        buf.finish(seq).unwrap()
    }

    /// A memfd of `size` bytes with `header` (magic, seq, len) and `seals` added.
    fn raw_memfd(name: &CStr, size: u64, header: [u64; 3], seals: libc::c_int) -> OwnedFd {
        // SAFETY: name is NUL-terminated.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(raw >= 0, "{}", io::Error::last_os_error());
        // SAFETY: just created; ours alone.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        file.set_len(size).unwrap();
        let bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        file.write_all_at(&bytes, 0).unwrap();
        if seals != 0 {
            // SAFETY: integer argument only.
            let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        }
        file.into()
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn a_large_payload_round_trips_between_wake_bytes_and_leaves_no_fd() {
        const NAME: &CStr = c"shmhub-large-t-round-trip";
        const LEN: usize = 5 << 20;
        let before = memfds_named(NAME);
        let (tx, rx) = pair().unwrap();
        let mut buf = LargeBuffer::create_named(LEN, NAME).unwrap();
        assert_eq!((buf.len(), buf.is_empty()), (LEN, false));
        assert_eq!(
            buf.as_mut_ptr() as usize % 4096,
            0,
            "payload is page-aligned"
        );
        let chunk = 65_536 + 13; // not a divisor of LEN: the last write is short
        let mut off = 0;
        while off < LEN {
            let piece: Vec<u8> = (off..(off + chunk).min(LEN)).map(pattern).collect();
            assert!(buf.write_at(off, &piece));
            off += piece.len();
        }
        assert!(!buf.write_at(LEN - 1, &[0, 0]), "past the end");
        assert!(!buf.write_at(usize::MAX, &[0]), "overflowing offset");
        assert!(buf.write_at(LEN, &[]), "an empty write at the end fits");
        let fd = buf.finish(7).unwrap();
        assert_eq!(memfds_named(NAME), before + 1);

        ring(tx.as_fd());
        ring(tx.as_fd());
        send_fd(tx.as_fd(), fd.as_fd()).unwrap();
        ring(tx.as_fd());
        drop(fd); // the in-flight copy keeps the file alive
        assert_eq!(memfds_named(NAME), before, "in flight: in nobody's table");

        let mut fds = VecDeque::new();
        assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::Rang);
        assert_eq!(fds.len(), 1);
        assert_eq!(
            recv_pending(rx.as_fd(), &mut fds),
            Drained::Quiet,
            "all consumed"
        );
        assert_eq!(memfds_named(NAME), before + 1);

        let fd = fds.pop_front().unwrap();
        // SAFETY: integer argument only.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds are close-on-exec"
        );
        let view = LargeView::open(fd, 7, LEN as u64).unwrap();
        assert_eq!((view.len(), view.is_empty()), (LEN, false));
        assert!(view.is_write_sealed());
        let copy = view.to_vec();
        assert_eq!(copy.len(), LEN);
        if let Some(i) = (0..LEN).find(|&i| copy[i] != pattern(i)) {
            panic!("byte {i} is {} not {}", copy[i], pattern(i));
        }
        assert_eq!(view.sealed_slice().unwrap(), &copy[..]);
        let mut tail = [0u8; 3];
        assert!(view.copy_to(LEN - 3, &mut tail));
        assert_eq!(tail, [pattern(LEN - 3), pattern(LEN - 2), pattern(LEN - 1)]);
        assert!(!view.copy_to(LEN - 2, &mut tail));
        assert!(!view.copy_to(usize::MAX - 1, &mut tail));
        drop(view);
        assert_eq!(memfds_named(NAME), before, "view closed its fd");
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn an_unfinished_buffer_is_closed_on_drop() {
        const NAME: &CStr = c"shmhub-large-t-unfinished";
        let before = memfds_named(NAME);
        let mut buf = LargeBuffer::create_named(0, NAME).unwrap();
        assert!(buf.is_empty());
        assert!(buf.as_mut_slice().is_empty());
        assert!(!buf.write_at(0, &[1]));
        assert_eq!(memfds_named(NAME), before + 1);
        drop(buf);
        assert_eq!(memfds_named(NAME), before);
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn fds_sent_back_to_back_arrive_in_order() {
        const NAME: &CStr = c"shmhub-large-t-order";
        let (tx, rx) = pair().unwrap();
        let first = finished(NAME, 100, 1);
        let second = finished(NAME, 200, 2);
        send_fd(tx.as_fd(), first.as_fd()).unwrap();
        send_fd(tx.as_fd(), second.as_fd()).unwrap();
        ring(tx.as_fd());
        let mut fds = VecDeque::new();
        assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::Rang);
        assert_eq!(fds.len(), 2);
        let a = LargeView::open(fds.pop_front().unwrap(), 1, 100).unwrap();
        let b = LargeView::open(fds.pop_front().unwrap(), 2, 200).unwrap();
        assert_eq!(a.to_vec(), (0..100).map(pattern).collect::<Vec<_>>());
        assert_eq!(b.to_vec(), (0..200).map(pattern).collect::<Vec<_>>());
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn unsealed_mismatched_and_foreign_fds_are_refused() {
        const NAME: &CStr = c"shmhub-large-t-refusals";
        let size = (LARGE_HEADER_LEN + 10) as u64;
        let good = [LARGE_MAGIC, 5, 10];
        let before = memfds_named(NAME);

        let r = LargeView::open(raw_memfd(NAME, size, good, 0), 5, 10);
        assert!(
            matches!(r, Err(LargeError::NotSealed { seals: 0 })),
            "{r:?}"
        );
        let r = LargeView::open(raw_memfd(NAME, size, good, libc::F_SEAL_SHRINK), 5, 10);
        assert!(
            matches!(r, Err(LargeError::NotSealed { seals }) if seals == libc::F_SEAL_SHRINK),
            "{r:?}"
        );
        // Sealed against resizing but not writing: accepted, without a sealed slice.
        let view = LargeView::open(raw_memfd(NAME, size, good, REQUIRED_SEALS), 5, 10).unwrap();
        assert!(!view.is_write_sealed());
        assert!(view.sealed_slice().is_none());
        assert_eq!(view.to_vec(), [0; 10]);
        drop(view);

        let r = LargeView::open(finished(NAME, 10, 5), 6, 10);
        assert!(
            matches!(
                r,
                Err(LargeError::Header {
                    field: "seq",
                    found: 5,
                    expected: 6
                })
            ),
            "{r:?}"
        );
        let r = LargeView::open(finished(NAME, 10, 5), 5, 11);
        assert!(
            matches!(r, Err(LargeError::Size { found, expected }) if found == size && expected == size + 1),
            "{r:?}"
        );
        let r = LargeView::open(finished(NAME, 10, 5), 5, u64::MAX);
        assert!(
            matches!(
                r,
                Err(LargeError::Size {
                    expected: u64::MAX,
                    ..
                })
            ),
            "{r:?}"
        );
        let bad_magic = raw_memfd(NAME, size, [!LARGE_MAGIC, 5, 10], REQUIRED_SEALS);
        let r = LargeView::open(bad_magic, 5, 10);
        assert!(
            matches!(r, Err(LargeError::Header { field: "magic", .. })),
            "{r:?}"
        );
        // Size right, header len wrong (only a hostile sender does this).
        let bad_len = raw_memfd(NAME, size, [LARGE_MAGIC, 5, 9], REQUIRED_SEALS);
        let r = LargeView::open(bad_len, 5, 10);
        assert!(
            matches!(
                r,
                Err(LargeError::Header {
                    field: "len",
                    found: 9,
                    expected: 10
                })
            ),
            "{r:?}"
        );

        // A regular file: EINVAL from F_GET_SEALS, or (on tmpfs) only F_SEAL_SEAL.
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        let r = LargeView::open(file.into(), 5, 10);
        assert!(
            matches!(
                r,
                Err(LargeError::NotSealed { .. }
                    | LargeError::Io {
                        op: "F_GET_SEALS",
                        ..
                    })
            ),
            "{r:?}"
        );
        // Not a file at all.
        let (sock, _other) = pair().unwrap();
        let r = LargeView::open(sock, 5, 10);
        assert!(
            matches!(
                r,
                Err(LargeError::Io {
                    op: "F_GET_SEALS",
                    ..
                })
            ),
            "{r:?}"
        );

        assert_eq!(memfds_named(NAME), before, "every refused fd was closed");
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn a_view_outlives_everything_on_the_sending_side() {
        const NAME: &CStr = c"shmhub-large-t-outlives";
        const LEN: usize = 300_000;
        let (tx, rx) = pair().unwrap();
        let fd = finished(NAME, LEN, 3);
        send_fd(tx.as_fd(), fd.as_fd()).unwrap();
        ring(tx.as_fd());
        drop(fd);
        drop(tx);
        let mut fds = VecDeque::new();
        assert_eq!(
            recv_pending(rx.as_fd(), &mut fds),
            Drained::HungUp,
            "the sender is gone"
        );
        assert_eq!(fds.len(), 1, "but what it sent before is still delivered");
        let view = LargeView::open(fds.pop_front().unwrap(), 3, LEN as u64).unwrap();
        drop(rx);
        // SAFETY: write-sealed: nobody can write the file.
        let bytes = unsafe { view.as_slice() };
        assert!(bytes.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        assert_eq!(memfds_named(NAME), 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn at_most_max_queued_fds_are_kept_and_the_rest_closed() {
        const NAME: &CStr = c"shmhub-large-t-bound";
        let total = MAX_QUEUED_FDS + 3;
        let (tx, rx) = pair().unwrap();
        let mut fds = VecDeque::new();
        let mut sent = 0;
        while sent < total {
            // Batches, so that the socket buffer never fills.
            for _ in 0..32.min(total - sent) {
                let fd = finished(NAME, 8, sent as u64);
                send_fd(tx.as_fd(), fd.as_fd()).unwrap();
                sent += 1;
            }
            assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::Rang);
        }
        assert_eq!(fds.len(), MAX_QUEUED_FDS);
        assert_eq!(
            memfds_named(NAME),
            MAX_QUEUED_FDS,
            "the extra ones were closed"
        );
        for (seq, fd) in fds.drain(..).enumerate() {
            LargeView::open(fd, seq as u64, 8).unwrap();
        }
        assert_eq!(memfds_named(NAME), 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn a_truncated_control_message_keeps_what_fit_and_still_rings() {
        const NAME: &CStr = c"shmhub-large-t-ctrunc";
        let (tx, rx) = pair().unwrap();
        let owned: Vec<OwnedFd> = (0..12).map(|i| finished(NAME, 1, i)).collect();
        let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
        send_fds(tx.as_fd(), &borrowed).unwrap();
        drop(borrowed);
        drop(owned);
        let mut fds = VecDeque::new();
        assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::Rang);
        assert_eq!(
            fds.len(),
            crate::memfd::RECV_MAX_FDS,
            "as many as the control buffer holds"
        );
        assert_eq!(
            memfds_named(NAME),
            crate::memfd::RECV_MAX_FDS,
            "the kernel closed the rest"
        );
        for (seq, fd) in fds.drain(..).enumerate() {
            LargeView::open(fd, seq as u64, 1).unwrap();
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn quiet_rang_and_hung_up() {
        let (tx, rx) = pair().unwrap();
        let mut fds = VecDeque::new();
        assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::Quiet);
        ring(tx.as_fd());
        assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::Rang);
        assert!(fds.is_empty());
        drop(tx);
        assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::HungUp);
        assert!(fds.is_empty());
        let err = send_fd(rx.as_fd(), rx.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "no SIGPIPE");
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd and SCM_RIGHTS: not in Miri")]
    fn a_full_socket_is_would_block() {
        const NAME: &CStr = c"shmhub-large-t-full";
        let (tx, rx) = pair().unwrap();
        for _ in 0..100_000 {
            ring(tx.as_fd());
        }
        let fd = finished(NAME, 1, 0);
        let err = send_fd(tx.as_fd(), fd.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let mut fds = VecDeque::new();
        assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::Rang);
        assert!(fds.is_empty(), "nothing was sent");
        send_fd(tx.as_fd(), fd.as_fd()).unwrap();
        assert_eq!(recv_pending(rx.as_fd(), &mut fds), Drained::Rang);
        assert_eq!(fds.len(), 1);
    }
}
