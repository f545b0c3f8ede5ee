//! Model-based property tests of the slot pools (`spec/05-slots.md`): random
//! sequences of loans, publishes, abandoned loans, copying sends, copying receives,
//! views taken and dropped, over one to four size classes, through the same
//! `Outbox`/`Inbox`/`Message` calls the host and guests make, against a model of
//! every slot's state, each pool's free list and fresh count, and the ring.

use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::Index;
use shm_primitives::slot::{owner_word, SlotState};
use shm_primitives::view::SlotBytes;

mod common;
use common::config;
use shm_primitives::{
    ChannelSendError, Direction, HeapRegion, Inbox, Message, Meta, Outbox, Payload, PeerId, Pools,
    Segment, SegmentConfig, ShmBacking, SlotClass, SlotClasses, SlotLoan, INLINE_CAPACITY,
};

/// The guest sends, the host receives: the pools of the ToHost direction.
const DIR: Direction = Direction::ToHost;

fn peer() -> PeerId {
    PeerId::new(1).unwrap()
}

/// A ring of 2 to 8 entries and 1 to 4 classes (sizes 64 to 512, strictly
/// increasing, 1 to 3 slots each), so that rings fill and pools run dry often.
#[derive(Debug, Clone)]
struct Setup {
    ring_capacity: u32,
    classes: Vec<SlotClass>,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1u32..=3,
        proptest::collection::btree_set(1u32..=8, 1..=4),
        proptest::collection::vec(1u32..=3, 4),
    )
        .prop_map(|(log, sizes, counts)| Setup {
            ring_capacity: 1 << log,
            classes: sizes
                .iter()
                .zip(&counts)
                .map(|(&s, &n)| SlotClass::new(s * 64, n))
                .collect(),
        })
}

#[derive(Debug, Clone)]
enum Op {
    /// Loan a slot for `len` bytes (`len` scaled to 0..=largest + 32) and write
    /// `written` of its bytes (scaled to 0..=its capacity).
    Loan { len: Index, written: Index },
    /// Publish an outstanding loan.
    Publish(Index),
    /// Drop an outstanding loan unsent.
    Abandon(Index),
    /// A copying send of `len` bytes: 0..=36 when `inline`, otherwise scaled to
    /// 0..=largest + 32.
    Send { len: Index, inline: bool },
    /// A copying receive.
    Recv,
    /// A receive that keeps the message (and its slot) as a view.
    Take,
    /// Drop a held view.
    DropView(Index),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (any::<Index>(), any::<Index>()).prop_map(|(len, written)| Op::Loan { len, written }),
        2 => any::<Index>().prop_map(Op::Publish),
        1 => any::<Index>().prop_map(Op::Abandon),
        3 => (any::<Index>(), any::<bool>()).prop_map(|(len, inline)| Op::Send { len, inline }),
        2 => Just(Op::Recv),
        2 => Just(Op::Take),
        2 => any::<Index>().prop_map(Op::DropView),
    ];
    proptest::collection::vec(op, 1..200)
}

/// A slot reference: class, index, generation.
type SlotRef = (u8, u32, u32);

/// A slot as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    state: SlotState,
    generation: u32,
}

/// One pool: its slots, its free list (a stack: the last element is the top) and the
/// sender's `fresh` count (`shm.slot.alloc`).
#[derive(Debug)]
struct Class {
    size: u32,
    slots: Vec<Slot>,
    listed: Vec<u32>,
    fresh: u32,
}

/// A message in the ring: its header, its payload and the slot it travels in.
#[derive(Debug)]
struct InFlight {
    meta: Meta,
    bytes: Vec<u8>,
    slot: Option<SlotRef>,
}

#[derive(Debug)]
struct Model {
    ring_capacity: usize,
    classes: Vec<Class>,
    ring: VecDeque<InFlight>,
}

impl Model {
    fn new(s: &Setup) -> Self {
        let classes = s
            .classes
            .iter()
            .map(|k| Class {
                size: k.size,
                slots: vec![
                    Slot {
                        state: SlotState::Free,
                        generation: 0,
                    };
                    k.count as usize
                ],
                listed: Vec::new(),
                fresh: 0,
            })
            .collect();
        Self {
            ring_capacity: s.ring_capacity as usize,
            classes,
            ring: VecDeque::new(),
        }
    }

    fn largest(&self) -> u32 {
        self.classes.last().unwrap().size
    }

    fn ring_full(&self) -> bool {
        self.ring.len() == self.ring_capacity
    }

    fn has_free(&self, class: usize) -> bool {
        self.classes[class]
            .slots
            .iter()
            .any(|s| s.state == SlotState::Free)
    }

    /// `shm.slot.loan` and `shm.slot.classes`: too large, ring full, then the smallest
    /// fitting class with a Free slot, else exhaustion. Returns the class, and the
    /// index and generation the free list or the fresh scan gives.
    fn loan(&mut self, len: usize) -> Result<SlotRef, ChannelSendError> {
        let largest = self.largest() as usize;
        let first = self.classes.iter().position(|c| c.size as usize >= len);
        let first = first.ok_or(ChannelSendError::TooLarge { len, max: largest })?;
        if self.ring_full() {
            return Err(ChannelSendError::RingFull);
        }
        for c in first..self.classes.len() {
            if let Some((index, generation)) = self.alloc(c) {
                return Ok((c as u8, index, generation));
            }
        }
        Err(ChannelSendError::PoolExhausted)
    }

    /// Free(g) -> Loaned(g + 1): the top of the free list, else the next fresh slot.
    fn alloc(&mut self, class: usize) -> Option<(u32, u32)> {
        let k = &mut self.classes[class];
        let index = match k.listed.pop() {
            Some(i) => i,
            None if k.fresh < k.slots.len() as u32 => {
                k.fresh += 1;
                k.fresh - 1
            }
            None => return None,
        };
        let slot = &mut k.slots[index as usize];
        assert_eq!(
            slot.state,
            SlotState::Free,
            "the model lists only Free slots"
        );
        slot.state = SlotState::Loaned;
        slot.generation += 1;
        Some((index, slot.generation))
    }

    fn set(&mut self, (class, index, generation): SlotRef, from: SlotState, to: SlotState) {
        let slot = &mut self.classes[class as usize].slots[index as usize];
        assert_eq!(
            *slot,
            Slot {
                state: from,
                generation
            }
        );
        slot.state = to;
    }

    /// Back to Free with its generation, then pushed onto the list (`shm.slot.free`).
    fn free(&mut self, slot: SlotRef, from: SlotState) {
        self.set(slot, from, SlotState::Free);
        self.classes[slot.0 as usize].listed.push(slot.1);
    }

    /// A descriptor pushed, or `RingFull` and nothing pushed.
    fn push(&mut self, msg: InFlight) -> Result<(), ChannelSendError> {
        if self.ring_full() {
            return Err(ChannelSendError::RingFull);
        }
        self.ring.push_back(msg);
        Ok(())
    }
}

/// A one-guest heap segment with `s`'s ring and classes, as a host creates it.
fn segment(s: &Setup) -> Segment {
    let config = SegmentConfig {
        max_guests: 1,
        ring_capacity: s.ring_capacity,
        classes: SlotClasses::new(&s.classes),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let len = config.layout().unwrap().total_size as usize;
    let heap = HeapRegion::new_zeroed(len).unwrap();
    let seg = Segment::init(ShmBacking::Heap(Arc::new(heap)), config, [1, 2], 7).unwrap();
    seg.publish();
    seg
}

/// The payload of message `n`: distinct from its neighbours' at every length.
fn pattern(n: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (n as usize * 131 + i * 7 + i / 251) as u8)
        .collect()
}

/// Every slot of every pool is in the model's state.
fn check_slots(m: &Model, pools: &Pools<'_>) -> Result<(), TestCaseError> {
    let mut free = 0;
    for (c, k) in m.classes.iter().enumerate() {
        let pool = pools.class(c).unwrap();
        for (i, slot) in k.slots.iter().enumerate() {
            prop_assert_eq!(
                pool.state(i as u32),
                Some(slot.state),
                "class {} slot {}",
                c,
                i
            );
            free += u32::from(slot.state == SlotState::Free);
        }
    }
    prop_assert_eq!(pools.usage().free, free);
    Ok(())
}

/// A loan as the model says it should be: the class chosen by size and availability,
/// a slot that was Free, the index the free list or the scan gives.
fn check_loan(
    m: &mut Model,
    len: usize,
    got: Result<SlotLoan, ChannelSendError>,
) -> Result<Option<SlotLoan>, TestCaseError> {
    let first = m.classes.iter().position(|c| c.size as usize >= len);
    // The spec's choice, independent of free-list order: the smallest class that
    // holds `len` and has a Free slot.
    let class = first.and_then(|f| (f..m.classes.len()).find(|&c| m.has_free(c)));
    let want = m.loan(len);
    match got {
        Ok(loan) => {
            let Ok((c, index, generation)) = want else {
                return Err(TestCaseError::fail(format!(
                    "{loan:?}, the model: {want:?}"
                )));
            };
            prop_assert_eq!(Some(loan.class as usize), class, "smallest fitting class");
            prop_assert_eq!(
                loan,
                SlotLoan {
                    class: c,
                    index,
                    generation,
                    capacity: m.classes[c as usize].size
                }
            );
            Ok(Some(loan))
        }
        Err(e) => {
            prop_assert_eq!(Err(e), want);
            if e == ChannelSendError::PoolExhausted {
                prop_assert_eq!(class, None, "exhausted with a fitting slot Free");
            }
            Ok(None)
        }
    }
}

fn run(setup: &Setup, ops: &[Op]) -> Result<(), TestCaseError> {
    let seg = segment(setup);
    let ring = seg.ring(peer(), DIR).unwrap();
    let pools = seg.pools(peer(), DIR).unwrap();
    let mut outbox = Outbox::new(owner_word(1, 0));
    let mut inbox = Inbox::new(owner_word(0, 0));
    let mut m = Model::new(setup);
    let scaled = |i: &Index, m: &Model| i.index(m.largest() as usize + 33);
    // Outstanding loans with the bytes written into them, and held views with the
    // payload they must show.
    let mut loans: Vec<(SlotLoan, Meta, Vec<u8>)> = Vec::new();
    let mut views: Vec<(Message, Vec<u8>, Option<SlotRef>)> = Vec::new();
    let mut buf = Vec::new();
    for (n, op) in ops.iter().enumerate() {
        let n = n as u64;
        let meta = Meta::new(n as u32, n);
        match op {
            Op::Loan { len, written } => {
                let len = scaled(len, &m);
                let got = outbox.loan(&ring, &pools, len);
                if let Some(loan) = check_loan(&mut m, len, got)? {
                    let bytes = pattern(n, written.index(loan.capacity as usize + 1));
                    let ptr = pools
                        .class(loan.class as usize)
                        .unwrap()
                        .data_ptr(loan.index);
                    let mut slot = SlotBytes::new(ptr.unwrap(), loan.capacity as usize);
                    prop_assert!(slot.write_at(0, &bytes));
                    loans.push((loan, meta, bytes));
                }
            }
            Op::Publish(i) if !loans.is_empty() => {
                let (loan, meta, bytes) = loans.remove(i.index(loans.len()));
                let slot = (loan.class, loan.index, loan.generation);
                let got = outbox.publish(&ring, &pools, loan, meta, bytes.len(), None);
                m.set(slot, SlotState::Loaned, SlotState::Sent);
                let want = m.push(InFlight {
                    meta,
                    bytes,
                    slot: Some(slot),
                });
                if want.is_err() {
                    // The ring filled since the loan: the slot goes back, not astray.
                    m.free(slot, SlotState::Sent);
                }
                prop_assert_eq!(got, want);
            }
            Op::Abandon(i) if !loans.is_empty() => {
                let (loan, _, _) = loans.remove(i.index(loans.len()));
                outbox.abandon(&pools, loan);
                m.free((loan.class, loan.index, loan.generation), SlotState::Loaned);
            }
            Op::Send { len, inline } => {
                let len = if *inline {
                    len.index(INLINE_CAPACITY + 1)
                } else {
                    scaled(len, &m)
                };
                let bytes = pattern(n, len);
                let got = outbox.send(&ring, &pools, meta, &bytes, None);
                let want = if len <= INLINE_CAPACITY {
                    // No slot, so no pool can stop it.
                    m.push(InFlight {
                        meta,
                        bytes,
                        slot: None,
                    })
                } else {
                    m.loan(len).map(|slot| {
                        m.set(slot, SlotState::Loaned, SlotState::Sent);
                        let msg = InFlight {
                            meta,
                            bytes,
                            slot: Some(slot),
                        };
                        m.push(msg).expect("the loan checked for room");
                    })
                };
                prop_assert_eq!(got, want);
            }
            Op::Recv => {
                let got = inbox.recv(&ring, &pools, &mut buf, None)?;
                match m.ring.pop_front() {
                    None => prop_assert_eq!(got, None),
                    Some(msg) => {
                        prop_assert_eq!(got, Some(msg.meta));
                        prop_assert_eq!(&buf, &msg.bytes, "payload as written");
                        if let Some(slot) = msg.slot {
                            m.free(slot, SlotState::Sent);
                        }
                    }
                }
            }
            Op::Take => {
                let got = inbox.take(&ring, &pools, None)?;
                match (got, m.ring.pop_front()) {
                    (None, None) => {}
                    (Some(got), Some(msg)) => {
                        prop_assert_eq!(got.meta, msg.meta);
                        let len = msg.bytes.len() as u32;
                        match (got.payload, msg.slot) {
                            (Payload::Inline { len: l, .. }, None) => {
                                prop_assert_eq!(u32::from(l), len)
                            }
                            (
                                Payload::Slot {
                                    class,
                                    index,
                                    generation,
                                    len: l,
                                },
                                Some(slot),
                            ) => {
                                prop_assert_eq!(
                                    (class, index, generation, l),
                                    (slot.0, slot.1, slot.2, len)
                                );
                                m.set(slot, SlotState::Sent, SlotState::Received);
                            }
                            (p, _) => prop_assert!(false, "{:?} for {:?}", p, msg),
                        }
                        let view =
                            Message::new(&seg, peer(), DIR, got.meta, got.payload, None, None)
                                .expect("inline and slot payloads make messages");
                        prop_assert_eq!(view.to_vec(), msg.bytes.clone(), "payload as written");
                        views.push((view, msg.bytes, msg.slot));
                    }
                    (got, msg) => {
                        return Err(TestCaseError::fail(format!("{got:?}, the model: {msg:?}")))
                    }
                }
            }
            Op::DropView(i) if !views.is_empty() => {
                let (view, bytes, slot) = views.remove(i.index(views.len()));
                prop_assert_eq!(view.to_vec(), bytes, "unchanged while held");
                drop(view);
                if let Some(slot) = slot {
                    m.free(slot, SlotState::Received);
                }
            }
            Op::Publish(_) | Op::Abandon(_) | Op::DropView(_) => {}
        }
        check_slots(&m, &pools)?;
    }
    // Give everything back: every slot ends Free, and every one can be allocated
    // again (none stranded off both the free list and the fresh scan).
    for (loan, _, _) in loans.drain(..) {
        outbox.abandon(&pools, loan);
        m.free((loan.class, loan.index, loan.generation), SlotState::Loaned);
    }
    for (view, _, slot) in views.drain(..) {
        drop(view);
        if let Some(slot) = slot {
            m.free(slot, SlotState::Received);
        }
    }
    while let Some(msg) = m.ring.pop_front() {
        let got = inbox.recv(&ring, &pools, &mut buf, None)?;
        prop_assert_eq!(got, Some(msg.meta));
        prop_assert_eq!(&buf, &msg.bytes);
        if let Some(slot) = msg.slot {
            m.free(slot, SlotState::Sent);
        }
    }
    prop_assert_eq!(inbox.recv(&ring, &pools, &mut buf, None)?, None);
    check_slots(&m, &pools)?;
    prop_assert_eq!(pools.usage().in_use, 0, "every slot is Free");
    for c in 0..m.classes.len() {
        for _ in 0..m.classes[c].slots.len() {
            let len = m.classes[c].size as usize;
            let got = outbox.loan(&ring, &pools, len);
            let loan = check_loan(&mut m, len, got)?.expect("a Free slot is allocatable");
            prop_assert_eq!(loan.class as usize, c);
            loans.push((loan, Meta::default(), Vec::new()));
        }
    }
    prop_assert_eq!(
        outbox.loan(&ring, &pools, 0),
        Err(ChannelSendError::PoolExhausted)
    );
    for (loan, _, _) in loans.drain(..) {
        outbox.abandon(&pools, loan);
    }
    prop_assert_eq!(pools.usage().in_use, 0);
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    // Any sequence of loans, publishes, abandoned loans, sends, receives and views over
    // 1 to 4 classes, against the model: a loan takes a slot that was Free, of the
    // smallest class that holds the length and has one, at the index the free list
    // (a stack) or the fresh scan gives, with its generation bumped; exhaustion is
    // reported exactly when no fitting class has a Free slot, after too-large and
    // ring-full; a publish into a ring that filled since the loan returns the slot;
    // every slot is in the model's state after every step; payloads read back as
    // written, by copy and through views, and stay so while a view is held; and at
    // the end every slot is Free and allocatable again.
    // shm[verify shm.slot.alloc]
    // shm[verify shm.slot.free-list]
    // shm[verify shm.slot.classes]
    // shm[verify shm.slot.exhausted]
    // shm[verify shm.slot.loan]
    // shm[verify shm.slot.publish]
    // shm[verify shm.slot.claim]
    // shm[verify shm.slot.view]
    // shm[verify shm.slot.free]
    #[test]
    fn pools_follow_their_model(setup in setup(), ops in ops()) {
        run(&setup, &ops)?;
    }
}
