//! The ring (`shm.ring.produce`, `shm.ring.consume`): the real `Producer::push` and
//! `Consumer::peek`/`advance` over loom's atomics, on a ring of two entries that
//! wraps.

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;

use super::model;
use crate::desc::{Body, Descriptor, Meta, DESC_WORDS, INLINE_CAPACITY};
use crate::ring::{Consumer, Producer, RingHeader, RingView};

/// A ring over loom's atomics, plus one witness cell per entry: the producer writes
/// into it the number of the message it puts in the entry (after P1, before P3) and
/// the consumer reads it (after C1, before C3). Loom reports any pair of those
/// accesses the ring's orderings leave unordered: a consumer reading an entry the
/// producer is still writing, or a producer overwriting an entry not yet read.
pub(super) struct Ring {
    header: RingHeader<AtomicU64, AtomicU32>,
    descs: Vec<AtomicU64>,
    capacity: u32,
    witness: Vec<UnsafeCell<u64>>,
}

impl Ring {
    /// An empty ring of `capacity` entries, its counters and flags stored SeqCst (see
    /// `models::wake` for why the initial values must be SeqCst stores too).
    pub(super) fn new(capacity: u32) -> Self {
        let atomic = |v| {
            let a = AtomicU64::new(v);
            a.store(v, Ordering::SeqCst);
            a
        };
        let flag = || {
            let a = AtomicU32::new(0);
            a.store(0, Ordering::SeqCst);
            a
        };
        let header = RingHeader {
            tail: atomic(0),
            consumer_parked: flag(),
            _producer_pad: Default::default(),
            _producer_reserved: Default::default(),
            head: atomic(0),
            producer_parked: flag(),
            _consumer_pad: Default::default(),
            space_bell: atomic(0),
            _consumer_reserved: Default::default(),
        };
        Ring {
            header,
            descs: (0..capacity as usize * DESC_WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            capacity,
            witness: (0..capacity).map(|_| UnsafeCell::new(u64::MAX)).collect(),
        }
    }

    pub(super) fn view(&self) -> RingView<'_, AtomicU64, AtomicU32> {
        RingView::new(&self.header, &self.descs, self.capacity)
    }

    fn witness(&self, pos: u64) -> &UnsafeCell<u64> {
        &self.witness[(pos % u64::from(self.capacity)) as usize]
    }
}

/// Message `n`: user id `n` and `n + 1` inline bytes of value `n + 1`, so its content
/// spans several descriptor words.
pub(super) fn message(n: u64) -> Descriptor {
    let mut data = [0u8; INLINE_CAPACITY];
    let len = n as usize + 1;
    data[..len].fill(n as u8 + 1);
    Descriptor {
        seq: 0,
        meta: Meta::new(7, n),
        payload_len: len as u32,
        body: Body::Inline(data),
    }
}

/// Producer: publishes messages `0..count`, waiting (yielding) while the ring is full.
fn produce(ring: &Ring, count: u64) {
    let view = ring.view();
    let mut producer = Producer::new();
    for n in 0..count {
        // (P1) Room? Refreshes the consumer counter only when the cache says full.
        while !producer.has_space(&view).expect("an honest consumer") {
            thread::yield_now();
        }
        // The entry is ours from P1 to P3.
        ring.witness(producer.tail()).with_mut(|w| {
            // SAFETY: a loom cell; loom fails the model if this write is not ordered
            // after the consumer's read of the entry's previous message.
            unsafe { *w = n }
        });
        // (P2) words, (P3) tail, (P4) wake: the push finds room in its cache.
        producer.push(&view, message(n), None).unwrap();
    }
}

/// Consumer: takes `count` messages and checks each is the next one, whole.
fn consume(ring: &Ring, count: u64) {
    let view = ring.view();
    let mut consumer = Consumer::new();
    for n in 0..count {
        // (C1) and (C2): a violation (a stale entry, a bad seq) fails the unwrap.
        let desc = loop {
            match consumer.peek(&view).expect("an honest producer") {
                Some(desc) => break desc,
                None => thread::yield_now(),
            }
        };
        assert_eq!(
            desc,
            Descriptor {
                seq: n,
                ..message(n)
            },
            "message {n}"
        );
        let written = ring.witness(n).with(|w| {
            // SAFETY: a loom cell; loom fails the model if this read is not ordered
            // after the producer's write for this message.
            unsafe { *w }
        });
        assert_eq!(written, n, "entry of message {n}");
        // (C3)
        consumer.advance(&view);
    }
    let mut rest = consumer.clone();
    assert_eq!(rest.peek(&view), Ok(None), "nothing more was published");
}

// Three messages through a ring of two: the producer wraps onto entry 0 while the
// consumer may still be reading it. Every message arrives once, in order, with its
// content; no entry is read while written or overwritten before it is read (the
// witness); the ring never holds more than its capacity (a push into a full ring
// would overwrite an unread entry, which the seq check and the witness catch).
// Bounded to 3 preemptions: with descriptor stamps (one more Acquire per entry) every
// interleaving took four minutes in a debug build; 3 covers the wrap in 2 s.
// shm[verify shm.ring.produce]
// shm[verify shm.ring.consume]
#[test]
fn a_wrapping_ring_delivers_every_message_once_in_order() {
    model(Some(3), || {
        let ring = Arc::new(Ring::new(2));
        let producer = {
            let ring = ring.clone();
            thread::spawn(move || produce(&ring, 3))
        };
        let consumer = {
            let ring = ring.clone();
            thread::spawn(move || consume(&ring, 3))
        };
        producer.join().unwrap();
        consumer.join().unwrap();
        let view = ring.view();
        assert_eq!(view.raw_depth(), 0);
        assert_eq!(ring.header.tail.load(Ordering::Relaxed), 3);
    });
}
