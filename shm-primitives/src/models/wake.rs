//! The park/wake protocol (`shm.wake.park`, `shm.wake.signal`, `shm.wake.space`): the
//! real `wait::wait_for` parking on the ring's real bells, against the real publish
//! (`Producer::push`, whose P4 wakes) and the receiver's C4 after consuming and after
//! freeing a slot, over loom's atomics and the futex stand-in of `models`. The
//! stand-in sleeps without a timeout: a lost wakeup is a deadlock, which loom reports.
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
use crate::desc::Descriptor;
use crate::ring::{Consumer, Producer};
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
    model(3, || {
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

// The producer waits for space in a full ring (parked flag then head snapshot, re-check
// P1, sleep on the head) while the consumer consumes (C3 head store, then C4 loads the
// producer's parked flag and wakes only if it is set, as `Inbox::take` does). The
// producer always wakes and publishes.
// shm[verify shm.wake.park]
// shm[verify shm.wake.signal]
// shm[verify shm.wake.space]
#[test]
fn a_producer_waiting_for_ring_space_always_wakes() {
    model(3, || {
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
