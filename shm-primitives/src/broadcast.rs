//! The broadcast pool: a payload the host writes once and every recipient guest reads
//! (`shm.broadcast.layout`).
//!
//! Each slot has a 64-byte record: a state word (`generation << 32 | state`, as in
//! guest pools, but only Free, Loaned and Sent) and a set of *holder* bits, one per
//! guest the host sent the slot to. A holder gives up its reference by clearing its bit
//! with one `fetch_and`, and that is the whole release: a Sent slot whose bits are all
//! clear is *released*, and the host allocates it again as it would a Free one. There
//! is no count to decrement after the bit, so a holder that dies at any instruction has
//! either released or not, and the host's reclaim clears the bit of one that has not:
//! no death leaks a slot (version 6 counted down a separate `remaining` after the bit,
//! and a guest killed between the two leaked the slot for good).
//!
//! Unlike guest pools the pool is shared by every guest, so any of them can write any
//! record. Nothing here trusts what it reads: indices and lengths are checked, and
//! states change only by compare-and-swap from the expected word. The release and the
//! reuse test are generic over the atomic types so the loom model runs the same code.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::freelist::Atom;
use crate::layout::BROADCAST_META_SIZE;
use crate::peer::PeerId;
use crate::region::Region;
use crate::slot::{pack, state_of, PoolUsage, SlotState};
use crate::violation::Violation;

/// Words of holder bits in a record: one bit for each of the 255 possible guests.
pub const HOLDER_WORDS: usize = 4;

/// The `found` of a [`Violation::Broadcast`] when no state word was read: the index is
/// past the pool, the segment has no pool, or the reference came on a ToHost ring. Its
/// low 32 bits hold no state, so it never looks like a real word.
pub const NO_WORD: u64 = u64::MAX;

// shm[impl shm.broadcast.layout]
/// One slot's record, exactly as the spec's table (`shm.broadcast.layout`).
#[repr(C)]
#[derive(Debug)]
pub struct BroadcastMeta {
    /// `generation << 32 | state`: Free 0, Loaned 1, Sent 2.
    pub state: AtomicU64,
    /// Reserved, zero (version 6 kept a count of holders here).
    pub _reserved0: AtomicU64,
    /// Bit `(id − 1) % 64` of word `(id − 1) / 64` for each guest holding the slot.
    pub holders: [AtomicU64; HOLDER_WORDS],
    /// Reserved, zero.
    pub _reserved1: [AtomicU64; 2],
}

const _: () = assert!(std::mem::size_of::<BroadcastMeta>() == BROADCAST_META_SIZE as usize);

/// A set of peer ids, as the holder bits of a record store it.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PeerSet([u64; HOLDER_WORDS]);

fn bit_of(id: PeerId) -> (usize, u64) {
    let i = id.index();
    (i / 64, 1 << (i % 64))
}

impl PeerSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self([0; HOLDER_WORDS])
    }

    /// Adds `id`; false if it was there.
    pub fn insert(&mut self, id: PeerId) -> bool {
        let (w, mask) = bit_of(id);
        let was = self.0[w] & mask != 0;
        self.0[w] |= mask;
        !was
    }

    /// Removes `id`; false if it was not there.
    pub fn remove(&mut self, id: PeerId) -> bool {
        let (w, mask) = bit_of(id);
        let was = self.0[w] & mask != 0;
        self.0[w] &= !mask;
        was
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: PeerId) -> bool {
        let (w, mask) = bit_of(id);
        self.0[w] & mask != 0
    }

    /// Number of ids in the set.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// True for the empty set.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; HOLDER_WORDS]
    }

    /// The ids in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = PeerId> + '_ {
        (0..HOLDER_WORDS * 64)
            .filter(|&i| self.0[i / 64] & (1 << (i % 64)) != 0)
            .filter_map(PeerId::from_index)
    }

    /// The holder words of the set (`shm.broadcast.layout`). Bit 63 of word 3 would be
    /// id 256, which does not exist; a set read from shared memory may have it, and
    /// [`iter`](Self::iter) skips it.
    pub fn words(&self) -> [u64; HOLDER_WORDS] {
        self.0
    }

    /// The set whose holder words are `words`.
    pub fn from_words(words: [u64; HOLDER_WORDS]) -> Self {
        Self(words)
    }
}

impl FromIterator<PeerId> for PeerSet {
    fn from_iter<I: IntoIterator<Item = PeerId>>(ids: I) -> Self {
        let mut set = Self::new();
        for id in ids {
            set.insert(id);
        }
        set
    }
}

impl fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(PeerId::get)).finish()
    }
}

/// A broadcast slot as the host allocated it: its index and the generation the
/// allocation gave it (what a kind 2 descriptor carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BroadcastRef {
    /// Slot index in the broadcast pool.
    pub index: u32,
    /// Its generation.
    pub generation: u32,
}

/// What one release did (`shm.broadcast.release`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The bit was already clear: someone else released this hold. Nothing changed.
    NotHeld,
    /// The bit was cleared: this hold is given up. When it was the last, the slot is
    /// released and the host may allocate it again.
    Released,
}

/// What [`BroadcastPool::release_for`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseCounts {
    /// Holder bits of the guest that were cleared.
    pub cleared: u32,
    /// Slots whose state word changed between two loads of it (only a guest writing
    /// a word that is the host's can do that): left as found.
    pub refused: u32,
}

/// A snapshot of one record, for accounting and tests (read from guest-writable
/// memory: informational only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BroadcastSlotInfo {
    /// The state, `None` for a word that holds no broadcast state.
    pub state: Option<SlotState>,
    /// The generation.
    pub generation: u32,
    /// The holder bits.
    pub holders: PeerSet,
}

impl BroadcastSlotInfo {
    /// Free, or Sent with no holder bit left (released): what the host may allocate.
    pub fn is_free(&self) -> bool {
        match self.state {
            Some(SlotState::Free) => true,
            Some(SlotState::Sent) => (self.holders.words().iter().enumerate())
                .all(|(w, &bits)| bits & guest_bits(w) == 0),
            _ => false,
        }
    }
}

/// 64-bit atomics with the bit-clearing operation releases need, so that loom's
/// atomics can stand in for the shared-memory ones in the model.
pub trait BitAtom: Atom<V = u64> {
    /// Atomic AND; returns the previous value.
    fn fetch_and(&self, v: u64, order: Ordering) -> u64;
}

impl BitAtom for AtomicU64 {
    #[inline]
    fn fetch_and(&self, v: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_and(self, v, order)
    }
}

#[cfg(test)]
impl BitAtom for loom::sync::atomic::AtomicU64 {
    fn fetch_and(&self, v: u64, order: Ordering) -> u64 {
        loom::sync::atomic::AtomicU64::fetch_and(self, v, order)
    }
}

/// Broadcast states only: guest pools' Received (3) holds no state here.
fn broadcast_state(raw: u64) -> Option<SlotState> {
    state_of(raw).filter(|&s| s != SlotState::Received)
}

/// The bits of holder word `w` that name a guest: bit 63 of the last word names none,
/// so a guest setting it cannot keep a slot from being released.
fn guest_bits(w: usize) -> u64 {
    if w == HOLDER_WORDS - 1 {
        u64::MAX >> 1
    } else {
        u64::MAX
    }
}

/// The words of one record that releasing and reuse touch, over any atomics.
pub(crate) struct Record<'a, W> {
    pub(crate) state: &'a W,
    pub(crate) holders: &'a [W],
}

impl<W: BitAtom> Record<'_, W> {
    /// Host: takes the slot if the host may allocate it, Free(g) or released Sent(g)
    /// -> Loaned(g+1); the new generation. The Acquire loads of the holder words pair
    /// with each holder's Release clear, so every holder's reads of the previous
    /// payload happen before our writes; the Acquire of the state word pairs with the
    /// Release of an abandon.
    pub(crate) fn take(&self) -> Option<u32> {
        let raw = self.state.load(Ordering::Acquire);
        match broadcast_state(raw) {
            Some(SlotState::Free) => {}
            Some(SlotState::Sent) if self.released() => {}
            _ => return None,
        }
        let generation = ((raw >> 32) as u32).wrapping_add(1);
        let loaned = pack(SlotState::Loaned, generation);
        self.state
            .cas(raw, loaned, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| generation)
    }

    /// No holder bit that names a guest is set (Acquire: see [`take`](Self::take)).
    fn released(&self) -> bool {
        self.holders
            .iter()
            .enumerate()
            .all(|(w, word)| word.load(Ordering::Acquire) & guest_bits(w) == 0)
    }

    /// Gives up `peer`'s hold on the broadcast whose word is `sent` (Sent(g)): one
    /// atomic clear of its bit. If the word is not `sent`, returns it as found and
    /// changes nothing.
    pub(crate) fn release(&self, peer: PeerId, sent: u64) -> Result<Release, u64> {
        // The slot must still be the broadcast the hold is for: a hold on an older
        // generation must not clear a bit of a newer one.
        let found = self.state.load(Ordering::Acquire);
        if found != sent {
            return Err(found);
        }
        let (w, mask) = bit_of(peer);
        let Some(word) = self.holders.get(w) else {
            return Ok(Release::NotHeld);
        };
        // One atomic clear, and the whole release: of a guest and the host releasing
        // for it, exactly one sees the bit set. Release: our reads of the payload
        // happen before the host's next writes, which it makes only after an Acquire
        // load of this word finds it clear (`take`).
        if word.fetch_and(!mask, Ordering::AcqRel) & mask == 0 {
            return Ok(Release::NotHeld);
        }
        Ok(Release::Released)
    }
}

/// Releases `peer`'s hold on every record found Sent, as the host does for a guest
/// that is gone. A record it cannot make sense of is counted and left as found.
// shm[impl shm.broadcast.untrusted]
pub(crate) fn release_all<'a, W>(
    records: impl IntoIterator<Item = Record<'a, W>>,
    peer: PeerId,
) -> ReleaseCounts
where
    W: BitAtom + 'a,
{
    let mut counts = ReleaseCounts::default();
    for record in records {
        let raw = record.state.load(Ordering::Acquire);
        if broadcast_state(raw) != Some(SlotState::Sent) {
            continue;
        }
        match record.release(peer, raw) {
            Ok(Release::NotHeld) => {}
            Ok(Release::Released) => counts.cleared += 1,
            Err(_) => counts.refused += 1,
        }
    }
    counts
}

/// The broadcast pool in shared memory (`shm.broadcast.layout`).
#[derive(Debug, Clone, Copy)]
pub struct BroadcastPool<'a> {
    metas: &'a [BroadcastMeta],
    region: Region<'a>,
    data_offset: usize,
    slot_size: u32,
    /// The host's private allocation cursor (`shm.broadcast.alloc`).
    cursor: &'a AtomicU32,
}

impl<'a> BroadcastPool<'a> {
    /// A view over `metas.len()` records and as many slots of `slot_size` bytes at
    /// `data_offset` in `region`, allocating from `cursor`. Panics if the data does not
    /// fit or the pool is empty: the arguments come from a validated layout.
    pub fn new(
        metas: &'a [BroadcastMeta],
        region: Region<'a>,
        data_offset: usize,
        slot_size: u32,
        cursor: &'a AtomicU32,
    ) -> Self {
        assert!(!metas.is_empty() && metas.len() <= 1 << 16);
        let data_len = metas.len() * slot_size as usize;
        assert!(region.span(data_offset, data_len).is_some());
        Self {
            metas,
            region,
            data_offset,
            slot_size,
            cursor,
        }
    }

    /// Slots in the pool.
    pub fn count(&self) -> u32 {
        self.metas.len() as u32
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    fn record(&self, index: u32) -> Option<Record<'a, AtomicU64>> {
        let meta = self.metas.get(index as usize)?;
        Some(Record {
            state: &meta.state,
            holders: &meta.holders,
        })
    }

    /// Host: takes the first slot at or after the cursor (wrapping) that is Free or
    /// released (Sent with no holder bit), -> Loaned(g+1), and moves the cursor past
    /// it; `None` when there is none. The cursor is private memory; any other word is
    /// skipped, never repaired.
    // shm[impl shm.broadcast.alloc]
    // shm[impl shm.broadcast.untrusted]
    pub fn alloc(&self) -> Option<BroadcastRef> {
        let n = self.count();
        let start = self.cursor.load(Ordering::Relaxed) % n;
        for k in 0..n {
            let index = (start + k) % n;
            let record = self.record(index).expect("index < count");
            if let Some(generation) = record.take() {
                self.cursor.store((index + 1) % n, Ordering::Relaxed);
                return Some(BroadcastRef { index, generation });
            }
        }
        None
    }

    /// Host: copies `src` into the slot it holds Loaned; false when it does not fit.
    pub fn write(&self, index: u32, src: &[u8]) -> bool {
        index < self.count()
            && src.len() <= self.slot_size as usize
            && self.region.copy_in(self.data_at(index), src)
    }

    /// Host: sets the holder bits to `holders`, then publishes the slot, Loaned(g) ->
    /// Sent(g) with Release (the payload and bits happen before any recipient's
    /// check). A failed compare-and-swap means a guest wrote the word: the slot is
    /// left as found and nothing may be pushed.
    // shm[impl shm.broadcast.alloc]
    pub fn publish(&self, slot: BroadcastRef, holders: &PeerSet) -> Result<(), Violation> {
        let BroadcastRef { index, generation } = slot;
        let Some(meta) = self.metas.get(index as usize) else {
            return Err(Violation::Broadcast {
                index,
                generation,
                found: NO_WORD,
            });
        };
        for (word, bits) in meta.holders.iter().zip(holders.words()) {
            word.store(bits, Ordering::Relaxed);
        }
        let (loaned, sent) = (
            pack(SlotState::Loaned, generation),
            pack(SlotState::Sent, generation),
        );
        meta.state
            .compare_exchange(loaned, sent, Ordering::Release, Ordering::Relaxed)
            .map(|_| ())
            .map_err(|found| Violation::Broadcast {
                index,
                generation,
                found,
            })
    }

    /// Host: returns a slot it holds Loaned and will not publish, Loaned(g) ->
    /// Free(g); false if the word was not Loaned(g).
    // shm[impl shm.broadcast.alloc]
    pub fn abandon(&self, slot: BroadcastRef) -> bool {
        let Some(meta) = self.metas.get(slot.index as usize) else {
            return false;
        };
        let loaned = pack(SlotState::Loaned, slot.generation);
        let free = pack(SlotState::Free, slot.generation);
        meta.state
            .compare_exchange(loaned, free, Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }

    /// Receiver, on a kind 2 descriptor: checks the values the descriptor itself
    /// carries (read once into private memory), before anything else.
    // shm[impl shm.broadcast.refcount]
    pub fn check_ref(&self, index: u32, generation: u32, len: u32) -> Result<(), Violation> {
        if index >= self.count() {
            return Err(Violation::Broadcast {
                index,
                generation,
                found: NO_WORD,
            });
        }
        if len > self.slot_size {
            return Err(Violation::SlotLen {
                len,
                slot_size: self.slot_size,
            });
        }
        Ok(())
    }

    /// Receiver, after [`check_ref`](Self::check_ref): the slot is Sent with the
    /// descriptor's generation (Acquire: pairs with the host's publish, so the payload
    /// is visible) and `peer`'s bit is set. Changes nothing.
    // shm[impl shm.broadcast.refcount]
    pub fn check_held(&self, peer: PeerId, index: u32, generation: u32) -> Result<(), Violation> {
        let Some(meta) = self.metas.get(index as usize) else {
            return Err(Violation::Broadcast {
                index,
                generation,
                found: NO_WORD,
            });
        };
        let found = meta.state.load(Ordering::Acquire);
        let (w, mask) = bit_of(peer);
        let held = meta.holders[w].load(Ordering::Relaxed) & mask != 0;
        if found == pack(SlotState::Sent, generation) && held {
            Ok(())
        } else {
            Err(Violation::Broadcast {
                index,
                generation,
                found,
            })
        }
    }

    /// A holder gives up its reference: clears `peer`'s bit (`shm.broadcast.release`).
    // shm[impl shm.broadcast.release]
    pub fn release(&self, peer: PeerId, index: u32, generation: u32) -> Result<Release, Violation> {
        let violation = |found| Violation::Broadcast {
            index,
            generation,
            found,
        };
        let record = self.record(index).ok_or(violation(NO_WORD))?;
        record
            .release(peer, pack(SlotState::Sent, generation))
            .map_err(violation)
    }

    /// Host: releases every hold `peer` still has, for a guest that departed or died
    /// (`shm.broadcast.reclaim`).
    // shm[impl shm.broadcast.reclaim]
    pub fn release_for(&self, peer: PeerId) -> ReleaseCounts {
        self.release_for_except(peer, |_| false)
    }

    /// [`release_for`](Self::release_for), keeping `peer`'s holds on the slots
    /// `keep` names: those its retained, undelivered descriptors still reference
    /// (`shm.delivery.at-least-once`).
    pub fn release_for_except(&self, peer: PeerId, keep: impl Fn(u32) -> bool) -> ReleaseCounts {
        let records = (0..self.count()).filter(|&i| !keep(i));
        release_all(records.filter_map(|i| self.record(i)), peer)
    }

    /// Address of slot `index`'s data, for views.
    pub fn data_ptr(&self, index: u32) -> Option<NonNull<u8>> {
        if index >= self.count() {
            return None;
        }
        self.region
            .span(self.data_at(index), self.slot_size as usize)
    }

    fn data_at(&self, index: u32) -> usize {
        self.data_offset + index as usize * self.slot_size as usize
    }

    /// Replaces `out` with the first `len` bytes of slot `index`; false when out of
    /// range.
    pub fn read_to_vec(&self, index: u32, len: u32, out: &mut Vec<u8>) -> bool {
        index < self.count()
            && len <= self.slot_size
            && self
                .region
                .copy_out_to_vec(self.data_at(index), len as usize, out)
    }

    /// Counts slots: free (Free, or Sent and released), or in use.
    pub fn usage(&self) -> PoolUsage {
        let mut u = PoolUsage::default();
        for index in 0..self.count() {
            match self.info(index).is_some_and(|i| i.is_free()) {
                true => u.free += 1,
                false => u.in_use += 1,
            }
        }
        u
    }

    /// A snapshot of slot `index`'s record.
    pub fn info(&self, index: u32) -> Option<BroadcastSlotInfo> {
        let meta = self.metas.get(index as usize)?;
        let raw = meta.state.load(Ordering::Acquire);
        let holders = std::array::from_fn(|w| meta.holders[w].load(Ordering::Relaxed));
        Some(BroadcastSlotInfo {
            state: broadcast_state(raw),
            generation: (raw >> 32) as u32,
            holders: PeerSet::from_words(holders),
        })
    }
}

#[cfg(test)]
mod tests;

// Not under Miri: loom runs each thread on a stack of its own (its `generator`
// dependency calls getrlimit and switches stacks in assembly), which Miri cannot run.
#[cfg(all(test, not(miri)))]
mod models;
