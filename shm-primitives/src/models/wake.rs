//! The park/wake protocol (`shm.wake.park`, `shm.wake.signal`, `shm.wake.space`): the
//! real `wait::wait_for` parking on the ring's real bells, against the real publish
//! (`Producer::push`, whose P4 wakes) and the receiver's C4 after consuming and after
//! freeing a slot (`RingView::wake_producer`, `wake_producer_after_free`), over loom's
//! atomics and the futex stand-in of `models`. The stand-in sleeps without a timeout:
//! a lost wakeup is a deadlock, which loom reports. The receiver's sequence of calls is
//! transcribed from `channel::Inbox::take` and `channel::copy_out`, which take a
//! segment's pools and cannot be instantiated over loom's atomics.
//!
//! Loom treats SeqCst loads and stores as AcqRel, except that a SeqCst load never
//! returns a SeqCst store older than another SeqCst store to the same word (loom's
//! README, "Unsupported features"). The protocol's Dekker pairs (flag store then counter
//! load, against counter store then flag load) need the full SeqCst order, so every word
//! starts with a SeqCst store of its initial value (`Ring::new`): each load of a SeqCst
//! pair then sees at least the latest SeqCst store executed before it, as the SeqCst
//! total order requires, and weakening any access of a pair lets loom find the lost
//! wakeup. Loom still does not apply the C++ rule that a SeqCst load cannot see a
//! non-SeqCst store that happens before the latest SeqCst store (the disarm's Relaxed
//! store of 0 before a re-arm), so each model parks once per waiter: a second park could
//! report a wakeup as lost that the memory model does not lose.

use loom::sync::Arc;
use loom::thread;
use std::time::Duration;

use super::model;
use super::ring::{message, Ring};
use super::slot::Pool;
use crate::desc::Descriptor;
use crate::ring::{Consumer, Producer};
use crate::slot::SlotState;
use crate::violation::Violation;
use crate::wait::{wait_for, WaitPolicy};

/// Parks at once (`WaitPolicy::BLOCK`) and never times out: only a wake ends a sleep.
const BLOCK: WaitPolicy = WaitPolicy::BLOCK;
const FOREVER: Duration = Duration::MAX;

// The consumer waits for data on an empty ring (parked flag then tail snapshot, re-check,
// sleep on the tail) while the producer publishes one message (P3 tail store, then P4
// loads the parked flag and wakes only if it is set). Whatever the interleaving, the
// consumer wakes and receives the message: either its re-check sees the tail or the
// producer sees the flag.
// shm[verify shm.wake.park]
// shm[verify shm.wake.signal]
#[test]
fn a_consumer_waiting_for_data_always_wakes() {
    model(None, || {
        let ring = Arc::new(Ring::new(2));
        let producer = {
            let ring = ring.clone();
            thread::spawn(move || {
                Producer::new()
                    .push(&ring.view(), message(0), None)
                    .unwrap();
            })
        };
        let consumer = {
            let ring = ring.clone();
            thread::spawn(move || {
                let view = ring.view();
                let mut consumer = Consumer::new();
                let got = wait_for(BLOCK, FOREVER, &view.data_bell(), || consumer.peek(&view));
                let first = Descriptor {
                    seq: 0,
                    ..message(0)
                };
                assert_eq!(got, Ok(Some(first)));
                consumer.advance(&view);
            })
        };
        producer.join().unwrap();
        consumer.join().unwrap();
    });
}

// The producer waits for space in a full ring (parked flag, fence, space-bell snapshot,
// re-check P1, sleep on the space bell) while the consumer consumes (C3 head store, then C4 loads the
// producer's parked flag and wakes only if it is set, as `Inbox::take` does). The
// producer always wakes and publishes.
// shm[verify shm.wake.park]
// shm[verify shm.wake.signal]
// shm[verify shm.wake.space]
#[test]
fn a_producer_waiting_for_ring_space_always_wakes() {
    model(None, || {
        let ring = Arc::new(Ring::new(1));
        let mut producer = Producer::new();
        producer.push(&ring.view(), message(0), None).unwrap();
        let waiter = {
            let ring = ring.clone();
            thread::spawn(move || {
                let view = ring.view();
                let room = wait_for(BLOCK, FOREVER, &view.space_bell(), || {
                    Ok::<_, Violation>(producer.has_space(&view)?.then_some(()))
                });
                assert_eq!(room, Ok(Some(())));
                producer.push(&view, message(1), None).unwrap();
            })
        };
        let consumer = {
            let ring = ring.clone();
            thread::spawn(move || {
                let view = ring.view();
                let mut consumer = Consumer::new();
                assert!(consumer.peek(&view).unwrap().is_some());
                consumer.advance(&view);
                view.wake_producer(None);
            })
        };
        waiter.join().unwrap();
        consumer.join().unwrap();
    });
}

// The sender waits for a slot (the pool's one slot is the receiver's) with ring space
// to spare: parked flag, fence, space-bell snapshot, re-check by allocating, sleep on
// the space bell. The receiver takes the descriptor (claim, C3, C4, as `Inbox::take`),
// then reads and frees the slot and wakes again (fence, C4, as `copy_out`). The sender
// always wakes and gets the slot. Loom found two lost wakeups here: with the sender
// sleeping on `head`, which a free does not move, a wake sent between the sender's
// re-check and its sleep was lost; and without the two fences, the free (no SeqCst
// store) could be missed by the re-check while the flag was missed by C4.
// shm[verify shm.wake.space]
// shm[verify shm.slot.exhausted]
#[test]
fn a_sender_waiting_for_a_slot_always_wakes() {
    model(Some(3), || {
        let ring = Arc::new(Ring::new(2));
        let pool = Arc::new(Pool::new(1));
        // The slot travelled: allocated, written, sent, its descriptor published.
        let mut fresh = 0;
        let (index, generation) = pool.view().alloc(&mut fresh, 0).unwrap().unwrap();
        pool.write(index, 5);
        pool.view().mark_sent(index, generation).unwrap();
        let mut producer = Producer::new();
        producer.push(&ring.view(), message(0), None).unwrap();
        let sender = {
            let (ring, pool) = (ring.clone(), pool.clone());
            thread::spawn(move || {
                let (view, slots) = (ring.view(), pool.view());
                let got = wait_for(BLOCK, FOREVER, &view.space_bell(), || {
                    if !producer.has_space(&view)? {
                        return Ok(None);
                    }
                    slots.alloc(&mut fresh, 0)
                });
                assert_eq!(got, Ok(Some((index, generation + 1))));
                pool.write(index, 6);
            })
        };
        let receiver = {
            let (ring, pool) = (ring.clone(), pool.clone());
            thread::spawn(move || {
                let (view, slots) = (ring.view(), pool.view());
                let mut consumer = Consumer::new();
                assert!(consumer.peek(&view).unwrap().is_some());
                slots.claim(index, generation, 8, 1).unwrap();
                consumer.advance(&view);
                view.wake_producer(None);
                pool.read(index, 5);
                slots.release(index, generation).unwrap();
                view.wake_producer_after_free(None);
            })
        };
        sender.join().unwrap();
        receiver.join().unwrap();
        assert_eq!(pool.view().state(index), Some(SlotState::Loaned));
    });
}
