//! The peer table: one 64-byte entry per guest, holding its state and generation.

use std::fmt;
use std::num::NonZeroU8;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::freelist::Atom;

/// Size of a peer entry (one cache line).
pub const PEER_ENTRY_SIZE: usize = 64;

// shm[impl shm.topology.peer-id]
/// A guest's id: 1..=255. Entry `id - 1` of the peer table belongs to it; 0 is the
/// host's own id and never names a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(NonZeroU8);

impl PeerId {
    /// `None` for 0.
    pub fn new(id: u8) -> Option<Self> {
        NonZeroU8::new(id).map(Self)
    }

    /// The id from a 0-based table index (`index + 1`); `None` past 254.
    pub fn from_index(index: usize) -> Option<Self> {
        u8::try_from(index + 1).ok().and_then(Self::new)
    }

    /// The id as a number, 1..=255.
    pub fn get(self) -> u8 {
        self.0.get()
    }

    /// The 0-based table index.
    pub fn index(self) -> usize {
        usize::from(self.0.get()) - 1
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer {}", self.0)
    }
}

// shm[impl shm.peer.states]
/// States of a peer entry (`shm.peer.states`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum PeerState {
    /// Free for any guest to claim.
    Empty = 0,
    /// Held by the host for one particular guest it is about to start.
    Reserved = 1,
    /// A guest is attached.
    Attached = 2,
    /// The guest has left (or was fenced); the host has not recycled the entry yet.
    Goodbye = 3,
}

impl PeerState {
    fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            0 => PeerState::Empty,
            1 => PeerState::Reserved,
            2 => PeerState::Attached,
            3 => PeerState::Goodbye,
            _ => return None,
        })
    }
}

/// A peer entry's state word decoded: state and generation, or the raw bits when the
/// state is not one of the four.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerWord {
    /// The state.
    pub state: PeerState,
    /// The generation: bumped each time the host returns the entry to Empty.
    pub generation: u32,
}

/// The state word held a value that is not a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer state word {raw:#018x} holds no valid state")]
pub struct InvalidPeerWord {
    /// The raw word.
    pub raw: u64,
}

fn pack(state: PeerState, generation: u32) -> u64 {
    (u64::from(generation) << 32) | state as u64
}

fn unpack(raw: u64) -> Result<PeerWord, InvalidPeerWord> {
    match PeerState::from_raw(raw as u32) {
        Some(state) => Ok(PeerWord {
            state,
            generation: (raw >> 32) as u32,
        }),
        None => Err(InvalidPeerWord { raw }),
    }
}

// shm[impl shm.peer.entry-layout]
/// One peer table entry, exactly as the spec's table (`shm.peer.entry-layout`).
///
/// Generic over its atomics (defaulting to the segment's) only so that the loom model
/// in `crate::models` runs these transitions over loom's atomics.
#[repr(C)]
#[derive(Debug)]
pub struct PeerEntry<W = AtomicU64, P = AtomicU32> {
    /// `generation << 32 | state`; every transition is a CAS on this word.
    pub state_word: W,
    /// The attached guest's process id (informational).
    pub guest_pid: P,
    /// Why the host fenced this guest (0 = not fenced); see `Violation::code`.
    pub fault: P,
    /// Reserved, zero.
    pub _reserved: [AtomicU64; 6],
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<PeerEntry>() == PEER_ENTRY_SIZE);
    assert!(offset_of!(PeerEntry, state_word) == 0);
    assert!(offset_of!(PeerEntry, guest_pid) == 8);
    assert!(offset_of!(PeerEntry, fault) == 12);
    assert!(offset_of!(PeerEntry, _reserved) == 16);
};

impl<W: Atom<V = u64>, P: Atom<V = u32>> PeerEntry<W, P> {
    /// Acquire-loads and decodes the state word.
    pub fn load(&self) -> Result<PeerWord, InvalidPeerWord> {
        unpack(self.state_word.load(Ordering::Acquire))
    }

    /// Compare-and-swaps the whole word from `from` to `to` (AcqRel on success).
    pub fn cas(&self, from: PeerWord, to: PeerWord) -> bool {
        self.transition(from, to)
    }

    fn transition(&self, from: PeerWord, to: PeerWord) -> bool {
        self.state_word
            .cas(
                pack(from.state, from.generation),
                pack(to.state, to.generation),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Host: Empty(g) -> Reserved(g). Returns the generation on success.
    // shm[impl shm.peer.reserve]
    pub fn try_reserve(&self) -> Option<u32> {
        let cur = self.load().ok()?;
        if cur.state != PeerState::Empty {
            return None;
        }
        let to = PeerWord {
            state: PeerState::Reserved,
            ..cur
        };
        self.transition(cur, to).then_some(cur.generation)
    }

    /// Host: Reserved(g) -> Empty(g+1), for a reservation no guest claimed.
    // shm[impl shm.peer.release-reservation]
    pub fn release_reservation(&self) -> bool {
        match self.load() {
            Ok(cur) if cur.state == PeerState::Reserved => self.transition(
                cur,
                PeerWord {
                    state: PeerState::Empty,
                    generation: cur.generation.wrapping_add(1),
                },
            ),
            _ => false,
        }
    }

    /// Guest: `from`(g) -> Attached(g) where `from` is Empty (attach by path) or
    /// Reserved (attach with a reserved id), and g is `generation` when one is given
    /// (a spawn ticket's). Records the guest's pid on success.
    // shm[impl shm.peer.attach-path]
    // shm[impl shm.peer.attach-reserved]
    pub fn try_claim(
        &self,
        from: PeerState,
        generation: Option<u32>,
        pid: u32,
    ) -> Result<u32, Option<PeerWord>> {
        let cur = self.load().map_err(|_| None)?;
        if cur.state != from || generation.is_some_and(|g| g != cur.generation) {
            return Err(Some(cur));
        }
        let to = PeerWord {
            state: PeerState::Attached,
            ..cur
        };
        if self.transition(cur, to) {
            self.fault.store(0, Ordering::Relaxed);
            self.guest_pid.store(pid, Ordering::Relaxed);
            Ok(cur.generation)
        } else {
            Err(self.load().ok())
        }
    }

    /// Guest: Attached(g) -> Goodbye(g), the guest's last write to the segment.
    // shm[impl shm.peer.detach]
    pub fn goodbye(&self, generation: u32) -> bool {
        self.transition(
            PeerWord {
                state: PeerState::Attached,
                generation,
            },
            PeerWord {
                state: PeerState::Goodbye,
                generation,
            },
        )
    }

    /// Host: Goodbye(g) -> Empty(g+1), after the guest's rings and pools are reset.
    // shm[impl shm.peer.recycle]
    pub fn recycle(&self, generation: u32) -> bool {
        self.guest_pid.store(0, Ordering::Relaxed);
        self.transition(
            PeerWord {
                state: PeerState::Goodbye,
                generation,
            },
            PeerWord {
                state: PeerState::Empty,
                generation: generation.wrapping_add(1),
            },
        )
    }

    /// Host: Goodbye(g) -> Reserved(g+1), keeping the entry (and the messages it
    /// retained) for a guest that re-attaches with the same id
    /// (`shm.delivery.at-least-once`).
    // shm[impl shm.delivery.at-least-once]
    pub fn retain(&self, generation: u32) -> bool {
        self.guest_pid.store(0, Ordering::Relaxed);
        self.transition(
            PeerWord {
                state: PeerState::Goodbye,
                generation,
            },
            PeerWord {
                state: PeerState::Reserved,
                generation: generation.wrapping_add(1),
            },
        )
    }

    /// Host: Reserved(g) -> Reserved(g+1): the reservation stays, but a ticket made
    /// for generation g no longer claims it.
    pub fn renew_reservation(&self, generation: u32) -> bool {
        self.transition(
            PeerWord {
                state: PeerState::Reserved,
                generation,
            },
            PeerWord {
                state: PeerState::Reserved,
                generation: generation.wrapping_add(1),
            },
        )
    }

    /// Host: records `fault` and forces the entry to Goodbye(g), whatever the guest
    /// wrote into it.
    // shm[impl shm.untrusted.fence]
    pub fn fence(&self, generation: u32, fault: u32) {
        self.fault.store(fault, Ordering::Relaxed);
        self.state_word
            .store(pack(PeerState::Goodbye, generation), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(raw: u64) -> PeerEntry {
        PeerEntry {
            state_word: AtomicU64::new(raw),
            guest_pid: AtomicU32::new(0),
            fault: AtomicU32::new(0),
            _reserved: Default::default(),
        }
    }

    fn w(state: PeerState, generation: u32) -> PeerWord {
        PeerWord { state, generation }
    }

    // shm[verify shm.topology.peer-id]
    #[test]
    fn peer_ids_are_1_to_255_and_say_so() {
        assert_eq!(PeerId::new(0), None);
        assert_eq!(PeerId::from_index(254).map(PeerId::get), Some(255));
        assert_eq!(PeerId::from_index(255), None);
        let id = PeerId::new(3).unwrap();
        assert_eq!((id.get(), id.index()), (3, 2));
        assert_eq!(id.to_string(), "peer 3");
    }

    // shm[verify shm.peer.states]
    #[test]
    fn every_state_and_generation_round_trips_and_other_words_hold_none() {
        let states = [
            PeerState::Empty,
            PeerState::Reserved,
            PeerState::Attached,
            PeerState::Goodbye,
        ];
        for (raw, state) in states.into_iter().enumerate() {
            let e = entry((0xdead_beef << 32) | raw as u64);
            assert_eq!(e.load(), Ok(w(state, 0xdead_beef)));
            assert_eq!(pack(state, 0xdead_beef), (0xdead_beef << 32) | raw as u64);
        }
        let bad = (7 << 32) | 4;
        assert_eq!(entry(bad).load(), Err(InvalidPeerWord { raw: bad }));
        assert_eq!(
            entry(bad).try_claim(PeerState::Empty, None, 1),
            Err(None),
            "no state: not claimable"
        );
        assert_eq!(entry(bad).try_reserve(), None);
        assert!(!entry(bad).release_reservation());
    }

    // Each host transition moves exactly the word it names, bumps the generation exactly
    // when the entry goes back to Empty (or a reservation is renewed), and refuses any
    // other word, changing nothing.
    // shm[verify shm.peer.reserve]
    // shm[verify shm.peer.release-reservation]
    // shm[verify shm.peer.attach-reserved]
    // shm[verify shm.untrusted.fence]
    #[test]
    fn transitions_move_only_the_exact_word() {
        let e = entry(pack(PeerState::Empty, 5));
        assert!(!e.cas(w(PeerState::Empty, 4), w(PeerState::Reserved, 4)));
        assert!(e.cas(w(PeerState::Empty, 5), w(PeerState::Empty, 5)));
        assert_eq!(e.try_reserve(), Some(5));
        assert_eq!(e.load(), Ok(w(PeerState::Reserved, 5)));
        assert_eq!(e.try_reserve(), None, "only Empty is reserved");
        assert!(e.release_reservation());
        assert_eq!(e.load(), Ok(w(PeerState::Empty, 6)));
        assert!(!e.release_reservation(), "only Reserved is released");
        assert_eq!(e.load(), Ok(w(PeerState::Empty, 6)));

        // A retained entry: Goodbye(g) -> Reserved(g+1), pid cleared.
        e.state_word
            .store(pack(PeerState::Goodbye, 6), Ordering::Relaxed);
        e.guest_pid.store(42, Ordering::Relaxed);
        assert!(!e.retain(5));
        assert!(e.retain(6));
        assert_eq!(e.load(), Ok(w(PeerState::Reserved, 7)));
        assert_eq!(e.guest_pid.load(Ordering::Relaxed), 0);
        assert!(!e.retain(6), "only Goodbye is retained");
        assert!(!e.renew_reservation(6));
        assert!(e.renew_reservation(7));
        assert_eq!(e.load(), Ok(w(PeerState::Reserved, 8)));

        // A ticket claims only its own incarnation, and records the guest.
        e.fault.store(3, Ordering::Relaxed);
        let stale = e.try_claim(PeerState::Reserved, Some(7), 9);
        assert_eq!(stale, Err(Some(w(PeerState::Reserved, 8))));
        assert_eq!(e.try_claim(PeerState::Empty, None, 9), stale);
        assert_eq!(e.try_claim(PeerState::Reserved, Some(8), 9), Ok(8));
        assert_eq!(e.load(), Ok(w(PeerState::Attached, 8)));
        assert_eq!(e.guest_pid.load(Ordering::Relaxed), 9);
        assert_eq!(e.fault.load(Ordering::Relaxed), 0);

        // The fence overrides any word, even one holding no state.
        e.state_word.store(u64::MAX, Ordering::Relaxed);
        e.fence(8, 11);
        assert_eq!(e.load(), Ok(w(PeerState::Goodbye, 8)));
        assert_eq!(e.fault.load(Ordering::Relaxed), 11);
        assert!(!e.goodbye(8), "a fenced guest's goodbye fails");
        assert!(e.recycle(8));
        assert_eq!(e.load(), Ok(w(PeerState::Empty, 9)));
    }
}
