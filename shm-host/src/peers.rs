//! The host's private state for each peer entry, and recycling.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm_primitives::desc::Body;
use shm_primitives::large_link::LargeOutbox;
use shm_primitives::peer::PeerEntry;
use shm_primitives::slot::{PoolUsage, SlotState, OWNER_HOST};
use shm_primitives::{Direction, Inbox, Outbox, PeerId, PeerState, PeerWord, Segment, Violation};

use std::process::Child;

use crate::liveness::{Death, DeathCause, GuestLink};

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
    /// Messages a guest published to the host but died before the host received them
    /// (discarded at recovery).
    pub abandoned: u64,
    /// Guests of this entry that died (or whose spawned child died before attaching).
    pub deaths: u64,
    /// Messages to a guest that left without consuming them, kept for the next guest
    /// of the entry (at-least-once delivery, `shm.delivery.at-least-once`).
    pub retained: u64,
    /// Of `sent`, the messages that were broadcasts (`ShmHost::broadcast`).
    pub broadcasts: u64,
    /// Broadcast slot holds the host released for the entry's guests when it
    /// recycled the entry (`shm.broadcast.reclaim`).
    pub released_broadcasts: u64,
}

/// Occupancy of one entry's rings and pools (read from shared memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerUsage {
    /// Slots of the pool towards the guest.
    pub to_guest_slots: PoolUsage,
    /// Slots of the pool towards the host.
    pub to_host_slots: PoolUsage,
    /// Descriptors in the ring towards the guest (`tail - head`, wrapping).
    pub to_guest_depth: u64,
    /// Descriptors in the ring towards the host.
    pub to_host_depth: u64,
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
#[derive(Debug)]
pub(crate) struct HostPeer {
    /// The word last observed of the guest our outbox/inbox belong to (Attached or
    /// Goodbye at its generation), until the host moves the entry on itself: from it,
    /// the only move a guest may make is Attached(g) -> Goodbye(g) (`shm.peer.observed`).
    seen: Option<PeerWord>,
    pub(crate) outbox: Outbox,
    /// Numbers the large payloads sent to the entry's current guest.
    pub(crate) large_out: LargeOutbox,
    pub(crate) inbox: Inbox,
    pub(crate) fenced: Option<Violation>,
    /// The generation the entry held when the host fenced it.
    fenced_generation: u32,
    pub(crate) stats: PeerStats,
    /// The doorbell (and, for a spawned child, the process) of the entry's guest.
    pub(crate) link: Option<GuestLink>,
    /// Zero-copy messages from this entry's guests the host still holds: while any
    /// is alive, recycling keeps the ToHost slots the host has claimed.
    pub(crate) live_views: Arc<AtomicU32>,
    /// Spawned children whose entries were recycled but that have not exited yet;
    /// reaped once they do (their descriptors are closed already).
    departed: Vec<Child>,
    /// At-least-once delivery: a departing guest's undelivered messages are kept
    /// for the next guest of the entry.
    pub(crate) at_least_once: bool,
    /// Set while the entry is Reserved with retained messages: the next guest
    /// continues this ring (our outbox is kept).
    pub(crate) retained: bool,
    /// At-least-once: the sealed files of large payloads published to the guest and
    /// perhaps not consumed yet, by ring position, to pass again to a next guest.
    pub(crate) kept_files: VecDeque<(u64, OwnedFd)>,
    /// When a departed guest's liveness lock was last found held: the next test waits
    /// [`UNMAP_RECHECK`], so serving does not make a system call per pass.
    unmap_checked: Option<Instant>,
}

/// How long the host waits before testing again the lock of a guest that said
/// goodbye but still maps the segment (`shm.peer.recycle-unmapped`).
const UNMAP_RECHECK: Duration = Duration::from_millis(1);

impl Default for HostPeer {
    fn default() -> Self {
        Self {
            seen: None,
            outbox: Outbox::new(OWNER_HOST),
            large_out: LargeOutbox::default(),
            inbox: Inbox::new(OWNER_HOST),
            fenced: None,
            fenced_generation: 0,
            stats: PeerStats::default(),
            link: None,
            live_views: Arc::new(AtomicU32::new(0)),
            departed: Vec::new(),
            at_least_once: false,
            retained: false,
            kept_files: VecDeque::new(),
            unmap_checked: None,
        }
    }
}

impl HostPeer {
    /// Reads and checks the entry's state word. A new guest generation starts from
    /// fresh counters (its rings were reset before the entry became Empty). Once a
    /// guest has been seen, a word it could not have written by its one permitted
    /// move (detach) fences it: a guest that rewrote its word to Empty or Reserved
    /// would otherwise leave the entry, and whatever it wrote into its area, to the
    /// entry's next guest without a reset.
    // shm[impl shm.peer.observed]
    pub(crate) fn observe(&mut self, entry: &PeerEntry) -> Result<PeerWord, Violation> {
        if let Some(v) = self.fenced {
            return Err(v);
        }
        let word = match entry.load() {
            Ok(w) => w,
            Err(bad) => {
                let violation = Violation::PeerWord { raw: bad.raw };
                // The generation the host saw the guest at, not one the guest chose:
                // recovery makes the next incarnation g + 1 (`shm.peer.observed`).
                let g = self.seen.map_or((bad.raw >> 32) as u32, |w| w.generation);
                self.fence(entry, g, violation);
                return Err(violation);
            }
        };
        if let Some(seen) = self.seen {
            let detached = PeerWord {
                state: PeerState::Goodbye,
                ..seen
            };
            if word != seen && word != detached {
                let violation = Violation::PeerTransition {
                    generation: seen.generation,
                    found: entry.state_word.load(Ordering::Relaxed),
                };
                self.fence(entry, seen.generation, violation);
                return Err(violation);
            }
        } else if matches!(word.state, PeerState::Attached | PeerState::Goodbye) {
            self.inbox = Inbox::new(OWNER_HOST);
            // A guest taking over retained messages continues our side of its ring.
            if !std::mem::take(&mut self.retained) {
                self.outbox = Outbox::new(OWNER_HOST);
                self.large_out = LargeOutbox::default();
                self.kept_files.clear();
            }
        }
        if matches!(word.state, PeerState::Attached | PeerState::Goodbye) {
            self.seen = Some(word);
        }
        Ok(word)
    }

    /// Quarantines the entry: Goodbye with a fault code, never read again by this
    /// host and not recycled while the faulty guest may still be mapped.
    // shm[impl shm.untrusted.fence]
    pub(crate) fn fence(&mut self, entry: &PeerEntry, generation: u32, violation: Violation) {
        entry.fence(generation, violation.code());
        self.fenced = Some(violation);
        self.fenced_generation = generation;
    }

    /// Whether the guest that said goodbye on entry `index` has let go of the segment
    /// (`shm.peer.recycle-unmapped`): on a file-backed segment, no open file
    /// description holds the entry's liveness lock any more. Until then a guest that
    /// breaks the protocol could still write into the entry after its reset. Unless
    /// `now`, a held lock is tested again only after [`UNMAP_RECHECK`].
    // shm[impl shm.peer.recycle-unmapped]
    pub(crate) fn unmapped(&mut self, segment: &Segment, index: usize, now: bool) -> bool {
        let Some(file) = segment.backing().file() else {
            return true; // a heap segment's guests live in the host's process
        };
        if !now
            && self
                .unmap_checked
                .is_some_and(|t| t.elapsed() < UNMAP_RECHECK)
        {
            return false;
        }
        let offset = segment.layout().peer_offset(index);
        if crate::liveness::lock_held(file, offset) {
            self.unmap_checked = Some(Instant::now());
            return false;
        }
        self.unmap_checked = None;
        true
    }

    /// Goodbye at the generation the host fenced the entry at.
    pub(crate) fn fence_word(&self) -> PeerWord {
        PeerWord {
            state: PeerState::Goodbye,
            generation: self.fenced_generation,
        }
    }

    /// Reaps spawned children that have exited since their entry was recycled.
    /// Lets go of the entry's link (a released reservation, a finished guest): its
    /// descriptors close now, and its child, if any, is reaped once it exits.
    /// Links the entry's guest. Files of retained large payloads are passed again on
    /// the new doorbell, in order, before the guest can read their descriptors
    /// (`shm.delivery.at-least-once`).
    pub(crate) fn set_link(&mut self, link: GuestLink) {
        for (_, file) in &self.kept_files {
            // A full socket loses the file: the guest then refuses that message.
            let _ = shm_primitives::large::send_fd(link.doorbell.as_fd(), file.as_fd());
        }
        self.link = Some(link);
    }

    /// At-least-once: keeps the file of a large payload published at ring position
    /// `pos`, dropping those the guest has consumed (before `head`).
    pub(crate) fn keep_file(&mut self, pos: u64, file: OwnedFd, head: u64) {
        self.forget_files_before(head);
        self.kept_files.push_back((pos, file));
    }

    fn forget_files_before(&mut self, head: u64) {
        while self.kept_files.front().is_some_and(|(p, _)| *p < head) {
            self.kept_files.pop_front();
        }
    }

    pub(crate) fn drop_link(&mut self) {
        if let Some(mut link) = self.link.take() {
            if link.reap().is_none() {
                self.departed.extend(link.child.take());
            }
        }
    }

    pub(crate) fn reap_departed(&mut self) {
        self.departed
            .retain_mut(|child| matches!(child.try_wait(), Ok(None)));
    }

    /// Whether the entry has a link for generation `generation` (events of a link
    /// made for another incarnation say nothing about this one).
    pub(crate) fn link_matches(&self, generation: u32) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.generation == generation)
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

/// The doorbell of `link` if it is the link of the guest at `generation` (a free
/// function so the caller can borrow the entry's other fields meanwhile).
#[inline]
pub(crate) fn doorbell(link: &Option<GuestLink>, generation: u32) -> Option<BorrowedFd<'_>> {
    link.as_ref()
        .filter(|l| l.generation == generation)
        .map(|l| l.doorbell.as_fd())
}

/// Returns a departed guest's entry to Empty: counts and discards what it never
/// consumed, resets both rings, frees every slot of both pools, then CASes
/// Goodbye(g) -> Empty(g+1).
// shm[impl shm.peer.recycle]
// shm[impl shm.slot.reclaim]
// shm[impl shm.delivery.to-guest]
// shm[impl shm.recover.quiescent]: rings, pools, holds and the link all go here.
pub(crate) fn recycle(segment: &Segment, peer: PeerId, hp: &mut HostPeer, generation: u32) {
    if hp.at_least_once && hp.fenced.is_none() && retain(segment, peer, hp, generation) {
        return;
    }
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
    // Slots the host still reads through live views stay Received: the views free
    // them when dropped (the new guest's allocator skips them until then).
    let host_views = hp.live_views.load(Ordering::Acquire) > 0;
    for dir in [Direction::ToGuest, Direction::ToHost] {
        let pools = segment.pools(peer, dir).expect("in range");
        let keep = |s| host_views && dir == Direction::ToHost && s == SlotState::Received;
        for class in 0..pools.classes() {
            let pool = pools.class(class).expect("in range");
            hp.stats.reclaimed_slots += u64::from(pool.reclaim_all(keep));
        }
    }
    // shm[impl shm.broadcast.reclaim]: the guest's holds on broadcast slots go too.
    if let Some(pool) = segment.broadcast() {
        hp.stats.released_broadcasts += u64::from(pool.release_for(peer).cleared);
    }
    hp.seen = None;
    hp.outbox = Outbox::new(OWNER_HOST);
    hp.inbox = Inbox::new(OWNER_HOST);
    hp.retained = false;
    hp.kept_files.clear();
    hp.fenced = None;
    hp.drop_link();
    let entry = segment.peer(peer).expect("in range");
    if entry.recycle(generation) {
        hp.stats.recycled += 1;
    }
}

/// At-least-once: keeps a departed guest's undelivered messages for the entry's next
/// guest instead of discarding them (`shm.delivery.at-least-once`). The ToGuest ring
/// keeps its counters and the descriptors from the guest's last consumed position;
/// every slot they name stays (or, if the guest had claimed it without consuming it,
/// goes back to) Sent; every other ToGuest slot and the whole ToHost side are reclaimed
/// as at a recycle; the entry becomes Reserved(g+1) for a guest that attaches with its
/// id. Returns false, changing nothing, when there is nothing to keep or what the
/// guest left cannot be trusted (the caller then recycles).
// shm[impl shm.delivery.at-least-once]
fn retain(segment: &Segment, peer: PeerId, hp: &mut HostPeer, generation: u32) -> bool {
    let to_guest = segment.ring(peer, Direction::ToGuest).expect("in range");
    let pools = segment.pools(peer, Direction::ToGuest).expect("in range");
    let tail = hp.outbox.published();
    let Ok(head) = to_guest.head_from(tail) else {
        return false;
    };
    if head == tail {
        return false;
    }
    // The slots the undelivered descriptors name, read back from the ring (which the
    // guest could have scribbled on: each is decoded and checked again).
    // Wrapping: `head_from` bounds the distance by the capacity, but a guest may put
    // `head` across the wrap from our tail.
    let mut named = Vec::with_capacity(tail.wrapping_sub(head) as usize);
    let mut kept_broadcasts = Vec::new();
    let mut pos = head;
    while pos != tail {
        match to_guest.read_at(pos).map(|d| d.body) {
            Ok(Body::Slot {
                class,
                index,
                generation,
            }) => match pools.class(class as usize) {
                Some(pool) if pool.restore_sent(index, generation) => named.push((class, index)),
                _ => return false,
            },
            Ok(Body::Large { .. }) if !hp.kept_files.iter().any(|(p, _)| *p == pos) => {
                return false
            }
            Ok(Body::Broadcast { index, .. }) => kept_broadcasts.push(index),
            Ok(_) => {}
            Err(_) => return false,
        }
        pos = pos.wrapping_add(1);
    }
    hp.forget_files_before(head);
    let kept = u64::from(tail.wrapping_sub(head) as u32);
    let to_host = segment.ring(peer, Direction::ToHost).expect("in range");
    to_host.reset();
    let host_views = hp.live_views.load(Ordering::Acquire) > 0;
    let to_host_pools = segment.pools(peer, Direction::ToHost).expect("in range");
    for class in 0..to_host_pools.classes() {
        let pool = to_host_pools.class(class).expect("in range");
        let keep = |s| host_views && s == SlotState::Received;
        hp.stats.reclaimed_slots += u64::from(pool.reclaim_all(keep));
    }
    for class in 0..pools.classes() {
        let pool = pools.class(class).expect("in range");
        let keep = |index, s| s == SlotState::Sent && named.contains(&(class as u8, index));
        hp.stats.reclaimed_slots += u64::from(pool.reclaim_where(keep));
    }
    // The guest's holds on broadcasts it consumed go; those still queued stay its.
    if let Some(pool) = segment.broadcast() {
        let released = pool.release_for_except(peer, |i| kept_broadcasts.contains(&i));
        hp.stats.released_broadcasts += u64::from(released.cleared);
    }
    // Our side of the ring continues; every Free slot is found again by rescanning.
    hp.outbox.rescan();
    hp.inbox = Inbox::new(OWNER_HOST);
    hp.seen = None;
    hp.drop_link();
    let entry = segment.peer(peer).expect("in range");
    if !entry.retain(generation) {
        return false;
    }
    hp.retained = true;
    hp.stats.retained += kept;
    true
}

/// Gives up the messages a Reserved entry retained for a next guest: they are counted
/// as discarded and the entry's rings and pools are reset (the caller then releases
/// the reservation).
pub(crate) fn forget_retained(segment: &Segment, peer: PeerId, hp: &mut HostPeer) {
    if !std::mem::take(&mut hp.retained) {
        return;
    }
    let to_guest = segment.ring(peer, Direction::ToGuest).expect("in range");
    let undelivered = to_guest
        .depth_from(hp.outbox.published())
        .map(u64::from)
        .unwrap_or(u64::from(to_guest.capacity()));
    hp.stats.discarded += undelivered;
    to_guest.reset();
    let pools = segment.pools(peer, Direction::ToGuest).expect("in range");
    for class in 0..pools.classes() {
        let pool = pools.class(class).expect("in range");
        hp.stats.reclaimed_slots += u64::from(pool.reclaim_all(|_| false));
    }
    if let Some(pool) = segment.broadcast() {
        hp.stats.released_broadcasts += u64::from(pool.release_for(peer).cleared);
    }
    hp.outbox = Outbox::new(OWNER_HOST);
    hp.large_out = LargeOutbox::default();
    hp.kept_files.clear();
}

/// Recovers the entry of a guest found dead (`shm.recover.reap`). `word` is what the
/// host read before deciding; `attached` is false for a spawned child that died while
/// its entry was still Reserved. Returns the death to report, or `None` when the entry
/// moved on meanwhile (the guest said goodbye first: that is a departure, not a death).
// shm[impl shm.recover.reap]
// shm[impl shm.recover.fenced]
// shm[impl shm.spawn.failure]
pub(crate) fn recover(
    segment: &Segment,
    peer: PeerId,
    hp: &mut HostPeer,
    word: PeerWord,
    cause: DeathCause,
    attached: bool,
) -> Option<Death> {
    let entry = segment.peer(peer).expect("in range");
    let mut link = hp.link.take();
    let pid = link
        .as_ref()
        .and_then(GuestLink::pid)
        .or(Some(entry.guest_pid.load(Ordering::Relaxed)).filter(|&p| p != 0));
    let exit = link.as_mut().and_then(GuestLink::reap);
    if !attached {
        // A ticket whose child died (or was never started) before attaching. An entry
        // that retains messages stays reserved for the next one (its generation moves
        // on, so this ticket claims nothing any more).
        hp.link = link;
        let released = if hp.retained {
            entry.renew_reservation(word.generation)
        } else {
            entry.release_reservation()
        };
        if !released {
            return None;
        }
        // The doorbell can hang up just before the process becomes a zombie: a child
        // not reaped yet is reaped later.
        hp.drop_link();
        hp.stats.deaths += 1;
        return Some(Death {
            peer,
            generation: word.generation,
            attached: false,
            cause,
            pid,
            exit,
            abandoned: 0,
            discarded: 0,
            reclaimed_slots: 0,
            retained: 0,
        });
    }
    let generation = if hp.fenced.is_some() {
        // Whatever the dead guest left in its word, the fence generation is ours.
        let g = hp.fenced_generation;
        entry.fence(g, hp.fenced.map_or(0, |v| v.code()));
        g
    } else {
        // The single cleaner: only the party whose CAS moves Attached(g) to Goodbye(g)
        // recovers the entry. A guest that said goodbye first left normally.
        let goodbye = PeerWord {
            state: PeerState::Goodbye,
            ..word
        };
        if word.state != PeerState::Attached || !entry.cas(word, goodbye) {
            hp.link = link;
            return None;
        }
        word.generation
    };
    let to_host = segment.ring(peer, Direction::ToHost).expect("in range");
    // Undelivered messages from the dead guest; a corrupt tail counts as a full ring.
    let abandoned = if hp.fenced.is_some() {
        0
    } else {
        u64::from(
            hp.inbox
                .pending(&to_host)
                .unwrap_or_else(|_| to_host.capacity()),
        )
    };
    let before = hp.stats;
    hp.link = link;
    recycle(segment, peer, hp, generation);
    hp.stats.abandoned += abandoned;
    hp.stats.deaths += 1;
    Some(Death {
        peer,
        generation,
        attached: true,
        cause,
        pid,
        exit,
        abandoned,
        discarded: hp.stats.discarded - before.discarded,
        reclaimed_slots: hp.stats.reclaimed_slots - before.reclaimed_slots,
        retained: hp.stats.retained - before.retained,
    })
}

/// Occupancy of `peer`'s rings and pools.
pub(crate) fn usage(segment: &Segment, peer: PeerId) -> Option<PeerUsage> {
    let depth = |dir| segment.ring(peer, dir).map(|r| r.raw_depth());
    Some(PeerUsage {
        to_guest_slots: segment.pools(peer, Direction::ToGuest)?.usage(),
        to_host_slots: segment.pools(peer, Direction::ToHost)?.usage(),
        to_guest_depth: depth(Direction::ToGuest)?,
        to_host_depth: depth(Direction::ToHost)?,
    })
}
