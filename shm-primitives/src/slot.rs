//! Slot pools: fixed-size payload slots with a per-slot state word.
//!
//! Each guest area has two pools, one per direction. The sender of that direction
//! allocates; the receiver claims and frees. The state word (`generation << 32 |
//! state`) is the only synchronisation, and every transition is a CAS on the whole
//! word, so a stale or duplicated reference can never free a slot twice.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::region::Region;
use crate::violation::Violation;

/// Size of one slot's metadata.
pub const SLOT_META_SIZE: usize = 8;

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

fn pack(state: SlotState, generation: u32) -> u64 {
    (u64::from(generation) << 32) | state as u64
}

fn state_of(raw: u64) -> Option<SlotState> {
    Some(match raw as u32 {
        0 => SlotState::Free,
        1 => SlotState::Loaned,
        2 => SlotState::Sent,
        3 => SlotState::Received,
        _ => return None,
    })
}

/// A pool in shared memory.
#[derive(Debug, Clone, Copy)]
pub struct PoolView<'a> {
    metas: &'a [AtomicU64],
    region: Region<'a>,
    data_offset: usize,
    slot_size: u32,
}

/// Slot counts by state, for accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// Slots in state Free.
    pub free: u32,
    /// Slots in any other state (or an invalid one).
    pub in_use: u32,
}

impl<'a> PoolView<'a> {
    /// A view over `metas` and `metas.len()` slots of `slot_size` bytes at
    /// `data_offset` in `region`. Panics if the data does not fit in the region: the
    /// arguments come from a validated layout, never from peers.
    pub fn new(
        metas: &'a [AtomicU64],
        region: Region<'a>,
        data_offset: usize,
        slot_size: u32,
    ) -> Self {
        let data_len = metas.len() * slot_size as usize;
        assert!(region.span(data_offset, data_len).is_some());
        Self {
            metas,
            region,
            data_offset,
            slot_size,
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

    /// Sender: takes a Free slot, scanning from `*cursor`: Free(g) -> Loaned(g+1).
    /// Returns the index and its new generation, or `None` when no slot is Free.
    // shm[impl shm.slot.alloc]
    pub fn alloc(&self, cursor: &mut u32) -> Option<(u32, u32)> {
        let n = self.count();
        for step in 0..n {
            let index = (*cursor + step) % n;
            let meta = &self.metas[index as usize];
            let raw = meta.load(Ordering::Relaxed);
            if state_of(raw) != Some(SlotState::Free) {
                continue;
            }
            let generation = ((raw >> 32) as u32).wrapping_add(1);
            // Acquire: the receiver's reads of the slot's previous payload happen
            // before our writes of the new one.
            if meta
                .compare_exchange(
                    raw,
                    pack(SlotState::Loaned, generation),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                *cursor = (index + 1) % n;
                return Some((index, generation));
            }
        }
        None
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
        self.metas[index as usize]
            .compare_exchange(pack(from, gen), pack(to, gen), ord, Ordering::Relaxed)
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
                return;
            }
        }
    }

    /// Receiver: checks a slot reference read from a descriptor and claims the slot,
    /// Sent(g) -> Received(g). Every field is validated before it is used.
    // shm[impl shm.slot.claim]
    pub fn claim(&self, index: u32, generation: u32, len: u32) -> Result<(), Violation> {
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
        self.metas[index as usize]
            .compare_exchange(
                pack(SlotState::Sent, generation),
                pack(SlotState::Received, generation),
                Ordering::Acquire,
                Ordering::Acquire,
            )
            .map(|_| ())
            .map_err(|found| Violation::SlotState {
                index,
                generation,
                found,
            })
    }

    /// Receiver: Received(g) -> Free(g). On failure (only a misbehaving sender can
    /// change a Received slot's word) returns the word as found.
    // shm[impl shm.slot.free]
    pub fn release(&self, index: u32, generation: u32) -> Result<(), u64> {
        let (from, to) = (SlotState::Received, SlotState::Free);
        self.cas(index, generation, from, to, Ordering::Release)
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
        for m in self.metas {
            if state_of(m.load(Ordering::Acquire)) == Some(SlotState::Free) {
                u.free += 1;
            } else {
                u.in_use += 1;
            }
        }
        u
    }

    /// Returns every slot not in `keep` to Free, keeping its generation; returns how
    /// many were reclaimed. Only for the host once the guest that shared the pool is
    /// gone.
    // shm[impl shm.slot.reclaim]
    pub fn reclaim_all(&self, keep: Option<SlotState>) -> u32 {
        let mut reclaimed = 0;
        for m in self.metas {
            let raw = m.load(Ordering::Acquire);
            let state = state_of(raw);
            if state == Some(SlotState::Free) || (state.is_some() && state == keep) {
                continue;
            }
            m.store(pack(SlotState::Free, (raw >> 32) as u32), Ordering::Release);
            reclaimed += 1;
        }
        reclaimed
    }
}
