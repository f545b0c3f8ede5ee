//! Slot pools: one pool per slot class, direction and guest, each with a per-slot
//! state word and a lock-free free list.
//!
//! The sender of a direction allocates; the receiver claims and frees. The state word
//! (`generation << 32 | state`) is the only synchronisation that decides ownership, and
//! every transition is a CAS on the whole word, so a stale or duplicated reference can
//! never free a slot twice. The free list (`crate::freelist`) only says where a Free
//! slot may be found; a slot it names that is not Free is skipped.
//!
//! The pool types are generic over their atomics (defaulting to the segment's) only so
//! that the loom models in `crate::models` run this very code over loom's atomics.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::freelist::{Atom, FreeList, FreeListError};
use crate::region::Region;
use crate::violation::Violation;

/// Bytes of metadata per slot: state word, free-list link and owner.
pub const SLOT_META_SIZE: usize = 16;
/// Owner value for the host.
pub const OWNER_HOST: u32 = 0;

/// The 64-byte header at the start of every pool (`shm.slot.layout`).
#[repr(C)]
#[derive(Debug)]
pub struct PoolHeader<W = AtomicU64> {
    /// Free-list head: tag (high 32 bits), index + 1 (low 32 bits, 0 = empty).
    pub free_head: W,
    /// Reserved, zero.
    pub _reserved: [AtomicU64; 7],
}

const _: () = assert!(std::mem::size_of::<PoolHeader>() == 64);

// shm[impl shm.slot.layout]
/// Who holds a slot (`shm.slot.layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    /// In the pool.
    Free = 0,
    /// Allocated by the sender, being written.
    Loaned = 1,
    /// Referenced by a published descriptor.
    Sent = 2,
    /// Claimed by the receiver, being read.
    Received = 3,
}

pub(crate) fn pack(state: SlotState, generation: u32) -> u64 {
    (u64::from(generation) << 32) | state as u64
}

pub(crate) fn state_of(raw: u64) -> Option<SlotState> {
    Some(match raw as u32 {
        0 => SlotState::Free,
        1 => SlotState::Loaned,
        2 => SlotState::Sent,
        3 => SlotState::Received,
        _ => return None,
    })
}

/// The owner word for a party: its peer id (0 for the host) in the low 8 bits, the
/// low 24 bits of its entry generation above them.
pub fn owner_word(peer_id: u8, generation: u32) -> u32 {
    (generation << 8) | u32::from(peer_id)
}

/// One pool in shared memory: the slots of one class, for one direction of one guest.
/// `W` is the 64-bit atomic type of its state words and free-list head, `L` the
/// 32-bit one of its links and owners.
#[derive(Debug)]
pub struct PoolView<'a, W = AtomicU64, L = AtomicU32> {
    header: &'a PoolHeader<W>,
    words: &'a [W],
    links: &'a [L],
    owners: &'a [L],
    region: Region<'a>,
    data_offset: usize,
    slot_size: u32,
}

impl<W, L> Clone for PoolView<'_, W, L> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W, L> Copy for PoolView<'_, W, L> {}

/// Slot counts by state, for accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// Slots in state Free.
    pub free: u32,
    /// Slots in any other state (or an invalid one).
    pub in_use: u32,
}

impl std::ops::AddAssign for PoolUsage {
    fn add_assign(&mut self, o: Self) {
        self.free += o.free;
        self.in_use += o.in_use;
    }
}

impl<'a, W: Atom<V = u64>, L: Atom<V = u32>> PoolView<'a, W, L> {
    /// A view over a pool's header, its metadata arrays (`words`, `links` and
    /// `owners`, one entry per slot) and `words.len()` slots of `slot_size` bytes at
    /// `data_offset` in `region`. Panics if the arrays disagree in length or the data
    /// does not fit in the region: the arguments come from a validated layout, never
    /// from peers.
    pub fn new(
        header: &'a PoolHeader<W>,
        words: &'a [W],
        links: &'a [L],
        owners: &'a [L],
        region: Region<'a>,
        data_offset: usize,
        slot_size: u32,
    ) -> Self {
        assert!(links.len() == words.len() && owners.len() == words.len());
        let data_len = words.len() * slot_size as usize;
        assert!(region.span(data_offset, data_len).is_some());
        Self {
            header,
            words,
            links,
            owners,
            region,
            data_offset,
            slot_size,
        }
    }

    /// Slots in the pool.
    pub fn count(&self) -> u32 {
        self.words.len() as u32
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    fn free_list(&self) -> FreeList<'a, W, L> {
        FreeList::new(&self.header.free_head, self.links)
    }

    /// Free(g) -> Loaned(g+1) on slot `index`, if it is Free.
    fn take(&self, index: u32, owner: u32) -> Option<u32> {
        let meta = &self.words[index as usize];
        let raw = meta.load(Ordering::Relaxed);
        if state_of(raw) != Some(SlotState::Free) {
            return None;
        }
        let generation = ((raw >> 32) as u32).wrapping_add(1);
        // Acquire: the receiver's reads of the slot's previous payload happen before
        // our writes of the new one.
        meta.cas(
            raw,
            pack(SlotState::Loaned, generation),
            Ordering::Acquire,
            Ordering::Relaxed,
        )
        .ok()?;
        self.owners[index as usize].store(owner, Ordering::Relaxed);
        Some(generation)
    }

    /// Sender: takes a Free slot, Free(g) -> Loaned(g+1): first from the free list,
    /// then from the slots never allocated since the pool was last reset (`fresh`
    /// is the sender's private count of those it has visited). Returns the index and
    /// its new generation, `Ok(None)` when no slot is Free, and a violation when the
    /// free list holds an impossible value.
    // shm[impl shm.slot.alloc]
    // shm[impl shm.slot.free-list]
    pub fn alloc(&self, fresh: &mut u32, owner: u32) -> Result<Option<(u32, u32)>, Violation> {
        let list = self.free_list();
        // Each pop removes one element, so a list that cycles cannot trap us.
        for _ in 0..=self.count() {
            match list.pop() {
                Ok(Some(index)) => {
                    if let Some(generation) = self.take(index, owner) {
                        return Ok(Some((index, generation)));
                    }
                    // A stale hint: the slot was taken through `fresh` or reclaimed.
                }
                Ok(None) => break,
                Err(e) => return Err(free_list_violation(e)),
            }
        }
        while *fresh < self.count() {
            let index = *fresh;
            *fresh += 1;
            if let Some(generation) = self.take(index, owner) {
                return Ok(Some((index, generation)));
            }
        }
        Ok(None)
    }

    /// CAS `from`(gen) -> `to`(gen); on failure, the word as found.
    fn cas(
        &self,
        index: u32,
        gen: u32,
        from: SlotState,
        to: SlotState,
        ord: Ordering,
    ) -> Result<(), u64> {
        self.words[index as usize]
            .cas(pack(from, gen), pack(to, gen), ord, Ordering::Relaxed)
            .map(|_| ())
    }

    /// Sender: Loaned(g) -> Sent(g), just before the descriptor is pushed. Release:
    /// the payload writes happen before the receiver's claim. On failure (only the
    /// receiver can have touched a Loaned slot) returns the word as found.
    // shm[impl shm.slot.publish]
    pub fn mark_sent(&self, index: u32, generation: u32) -> Result<(), u64> {
        let (from, to) = (SlotState::Loaned, SlotState::Sent);
        self.cas(index, generation, from, to, Ordering::Release)
    }

    /// Sender: Loaned(g) or Sent(g) -> Free(g), for a slot whose descriptor could not
    /// be pushed.
    // shm[impl shm.slot.free]
    pub fn unloan(&self, index: u32, generation: u32) {
        for from in [SlotState::Sent, SlotState::Loaned] {
            if self
                .cas(index, generation, from, SlotState::Free, Ordering::Release)
                .is_ok()
            {
                // A push that fails (only a peer scribbling on the list makes it)
                // leaves the slot Free but unlisted until the pool is next reset.
                let _ = self.free_list().push(index);
                return;
            }
        }
    }

    /// Receiver: checks a slot reference read from a descriptor and claims the slot,
    /// Sent(g) -> Received(g). Every field is validated before it is used.
    // shm[impl shm.slot.claim]
    pub fn claim(
        &self,
        index: u32,
        generation: u32,
        len: u32,
        owner: u32,
    ) -> Result<(), Violation> {
        if index >= self.count() {
            return Err(Violation::SlotIndex {
                index,
                count: self.count(),
            });
        }
        if len > self.slot_size {
            return Err(Violation::SlotLen {
                len,
                slot_size: self.slot_size,
            });
        }
        // Acquire: pairs with the sender's Release in mark_sent, so the payload is
        // visible.
        self.words[index as usize]
            .cas(
                pack(SlotState::Sent, generation),
                pack(SlotState::Received, generation),
                Ordering::Acquire,
                Ordering::Acquire,
            )
            .map_err(|found| Violation::SlotState {
                index,
                generation,
                found,
            })?;
        self.owners[index as usize].store(owner, Ordering::Relaxed);
        Ok(())
    }

    /// Receiver: Received(g) -> Free(g). On failure (only a misbehaving sender can
    /// change a Received slot's word) returns the word as found.
    // shm[impl shm.slot.free]
    pub fn release(&self, index: u32, generation: u32) -> Result<(), u64> {
        let (from, to) = (SlotState::Received, SlotState::Free);
        self.cas(index, generation, from, to, Ordering::Release)?;
        // As in `unloan`: a failed push only strands the slot until the next reset.
        let _ = self.free_list().push(index);
        Ok(())
    }

    /// Address of slot `index`'s data, for loans and views (`index` in range).
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

    /// Copies `src` into slot `index` (which the caller has Loaned). `src.len()` must
    /// not exceed the slot size; returns false otherwise.
    pub fn write(&self, index: u32, src: &[u8]) -> bool {
        index < self.count()
            && src.len() <= self.slot_size as usize
            && self.region.copy_in(self.data_at(index), src)
    }

    /// Replaces `out` with the first `len` bytes of slot `index` (which the caller has
    /// claimed); returns false when out of range.
    pub fn read_to_vec(&self, index: u32, len: u32, out: &mut Vec<u8>) -> bool {
        index < self.count()
            && len <= self.slot_size
            && self
                .region
                .copy_out_to_vec(self.data_at(index), len as usize, out)
    }

    /// Counts slots by state.
    pub fn usage(&self) -> PoolUsage {
        let mut u = PoolUsage::default();
        for m in self.words {
            if state_of(m.load(Ordering::Acquire)) == Some(SlotState::Free) {
                u.free += 1;
            } else {
                u.in_use += 1;
            }
        }
        u
    }

    /// Returns every slot whose state `keep` refuses to Free, keeping its
    /// generation, and empties the free list (the sender rediscovers every Free slot
    /// by rescanning); returns how many were reclaimed. Only for the host once the
    /// guest that shared the pool is gone.
    // shm[impl shm.slot.reclaim]
    pub fn reclaim_all(&self, keep: impl Fn(SlotState) -> bool) -> u32 {
        self.reclaim_where(|_, state| keep(state))
    }

    /// [`reclaim_all`](Self::reclaim_all), deciding by slot index too (at-least-once
    /// retention keeps the slots its undelivered descriptors name).
    pub fn reclaim_where(&self, keep: impl Fn(u32, SlotState) -> bool) -> u32 {
        let mut reclaimed = 0;
        for (index, m) in self.words.iter().enumerate() {
            let raw = m.load(Ordering::Acquire);
            match state_of(raw) {
                Some(SlotState::Free) => continue,
                Some(state) if keep(index as u32, state) => continue,
                _ => {}
            }
            m.store(pack(SlotState::Free, (raw >> 32) as u32), Ordering::Release);
            reclaimed += 1;
        }
        self.free_list().clear();
        reclaimed
    }

    /// Host, retaining a dead guest's undelivered messages: a slot its descriptor
    /// still names that the guest had claimed (Received(g)) but not consumed goes back
    /// to Sent(g), for the next guest to claim. True when the slot is now Sent(g).
    // shm[impl shm.delivery.at-least-once]
    pub fn restore_sent(&self, index: u32, generation: u32) -> bool {
        let Some(word) = self.words.get(index as usize) else {
            return false;
        };
        let sent = pack(SlotState::Sent, generation);
        let received = pack(SlotState::Received, generation);
        match word.cas(received, sent, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(found) => found == sent,
        }
    }

    /// The state of slot `index` (`None` out of range or for a word with no state).
    pub fn state(&self, index: u32) -> Option<SlotState> {
        state_of(self.words.get(index as usize)?.load(Ordering::Acquire))
    }
}

fn free_list_violation(e: FreeListError) -> Violation {
    Violation::FreeList {
        found: match e {
            FreeListError::OutOfRange(v) => v,
            FreeListError::Contended => u32::MAX,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::HeapRegion;

    const SIZE: u32 = 16;

    /// A pool of `n` slots whose data sits at offset 64 of a region with room to spare
    /// after the last slot (so that an index one past the pool would still be mapped).
    struct Pool {
        header: PoolHeader,
        words: Vec<AtomicU64>,
        links: Vec<AtomicU32>,
        owners: Vec<AtomicU32>,
        data: HeapRegion,
    }

    impl Pool {
        fn new(n: usize) -> Self {
            Pool {
                header: PoolHeader {
                    free_head: AtomicU64::new(0),
                    _reserved: Default::default(),
                },
                words: (0..n).map(|_| AtomicU64::new(0)).collect(),
                links: (0..n).map(|_| AtomicU32::new(0)).collect(),
                owners: (0..n).map(|_| AtomicU32::new(0)).collect(),
                data: HeapRegion::new_zeroed(64 + (n + 2) * SIZE as usize).unwrap(),
            }
        }

        fn view(&self) -> PoolView<'_> {
            let region = self.data.region();
            PoolView::new(
                &self.header,
                &self.words,
                &self.links,
                &self.owners,
                region,
                64,
                SIZE,
            )
        }

        fn set(&self, index: usize, state: u64, generation: u32) {
            self.words[index].store(u64::from(generation) << 32 | state, Ordering::Relaxed);
        }
    }

    // shm[verify shm.slot.layout]
    #[test]
    fn every_state_reads_back_and_other_words_hold_none() {
        let pool = Pool::new(5);
        for (raw, state) in [
            SlotState::Free,
            SlotState::Loaned,
            SlotState::Sent,
            SlotState::Received,
        ]
        .into_iter()
        .enumerate()
        {
            pool.set(raw, raw as u64, 9);
            assert_eq!(pool.view().state(raw as u32), Some(state));
            assert_eq!(pack(state, 9), 9 << 32 | raw as u64);
        }
        pool.set(4, 4, 9);
        assert_eq!(pool.view().state(4), None);
        assert_eq!(pool.view().state(5), None, "out of range");
        assert_eq!(
            pool.view().usage(),
            PoolUsage { free: 1, in_use: 4 },
            "a word with no state is not Free"
        );
        let mut total = pool.view().usage();
        total += pool.view().usage();
        assert_eq!(total, PoolUsage { free: 2, in_use: 8 });
        assert_eq!(owner_word(3, 0x0012_3456), 0x1234_5603);
    }

    // A sender that could not publish returns its slot from Sent or Loaned (only with
    // the generation it holds), and the slot is listed for the next allocation.
    // shm[verify shm.slot.free]
    #[test]
    fn unloan_returns_the_slot_and_lists_it() {
        let pool = Pool::new(2);
        let view = pool.view();
        let mut fresh = 0;
        let (a, ga) = view.alloc(&mut fresh, 0).unwrap().unwrap();
        view.mark_sent(a, ga).unwrap();
        view.unloan(a, ga + 1);
        assert_eq!(view.state(a), Some(SlotState::Sent), "not its generation");
        view.unloan(a, ga);
        assert_eq!(view.state(a), Some(SlotState::Free));
        let (b, gb) = view.alloc(&mut fresh, 0).unwrap().unwrap();
        assert_eq!((b, gb), (a, ga + 1), "taken from the list, not the scan");
        view.unloan(b, gb);
        assert_eq!(view.state(b), Some(SlotState::Free), "from Loaned too");
        assert_eq!(view.alloc(&mut fresh, 0).unwrap(), Some((a, ga + 2)));
    }

    // shm[verify shm.slot.layout]
    #[test]
    fn slot_data_is_reached_only_inside_the_pool() {
        let pool = Pool::new(2);
        let view = pool.view();
        let base = pool.data.region().as_ptr() as usize;
        assert_eq!(
            view.data_ptr(1).map(|p| p.as_ptr() as usize),
            Some(base + 64 + SIZE as usize)
        );
        assert_eq!(view.data_ptr(2), None);
        assert!(view.write(1, &[7; SIZE as usize]));
        assert!(
            !view.write(1, &[7; SIZE as usize + 1]),
            "longer than a slot"
        );
        assert!(!view.write(2, &[7]), "past the pool");
        let mut out = Vec::new();
        assert!(view.read_to_vec(1, SIZE, &mut out));
        assert_eq!(out, [7; SIZE as usize]);
        assert!(!view.read_to_vec(1, SIZE + 1, &mut out));
        assert!(!view.read_to_vec(2, 1, &mut out), "past the pool");
    }

    // Reclaim returns every slot that is not Free and not kept, keeping its generation
    // (a word holding no state included), counts them, and empties the list.
    // shm[verify shm.slot.reclaim]
    #[test]
    fn reclaim_frees_all_but_free_and_kept_slots_keeping_generations() {
        let pool = Pool::new(5);
        pool.set(0, SlotState::Free as u64, 3);
        pool.set(1, SlotState::Loaned as u64, 4);
        pool.set(2, SlotState::Sent as u64, 5);
        pool.set(3, SlotState::Received as u64, 6);
        pool.set(4, 9, 7);
        let view = pool.view();
        view.free_list().push(0).unwrap();
        let reclaimed = view.reclaim_all(|s| s == SlotState::Received);
        assert_eq!(reclaimed, 3);
        let words: Vec<u64> = pool
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        assert_eq!(
            words,
            [
                pack(SlotState::Free, 3),
                pack(SlotState::Free, 4),
                pack(SlotState::Free, 5),
                pack(SlotState::Received, 6),
                pack(SlotState::Free, 7),
            ]
        );
        assert_eq!(view.free_list().pop(), Ok(None), "the list is emptied");
        assert_eq!(view.reclaim_where(|index, _| index == 3), 0);
        assert_eq!(view.reclaim_all(|_| false), 1);
    }

    // At-least-once: a slot the dead guest claimed goes back to Sent for the next one;
    // a slot already Sent stays; anything else is refused.
    // shm[verify shm.delivery.at-least-once]
    #[test]
    fn restore_sent_takes_back_only_the_named_generation() {
        let pool = Pool::new(3);
        pool.set(0, SlotState::Received as u64, 4);
        pool.set(1, SlotState::Sent as u64, 4);
        pool.set(2, SlotState::Free as u64, 4);
        let view = pool.view();
        assert!(!view.restore_sent(0, 5), "another generation");
        assert!(view.restore_sent(0, 4));
        assert_eq!(view.state(0), Some(SlotState::Sent));
        assert!(view.restore_sent(1, 4));
        assert!(!view.restore_sent(2, 4));
        assert!(!view.restore_sent(3, 4), "out of range");
        assert_eq!(view.state(2), Some(SlotState::Free));
    }
}
