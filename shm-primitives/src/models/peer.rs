//! The peer table (`shm.peer.*`): the real `PeerEntry` transitions over loom's atomics,
//! one entry raced by the host and guests. The host's side is a transcription of the
//! order in which `shm-host` calls them (`peers::recycle`, `peers::recover`, reserve and
//! release in `ShmHost`), which lives in another crate and cannot be instantiated here.

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;

use super::model;
use crate::peer::{PeerEntry, PeerState, PeerWord};

/// A fault code the host records when it fences.
const FAULT: u32 = 9;

/// One peer entry over loom's atomics, plus witnesses: `area` stands for the entry's
/// guest area (rings, pools), which its holder writes — the attached guest, or the host
/// resetting it for the next one — and `holders` counts the parties holding the entry.
struct Entry {
    entry: PeerEntry<AtomicU64, AtomicU32>,
    area: UnsafeCell<u64>,
    holders: AtomicU32,
}

impl Entry {
    /// A fresh entry: Empty(0).
    fn new() -> Self {
        Entry {
            entry: PeerEntry {
                state_word: AtomicU64::new(0),
                guest_pid: AtomicU32::new(0),
                fault: AtomicU32::new(0),
                _reserved: Default::default(),
            },
            area: UnsafeCell::new(0),
            holders: AtomicU32::new(0),
        }
    }

    /// A party starts holding the entry: nobody else may.
    fn hold(&self, who: u32) {
        let before = self.holders.fetch_add(1, Ordering::Relaxed);
        assert_eq!(before, 0, "party {who} holds the entry with another");
    }

    fn unhold(&self) {
        let before = self.holders.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(before, 1);
    }

    /// The holder uses the guest area.
    fn touch(&self, who: u32) {
        self.area.with_mut(|a| {
            // SAFETY: a loom cell; loom fails the model if two holders' writes are not
            // ordered by the entry's transitions.
            unsafe { *a = u64::from(who) }
        });
    }

    fn word(&self) -> PeerWord {
        self.entry.load().expect("only valid states are written")
    }

    /// The host recycles an entry it read as Goodbye(g) (`peers::recycle`): it holds
    /// the area from that Acquire load, resets it, then moves Goodbye(g) to Empty(g+1).
    fn recycle(&self, generation: u32) {
        self.hold(0);
        self.touch(0);
        self.unhold();
        assert!(
            self.entry.recycle(generation),
            "only the host leaves Goodbye"
        );
    }
}

/// How a guest attaches.
#[derive(Clone, Copy)]
enum Attach {
    /// By path: the first Empty entry (`shm.peer.attach-path`).
    Path,
    /// With a spawn ticket for the reservation of generation 0
    /// (`shm.peer.attach-reserved`).
    Ticket,
}

/// A guest with process id `pid` attaches, uses its area and detaches; returns the
/// generation it claimed.
fn guest(e: &Entry, how: Attach, pid: u32) -> Option<u32> {
    let claimed = match how {
        Attach::Path => e.entry.try_claim(PeerState::Empty, None, pid),
        Attach::Ticket => e.entry.try_claim(PeerState::Reserved, Some(0), pid),
    };
    let generation = claimed.ok()?;
    e.hold(pid);
    e.touch(pid);
    e.unhold();
    assert!(e.entry.goodbye(generation), "nobody fences here");
    Some(generation)
}

// The host reserves the entry for a child and, the child having failed to start,
// releases the reservation and reserves the next incarnation, while a guest attaches by
// path and the first child attaches with its ticket. Of the three, the transitions let through at most one
// holder at a time: the ticket claims only the reservation it was made for, a path
// attach never takes a Reserved entry, a released reservation can no longer be claimed;
// the generation grows by one with each return to Empty; the entry is never lost (the
// host can always bring it back to Empty).
// shm[verify shm.peer.states]
// shm[verify shm.peer.reserve]
// shm[verify shm.peer.release-reservation]
// shm[verify shm.peer.attach-path]
// shm[verify shm.peer.attach-reserved]
#[test]
fn reserve_release_and_claims_leave_one_holder() {
    model(Some(3), || {
        let e = Arc::new(Entry::new());
        let spawn = |how, pid| {
            let e = e.clone();
            thread::spawn(move || guest(&e, how, pid))
        };
        let (by_path, by_ticket) = (spawn(Attach::Path, 1), spawn(Attach::Ticket, 2));
        // The host runs in a thread of its own too: loom then interleaves all three
        // from their first step.
        let host = {
            let e = e.clone();
            thread::spawn(move || {
                let reserved = e.entry.try_reserve();
                let released = reserved.is_some() && e.entry.release_reservation();
                // And reserves the next incarnation for another child, whose ticket
                // the first child's must not claim.
                let again = if released {
                    e.entry.try_reserve()
                } else {
                    None
                };
                (reserved, released, again)
            })
        };
        let (reserved, released, again) = host.join().unwrap();
        let (by_path, by_ticket) = (by_path.join().unwrap(), by_ticket.join().unwrap());
        // The ticket claims only the reservation, and only if it was not released.
        if by_ticket.is_some() {
            assert_eq!((reserved, released, by_ticket), (Some(0), false, Some(0)));
            assert_eq!(
                by_path, None,
                "the entry had one incarnation and it was taken"
            );
        }
        match by_path {
            Some(0) => assert_eq!(reserved, None, "a path attach took a Reserved entry"),
            Some(1) => {
                assert!(released, "a path attach took a reserved incarnation");
                assert_eq!(again, None, "a path attach took a Reserved entry");
            }
            Some(g) => panic!("claimed generation {g}"),
            None => {}
        }
        // The host brings the entry back to Empty.
        let word = e.word();
        match word.state {
            PeerState::Goodbye => e.recycle(word.generation),
            PeerState::Reserved => assert!(e.entry.release_reservation()),
            PeerState::Empty => {}
            PeerState::Attached => panic!("every guest detached"),
        }
        let returns = u32::from(released) + u32::from(word.state != PeerState::Empty);
        let end = e.word();
        assert_eq!(end.state, PeerState::Empty);
        assert_eq!(
            end.generation, returns,
            "one generation per return to Empty"
        );
    });
}

// A guest attaches by path and dies without detaching; the host, having found it dead,
// recovers the entry (the single cleaner's CAS Attached(g) -> Goodbye(g), then the
// recycle) while a second guest keeps trying to attach by path, and detaches once it
// gets in. The second guest gets the entry only as a later incarnation, after the host
// reset its area (or before the first ever had it); one holder at a time; every
// incarnation is recycled once and the generation counts them.
// shm[verify shm.peer.detach]
// shm[verify shm.peer.recycle]
#[test]
fn crash_reclaim_and_a_racing_attach_leave_one_holder() {
    model(Some(3), || {
        let e = Arc::new(Entry::new());
        let dying = {
            let e = e.clone();
            thread::spawn(move || {
                let generation = e.entry.try_claim(PeerState::Empty, None, 1).ok()?;
                e.hold(1);
                e.touch(1);
                // Dies holding the entry: no goodbye.
                Some(generation)
            })
        };
        let retrying = {
            let e = e.clone();
            thread::spawn(move || {
                for _ in 0..3 {
                    if let Some(generation) = guest(&e, Attach::Path, 2) {
                        return Some(generation);
                    }
                    thread::yield_now();
                }
                None
            })
        };
        // The host finds the first guest dead (the join stands for its lock or pidfd)
        // and, if it still holds its incarnation, recovers it.
        let host = {
            let e = e.clone();
            thread::spawn(move || {
                let generation = dying.join().unwrap()?;
                let attached = PeerWord {
                    state: PeerState::Attached,
                    generation,
                };
                let goodbye = PeerWord {
                    state: PeerState::Goodbye,
                    generation,
                };
                assert!(e.entry.cas(attached, goodbye), "a dead guest's entry stays");
                e.unhold();
                e.recycle(generation);
                Some(generation)
            })
        };
        let mut recycled = u32::from(host.join().unwrap().is_some());
        let second = retrying.join().unwrap();
        let word = e.word();
        if word.state == PeerState::Goodbye {
            e.recycle(word.generation);
            recycled += 1;
        }
        let end = e.word();
        assert_eq!(end.state, PeerState::Empty);
        assert_eq!(end.generation, recycled);
        // Both got in: one incarnation each, the second guest's after the first's.
        if let Some(g) = second {
            assert!(g < end.generation);
        }
    });
}

// The host fences an attached guest (a violation) while the guest detaches: the
// guest's CAS either comes first or fails, and when it fails the guest reads the fault
// the host recorded. The host recycles only once the guest is dead, re-fencing first
// as `peers::recover` does, and a third party attaching by path meanwhile never gets
// the fenced incarnation.
// shm[verify shm.untrusted.fence]
// shm[verify shm.peer.detach]
#[test]
fn a_fence_racing_a_detach_keeps_the_entry_fenced() {
    model(None, || {
        let e = Arc::new(Entry::new());
        assert_eq!(e.entry.try_claim(PeerState::Empty, None, 1), Ok(0));
        e.hold(1);
        let fenced = {
            let e = e.clone();
            thread::spawn(move || {
                e.touch(1);
                e.unhold();
                let left = e.entry.goodbye(0);
                if !left {
                    assert_eq!(e.entry.fault.load(Ordering::Relaxed), FAULT);
                }
                left
            })
        };
        let newcomer = {
            let e = e.clone();
            thread::spawn(move || guest(&e, Attach::Path, 3))
        };
        let host = {
            let e = e.clone();
            thread::spawn(move || {
                // The host saw Attached(0) misbehave.
                e.entry.fence(0, FAULT);
                fenced.join().unwrap();
                // Dead: recovered at the fence generation whatever the word says.
                e.entry.fence(0, FAULT);
                e.recycle(0);
            })
        };
        host.join().unwrap();
        match newcomer.join().unwrap() {
            Some(g) => {
                assert_eq!(g, 1, "the fenced incarnation was claimed");
                e.recycle(1);
                assert_eq!(e.word().generation, 2);
            }
            None => assert_eq!(e.word().generation, 1),
        }
        assert_eq!(e.word().state, PeerState::Empty);
    });
}
