//! System calls on the hot path, counted with seccomp user notification
//! (`shmhub_tests::syscalls`): a host in this process and a guest in a child play
//! ping-pong, and every system call of each side's hot thread is counted.
//!
//! With both sides spinning nobody ever parks, so neither may make a wake system call
//! (`shm.wake.signal`): what is left is the liveness checks, by design at most one
//! batch per liveness interval (`shm.live.tick`). With both
//! sides blocking, a wait that finds nothing parks at once and the other side wakes
//! it: the futex calls are counted. (Counting makes every system call slower, a
//! round trip through the supervisor thread, which shifts who finds the other
//! parked; the blocking figures are an upper-bound sketch, not a benchmark.)
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::time::{Duration, Instant};

use shm_guest::ShmGuest;
use shm_host::{Meta, PeerId, SegmentConfig, ShmHost, WaitPolicy};
use shmhub_tests::syscalls::{SyscallCounter, SyscallCounts};
use shmhub_tests::{arg, poll_until, role, tell, watchdog, Proc, ShmPath};

/// Measured round trips per path (fewer if `BUDGET` runs out first: two spinning
/// threads on a busy two-core machine can hand over only once per time slice), after
/// `WARM_UP` unmeasured ones.
const ROUND_TRIPS: u64 = 20_000;
const BUDGET: Duration = Duration::from_secs(3);
const WARM_UP: u64 = 100;
/// The timeout of every blocking call: a lost wakeup fails, it does not hang.
const STEP: Duration = Duration::from_secs(10);
/// The payload of the slot paths (the smallest class of the default config).
const SLOT_PAYLOAD: usize = 1024;
/// The message type that ends a phase (inline; its user id is the rounds played).
const END: u32 = 99;
/// Generous: one liveness check of the host costs accept4 + poll + one fcntl per
/// guest lock (plus, once, accepting the guest's doorbell connection); the guest's
/// costs poll + fcntl.
const SYSCALLS_PER_CHECK: u64 = 8;

/// How a message travels.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// 8 bytes inside the descriptor.
    Inline,
    /// 1 KiB copied into and out of a slot.
    Copy,
    /// 1 KiB written in place through a loan, read in place through a view.
    ZeroCopy,
}

const PATHS: [Path; 3] = [Path::Inline, Path::Copy, Path::ZeroCopy];

/// The system calls of one side's hot thread during one path's measured round trips
/// (the closing `END` exchange included).
#[derive(Debug, Clone, Copy)]
struct Phase {
    counts: SyscallCounts,
    elapsed: Duration,
    rounds: u64,
}

/// For every path, plays a warm-up then a measured phase with `play(path, rounds)`
/// (which returns the rounds played), on a new thread whose system calls are counted;
/// the thread exits afterwards (a filter cannot be removed).
fn counted_phases(mut play: impl FnMut(Path, u64) -> u64 + Send) -> Vec<Phase> {
    let (phases, counter) = std::thread::scope(|s| {
        s.spawn(|| {
            let counter = SyscallCounter::install().expect("seccomp user notification");
            let mut phases = Vec::with_capacity(PATHS.len());
            for path in PATHS {
                play(path, WARM_UP);
                counter.reset();
                let start = Instant::now();
                let rounds = play(path, ROUND_TRIPS);
                let elapsed = start.elapsed();
                let counts = counter.snapshot();
                phases.push(Phase {
                    counts,
                    elapsed,
                    rounds,
                });
            }
            (phases, counter.clone())
        })
        .join()
        .expect("the counted thread")
    });
    poll_until(STEP, "the supervisor to stop", || {
        counter.supervisor_stopped().then_some(())
    });
    phases
}

/// The host's side of a phase: up to `max` round trips (send, wait for the echo)
/// within `BUDGET`, then `END` and its echo.
fn host_phase(host: &mut ShmHost, peer: PeerId, path: Path, max: u64, buf: &mut Vec<u8>) -> u64 {
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < max && start.elapsed() < BUDGET {
        host_round_trip(host, peer, path, rounds, buf);
        rounds += 1;
    }
    host.send(peer, Meta::new(END, rounds), b"end", STEP)
        .unwrap();
    let got = host
        .recv(buf, STEP)
        .unwrap()
        .expect("the end echoed in time");
    assert_eq!(
        (got.meta, buf.as_slice()),
        (Meta::new(END, rounds), &b"end"[..])
    );
    rounds
}

/// Round trip `n`: send, then wait for the echo.
fn host_round_trip(host: &mut ShmHost, peer: PeerId, path: Path, n: u64, buf: &mut Vec<u8>) {
    let stamp = n.to_le_bytes();
    let got = match path {
        Path::Inline => {
            host.send(peer, Meta::new(1, n), &stamp, STEP).unwrap();
            let got = host.recv(buf, STEP).unwrap().expect("an echo in time");
            assert_eq!(buf.as_slice(), stamp);
            got
        }
        Path::Copy => {
            let mut payload = [0u8; SLOT_PAYLOAD];
            payload[..8].copy_from_slice(&stamp);
            host.send(peer, Meta::new(2, n), &payload, STEP).unwrap();
            let got = host.recv(buf, STEP).unwrap().expect("an echo in time");
            assert_eq!((buf.len(), &buf[..8]), (SLOT_PAYLOAD, &stamp[..]));
            got
        }
        Path::ZeroCopy => {
            let mut loan = host.loan_timeout(peer, SLOT_PAYLOAD, STEP).unwrap();
            assert!(loan.write_at(0, &stamp));
            loan.send(Meta::new(3, n), SLOT_PAYLOAD).unwrap();
            let (got, msg) = host.recv_message(STEP).unwrap().expect("an echo in time");
            let mut head = [0u8; 8];
            assert!(msg.is_zero_copy() && msg.copy_to(0, &mut head));
            assert_eq!(head, stamp);
            got
        }
    };
    assert_eq!((got.from, got.meta.user_id), (peer, n));
}

/// The guest's side of a phase: echoes every message, `END` included, and returns
/// the rounds played before it.
fn guest_phase(guest: &mut ShmGuest, path: Path, buf: &mut Vec<u8>) -> u64 {
    let mut rounds = 0;
    while guest_round_trip(guest, path, rounds, buf) {
        rounds += 1;
    }
    assert_eq!(buf.as_slice(), b"end");
    rounds
}

/// Round trip `n`: wait for the host's message, echo it; false if it was `END`.
fn guest_round_trip(guest: &mut ShmGuest, path: Path, n: u64, buf: &mut Vec<u8>) -> bool {
    let meta = match path {
        Path::Inline | Path::Copy => {
            let meta = guest.recv(buf, STEP).unwrap().expect("a message in time");
            guest.send(meta, buf, STEP).unwrap();
            meta
        }
        Path::ZeroCopy => {
            let msg = guest
                .recv_message(STEP)
                .unwrap()
                .expect("a message in time");
            if msg.meta().msg_type == END {
                msg.copy_into(buf);
                guest.send(msg.meta(), buf, STEP).unwrap();
                return false;
            }
            let mut head = [0u8; 8];
            assert!(msg.is_zero_copy() && msg.copy_to(0, &mut head));
            let mut loan = guest.loan_timeout(SLOT_PAYLOAD, STEP).unwrap();
            assert!(loan.write_at(0, &head));
            loan.send(msg.meta(), SLOT_PAYLOAD).unwrap();
            // Dropping the view frees its slot (and would wake a host parked for one).
            msg.meta()
        }
    };
    if meta.msg_type == END {
        return false;
    }
    assert_eq!(meta.user_id, n);
    true
}

fn policy_named(name: &str) -> WaitPolicy {
    match name {
        "spin" => WaitPolicy::SPIN,
        "block" => WaitPolicy::BLOCK,
        other => panic!("no policy {other}"),
    }
}

/// The child: attaches, echoes every round trip on a counted thread, and reports
/// each phase as `phase <elapsed ns> <rounds> <counts>`.
fn guest_main() {
    watchdog();
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    guest.set_wait_policy(policy_named(&arg("POLICY")));
    tell("attached");
    let mut buf = Vec::new();
    let phases = counted_phases(|path, _| guest_phase(&mut guest, path, &mut buf));
    for phase in phases {
        let (ns, rounds) = (phase.elapsed.as_nanos(), phase.rounds);
        tell(&format!("phase {ns} {rounds} {}", phase.counts.to_line()));
    }
}

/// One side's figures for one path.
struct Side {
    name: &'static str,
    phase: Phase,
}

impl Side {
    fn total(&self) -> u64 {
        self.phase.counts.total()
    }

    /// Round trips in the phase, the closing `END` included.
    fn round_trips(&self) -> u64 {
        self.phase.rounds + 1
    }

    /// System calls per round trip.
    fn per_round_trip(&self) -> f64 {
        self.total() as f64 / self.round_trips() as f64
    }

    /// System calls per message this side handled (it sends one and receives one per
    /// round trip).
    fn per_message(&self) -> f64 {
        self.per_round_trip() / 2.0
    }

    fn wake_calls(&self) -> u64 {
        let c = &self.phase.counts;
        c.of(libc::SYS_futex) + c.of(libc::SYS_sendto)
    }
}

/// Plays ping-pong with a guest child, both sides with `policy`; returns the host's
/// and the guest's figures for each path.
fn ping_pong(test: &str, policy: &str) -> Vec<(Path, Side, Side)> {
    let seg = ShmPath::new("syscalls");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    host.set_wait_policy(policy_named(policy));
    let env = [
        ("SEG", seg.path().display().to_string()),
        ("POLICY", policy.to_string()),
    ];
    let mut child = Proc::spawn(test, "guest", &env, Duration::from_secs(120));
    child.expect("attached");
    let peer = host.attached_peers()[0];
    let mut buf = Vec::new();
    let host_phases = counted_phases(|path, max| host_phase(&mut host, peer, path, max, &mut buf));
    let guest_phases: Vec<Phase> = PATHS
        .iter()
        .map(|_| {
            let line = child.expect("phase");
            let mut words = line.splitn(3, ' ');
            let mut number = || words.next().unwrap().parse().unwrap();
            let (elapsed, rounds) = (Duration::from_nanos(number()), number());
            let counts = SyscallCounts::parse(words.next().unwrap_or(""));
            Phase {
                counts,
                elapsed,
                rounds,
            }
        })
        .collect();
    child.assert_success();
    (PATHS.iter().zip(host_phases).zip(guest_phases))
        .map(|((&path, h), g)| {
            assert_eq!(h.rounds, g.rounds, "{path:?}: both sides played as many");
            let host = Side {
                name: "host",
                phase: h,
            };
            let guest = Side {
                name: "guest",
                phase: g,
            };
            eprintln!(
                "{policy} {path:?}: {} round trips in {:?}; host {} syscalls \
                 ({:.4}/msg) {:?}; guest {} syscalls ({:.4}/msg) {:?}",
                host.round_trips(),
                host.phase.elapsed,
                host.total(),
                host.per_message(),
                host.phase.counts,
                guest.total(),
                guest.per_message(),
                guest.phase.counts,
            );
            (path, host, guest)
        })
        .collect()
}

// shm[verify shm.wake.signal]
// shm[verify shm.wake.host-bell]
#[test]
fn spinning_peers_make_no_system_call_per_message() {
    const TEST: &str = "spinning_peers_make_no_system_call_per_message";
    if role().as_deref() == Some("guest") {
        return guest_main();
    }
    for (path, host, guest) in ping_pong(TEST, "spin") {
        for side in [&host, &guest] {
            let name = side.name;
            // Nobody parks, so nobody is woken: not one wake system call.
            assert_eq!(
                side.wake_calls(),
                0,
                "{path:?}: {name} made wake calls with nobody parked: {:?}",
                side.phase.counts
            );
            // What remains is liveness checks, at most one batch per interval
            // (`shm.live.tick`). Per message that is about 0 at full speed, but on a
            // loaded machine two spinners may hand over once per time slice, so a
            // per-message bound would measure the scheduler: the bound is per time.
            let interval = shm_host::DEFAULT_LIVENESS_INTERVAL;
            let checks = side.phase.elapsed.as_nanos() / interval.as_nanos() + 2;
            assert!(
                side.total() <= checks as u64 * SYSCALLS_PER_CHECK,
                "{path:?}: {name} made {} syscalls in {:?}: {:?}",
                side.total(),
                side.phase.elapsed,
                side.phase.counts
            );
        }
    }
}

// shm[verify shm.wake.signal]
#[test]
fn blocking_peers_make_a_few_system_calls_per_message() {
    const TEST: &str = "blocking_peers_make_a_few_system_calls_per_message";
    if role().as_deref() == Some("guest") {
        return guest_main();
    }
    for (path, host, guest) in ping_pong(TEST, "block") {
        for side in [&host, &guest] {
            let name = side.name;
            // Waits park and parked waiters are woken: the counter sees futexes.
            assert!(
                side.phase.counts.of(libc::SYS_futex) > 0,
                "{path:?}: {name} never parked or woke: {:?}",
                side.phase.counts
            );
            // At most: its own wait, and the wake of the other side, per message,
            // with room to spare for waits that return at once.
            let per_round_trip = side.per_round_trip();
            assert!(
                per_round_trip <= 4.0,
                "{path:?}: {name} made {per_round_trip:.2} syscalls per round trip: {:?}",
                side.phase.counts
            );
        }
    }
}

/// The instrument itself: it counts every call of its thread, exactly, and none of
/// any other thread; its supervisor ends with the thread.
#[test]
fn the_counter_counts_exactly_the_calls_of_its_thread() {
    let getppid = || {
        // SAFETY: getppid has no arguments and no memory effects.
        unsafe { libc::syscall(libc::SYS_getppid) }
    };
    let (counts, counter) = std::thread::spawn(move || {
        let counter = SyscallCounter::install().expect("seccomp user notification");
        counter.reset();
        for _ in 0..3 {
            getppid();
        }
        (counter.snapshot(), counter)
    })
    .join()
    .unwrap();
    // Calls made by this (unfiltered) thread meanwhile are not seen.
    getppid();
    eprintln!("{counts:?}");
    assert_eq!((counts.of(libc::SYS_getppid), counts.total()), (3, 3));
    poll_until(STEP, "the supervisor to stop", || {
        counter.supervisor_stopped().then_some(())
    });
    // The filter stayed until the thread was gone: its exit was counted too.
    let after = counter.snapshot();
    eprintln!("with the thread's exit: {after:?}");
    assert_eq!(after.of(libc::SYS_exit), 1);
}
