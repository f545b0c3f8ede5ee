//! The raw floors, measured in the same harness against a re-executed child that
//! shares a memfd mapping with the parent:
//!
//! - `raw-spin`: one cache line each way, both sides spinning (the spin floor);
//! - `raw-futex`: one futex word each way, both sides sleeping in `FUTEX_WAIT` and
//!   always calling `FUTEX_WAKE` (the blocking floor);
//! - `raw-echo`: the echo hand-off floor for touched round trips: the parent fills
//!   every byte of buffer A, the child reads every byte of A and fills every byte of
//!   buffer B, the parent reads every byte of B (no copies, no allocation);
//! - `raw-ring`: a single-producer single-consumer ring of 64-byte entries, the
//!   64 B one-way stream floor (the producer copies 64 bytes in and publishes each
//!   entry; the consumer copies each out and publishes its tail).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Child;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::measure::{
    child_command, fill, touch, Hist, Plan, SpinDeadline, Watchdog, MAX_SIZE, OP_TIMEOUT,
};
use crate::report::{Row, Throughput};
use crate::BenchResult;

/// Environment variable naming the inherited memfd.
pub const MAP_FD_ENV: &str = "SHM_BENCH_MAP_FD";

const PING: usize = 0;
const PONG: usize = 64;
const FUTEX_A: usize = 128;
const FUTEX_B: usize = 192;
const SIZE: usize = 256;
const RING_HEAD: usize = 512;
const RING_TAIL: usize = 576;
const RING_QUIT: usize = 640;
const BUF_A: usize = 4096;
const BUF_B: usize = BUF_A + MAX_SIZE;
const MAP_LEN: usize = BUF_B + MAX_SIZE;
const QUIT: u64 = u64::MAX;
/// Entries in the raw ring (as many as the shmhub stream's ring holds).
pub const RING_ENTRIES: usize = 256;
const ENTRY: usize = 64;

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
        // SAFETY: `off` is a constant below BUF_A, 8-aligned inside the page-aligned
        // mapping, which lives as long as `self`; the memory is only ever accessed
        // atomically by both processes.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as in `u64_at`.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    /// `len` bytes of the buffer at `off` (BUF_A or BUF_B). Callers only use it while
    /// the flag protocol gives them the buffer (the writer before publishing, the
    /// reader after seeing the flag), and drop the slice before handing it over.
    #[allow(clippy::mut_from_ref)]
    fn buf(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(len <= MAX_SIZE && (off == BUF_A || off == BUF_B));
        // SAFETY: inside the mapping (checked above); the hand-off protocol means
        // only one process uses the buffer at a time.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(off), len) }
    }

    /// The ring entry for message `i`.
    fn entry(&self, i: u64) -> *mut u8 {
        let index = (i % RING_ENTRIES as u64) as usize;
        // SAFETY: RING_ENTRIES * ENTRY bytes from BUF_A are inside the mapping.
        unsafe { self.base.add(BUF_A + index * ENTRY) }
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
/// in the child only), named in the environment by `env`.
pub fn spawn_with_fds(
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

/// Waits (at most 10 s) for a child that was told to quit; fails unless it exited 0.
pub fn finish(mut child: Child) -> BenchResult<()> {
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

/// One raw round trip number `n` of `size` bytes.
fn round_trip(role: &str, shared: &Shared, n: u64, size: usize, t: Instant) -> BenchResult<()> {
    let (ping, pong) = (shared.u64_at(PING), shared.u64_at(PONG));
    match role {
        "raw-spin" => {
            ping.store(n, Ordering::Release);
            spin_until(pong, n)
        }
        "raw-futex" => {
            let v = n as u32;
            let (fa, fb) = (shared.u32_at(FUTEX_A), shared.u32_at(FUTEX_B));
            fa.store(v, Ordering::Release);
            futex_wake(fa);
            let deadline = t + OP_TIMEOUT;
            loop {
                let cur = fb.load(Ordering::Acquire);
                if cur == v {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err("futex peer did not answer".into());
                }
                futex_wait(fb, cur, OP_TIMEOUT);
            }
        }
        _ => {
            fill(shared.buf(BUF_A, size), n);
            shared.u64_at(SIZE).store(size as u64, Ordering::Relaxed);
            ping.store(n, Ordering::Release);
            spin_until(pong, n)?;
            touch(shared.buf(BUF_B, size));
            Ok(())
        }
    }
}

/// The raw round-trip floors: spin and futex at 8 B, the echo hand-off at every size.
pub fn run(plan: Plan, cpu: Option<usize>, rows: &mut Vec<Row>) -> BenchResult<()> {
    for (role, mode) in [
        ("raw-spin", "spin"),
        ("raw-futex", "block"),
        ("raw-echo", "spin"),
    ] {
        let shared = Shared::create()?;
        let fd = shared.fd.as_raw_fd();
        let child = spawn_with_fds(role, cpu, &[fd], &[(MAP_FD_ENV, fd)])?;
        let _watchdog = Watchdog::arm(child.id(), Duration::from_secs(300));
        let mut n = 0u64;
        let sizes: &[usize] = if role == "raw-echo" {
            plan.sizes()
        } else {
            &[8]
        };
        let touched = role == "raw-echo";
        let mut result = Ok(());
        'sizes: for &size in sizes {
            let mut h = Hist::new();
            let warm = plan.warmup(size);
            for i in 0..warm + plan.iters(size) {
                n += 1;
                let t = Instant::now();
                let done = round_trip(role, &shared, n, size, t);
                let e = t.elapsed();
                if let Err(err) = done {
                    result = Err(err);
                    break 'sizes;
                }
                if i >= warm {
                    h.record(e);
                }
            }
            rows.push(Row::new(role, "memfd", size, mode, touched, h.stats()));
        }
        shared.u64_at(PING).store(QUIT, Ordering::Release);
        let fa = shared.u32_at(FUTEX_A);
        fa.store(u32::MAX, Ordering::Release);
        futex_wake(fa);
        let finished = finish(child);
        result?;
        finished?;
    }
    Ok(())
}

/// The raw child: serves one round-trip role on the inherited mapping until told to
/// quit.
pub fn child(role: &str) -> BenchResult<()> {
    let shared = inherited()?;
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
        if role == "raw-echo" {
            let size = (shared.u64_at(SIZE).load(Ordering::Relaxed) as usize).min(MAX_SIZE);
            touch(shared.buf(BUF_A, size));
            fill(shared.buf(BUF_B, size), v);
        }
        pong.store(v, Ordering::Release);
    }
}

fn inherited() -> BenchResult<Shared> {
    let fd: RawFd = std::env::var(MAP_FD_ENV)?.parse()?;
    // SAFETY: the parent passed us this fd, open and owned by nobody else here.
    Shared::map(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The raw SPSC ring stream: 64-byte messages one way, as fast as the ring allows.
pub fn run_ring(plan: Plan, cpu: Option<usize>, tputs: &mut Vec<Throughput>) -> BenchResult<()> {
    let shared = Shared::create()?;
    let fd = shared.fd.as_raw_fd();
    let child = spawn_with_fds("raw-ring", cpu, &[fd], &[(MAP_FD_ENV, fd)])?;
    let _watchdog = Watchdog::arm(child.id(), Duration::from_secs(120));
    let (head, tail) = (shared.u64_at(RING_HEAD), shared.u64_at(RING_TAIL));
    let msgs = plan.stream_msgs(ENTRY);
    let msg = [0x5Au8; ENTRY];
    let cap = RING_ENTRIES as u64;
    let mut tail_seen = 0u64;
    let t = Instant::now();
    let mut result = Ok(());
    'send: for i in 0..msgs {
        if i - tail_seen >= cap {
            let mut dl = SpinDeadline::new(OP_TIMEOUT);
            loop {
                tail_seen = tail.load(Ordering::Acquire);
                if i - tail_seen < cap {
                    break;
                }
                if dl.expired() {
                    result = Err("raw ring: consumer stalled for 10 s".into());
                    break 'send;
                }
                std::hint::spin_loop();
            }
        }
        // SAFETY: entry `i` is inside the mapping and the consumer is done with it
        // (its tail is past `i - cap`); it reads it only after `head` passes `i`.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), shared.entry(i), ENTRY) };
        head.store(i + 1, Ordering::Release);
    }
    if result.is_ok() {
        result = spin_until(tail, msgs);
    }
    let secs = t.elapsed().as_secs_f64();
    shared.u64_at(RING_QUIT).store(1, Ordering::Release);
    let finished = finish(child);
    result?;
    finished?;
    tputs.push(Throughput::new("raw-ring", "memfd", ENTRY, msgs, secs));
    Ok(())
}

/// The ring consumer: copies each entry out and reads it, until told to quit.
pub fn ring_child() -> BenchResult<()> {
    let shared = inherited()?;
    let (head, tail) = (shared.u64_at(RING_HEAD), shared.u64_at(RING_TAIL));
    let quit = shared.u64_at(RING_QUIT);
    let mut out = [0u8; ENTRY];
    let (mut next, mut head_seen) = (0u64, 0u64);
    loop {
        if next == head_seen {
            let mut dl = SpinDeadline::new(OP_TIMEOUT);
            loop {
                head_seen = head.load(Ordering::Acquire);
                if head_seen != next {
                    break;
                }
                if quit.load(Ordering::Acquire) != 0 {
                    return Ok(());
                }
                if dl.expired() {
                    return Err("raw ring: producer went quiet".into());
                }
                std::hint::spin_loop();
            }
        }
        // SAFETY: entry `next` is inside the mapping and published (head is past
        // it); the producer does not reuse it until our tail passes it.
        unsafe { std::ptr::copy_nonoverlapping(shared.entry(next), out.as_mut_ptr(), ENTRY) };
        touch(&out);
        next += 1;
        tail.store(next, Ordering::Release);
    }
}
