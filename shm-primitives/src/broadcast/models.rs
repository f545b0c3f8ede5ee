//! Loom model of releasing and reusing a broadcast slot (`shm.broadcast.release`,
//! `shm.broadcast.reclaim`, `shm.broadcast.alloc`): the real `Record::release`,
//! `release_all` and `Record::take` over loom's atomics.

use super::{release_all, Record, Release};
use crate::peer::PeerId;
use crate::slot::{pack, SlotState};
use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;

const GENERATION: u32 = 7;

/// One broadcast slot, Sent(7) to guests 1, 2 and 3, with its payload in a loom cell
/// so that loom reports any read of it not ordered before the host's next write.
struct Slot {
    state: AtomicU64,
    holders: Vec<AtomicU64>,
    payload: UnsafeCell<u64>,
}

impl Slot {
    fn sent_to(ids: &[u8]) -> Self {
        let bits = ids.iter().fold(0, |b, &id| b | 1 << (id - 1));
        Slot {
            state: AtomicU64::new(pack(SlotState::Sent, GENERATION)),
            holders: (0..4)
                .map(|w| AtomicU64::new(if w == 0 { bits } else { 0 }))
                .collect(),
            payload: UnsafeCell::new(42),
        }
    }

    fn record(&self) -> Record<'_, AtomicU64> {
        Record {
            state: &self.state,
            holders: &self.holders,
        }
    }

    /// The host: takes the slot if it is released and writes the next payload.
    fn retake(&self) -> bool {
        let Some(generation) = self.record().take() else {
            return false;
        };
        assert_eq!(generation, GENERATION + 1);
        self.payload.with_mut(|p| {
            // SAFETY: a loom cell; loom fails the model if any holder's read is not
            // ordered before this write.
            unsafe { *p = 43 }
        });
        true
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
    /// released it already and the others too (and the host retaken the slot): then
    /// the state check stops it before it touches anything.
    fn late_release(&self) -> Release {
        let sent = pack(SlotState::Sent, GENERATION);
        match self.record().release(PeerId::new(3).unwrap(), sent) {
            Ok(done) => done,
            Err(found) => {
                assert_eq!(found, pack(SlotState::Loaned, GENERATION + 1));
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
// new payload. Exactly one of guest 3 and the host clears guest 3's bit; the host takes
// the slot only once every bit is clear, its write never races a holder's read, and
// once everyone is done the slot is always free to take: nothing leaks. Exhaustive
// takes minutes; two preemptions take seconds.
// shm[verify shm.broadcast.release]
// shm[verify shm.broadcast.reclaim]
#[test]
fn holders_and_the_host_release_a_broadcast_slot_exactly_once() {
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
        // Then, if the slot is released already, take it and write the next payload.
        let retaken = slot.retake();
        let outcomes: Vec<Release> = guests.into_iter().map(|g| g.join().unwrap()).collect();
        // Guests 1 and 2 each cleared their own bit; guest 3's was cleared once.
        assert!(outcomes[..2].iter().all(|&o| o == Release::Released));
        let by_guest3 = u32::from(outcomes[2] == Release::Released);
        assert_eq!(by_guest3 + counts.cleared, 1, "guest 3's bit cleared once");
        assert!(slot.holders.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        // Every holder is done: the slot is the host's to take, now if not before.
        assert!(retaken || slot.retake(), "a released slot must be reusable");
        let end = pack(SlotState::Loaned, GENERATION + 1);
        assert_eq!(slot.state.load(Ordering::Relaxed), end);
    });
}

// The orderings, exhaustively on a smaller model: guest 1 reads and releases while the
// host releases for guest 2 (gone) and then, if the slot is released, retakes it and
// writes the next payload. Guest 1's read happens before the host's write (loom
// reports the race otherwise: a Relaxed clear, or a Relaxed load of the holder words
// in `take`, fails this model).
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
        let retaken = slot.retake();
        assert_eq!(guest.join().unwrap(), Release::Released);
        assert!(retaken || slot.retake());
    });
}
