//! One direction of messaging: a ring plus the pool its slot payloads live in.
//!
//! The same code runs in the host and in guests; the host's copies validate what its
//! guests wrote, and the guests' copies validate what the host wrote.

use std::os::fd::BorrowedFd;

use crate::desc::{Body, Descriptor, Meta, INLINE_CAPACITY};
use crate::ring::{Consumer, Producer, PushError, RingView};
use crate::slot::PoolView;
use crate::violation::Violation;

/// Why a send did not happen. Nothing was published in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelSendError {
    /// The ring holds `capacity` undelivered descriptors.
    #[error("ring is full")]
    RingFull,
    /// Every slot of the pool is in use.
    #[error("slot pool is exhausted")]
    PoolExhausted,
    /// The payload is larger than a slot.
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

/// The sending side of one direction.
#[derive(Debug, Default, Clone)]
pub struct Outbox {
    producer: Producer,
    cursor: u32,
}

impl Outbox {
    /// An outbox for a freshly reset ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// The producer's private counter (descriptors published so far).
    pub fn published(&self) -> u64 {
        self.producer.tail()
    }

    /// Sends one message: inline when it fits in the descriptor, otherwise through a
    /// slot of `pool`. Copies the payload once. `bell` is the receiver's doorbell, rung
    /// if it waits on it.
    // shm[impl shm.msg.inline]
    // shm[impl shm.msg.slot]
    pub fn send(
        &mut self,
        ring: &RingView<'_>,
        pool: &PoolView<'_>,
        meta: Meta,
        payload: &[u8],
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelSendError> {
        let push_err = |e| match e {
            PushError::Full => ChannelSendError::RingFull,
            PushError::Violation(v) => ChannelSendError::Violation(v),
        };
        if payload.len() <= INLINE_CAPACITY {
            let mut data = [0u8; INLINE_CAPACITY];
            data[..payload.len()].copy_from_slice(payload);
            let desc = Descriptor {
                seq: 0,
                meta,
                payload_len: payload.len() as u32,
                body: Body::Inline(data),
            };
            return self.producer.push(ring, desc, bell).map_err(push_err);
        }
        if payload.len() > pool.slot_size() as usize {
            return Err(ChannelSendError::TooLarge {
                len: payload.len(),
                max: pool.slot_size() as usize,
            });
        }
        // Check for ring space first so a full ring never strands a slot.
        // shm[impl shm.slot.exhausted]
        if !self
            .producer
            .has_space(ring)
            .map_err(ChannelSendError::Violation)?
        {
            return Err(ChannelSendError::RingFull);
        }
        let (index, generation) = pool
            .alloc(&mut self.cursor)
            .ok_or(ChannelSendError::PoolExhausted)?;
        pool.write(index, payload);
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
            payload_len: payload.len() as u32,
            body: Body::Slot { index, generation },
        };
        self.producer.push(ring, desc, bell).map_err(|e| {
            pool.unloan(index, generation);
            push_err(e)
        })
    }
}

/// The receiving side of one direction.
#[derive(Debug, Default, Clone)]
pub struct Inbox {
    consumer: Consumer,
}

impl Inbox {
    /// An inbox for a freshly reset ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages waiting in the ring (validated).
    pub fn pending(&mut self, ring: &RingView<'_>) -> Result<u32, Violation> {
        self.consumer.pending(ring)
    }

    /// Receives one message into `out` (replacing its contents), returning its meta,
    /// or `None` when the ring is empty. A slot payload's slot is freed before this
    /// returns. Any impossible value is a [`Violation`] and nothing is consumed. `bell`
    /// is the sender's doorbell, rung if it waits on it for space.
    // shm[impl shm.msg.inline]
    // shm[impl shm.msg.slot]
    // shm[impl shm.untrusted.validate]
    pub fn recv(
        &mut self,
        ring: &RingView<'_>,
        pool: &PoolView<'_>,
        out: &mut Vec<u8>,
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<Option<Meta>, Violation> {
        let Some(desc) = self.consumer.peek(ring)? else {
            return Ok(None);
        };
        match desc.body {
            Body::Inline(data) => {
                let len = desc.payload_len as usize;
                if len > INLINE_CAPACITY {
                    return Err(Violation::InlineLen {
                        len: desc.payload_len,
                        max: INLINE_CAPACITY as u32,
                    });
                }
                self.consumer.advance(ring);
                out.clear();
                out.extend_from_slice(&data[..len]);
            }
            Body::Slot { index, generation } => {
                pool.claim(index, generation, desc.payload_len)?;
                self.consumer.advance(ring);
                pool.read_to_vec(index, desc.payload_len, out);
                // The payload is copied; a word changed under us means the sender wrote
                // a slot it no longer owned, so the copy may be torn: a violation.
                pool.release(index, generation)
                    .map_err(|found| Violation::SlotState {
                        index,
                        generation,
                        found,
                    })?;
            }
        }
        // (C4) Space and any slot are free now: wake a parked producer.
        ring.wake_producer(bell);
        Ok(Some(desc.meta))
    }
}
