//! The slot pool (`shm.slot.*`): the real `PoolView` (state words, tagged free list,
//! fresh scan, reclaim) over loom's atomics.

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;

use super::model;
use crate::region::HeapRegion;
use crate::slot::{PoolHeader, PoolView, SlotState};

/// Bytes per slot in the models.
const SLOT_SIZE: u32 = 8;

/// A pool over loom's atomics, its data in a heap region, plus one witness cell per
/// slot that the holder of the slot writes (sender) or reads (receiver) together with
/// the data: loom reports any two of those accesses the slot protocol leaves
/// unordered.
pub(super) struct Pool {
    header: PoolHeader<AtomicU64>,
    words: Vec<AtomicU64>,
    links: Vec<AtomicU32>,
    owners: Vec<AtomicU32>,
    data: HeapRegion,
    witness: Vec<UnsafeCell<u64>>,
}

impl Pool {
    /// `count` slots, all Free(0), the free list empty (a fresh pool).
    pub(super) fn new(count: u32) -> Self {
        let n = count as usize;
        Pool {
            header: PoolHeader {
                free_head: AtomicU64::new(0),
                _reserved: Default::default(),
            },
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            links: (0..n).map(|_| AtomicU32::new(0)).collect(),
            owners: (0..n).map(|_| AtomicU32::new(0)).collect(),
            data: HeapRegion::new_zeroed(n * SLOT_SIZE as usize).unwrap(),
            witness: (0..n).map(|_| UnsafeCell::new(u64::MAX)).collect(),
        }
    }

    pub(super) fn view(&self) -> PoolView<'_, AtomicU64, AtomicU32> {
        PoolView::new(
            &self.header,
            &self.words,
            &self.links,
            &self.owners,
            self.data.region(),
            0,
            SLOT_SIZE,
        )
    }

    /// The holder writes payload `n` into slot `index`, data and witness.
    pub(super) fn write(&self, index: u32, n: u64) {
        self.witness[index as usize].with_mut(|w| {
            // SAFETY: a loom cell; loom fails the model if this write is not ordered
            // after the previous holder's read.
            unsafe { *w = n }
        });
        assert!(self.view().write(index, &n.to_le_bytes()));
    }

    /// The holder reads slot `index` and checks it holds payload `n`.
    pub(super) fn read(&self, index: u32, n: u64) {
        let seen = self.witness[index as usize].with(|w| {
            // SAFETY: a loom cell; loom fails the model if this read is not ordered
            // after the sender's write.
            unsafe { *w }
        });
        assert_eq!(seen, n, "slot {index}");
        let mut out = Vec::new();
        assert!(self.view().read_to_vec(index, SLOT_SIZE, &mut out));
        assert_eq!(out, n.to_le_bytes(), "slot {index}");
    }

    /// Once everyone is done, with `fresh` the sender's count of visited slots: every
    /// slot is Free, and is either on the free list exactly once or not yet visited
    /// (never both, never neither), so the next allocations find each slot once.
    pub(super) fn check_all_free(&self, fresh: u32) {
        let n = self.words.len();
        let mut listed = vec![0u32; n];
        let mut top = self.header.free_head.load(Ordering::Relaxed) as u32;
        while top != 0 {
            let index = top as usize - 1;
            assert!(index < n, "the list names slot {index}");
            listed[index] += 1;
            assert_eq!(listed[index], 1, "slot {index} is on the list twice");
            top = self.links[index].load(Ordering::Relaxed);
        }
        for (i, &on_list) in listed.iter().enumerate() {
            let word = self.words[i].load(Ordering::Relaxed);
            assert_eq!(word as u32, SlotState::Free as u32, "slot {i}: {word:#x}");
            let unvisited = u32::from(i as u32 >= fresh);
            assert_eq!(on_list + unvisited, 1, "slot {i}: listed {on_list}");
        }
    }
}

/// Sender: allocates, yielding while the pool is exhausted (`shm.slot.alloc`).
fn alloc(pool: &PoolView<'_, AtomicU64, AtomicU32>, fresh: &mut u32) -> (u32, u32) {
    loop {
        match pool.alloc(fresh, 0).expect("an honest free list") {
            Some(got) => return got,
            None => thread::yield_now(),
        }
    }
}

// Three payloads through a pool of two slots: the sender allocates (free list first,
// then the fresh scan), writes, publishes (Loaned -> Sent) and hands the reference
// over a Relaxed mailbox, so that the slot's own word is the only synchronisation; the
// receiver claims (Sent -> Received), reads and frees (Received -> Free, push) while
// the sender pops for the next payload. Each payload is read whole by its receiver
// only; a slot is rewritten only after its reader is done (the witness); generations
// grow with every loan; at the end every slot is Free and listed once.
// shm[verify shm.slot.alloc]
// shm[verify shm.slot.publish]
// shm[verify shm.slot.claim]
// shm[verify shm.slot.free]
// shm[verify shm.slot.free-list]
#[test]
fn slots_travel_and_return_without_a_race_or_a_loss() {
    model(Some(2), || {
        const PAYLOADS: u64 = 3;
        let pool = Arc::new(Pool::new(2));
        // Reference n as `generation << 32 | index + 1`, 0 until sent.
        let mailbox: Arc<Vec<AtomicU64>> =
            Arc::new((0..PAYLOADS).map(|_| AtomicU64::new(0)).collect());
        let sender = {
            let (pool, mailbox) = (pool.clone(), mailbox.clone());
            thread::spawn(move || {
                let view = pool.view();
                let mut fresh = 0;
                let mut last_generation = [0u32; 2];
                for n in 0..PAYLOADS {
                    let (index, generation) = alloc(&view, &mut fresh);
                    assert!(generation > last_generation[index as usize]);
                    last_generation[index as usize] = generation;
                    pool.write(index, n);
                    view.mark_sent(index, generation).unwrap();
                    let reference = u64::from(generation) << 32 | u64::from(index + 1);
                    mailbox[n as usize].store(reference, Ordering::Relaxed);
                }
                fresh
            })
        };
        let receiver = {
            let pool = pool.clone();
            thread::spawn(move || {
                let view = pool.view();
                for n in 0..PAYLOADS {
                    let reference = loop {
                        match mailbox[n as usize].load(Ordering::Relaxed) {
                            0 => thread::yield_now(),
                            r => break r,
                        }
                    };
                    let (index, generation) = (reference as u32 - 1, (reference >> 32) as u32);
                    view.claim(index, generation, SLOT_SIZE, 1).unwrap();
                    pool.read(index, n);
                    view.release(index, generation).unwrap();
                    // A second free of the same reference fails.
                    let again = view.release(index, generation);
                    assert!(again.is_err(), "slot {index} freed twice");
                }
            })
        };
        let fresh = sender.join().unwrap();
        receiver.join().unwrap();
        pool.check_all_free(fresh);
    });
}

// Two receivers free their slots (Received -> Free, push) while the sender allocates
// the listed third slot, publishes it and then, its push having failed, returns it
// (Sent -> Free, push): three pushes race a pop on the tagged head. Nothing is lost or
// listed twice, no slot is handed out while held, and every slot ends Free.
// shm[verify shm.slot.free]
// shm[verify shm.slot.free-list]
#[test]
fn concurrent_frees_and_a_returned_loan_lose_nothing() {
    model(Some(2), || {
        let pool = Arc::new(Pool::new(3));
        let view = pool.view();
        // Slots 0 and 1 were sent at generation 1 and claimed; slot 2 is Free and listed.
        let mut fresh = 0;
        for _ in 0..3 {
            alloc(&view, &mut fresh);
        }
        for index in 0..2 {
            view.mark_sent(index, 1).unwrap();
            view.claim(index, 1, SLOT_SIZE, 1).unwrap();
        }
        view.mark_sent(2, 1).unwrap();
        view.claim(2, 1, SLOT_SIZE, 1).unwrap();
        view.release(2, 1).unwrap();
        let receivers: Vec<_> = (0..2)
            .map(|index| {
                let pool = pool.clone();
                thread::spawn(move || pool.view().release(index, 1).unwrap())
            })
            .collect();
        // The sender: the list (or, once both are freed, any slot) yields a Free slot.
        let sender = {
            let pool = pool.clone();
            thread::spawn(move || {
                let view = pool.view();
                let (index, generation) = alloc(&view, &mut fresh);
                assert_eq!(view.state(index), Some(SlotState::Loaned));
                view.mark_sent(index, generation).unwrap();
                view.unloan(index, generation);
                fresh
            })
        };
        for receiver in receivers {
            receiver.join().unwrap();
        }
        pool.check_all_free(sender.join().unwrap());
    });
}

// The host recycles an entry (`shm.slot.reclaim`) while one of its threads still holds
// a view of a slot the departed guest sent: the reclaim keeps that Received slot (the
// view frees it), returns the guest's Sent and Loaned slots and empties the list; then
// the next guest, starting its fresh scan at 0, allocates every slot and writes it. The
// view's free (Received -> Free, push) races the reclaim and the new allocations: the
// view's read is ordered before the new guest's write, and the new guest gets each slot
// exactly once and eventually all of them. With the list emptied by a plain store, a
// push landing just before it was erased without ordering the slot's Free word before
// the scan, which could then miss the slot for good: loom found it.
// shm[verify shm.slot.reclaim]
#[test]
fn reclaim_racing_a_view_drop_loses_no_slot() {
    model(None, || {
        let pool = Arc::new(Pool::new(3));
        let view = pool.view();
        let mut fresh = 0;
        for _ in 0..3 {
            alloc(&view, &mut fresh);
        }
        // Slot 0: Received by the host's view (payload 7). Slot 1: Sent, never claimed.
        // Slot 2: Loaned, the guest died writing it.
        pool.write(0, 7);
        view.mark_sent(0, 1).unwrap();
        view.claim(0, 1, SLOT_SIZE, 0).unwrap();
        view.mark_sent(1, 1).unwrap();
        let holder = {
            let pool = pool.clone();
            thread::spawn(move || {
                pool.read(0, 7);
                pool.view().release(0, 1).unwrap();
            })
        };
        let host = {
            let pool = pool.clone();
            thread::spawn(move || {
                let view = pool.view();
                // Slot 0 is kept (Received) or already Free; slots 1 and 2 return.
                assert_eq!(view.reclaim_all(|state| state == SlotState::Received), 2);
                // The next guest (after the recycle) allocates with a fresh scan.
                let mut fresh = 0;
                let mut taken = Vec::new();
                while taken.len() < 3 {
                    match view.alloc(&mut fresh, 2).expect("an honest free list") {
                        Some((index, _)) => {
                            assert!(!taken.contains(&index), "slot {index} allocated twice");
                            pool.write(index, 8);
                            taken.push(index);
                        }
                        // Slot 0 is still Received: the view's free will list it. Were it
                        // freed but neither listed nor left to the scan, this would spin
                        // until loom gives up on the model.
                        None => thread::yield_now(),
                    }
                }
            })
        };
        holder.join().unwrap();
        host.join().unwrap();
        // Every slot is the next guest's (the list may still name slot 0: a stale hint,
        // which the allocator skips).
        for index in 0..3 {
            assert_eq!(view.state(index), Some(SlotState::Loaned), "slot {index}");
        }
    });
}
