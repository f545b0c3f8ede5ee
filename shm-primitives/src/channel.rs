//! One direction of messaging: a ring plus the pools its slot payloads live in.
//!
//! The same code runs in the host and in guests; the host's copies validate what its
//! guests wrote, and the guests' copies validate what the host wrote. Sending is
//! either a copy ([`Outbox::send`]) or a loan written in place and then published
//! ([`Outbox::loan`], [`Outbox::publish`]); receiving either copies
//! ([`Inbox::recv`]) or takes the message with its slot still claimed
//! ([`Inbox::take`]), for a view that frees the slot later.

use std::os::fd::BorrowedFd;

use crate::broadcast::NO_WORD;
use crate::desc::{Body, Descriptor, Meta, INLINE_CAPACITY};
use crate::layout::MAX_CLASSES;
use crate::ring::{Consumer, Producer, PushError, RingView};
use crate::segment::Pools;
use crate::violation::Violation;

/// Why a send did not happen. Nothing was published in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelSendError {
    /// The ring holds `capacity` undelivered descriptors.
    #[error("ring is full")]
    RingFull,
    /// No slot of a class large enough is free.
    #[error("slot pool is exhausted")]
    PoolExhausted,
    /// The payload is larger than the largest slot class.
    #[error("payload of {len} bytes exceeds the {max}-byte slot")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Largest payload.
        max: usize,
    },
    /// The receiver left an impossible value in shared memory.
    #[error("protocol violation by the receiver: {0}")]
    Violation(Violation),
}

fn push_err(e: PushError) -> ChannelSendError {
    match e {
        PushError::Full => ChannelSendError::RingFull,
        PushError::Violation(v) => ChannelSendError::Violation(v),
    }
}

/// A slot the sender holds as Loaned: write the payload, then
/// [`Outbox::publish`] it or [`Outbox::abandon`] it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLoan {
    /// Slot class.
    pub class: u8,
    /// Slot index in the class's pool.
    pub index: u32,
    /// The generation the allocation gave it.
    pub generation: u32,
    /// Bytes the slot holds.
    pub capacity: u32,
}

/// The sending side of one direction.
#[derive(Debug, Clone)]
pub struct Outbox {
    producer: Producer,
    /// Per class: slots visited since the pool was last reset (`shm.slot.alloc`).
    fresh: [u32; MAX_CLASSES],
    /// The owner word written into the slots we allocate.
    owner: u32,
}

impl Outbox {
    /// An outbox for a freshly reset ring and pools, allocating as `owner`
    /// (`crate::slot::owner_word`).
    pub fn new(owner: u32) -> Self {
        Self {
            producer: Producer::new(),
            fresh: [0; MAX_CLASSES],
            owner,
        }
    }

    /// The producer's private counter (descriptors published so far).
    pub fn published(&self) -> u64 {
        self.producer.tail()
    }

    /// After the receiver's party reclaimed the pools: every Free slot is found again
    /// by rescanning, since the free lists were emptied.
    pub fn rescan(&mut self) {
        self.fresh = [0; MAX_CLASSES];
    }

    /// Allocates a slot for a payload of `len` bytes: the smallest class that fits,
    /// falling through to larger classes when it is exhausted (`shm.slot.classes`).
    /// Checks for ring room first so a full ring never strands a slot.
    // shm[impl shm.slot.classes]
    // shm[impl shm.slot.exhausted]
    // shm[impl shm.slot.loan]
    pub fn loan(
        &mut self,
        ring: &RingView<'_>,
        pools: &Pools<'_>,
        len: usize,
    ) -> Result<SlotLoan, ChannelSendError> {
        let classes = pools.slot_classes();
        let first = classes.fit(len).ok_or(ChannelSendError::TooLarge {
            len,
            max: classes.largest() as usize,
        })?;
        if !self
            .producer
            .has_space(ring)
            .map_err(ChannelSendError::Violation)?
        {
            return Err(ChannelSendError::RingFull);
        }
        for class in first..pools.classes() {
            let pool = pools.class(class).expect("class < classes");
            let got = pool
                .alloc(&mut self.fresh[class], self.owner)
                .map_err(ChannelSendError::Violation)?;
            if let Some((index, generation)) = got {
                return Ok(SlotLoan {
                    class: class as u8,
                    index,
                    generation,
                    capacity: pool.slot_size(),
                });
            }
        }
        Err(ChannelSendError::PoolExhausted)
    }

    /// Publishes a loaned slot holding `len` bytes (`len ≤ loan.capacity`):
    /// Loaned -> Sent, then the descriptor. On any failure the slot is returned to
    /// the pool and nothing is published.
    // shm[impl shm.slot.publish]
    pub fn publish(
        &mut self,
        ring: &RingView<'_>,
        pools: &Pools<'_>,
        loan: SlotLoan,
        meta: Meta,
        len: usize,
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelSendError> {
        let pool = pools
            .class(loan.class as usize)
            .expect("loans name a class");
        let (index, generation) = (loan.index, loan.generation);
        assert!(
            len <= loan.capacity as usize,
            "publish past the loaned slot"
        );
        crate::crash::point(crate::crash::CrashPoint::SlotLoaned);
        if let Err(found) = pool.mark_sent(index, generation) {
            // Only the receiver can have touched a Loaned slot's word.
            pool.unloan(index, generation);
            return Err(ChannelSendError::Violation(Violation::SlotState {
                index,
                generation,
                found,
            }));
        }
        let desc = Descriptor {
            seq: 0,
            meta,
            payload_len: len as u32,
            body: Body::Slot {
                class: loan.class,
                index,
                generation,
            },
        };
        self.producer.push(ring, desc, bell).map_err(|e| {
            pool.unloan(index, generation);
            push_err(e)
        })
    }

    /// Returns a loan without publishing it.
    pub fn abandon(&mut self, pools: &Pools<'_>, loan: SlotLoan) {
        if let Some(pool) = pools.class(loan.class as usize) {
            pool.unloan(loan.index, loan.generation);
        }
    }

    /// Sends one message: inline when it fits in the descriptor, otherwise through a
    /// slot. Copies the payload once. `bell` is the receiver's doorbell, rung if it
    /// waits on it.
    // shm[impl shm.msg.inline]
    // shm[impl shm.msg.slot]
    pub fn send(
        &mut self,
        ring: &RingView<'_>,
        pools: &Pools<'_>,
        meta: Meta,
        payload: &[u8],
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelSendError> {
        if payload.len() <= INLINE_CAPACITY {
            return self.send_inline(ring, meta, payload, bell);
        }
        let loan = self.loan(ring, pools, payload.len())?;
        let pool = pools
            .class(loan.class as usize)
            .expect("loans name a class");
        pool.write(loan.index, payload);
        self.publish(ring, pools, loan, meta, payload.len(), bell)
    }

    /// Sends a payload of at most [`INLINE_CAPACITY`] bytes in the descriptor.
    pub fn send_inline(
        &mut self,
        ring: &RingView<'_>,
        meta: Meta,
        payload: &[u8],
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelSendError> {
        let mut data = [0u8; INLINE_CAPACITY];
        data[..payload.len()].copy_from_slice(payload);
        self.push(ring, meta, payload.len() as u32, Body::Inline(data), bell)
    }

    /// Whether the ring has room for one more descriptor.
    pub fn has_space(&mut self, ring: &RingView<'_>) -> Result<bool, Violation> {
        self.producer.has_space(ring)
    }

    /// Publishes a descriptor whose payload is already in place (a broadcast slot or
    /// a large payload's memory file).
    pub fn push(
        &mut self,
        ring: &RingView<'_>,
        meta: Meta,
        payload_len: u32,
        body: Body,
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelSendError> {
        let desc = Descriptor {
            seq: 0,
            meta,
            payload_len,
            body,
        };
        self.producer.push(ring, desc, bell).map_err(push_err)
    }
}

/// Where a received message's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Copied out of the descriptor: the first `len` bytes of `data`.
    Inline {
        /// The bytes.
        data: [u8; INLINE_CAPACITY],
        /// How many are the payload.
        len: u8,
    },
    /// In a slot we claimed (Received): free it with `PoolView::release` when done.
    Slot {
        /// Slot class.
        class: u8,
        /// Slot index.
        index: u32,
        /// Its generation.
        generation: u32,
        /// Payload bytes.
        len: u32,
    },
    /// In a broadcast slot whose reference we checked (Sent with this generation, our
    /// holder bit set, `shm.broadcast.refcount`): give it up with
    /// `BroadcastPool::release` when done.
    Broadcast {
        /// Slot index.
        index: u32,
        /// Its generation.
        generation: u32,
        /// Payload bytes.
        len: u32,
    },
    /// In a memory file passed on the doorbell (not yet opened).
    Large {
        /// Its large-payload sequence number.
        seq: u64,
        /// Payload bytes.
        len: u32,
    },
}

impl Payload {
    /// The descriptor `kind` this payload came in.
    pub fn kind(&self) -> u8 {
        match self {
            Payload::Inline { .. } => crate::desc::KIND_INLINE,
            Payload::Slot { .. } => crate::desc::KIND_SLOT,
            Payload::Broadcast { .. } => crate::desc::KIND_BROADCAST,
            Payload::Large { .. } => crate::desc::KIND_LARGE,
        }
    }
}

/// A message taken off a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// Its header.
    pub meta: Meta,
    /// Its payload.
    pub payload: Payload,
}

/// The receiving side of one direction.
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: Consumer,
    owner: u32,
}

impl Inbox {
    /// An inbox for a freshly reset ring, claiming slots as `owner`.
    pub fn new(owner: u32) -> Self {
        Self {
            consumer: Consumer::new(),
            owner,
        }
    }

    /// An inbox that resumes the ring from its shared consumer counter (a guest
    /// taking over an entry whose undelivered messages were retained).
    pub fn resume(ring: &RingView<'_>, owner: u32) -> Result<Self, Violation> {
        Ok(Self {
            consumer: Consumer::resume(ring)?,
            owner,
        })
    }

    /// Messages waiting in the ring (validated).
    pub fn pending(&mut self, ring: &RingView<'_>) -> Result<u32, Violation> {
        self.consumer.pending(ring)
    }

    /// Takes the next message off the ring, or `None` when it is empty. An inline
    /// payload is copied out; a slot payload's slot is validated and claimed
    /// (Sent -> Received) and stays claimed: the caller frees it. A broadcast
    /// reference (ToGuest only) is checked and stays held: the caller releases it.
    /// Large payloads are returned unvalidated for the caller's checks. Any
    /// impossible value is a [`Violation`] and nothing is consumed, except a
    /// broadcast reference the shared pool no longer backs, which is consumed and
    /// reported once (`shm.broadcast.refcount`). `bell` is the sender's doorbell,
    /// rung if it waits for ring space.
    // shm[impl shm.msg.inline]
    // shm[impl shm.msg.slot]
    // shm[impl shm.untrusted.validate]
    // shm[impl shm.slot.view]
    pub fn take(
        &mut self,
        ring: &RingView<'_>,
        pools: &Pools<'_>,
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<Option<Incoming>, Violation> {
        let Some(desc) = self.consumer.peek(ring)? else {
            return Ok(None);
        };
        let payload = match desc.body {
            Body::Inline(data) => {
                if desc.payload_len as usize > INLINE_CAPACITY {
                    return Err(Violation::InlineLen {
                        len: desc.payload_len,
                        max: INLINE_CAPACITY as u32,
                    });
                }
                Payload::Inline {
                    data,
                    len: desc.payload_len as u8,
                }
            }
            Body::Slot {
                class,
                index,
                generation,
            } => {
                let pool = pools.class(class as usize).ok_or(Violation::SlotClass {
                    class,
                    classes: pools.classes() as u8,
                })?;
                pool.claim(index, generation, desc.payload_len, self.owner)?;
                Payload::Slot {
                    class,
                    index,
                    generation,
                    len: desc.payload_len,
                }
            }
            Body::Broadcast { index, generation } => {
                self.check_broadcast(ring, pools, index, generation, desc.payload_len, bell)?;
                Payload::Broadcast {
                    index,
                    generation,
                    len: desc.payload_len,
                }
            }
            Body::Large { seq } => Payload::Large {
                seq,
                len: desc.payload_len,
            },
        };
        self.consumer.advance(ring);
        // (C4) Ring space is free now: wake a parked producer.
        ring.wake_producer(bell);
        Ok(Some(Incoming {
            meta: desc.meta,
            payload,
        }))
    }

    /// (C2) for a kind 2 descriptor (`shm.broadcast.refcount`). The index and length
    /// are the descriptor's own: a bad one leaves it unconsumed, as for slots. The
    /// state word and holder bit live in the pool every guest can write, so a failure
    /// there is consumed (C3) and reported once: another guest must not be able to
    /// wedge this ring.
    // shm[impl shm.broadcast.refcount]
    #[cold]
    fn check_broadcast(
        &mut self,
        ring: &RingView<'_>,
        pools: &Pools<'_>,
        index: u32,
        generation: u32,
        len: u32,
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<(), Violation> {
        let pool = pools.broadcast().ok_or(Violation::Broadcast {
            index,
            generation,
            found: NO_WORD,
        })?;
        pool.check_ref(index, generation, len)?;
        pool.check_held(pools.peer(), index, generation)
            .inspect_err(|_| {
                self.consumer.advance(ring);
                ring.wake_producer(bell);
            })
    }

    /// Receives one message into `out` (replacing its contents), returning its meta,
    /// or `None` when the ring is empty. A slot payload's slot is freed, and a
    /// broadcast reference released, before this returns. A large payload is a
    /// violation here (use [`take`](Self::take) where those may arrive).
    pub fn recv(
        &mut self,
        ring: &RingView<'_>,
        pools: &Pools<'_>,
        out: &mut Vec<u8>,
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<Option<Meta>, Violation> {
        let Some(msg) = self.take(ring, pools, bell)? else {
            return Ok(None);
        };
        copy_out(ring, pools, msg.payload, out, bell)?;
        Ok(Some(msg.meta))
    }
}

/// Copies an inline, slot or broadcast payload into `out` and frees its slot (or
/// releases its broadcast reference). A slot whose word changed under us means the
/// sender wrote a slot it no longer owned, so the copy may be torn: a violation (the
/// message itself is consumed).
// shm[impl shm.slot.free]
// shm[impl shm.broadcast.receive]
pub fn copy_out(
    ring: &RingView<'_>,
    pools: &Pools<'_>,
    payload: Payload,
    out: &mut Vec<u8>,
    bell: Option<BorrowedFd<'_>>,
) -> Result<(), Violation> {
    match payload {
        Payload::Inline { data, len } => {
            out.clear();
            out.extend_from_slice(&data[..len as usize]);
            Ok(())
        }
        Payload::Slot {
            class,
            index,
            generation,
            len,
        } => {
            let pool = pools.class(class as usize).expect("validated by take");
            pool.read_to_vec(index, len, out);
            let freed = pool.release(index, generation);
            // The slot is free: wake a producer parked for one.
            ring.wake_producer_after_free(bell);
            freed.map_err(|found| Violation::SlotState {
                index,
                generation,
                found,
            })
        }
        Payload::Broadcast {
            index,
            generation,
            len,
        } => {
            let no_pool = Violation::Broadcast {
                index,
                generation,
                found: NO_WORD,
            };
            let pool = pools.broadcast().ok_or(no_pool)?;
            pool.read_to_vec(index, len, out);
            // The host never waits for a broadcast slot: nobody to wake.
            pool.release(pools.peer(), index, generation).map(|_| ())
        }
        Payload::Large { seq, .. } => Err(Violation::Large {
            seq,
            reason: "large payloads are not expected here",
        }),
    }
}
