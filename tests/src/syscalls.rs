//! Counts the system calls one thread makes, with seccomp user notification.
//!
//! [`SyscallCounter::install`] puts a seccomp filter on the calling thread that turns
//! every system call it makes into a notification, and starts a *supervisor* thread
//! that receives each notification, counts it by syscall number, and lets the call
//! run unchanged (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`). The filtered thread reads the
//! counts with plain atomic loads, which are no system call.
//!
//! Three things keep the two threads from deadlocking, since a filtered thread's
//! system call blocks until the supervisor answers it:
//!
//! - The supervisor is spawned, and has done everything that could allocate or lock,
//!   *before* the filter is installed. Filters are per thread (no
//!   `SECCOMP_FILTER_FLAG_TSYNC`), so it stays unfiltered.
//! - Its loop only calls `poll` and `ioctl` and touches atomics: it never takes a lock
//!   (malloc's, stdout's) the filtered thread could hold while it waits in a syscall.
//!   That is why the filter needs no allow-list: nothing the supervisor does waits for
//!   the filtered thread.
//! - The listener descriptor reaches the supervisor through an atomic, not a channel
//!   (whose wake-up would be a filtered syscall answered by nobody).
//!
//! A filter cannot be removed: install it on a thread that exits after the measured
//! part (its exit syscalls are still answered; take the snapshot before). When the
//! thread is gone the kernel reports the listener hung up and the supervisor ends.
//!
//! x86_64 only (syscall numbers and `AUDIT_ARCH_X86_64` below); the mechanism is the
//! same on other architectures.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `AUDIT_ARCH_X86_64` (`EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`); the libc
/// crate does not define it.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// Syscall numbers counted one by one (x86_64 has fewer than 512); any other call
/// (an x32 number, another architecture's ABI) is counted in `other`.
const TABLE: usize = 512;

/// Listener value before the filter is installed, and after installing failed.
const NO_LISTENER: i32 = -1;
const FAILED: i32 = -2;

/// What the supervisor and the filtered thread share.
struct Shared {
    counts: [AtomicU64; TABLE],
    other: AtomicU64,
    /// Of the `futex` calls, the `FUTEX_WAKE`s (the rest are waits, here).
    futex_wakes: AtomicU64,
    listener: AtomicI32,
    ready: AtomicBool,
    stopped: AtomicBool,
    /// The errno that stopped the supervisor while the thread still ran (0: none).
    /// Calls it no longer answers fail with ENOSYS, which code may ignore: the counts
    /// are then wrong, and `snapshot` says so.
    failed: AtomicI32,
}

/// The system calls one thread made, by number.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SyscallCounts {
    by_nr: [u64; TABLE],
    other: u64,
    futex_wakes: u64,
}

/// A handle on the counter of one filtered thread (clone it to watch the supervisor
/// end from another thread).
#[derive(Clone)]
pub struct SyscallCounter {
    shared: Arc<Shared>,
}

impl SyscallCounter {
    /// Filters the calling thread: from now on every system call it makes is counted.
    pub fn install() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            counts: [const { AtomicU64::new(0) }; TABLE],
            other: AtomicU64::new(0),
            futex_wakes: AtomicU64::new(0),
            listener: AtomicI32::new(NO_LISTENER),
            ready: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            failed: AtomicI32::new(0),
        });
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("syscall-supervisor".into())
            .spawn(move || supervise(&theirs))?;
        // The supervisor must be past its own start-up (allocation, thread-locals)
        // before this thread holds a lock it might need and waits on it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !shared.ready.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "supervisor never started");
            std::thread::yield_now();
        }
        match filter_this_thread() {
            Ok(fd) => {
                shared.listener.store(fd, Ordering::SeqCst);
                Ok(Self { shared })
            }
            Err(e) => {
                shared.listener.store(FAILED, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// The counts so far (atomic loads only: no system call). Panics if the
    /// supervisor failed, since the counts would be wrong.
    pub fn snapshot(&self) -> SyscallCounts {
        let failed = self.shared.failed.load(Ordering::SeqCst);
        assert_eq!(
            failed, 0,
            "the syscall supervisor failed with errno {failed}"
        );
        let mut by_nr = [0; TABLE];
        for (n, c) in by_nr.iter_mut().zip(&self.shared.counts) {
            *n = c.load(Ordering::SeqCst);
        }
        SyscallCounts {
            by_nr,
            other: self.shared.other.load(Ordering::SeqCst),
            futex_wakes: self.shared.futex_wakes.load(Ordering::SeqCst),
        }
    }

    /// Zeroes the counts (atomic stores only). Exact when called from the filtered
    /// thread: its every call was counted before the kernel let it return.
    pub fn reset(&self) {
        for c in &self.shared.counts {
            c.store(0, Ordering::SeqCst);
        }
        self.shared.other.store(0, Ordering::SeqCst);
        self.shared.futex_wakes.store(0, Ordering::SeqCst);
    }

    /// Whether the supervisor has ended (it does once the filtered thread is gone).
    pub fn supervisor_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }
}

/// `PR_SET_NO_NEW_PRIVS` (needed to install a filter without `CAP_SYS_ADMIN`), then a
/// filter that sends every system call of this thread to a new listener, returned.
fn filter_this_thread() -> std::io::Result<i32> {
    // SAFETY: prctl with integer arguments; affects only this thread (and what it
    // execs, which is nothing that needs new privileges).
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // One instruction: notify for everything. The filter reads neither the
    // architecture nor the number; the supervisor reads both from the notification
    // and counts a call of a foreign ABI apart, so none can be miscounted or missed.
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_USER_NOTIF,
    }];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: seccomp(2) reads the program through `prog`, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd as i32)
}

/// The supervisor: waits for the listener, then answers every notification until the
/// filtered thread is gone. Allocates nothing and takes no lock once `ready`.
fn supervise(shared: &Shared) {
    shared.ready.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    let fd = loop {
        match shared.listener.load(Ordering::SeqCst) {
            NO_LISTENER if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(100))
            }
            NO_LISTENER | FAILED => {
                shared.stopped.store(true, Ordering::SeqCst);
                return;
            }
            // SAFETY: seccomp(2) returned this descriptor to the filtered thread, which
            // handed it over and never uses or closes it.
            fd => break unsafe { OwnedFd::from_raw_fd(fd) },
        }
    };
    loop {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own. The timeout only bounds each wait: the loop runs
        // as long as the filtered thread does, and ends when it is gone.
        let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
        if rc < 0 && errno() != libc::EINTR {
            shared.failed.store(errno(), Ordering::SeqCst);
            break;
        }
        if pfd.revents & libc::POLLIN != 0 {
            if let Err(e) = answer_one(shared, &fd) {
                shared.failed.store(e, Ordering::SeqCst);
                break;
            }
        } else if pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            // No task uses the filter any more.
            break;
        }
    }
    shared.stopped.store(true, Ordering::SeqCst);
}

/// This thread's errno (a thread-local read, no system call).
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Receives one notification, counts it, and lets the system call run; an
/// unexpected errno is returned.
fn answer_one(shared: &Shared, fd: &OwnedFd) -> Result<(), i32> {
    // SAFETY: all-zero is a valid seccomp_notif, and the kernel requires it zeroed.
    let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: RECV writes one seccomp_notif into `req`, which we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } != 0 {
        // EINTR, or ENOENT: the caller was killed before we took it.
        return match errno() {
            libc::EINTR | libc::ENOENT => Ok(()),
            e => Err(e),
        };
    }
    let nr = req.data.nr;
    match usize::try_from(nr) {
        Ok(i) if i < TABLE && req.data.arch == AUDIT_ARCH_X86_64 => {
            shared.counts[i].fetch_add(1, Ordering::SeqCst)
        }
        _ => shared.other.fetch_add(1, Ordering::SeqCst),
    };
    // The operation, without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME.
    let futex_cmd = req.data.args[1] as i32 & 0x7f;
    if i64::from(nr) == libc::SYS_futex && futex_cmd == libc::FUTEX_WAKE {
        shared.futex_wakes.fetch_add(1, Ordering::SeqCst);
    }
    let resp = libc::seccomp_notif_resp {
        id: req.id,
        val: 0,
        error: 0,
        flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
    };
    loop {
        // SAFETY: SEND reads one seccomp_notif_resp we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) } == 0 {
            return Ok(());
        }
        match errno() {
            libc::EINTR => continue,       // unanswered yet: the caller still waits
            libc::ENOENT => return Ok(()), // the caller was killed meanwhile
            e => return Err(e),
        }
    }
}

impl SyscallCounts {
    /// Every system call counted.
    pub fn total(&self) -> u64 {
        self.by_nr.iter().sum::<u64>() + self.other
    }

    /// Calls of syscall `nr` (a `libc::SYS_*` number).
    pub fn of(&self, nr: libc::c_long) -> u64 {
        usize::try_from(nr)
            .ok()
            .and_then(|i| self.by_nr.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Of the `futex` calls, the `FUTEX_WAKE`s.
    pub fn futex_wakes(&self) -> u64 {
        self.futex_wakes
    }

    /// The counts as a line of `nr=count` pairs (and `other=count`), for a child to
    /// tell its parent; read back with [`parse`](Self::parse).
    pub fn to_line(&self) -> String {
        let mut parts: Vec<String> = (self.by_nr.iter().enumerate())
            .filter(|(_, &c)| c != 0)
            .map(|(nr, c)| format!("{nr}={c}"))
            .collect();
        if self.other != 0 {
            parts.push(format!("other={}", self.other));
        }
        if self.futex_wakes != 0 {
            parts.push(format!("wakes={}", self.futex_wakes));
        }
        parts.join(" ")
    }

    /// Reads a line written by [`to_line`](Self::to_line).
    pub fn parse(line: &str) -> Self {
        let mut counts = Self {
            by_nr: [0; TABLE],
            other: 0,
            futex_wakes: 0,
        };
        for part in line.split_whitespace() {
            let (nr, count) = part.split_once('=').expect("nr=count");
            let count: u64 = count.parse().expect("a count");
            match nr {
                "other" => counts.other = count,
                "wakes" => counts.futex_wakes = count,
                nr => counts.by_nr[nr.parse::<usize>().expect("a syscall number")] = count,
            }
        }
        counts
    }
}

impl std::fmt::Debug for SyscallCounts {
    /// `{futex: 3, futex wakes: 1, poll: 1}`, by name where known.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for (nr, &c) in self.by_nr.iter().enumerate().filter(|(_, &c)| c != 0) {
            map.entry(&format_args!("{}", syscall_name(nr as libc::c_long)), &c);
            if nr as libc::c_long == libc::SYS_futex {
                map.entry(&format_args!("futex wakes"), &self.futex_wakes);
            }
        }
        if self.other != 0 {
            map.entry(&"other", &self.other);
        }
        map.finish()
    }
}

/// The name of the syscalls this crate's code is expected to make, else `#nr`.
pub fn syscall_name(nr: libc::c_long) -> String {
    let known = [
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_close, "close"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_ppoll, "ppoll"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_munmap, "munmap"),
        (libc::SYS_madvise, "madvise"),
        (libc::SYS_brk, "brk"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_futex, "futex"),
        (libc::SYS_sched_yield, "sched_yield"),
        (libc::SYS_nanosleep, "nanosleep"),
        (libc::SYS_clock_nanosleep, "clock_nanosleep"),
        (libc::SYS_clock_gettime, "clock_gettime"),
        (libc::SYS_accept4, "accept4"),
        (libc::SYS_sendto, "sendto"),
        (libc::SYS_sendmsg, "sendmsg"),
        (libc::SYS_recvfrom, "recvfrom"),
        (libc::SYS_recvmsg, "recvmsg"),
        (libc::SYS_epoll_wait, "epoll_wait"),
        (libc::SYS_epoll_pwait, "epoll_pwait"),
        (libc::SYS_getpid, "getpid"),
        (libc::SYS_gettid, "gettid"),
        (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
        (libc::SYS_exit, "exit"),
        (libc::SYS_getsockopt, "getsockopt"),
        (libc::SYS_getppid, "getppid"),
        (libc::SYS_sigaltstack, "sigaltstack"),
        (libc::SYS_epoll_ctl, "epoll_ctl"),
    ];
    match known.iter().find(|(n, _)| *n == nr) {
        Some((_, name)) => name.to_string(),
        None => format!("#{nr}"),
    }
}
