//! The host-wide bell (`shm.wake.host-bell`) and the host's doorbell arm
//! (`shm.doorbell.arm`, `shm.doorbell.ring`): two guests each publish one message with
//! the real `Producer::push` into their own ring, then ring the real `HostBell::ring`
//! (what `SegmentHeader::ring_host_bell` runs), while the host waits for both messages:
//! parked on the bell by the real `wait::wait_for` and `HostBell`'s `Bell::arm`, or
//! armed on its doorbells by the real `HostBell::arm_doorbell`. Its attempt and re-check
//! is the real `Consumer::peek` of each ring. The host's loops are transcribed from
//! shm-host's `ShmHost::recv_with` and `AsyncHost::recv` (with `arm_doorbell_recv` and
//! `after_recv`), which take a segment and cannot be instantiated over loom's atomics.
//! A lost wakeup leaves the host asleep for good (neither stand-in has a timeout), which
//! loom reports as a deadlock.
//!
//! Three threads, two of which publish a whole descriptor, make every interleaving
//! take far too long (over 20 minutes in a debug build; 3 preemptions: over a minute):
//! both models are bounded to 2 preemptions, a few seconds each.
//!
//! With two guests the host may park twice, which `models::wake` avoids: loom lets a
//! SeqCst load return a Relaxed store (the disarm's 0) that precedes, in the word's
//! modification order, a SeqCst store (the re-arm) executed before the load. C++20 forbids
//! it (the load would be coherence-ordered before the re-arm, so before it in the SeqCst
//! order, and so before the host's re-check, which then sees the guest's SeqCst tail
//! store). The header's words here are [`Word`]s, which make exactly those stores of 0
//! SeqCst, so that loom's rule for SeqCst stores applies to them; the arms' stores and
//! fences and the guests' loads keep the orderings the product gives them.
//!
//! Loom errs the other way on fences: an arm whose flag store were Relaxed would still
//! be sound in C++20 thanks to the SeqCst fence after it, yet loom reports the lost
//! wakeup, since it orders a fence only against other fences. And it does not need the
//! fence where the re-check's loads are SeqCst (`Consumer::peek`'s tail): dropping the
//! fence alone passes, as the memory model says it should.

use loom::sync::atomic::AtomicU32;
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::model;
use super::ring::{message, Ring};
use crate::desc::Descriptor;
use crate::doorbell::NOT_PARKED;
use crate::freelist::Atom;
use crate::futex::FutexWord;
use crate::header::HostBell;
use crate::ring::{Consumer, Producer};
use crate::violation::Violation;
use crate::wait::{wait_for, WaitPolicy};

const GUESTS: usize = 2;

/// A word of the segment header over loom's `AtomicU32` whose stores of 0 (the
/// disarms) are SeqCst; see the module docs for why.
struct Word(AtomicU32);

impl Word {
    /// A word holding 0, stored SeqCst (see `models::wake`).
    fn new() -> Self {
        let word = Word(AtomicU32::new(NOT_PARKED));
        word.0.store(NOT_PARKED, Ordering::SeqCst);
        word
    }
}

impl Atom for Word {
    type V = u32;

    fn load(&self, order: Ordering) -> u32 {
        self.0.load(order)
    }

    fn store(&self, v: u32, order: Ordering) {
        let order = if v == NOT_PARKED {
            Ordering::SeqCst
        } else {
            order
        };
        self.0.store(v, order);
    }

    fn cas(&self, c: u32, n: u32, s: Ordering, f: Ordering) -> Result<u32, u32> {
        self.0.compare_exchange(c, n, s, f)
    }

    fn fetch_add(&self, v: u32, order: Ordering) -> u32 {
        self.0.fetch_add(v, order)
    }

    fn fetch_sub(&self, v: u32, order: Ordering) -> u32 {
        self.0.fetch_sub(v, order)
    }
}

impl FutexWord for Word {
    fn futex_wait(&self, expected: u32, timeout: Duration) {
        self.0.futex_wait(expected, timeout);
    }

    fn futex_wake(&self) {
        self.0.futex_wake();
    }

    fn futex_bump(&self) {
        self.0.futex_bump();
    }

    fn seq_cst_fence() {
        AtomicU32::seq_cst_fence();
    }
}

/// What the models share: the header's two words of the host bell, each guest's
/// ToHost ring, and a stand-in for the host's doorbells.
struct Segment {
    bell: Word,
    parked: Word,
    rings: [Ring; GUESTS],
    doorbells: Doorbells,
}

impl Segment {
    fn new() -> Self {
        Segment {
            bell: Word::new(),
            parked: Word::new(),
            rings: [Ring::new(1), Ring::new(1)],
            doorbells: Doorbells::default(),
        }
    }

    fn host_bell(&self) -> HostBell<'_, Word> {
        HostBell::new(&self.bell, &self.parked)
    }
}

/// The host's doorbells, as its epoll set sees them: bytes pending on each guest's
/// connection. A ring is never lost: it stays pending until the host drains it.
#[derive(Default)]
struct Doorbells {
    pending: Mutex<[u32; GUESTS]>,
    readable: Condvar,
}

impl Doorbells {
    /// A guest writes one byte into its doorbell (`doorbell::ring`).
    fn ring(&self, guest: usize) {
        self.pending.lock().unwrap()[guest] += 1;
        self.readable.notify_all();
    }

    /// The host consumes every pending byte (`Doorbells::drain` in shm-host).
    fn drain(&self) {
        *self.pending.lock().unwrap() = [0; GUESTS];
    }

    /// The host waits for its epoll set to become readable, without a timeout.
    fn wait_readable(&self) {
        let mut pending = self.pending.lock().unwrap();
        while pending.iter().all(|&n| n == 0) {
            pending = self.readable.wait(pending).unwrap();
        }
    }
}

/// Guest `i` publishes message `i` into its ring, then rings the host bell, reaching
/// for its doorbell only if `doorbell` says the host may wait on one.
fn guest(segment: &Segment, i: usize, doorbell: bool) {
    let ring = &segment.rings[i];
    Producer::new()
        .push(&ring.view(), message(i as u64), None)
        .unwrap();
    segment.host_bell().ring(|| {
        assert!(
            doorbell,
            "the host parks on the futex, not on its doorbells"
        );
        segment.doorbells.ring(i);
    });
}

/// The host's receive pass: the first guest whose ring holds a message.
fn scan(
    segment: &Segment,
    consumers: &mut [Consumer; GUESTS],
) -> Result<Option<(usize, Descriptor)>, Violation> {
    for (i, consumer) in consumers.iter_mut().enumerate() {
        if let Some(desc) = consumer.peek(&segment.rings[i].view())? {
            return Ok(Some((i, desc)));
        }
    }
    Ok(None)
}

/// The host consumes the message `scan` found and checks it is guest `from`'s.
fn take(
    segment: &Segment,
    consumers: &mut [Consumer; GUESTS],
    received: &mut [bool; GUESTS],
    (from, desc): (usize, Descriptor),
) {
    let expected = Descriptor {
        seq: 0,
        ..message(from as u64)
    };
    assert_eq!(desc, expected, "guest {from}'s message");
    assert!(!received[from], "guest {from}'s message twice");
    received[from] = true;
    consumers[from].advance(&segment.rings[from].view());
}

/// Preemptions each model explores (see the module docs).
const BOUND: Option<usize> = Some(2);

/// Runs the guests and `host` in threads of their own.
fn run(doorbell: bool, host: fn(&Segment)) {
    let segment = Arc::new(Segment::new());
    let guests: Vec<_> = (0..GUESTS)
        .map(|i| {
            let segment = segment.clone();
            thread::spawn(move || guest(&segment, i, doorbell))
        })
        .collect();
    let host = {
        let segment = segment.clone();
        thread::spawn(move || host(&segment))
    };
    for guest in guests {
        guest.join().unwrap();
    }
    host.join().unwrap();
}

// Two guests each publish one message and ring the host bell while the host, finding
// nothing, parks on it (flag, fence, snapshot of the bell, re-check of both rings,
// sleep on the snapshot) and receives, as often as it takes to get both messages. The
// host always wakes and receives both: its re-check sees a guest's tail, or that guest
// sees the flag, moves the bell and wakes it (a bump between snapshot and sleep makes
// the sleep return at once).
// shm[verify shm.wake.host-bell]
// shm[verify shm.wake.park]
#[test]
fn a_host_parked_on_the_host_bell_always_wakes() {
    model(BOUND, || {
        run(false, |segment| {
            let bell = segment.host_bell();
            let mut consumers = [Consumer::new(), Consumer::new()];
            let mut received = [false; GUESTS];
            for _ in 0..GUESTS {
                let got = wait_for(WaitPolicy::BLOCK, Duration::MAX, &bell, || {
                    scan(segment, &mut consumers)
                });
                let found = got.unwrap().expect("no timeout: only a wake ends a sleep");
                take(segment, &mut consumers, &mut received, found);
            }
            assert_eq!(segment.parked.load(Ordering::Relaxed), NOT_PARKED);
        });
    });
}

// The same with the host waiting on its doorbells: it tries, drains its doorbells,
// arms (flag 2, fence), re-checks both rings, and only then waits for a doorbell to be
// readable; the first receive after an arm disarms. A guest that sees the flag writes
// to its doorbell, which stays readable until the next drain. The host always wakes
// and receives both messages, and no guest moves the futex bell.
// shm[verify shm.doorbell.arm]
// shm[verify shm.doorbell.ring]
#[test]
fn a_host_armed_on_its_doorbells_always_wakes() {
    model(BOUND, || {
        run(true, |segment| {
            let bell = segment.host_bell();
            let mut consumers = [Consumer::new(), Consumer::new()];
            let mut received = [false; GUESTS];
            let mut armed = false;
            for _ in 0..GUESTS {
                let found = loop {
                    if let Some(found) = scan(segment, &mut consumers).unwrap() {
                        break found;
                    }
                    segment.doorbells.drain();
                    bell.arm_doorbell();
                    armed = true;
                    if let Some(found) = scan(segment, &mut consumers).unwrap() {
                        break found;
                    }
                    segment.doorbells.wait_readable();
                };
                if armed {
                    armed = false;
                    bell.disarm_doorbell();
                }
                take(segment, &mut consumers, &mut received, found);
            }
            assert_eq!(segment.bell.load(Ordering::Relaxed), 0, "futex untouched");
        });
    });
}
