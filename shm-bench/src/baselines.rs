//! Baselines measured in the same harness: a raw shared cache line (spin), a raw
//! shared futex (block), a raw shared buffer hand-off, a Unix socket pair and pipes.
//! Each runs against a re-executed child; the mapping is a memfd the child inherits.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Child;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::measure::{child_command, fill, touch, Hist, Plan, SpinDeadline, Watchdog, OP_TIMEOUT};
use crate::report::{Row, Throughput};
use crate::BenchResult;

/// Environment variable naming the inherited memfd (raw roles).
pub const MAP_FD_ENV: &str = "SHM_BENCH_MAP_FD";
/// Environment variables naming the inherited stream fds (socket and pipe roles).
pub const READ_FD_ENV: &str = "SHM_BENCH_READ_FD";
/// See [`READ_FD_ENV`].
pub const WRITE_FD_ENV: &str = "SHM_BENCH_WRITE_FD";

const PING: usize = 0;
const PONG: usize = 64;
const FUTEX_A: usize = 128;
const FUTEX_B: usize = 192;
const SIZE: usize = 256;
const BUF: usize = 4096;
const BUF_LEN: usize = 1 << 20;
const MAP_LEN: usize = BUF + BUF_LEN;
const QUIT: u64 = u64::MAX;
const STREAM_FLAG: u64 = 1 << 63;
const SYNC: u64 = u64::MAX - 1;

/// A shared mapping of a memfd.
struct Shared {
    fd: OwnedFd,
    base: *mut u8,
}

impl Shared {
    fn create() -> BenchResult<Self> {
        // SAFETY: the name is a valid NUL-terminated string.
        let fd = unsafe { libc::memfd_create(c"shm-bench-raw".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: memfd_create returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone()?).set_len(MAP_LEN as u64)?;
        Self::map(fd)
    }

    fn map(fd: OwnedFd) -> BenchResult<Self> {
        // SAFETY: a fresh shared mapping of a file at least MAP_LEN bytes long.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Self {
            fd,
            base: base.cast(),
        })
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is a constant below BUF, 8-aligned inside the page-aligned
        // mapping, which lives as long as `self`; the memory is only ever accessed
        // atomically by both processes.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as in `u64_at`.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    /// The payload buffer. Callers only use it while the flag protocol gives them
    /// the buffer (the writer before publishing, the reader after seeing the flag).
    #[allow(clippy::mut_from_ref)]
    fn buf(&self, len: usize) -> &mut [u8] {
        assert!(len <= BUF_LEN);
        // SAFETY: inside the mapping; the hand-off protocol means only one process
        // uses the buffer at a time.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(BUF), len) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping made in `map`, MAP_LEN long, unmapped once.
        unsafe { libc::munmap(self.base.cast(), MAP_LEN) };
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `word` is a valid aligned u32 in shared memory; the shared (not
    // private) FUTEX_WAIT only reads it; `ts` outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid aligned u32; FUTEX_WAKE does not touch memory.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
}

/// Spawns a child with `role` that inherits `fds` (their close-on-exec flag cleared
/// in the child only).
fn spawn_with_fds(
    role: &str,
    cpu: Option<usize>,
    fds: &[RawFd],
    env: &[(&str, RawFd)],
) -> BenchResult<Child> {
    let mut cmd = child_command(role, cpu);
    for (k, v) in env {
        cmd.env(k, v.to_string());
    }
    let fds = fds.to_vec();
    // SAFETY: the closure only calls fcntl, which is async-signal-safe, and does not
    // allocate (the vector was built before the fork).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
    Ok(cmd.spawn()?)
}

fn finish(mut child: Child) -> BenchResult<()> {
    let _watchdog = Watchdog::arm(child.id(), Duration::from_secs(10));
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("baseline child failed: {status}").into());
    }
    Ok(())
}

fn spin_until(word: &AtomicU64, v: u64) -> BenchResult<()> {
    let mut dl = SpinDeadline::new(OP_TIMEOUT);
    while word.load(Ordering::Acquire) != v {
        if dl.expired() {
            return Err("peer did not answer within 10 s".into());
        }
        std::hint::spin_loop();
    }
    Ok(())
}

/// Raw shared cache line, raw futex and raw buffer hand-off.
pub fn run_raw(plan: Plan, cpu: Option<usize>, rows: &mut Vec<Row>) -> BenchResult<()> {
    for (role, mode) in [
        ("raw-spin", "spin"),
        ("raw-futex", "block"),
        ("raw-buf", "spin"),
    ] {
        let shared = Shared::create()?;
        let fd = shared.fd.as_raw_fd();
        let child = spawn_with_fds(role, cpu, &[fd], &[(MAP_FD_ENV, fd)])?;
        let _watchdog = Watchdog::arm(child.id(), Duration::from_secs(120));
        let mut n = 0u64;
        let sizes: &[usize] = if role == "raw-buf" {
            plan.buf_sizes()
        } else {
            &[8]
        };
        let (ping, pong) = (shared.u64_at(PING), shared.u64_at(PONG));
        let (fa, fb) = (shared.u32_at(FUTEX_A), shared.u32_at(FUTEX_B));
        let mut result = Ok(());
        'sizes: for &size in sizes {
            let mut h = Hist::new();
            let warm = plan.warmup(size);
            for i in 0..warm + plan.iters(size) {
                n += 1;
                let t = Instant::now();
                let done = match role {
                    "raw-spin" => {
                        ping.store(n, Ordering::Release);
                        spin_until(pong, n)
                    }
                    "raw-futex" => {
                        let v = n as u32;
                        fa.store(v, Ordering::Release);
                        futex_wake(fa);
                        let deadline = t + OP_TIMEOUT;
                        loop {
                            let cur = fb.load(Ordering::Acquire);
                            if cur == v {
                                break Ok(());
                            }
                            if Instant::now() >= deadline {
                                break Err("futex peer did not answer".into());
                            }
                            futex_wait(fb, cur, OP_TIMEOUT);
                        }
                    }
                    _ => {
                        fill(shared.buf(size), n);
                        shared.u64_at(SIZE).store(size as u64, Ordering::Relaxed);
                        ping.store(n, Ordering::Release);
                        spin_until(pong, n)
                    }
                };
                let e = t.elapsed();
                if let Err(err) = done {
                    result = Err(err);
                    break 'sizes;
                }
                if i >= warm {
                    h.record(e);
                }
            }
            let name = role;
            rows.push(Row::new(name, size, mode, role == "raw-buf", h.stats()));
        }
        ping.store(QUIT, Ordering::Release);
        fa.store(u32::MAX, Ordering::Release);
        futex_wake(fa);
        let finished = finish(child);
        result?;
        finished?;
    }
    Ok(())
}

/// The raw child: serves one role on the inherited mapping until told to quit.
pub fn raw_child(role: &str) -> BenchResult<()> {
    let fd: RawFd = std::env::var(MAP_FD_ENV)?.parse()?;
    // SAFETY: the parent passed us this fd, open and owned by nobody else here.
    let shared = Shared::map(unsafe { OwnedFd::from_raw_fd(fd) })?;
    let (ping, pong) = (shared.u64_at(PING), shared.u64_at(PONG));
    let (fa, fb) = (shared.u32_at(FUTEX_A), shared.u32_at(FUTEX_B));
    if role == "raw-futex" {
        let mut last = 0u32;
        let mut idle_since = Instant::now();
        loop {
            let v = fa.load(Ordering::Acquire);
            if v == last {
                if idle_since.elapsed() > OP_TIMEOUT {
                    return Err("parent went quiet".into());
                }
                futex_wait(fa, last, OP_TIMEOUT);
                continue;
            }
            if v == u32::MAX {
                return Ok(());
            }
            last = v;
            idle_since = Instant::now();
            fb.store(v, Ordering::Release);
            futex_wake(fb);
        }
    }
    let mut last = 0u64;
    loop {
        let mut dl = SpinDeadline::new(OP_TIMEOUT);
        let v = loop {
            let v = ping.load(Ordering::Acquire);
            if v != last {
                break v;
            }
            if dl.expired() {
                return Err("parent went quiet".into());
            }
            std::hint::spin_loop();
        };
        if v == QUIT {
            return Ok(());
        }
        last = v;
        if role == "raw-buf" {
            let size = shared.u64_at(SIZE).load(Ordering::Relaxed) as usize;
            touch(shared.buf(size.min(BUF_LEN)));
        }
        pong.store(v, Ordering::Release);
    }
}

/// Two ends of a byte stream in the parent, and the fds the child gets.
struct StreamPair {
    read: File,
    write: File,
    child_read: OwnedFd,
    child_write: OwnedFd,
}

fn socket_pair() -> BenchResult<StreamPair> {
    let (a, b) = UnixStream::pair()?;
    let a: OwnedFd = a.into();
    let b: OwnedFd = b.into();
    Ok(StreamPair {
        read: File::from(a.try_clone()?),
        write: File::from(a),
        child_read: b.try_clone()?,
        child_write: b,
    })
}

fn pipes() -> BenchResult<StreamPair> {
    let mut p2c = [0; 2];
    let mut c2p = [0; 2];
    for p in [&mut p2c, &mut c2p] {
        // SAFETY: each array has room for the two fds pipe2 writes.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    // SAFETY: pipe2 returned four fresh fds, each wrapped exactly once.
    let own = |fd| unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(StreamPair {
        read: File::from(own(c2p[0])),
        write: File::from(own(p2c[1])),
        child_read: own(p2c[0]),
        child_write: own(c2p[1]),
    })
}

/// Socket pair and pipe round trips (and socket pair one-way throughput).
pub fn run_streams(
    plan: Plan,
    cpu: Option<usize>,
    rows: &mut Vec<Row>,
    tputs: &mut Vec<Throughput>,
) -> BenchResult<()> {
    for name in ["socketpair", "pipe"] {
        let mut p = if name == "pipe" {
            pipes()?
        } else {
            socket_pair()?
        };
        let (r, w) = (p.child_read.as_raw_fd(), p.child_write.as_raw_fd());
        let child = spawn_with_fds(
            "stream",
            cpu,
            &[r, w],
            &[(READ_FD_ENV, r), (WRITE_FD_ENV, w)],
        )?;
        drop(p.child_read);
        drop(p.child_write);
        let _watchdog = Watchdog::arm(child.id(), Duration::from_secs(300));
        let mut inbuf = vec![0u8; 8 + BUF_LEN];
        for &size in plan.sizes() {
            let mut out = vec![0u8; 8 + size];
            out[..8].copy_from_slice(&(size as u64).to_le_bytes());
            let mut h = Hist::new();
            let warm = plan.warmup(size);
            for i in 0..warm + plan.iters(size) {
                let t = Instant::now();
                p.write.write_all(&out)?;
                p.read.read_exact(&mut inbuf[..8 + size])?;
                let e = t.elapsed();
                if i >= warm {
                    h.record(e);
                }
            }
            rows.push(Row::new(name, size, "block", false, h.stats()));
        }
        if name == "socketpair" {
            for size in [64usize, 1 << 20] {
                let msgs = plan.stream_msgs(size);
                let mut out = vec![0x5Au8; 8 + size];
                out[..8].copy_from_slice(&(size as u64 | STREAM_FLAG).to_le_bytes());
                let t = Instant::now();
                for _ in 0..msgs {
                    p.write.write_all(&out)?;
                }
                p.write.write_all(&SYNC.to_le_bytes())?;
                let mut got = [0u8; 8];
                p.read.read_exact(&mut got)?;
                let secs = t.elapsed().as_secs_f64();
                if u64::from_le_bytes(got) != msgs {
                    return Err("socketpair stream lost messages".into());
                }
                tputs.push(Throughput::new(name, size, msgs, secs));
            }
        }
        p.write.write_all(&QUIT.to_le_bytes())?;
        finish(child)?;
    }
    Ok(())
}

/// The stream child: echoes length-prefixed messages until told to quit or EOF.
pub fn stream_child() -> BenchResult<()> {
    let r: RawFd = std::env::var(READ_FD_ENV)?.parse()?;
    let w: RawFd = std::env::var(WRITE_FD_ENV)?.parse()?;
    // SAFETY: the parent passed us these fds; each is wrapped once (for a socket
    // pair both numbers name distinct duplicates).
    let (mut rd, mut wr) = unsafe { (File::from_raw_fd(r), File::from_raw_fd(w)) };
    let mut buf = vec![0u8; 8 + BUF_LEN];
    let mut streamed = 0u64;
    loop {
        if rd.read_exact(&mut buf[..8]).is_err() {
            return Ok(()); // the parent closed its end
        }
        let head = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        match head {
            QUIT => return Ok(()),
            SYNC => {
                wr.write_all(&streamed.to_le_bytes())?;
                streamed = 0;
            }
            h => {
                let len = (h & !STREAM_FLAG) as usize;
                if len > BUF_LEN {
                    return Err(format!("bad length {len}").into());
                }
                rd.read_exact(&mut buf[8..8 + len])?;
                if h & STREAM_FLAG != 0 {
                    streamed += 1;
                } else {
                    wr.write_all(&buf[..8 + len])?;
                }
            }
        }
    }
}
