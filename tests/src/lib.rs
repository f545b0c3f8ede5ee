//! Harness for cross-process tests.
//!
//! A test re-runs its own binary as a child (`current_exe() --exact <test>`), with
//! the role in `SHMHUB_TEST_ROLE`. The child talks to the parent in lines: it writes
//! `@<word> ...` lines to stdout, and reads lines from stdin. Every child has a
//! deadline and is killed when it passes; its exit status is asserted.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod syscalls;

/// Env var naming the child's role.
pub const ROLE_VAR: &str = "SHMHUB_TEST_ROLE";

/// The role this process was started with, if it is a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
}

/// An env var the parent passed to this child.
pub fn arg(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs env {name}"))
}

/// Attaches a child guest as its parent said in `VIA`: with the spawn ticket in its
/// environment (`ticket`), otherwise by the path in `SEG`.
pub fn attach_as_told() -> Result<shm_guest::ShmGuest, shm_guest::AttachError> {
    match arg("VIA").as_str() {
        "ticket" => shm_guest::ShmGuest::from_env(),
        _ => shm_guest::ShmGuest::attach_path(arg("SEG")),
    }
}

/// Tells the parent something: one `@`-prefixed line on stdout.
pub fn tell(line: &str) {
    let mut out = std::io::stdout().lock();
    // A leading newline: libtest may have printed "test name ... " without one.
    writeln!(out, "\n@{line}").unwrap();
    out.flush().unwrap();
}

/// Reads one line the parent sent on stdin (blocks; the parent's deadline bounds it).
pub fn hear() -> String {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

/// A unique segment path under /dev/shm, removed (if still there) when dropped.
pub struct ShmPath(PathBuf);

impl ShmPath {
    /// `/dev/shm/shmhub-test-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("test-{}-{n}-{tag}", std::process::id());
        Self(shm_host::segment_path(&name).unwrap())
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ShmPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A child process running one role of a test, and the [`Talk`] with it.
pub struct Proc {
    child: Child,
    talk: Talk,
}

impl Proc {
    /// Starts `test` (its full path as libtest names it, e.g. `attach_by_path`) of
    /// this binary in `role`, with extra env vars, to finish within `limit`.
    pub fn spawn(test: &str, role: &str, envs: &[(&str, String)], limit: Duration) -> Self {
        Self::spawn_with(test, role, envs, limit, |_| {})
    }

    /// Like `spawn`, letting `configure` adjust the command first (for example to
    /// hand the child a spawn ticket).
    pub fn spawn_with(
        test: &str,
        role: &str,
        envs: &[(&str, String)],
        limit: Duration,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let mut cmd = role_command(test, role, envs, limit);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn child test process");
        let stdin: Box<dyn Write + Send> = Box::new(child.stdin.take().unwrap());
        let stdout = child.stdout.take().unwrap();
        let talk = Talk::over(stdin, stdout, role, limit);
        Self { child, talk }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child's next `@` line (before its deadline, killing it then).
    pub fn expect_line(&mut self) -> String {
        match self.talk.next_line() {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                panic!("child {} said nothing before its deadline", self.talk.name)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().unwrap();
                panic!(
                    "child {} exited ({status}) before saying anything",
                    self.talk.name
                )
            }
        }
    }

    /// Waits for a line starting with `word` and returns the rest of it.
    pub fn expect(&mut self, word: &str) -> String {
        let line = self.expect_line();
        self.talk.strip(line, word)
    }

    /// Like `expect_line`, but returns `None` when nothing arrives within `wait`.
    pub fn poll_line(&mut self, wait: Duration) -> Option<String> {
        self.talk.poll_line(wait)
    }

    /// Sends a line to the child's stdin.
    pub fn say(&mut self, line: &str) {
        self.talk.say(line)
    }

    /// The child's exit status if it has exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }

    /// Waits for the child to exit before its deadline (killing it on expiry) and
    /// returns its status.
    pub fn wait(&mut self) -> ExitStatus {
        self.talk.stdin.take();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= self.talk.deadline {
                self.kill();
                panic!(
                    "child {} passed its deadline and was killed",
                    self.talk.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the child and asserts it exited with status 0.
    pub fn assert_success(&mut self) {
        let status = self.wait();
        assert!(
            status.success(),
            "child {} failed: {status}",
            self.talk.name
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Env var carrying a child's deadline in milliseconds (see `watchdog`).
pub const DEADLINE_VAR: &str = "SHMHUB_TEST_DEADLINE_MS";

/// A command that runs `test` of this binary in `role`, with extra env vars and a
/// deadline the child enforces on itself (`watchdog`). For children the parent does
/// not own (those `ShmHost::spawn` starts), stdin is null and stdout/stderr are
/// inherited.
pub fn role_command(test: &str, role: &str, envs: &[(&str, String)], limit: Duration) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_VAR, role)
        .env(DEADLINE_VAR, limit.as_millis().to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// In a child: SIGKILLs this process when the deadline its parent gave it passes, so
/// a child nobody waits for (a grandchild, or one a host spawned) cannot outlive its
/// test.
pub fn watchdog() {
    let Ok(ms) = std::env::var(DEADLINE_VAR) else {
        return;
    };
    let limit = Duration::from_millis(ms.parse().unwrap_or(60_000));
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("child passed its {limit:?} deadline: killing itself");
        // SAFETY: kill(2) on our own pid has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    });
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The descriptors open in this process (from /proc/self/fd, without the one used to
/// read it).
pub fn open_fds() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    // The directory's own fd was open during the listing and is closed now.
    fds.retain(|&fd| {
        // SAFETY: F_GETFD on any number only queries the descriptor table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
    });
    fds
}

/// Whether the child `pid` of this process has exited and can be reaped (it is not
/// reaped here): every one of its threads is gone, so its descriptors are closed and
/// its locks released. (A process whose main thread is a zombie may have another
/// thread still exiting, holding them.)
pub fn is_reapable(pid: u32) -> bool {
    // SAFETY: siginfo_t is plain old data, valid when zeroed.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with WNOHANG | WNOWAIT only queries (it reaps nothing) and writes
    // into the siginfo we own.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled the siginfo, or left it zeroed (no child was ready).
    rc == 0 && unsafe { info.si_pid() } == pid as libc::pid_t
}

/// Waits, without calling into the host (so it detects nothing meanwhile), until the
/// child `pid` the host spawned has exited and can be reaped: then its pidfd is
/// readable, its doorbell hung up and its locks released by the time the host looks.
pub fn until_reapable(pid: u32) {
    poll_until(Duration::from_secs(10), "the child to exit", || {
        is_reapable(pid).then_some(())
    });
}

/// Entries of /dev/shm that belong to this process's tests.
pub fn our_shm_files() -> Vec<String> {
    let mine = format!("shmhub-test-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.trim_start_matches('.').starts_with(&mine))
        .collect()
}

/// An independent mapping of a segment file (taking no lock), to watch its shared
/// words from outside the host and guests.
pub fn watch_segment(path: &Path) -> shm_primitives::Segment {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let map = shm_primitives::MmapRegion::map(file, len).unwrap();
    shm_primitives::Segment::attach(shm_primitives::ShmBacking::Mmap(std::sync::Arc::new(map)))
        .unwrap()
}

/// Whether the guest of entry `index` is parked waiting for data (the consumer-parked
/// flag of its host->guest ring).
pub fn guest_parked(seg: &shm_primitives::Segment, index: usize) -> bool {
    let dir = shm_primitives::Direction::ToGuest;
    let off = seg.layout().ring_offset(index, dir) as usize + 8;
    seg.backing()
        .region()
        .atomic_u64(off)
        .unwrap()
        .load(Ordering::SeqCst) as u32
        != 0
}

/// The header of ring `dir` of entry `index`, as another process sees it: its
/// `consumer_parked` and `producer_parked` flags say who waits and how
/// (`shm_primitives::doorbell::{NOT_PARKED, PARKED_FUTEX, PARKED_DOORBELL}`).
pub fn ring_header(
    seg: &shm_primitives::Segment,
    index: usize,
    dir: shm_primitives::Direction,
) -> &shm_primitives::ring::RingHeader {
    let off = seg.layout().ring_offset(index, dir) as usize;
    // SAFETY: RingHeader is `repr(C)` and made only of atomic integers.
    unsafe { seg.backing().region().view(off) }.expect("ring header in bounds and aligned")
}

/// Sends guest message number `n` of the soaks: a random length from `lengths`, the
/// payload `pattern(seed, n, len)` and `Meta::new(msg_type, n)`; a third of those up to
/// 1 KiB go in place through a loan (which always travels in a slot,
/// `shm.slot.loan`), the rest are copied.
pub fn send_checked(
    guest: &mut shm_guest::ShmGuest,
    rng: &mut Rng,
    lengths: &[usize],
    (msg_type, seed, n): (u32, u64, u64),
    wait: Duration,
) {
    let len = *rng.pick(lengths);
    let payload = pattern(seed, n, len);
    let meta = shm_host::Meta::new(msg_type, n);
    if len <= 1024 && rng.chance(1, 3) {
        let mut loan = guest.loan_timeout(len, wait).unwrap();
        assert!(loan.write_at(0, &payload));
        loan.send(meta, len).unwrap();
    } else {
        guest.send(meta, &payload, wait).unwrap();
    }
}

/// The deterministic payload of message `n` from peer `seed`, `len` bytes.
pub fn pattern(seed: u64, n: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Message lengths that cover inline (0..=36) and slot payloads.
pub const LENGTHS: [usize; 8] = [0, 1, 35, 36, 37, 200, 1000, 4096];

/// Runs `f` until it returns `Some` or `limit` passes (then panics with `what`).
/// Between attempts the thread yields: this is a bounded poll, not a sleep.
pub fn poll_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

/// Builds a segment file at `path` by hand, as a creator would, and publishes it only
/// if `publish`; returns the creator's view so a test can finish (or sabotage) it.
pub fn plant_segment(path: &Path, config: shm_primitives::SegmentConfig, publish: bool) -> Planted {
    use std::os::unix::fs::OpenOptionsExt;
    let layout = config.layout().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    // Hold the host's lock, as a creator does: guests refuse a segment without one.
    assert!(shm_primitives::lock::try_lock(&file, shm_primitives::lock::HOST_LOCK_BYTE).unwrap());
    file.set_len(layout.total_size).unwrap();
    let map = shm_primitives::MmapRegion::map(file, layout.total_size as usize).unwrap();
    let backing = shm_primitives::ShmBacking::Mmap(std::sync::Arc::new(map));
    let id = shm_primitives::random_u64x2();
    // Listen for doorbells, as a creator does: path guests connect while attaching.
    let listener = shm_primitives::doorbell::listen(id).unwrap();
    let segment = shm_primitives::Segment::init(backing, config, id, std::process::id()).unwrap();
    if publish {
        segment.publish();
    }
    Planted {
        segment,
        _listener: listener,
    }
}

/// A segment planted by [`plant_segment`], with the doorbell listener a host would
/// hold (nobody accepts on it: connections just queue).
pub struct Planted {
    /// The segment.
    pub segment: shm_primitives::Segment,
    _listener: std::os::fd::OwnedFd,
}

impl std::ops::Deref for Planted {
    type Target = shm_primitives::Segment;
    fn deref(&self) -> &Self::Target {
        &self.segment
    }
}

/// Slots of one pool counted by state (`shm.slot.layout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotStates {
    /// In the pool.
    pub free: u32,
    /// Allocated by the sender, not yet published.
    pub loaned: u32,
    /// Named by a published descriptor not yet taken.
    pub sent: u32,
    /// Claimed by the receiver (a copy in progress, or a live view).
    pub received: u32,
    /// Holding no valid state.
    pub invalid: u32,
}

/// The slots of `peer`'s pools in direction `dir`, counted by state, one entry per
/// slot class (smallest first), read through `seg` (for example a
/// [`watch_segment`] mapping, or `Segment::attach` of a heap host's backing).
pub fn slot_states(
    seg: &shm_primitives::Segment,
    peer: shm_primitives::PeerId,
    dir: shm_primitives::Direction,
) -> Vec<SlotStates> {
    use shm_primitives::slot::SlotState;
    let pools = seg.pools(peer, dir).expect("peer in range");
    (0..pools.classes())
        .map(|class| {
            let pool = pools.class(class).expect("class in range");
            let mut counts = SlotStates::default();
            for index in 0..pool.count() {
                match pool.state(index) {
                    Some(SlotState::Free) => counts.free += 1,
                    Some(SlotState::Loaned) => counts.loaned += 1,
                    Some(SlotState::Sent) => counts.sent += 1,
                    Some(SlotState::Received) => counts.received += 1,
                    None => counts.invalid += 1,
                }
            }
            counts
        })
        .collect()
}

/// The line protocol with a child: its stdin, and the `@` lines of its stdout (read on
/// a thread of their own), all before a deadline. A [`Proc`] holds one; for a child
/// the harness does not start itself (a guest `ShmHost::spawn` starts), make one with
/// [`Talk::wire`] before the command is spawned, and drop the command after spawning
/// it (it holds the child's ends).
pub struct Talk {
    stdin: Option<Box<dyn Write + Send>>,
    lines: Receiver<String>,
    deadline: Instant,
    name: String,
}

impl Talk {
    /// Points `cmd`'s stdin and stdout at new pipes; the child must be done within
    /// `limit` (its own `watchdog` enforces it; this side stops waiting then).
    pub fn wire(cmd: &mut Command, name: &str, limit: Duration) -> Self {
        let (stdin_child, stdin_ours) = pipe();
        let (stdout_ours, stdout_child) = pipe();
        cmd.stdin(Stdio::from(stdin_child))
            .stdout(Stdio::from(stdout_child));
        let stdin: Box<dyn Write + Send> = Box::new(std::fs::File::from(stdin_ours));
        Self::over(stdin, std::fs::File::from(stdout_ours), name, limit)
    }

    /// Talks through `stdin` and `stdout` with a child named `name`, for `limit`.
    fn over(
        stdin: Box<dyn Write + Send>,
        stdout: impl Read + Send + 'static,
        name: &str,
        limit: Duration,
    ) -> Self {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(msg) = line.strip_prefix('@') {
                    if tx.send(msg.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            stdin: Some(stdin),
            lines,
            deadline: Instant::now() + limit,
            name: name.to_string(),
        }
    }

    /// The next `@` line, waiting until the deadline at most.
    fn next_line(&mut self) -> Result<String, RecvTimeoutError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        self.lines.recv_timeout(left)
    }

    /// The rest of `line` after `word`; a panic naming the child if it is not there.
    fn strip(&self, line: String, word: &str) -> String {
        match line.strip_prefix(word) {
            Some(rest) => rest.trim().to_string(),
            None => panic!("child {} said {line:?}, expected {word}", self.name),
        }
    }

    /// Waits for the child's next `@` line (before its deadline).
    pub fn expect_line(&mut self) -> String {
        match self.next_line() {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                panic!("child {} said nothing before its deadline", self.name)
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("child {} closed its stdout before saying more", self.name)
            }
        }
    }

    /// Waits for a line starting with `word` and returns the rest of it.
    pub fn expect(&mut self, word: &str) -> String {
        let line = self.expect_line();
        self.strip(line, word)
    }

    /// Like `expect_line`, but returns `None` when nothing arrives within `wait`.
    pub fn poll_line(&mut self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// Sends a line to the child's stdin.
    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

/// A pipe: (read end, write end), both close-on-exec (a `Stdio` made of one is
/// duplicated onto the child's descriptor without the flag).
fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned these descriptors to us; nothing else owns them.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// A small seeded pseudo-random generator (SplitMix64) for randomised tests: the seed
/// is printed, so a failing run can be replayed exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// One element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The seed of a randomised test: `var` if set (to replay a run), otherwise fresh.
/// Printed either way.
pub fn seed_from_env(var: &str) -> u64 {
    let seed = match std::env::var(var) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{var} must be a decimal u64")),
        Err(_) => shm_primitives::random_u64x2()[0],
    };
    eprintln!("seed {seed} (replay with {var}={seed})");
    seed
}

/// A duration in seconds from `var`, or `default` when it is unset.
pub fn secs_from_env(var: &str, default: u64) -> Duration {
    let secs = match std::env::var(var) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{var} must be whole seconds")),
        Err(_) => default,
    };
    Duration::from_secs(secs)
}

/// Lines of /proc/self/maps that map a shared-memory file of ours: a segment (under
/// /dev/shm) or a memory file (`memfd:`), to compare before and after a test.
pub fn shared_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("/dev/shm/") || l.contains("memfd:"))
        .count()
}
