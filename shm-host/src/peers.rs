//! The host's private state for each peer entry, and recycling.

use std::sync::atomic::Ordering;

use shm_primitives::peer::PeerEntry;
use shm_primitives::{Direction, Inbox, Outbox, PeerId, PeerState, PeerWord, Segment, Violation};

/// Counters the host keeps for one peer entry, across all guests that used it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Messages sent to the entry's guests.
    pub sent: u64,
    /// Messages received from them.
    pub received: u64,
    /// Messages to a guest it never consumed before it left (discarded at recycle).
    pub discarded: u64,
    /// Slots returned to Free when the entry was recycled.
    pub reclaimed_slots: u64,
    /// Times the entry went back to Empty.
    pub recycled: u64,
}

/// A snapshot of one peer entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// The state, `None` if the word holds no valid state.
    pub state: Option<PeerState>,
    /// The generation.
    pub generation: u32,
    /// The attached guest's pid (0 when none).
    pub pid: u32,
    /// Why the host fenced the guest, if it did.
    pub fenced: Option<Violation>,
    /// Counters.
    pub stats: PeerStats,
}

/// Host-private state of one entry. Our own ring counters live here, never read back
/// from shared memory.
#[derive(Debug, Default)]
pub(crate) struct HostPeer {
    /// Generation of the guest our outbox/inbox belong to.
    epoch: Option<u32>,
    pub(crate) outbox: Outbox,
    pub(crate) inbox: Inbox,
    pub(crate) fenced: Option<Violation>,
    pub(crate) stats: PeerStats,
}

impl HostPeer {
    /// Reads and checks the entry's state word. A new guest generation starts from
    /// fresh counters (its rings were reset before the entry became Empty).
    pub(crate) fn observe(&mut self, entry: &PeerEntry) -> Result<PeerWord, Violation> {
        if let Some(v) = self.fenced {
            return Err(v);
        }
        let word = match entry.load() {
            Ok(w) => w,
            Err(bad) => {
                let violation = Violation::PeerWord { raw: bad.raw };
                self.fence(entry, (bad.raw >> 32) as u32, violation);
                return Err(violation);
            }
        };
        if matches!(word.state, PeerState::Attached | PeerState::Goodbye)
            && self.epoch != Some(word.generation)
        {
            self.epoch = Some(word.generation);
            self.outbox = Outbox::new();
            self.inbox = Inbox::new();
        }
        Ok(word)
    }

    /// Quarantines the entry: Goodbye with a fault code, never read again by this
    /// host and not recycled while the faulty guest may still be mapped.
    // shm[impl shm.untrusted.fence]
    pub(crate) fn fence(&mut self, entry: &PeerEntry, generation: u32, violation: Violation) {
        entry.fence(generation, violation.code());
        self.fenced = Some(violation);
    }

    pub(crate) fn info(&self, entry: &PeerEntry) -> PeerInfo {
        let raw = entry.state_word.load(Ordering::Acquire);
        let word = entry.load().ok();
        PeerInfo {
            state: word.map(|w| w.state),
            generation: (raw >> 32) as u32,
            pid: entry.guest_pid.load(Ordering::Relaxed),
            fenced: self.fenced,
            stats: self.stats,
        }
    }
}

/// Returns a departed guest's entry to Empty: counts and discards what it never
/// consumed, resets both rings, frees every slot of both pools, then CASes
/// Goodbye(g) -> Empty(g+1).
// shm[impl shm.peer.recycle]
// shm[impl shm.slot.reclaim]
// shm[impl shm.delivery.to-guest]
pub(crate) fn recycle(segment: &Segment, peer: PeerId, hp: &mut HostPeer, generation: u32) {
    let to_guest = segment.ring(peer, Direction::ToGuest).expect("in range");
    let to_host = segment.ring(peer, Direction::ToHost).expect("in range");
    // A corrupt head means we cannot tell how many were consumed: count them all.
    let undelivered = to_guest
        .depth_from(hp.outbox.published())
        .map(u64::from)
        .unwrap_or(u64::from(to_guest.capacity()));
    hp.stats.discarded += undelivered;
    to_guest.reset();
    to_host.reset();
    for dir in [Direction::ToGuest, Direction::ToHost] {
        let pool = segment.pool(peer, dir).expect("in range");
        hp.stats.reclaimed_slots += u64::from(pool.reclaim_all(None));
    }
    hp.epoch = None;
    hp.outbox = Outbox::new();
    hp.inbox = Inbox::new();
    let entry = segment.peer(peer).expect("in range");
    if entry.recycle(generation) {
        hp.stats.recycled += 1;
    }
}
