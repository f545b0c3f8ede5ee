//! Model-based property tests of the descriptor ring (`shm.ring.produce`,
//! `shm.ring.consume`, `shm.ring.full`, `shm.ring.validate`): random interleavings of
//! pushes, pops and peeks on small rings (so they wrap many times), over a heap
//! segment, against a `VecDeque`, with the other side's counter now and then
//! overwritten the way a hostile peer can.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use shm_primitives::desc::Descriptor;

mod common;
use common::{body, config, msg_kind};
use shm_primitives::ring::{Consumer, Producer, PushError, RingView};
use shm_primitives::{
    Direction, HeapRegion, Meta, PeerId, Segment, SegmentConfig, ShmBacking, Violation,
};

/// Any descriptor; its `seq` is left 0 for the push to set.
fn descriptor() -> impl Strategy<Value = Descriptor> {
    (any::<u64>(), any::<u32>(), any::<u32>(), msg_kind(), body()).prop_map(
        |(user_id, msg_type, payload_len, kind, body)| Descriptor {
            seq: 0,
            meta: Meta::new(msg_type, user_id).with_kind(kind),
            payload_len,
            body,
        },
    )
}

/// A value a hostile peer writes into the other side's counter.
#[derive(Debug, Clone)]
enum Forge {
    /// The honest counter moved back by this much (wrapping): valid while the distance
    /// stays within the capacity, a violation past it.
    Behind(u8),
    /// The honest counter moved forward by this much.
    Ahead(u8),
    /// Anything at all.
    Any(u64),
}

fn forge() -> impl Strategy<Value = Forge> {
    prop_oneof![
        (0u8..=20).prop_map(Forge::Behind),
        (1u8..=20).prop_map(Forge::Ahead),
        any::<u64>().prop_map(Forge::Any),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    /// The producer publishes a descriptor.
    Push(Descriptor),
    /// The consumer takes the next descriptor.
    Pop,
    /// The consumer looks at the next descriptor without taking it.
    Peek,
    /// The producer's peer writes the shared `tail` (it stays until the next push
    /// stores the true one).
    ForgeTail(Forge),
    /// The consumer's peer writes the shared `head` (it stays until the next pop).
    /// Only values at or behind the true head, or out of reach: a consumer that claims
    /// to have consumed what it has not makes the producer overwrite its own unread
    /// entries, which is its loss and not modelled here.
    ForgeHead(Forge),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        8 => descriptor().prop_map(Op::Push),
        8 => Just(Op::Pop),
        2 => Just(Op::Peek),
        1 => forge().prop_map(Op::ForgeTail),
        1 => forge().prop_map(Op::ForgeHead),
    ];
    proptest::collection::vec(op, 1..300)
}

/// The ring as the spec describes it: the descriptors in flight, both sides' private
/// counters, the producer's cached head, and what the shared counters hold.
#[derive(Debug)]
struct Model {
    capacity: u32,
    queue: VecDeque<Descriptor>,
    /// The producer's private counter.
    tail: u64,
    /// The consumer's private counter.
    head: u64,
    /// The producer's `head_cache` (P1).
    head_cache: u64,
    shared_tail: u64,
    shared_head: u64,
}

impl Model {
    fn new(capacity: u32) -> Self {
        Self {
            capacity,
            queue: VecDeque::new(),
            tail: 0,
            head: 0,
            head_cache: 0,
            shared_tail: 0,
            shared_head: 0,
        }
    }

    fn cap(&self) -> u64 {
        u64::from(self.capacity)
    }

    fn ring_index(&self, head: u64, tail: u64) -> Violation {
        Violation::RingIndex {
            head,
            tail,
            capacity: self.capacity,
        }
    }

    /// P1: room from the cache, else from the shared head, validated.
    fn push(&mut self, mut desc: Descriptor) -> Result<(), PushError> {
        if self.tail.wrapping_sub(self.head_cache) >= self.cap() {
            let head = self.shared_head;
            let depth = self.tail.wrapping_sub(head);
            if depth > self.cap() {
                return Err(PushError::Violation(self.ring_index(head, self.tail)));
            }
            self.head_cache = head;
            if depth == self.cap() {
                return Err(PushError::Full);
            }
        }
        desc.seq = self.tail;
        self.queue.push_back(desc);
        self.tail += 1;
        self.shared_tail = self.tail;
        Ok(())
    }

    /// C1/C2: the front of the queue, whatever the shared tail says; on an empty
    /// queue, the shared tail decides between empty and which violation.
    fn peek(&self) -> Result<Option<Descriptor>, Violation> {
        if let Some(&d) = self.queue.front() {
            return Ok(Some(d));
        }
        let (head, tail) = (self.head, self.shared_tail);
        if tail == head || tail.wrapping_add(1) == head {
            return Ok(None);
        }
        if tail.wrapping_sub(head) > self.cap() {
            return Err(self.ring_index(head, tail));
        }
        // The entry at `head` was last written for position head - capacity, or never.
        let found = head.checked_sub(self.cap()).unwrap_or(u64::MAX);
        Err(Violation::DescSequence {
            expected: head,
            found,
        })
    }

    fn pop(&mut self) -> Result<Option<Descriptor>, Violation> {
        let got = self.peek()?;
        if got.is_some() {
            self.queue.pop_front();
            self.head += 1;
            self.shared_head = self.head;
        }
        Ok(got)
    }

    fn forged_tail(&self, f: &Forge) -> u64 {
        match *f {
            Forge::Behind(k) => self.tail.wrapping_sub(u64::from(k)),
            Forge::Ahead(k) => self.tail.wrapping_add(u64::from(k)),
            Forge::Any(v) => v,
        }
    }

    /// At or behind the true head, or more than `capacity` ahead of it: values that
    /// do not let the producer reuse an unread entry however far it pushes while the
    /// forgery stays (see [`Op::ForgeHead`]; the tail stays within `capacity` of the
    /// true head).
    fn forged_head(&self, f: &Forge) -> u64 {
        let past = self.head.wrapping_add(self.cap());
        let v = match *f {
            Forge::Behind(k) => self.head.wrapping_sub(u64::from(k)),
            Forge::Ahead(k) => past.wrapping_add(u64::from(k)),
            Forge::Any(v) => v,
        };
        let ahead = v.wrapping_sub(self.head);
        if ahead != 0 && ahead <= self.cap() {
            past.wrapping_add(1)
        } else {
            v
        }
    }
}

/// A one-guest heap segment whose rings hold `capacity` descriptors, as a host
/// creates it (the product's own constructor and views).
fn segment(capacity: u32) -> Segment {
    let config = SegmentConfig {
        max_guests: 1,
        ring_capacity: capacity,
        broadcast_slots: 0,
        broadcast_slot_size: 0,
        ..SegmentConfig::default().with_slots(64, 1)
    };
    let len = config.layout().unwrap().total_size as usize;
    let heap = HeapRegion::new_zeroed(len).unwrap();
    let seg = Segment::init(ShmBacking::Heap(Arc::new(heap)), config, [1, 2], 7).unwrap();
    seg.publish();
    seg
}

const DIR: Direction = Direction::ToHost;

/// The shared `tail` and `head` words of the ring (`shm.ring.layout`: offsets 0 and
/// 64), which the peer can write.
fn counters(seg: &Segment) -> (&AtomicU64, &AtomicU64) {
    let off = seg.layout().ring_offset(0, DIR) as usize;
    let region = seg.backing().region();
    (
        region.atomic_u64(off).unwrap(),
        region.atomic_u64(off + 64).unwrap(),
    )
}

fn check_counters(
    m: &Model,
    ring: &RingView<'_>,
    seg: &Segment,
    producer: &Producer,
    consumer: &mut Consumer,
) -> Result<(), TestCaseError> {
    let (tail, head) = counters(seg);
    // Each side stores exactly its private counter (P3, C3), and never reads it back:
    // a forged value stays until the owner's next store.
    prop_assert_eq!(tail.load(Ordering::SeqCst), m.shared_tail);
    prop_assert_eq!(head.load(Ordering::SeqCst), m.shared_head);
    prop_assert_eq!(producer.tail(), m.tail);
    let len = m.queue.len() as u64;
    prop_assert!(len <= m.cap(), "never more than capacity in flight");
    prop_assert_eq!(m.tail - m.head, len);
    // The consumer's count: exact while the tail is honest; otherwise a violation
    // exactly when the forged tail is an impossible distance away, never a panic.
    let pending = consumer.pending(ring);
    let (t, h) = (m.shared_tail, m.head);
    if t == m.tail {
        prop_assert_eq!(pending, Ok(len as u32));
    } else if t.wrapping_add(1) != h && t.wrapping_sub(h) > m.cap() {
        prop_assert_eq!(pending, Err(m.ring_index(h, t)));
    } else {
        prop_assert!(matches!(pending, Ok(n) if n <= m.capacity), "{:?}", pending);
    }
    // The producer's count, from the shared head it validates.
    let depth = ring.depth_from(m.tail);
    let d = m.tail.wrapping_sub(m.shared_head);
    if d > m.cap() {
        prop_assert_eq!(depth, Err(m.ring_index(m.shared_head, m.tail)));
    } else {
        prop_assert_eq!(depth, Ok(d as u32));
        if m.shared_head == m.head {
            prop_assert_eq!(d, len);
        }
    }
    Ok(())
}

fn run(log_capacity: u32, ops: &[Op]) -> Result<(), TestCaseError> {
    let capacity = 1 << log_capacity;
    let seg = segment(capacity);
    let ring = seg.ring(PeerId::new(1).unwrap(), DIR).unwrap();
    let (shared_tail, shared_head) = counters(&seg);
    let (mut producer, mut consumer) = (Producer::new(), Consumer::new());
    let mut m = Model::new(capacity);
    for op in ops {
        match op {
            Op::Push(desc) => {
                let was_full = m.queue.len() == capacity as usize;
                let honest = m.shared_head == m.head;
                let want = m.push(*desc);
                let got = producer.push(&ring, *desc, None);
                prop_assert_eq!(got, want);
                // The spec's promise, not just the model's: with an honest consumer a
                // push fails exactly when the ring is full, and as `Full`; nothing is
                // ever published over an unread entry.
                if honest {
                    prop_assert_eq!(got == Err(PushError::Full), was_full);
                    prop_assert!(matches!(got, Ok(()) | Err(PushError::Full)));
                }
                if got.is_ok() {
                    prop_assert!(!was_full, "published into a full ring");
                }
            }
            Op::Pop => {
                let want = m.pop();
                let got = consumer.peek(&ring);
                if let Ok(Some(_)) = got {
                    consumer.advance(&ring);
                }
                prop_assert_eq!(got, want);
            }
            Op::Peek => {
                let want = m.peek();
                prop_assert_eq!(consumer.peek(&ring), want);
                prop_assert_eq!(consumer.peek(&ring), want, "peeking consumes nothing");
            }
            Op::ForgeTail(f) => {
                m.shared_tail = m.forged_tail(f);
                shared_tail.store(m.shared_tail, Ordering::SeqCst);
            }
            Op::ForgeHead(f) => {
                m.shared_head = m.forged_head(f);
                shared_head.store(m.shared_head, Ordering::SeqCst);
            }
        }
        // Whatever a peek returned came from the model's queue: a descriptor that was
        // pushed, at its position, never one made up from forged counters.
        check_counters(&m, &ring, &seg, &producer, &mut consumer)?;
    }
    // Everything accepted is delivered, in order, once the counters are honest again.
    shared_tail.store(m.tail, Ordering::SeqCst);
    m.shared_tail = m.tail;
    while let Some(want) = m.pop()? {
        let got = consumer.peek(&ring)?;
        prop_assert_eq!(got, Some(want));
        consumer.advance(&ring);
    }
    prop_assert_eq!(consumer.peek(&ring), Ok(None));
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    // Any interleaving of pushes, pops and peeks on rings of 2 to 16 entries: every
    // pop returns exactly the model's front (its `seq` the position), a push fails as
    // `Full` exactly when the model holds `capacity` descriptors and then writes
    // nothing, an empty ring reads as empty, and both sides' depths agree with the
    // model. Forged counters give exactly the violation `shm.ring.validate` names (or
    // an empty ring for a tail one behind the head), change neither side's state, and
    // never make the consumer return a descriptor that was not pushed.
    // shm[verify shm.ring.produce]
    // shm[verify shm.ring.consume]
    // shm[verify shm.ring.full]
    // shm[verify shm.ring.validate]
    #[test]
    fn ring_follows_its_model(log_capacity in 1u32..=4, ops in ops()) {
        run(log_capacity, &ops)?;
    }
}
