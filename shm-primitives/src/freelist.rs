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

/// The atomic operations the free list (and the segment's readiness) need, so that
/// loom's atomics can stand in for the shared-memory ones in model checks.
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
    /// Atomic add (wrapping), returning the previous value.
    fn fetch_add(&self, v: Self::V, order: Ordering) -> Self::V;
    /// Atomic subtract (wrapping), returning the previous value.
    fn fetch_sub(&self, v: Self::V, order: Ordering) -> Self::V;
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
            #[inline]
            fn fetch_add(&self, v: $v, order: Ordering) -> $v {
                <$t>::fetch_add(self, v, order)
            }
            #[inline]
            fn fetch_sub(&self, v: $v, order: Ordering) -> $v {
                <$t>::fetch_sub(self, v, order)
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

    // shm[impl shm.slot.reclaim]
    /// Empties the list (only for a party no one else allocates from the pool with).
    ///
    /// A compare-and-swap, not a store: a push that lands just before the clear (a
    /// slot freed by a view the host still holds over a recycle, `shm.slot.reclaim`)
    /// is then read by it (Acquire), so the slot's Free word happens before whatever
    /// follows the clear, and the next sender's scan finds it. A plain store could
    /// erase that push without ordering anything: the slot, Free but unlisted, could
    /// then be missed by the scan and lost until the next reset.
    pub fn clear(&self) {
        let mut head = self.head.load(Ordering::Relaxed);
        for _ in 0..MAX_ATTEMPTS {
            let new = pack(((head >> 32) as u32).wrapping_add(1), 0);
            match self
                .head
                .cas(head, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(found) => head = found,
            }
        }
        // Only a party that keeps rewriting the head gets here; empty it regardless.
        let tag = (head >> 32) as u32;
        self.head
            .store(pack(tag.wrapping_add(1), 0), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(n: usize) -> (AtomicU64, Vec<AtomicU32>) {
        (
            AtomicU64::new(0),
            (0..n).map(|_| AtomicU32::new(0)).collect(),
        )
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

    /// The list from its head down, top first; `None` if it names an index out of range
    /// or is longer than the pool (an index on it twice, or a cycle).
    fn walk(head: &AtomicU64, links: &[AtomicU32]) -> Option<Vec<u32>> {
        let mut out = Vec::new();
        let mut top = head.load(Ordering::Relaxed) as u32;
        while top != 0 {
            if top as usize > links.len() || out.len() == links.len() {
                return None;
            }
            out.push(top - 1);
            top = links[top as usize - 1].load(Ordering::Relaxed);
        }
        Some(out)
    }

    // A pop stalls after reading the head and the top's link while another party pops
    // the top, pops the next and pushes the top back: the same index is on top again.
    // Compared without the tag, the stale snapshot matches and the stalled pop would
    // install the link it read (a slot the other party holds); with the tag it fails.
    // shm[verify shm.slot.free-list]
    #[test]
    fn the_tag_defeats_the_aba_an_untagged_head_falls_for() {
        let (head, links) = list(3);
        let fl = FreeList::new(&head, &links);
        for i in [2, 1, 0] {
            fl.push(i).unwrap();
        }
        // A: reads head (top = slot 0) and slot 0's link (next = slot 1), then stalls.
        let snapshot = head.load(Ordering::Acquire);
        assert_eq!(snapshot as u32, 1);
        let next = links[0].load(Ordering::Relaxed);
        assert_eq!(next, 2);
        // B: pops 0, pops 1 (and holds it), pushes 0 back.
        assert_eq!(fl.pop(), Ok(Some(0)));
        assert_eq!(fl.pop(), Ok(Some(1)));
        fl.push(0).unwrap();
        let now = head.load(Ordering::Relaxed);
        assert_eq!(now as u32, snapshot as u32, "slot 0 is on top again");
        assert_eq!(now >> 32, (snapshot >> 32) + 3, "three changes, three tags");
        // Untagged, A's compare-and-swap would succeed and put slot 1, which B holds,
        // back on top of the list.
        let untagged = AtomicU64::new(now & 0xffff_ffff);
        let fooled = untagged.compare_exchange(
            snapshot & 0xffff_ffff,
            u64::from(next),
            Ordering::Acquire,
            Ordering::Acquire,
        );
        assert!(fooled.is_ok());
        assert_eq!(
            untagged.load(Ordering::Relaxed),
            2,
            "slot 1 (held by B) on top"
        );
        // Tagged, the same compare-and-swap on the real head word fails...
        let stale = pack(((snapshot >> 32) as u32).wrapping_add(1), next);
        assert_eq!(
            head.compare_exchange(snapshot, stale, Ordering::Acquire, Ordering::Acquire),
            Err(now)
        );
        assert_eq!(head.load(Ordering::Relaxed), now);
        // ... and A's retry from the head it found takes slot 0 and leaves slot 2.
        assert_eq!(fl.pop(), Ok(Some(0)));
        assert_eq!(walk(&head, &links), Some(vec![2]));
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_config())]

        // shm[verify shm.slot.free-list]
        #[test]
        fn agrees_with_a_model_stack(
            n in 1usize..=8,
            tag in proptest::prop_oneof![proptest::prelude::Just(u32::MAX - 2), 0..=u32::MAX],
            ops in proptest::collection::vec((0u8..3, 0..u32::MAX), 0..64),
        ) {
            let (head, links) = list(n);
            head.store(pack(tag, 0), Ordering::Relaxed);
            let fl = FreeList::new(&head, &links);
            let mut model: Vec<u32> = Vec::new();
            for (op, pick) in ops {
                let before = head.load(Ordering::Relaxed);
                let off: Vec<u32> = (0..n as u32).filter(|i| !model.contains(i)).collect();
                let changed = if op > 0 && !off.is_empty() {
                    let index = off[pick as usize % off.len()];
                    proptest::prop_assert_eq!(fl.push(index), Ok(()));
                    model.push(index);
                    true
                } else {
                    let got = fl.pop();
                    proptest::prop_assert_eq!(got, Ok(model.pop()));
                    if let Ok(Some(index)) = got {
                        proptest::prop_assert!((index as usize) < n);
                    }
                    got != Ok(None)
                };
                let after = head.load(Ordering::Relaxed);
                if changed {
                    let next_tag = ((before >> 32) as u32).wrapping_add(1);
                    proptest::prop_assert_eq!(after >> 32, u64::from(next_tag));
                } else {
                    proptest::prop_assert_eq!(after, before);
                }
                let expected: Vec<u32> = model.iter().rev().copied().collect();
                proptest::prop_assert_eq!(walk(&head, &links), Some(expected));
            }
        }
    }
}

/// Loom models of the free list inside the slot protocol: an allocator pops an index and
/// then moves the slot's state word Free -> Loaned (skipping the index if that fails: a
/// stale hint); a freer moves Loaned -> Free (Release) and then pushes the index.
// Not under Miri: loom runs each thread on a stack of its own (its `generator`
// dependency calls getrlimit and switches stacks in assembly), which Miri cannot run.
#[cfg(all(test, not(miri)))]
mod models {
    use super::FreeList;
    use loom::sync::atomic::{AtomicU32, AtomicU64};
    use loom::sync::Arc;
    use loom::thread;
    use std::sync::atomic::Ordering;

    const FREE: u64 = 0;
    const LOANED: u64 = 1;

    /// Runs `f` under loom with at most `bound` preemptions (`None`: exhaustive) unless
    /// `LOOM_MAX_PREEMPTIONS` says otherwise; each model takes seconds in a debug build.
    fn model<F: Fn() + Sync + Send + 'static>(bound: Option<usize>, f: F) {
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = bound;
        }
        builder.check(f);
    }

    /// A pool: the list head, and per slot a link word, a state word and a count of the
    /// parties holding it (a witness for the checks, not part of the protocol).
    struct Pool {
        head: AtomicU64,
        links: Vec<AtomicU32>,
        states: Vec<AtomicU64>,
        holders: Vec<AtomicU32>,
    }

    impl Pool {
        /// `n` slots: those in `free` are Free and pushed in that order (the last ends
        /// on top); each of the others is Loaned and held by one party.
        fn new(n: u32, free: &[u32]) -> Self {
            let held = |i: &u32| u32::from(!free.contains(i));
            let pool = Pool {
                head: AtomicU64::new(0),
                links: (0..n).map(|_| AtomicU32::new(0)).collect(),
                states: (0..n).map(|i| AtomicU64::new(held(&i).into())).collect(),
                holders: (0..n).map(|i| AtomicU32::new(held(&i))).collect(),
            };
            for &i in free {
                pool.list().push(i).unwrap();
            }
            pool
        }

        fn list(&self) -> FreeList<'_, AtomicU64, AtomicU32> {
            FreeList::new(&self.head, &self.links)
        }

        /// Allocator: pops until a slot goes Free -> Loaned; `None` once the list is
        /// empty.
        fn take(&self) -> Option<u32> {
            loop {
                let index = self.list().pop().unwrap()?;
                let state = &self.states[index as usize];
                if state
                    .compare_exchange(FREE, LOANED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    let holders = self.holders[index as usize].fetch_add(1, Ordering::Relaxed);
                    assert_eq!(holders, 0, "slot {index} handed out twice");
                    return Some(index);
                }
            }
        }

        /// Freer: Loaned -> Free, then push.
        fn give(&self, index: u32) {
            let holders = self.holders[index as usize].fetch_sub(1, Ordering::Relaxed);
            assert_eq!(holders, 1, "slot {index} freed by a party not holding it");
            let state = &self.states[index as usize];
            state
                .compare_exchange(LOANED, FREE, Ordering::Release, Ordering::Relaxed)
                .expect("only the holder frees");
            self.list().push(index).unwrap();
        }

        /// Once every party is done: each slot is either held by exactly one entry of
        /// `held` (and Loaned) or on the list exactly once (and Free).
        fn check(&self, held: &[u32]) {
            let n = self.links.len();
            let mut on_list = vec![0usize; n];
            let mut top = self.head.load(Ordering::Relaxed) as u32;
            while top != 0 {
                assert!(top as usize <= n, "the list names slot {}", top - 1);
                let index = top as usize - 1;
                on_list[index] += 1;
                assert!(on_list[index] == 1, "slot {index} is on the list twice");
                top = self.links[index].load(Ordering::Relaxed);
            }
            for (i, &listed) in on_list.iter().enumerate() {
                let holds = held.iter().filter(|&&h| h as usize == i).count();
                assert_eq!(listed + holds, 1, "slot {i}: listed {listed}, held {holds}");
                let loaned = u64::from(holds == 1);
                assert_eq!(self.states[i].load(Ordering::Relaxed), loaned, "slot {i}");
                assert_eq!(self.holders[i].load(Ordering::Relaxed) as usize, holds);
            }
        }
    }

    // Two parties free slots 0 and 1 while a third takes: slot 2 is on the list from
    // the start, so the take always succeeds, and nothing is lost or listed twice.
    // shm[verify shm.slot.free-list]
    #[test]
    fn concurrent_frees_and_a_take_lose_and_duplicate_nothing() {
        model(None, || {
            let pool = Arc::new(Pool::new(3, &[2]));
            let freers: Vec<_> = [0, 1]
                .into_iter()
                .map(|i| {
                    let pool = pool.clone();
                    thread::spawn(move || pool.give(i))
                })
                .collect();
            let taken = pool.take();
            for freer in freers {
                freer.join().unwrap();
            }
            assert!(taken.is_some());
            pool.check(taken.as_slice());
        });
    }

    // ABA: A takes once while B takes X, takes Y and frees X (X back on top). Whatever
    // A read of the head and X's link before stalling, it must not install Y (held by
    // B) as the top.
    // shm[verify shm.slot.free-list]
    #[test]
    fn aba_never_installs_a_stale_next() {
        model(None, || {
            let pool = Arc::new(Pool::new(3, &[2, 1, 0]));
            let b = {
                let pool = pool.clone();
                thread::spawn(move || {
                    let x = pool.take().unwrap();
                    let y = pool.take().unwrap();
                    pool.give(x);
                    y
                })
            };
            let a = pool.take().unwrap();
            let y = b.join().unwrap();
            pool.check(&[a, y]);
        });
    }

    // Two allocators take from a list of two while a freer pushes a third slot; each
    // allocator frees what it took. No slot ever has two holders, and at the end all
    // three are on the list once. Exhaustive takes minutes; four preemptions, seconds.
    // shm[verify shm.slot.free-list]
    #[test]
    fn no_slot_is_handed_out_twice() {
        model(Some(4), || {
            let pool = Arc::new(Pool::new(3, &[1, 0]));
            let allocators: Vec<_> = (0..2)
                .map(|_| {
                    let pool = pool.clone();
                    thread::spawn(move || {
                        let index = pool.take().unwrap();
                        pool.give(index);
                    })
                })
                .collect();
            pool.give(2);
            for allocator in allocators {
                allocator.join().unwrap();
            }
            pool.check(&[]);
        });
    }
}
