//! Loom model of the release count (`shm.broadcast.release`, `shm.broadcast.reclaim`):
//! the real `Record::release` and `release_all` over loom's atomics.

use super::{release_all, take_free, Record, Release};
use crate::peer::PeerId;
use crate::slot::{pack, SlotState};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;

const GENERATION: u32 = 7;

/// One broadcast slot, Sent(7) to guests 1, 2 and 3, with its payload in a loom cell
/// so that loom reports any read of it not ordered before the host's next write.
struct Slot {
    state: AtomicU64,
    remaining: AtomicU32,
    holders: Vec<AtomicU64>,
    payload: UnsafeCell<u64>,
}

impl Slot {
    fn sent_to(ids: &[u8]) -> Self {
        let bits = ids.iter().fold(0, |b, &id| b | 1 << (id - 1));
        Slot {
            state: AtomicU64::new(pack(SlotState::Sent, GENERATION)),
            remaining: AtomicU32::new(ids.len() as u32),
            holders: (0..4)
                .map(|w| AtomicU64::new(if w == 0 { bits } else { 0 }))
                .collect(),
            payload: UnsafeCell::new(42),
        }
    }

    fn record(&self) -> Record<'_, AtomicU64, AtomicU32> {
        Record {
            state: &self.state,
            remaining: &self.remaining,
            holders: &self.holders,
        }
    }

    /// A holder: reads the payload, then gives up its reference.
    fn read_and_release(&self, id: u8) -> Release {
        // SAFETY: a loom cell; loom checks that this read is ordered before the host's
        // write in the model, and reports a missing happens-before as a failure.
        let seen = self.payload.with(|p| unsafe { *p });
        assert_eq!(
            seen, 42,
            "guest {id} read a payload that was being rewritten"
        );
        let peer = PeerId::new(id).unwrap();
        self.record()
            .release(peer, pack(SlotState::Sent, GENERATION))
            .expect("an honest record")
    }
}

impl Slot {
    /// Guest 3, leaving: gives up its reference without reading. The host may have
    /// released it already and the others freed the slot (and the host retaken it):
    /// then the state check stops it before it touches anything.
    fn late_release(&self) -> Release {
        let sent = pack(SlotState::Sent, GENERATION);
        match self.record().release(PeerId::new(3).unwrap(), sent) {
            Ok(done) => done,
            Err(found) => {
                let gone = [
                    pack(SlotState::Free, GENERATION),
                    pack(SlotState::Loaned, GENERATION + 1),
                ];
                assert!(gone.contains(&found), "found {found:#x}");
                Release::NotHeld
            }
        }
    }
}

/// Runs `f` under loom with at most `bound` preemptions unless `LOOM_MAX_PREEMPTIONS`
/// says otherwise.
fn model<F: Fn() + Sync + Send + 'static>(bound: usize, f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(bound);
    }
    builder.check(f);
}

// Guests 1 and 2 read and release; guest 3 releases (it is leaving: it no longer reads)
// while the host releases on its behalf, then tries to reallocate the slot and write a
// new payload. Exactly one of guest 3 and the host counts guest 3's bit; the slot is
// freed exactly once and ends Free(7) (or Loaned(8), taken by the host) with no bits
// and a zero count; and the host's write never races a holder's read. Exhaustive takes
// minutes; two preemptions take seconds.
// shm[verify shm.broadcast.release]
// shm[verify shm.broadcast.reclaim]
#[test]
fn holders_and_the_host_free_a_broadcast_slot_exactly_once() {
    model(2, || {
        let slot = Arc::new(Slot::sent_to(&[1, 2, 3]));
        let guests: Vec<_> = [1u8, 2, 3]
            .into_iter()
            .map(|id| {
                let slot = slot.clone();
                thread::spawn(move || match id {
                    3 => slot.late_release(),
                    _ => slot.read_and_release(id),
                })
            })
            .collect();
        // The host: guest 3 is gone, release what it holds.
        let counts = release_all([slot.record()], PeerId::new(3).unwrap());
        assert_eq!(counts.refused, 0);
        // Then, if the slot is Free already, take it and write the next payload.
        let retaken = take_free(&slot.state);
        if let Some(generation) = retaken {
            assert_eq!(generation, GENERATION + 1);
            slot.payload.with_mut(|p| {
                // SAFETY: a loom cell; loom fails the model if any holder's read is
                // not ordered before this write.
                unsafe { *p = 43 }
            });
        }
        let outcomes: Vec<Release> = guests.into_iter().map(|g| g.join().unwrap()).collect();
        let freed = outcomes.iter().filter(|&&o| o == Release::Freed).count() as u32;
        assert_eq!(
            freed + counts.freed,
            1,
            "freed exactly once: {outcomes:?} {counts:?}"
        );
        // Guests 1 and 2 each counted their own bit; guest 3's was counted once.
        assert!(outcomes[..2].iter().all(|&o| o != Release::NotHeld));
        let by_guest3 = u32::from(outcomes[2] != Release::NotHeld);
        assert_eq!(by_guest3 + counts.cleared, 1, "guest 3's bit counted once");
        assert_eq!(slot.remaining.load(Ordering::Relaxed), 0);
        assert!(slot.holders.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        let end = match retaken {
            Some(_) => pack(SlotState::Loaned, GENERATION + 1),
            None => pack(SlotState::Free, GENERATION),
        };
        assert_eq!(slot.state.load(Ordering::Relaxed), end);
    });
}

// The orderings, exhaustively on a smaller model: guest 1 reads and releases while the
// host releases for guest 2 (gone) and then, if the slot is Free, retakes it and writes
// the next payload. Whoever frees, guest 1's read happens before the host's write
// (loom reports the race otherwise: a Relaxed decrement or free fails this model).
// shm[verify shm.broadcast.release]
#[test]
fn the_hosts_next_write_never_races_a_holders_read() {
    loom::model(|| {
        let slot = Arc::new(Slot::sent_to(&[1, 2]));
        let guest = {
            let slot = slot.clone();
            thread::spawn(move || slot.read_and_release(1))
        };
        let counts = release_all([slot.record()], PeerId::new(2).unwrap());
        assert_eq!((counts.cleared, counts.refused), (1, 0));
        if take_free(&slot.state).is_some() {
            // SAFETY: a loom cell; loom fails the model if guest 1's read is not
            // ordered before this write.
            slot.payload.with_mut(|p| unsafe { *p = 43 });
        }
        let freed = u32::from(guest.join().unwrap() == Release::Freed) + counts.freed;
        assert_eq!(freed, 1);
    });
}
