//! A lock-free free list of slot indices with an ABA-safe tagged head
//! (`shm.slot.free-list`).
//!
//! The list is a Treiber stack threaded through one link word per slot. The head packs
//! a tag (high 32 bits) and `index + 1` (low 32 bits, 0 for an empty list); every
//! successful push or pop increments the tag, so a pop whose snapshot of the head is
//! stale — even if the same index is back on top (ABA) — fails its compare-and-swap
//! and retries instead of installing a stale link.
//!
//! The list is a *hint*: it lives in memory the other side can write, so an index it
//! yields is checked against the pool size, and the slot's own state word (not the
//! list) decides whether the slot may be taken (`shm.slot.alloc`). The algorithm is
//! generic over the atomic types so the loom models in this module run the same code.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The atomic operations the free list needs, so that loom's atomics can stand in for
/// the shared-memory ones in model checks.
pub trait Atom {
    /// The value type.
    type V: Copy;
    /// Atomic load.
    fn load(&self, order: Ordering) -> Self::V;
    /// Atomic store.
    fn store(&self, v: Self::V, order: Ordering);
    /// Strong compare-and-swap.
    fn cas(
        &self,
        current: Self::V,
        new: Self::V,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Self::V, Self::V>;
}

macro_rules! impl_atom {
    ($t:ty, $v:ty) => {
        impl Atom for $t {
            type V = $v;
            #[inline]
            fn load(&self, order: Ordering) -> $v {
                <$t>::load(self, order)
            }
            #[inline]
            fn store(&self, v: $v, order: Ordering) {
                <$t>::store(self, v, order)
            }
            #[inline]
            fn cas(&self, c: $v, n: $v, s: Ordering, f: Ordering) -> Result<$v, $v> {
                <$t>::compare_exchange(self, c, n, s, f)
            }
        }
    };
}
impl_atom!(AtomicU64, u64);
impl_atom!(AtomicU32, u32);
#[cfg(test)]
impl_atom!(loom::sync::atomic::AtomicU64, u64);
#[cfg(test)]
impl_atom!(loom::sync::atomic::AtomicU32, u32);

/// A pop or push gave up: the list holds an impossible value, or it kept changing
/// under us for [`MAX_ATTEMPTS`] tries (only a misbehaving peer does that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeListError {
    /// The head or a link named an index outside the pool (the raw value found).
    OutOfRange(u32),
    /// Every compare-and-swap attempt lost.
    Contended,
}

/// Compare-and-swap attempts before a push or pop gives up. Honest contention is at
/// most a few concurrent frees; this bound only stops a peer from livelocking us.
pub const MAX_ATTEMPTS: u32 = 1 << 16;

/// A free list over `links.len()` slots: `head` and one link word per slot.
#[derive(Debug, Clone, Copy)]
pub struct FreeList<'a, H, L> {
    head: &'a H,
    links: &'a [L],
}

fn pack(tag: u32, index_plus_one: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(index_plus_one)
}

impl<'a, H: Atom<V = u64>, L: Atom<V = u32>> FreeList<'a, H, L> {
    /// A view of the list whose head is `head` and whose link for slot `i` is
    /// `links[i]`.
    pub fn new(head: &'a H, links: &'a [L]) -> Self {
        Self { head, links }
    }

    /// Pushes slot `index` (which the caller has just made Free). Release: the
    /// caller's earlier writes (the Free state, its reads of the payload) happen
    /// before a pop that takes `index`.
    pub fn push(&self, index: u32) -> Result<(), FreeListError> {
        let link = self
            .links
            .get(index as usize)
            .ok_or(FreeListError::OutOfRange(index))?;
        let mut head = self.head.load(Ordering::Relaxed);
        for _ in 0..MAX_ATTEMPTS {
            link.store(head as u32, Ordering::Relaxed);
            let new = pack(((head >> 32) as u32).wrapping_add(1), index + 1);
            match self
                .head
                .cas(head, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(found) => head = found,
            }
        }
        Err(FreeListError::Contended)
    }

    /// Pops the index on top of the list, `None` when it is empty. The index is in
    /// range; whether its slot is really Free is for the caller's state word to say.
    pub fn pop(&self) -> Result<Option<u32>, FreeListError> {
        let n = self.links.len() as u32;
        // Acquire: pairs with the Release of the push that installed the top, so the
        // link it wrote is visible.
        let mut head = self.head.load(Ordering::Acquire);
        for _ in 0..MAX_ATTEMPTS {
            let top = head as u32;
            if top == 0 {
                return Ok(None);
            }
            if top > n {
                return Err(FreeListError::OutOfRange(top));
            }
            let index = top - 1;
            let next = self.links[index as usize].load(Ordering::Relaxed);
            if next > n {
                // A stale read is possible only if the head moved; re-check first.
                let now = self.head.load(Ordering::Acquire);
                if now != head {
                    head = now;
                    continue;
                }
                return Err(FreeListError::OutOfRange(next));
            }
            let new = pack(((head >> 32) as u32).wrapping_add(1), next);
            match self
                .head
                .cas(head, new, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => return Ok(Some(index)),
                Err(found) => head = found,
            }
        }
        Err(FreeListError::Contended)
    }

    /// Empties the list (only for a party no one else uses the pool with).
    pub fn clear(&self) {
        let tag = (self.head.load(Ordering::Relaxed) >> 32) as u32;
        self.head.store(pack(tag.wrapping_add(1), 0), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(n: usize) -> (AtomicU64, Vec<AtomicU32>) {
        (AtomicU64::new(0), (0..n).map(|_| AtomicU32::new(0)).collect())
    }

    #[test]
    fn push_pop_is_lifo_and_tags_every_change() {
        let (head, links) = list(4);
        let fl = FreeList::new(&head, &links);
        assert_eq!(fl.pop(), Ok(None));
        for i in [2, 0, 3] {
            fl.push(i).unwrap();
        }
        assert_eq!(head.load(Ordering::Relaxed) >> 32, 3);
        assert_eq!(fl.pop(), Ok(Some(3)));
        assert_eq!(fl.pop(), Ok(Some(0)));
        assert_eq!(fl.pop(), Ok(Some(2)));
        assert_eq!(fl.pop(), Ok(None));
        assert_eq!(head.load(Ordering::Relaxed) >> 32, 6);
        assert_eq!(fl.push(4), Err(FreeListError::OutOfRange(4)));
    }

    #[test]
    fn garbage_is_a_typed_error_never_a_panic() {
        let (head, links) = list(4);
        let fl = FreeList::new(&head, &links);
        head.store(pack(7, 99), Ordering::Relaxed);
        assert_eq!(fl.pop(), Err(FreeListError::OutOfRange(99)));
        head.store(pack(7, 1), Ordering::Relaxed);
        links[0].store(1000, Ordering::Relaxed);
        assert_eq!(fl.pop(), Err(FreeListError::OutOfRange(1000)));
        // A cycle cannot trap a pop: each pop takes one element.
        links[0].store(1, Ordering::Relaxed);
        assert_eq!(fl.pop(), Ok(Some(0)));
        assert_eq!(fl.pop(), Ok(Some(0)));
        fl.clear();
        assert_eq!(fl.pop(), Ok(None));
    }
}
